"""Tests for model.py: HF GPT-2 compatibility, generation, padding, presets and utilities.

Everything runs on CPU with tiny configs; Hugging Face `transformers` is the numerical reference.
"""
import json
import logging
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import perturb_
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import cli  # noqa: E402
import model as M  # noqa: E402
import model_io  # noqa: E402
import runtime  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model_io import get_tokenizer, hf_state_dict, load_hf_state_dict, load_model, save_pretrained  # noqa: E402

ATOL = 1e-4
SMALL = dict(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32)


# ----------------------------------------------------------------------------- helpers

def make_hf(seed=0, vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=2):
    """A random, perturbed, dropout-free HF GPT2LMHeadModel in eval mode."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new", bos_token_id=None, eos_token_id=None,
    )
    hf = GPT2LMHeadModel(cfg)
    return perturb_(hf, seed + 1000).eval()


def make_ours(seed=0, **overrides):
    """A perturbed GPT from model.py in eval mode (small config by default)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**SMALL, **overrides}))
    return perturb_(m, seed + 2000).eval()


def rand_idx(B, T, vocab_size, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (B, T), generator=g)


def logits_of(model, idx):
    with torch.no_grad():
        logits, _ = model(idx)
    return logits


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


# ----------------------------------------------------------------------------- HF -> ours

def test_from_pretrained_hf_safetensors_matches_hf_logits_and_loss(tmp_path):
    """A perturbed HF GPT-2 saved with save_pretrained loads into GPT with identical logits and loss."""
    hf = make_hf(seed=1)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = load_model(tmp_path).eval()

    assert ours.config.vocab_size == 101
    assert ours.config.block_size == 64
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd) == (2, 2, 32)

    idx = rand_idx(3, 40, 101)
    with torch.no_grad():
        ref = hf(idx).logits
        got, loss_none = ours(idx)
    assert loss_none is None
    assert got.shape == (3, 40, 101)
    assert (got - ref).abs().max().item() < ATOL

    # HF shifts labels internally; ours takes already-shifted targets.
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss
        _, loss_a = ours(idx[:, :-1], targets=idx[:, 1:])
        pad = torch.full((3, 1), -1, dtype=torch.long)
        _, loss_b = ours(idx, targets=torch.cat([idx[:, 1:], pad], dim=1))  # last column ignored
    assert loss_a.ndim == 0
    assert abs(loss_a.item() - hf_loss.item()) < ATOL
    assert abs(loss_b.item() - hf_loss.item()) < ATOL


def test_from_pretrained_pytorch_model_bin(tmp_path):
    """A directory holding config.json + pytorch_model.bin (no safetensors) loads equally."""
    hf = make_hf(seed=2)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "model.safetensors").exists()
    ours = load_model(str(tmp_path)).eval()
    idx = rand_idx(2, 33, 101)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (logits_of(ours, idx) - ref).abs().max().item() < ATOL


def test_from_pretrained_original_hub_key_layout(tmp_path):
    """The layout of the real hub checkpoints (no 'transformer.' prefix, attn.bias buffers, no lm_head) loads."""
    hf = make_hf(seed=3)
    hf.config.save_pretrained(tmp_path)
    n_pos = hf.config.n_positions
    sd = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        sd[k.removeprefix("transformer.")] = v.detach().clone().contiguous()
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(str(tmp_path)).eval()
    idx = rand_idx(2, 30, 101)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (logits_of(ours, idx) - ref).abs().max().item() < ATOL


def test_from_pretrained_missing_dir_mentions_path(tmp_path):
    """Loading from a nonexistent local directory raises an error naming that path."""
    missing = tmp_path / "nope"
    with pytest.raises(Exception) as ei:
        load_model(str(missing))
    assert str(missing) in str(ei.value)


# ----------------------------------------------------------------------------- ours -> HF

