"""
GPT-2 in one file: the model every script of this repo imports. Read top to bottom: the
configuration, the network, the loss, plain sampling (generate, with a KV cache), and the counts
train.py needs (parameters, FLOPs per token). Loading and saving it (Hugging Face layout, the
Hub, run directories) and the tokenizer are in model_io.py; decoding at serving speed (token
streams, static KV caches, CUDA graphs) in decode.py, which builds on this module.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))        # 124M, random init
    logits, loss = model(idx, targets)                 # idx, targets: (B, T) token ids
    out = model.generate(idx, 64, top_k=50, seed=0)    # KV-cache sampling
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT_TOKEN = 50256  # <|endoftext|> in the GPT-2 vocabulary
# Each block's weight matrices (parameter name suffixes): what Muon optimizes, and what GPT-2's
# checkpoints store transposed (its Conv1D layers)
BLOCK_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
        # GPT-2's GELU is the tanh approximation; one fused kernel instead of a chain of elementwise ops
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
        Packed sequences (several continuations of one prefix in a row, as scoring.py scores
        them) pass their own positions (B, T) and boolean attn_mask (B, 1, T, T).
        With kv_caches, pos is where idx starts in the cache: an int shared by all rows, or a
        (B,) tensor of per-row positions when each row is one new token (T == 1) of a
        sequence of its own length (serve.py's continuous batching); row b of the caches is
        row b of idx, and it attends to its cache entries [0, pos[b]]; attn_mask (B, 1, 1, S),
        when given, says which of the first S entries each row sees (decode.decode_step: all of them)."""
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
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1,
                               reduction="sum")
        loss = loss / (targets >= 0).sum().clamp(min=1)
        return (logits[..., :V] if return_logits else None), loss

    # -- sampling ------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 generator=None, seed=None, use_cache=True):
        """Sample up to max_new_tokens after idx (B, T), prompts of equal length; returns (B, T + new) ids.

        A prompt longer than block_size is cropped from the left (only its last block_size tokens are
        seen), exactly as GPT-2 was trained. With the KV cache each step runs the network on one new
        token; once the context fills block_size, every step recomputes the last block_size tokens,
        because GPT-2's learned positions shift with the window (the same tokens as use_cache=False).
        temperature 0 or top_k=1 is greedy. Sampling is deterministic given `seed` or a torch.Generator.
        With eos_token_id, a row that emits it keeps emitting it, and generation stops once every row
        has. decode.generate_stream yields the same tokens step by step (also on a static cache)."""
        if seed is not None and generator is None:
            generator = torch.Generator(idx.device).manual_seed(seed)
        c, w, (B, T) = self.config, self.transformer.wte.weight, idx.shape
        # the lm_head as a contiguous (n_embd, vocab) copy: a one-row matmul reads it faster than wte's
        # layout (decode.decode_head makes the same copy, so decode.py's logits are these bits)
        head_t = w[: c.vocab_size].t().contiguous()
        kv = dict(size=(B, c.n_head, min(c.block_size, T + max_new_tokens), c.n_embd // c.n_head),
                  dtype=w.dtype, device=idx.device)
        caches = [(torch.empty(**kv), torch.empty(**kv)) for _ in range(c.n_layer)] if use_cache else None
        seq, pos = idx, 0  # seq: everything so far, never cropped (the window is cut from it)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                # one new token at pos while the cache has room; else (the first step, no cache, a full
                # window) the whole window from position 0
                one = use_cache and 0 < pos < c.block_size
                x = seq[:, -1:] if one else seq[:, -c.block_size :]
                logits = (self.hidden(x, caches, pos if one else 0)[:, -1] @ head_t).float()
                pos = pos + 1 if one else x.size(1)
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:  # a finished row keeps emitting eos
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if eos_token_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return seq

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

    # Rows per chunk: big enough for the matmuls to run near the BLAS peak (the best measured on a
    # CPU among 64..1024), small enough to bound a chunk's fp32 logits at 512 x 50304 values.
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
    # token. E = -log(U) from uniform noise, which torch draws faster than exponential noise on a CPU
    # (BENCHMARKS.md: per row the noise is most of the cost of sampling). A token with p = 0 never wins.
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if isinstance(generator, (list, tuple)):
        for row, g in zip(noise, generator):
            row.uniform_(generator=g)
    else:
        noise.uniform_(generator=generator)
    return probs.div_(noise.log_().neg_()).argmax(dim=-1)  # in place: no more (B, V) allocations


if __name__ == "__main__":
    # `python model.py`: the presets at a glance (on the meta device: shapes only, no memory)
    for name in PRESETS:
        with torch.device("meta"):
            m = GPT(GPTConfig.from_preset(name))
        c = m.config
        print(f"{name:<12} {c.n_layer:>2} layers {c.n_head:>2} heads {c.n_embd:>4} wide: {m.num_params():>13,} "
              f"parameters, {m.flops_per_token():>14,.0f} training FLOPs/token")
