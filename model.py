"""
GPT-2 in one file: the model every script of this repo imports.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("gpt2"))        # 124M, random init
    model = GPT.from_pretrained("gpt2")                # OpenAI's weights (online)
    model = GPT.from_pretrained("path/to/hf_dir")      # any GPT-2 in Hugging Face layout
    model.save_pretrained("out")                       # loads in transformers.GPT2LMHeadModel
    out = model.generate(idx, 64, top_k=50, seed=0)    # KV-cache sampling

Only torch and the standard library are imported at module level (safetensors and
tiktoken are imported where they are needed).
"""

import functools
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT_TOKEN = 50256  # <|endoftext|> in the GPT-2 vocabulary


class ModelLoadError(RuntimeError):
    """A checkpoint or model name could not be loaded; the message says why and what to do."""


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
                k, v = k_cache[:, :, :S], v_cache[:, :, :S]
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
        # The lm_head is the token embedding itself (weight tying): see _lm_head.
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

    def _hidden(self, idx, kv_caches=None, pos=0, positions=None, attn_mask=None):
        """Token ids (B, T) -> final hidden states (B, T, n_embd) after ln_f.
        Packed sequences (several continuations of one prefix in a row, as hellaswag.py scores
        them) pass their own positions (B, T) and boolean attn_mask (B, 1, T, T).
        With kv_caches, pos is where idx starts in the cache: an int shared by all rows, or a
        (B,) tensor of per-row positions when each row is one new token (T == 1) of a
        sequence of its own length (serve.py's continuous batching); row b of the caches is
        row b of idx, and it attends to its cache entries [0, pos[b]]."""
        T = idx.size(1)
        if torch.is_tensor(pos):
            assert T == 1 and kv_caches is not None
            positions = pos[:, None]
            attn_mask = (torch.arange(int(pos.max()) + 1, device=idx.device) <= positions)[:, None, None, :]
        if positions is None:
            if pos + T > self.config.block_size:
                raise ValueError(f"sequence of length {pos + T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(pos, pos + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_caches is None else kv_caches[i], pos, attn_mask)
        return self.transformer.ln_f(x)

    def _lm_head(self, x):
        """Hidden states -> logits over the real vocabulary (the padding rows are not computed)."""
        return F.linear(x, self.transformer.wte.weight[: self.config.vocab_size])

    def forward(self, idx, targets=None, return_logits=True):
        """idx: (B, T) token ids; targets: (B, T) next-token ids, -1 = ignore.
        Returns (logits (B, T, vocab_size), mean cross-entropy loss or None).
        Training loops pass return_logits=False: the loss is then computed chunk by chunk
        without ever materialising the (B, T, vocab) logits, and logits comes back None."""
        x = self._hidden(idx)
        if targets is None:
            return self._lm_head(x), None
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

    @torch.no_grad()
    def _next_logits(self, idx, kv_caches, pos, head_t):
        # head_t: the lm_head as a contiguous (n_embd, vocab) copy. A one-row matmul is bound
        # by reading the weight, and MKL reads this layout ~1.5x faster than wte's (vocab, n_embd).
        return (self._hidden(idx, kv_caches, pos)[:, -1] @ head_t).float()

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_token_id=None, generator=None, seed=None, use_cache=True):
        """Yield the next token of every row, a (B,) LongTensor per step.

        idx: (B, T) prompts of equal length. A prompt longer than block_size is cropped
        from the left (only its last block_size tokens are seen), exactly as GPT-2 was
        trained. With the KV cache each step runs the network on one new token; once the
        context fills block_size, every step recomputes the last block_size tokens, because
        GPT-2's learned positions shift with the window (the same tokens as use_cache=False).
        temperature 0 or top_k=1 is greedy. Sampling is deterministic given `seed` or a
        torch.Generator. With eos_token_id, a row that emits it keeps emitting it, and
        generation stops once every row has.
        """
        if seed is not None and generator is None:
            generator = torch.Generator(idx.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            B, T = idx.shape
            bs = self.config.block_size
            seq = idx  # everything so far, never cropped (the window is cut from it)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            caches, pos = None, 0
            with torch.no_grad():
                head_t = self.transformer.wte.weight[: self.config.vocab_size].t().contiguous()
            if use_cache:
                caches = self._new_kv_caches(B, min(bs, T + max_new_tokens), idx.device)
            for step in range(max_new_tokens):
                if use_cache and 0 < pos < bs:
                    logits = self._next_logits(seq[:, -1:], caches, pos, head_t)  # one new token
                    pos += 1
                else:  # first step, no cache, or a full window: run the whole window
                    window = seq[:, -bs:]
                    logits = self._next_logits(window, caches, 0, head_t)
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
            self.train(was_training)

    def generate(self, idx, max_new_tokens, **kwargs):
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + new) token ids.
        Takes the keyword arguments of generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    def _new_kv_caches(self, batch, length, device):
        c = self.config
        dtype = self.transformer.wte.weight.dtype
        shape = (batch, c.n_head, length, c.n_embd // c.n_head)
        return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                for _ in range(c.n_layer)]

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

    # -- Hugging Face interop ------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None):
        """Load GPT-2 weights in Hugging Face layout from a local directory (config.json plus
        model.safetensors or pytorch_model.bin), or by hub name (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl), which downloads once into cache_dir (default ~/.cache/gpt2-repro)."""
        path = os.fspath(name_or_dir)
        if not os.path.isdir(path):
            if path not in PRESETS:
                raise ModelLoadError(f"{path!r} is neither a directory nor a GPT-2 name ({', '.join(PRESETS)})")
            path = _download_hf(path, cache_dir)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise ModelLoadError(f"{config_file} not found: expected a Hugging Face GPT-2 directory")
        try:
            with open(config_file) as f:
                hf = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {config_file}: {e}") from None
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ModelLoadError(f"{config_file}: model_type {hf.get('model_type')!r} is not gpt2")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelLoadError(f"{config_file}: activation {hf['activation_function']!r} is not GPT-2's tanh GELU")
        if not isinstance(hf, dict):
            raise ModelLoadError(f"{config_file}: not a JSON object")
        try:
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                               n_head=hf["n_head"], n_embd=hf["n_embd"],
                               layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        except KeyError as e:
            raise ModelLoadError(f"{config_file}: no {e.args[0]!r} field") from None
        except ValueError as e:
            raise ModelLoadError(f"{config_file}: {e}") from None
        model = cls(config)
        model.load_hf_state_dict(_read_weights(path))
        return model

    def load_hf_state_dict(self, sd):
        """Copy a Hugging Face GPT-2 state dict (with or without the 'transformer.' prefix)."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        # attention-mask buffers of old checkpoints; lm_head is tied to wte
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        ours = {k.removeprefix("transformer."): v for k, v in self.state_dict().items()}
        missing, unexpected = sorted(ours.keys() - sd.keys()), sorted(sd.keys() - ours.keys())
        if missing or unexpected:
            raise ModelLoadError(f"state dict does not match GPT-2 {self.config}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        V = self.config.vocab_size
        with torch.no_grad():
            for k, v in sd.items():
                if k.endswith(_CONV1D):
                    v = v.t()  # HF's Conv1D stores (in, out); nn.Linear is (out, in)
                target = ours[k][:V] if k == "wte.weight" else ours[k]
                if target.shape != v.shape:
                    raise ModelLoadError(f"{k}: shape {tuple(v.shape)} in checkpoint, {tuple(target.shape)} expected")
                target.copy_(v)

    def hf_state_dict(self):
        """State dict in GPT2LMHeadModel's layout (no padding rows, Conv1D orientation)."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            if k == "transformer.wte.weight":
                v = v[: self.config.vocab_size]
            elif k.endswith(_CONV1D):
                v = v.t()
            out[k] = v.contiguous().cpu()
        return out

    def hf_config(self):
        c = self.config
        eos = EOT_TOKEN if c.vocab_size > EOT_TOKEN else None
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "activation_function": "gelu_new", "n_positions": c.block_size, "n_ctx": c.block_size,
            "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "layer_norm_epsilon": c.layer_norm_epsilon, "initializer_range": 0.02,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,  # we train without dropout
            "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
            "scale_attn_weights": True, "torch_dtype": "float32",
        }

    def save_pretrained(self, save_dir):
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained
        loads as is. Each file is written to a temporary name, then renamed."""
        from safetensors.torch import save_file

        os.makedirs(save_dir, exist_ok=True)
        weights = {k: v.float() for k, v in self.hf_state_dict().items()}

        def write_weights(path):
            try:
                save_file(weights, path, metadata={"format": "pt"})
            except OSError:
                raise
            except Exception as e:  # safetensors reports I/O errors (a full disk) as its own SafetensorError
                raise OSError(f"cannot write {path}: {e}") from None

        _atomic_write(os.path.join(save_dir, "model.safetensors"), write_weights)
        text = json.dumps({**self.hf_config(), "gpt2_repro": asdict(self.config)}, indent=2)
        _atomic_write(os.path.join(save_dir, "config.json"), lambda p: open(p, "w").write(text))


def checkpoint_dirs(run_dir, required=("config.json", "model.safetensors")):
    """The step_NNNNNN/ directories of a train.py run that hold every required file, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [d for d in os.listdir(run_dir) if d.startswith("step_") and d[5:].isdigit()
             and all(os.path.isfile(os.path.join(run_dir, d, f)) for f in required)]
    return [os.path.join(run_dir, d) for d in sorted(found, key=lambda d: int(d[5:]))]