@pytest.mark.parametrize("vocab_size", [101, 50257])
def test_save_pretrained_loads_in_hf_without_missing_keys(tmp_path, vocab_size):
    """save_pretrained writes an HF GPT2LMHeadModel checkpoint that HF loads cleanly with identical logits."""
    ours = make_ours(seed=4, vocab_size=vocab_size)
    save_pretrained(ours, str(tmp_path))

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    assert cfg["vocab_size"] == vocab_size
    assert cfg["n_positions"] == 64
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (2, 2, 32)

    sd = load_file(str(tmp_path / "model.safetensors"))
    wte_key = "transformer.wte.weight" if "transformer.wte.weight" in sd else "wte.weight"
    assert sd[wte_key].shape == (vocab_size, 32), "padding rows leaked into the checkpoint"

    cap = _Capture()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(cap)
    try:
        hf, info = GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    finally:
        hf_logger.removeHandler(cap)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    bad = [r.getMessage() for r in cap.records
           if any(w in r.getMessage().lower() for w in ("missing", "newly initialized", "not initialized", "load report"))]
    assert not bad, bad

    hf.eval()
    idx = rand_idx(2, 50, vocab_size)
    with torch.no_grad():
        ref = hf(idx).logits
    assert (logits_of(ours, idx) - ref).abs().max().item() < ATOL


def test_save_then_load_roundtrip_is_exact(tmp_path):
    """GPT.save_pretrained followed by GPT.from_pretrained reproduces the state dict and logits exactly."""
    ours = make_ours(seed=5, n_layer=3, n_head=4, n_embd=64)
    save_pretrained(ours, str(tmp_path))
    back = load_model(str(tmp_path)).eval()
    assert back.config == ours.config

    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    vocab, n_embd = ours.config.vocab_size, ours.config.n_embd
    padded = math.ceil(vocab / 64) * 64
    for k in sd_a:
        a, b = sd_a[k], sd_b[k]
        assert a.shape == b.shape, k
        if tuple(a.shape) == (padded, n_embd):
            # padded embedding rows are not saved; only the real rows must match
            assert torch.equal(a[:vocab], b[:vocab]), k
        else:
            assert torch.equal(a, b), k
    idx = rand_idx(2, 64, vocab)
    assert torch.equal(logits_of(ours, idx), logits_of(back, idx))


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("vocab_size,padded", [(101, 128), (50257, 50304)])
def test_vocab_padding_is_invisible(vocab_size, padded):
    """Padded embedding rows never show in logits or loss, and receive zero gradient."""
    n_embd = 48  # 4*n_embd != padded, so only the embedding has `padded` rows
    cfg = GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=n_embd)
    assert cfg.vocab_pad_multiple == 64
    torch.manual_seed(0)
    m = GPT(cfg)
    perturb_(m, 7)
    m.train()
    idx = rand_idx(2, 16, vocab_size, seed=1)
    targets = rand_idx(2, 16, vocab_size, seed=2)
    targets[0, :3] = -1
    logits, loss = m(idx, targets=targets)
    assert logits.shape == (2, 16, vocab_size)
    ref = F.cross_entropy(logits.reshape(-1, vocab_size).float(), targets.reshape(-1), ignore_index=-1)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()

    emb = [(n, p) for n, p in m.named_parameters() if tuple(p.shape) == (padded, n_embd)]
    assert emb, f"no parameter with {padded} (padded) rows found"
    for name, p in emb:
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad[vocab_size:]) == 0, f"{name}: padded rows got gradient"
        assert p.grad[:vocab_size].abs().sum() > 0


def test_num_params_matches_hf_for_small_config():
    """num_params() equals HF's unique-parameter count (tied wte once, no padding rows, wpe included)."""
    hf = make_hf(seed=0)
    hf_count = sum(p.numel() for p in hf.parameters())  # parameters() dedups the tied lm_head
    ours = GPT(GPTConfig(**SMALL))
    assert ours.num_params() == hf_count


PRESET_COUNTS = {
    "gpt2": (124439808, 12, 12, 768),
    "gpt2-medium": (354823168, 24, 16, 1024),
    "gpt2-large": (774030080, 36, 20, 1280),
    "gpt2-xl": (1557611200, 48, 25, 1600),
}


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_preset_parameter_counts(name):
    """Each preset has the published GPT-2 shape and exact parameter count."""
    count, n_layer, n_head, n_embd = PRESET_COUNTS[name]
    assert name in M.PRESETS
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (n_layer, n_head, n_embd)
    assert (cfg.vocab_size, cfg.block_size) == (50257, 1024)
    try:
        with torch.device("meta"):
            m = GPT(cfg)
    except Exception as e:  # meta construction is a convenience, not part of the API
        if name != "gpt2":
            pytest.skip(f"cannot build {name} on the meta device: {e!r}")
        m = GPT(cfg)
    assert m.num_params() == count


