"""
bench.py's sections on the model: model (our training step and KV-cache sampling against
transformers' GPT2LMHeadModel), hellaswag (hellaswag.score against build-nanogpt's one example per
forward pass), decode (the static cache against the dynamic path, transformers' generate and a
cache-less loop) and memory (the bytes each rank holds for training under DDP and FSDP2, computed from
the sharding plan). torch and transformers are imported by the sections, when they run.
"""

from bench_timing import multiple_choice, paired, repeats


def bench_model(args):
    """Ours vs transformers' GPT-2: training step and sampling, fp32 on this device."""
    import torch
    import transformers

    from model import GPT, GPTConfig
    from model_io import hf_state_dict

    transformers.logging.set_verbosity_error()
    L, H, C, T, B = args.n_layer, args.n_head, args.n_embd, args.seq_len, args.batch_size
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T)
    ours = GPT(cfg)
    hf_cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=T, vocab_size=cfg.vocab_size,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(hf_state_dict(ours), strict=False)  # same weights (lm_head is tied)
    data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]

    # Training step: each side as its users run it. Ours: the chunked fused loss and train.py's
    # optimizer (the gpt2 recipe: fused AdamW where available). Theirs: labels= and torch's AdamW.
    import train

    (opt_ours,) = train.build_optimizers(ours, train.parse_args([]), "cpu")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def step_ours():
        _, loss = ours(x, y, return_logits=False)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        loss = theirs(input_ids=x, labels=data[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    repeat = repeats(args, 9)
    t = paired({"ours": step_ours, "theirs": step_theirs}, repeat)
    tokens = B * T
    rows = [(f"train step fp32 L{L} C{C} B{B} T{T} (tok/s)", tokens / t["ours"], tokens / t["theirs"], "transformers")]

    # Sampling: greedy decoding of N new tokens after a P-token prompt, batch 1, KV cache on both.
    ours.eval()
    theirs.eval()
    theirs.load_state_dict(hf_state_dict(ours), strict=False)  # training moved them apart
    P, N = args.prompt_len, args.new_tokens
    prompt = data[:1, :P]

    def sample_ours():
        ours.generate(prompt, N, top_k=1)

    def sample_theirs():
        with torch.no_grad():
            theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N,
                            do_sample=False, use_cache=True, pad_token_id=0)

    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, N, top_k=1)[0, P:],
                           theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N,
                                           min_new_tokens=N, do_sample=False, pad_token_id=0)[0, P:]), \
            "greedy outputs differ: the comparison would be meaningless"
    t = paired({"ours": sample_ours, "theirs": sample_theirs}, repeat)
    rows.append((f"greedy sampling {N} tokens after {P}, batch 1 (tok/s)", N / t["ours"], N / t["theirs"],
                 "transformers"))
    return rows


def _bn_choose(model, ctx, endings):
    """build-nanogpt's HellaSwag scoring of one example: 4 rows of context + ending, padded,
    full logits, mean loss over the ending tokens; returns the acc_norm choice."""
    import torch
    import torch.nn.functional as F

    rows = [ctx + e for e in endings]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T)
    for i, (r, e) in enumerate(zip(rows, endings)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, len(ctx) : len(r)] = 1
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none")
    losses = losses.view(4, -1) * mask[:, 1:]
    return int((losses.sum(1) / mask[:, 1:].sum(1)).argmin())


def bench_hellaswag(args):
    """hellaswag.score (packed, batched, lm_head only where scored) vs one example per forward."""
    import torch

    import hellaswag
    from model import GPT, GPTConfig
    from model_io import get_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    enc = get_tokenizer()
    n = 4 if args.quick else args.hellaswag_examples
    rendered, source = multiple_choice(args.corpus, enc, n)

    def ours():
        losses, counts = hellaswag.score(model, rendered, batch_size=args.hellaswag_batch)
        return (losses / counts).argmin(1).tolist()

    def theirs():
        with torch.no_grad():
            return [_bn_choose(model, c, e) for c, e in rendered]

    assert ours() == theirs(), "the two scorings disagree: the comparison would be meaningless"
    t = paired({"ours": ours, "theirs": theirs}, 1, warmup=0)  # one call is already n examples
    label = f"hellaswag 124M fp32, {n} {source} examples (ex/s)"
    return [(label, n / t["ours"], n / t["theirs"], "build-nanogpt: 1 example/forward")]


