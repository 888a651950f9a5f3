"""
Decoding: a GPT's tokens at serving speed. model.py has the network and a plain generate(); this
module has the machinery that generate.py, serve.py's engine and evals.py decode with:

  - KV caches, the lm_head laid out for decoding, the logits of the next token after a prefill or
    after one token per row at per-row positions (new_kv_caches, decode_head, next_logits);
  - generate_stream: model.generate's tokens, one (B,) tensor per step, on KV caches of its own or
    on a StaticDecoder that the caller passes;
  - StaticDecoder: whole-context caches and a step whose shapes never change (decode_step), which
    compiles into CUDA graphs. The caller makes it and owns it; nothing is kept on the model, so two
    generations that run interleaved, each with its own decoder, never share a cache.

    import decode
    for tok in decode.generate_stream(model, idx, 64, top_k=50, seed=0): ...   # (B,) per step
    dec = decode.StaticDecoder(model, max_batch=8, compile=True)
    dec.warm_up()                                                              # compile every bucket now
    out = decode.generate(model, idx, 64, top_k=50, seed=0, decoder=dec)       # model.generate's tokens
"""

import functools

import torch

from model import sample_next

# -----------------------------------------------------------------------------
# KV caches and the next token's logits
#
# A decode step, as generate_stream and serve.py's engine run it:
#   caches = new_kv_caches(model, B, length, device); head_t = decode_head(model)
#   logits = next_logits(model, prompt, caches, 0, head_t)             # prefill: (B, vocab) at the last position
#   logits = next_logits(model, tok[:, None], caches, pos, head_t)     # then one token at a time


def new_kv_caches(model, batch, length, device, zeroed=False):
    """Key/value caches for batch rows of up to length tokens, in the model's dtype: one (k, v) pair per
    layer. zeroed: for steps that read entries past a row's length (masked, but a masked NaN would still
    poison the row)."""
    c = model.config
    dtype = model.transformer.wte.weight.dtype
    shape = (batch, c.n_head, length, c.n_embd // c.n_head)
    new = torch.zeros if zeroed else torch.empty
    return [(new(shape, dtype=dtype, device=device), new(shape, dtype=dtype, device=device)) for _ in range(c.n_layer)]


@torch.no_grad()
def decode_head(model, out=None):
    """The lm_head as a contiguous (n_embd, vocab_size) copy, for next_logits (into `out`, in place, when
    given). A one-row matmul is bound by reading the weight, and this layout is read faster than wte's
    (vocab, n_embd); model.generate computes its logits the same way, so both give the same bits."""
    head = model.transformer.wte.weight[: model.config.vocab_size].t()
    return head.contiguous() if out is None else out.copy_(head)


@torch.no_grad()
def next_logits(model, idx, kv_caches, pos, head_t, attn_mask=None):
    """fp32 logits (B, vocab_size) of the token after idx (B, T), which starts at position pos of the
    caches (an int, or per-row positions as in GPT.hidden); head_t from decode_head."""
    return (model.hidden(idx, kv_caches, pos, attn_mask=attn_mask)[:, -1] @ head_t).float()


@torch.no_grad()
def decode_step(model, idx, pos, kv_caches, head_t):
    """next_logits for one token per row at per-row positions pos (B,), with shapes that never change:
    every row attends to the caches' whole length, masked to its entries [0, pos[b]]. No Python number
    varies from step to step, so one compiled graph (a CUDA graph under StaticDecoder(compile=True))
    serves every step of a batch size. The same logits as next_logits."""
    S = kv_caches[0][0].size(2)
    mask = (torch.arange(S, device=idx.device) <= pos[:, None])[:, None, None, :]
    return next_logits(model, idx, kv_caches, pos, head_t, attn_mask=mask)


# -----------------------------------------------------------------------------
# The static decoder


class StaticDecoder:
    """Decode steps at GPU speed: KV caches of the whole context for max_batch rows, allocated once, and a
    step whose shapes never change (decode_step), padded up to a bucket of rows (1, 2, 4, ..., 64, ...).
    A step of a small model on a GPU is bound by launching its many small kernels, not by the work; with
    compile=True on CUDA the step is compiled (twice: for one row, then for any number of rows, as dynamo
    makes a size that changed dynamic) and captured as one CUDA graph per bucket (torch.compile's
    "reduce-overhead"), replayed every step. Prefill stays eager (next_logits).
    Row b of the caches is the caller's row b; padding rows write into rows nobody uses yet. The caller
    owns it: one generation (or one engine) at a time, since its caches are that generation's."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    @staticmethod
    def wanted(static_cache, compile):
        """Whether to decode with a StaticDecoder: as asked, else with compile (uncompiled it does more work
        per step than the dynamic path: it attends to the whole context)."""
        return compile if static_cache is None else static_cache

    @staticmethod
    def bucket(n):
        return next((b for b in StaticDecoder.BUCKETS if b >= n), -(-n // 256) * 256)  # (then multiples of 256)

    def __init__(self, model, max_batch, compile=False):
        self.model, self.max_batch = model, max_batch
        device = model.transformer.wte.weight.device
        self.caches = new_kv_caches(model, max_batch, model.config.block_size, device, zeroed=True)  # (read whole)
        self.head_t = decode_head(model)
        step = functools.partial(decode_step, model)  # (the compiled function takes the step's tensors only)
        self.step_fn, self.compiled = step, set() if compile else None  # (buckets compiled so far)
        self.graphs = compile and device.type == "cuda"
        if compile:  # fixed addresses: the graphs write the caches in place, and a replay would copy the head
            for t in [self.head_t, *(t for kv in self.caches for t in kv)]:
                torch._dynamo.mark_static_address(t)
            self.step_fn = torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else None,
                                         fullgraph=True)

    def refresh_head(self):
        """Copy the model's lm_head into head_t again, in place (compiled graphs read it at its address):
        generate_stream does, as the weights may have changed since the decoder was made."""
        decode_head(self.model, out=self.head_t)

    def warm_up(self):
        """Compile and capture every bucket up to max_batch now, not at the first batch of each size.
        (Its steps write into position 0 of the caches' rows: prefill overwrites that before use.)"""
        for b in sorted({min(self.bucket(n), self.max_batch) for n in range(1, self.max_batch + 1)}):
            for _ in range(3):  # under reduce-overhead: a warm-up run, the recording, a replay
                self.step(*self.caches[0][0].new_zeros(2, b, dtype=torch.long))

    def step(self, tokens, pos):
        """tokens (B,), pos (B,) -> fp32 logits (B, vocab_size): row b's token goes to position pos[b] of
        cache row b and sees that row's entries [0, pos[b]]."""
        B = tokens.size(0)
        b = min(self.bucket(B), self.max_batch)
        # new (b,) tensors, with padding rows (token 0 at position 0 of rows B..b-1) if b > B: the
        # graphs are specialised to strides too, and a caller's view (seq[:, -1]) has its own
        tokens = torch.cat([tokens, tokens.new_zeros(b - B)])
        pos = torch.cat([pos, pos.new_zeros(b - B)])
        if self.graphs:  # a new step: the last one's output buffers may be reused (it was cloned)
            torch.compiler.cudagraph_mark_step_begin()
        args = (tokens[:, None], pos, self.caches, self.head_t)
        if self.compiled is None or b in self.compiled:
            return self.step_fn(*args)[:B].clone()
        # a new bucket may compile a new graph of decode_step, and dynamo's limit of 8 per function
        # (here shared by every decoder of every model) is an error under fullgraph=True
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 256)):
            logits = self.step_fn(*args)[:B].clone()
        self.compiled.add(b)
        return logits