# ----------------------------------------------------------------------------- init and LayerNorm

def test_init_matches_hf_gpt2_init():
    """A fresh GPT is initialised like a fresh HF GPT2LMHeadModel, parameter by parameter: the same
    std (N(0, 0.02), the residual projections' c_proj scaled by 1/sqrt(2 * n_layer)), zero biases,
    LayerNorm 1 / 0; and the padding rows of wte are zero."""
    shape = dict(vocab_size=1000, n_layer=8, n_head=8, n_embd=256)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=128, bos_token_id=None, eos_token_id=None, **shape))
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=128, **shape))
    assert torch.count_nonzero(ours.transformer.wte.weight[1000:]) == 0
    ref = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    got = hf_state_dict(ours)
    assert got.keys() == ref.keys()
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, k
        if r.std() == 0:  # biases and LayerNorm
            assert torch.equal(g, r), k
        else:  # >= 32k samples each: the std is known to < 1%
            assert g.std().item() == pytest.approx(r.std().item(), rel=0.03), k
            assert abs(g.mean().item()) < 0.05 * r.std().item(), k


def test_layer_norm_epsilon_is_gpt2s_where_it_matters():
    """Our default LayerNorm eps is GPT-2's. With a residual stream whose variance is ~eps (embeddings
    and residual projections scaled down), so that eps changes every LayerNorm's output, a HF GPT-2
    built with transformers' default config and our GPT built with our default config agree."""
    assert GPTConfig().layer_norm_epsilon == GPT2Config().layer_norm_epsilon
    hf = make_hf(seed=13)  # no layer_norm_epsilon given: transformers' default
    eps = hf.config.layer_norm_epsilon
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("wte.weight", "wpe.weight")):
                p.mul_(0.02)
            elif name.endswith(("c_proj.weight", "c_proj.bias")):
                p.mul_(0.005)
    ours = GPT(GPTConfig(**SMALL)).eval()  # no layer_norm_epsilon given: our default
    load_hf_state_dict(ours, hf.state_dict())

    variances = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args: variances.append(args[0].var(-1, unbiased=False).mean()))
             for mod in ours.modules() if isinstance(mod, torch.nn.LayerNorm)]
    idx = rand_idx(2, 40, 101)
    got = logits_of(ours, idx)
    for h in hooks:
        h.remove()
    assert len(variances) == 2 * ours.config.n_layer + 1
    assert all(eps / 10 < v < 3 * eps for v in variances), variances  # the regime where eps matters
    with torch.no_grad():
        ref = hf(idx).logits
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


# ----------------------------------------------------------------------------- generation

def test_greedy_generate_matches_hf(tmp_path):
    """generate(top_k=1) reproduces HF greedy decoding token for token."""
    hf = make_hf(seed=6)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    idx = rand_idx(2, 8, 101, seed=9)
    with torch.no_grad():
        ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20,
                          do_sample=False, pad_token_id=0)
    out = ours.generate(idx, 20, top_k=1)
    assert out.dtype == torch.long
    assert out.shape == (2, 28)
    assert torch.equal(out, ref)
    # greedy is deterministic and independent of the cache
    assert torch.equal(ours.generate(idx, 20, top_k=1, use_cache=False), ref)


def _sample(m, idx, n, seed, use_cache, **kw):
    g = torch.Generator().manual_seed(seed)
    return m.generate(idx, n, generator=g, use_cache=use_cache, **kw)


SAMPLING = dict(temperature=0.8, top_k=10, top_p=0.9)