def bench_decode(args):
    """Sampling speed: ours with the static cache (fixed shapes; compiled into CUDA graphs on CUDA),
    ours on the dynamic path, transformers' generate (KV cache), a cache-less loop (the whole
    sequence every step, as nanoGPT samples) and on CUDA the static cache uncompiled, greedy, at
    each --decode_batches size."""
    import torch
    import transformers
    from torch._dynamo.utils import counters

    import decode
    from model import GPT, GPTConfig
    from model_io import hf_state_dict
    from runtime import DTYPES, best_device, default_dtype

    transformers.logging.set_verbosity_error()
    device = args.decode_device or best_device()
    dtype = DTYPES[default_dtype(device)]
    cuda = device.startswith("cuda")
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd) if args.decode_preset == "args" else {}
    cfg = GPTConfig.from_preset("gpt2", **shape) if not shape else GPTConfig(**shape)
    torch.manual_seed(0)
    ours = GPT(cfg).to(device=device, dtype=dtype).eval()
    hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                     n_positions=cfg.block_size, vocab_size=cfg.vocab_size, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(hf_state_dict(ours), strict=False)
    theirs = theirs.to(device=device, dtype=dtype).eval()
    P, N = args.prompt_len, 32 if args.quick else args.new_tokens
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for B in [int(b) for b in args.decode_batches.split(",")]:
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B)).to(device)

        def timed(fn):
            def call():
                fn()
                sync()
            return call

        static = decode.StaticDecoder(ours, decode.StaticDecoder.bucket(B), compile=cuda)  # (this batch size's)
        fns = {
            "static": timed(lambda: decode.generate(ours, prompt, N, temperature=0, decoder=static)),
            "dynamic": timed(lambda: ours.generate(prompt, N, temperature=0)),
            "transformers": timed(lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                          max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                                          pad_token_id=0)),
            "no cache": timed(lambda: ours.generate(prompt, N, temperature=0, use_cache=False)),
        }
        if cuda:  # is the static cache worth having without CUDA graphs (the default on CUDA if so)?
            eager = decode.StaticDecoder(ours, decode.StaticDecoder.bucket(B))
            fns["static eager"] = timed(lambda: decode.generate(ours, prompt, N, temperature=0, decoder=eager))
        with torch.no_grad():
            # (the static path's first call here compiles and captures it, outside the timing)
            same = (decode.generate(ours, prompt, N, temperature=0, decoder=static)
                    == ours.generate(prompt, N, temperature=0))[:, P:].float().mean().item()
            t = paired(fns, repeats(args, 3))
        where = f"{device} {str(dtype).removeprefix('torch.')}, {cfg.n_layer}x{cfg.n_embd}, batch {B}, {N} after {P}"
        print(f"decode {where}: greedy tokens the static path shares with the dynamic one: {same:.4f}")
        if cuda:  # a graph inductor would not capture (it says why under TORCH_LOGS=perf_hints) runs at eager speed
            skips = counters["inductor"]["cudagraph_skips"]
            print(f"decode {where}: compiled graphs run without CUDA graphs so far: {skips}")
        for ref in [r for r in fns if r != "static"]:  # (yielded batch by batch: see bench_serve)
            yield (f"decode {where}: static (tok/s)", B * N / t["static"], B * N / t[ref], f"ours {ref}"
                   if ref != "transformers" else "transformers generate")


# -----------------------------------------------------------------------------
# memory: the bytes each rank holds for training, DDP against FSDP2 (computed, nothing allocated)

TRAIN_BYTES_PER_PARAM = 16  # fp32 parameter (4) + fp32 gradient (4) + AdamW's two fp32 moments (8)
MEMORY_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MEMORY_RANKS = (2, 4, 8)


def fsdp_local_numel(config, world_size):
    """Elements of a GPT(config) the largest rank holds under train.py --fsdp (fsdp.shard: each block,
    then the root), read from the real sharding plan: the model built on the meta device (no memory)
    and sharded over a fake process group of world_size ranks in this process, as rank 0. FSDP2 chunks
    each parameter on dim 0 as torch.chunk does and pads every rank's shard to the largest chunk,
    rank 0's, so rank 0's local shards are the size every rank holds."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fsdp
    from model import GPT
    from runtime import Runtime

    if dist.is_initialized():
        raise RuntimeError("a process group is already up: the memory plan needs a fake one of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            model = fsdp.shard(GPT(config), Runtime("cpu", "fp32", world_size=world_size))
        # parameters() yields the tied wte (also the lm_head) once
        return sum(p.to_local().numel() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def memory_table(configs=None, ranks=MEMORY_RANKS):
    """The bytes each rank holds for training ({name: GPTConfig}; default: the four GPT-2 presets):
    a row a model, {"model", "params" (held, the vocabulary's padding rows included), "ddp" (every
    rank holds everything), "fsdp" ({ranks: the largest rank's bytes})}."""
    import torch

    from model import GPT, GPTConfig

    configs = configs or {name: GPTConfig.from_preset(name) for name in MEMORY_PRESETS}
    rows = []
    for name, config in configs.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in GPT(config).parameters())
        rows.append({"model": name, "params": params, "ddp": params * TRAIN_BYTES_PER_PARAM,
                     "fsdp": {n: fsdp_local_numel(config, n) * TRAIN_BYTES_PER_PARAM for n in ranks}})
    return rows


def bench_memory(args):
    """Per-rank training memory, DDP against FSDP2 at 2, 4 and 8 ranks: a table, and a row a preset
    (DDP against FSDP2 at the most ranks)."""
    rows, most = memory_table(), max(MEMORY_RANKS)
    gb = lambda b: b / 1e9  # noqa: E731
    table = ["memory each rank holds for training, GB (10^9 bytes): fp32 parameters, gradients and AdamW's two",
             "moments, 16 bytes a parameter. DDP: every rank holds all of it. FSDP2: fully_shard on each block, then",
             "the root; the largest rank's shards (FSDP2 pads every rank's to them), read from the sharding plan of",
             "a meta-device model over a fake process group. Not counted: activations, the blocks FSDP2 gathers",
             "for the forward and backward, DDP's gradient buckets.", "",
             "| model | parameters held | DDP | " + " | ".join(f"FSDP2 x{n}" for n in MEMORY_RANKS)
             + f" | DDP / FSDP2 x{most} |", "| --- | ---: | ---: | " + "---: | " * len(MEMORY_RANKS) + "---: |"]
    for r in rows:
        table.append(f"| {r['model']} | {r['params']:,} | {gb(r['ddp']):.2f} | "
                     + " | ".join(f"{gb(r['fsdp'][n]):.2f}" for n in MEMORY_RANKS)
                     + f" | {r['ddp'] / r['fsdp'][most]:.2f}x |")
    yield "\n".join(table)
    for r in rows:
        goal = "; goal at 1.5B: ratio >= 6" if r["model"] == "gpt2-xl" else ""
        yield (f"memory per rank, {r['model']}: DDP (GB)", gb(r["ddp"]), gb(r["fsdp"][most]), f"FSDP2 x{most}{goal}")
