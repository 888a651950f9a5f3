"""
Exact, packed scoring of continuations: [(context tokens, continuation tokens)] -> each
continuation's summed log-probability and whether greedy decoding would have produced it, the
two numbers lm-eval's loglikelihood requests ask for, in the fewest forward passes.

Requests with the same context (a multiple-choice question's choices) share one row: the context
once, then each continuation with its positions restarting after the context and an attention
mask that lets it see the context and itself only (hellaswag.py packs its endings the same way).
A continuation's last token is never an input, so a one-token answer costs nothing beyond its
context. The lm_head runs only where a continuation token is predicted. A context too long is
cropped from the left as lm-eval's hf backend crops it (the last block_size + 1 tokens of
context + continuation), so every number is the one an unpacked forward pass would give.

    from scoring import score
    results = score(model, [(ctx, cont), ...], batch_size=16)   # [(logprob, is_greedy), ...]
"""

import torch

import cli


def unwrap(model):
    """The GPT inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def pack_example(ctx_tokens, endings_tokens):
    """One row: the context, then each ending, positions restarting after the context.
    Returns (tokens, positions, segments); segment 0 is the context, i + 1 ending i."""
    n = len(ctx_tokens)
    tokens, positions, segments = list(ctx_tokens), list(range(n)), [0] * n
    for i, e in enumerate(endings_tokens):
        tokens += e
        positions += range(n, n + len(e))
        segments += [i + 1] * len(e)
    return tokens, positions, segments


def attention_mask(segments):
    """(L, L) bool: query q may attend to key k iff k <= q and k is context or in q's own ending."""
    seg = torch.as_tensor(segments)
    L = len(segments)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))


def pack(pairs, block_size):
    """Rows of at most block_size tokens: [(context, [request index, ...])], a context and the
    requests scored after it. Requests with the same (cropped) context share rows, in order."""
    groups = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise cli.Error(f"request {i}: an empty continuation")
        if len(cont) > block_size:
            raise cli.Error(f"request {i}: a continuation of {len(cont)} tokens does not fit block_size {block_size}")
        keep = min(len(ctx), block_size + 1 - len(cont))
        if keep < 1:
            raise cli.Error(f"request {i}: an empty context")
        groups.setdefault(tuple(ctx[len(ctx) - keep :]), []).append(i)
    rows = []
    for ctx, members in groups.items():
        row, length = [], len(ctx)
        for i in members:
            n = len(pairs[i][1]) - 1  # (the last token is predicted, never an input)
            if row and length + n > block_size:
                rows.append((ctx, row))
                row, length = [], len(ctx)
            row.append(i)
            length += n
        rows.append((ctx, row))
    return rows


def batches(rows, pairs, batch_size):
    """Rows in forward passes of at most batch_size requests each (at least one row), longest
    rows first: the same passes whatever the caller does with them (a rank takes every k-th)."""
    length = lambda r: len(r[0]) + sum(len(pairs[i][1]) - 1 for i in r[1])  # noqa: E731
    order = sorted(rows, key=lambda r: (-length(r), r[1][0]))
    out, cur, n = [], [], 0
    for r in order:
        if cur and n + len(r[1]) > batch_size:
            out.append(cur)
            cur, n = [], 0
        cur.append(r)
        n += len(r[1])
    return out + [cur] if cur else out


@torch.no_grad()
def score_batch(model, batch, pairs):
    """One forward pass over a batch of rows -> {request index: (logprob, is_greedy)}."""
    gpt = unwrap(model)
    device = gpt.transformer.wte.weight.device
    built = [pack_example(ctx, [pairs[i][1][:-1] for i in members]) for ctx, members in batch]
    B, L = len(batch), max(len(t) for t, _, _ in built)
    idx = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    mask = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1, 1)  # padding sees itself only
    r_index, p_index, targets, owner = [], [], [], []
    for r, ((ctx, members), (tokens, positions, segments)) in enumerate(zip(batch, built)):
        n = len(tokens)
        idx[r, :n] = torch.tensor(tokens)
        pos[r, :n] = torch.tensor(positions)
        mask[r, 0, :n, :n] = attention_mask(segments)
        at = len(ctx)
        for i in members:
            cont = pairs[i][1]
            # token t of a continuation is predicted at the context's last position (t = 0), else at its own t - 1
            p_index += [len(ctx) - 1] + list(range(at, at + len(cont) - 1))
            r_index += [r] * len(cont)
            targets += cont
            owner += [i] * len(cont)
            at += len(cont) - 1
    h = gpt.hidden(idx.to(device), positions=pos.to(device), attn_mask=mask.to(device))
    h = h[torch.tensor(r_index, device=device), torch.tensor(p_index, device=device)]
    logits = gpt.lm_head(h).float()
    t = torch.tensor(targets, device=device)
    logp = logits.gather(1, t[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    greedy = logits.argmax(dim=-1) == t
    out = {}
    for i, lp, g in zip(owner, logp.double().tolist(), greedy.tolist()):
        s, all_greedy = out.get(i, (0.0, True))
        out[i] = (s + lp, all_greedy and g)
    return out


def score(model, pairs, batch_size=16, rank=0, world_size=1, progress=None, max_length=None):
    """[(context tokens, continuation tokens)] -> [(summed logprob, is_greedy)] in their order; a request
    sees at most max_length tokens (default: the model's block_size).
    With world_size > 1 (torch.distributed up), rank r scores every world_size-th forward pass of
    the same passes one process would run, and every rank gets all the results: the same numbers
    for any world size."""
    gpt = unwrap(model)
    was_training = gpt.training
    gpt.eval()
    plan = batches(pack(pairs, max_length or gpt.config.block_size), pairs, batch_size)
    mine = {}
    for b in range(rank, len(plan), world_size):
        mine.update(score_batch(model, plan[b], pairs))
        if progress is not None:
            progress.update(sum(len(m) for _, m in plan[b]))
    gpt.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in part.items()}
    return [mine[i] for i in range(len(pairs))]