@pytest.mark.parametrize("prompt_len,new", [(10, 30), (60, 24), (70, 20)])
def test_kv_cache_matches_no_cache(prompt_len, new):
    """Sampling and greedy with and without the KV cache give identical tokens, also past block_size (64)."""
    # large weights -> peaked, context-sensitive logits, so a wrong cache/position changes tokens
    m = make_ours(seed=7, n_layer=2, n_head=4, n_embd=32)
    perturb_(m, 77, scale=1.0)
    idx = rand_idx(3, prompt_len, 101, seed=prompt_len)
    a = _sample(m, idx, new, seed=42, use_cache=True, **SAMPLING)
    b = _sample(m, idx, new, seed=42, use_cache=False, **SAMPLING)
    assert a.shape == (3, prompt_len + new)
    assert torch.equal(a[:, :prompt_len], idx), "original (uncropped) prompt must be kept"
    assert torch.equal(a, b)
    ga = m.generate(idx, new, top_k=1, use_cache=True)
    gb = m.generate(idx, new, top_k=1, use_cache=False)
    assert torch.equal(ga[:, :prompt_len], idx)
    assert torch.equal(ga, gb)
    # left-cropping: only the last block_size tokens matter, so pre-cropping the prompt changes nothing
    bs = m.config.block_size
    cropped = idx[:, -bs:]
    kept = cropped.size(1)
    assert torch.equal(m.generate(cropped, new, top_k=1)[:, kept:], ga[:, prompt_len:])
    assert torch.equal(_sample(m, cropped, new, seed=42, use_cache=True, **SAMPLING)[:, kept:], a[:, prompt_len:])


def test_sampling_determinism_by_seed():
    """The same generator seed gives the same tokens; a different seed gives different ones."""
    m = make_ours(seed=8)
    idx = rand_idx(3, 5, 101)
    a = _sample(m, idx, 30, seed=1, use_cache=True, **SAMPLING)
    b = _sample(m, idx, 30, seed=1, use_cache=True, **SAMPLING)
    c = _sample(m, idx, 30, seed=2, use_cache=True, **SAMPLING)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_next_with_a_generator_per_row_draws_as_each_row_alone():
    """A list of generators (serve.py's batch of requests): row i gets what sample_next gives
    row i alone with its own generator, for every sampling setting, step after step."""
    logits = torch.randn(5, 101, generator=torch.Generator().manual_seed(0)) * 3
    for kw in (dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=5), dict(temperature=0)):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(5)]
        alone = [torch.Generator().manual_seed(10 + i) for i in range(5)]
        for _ in range(20):
            batched = M.sample_next(logits, generator=gens, **kw)
            expected = torch.cat([M.sample_next(logits[i : i + 1], generator=alone[i], **kw) for i in range(5)])
            assert torch.equal(batched, expected), kw
    # and a sample with one generator follows the softmax distribution (inverse-CDF sampling)
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0, 0.125]])
    draws = M.sample_next(probs.log().expand(20000, -1), generator=torch.Generator().manual_seed(1))
    freqs = torch.bincount(draws, minlength=5) / 20000
    assert freqs[3] == 0 and torch.allclose(freqs, probs[0], atol=0.015)