def load_model(spec, cache_dir=None):
    """The one place every script resolves --model: a Hugging Face-format directory
    (config.json + weights), a train.py run directory (its newest complete step_NNNNNN/
    checkpoint), or an OpenAI GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)."""
    path = os.fspath(spec)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        steps = checkpoint_dirs(path)
        if not steps:
            raise ModelLoadError(f"{path} holds neither config.json nor complete step_NNNNNN/ checkpoints")
        path = steps[-1]
    elif not os.path.isdir(path) and path not in PRESETS:
        raise ModelLoadError(f"--model {path!r}: no such directory, and not one of {', '.join(PRESETS)}")
    return GPT.from_pretrained(path, cache_dir=cache_dir)


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path (never a half-written file). The file
    gets the mode any new file gets (mkstemp's is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_weights(path):
    st, bin_ = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.isfile(bin_):
            return torch.load(bin_, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # corrupt or truncated file
        raise ModelLoadError(f"cannot read weights in {path}: {e}") from None
    raise ModelLoadError(f"no model.safetensors or pytorch_model.bin in {path}")


def _download_hf(name, cache_dir=None):
    """Fetch config.json and model.safetensors of an OpenAI GPT-2 from the Hugging Face Hub."""
    cache_dir = cache_dir or os.environ.get("GPT2_REPRO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt2-repro")
    target = os.path.join(cache_dir, name)
    os.makedirs(target, exist_ok=True)
    base = f"https://huggingface.co/openai-community/{name}/resolve/main/"
    for fname in ("config.json", "model.safetensors"):
        dest = os.path.join(target, fname)
        if os.path.isfile(dest):
            continue
        try:
            _atomic_write(dest, lambda p: _fetch(base + fname, p))
        except (urllib.error.URLError, OSError) as e:
            raise ModelLoadError(
                f"could not download {name!r} from the Hugging Face Hub ({e}). Offline? On a machine with "
                f"internet, download config.json and model.safetensors from https://huggingface.co/openai-community/{name} "
                f"into a directory, copy it here, and pass that directory instead of {name!r} "
                f"(e.g. GPT.from_pretrained('path/to/{name}') or --model path/to/{name})."
            ) from None
    return target


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


def _fetch(url, path):
    """Download url to path with a progress bar."""
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1]) as bar:
        def hook(blocks, block_size, total):
            bar.total = total if total > 0 else None
            bar.update(blocks * block_size - bar.n)

        urllib.request.urlretrieve(url, path, reporthook=hook)


