"""
GPT-2 in one file: the model every script of this repo imports. Read top to bottom: the
configuration, the network, the loss, sampling (with a KV cache), and the counts train.py
needs (parameters, FLOPs per token). Loading and saving it (Hugging Face layout, the Hub,
run directories) and the tokenizer are in model_io.py.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))        # 124M, random init
    logits, loss = model(idx, targets)                 # idx, targets: (B, T) token ids
    out = model.generate(idx, 64, top_k=50, seed=0)    # KV-cache sampling
"""

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT_TOKEN = 50256  # <|endoftext|> in the GPT-2 vocabulary
# Each block's weight matrices (parameter name suffixes): what Muon optimizes, and what GPT-2's
# checkpoints store transposed (its Conv1D layers)
BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_static_decoders_lock = threading.Lock()  # (GPT.static_decoder lends a kept decoder to one caller at a time)


# -----------------------------------------------------------------------------
# Configuration

PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (GPT-2's n_positions)
    vocab_size: int = 50257  # real vocabulary: what logits, loss and exports see
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_epsilon: float = 1e-5
    # The embedding matrix is padded to a multiple of this many rows (50257 -> 50304)
    # so the lm_head matmul gets GPU-friendly shapes. The extra rows never reach a
    # logit, the loss or an exported file.
    vocab_pad_multiple: int = 64

    # A config is refused beyond this many parameters (GPT-2 XL has 1.6B) before anything is
    # allocated: a hostile or mistyped config.json must not take the machine's memory.
    MAX_PARAMS = 20_000_000_000

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_pad_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive whole number, got {v!r}")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        C = self.n_embd
        params = (self.padded_vocab_size + self.block_size) * C + self.n_layer * (12 * C * C + 13 * C) + 2 * C
        if params > self.MAX_PARAMS:
            raise ValueError(f"{params:,} parameters ({params * 4 / 2**30:,.0f} GiB in fp32): more than the "
                             f"{self.MAX_PARAMS:,} this repo builds (n_layer {self.n_layer}, n_embd {C}, "
                             f"vocab_size {self.vocab_size}, block_size {self.block_size})")

    @property
    def padded_vocab_size(self):
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# The network


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True  # see GPT._init_weights

    def forward(self, x, kv_cache=None, pos=0, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            if torch.is_tensor(pos):
                # Rows at different positions (a server batching the decode steps of several
                # requests): row b's one new token goes to pos[b], and attn_mask (B, 1, 1, S)
                # says which of the first S cache entries each row may see.
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, pos] = k[:, :, 0]
                v_cache[rows, :, pos] = v[:, :, 0]
                S = attn_mask.size(-1)
                k, v = k_cache[:B, :, :S], v_cache[:B, :, :S]  # (the caches may hold more rows than the batch)
            else:
                # Write this chunk's keys/values at [pos, pos+T) and attend over everything so far.
                # Only a prefill from position 0 or one token at a time is used, so the causal
                # mask below is always right (SDPA aligns is_causal to the top-left corner).
                assert pos == 0 or T == 1
                k_cache[:, :, pos : pos + T] = k
                v_cache[:, :, pos : pos + T] = v
                k, v = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
        # attn_mask: an explicit boolean mask, True = may attend; else causal.
        # Flash attention on GPU; a fused kernel on CPU.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scale = True

    def forward(self, x):
        # GPT-2's GELU is the tanh approximation; one fused kernel instead of ~8 elementwise ops
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, pos=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, pos, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # Module names follow Hugging Face's GPT2LMHeadModel, so conversion is a rename-free copy.
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        # The lm_head is the token embedding itself (weight tying): see lm_head.
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere, and the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) (two of them per block), so the residual
        # stream's variance does not grow with depth.
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_scale", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
            if module is self.transformer.wte:
                with torch.no_grad():
                    module.weight[self.config.vocab_size :].zero_()  # padding rows

    # -- forward -------------------------------------------------------------

    def hidden(self, idx, kv_caches=None, pos=0, positions=None, attn_mask=None):
        """Token ids (B, T) -> final hidden states (B, T, n_embd) after ln_f.
        Packed sequences (several continuations of one prefix in a row, as hellaswag.py scores
        them) pass their own positions (B, T) and boolean attn_mask (B, 1, T, T).
        With kv_caches, pos is where idx starts in the cache: an int shared by all rows, or a
        (B,) tensor of per-row positions when each row is one new token (T == 1) of a
        sequence of its own length (serve.py's continuous batching); row b of the caches is
        row b of idx, and it attends to its cache entries [0, pos[b]]; attn_mask (B, 1, 1, S),
        when given, says which of the first S entries each row sees (decode_step: all of them)."""
        T = idx.size(1)
        if torch.is_tensor(pos):
            assert T == 1 and kv_caches is not None
            positions = pos[:, None]
            if attn_mask is None:
                attn_mask = (torch.arange(int(pos.max()) + 1, device=idx.device) <= positions)[:, None, None, :]
        if positions is None:
            if pos + T > self.config.block_size:
                raise ValueError(f"sequence of length {pos + T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_caches is None else kv_caches[i], pos, attn_mask)
        return self.transformer.ln_f(x)

    def lm_head(self, x):
        """Hidden states -> logits over the real vocabulary (the padding rows are not computed)."""
        return F.linear(x, self.transformer.wte.weight[: self.config.vocab_size])

    def forward(self, idx, targets=None, return_logits=True):
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -1 = ignore.
        Returns (logits (B, T, vocab_size), mean cross-entropy loss or None).
        Training loops pass return_logits=False: the loss is then computed chunk by chunk
        without ever materialising the (B, T, vocab) logits, and logits comes back None."""
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x), None
        V = self.config.vocab_size
        if not return_logits and not torch.compiler.is_compiling():
            # (under torch.compile the plain path below is fused by the compiler instead)
            # Grad mode is always off inside an autograd.Function's forward, and needs_input_grad
            # stays True under torch.no_grad(), so we say here whether to build the gradients.
            loss = ChunkedLMHeadLoss.apply(x.reshape(-1, x.size(-1)), self.transformer.wte.weight, targets.reshape(-1),
                                           V, torch.is_grad_enabled())
            return None, loss
        # The padded matmul (friendlier shapes), with the padding columns masked to -inf:
        # zero probability and zero gradient, so the loss is exactly the vocab_size model's.
        logits = F.linear(x, self.transformer.wte.weight)
        if logits.size(-1) > V:
            logits[..., V:] = float("-inf")
        # The chunked path's definition: mean over the non-ignored targets, 0 (zero gradients)
        # when there is none (F.cross_entropy's mean would be 0/0 = NaN).
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1, reduction="sum")
        loss = loss / (targets >= 0).sum().clamp(min=1)
        return (logits[..., :V] if return_logits else None), loss

    # -- sampling ------------------------------------------------------------

    # A decode step, as generate() and serve.py's continuous batching run it:
    #   caches = model.new_kv_caches(B, length, device); head_t = model.decode_head()
    #   logits = model.next_logits(prompt, caches, 0, head_t)    # prefill: (B, vocab) at the last position
    #   logits = model.next_logits(tok[:, None], caches, pos, head_t)  # then one token at a time

    def new_kv_caches(self, batch, length, device, zeroed=False):
        """Key/value caches for batch rows of up to length tokens: one (k, v) pair per layer. zeroed:
        for steps that read entries past a row's length (masked: but a masked NaN would still poison it)."""
        c = self.config
        dtype = self.transformer.wte.weight.dtype
        shape = (batch, c.n_head, length, c.n_embd // c.n_head)
        new = torch.zeros if zeroed else torch.empty
        return [(new(shape, dtype=dtype, device=device), new(shape, dtype=dtype, device=device)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def decode_head(self, out=None):
        """The lm_head as a contiguous (n_embd, vocab_size) copy, for next_logits (into `out`, in place,
        when given). A one-row matmul is bound by reading the weight, and MKL reads this layout ~1.5x
        faster than wte's (vocab, n_embd)."""
        head = self.transformer.wte.weight[: self.config.vocab_size].t()
        return head.contiguous() if out is None else out.copy_(head)

    @torch.no_grad()
    def next_logits(self, idx, kv_caches, pos, head_t, attn_mask=None):
        """fp32 logits (B, vocab_size) of the token after idx (B, T), which starts at position pos
        of the caches (an int, or per-row positions as in hidden()); head_t from decode_head()."""
        return (self.hidden(idx, kv_caches, pos, attn_mask=attn_mask)[:, -1] @ head_t).float()

    @torch.no_grad()
    def decode_step(self, idx, pos, kv_caches, head_t):
        """next_logits for one token per row at per-row positions pos (B,), with shapes that never
        change: every row attends to the caches' whole length, masked to its entries [0, pos[b]].
        No Python number varies from step to step, so one compiled graph (a CUDA graph under
        StaticDecoder(compile=True)) serves every step of a batch size. Same logits as next_logits."""
        S = kv_caches[0][0].size(2)
        mask = (torch.arange(S, device=idx.device) <= pos[:, None])[:, None, None, :]
        return self.next_logits(idx, kv_caches, pos, head_t, attn_mask=mask)

    def static_decoder(self, batch, compile=False):
        """A StaticDecoder for up to `batch` rows on this model's device and dtype, lent to one user at a
        time: `with model.static_decoder(B) as dec:` (or dec.release() when done). One is made once and
        kept: its caches, and under compile its CUDA graphs, serve every later call; while it is lent
        out (two interleaved generations), a caller gets a new one of its own, not kept."""
        w = self.transformer.wte.weight
        key = (StaticDecoder.bucket(batch), w.device, w.dtype, compile)
        with _static_decoders_lock:
            decoders = self.__dict__.setdefault("_static_decoders", {})
            dec = decoders.get(key)
            if dec is None or dec.busy:
                dec = StaticDecoder(self, key[0], compile)
                decoders.setdefault(key, dec)
            else:  # the weights may have changed since (train.py samples between steps)
                self.decode_head(out=dec.head_t)
            dec.busy = True
        return dec

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_token_id=None, generator=None, seed=None, use_cache=True, static_cache=None,
                        compile=False):
        """Yield the next token of every row, a (B,) LongTensor per step.

        idx: (B, T) prompts of equal length. A prompt longer than block_size is cropped
        from the left (only its last block_size tokens are seen), exactly as GPT-2 was
        trained. With the KV cache each step runs the network on one new token; once the
        context fills block_size, every step recomputes the last block_size tokens, because
        GPT-2's learned positions shift with the window (the same tokens as use_cache=False).
        temperature 0 or top_k=1 is greedy. Sampling is deterministic given `seed` or a
        torch.Generator. With eos_token_id, a row that emits it keeps emitting it, and
        generation stops once every row has.
        static_cache: decode with fixed shapes (StaticDecoder), the same tokens; default: with
        compile, which compiles its step (on CUDA into CUDA graphs: a slow first call, then the
        fastest steps). Uncompiled it does more work per step (it attends to the whole context).
        """
        if seed is not None and generator is None:
            generator = torch.Generator(idx.device).manual_seed(seed)
        was_training, decoder = self.training, None
        self.eval()
        try:
            B, T = idx.shape
            bs = self.config.block_size
            seq = idx  # everything so far, never cropped (the window is cut from it)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            caches, pos = None, 0
            if use_cache and StaticDecoder.chosen(static_cache, compile):
                decoder = self.static_decoder(B, compile)  # (released below, when this generation ends)
                caches, head_t = [(k[:B], v[:B]) for k, v in decoder.caches], decoder.head_t
            else:
                head_t = self.decode_head()
                caches = self.new_kv_caches(B, min(bs, T + max_new_tokens), idx.device) if use_cache else None
            for step in range(max_new_tokens):
                if decoder is not None and 0 < pos < bs:
                    logits = decoder.step(seq[:, -1], torch.full((B,), pos, device=idx.device))
                    pos += 1
                elif use_cache and 0 < pos < bs:
                    logits = self.next_logits(seq[:, -1:], caches, pos, head_t)  # one new token
                    pos += 1
                else:  # first step, no cache, or a full window: run the whole window
                    window = seq[:, -bs:]
                    logits = self.next_logits(window, caches, 0, head_t)
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
            if decoder is not None:
                decoder.release()
            self.train(was_training)

    def generate(self, idx, max_new_tokens, **kwargs):
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + new) token ids.
        Takes the keyword arguments of generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    # -- training helpers ----------------------------------------------------

    def num_params(self, non_embedding=False):
        """Parameters of the GPT-2 model (tied embedding once, padding rows not counted).
        non_embedding=True leaves out the token and position embeddings."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - (c.padded_vocab_size - c.vocab_size) * c.n_embd
        if non_embedding:
            n -= (c.vocab_size + c.block_size) * c.n_embd
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token, PaLM-style: 6 per weight of every
        matmul (the lm_head included) plus 12 * n_layer * n_embd * seq_len for attention."""
        c = self.config
        T = seq_len or c.block_size
        matmul_weights = self.num_params(non_embedding=True) + c.vocab_size * c.n_embd
        return 6 * matmul_weights + 12 * c.n_layer * c.n_embd * T

# -----------------------------------------------------------------------------
# The loss


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of lm_head(x) against targets, fused with its own gradient.

    The (tokens x 50257) logits are the biggest tensors of a training step: at 1024 tokens,
    200 MB of fp32 that log_softmax, nll_loss and their backward passes write, re-read and
    zero-fill several times over. Here they exist one chunk of rows at a time, and each
    chunk takes one matmul, one max and one in-place softmax; the rest is row-sized:
      loss_i  = lse_i - z_i[t_i],  with lse_i = max_i - log(softmax_i[argmax_i])
                (softmax at the argmax is >= 1/V, so this never underflows)
      dL/dx_i = softmax_i @ W - W[t_i]          dL/dW = softmax^T @ x - scatter(x_i -> row t_i)
    The backward pass only scales the gradients stored by the forward pass. Same FLOPs as
    the plain path, a fraction of its memory traffic.
    x: (N, C); weight: (V_padded, C), of which the first vocab_size rows are real;
    targets: (N,) with -1 = ignore; grad_enabled: torch.is_grad_enabled() of the caller
    (False: the loss only, no gradients built).
    """

    # Rows per chunk: big enough for the matmuls to run near the BLAS peak (measured best on
    # a 2-core CPU among 64..1024), small enough to bound the logits at 512 x 50304 x 4 = 100 MB.
    CHUNK_ROWS = 512

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, grad_enabled):
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        w = weight.to(x.dtype)
        valid = targets >= 0
        count = valid.sum().clamp(min=1).float()
        safe_targets = targets.clamp(min=0)
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        if need_grad:
            grad_x = torch.empty_like(x)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        n = ChunkedLMHeadLoss.CHUNK_ROWS
        for s in range(0, x.size(0), n):
            xc, tc, vc = x[s : s + n], safe_targets[s : s + n], valid[s : s + n]
            logits = (xc @ w.t()).float()
            logits[:, vocab_size:] = float("-inf")  # padding columns: probability 0
            zmax, amax = logits.max(dim=-1)
            z_target = logits.gather(1, tc[:, None])[:, 0]
            probs = torch.softmax(logits, dim=-1)
            del logits
            p_at_max = probs.gather(1, amax[:, None])[:, 0]
            losses[s : s + n] = (zmax - torch.log(p_at_max) - z_target) * vc
            if need_grad:
                xv = xc * vc[:, None].to(xc.dtype)  # ignored rows contribute nothing
                grad_w.addmm_(probs.t(), xv.float())
                grad_w.index_add_(0, tc, -xv.float())
                gx = torch.mm(probs.to(x.dtype), w)
                gx -= w[tc]
                grad_x[s : s + n] = gx * vc[:, None].to(gx.dtype)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w, count)
            ctx.weight_dtype = weight.dtype
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_x * scale.to(grad_x.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None


# -----------------------------------------------------------------------------
# Sampling


class StaticDecoder:
    """Decode steps at GPU speed: KV caches of the whole context, allocated once, and a step whose
    shapes never change (GPT.decode_step), padded up to a bucket of rows (1, 2, 4, ..., 64, ...).
    A step of a small model on a GPU is bound by launching its ~100 kernels, not by the work;
    with compile=True on CUDA the step is compiled (twice: for one row, then for any number of rows,
    as dynamo makes a size that changed dynamic) and captured as one CUDA graph per bucket
    (torch.compile's "reduce-overhead"), replayed every step. Prefill stays eager (next_logits).
    Row b of the caches is the caller's row b; padding rows write into rows nobody uses yet."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    @staticmethod
    def chosen(static_cache, compile):
        """Whether to decode with a StaticDecoder: as asked, else with compile (uncompiled it does
        more work per step than the dynamic path: it attends to the whole context)."""
        return compile if static_cache is None else static_cache

    @staticmethod
    def bucket(n):
        return next((b for b in StaticDecoder.BUCKETS if b >= n), -(-n // 256) * 256)  # (then multiples of 256)

    def __init__(self, model, max_batch, compile=False):
        self.model, self.max_batch, self.busy = model, max_batch, False
        device = model.transformer.wte.weight.device
        self.caches = model.new_kv_caches(max_batch, model.config.block_size, device, zeroed=True)  # (read whole)
        self.head_t = model.decode_head()
        self.step_fn, self.compiled = model.decode_step, set() if compile else None  # (buckets compiled so far)
        self.graphs = compile and device.type == "cuda"
        if compile:  # fixed addresses: the graphs write the caches in place, and a replay would copy the head
            for t in [self.head_t, *(t for kv in self.caches for t in kv)]:
                torch._dynamo.mark_static_address(t)
            self.step_fn = torch.compile(model.decode_step, mode="reduce-overhead" if device.type == "cuda" else None,
                                         fullgraph=True)

    def release(self):
        """Done with it (see GPT.static_decoder): the next caller may have it."""
        self.busy = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def warm_up(self):
        """Compile and capture every bucket up to max_batch now, not at the first batch of each size.
        (Its steps write into position 0 of the caches' rows: prefill overwrites that before use.)"""
        for b in sorted({min(self.bucket(n), self.max_batch) for n in range(1, self.max_batch + 1)}):
            for _ in range(3):  # under reduce-overhead: a warm-up run, the recording, a replay
                self.step(*self.caches[0][0].new_zeros(2, b, dtype=torch.long))

    def step(self, tokens, pos):
        """tokens (B,), pos (B,) -> fp32 logits (B, vocab_size): row b's token goes to position pos[b]
        of cache row b and sees that row's entries [0, pos[b]]."""
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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 or top_k=1 is greedy (argmax).
    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens
    whose probabilities sum to at least top_p (nucleus sampling).
    generator: a torch.Generator, or a list of B of them, one per row, so that each row draws
    exactly what it would alone (serve.py samples many requests' rows in one call)."""
    # (a temperature that rounds to 0 in the logits' dtype, below ~1.4e-45 in float32, is greedy too:
    # dividing by it would give 0/0 = NaN at the largest logit)
    if temperature == 0 or top_k == 1 or torch.tensor(temperature, dtype=logits.dtype).item() == 0:
        return logits.argmax(dim=-1)
    # shifted so the largest is 0 first: a tiny temperature then sends the others to -inf (greedy),
    # never to inf - inf = NaN
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False  # even when top_p rounds to 0 in float32
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Gumbel-max, as torch.multinomial draws one sample: the argmax of p / E with E ~ Exp(1) per
    # token. E = -log(U) from uniform noise, which torch draws ~6x faster than exponential noise
    # on a CPU (per row the noise is most of the cost of sampling). A token with p = 0 never wins.
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if isinstance(generator, (list, tuple)):
        for row, g in zip(noise, generator):
            row.uniform_(generator=g)
    else:
        noise.uniform_(generator=generator)
    return probs.div_(noise.log_().neg_()).argmax(dim=-1)  # in place: no more (B, V) allocations


if __name__ == "__main__":
    # `python model.py`: the presets at a glance, and a KV-cache sampling check on a tiny model.
    import time

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'width':>5} {'params':>14} {'train FLOPs/token':>18}")
    for name in PRESETS:
        with torch.device("meta"):
            m = GPT(GPTConfig.from_preset(name))
        c = m.config
        print(f"{name:<12} {c.n_layer:>6} {c.n_head:>5} {c.n_embd:>5} {m.num_params():>14,} {m.flops_per_token():>18,.0f}")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256))
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]])  # "Hello, I'm a language model,"
    for cache in (False, True):
        t0 = time.perf_counter()
        out = m.generate(prompt, 64, top_k=50, seed=42, use_cache=cache)
        dt = time.perf_counter() - t0
        print(f"random tiny model, KV cache {'on ' if cache else 'off'}: {64 / dt:7.1f} tok/s, last tokens {out[0, -8:].tolist()}")