def test_eos_stops_rows_and_generation():
    """Rows that emit eos keep emitting it, and generation ends early once every row is done."""
    m = make_ours(seed=10)
    T, N = 6, 25
    idx = rand_idx(3, T, 101, seed=3)
    greedy = m.generate(idx, N, top_k=1)
    eos = int(greedy[0, T])  # row 0 emits this first

    out = m.generate(idx, N, top_k=1, eos_token_id=eos)
    assert out.shape[0] == 3 and T < out.shape[1] <= T + N
    assert torch.equal(out[:, :T], idx)
    new = out[:, T:]
    assert bool((new[0] == eos).all()), "row 0 must be eos from its first token on"
    for r in range(3):
        hits = (greedy[r, T:] == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(new[r], greedy[r, T:T + new.shape[1]])
            assert out.shape[1] == T + N, "stopped early although a row never produced eos"
        else:
            first = int(hits[0])
            upto = min(first + 1, new.shape[1])
            assert torch.equal(new[r, :upto], greedy[r, T:T + upto])
            assert bool((new[r, first:] == eos).all())
    if out.shape[1] < T + N:
        assert bool((new[:, -1] == eos).all())

    # all rows identical -> all hit eos at the first step -> stop right away
    same = idx[:1].repeat(2, 1)
    out2 = m.generate(same, N, top_k=1, eos_token_id=eos)
    assert out2.shape == (2, T + 1)
    assert bool((out2[:, T] == eos).all())


# ----------------------------------------------------------------------------- sampling filters

TOKENS = [7, 50, 3, 99, 20]
PROBS = [0.4, 0.3, 0.2, 0.06, 0.04]


@pytest.fixture(scope="module")
def fixed_logits_model(tmp_path_factory):
    """A GPT whose next-token distribution is PROBS over TOKENS whatever the input.

    Built through the HF layout: ln_f.weight = 0 and ln_f.bias = e_0 make the final hidden state
    the constant e_0, so logits = wte[:, 0], which we set to log(PROBS) (and -40 elsewhere).
    """
    hf = make_hf(seed=11)
    with torch.no_grad():
        tr = hf.transformer
        tr.ln_f.weight.zero_()
        tr.ln_f.bias.zero_()
        tr.ln_f.bias[0] = 1.0
        col = torch.full((101,), -40.0)
        col[TOKENS] = torch.log(torch.tensor(PROBS))
        tr.wte.weight[:, 0] = col
    d = tmp_path_factory.mktemp("fixed")
    hf.save_pretrained(d)
    m = load_model(str(d)).eval()
    logits = logits_of(m, torch.zeros(1, 1, dtype=torch.long))[0, -1]
    assert torch.allclose(torch.softmax(logits, -1)[TOKENS], torch.tensor(PROBS), atol=1e-5)
    return m


def _freqs(m, n=4000, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    out = m.generate(torch.zeros(n, 1, dtype=torch.long), 1, generator=g, **kw)[:, 1]
    counts = torch.bincount(out, minlength=101).double() / n
    return {t: counts[t].item() for t in counts.nonzero().flatten().tolist()}


def _assert_freqs(freqs, expected, tol=0.03):
    assert set(freqs) == set(expected), (freqs, expected)
    for t, p in expected.items():
        assert abs(freqs[t] - p) < tol, (t, freqs[t], p)


def test_top_p_keeps_smallest_nucleus(fixed_logits_model):
    """top_p=0.85 keeps exactly the smallest prefix with cumulative prob >= p (0.4+0.3+0.2), renormalised."""
    _assert_freqs(_freqs(fixed_logits_model, top_p=0.85), {7: 0.4 / 0.9, 50: 0.3 / 0.9, 3: 0.2 / 0.9})
    _assert_freqs(_freqs(fixed_logits_model, top_p=0.35), {7: 1.0})


def test_top_k_and_temperature(fixed_logits_model):
    """top_k keeps the k most likely tokens; temperature divides the logits."""
    _assert_freqs(_freqs(fixed_logits_model, top_k=2), {7: 0.4 / 0.7, 50: 0.3 / 0.7})
    _assert_freqs(_freqs(fixed_logits_model), dict(zip(TOKENS, PROBS)))
    sq = [p * p for p in PROBS]
    _assert_freqs(_freqs(fixed_logits_model, temperature=0.5), {t: s / sum(sq) for t, s in zip(TOKENS, sq)})


# ----------------------------------------------------------------------------- optimizer, flops, tokenizer

def test_flops_per_token_and_peak_flops():
    """flops_per_token is in the 6N(+attention) range; peak_flops knows H100 and returns None otherwise."""
    cfg = GPTConfig.from_preset("gpt2")
    try:
        with torch.device("meta"):
            m = GPT(cfg)
    except Exception:
        m = GPT(cfg)
    n = m.num_params()
    emb = (cfg.vocab_size + cfg.block_size) * cfg.n_embd
    fpt = m.flops_per_token()
    attn = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert 6 * (n - emb) <= fpt <= 6 * n + attn + 1
    assert 900e12 <= runtime.peak_flops("NVIDIA H100 80GB HBM3") <= 1000e12
    assert runtime.peak_flops("Some Unknown Accelerator 3000") is None
    assert runtime.peak_flops("NVIDIA H200 NVL") == 835e12 and runtime.peak_flops("NVIDIA H200") == 989e12  # NVL: not the SXM's


@pytest.mark.parametrize("return_logits", [False, True])
def test_flops_per_token_matches_torch_flop_counter(return_logits, monkeypatch):
    """flops_per_token(T) is what torch's FlopCounterMode counts in a real training step (forward
    + backward) divided by the tokens, within 2% (the counter skips biases, LayerNorm and other
    elementwise work). T = 4 * n_embd makes attention a third of the total."""
    cfg = GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=64)  # 512: no padding rows
    assert cfg.padded_vocab_size == cfg.vocab_size
    monkeypatch.setattr(M.ChunkedLMHeadLoss, "CHUNK_ROWS", 128)
    torch.manual_seed(0)
    m = GPT(cfg).train()
    B, T = 2, 256
    idx, targets = rand_idx(B, T, 512, seed=1), rand_idx(B, T, 512, seed=2)
    # The math SDPA backend is made of bmm's the counter sees (the CPU flash kernel it does not know),
    # counted over the full T x T scores as flops_per_token does. The chunked loss accumulates
    # dL/dW with addmm_, which the counter does not know: give it addmm's formula.
    addmm_ = {torch.ops.aten.addmm_: flop_counter.addmm_flop.__wrapped__}
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=addmm_)
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = m(idx, targets, return_logits=return_logits)
        loss.backward()
    counted = counter.get_total_flops() / (B * T)
    assert m.flops_per_token(T) == pytest.approx(counted, rel=0.02)