# -----------------------------------------------------------------------------
# Sampling


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 or top_k=1 is greedy (argmax).
    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens
    whose probabilities sum to at least top_p (nucleus sampling).
    generator: a torch.Generator, or a list of B of them, one per row, so that each row draws
    exactly what it would alone (serve.py samples many requests' rows in one call)."""
    if temperature == 0 or top_k == 1:
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


# -----------------------------------------------------------------------------
# Tokenizer and hardware


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """The GPT-2 BPE (tiktoken's r50k_base, byte-identical to 'gpt2'). Downloads once on a
    connected machine; offline it is read from $TIKTOKEN_CACHE_DIR."""
    import tiktoken

    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the GPT-2 tokenizer (tiktoken r50k_base): {e}. Offline, point TIKTOKEN_CACHE_DIR "
            "at a directory holding tiktoken's cached r50k_base file."
        ) from None


# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' datasheets. Matched by
# substring of torch.cuda.get_device_name(), first match wins (so the more specific first).
# fp16 has the same peak; fp32 runs on the TF32 tensor cores, whose dense peak is half the
# bf16 one on every device listed here (e.g. H100 SXM 989 -> 495, A100 312 -> 156 TFLOP/s).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the scripts' --dtype


def best_device():
    """What --device defaults to in every script: cuda, else mps, else cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """What --dtype defaults to in every script: bf16 on a CUDA device that has it, else fp32."""
    return "bf16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def peak_flops(device_name, dtype="bf16"):
    """Peak FLOP/s of a device by its name for a --dtype (bf16, fp16 or fp32, the latter as
    TF32), or None when the device is unknown (then MFU is not reported)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for key, flops in PEAK_BF16_FLOPS:
        if key in (device_name or ""):
            return flops / 2 if dtype == "fp32" else flops
    return None


if __name__ == "__main__":
    # `python model.py`: the presets at a glance, and a KV-cache sampling check on a tiny model.
    import time

    print(f"{'preset':<12} {'layers':>6} {'heads':>5} {'width':>5} {'params':>14} {'train FLOPs/token':>18}")
    for name in PRESETS:
        with torch.device("meta"):
            m = GPT(GPTConfig.from_preset(name))
        c = m.config
        print(f"{name:<12} {c.n_layer:>6} {c.n_head:>5} {c.n_embd:>5} {m.num_params():>14,} {m.flops_per_token():>18,.0f}")
    enc = get_tokenizer()
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256))
    prompt = torch.tensor([enc.encode("Hello, I'm a language model,")])
    for cache in (False, True):
        t0 = time.perf_counter()
        out = m.generate(prompt, 64, top_k=50, seed=42, use_cache=cache)
        dt = time.perf_counter() - t0
        print(f"random tiny model, KV cache {'on ' if cache else 'off'}: {64 / dt:7.1f} tok/s  {enc.decode(out[0, -8:].tolist())!r}")