# -----------------------------------------------------------------------------
# Generation


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                    generator=None, seed=None, use_cache=True, decoder=None):
    """Yield the next token of every row, a (B,) LongTensor per step: model.generate's new tokens for the
    same arguments (see it for cropping, sampling and eos_token_id), as they are made.
    decoder: a StaticDecoder of this model with at least B rows, whose fixed-shape steps then decode (the
    same tokens; compiled on CUDA, the fastest). It is this generation's until the generator ends: two
    generations that run interleaved each need their own."""
    B, T = idx.shape
    bs = model.config.block_size
    if decoder is not None and (decoder.model is not model or B > decoder.max_batch or not use_cache):
        raise ValueError(f"a StaticDecoder of {decoder.max_batch} rows cannot decode {B} rows of this model"
                         + ("" if use_cache else " without a KV cache"))
    if seed is not None and generator is None:
        generator = torch.Generator(idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if decoder is not None:
            decoder.refresh_head()
            caches, head_t = [(k[:B], v[:B]) for k, v in decoder.caches], decoder.head_t
        else:
            head_t = decode_head(model)
            caches = new_kv_caches(model, B, min(bs, T + max_new_tokens), idx.device) if use_cache else None
        seq = idx  # everything so far, never cropped (the window is cut from it)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        pos = 0
        for _ in range(max_new_tokens):
            if decoder is not None and 0 < pos < bs:
                logits = decoder.step(seq[:, -1], torch.full((B,), pos, device=idx.device))
                pos += 1
            elif use_cache and 0 < pos < bs:
                logits = next_logits(model, seq[:, -1:], caches, pos, head_t)  # one new token
                pos += 1
            else:  # first step, no cache, or a full window: run the whole window
                window = seq[:, -bs:]
                logits = next_logits(model, window, caches, 0, head_t)
                pos = window.size(1)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            yield nxt
            if eos_token_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, **kwargs):
    """generate_stream's tokens after idx: (B, T + new) token ids, as model.generate returns them (with a
    decoder=, from a StaticDecoder's steps). Takes the keyword arguments of generate_stream."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)