def test_peak_flops_per_dtype():
    """bf16 is the default; fp16 has bf16's peak, fp32 (TF32 tensor cores) half of it; None for unknown devices."""
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"):
        bf16 = runtime.peak_flops(name)
        assert bf16 is not None and runtime.peak_flops(name, "bf16") == bf16 == runtime.peak_flops(name, dtype="fp16")
        assert runtime.peak_flops(name, "fp32") == bf16 / 2
    assert 480e12 <= runtime.peak_flops("NVIDIA H100 80GB HBM3", "fp32") <= 500e12  # datasheet: 495 dense TF32
    for dtype in ("bf16", "fp16", "fp32"):
        assert runtime.peak_flops("Some Unknown Accelerator 3000", dtype) is None
    with pytest.raises(ValueError):
        runtime.peak_flops("NVIDIA H100 80GB HBM3", "fp8")


def _tiktoken_available():
    d = os.environ.get("TIKTOKEN_CACHE_DIR")
    return bool(d) and Path(d).is_dir() and any(Path(d).iterdir())


@pytest.mark.skipif(not _tiktoken_available(), reason="offline tiktoken cache (TIKTOKEN_CACHE_DIR) not available")
def test_get_tokenizer_is_gpt2_bpe():
    """get_tokenizer() is the GPT-2 BPE: 'Hello world' -> [15496, 995], eot 50256."""
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256
    assert enc.n_vocab == 50257
    assert enc.decode([15496, 995]) == "Hello world"


def test_missing_tokenizer_file_is_one_line_naming_it(tmp_path):
    """No BPE file in TIKTOKEN_CACHE_DIR and no network: generate.py says, in one line, which file is
    missing, where, and where to get it."""
    import hashlib

    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, str(Path(M.__file__).parent / "generate.py"), "--model", "gpt2"],
                          capture_output=True, text=True, timeout=120, env=env)
    name = hashlib.sha1(model_io.R50K_URL.encode()).hexdigest()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert str(tmp_path / "empty" / name) in proc.stderr and model_io.R50K_URL in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- fused loss

@pytest.mark.parametrize("vocab_size,chunk_rows", [(101, 7), (1001, 64), (50257, 512)])
def test_chunked_loss_equals_plain_loss_and_gradients(vocab_size, chunk_rows, monkeypatch):
    """return_logits=False (chunked loss fused with its gradient) gives the plain path's loss
    and every parameter's gradient, across chunk boundaries, with ignored (-1) targets."""
    monkeypatch.setattr(M.ChunkedLMHeadLoss, "CHUNK_ROWS", chunk_rows)
    m = make_ours(seed=3, vocab_size=vocab_size).train()
    B, T = 3, 40
    idx = rand_idx(B, T, vocab_size, seed=5)
    targets = rand_idx(B, T, vocab_size, seed=6)
    targets[0, :9] = -1
    targets[2, -1] = -1

    logits, loss_plain = m(idx, targets)
    (2.5 * loss_plain).backward()  # a non-unit upstream gradient must be honoured too
    grads_plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    none, loss_fused = m(idx, targets, return_logits=False)
    assert none is None
    (2.5 * loss_fused).backward()

    # independent reference: mean -log softmax over the non-ignored positions
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    keep = targets >= 0
    ref = -logp[keep].gather(1, targets[keep][:, None]).mean()
    assert loss_fused.item() == pytest.approx(ref.item(), rel=1e-5)
    assert loss_plain.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[n], rtol=1e-4, atol=1e-6, msg=n)
    assert m.transformer.wte.weight.grad[vocab_size:].abs().max() == 0  # padding rows untouched


def test_chunked_loss_survives_extreme_logits(monkeypatch):
    """A target with probability below float32's range (loss ~ 1e3) gives a finite, correct loss."""
    monkeypatch.setattr(M.ChunkedLMHeadLoss, "CHUNK_ROWS", 4)
    x = torch.randn(6, 8, dtype=torch.float64).float() * 40
    w = torch.randn(128, 8) * 5
    t = torch.randint(0, 101, (6,))
    loss = M.ChunkedLMHeadLoss.apply(x, w, t, 101, True)
    ref = F.cross_entropy((x.double() @ w[:101].double().t()), t)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_chunked_loss_under_bf16_autocast_matches_fp32():
    """Under CPU bf16 autocast the chunked loss stays close to the fp32 loss (mixed-precision path)."""
    m = make_ours(seed=4, vocab_size=1001).train()
    idx, targets = rand_idx(2, 32, 1001, seed=7), rand_idx(2, 32, 1001, seed=8)
    _, ref = m(idx, targets, return_logits=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(idx, targets, return_logits=False)
    loss.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


class _Allocations(TorchDispatchMode):
    """Records (op, output shape) of every op that makes a new tensor (views excluded)."""

    def __init__(self):
        super().__init__()
        self.made = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.made.update((str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def test_chunked_loss_under_no_grad_builds_no_gradients():
    """Under torch.no_grad() (validation) the chunked loss computes the loss only: none of the
    tensors it makes has the shape of the (padded) embedding's gradient or of the hidden states'
    gradient, and the loss is the grad-mode loss. In grad mode both are made (the check sees them)."""
    m = make_ours(seed=14).train()
    B, T, C = 3, 40, m.config.n_embd
    grad_shapes = {(m.config.padded_vocab_size, C), (B * T, C)}
    idx, targets = rand_idx(B, T, 101, seed=1), rand_idx(B, T, 101, seed=2)

    def loss_allocations(grad):
        with torch.set_grad_enabled(grad):
            with _Allocations() as net:
                m.hidden(idx)
            with _Allocations() as full:
                _, loss = m(idx, targets, return_logits=False)
        return loss, full.made - net.made  # what the loss made beyond the network itself

    loss_grad, made = loss_allocations(True)
    assert grad_shapes <= {shape for _, shape in made}
    loss_val, made = loss_allocations(False)
    assert not loss_val.requires_grad
    assert not grad_shapes & {shape for _, shape in made}, sorted(made)
    assert loss_val.item() == loss_grad.item()


def _loss_and_grads(m, idx, targets, path, monkeypatch):
    m.zero_grad(set_to_none=True)
    if path == "compiled":  # the branch torch.compile traces (the one GPUs run), here run eagerly
        with monkeypatch.context() as mp:
            mp.setattr(torch.compiler, "is_compiling", lambda: True)
            _, loss = m(idx, targets, return_logits=False)
    else:
        _, loss = m(idx, targets, return_logits=path == "plain")
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("case", ["normal", "partly_ignored", "all_ignored", "last_token"])
def test_loss_paths_agree_with_reference(case, monkeypatch):
    """The chunked loss, the plain path (return_logits=True) and the branch taken under torch.compile
    all give the same loss and parameter gradients as a float64 reference: mean -log p(target)
    over the non-ignored targets, and 0 with zero gradients when every target is ignored."""
    m = make_ours(seed=15).train()  # perturbed: the padding rows of wte are nonzero too
    V = m.config.vocab_size
    B, T = 3, 40
    idx, targets = rand_idx(B, T, V, seed=3), rand_idx(B, T, V, seed=4)
    if case == "partly_ignored":
        targets[0, :11] = -1
        targets[2, -3:] = -1
    elif case == "all_ignored":
        targets[:] = -1
    elif case == "last_token":
        targets[:, ::3] = V - 1

    m.zero_grad(set_to_none=True)
    logits = F.linear(m.hidden(idx).double(), m.transformer.wte.weight[:V].double())
    keep = targets >= 0
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref_loss = (nll * keep).sum() / max(int(keep.sum()), 1)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in m.named_parameters()}

    for path in ("chunked", "plain", "compiled"):
        loss, grads = _loss_and_grads(m, idx, targets, path, monkeypatch)
        assert loss.dtype == torch.float32, path
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7), path
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n].float(), rtol=1e-5, atol=1e-7, msg=f"{path}: {n}")
        if case == "all_ignored":
            assert loss.item() == 0.0
            assert all(torch.count_nonzero(g) == 0 for g in grads.values()), path


def test_from_pretrained_hub_name_offline_says_what_to_do(tmp_path, monkeypatch):
    """Offline, a hub name fails with one cli.Error that names the model and says to pass a local directory."""
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(model_io.urllib.request, "urlretrieve", no_network)
    with pytest.raises(cli.Error) as e:
        load_model("gpt2", cache_dir=tmp_path)
    msg = str(e.value)
    assert "'gpt2'" in msg and "directory" in msg and "model.safetensors" in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no half-written file left behind


@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(temperature=1e-30, top_k=50), dict(top_p=1e-300),
                                dict(temperature=1e-40, top_p=1e-300, top_k=5), dict(temperature=1e-300),
                                dict(temperature=1e-46, top_k=50, top_p=0.9)], ids=str)
def test_tiny_temperature_or_top_p_is_greedy_not_nan(kw):
    """A temperature or top_p below what float32 can express (a temperature that even rounds to 0 in
    float32: 1e-300) means greedy: never NaN (which made every row sample token 0), in sample_next and
    in generate()."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50257, generator=g) * 4
    got = M.sample_next(logits, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(got, logits.argmax(dim=-1)), (got, logits.argmax(dim=-1))
    model = make_ours(seed=3)
    idx = rand_idx(2, 5, SMALL["vocab_size"])
    assert torch.equal(model.generate(idx, 12, seed=7, **kw), model.generate(idx, 12, temperature=0))


def _hf_config(**changes):
    cfg = {"model_type": "gpt2", "n_positions": 64, "vocab_size": 101, "n_layer": 2, "n_head": 2, "n_embd": 32}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not ...}


@pytest.mark.parametrize("changes,named", [
    (dict(n_layer="12"), "n_layer"), (dict(n_positions=...), "n_positions"), (dict(n_head=-2), "n_head"),
    (dict(n_layer=1e9), "n_layer"), (dict(n_layer=1_000_000_000), "parameters"), (dict(vocab_size=True), "vocab_size"),
    (dict(n_embd=33), "divisible"), (dict(layer_norm_epsilon="x"), "layer_norm_epsilon"),
    (dict(n_embd=2**20, n_head=1), "parameters"),
], ids=str)
def test_hostile_config_json_is_one_clear_error_before_any_allocation(tmp_path, changes, named):
    """Strings for numbers, missing fields, negative or absurd sizes: cli.Error naming the file
    and the field, in well under a second (nothing is built before the config is checked)."""
    import time

    (tmp_path / "config.json").write_text(json.dumps(_hf_config(**changes)))
    t0 = time.perf_counter()
    with pytest.raises(cli.Error) as e:
        load_model(tmp_path)
    assert time.perf_counter() - t0 < 1.0
    assert "config.json" in str(e.value) and named in str(e.value), str(e.value)


def test_hostile_config_json_under_a_memory_limit(tmp_path):
    """generate.py on a config.json of 10^9 layers, with 2 GiB of address space to spare: one error
    line, exit 2. (Spare over this process's own size, torch imported: a CUDA build of torch maps
    several GiB at import, a CPU build about 1.)"""
    import resource
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(_hf_config(n_layer=1_000_000_000)))
    own = next(int(ln.split()[1]) << 10 for ln in open("/proc/self/status") if ln.startswith("VmSize:"))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (own + (2 << 30), own + (2 << 30)))

    proc = subprocess.run([sys.executable, str(Path(M.__file__).parent / "generate.py"), "--model", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True, timeout=60, preexec_fn=limit)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "parameters" in lines[0], (proc.returncode, proc.stderr[-2000:])
