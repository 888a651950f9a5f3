"""Tests for hellaswag.py: packed layout, scoring against a naive reference, metrics,
context cropping, data loading/validation, data_path, torch.distributed and the CLI.

Everything runs on CPU with tiny random GPTs that use the real GPT-2 tokenizer (vocab 50257).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import perturb_
import torch.nn.functional as F

import hellaswag as H  # noqa: E402
import cli  # noqa: E402
import model_io  # noqa: E402
import scoring  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model_io import get_tokenizer, load_model, save_pretrained  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_VAL = REPO_ROOT.parent / "shared" / "hellaswag" / "hellaswag_val.jsonl"
TINY = dict(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
LOSS_ATOL, LOSS_RTOL = 1e-4, 1e-6


# ----------------------------------------------------------------------------- helpers

def make_model(seed=0, **overrides):
    """A perturbed tiny GPT (real GPT-2 vocab) in eval mode."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**{**TINY, **overrides}))
    return perturb_(m, seed + 2000).eval()


# Hand-written, English-like examples of varied lengths (some non-ASCII, so that bytes != chars).
RAW = [
    ("A man is sitting on a roof. He",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
      "is holding a rubik's cube.", "starts pulling up roofing on a roof."]),
    ("A woman pours flour into a large glass bowl, then cracks two eggs over it and",
     ["whisks them together with a fork until smooth.", "throws the bowl out of the window.",
      "sings.", "places the bowl in the oven without stirring anything at all."]),
    ("The kids run onto the soccer field.",
     ["They kick the ball around.", "A dog barks.",
      "The coach blows a whistle and everyone lines up along the painted white line.", "It rains."]),
    ("In the café, the barista steams the milk for a latte and",
     ["pours it carefully over the espresso, drawing a heart.", "naïvely drinks it herself.",
      "leaves.", "hands the customer a croissant — still warm."]),
    ("How to clean a cast iron pan. Rinse the pan with hot water while it is still warm.",
     ["Scrub it gently with a stiff brush to remove any food.", "Put it in the dishwasher.",
      "Dry it thoroughly and rub a thin layer of oil over the entire surface before storing it.",
      "Paint it."]),
    ("Two men are fencing in a gym.",
     ["One lunges forward.", "They drop their swords and start dancing.",
      "The referee raises a flag.", "A crowd cheers loudly from the stands as the match ends."]),
    ("A girl is holding a violin under her chin. She",
     ["begins to play a slow melody.", "eats the bow.", "tunes the strings one by one, listening closely.",
      "smiles."]),
    ("Someone wraps a present in shiny red paper, folds the edges neatly, tapes them down, then",
     ["ties a ribbon around it.", "unwraps it again.", "puts a small card that says “Happy Birthday” on top.",
      "walks away."]),
    ("The chef slices the onions thinly.",
     ["He adds them to a hot pan with butter.", "He cries.",
      "The onions are put into a blender with ice cream, sugar and a pinch of salt for €5.", "He stops."]),
    ("A person is skiing down a steep slope, carving wide turns in the fresh powder snow as",
     ["the sun sets behind the mountains.", "a bear follows.", "they fall.",
      "friends film the descent from the chairlift above them."]),
    # per-byte and per-character normalisation pick different endings here (CJK: 3 bytes a char)
    ("She orders a coffee and a pastry, then says",
     ["café crème, s'il vous plaît.", "ありがとうございます。", "gracias, señor.", "Ça coûte combien ?"]),
]


def make_examples(labels=None):
    labels = labels or [i % 4 for i in range(len(RAW))]
    return [{"ctx": c, "endings": list(e), "label": int(l)} for (c, e), l in zip(RAW, labels)]


def crop_like_spec(ctx, endings, block_size):
    """Left-crop the context so that len(ctx) + max ending length fits in block_size."""
    mx = max(len(e) for e in endings)
    if len(ctx) + mx > block_size:
        ctx = ctx[len(ctx) + mx - block_size:]
    return ctx


@torch.no_grad()
def naive_score(model, rendered):
    """Reference: every (context, ending) scored alone, in float64 log_softmax."""
    bs = model.config.block_size
    losses = torch.zeros(len(rendered), 4, dtype=torch.float64)
    counts = torch.zeros(len(rendered), 4, dtype=torch.long)
    for n, (ctx, endings) in enumerate(rendered):
        ctx = crop_like_spec(list(ctx), endings, bs)
        for i, e in enumerate(endings):
            seq = list(ctx) + list(e)
            logits, _ = model(torch.tensor([seq]))
            lp = F.log_softmax(logits[0].double(), dim=-1)
            # logits at position t predict token t+1
            tot = 0.0
            for j, tok in enumerate(e):
                tot -= lp[len(ctx) - 1 + j, tok].item()
            losses[n, i] = tot
            counts[n, i] = len(e)
    return losses, counts


def ending_bytes(examples):
    """lm-eval's acc_bytes denominator: each ending's UTF-8 bytes (not those of the " " before it)."""
    return torch.tensor([[len(e.encode("utf-8")) for e in ex["endings"]] for ex in examples], dtype=torch.float64)


def naive_predictions(losses, counts, examples):
    nbytes = ending_bytes(examples)
    return {
        "acc": losses.argmin(1).tolist(),
        "acc_norm": (losses / counts.double()).argmin(1).tolist(),
        "acc_norm_bytes": (losses / nbytes).argmin(1).tolist(),
    }


def margins(losses, counts, examples):
    """Smallest gap between best and second-best normalised loss, over all three rules."""
    nbytes = ending_bytes(examples)
    out = []
    for v in (losses, losses / counts.double(), losses / nbytes):
        s = v.sort(dim=1).values
        out.append((s[:, 1] - s[:, 0]).min().item())
    return min(out)


def plain(res):
    """evaluate()'s dict as plain Python values (ints / floats / lists of ints)."""
    preds = {k: [int(x) for x in v] for k, v in res["predictions"].items()}
    return {"n": int(res["n"]), "acc": float(res["acc"]), "acc_norm": float(res["acc_norm"]),
            "acc_norm_bytes": float(res["acc_norm_bytes"]), "predictions": preds}


def assert_same_result(a, b):
    a, b = plain(a), plain(b)
    assert a["n"] == b["n"]
    assert a["predictions"] == b["predictions"]
    for k in ("acc", "acc_norm", "acc_norm_bytes"):
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def write_jsonl(path, examples, extra_lines=()):
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sub_env():
    env = os.environ.copy()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="module")
def tiny():
    return make_model(seed=0)


@pytest.fixture(scope="module")
def ref(tiny):
    """Naive losses and predictions for RAW, with labels chosen so that accuracies are non-trivial."""
    enc = get_tokenizer()
    ex0 = make_examples()
    rendered = [H.render(ex, enc) for ex in ex0]
    losses, counts = naive_score(tiny, rendered)
    preds = naive_predictions(losses, counts, ex0)
    assert margins(losses, counts, ex0) > 1e-3, "near-tie in the reference: pick another seed"
    # first half: label = naive acc_norm choice; second half: a different ending
    labels = [p if i < len(ex0) // 2 else (p + 1) % 4 for i, p in enumerate(preds["acc_norm"])]
    examples = make_examples(labels)
    return dict(examples=examples, rendered=rendered, losses=losses, counts=counts, preds=preds)


@pytest.fixture(scope="module")
def one_proc_result(tiny, ref):
    return H.evaluate(tiny, ref["examples"], batch_size=16)


# ----------------------------------------------------------------------------- 1. layout

def test_pack_example_layout_by_hand():
    """pack_example concatenates ctx + endings, restarts positions at Lc per ending and labels segments."""
    tokens, positions, segments = scoring.pack_example([10, 11, 12], [[20], [21, 22], [23], [24, 25, 26]])
    assert list(tokens) == [10, 11, 12, 20, 21, 22, 23, 24, 25, 26]
    assert list(positions) == [0, 1, 2, 3, 3, 4, 3, 3, 4, 5]
    assert list(segments) == [0, 0, 0, 1, 2, 2, 3, 4, 4, 4]


def test_attention_mask_by_hand():
    """attention_mask lets each ending see the context and itself causally, never another ending."""
    segments = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4]
    mask = scoring.attention_mask(segments)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert mask.shape == (10, 10)
    # spelled out: rows are queries, columns keys
    T, F_ = True, False
    expected = torch.tensor([
        # c  c  c  e1 e2 e2 e3 e4 e4 e4
        [T, F_, F_, F_, F_, F_, F_, F_, F_, F_],  # ctx 0
        [T, T, F_, F_, F_, F_, F_, F_, F_, F_],   # ctx 1
        [T, T, T, F_, F_, F_, F_, F_, F_, F_],    # ctx 2
        [T, T, T, T, F_, F_, F_, F_, F_, F_],     # e1
        [T, T, T, F_, T, F_, F_, F_, F_, F_],     # e2[0]
        [T, T, T, F_, T, T, F_, F_, F_, F_],      # e2[1]
        [T, T, T, F_, F_, F_, T, F_, F_, F_],     # e3
        [T, T, T, F_, F_, F_, F_, T, F_, F_],     # e4[0]
        [T, T, T, F_, F_, F_, F_, T, T, F_],      # e4[1]
        [T, T, T, F_, F_, F_, F_, T, T, T],       # e4[2]
    ])
    assert torch.equal(mask.cpu(), expected)
    # spot checks: ending 2 (segment 2) sees the context, not ending 1, and is causal
    assert not mask[4, 3] and not mask[5, 3]
    assert mask[5, 0] and mask[5, 2] and mask[5, 4]
    assert not mask[4, 5]
    # the rule, entry by entry
    for q in range(10):
        for k in range(10):
            assert bool(mask[q, k]) == (k <= q and (segments[k] == 0 or segments[k] == segments[q]))


# ----------------------------------------------------------------------------- 2. render

def test_render_uses_space_prefixed_endings():
    """render tokenizes ctx as is and every ending as ' ' + ending with the GPT-2 BPE."""
    enc = get_tokenizer()
    ex = {"ctx": "A man is sitting on a roof. He", "label": 3,
          "endings": ["is using wrap.", "rips tiles off.", "holds a cube.", "starts pulling up roofing."]}
    ctx_tokens, endings_tokens = H.render(ex, enc)
    assert list(ctx_tokens) == enc.encode(ex["ctx"])
    assert len(endings_tokens) == 4
    for got, e in zip(endings_tokens, ex["endings"]):
        assert list(got) == enc.encode(" " + e)
    assert enc.encode(" " + ex["endings"][0]) != enc.encode(ex["endings"][0])  # the space matters


# ----------------------------------------------------------------------------- 3. score vs naive

def test_score_matches_naive_per_ending_computation(tiny, ref):
    """score's packed losses equal scoring every (context, ending) alone with log_softmax in float64."""
    losses, counts = H.score(tiny, ref["rendered"], batch_size=16)
    assert isinstance(losses, torch.Tensor) and losses.dtype == torch.float64
    assert counts.dtype == torch.long
    assert losses.shape == counts.shape == (len(ref["rendered"]), 4)
    assert torch.equal(counts.cpu(), ref["counts"])
    torch.testing.assert_close(losses.cpu(), ref["losses"], atol=LOSS_ATOL, rtol=LOSS_RTOL)


# ----------------------------------------------------------------------------- 4. batching

def test_score_and_evaluate_independent_of_batch_size(tiny, ref, one_proc_result):
    """score with batch sizes 1, 4 and 16 agrees to ~1e-5; evaluate's predictions are identical."""
    l1, c1 = H.score(tiny, ref["rendered"], batch_size=1)
    l4, c4 = H.score(tiny, ref["rendered"], batch_size=4)
    l16, c16 = H.score(tiny, ref["rendered"], batch_size=16)
    assert torch.equal(c1, c4) and torch.equal(c1, c16)
    torch.testing.assert_close(l4, l1, atol=1e-5, rtol=1e-7)
    torch.testing.assert_close(l16, l1, atol=1e-5, rtol=1e-7)
    for bs in (1, 3):
        assert_same_result(H.evaluate(tiny, ref["examples"], batch_size=bs), one_proc_result)


# ----------------------------------------------------------------------------- 5. metrics

def test_evaluate_metrics_match_naive_argmin_rules(ref, one_proc_result):
    """evaluate's predictions/accuracies follow argmin of sum, per-token mean and per-byte loss."""
    res = plain(one_proc_result)
    labels = [ex["label"] for ex in ref["examples"]]
    n = len(labels)
    assert res["n"] == n
    assert res["predictions"] == ref["preds"]
    for k in ("acc", "acc_norm", "acc_norm_bytes"):
        want = sum(p == l for p, l in zip(ref["preds"][k], labels)) / n
        assert res[k] == pytest.approx(want, abs=1e-9), k
        assert 0.0 <= res[k] <= 1.0
    assert res["acc_norm"] == pytest.approx((n // 2) / n)  # by construction of the labels
    # the rules must actually disagree somewhere on these examples, else the test is weak:
    # summed vs per-token, and per-byte vs per-character (a chars-for-bytes bug would pass otherwise)
    assert ref["preds"]["acc"] != ref["preds"]["acc_norm"]
    nchars = torch.tensor([[len(e) for e in ex["endings"]] for ex in ref["examples"]], dtype=torch.float64)
    assert (ref["losses"] / nchars).argmin(1).tolist() != ref["preds"]["acc_norm_bytes"]


def test_acc_norm_bytes_divides_by_the_endings_own_bytes(monkeypatch):
    """acc_norm_bytes is lm-eval's acc_bytes: log-likelihood / len(ending.encode()), the " " it is scored
    after not counted. Losses 1.0 for "a" and 2.5 for "bbb": 1.0/1 > 2.5/3 picks "bbb" (with the space:
    1.0/2 < 2.5/4 would pick "a"); "é" is 2 bytes: 1.9/2 < 1.0/1 picks it (per character it would not)."""
    examples = [{"ctx": "x", "endings": ["a", "bbb", "cc", "dd"], "label": 1},
                {"ctx": "x", "endings": ["a", "é", "cc", "dd"], "label": 1}]
    losses = torch.tensor([[1.0, 2.5, 9.0, 9.0], [1.0, 1.9, 9.0, 9.0]], dtype=torch.float64)
    monkeypatch.setattr(H, "score", lambda model, rendered, *a, **k: (losses, torch.ones(2, 4, dtype=torch.long)))
    res = H.evaluate(make_model(block_size=32), examples)
    assert res["predictions"]["acc_norm_bytes"] == [1, 1]
    assert res["acc_norm_bytes"] == 1.0


# ----------------------------------------------------------------------------- 6. cropping

def test_context_cropping_matches_naive_on_left_cropped_context():
    """Over-long contexts are left-cropped so ctx + longest ending fits block_size, on every batch path."""
    model = make_model(seed=5, block_size=32)
    g = torch.Generator().manual_seed(7)

    def toks(n):
        return torch.randint(0, 50257, (n,), generator=g).tolist()

    rendered = [
        (toks(50), [toks(3), toks(8), toks(5), toks(1)]),    # crop: 50 + 8 > 32
        (toks(24), [toks(8), toks(2), toks(8), toks(4)]),    # exactly fits (24 + 8 == 32): no crop
        (toks(25), [toks(8), toks(2), toks(8), toks(4)]),    # one too many: crop one token
        (toks(20), [toks(8), toks(8), toks(8), toks(8)]),    # fits per ending, packed length 52 > 32
        (toks(5), [toks(2), toks(3), toks(1), toks(4)]),     # short, no crop
        (toks(100), [toks(31), toks(1), toks(2), toks(3)]),  # crop to a single context token
    ]
    want, counts = naive_score(model, rendered)
    for bs in (1, 4, 16):
        got, c = H.score(model, rendered, batch_size=bs)
        assert torch.equal(c.cpu(), counts)
        torch.testing.assert_close(got.cpu(), want, atol=LOSS_ATOL, rtol=LOSS_RTOL, msg=f"batch_size={bs}")


def test_evaluate_with_long_text_context_runs():
    """evaluate handles examples whose tokenized ctx exceeds block_size (cropped, not an error)."""
    model = make_model(seed=6, block_size=32)
    ex = make_examples()[:3]
    ex[0] = dict(ex[0], ctx=" ".join([ex[0]["ctx"]] * 8))
    res = plain(H.evaluate(model, ex, batch_size=2))
    enc = get_tokenizer()
    losses, counts = naive_score(model, [H.render(e, enc) for e in ex])
    assert margins(losses, counts, ex) > 1e-3
    want = naive_predictions(losses, counts, ex)
    assert res["n"] == 3
    assert res["predictions"] == want


def test_evaluate_skips_and_counts_an_ending_longer_than_the_context():
    """An ending of block_size tokens or more leaves no room for any context: that example is
    skipped and counted (not a crash at train.py's first evaluation); the others score as alone."""
    model = make_model(seed=6, block_size=32)
    ex = make_examples()[:4]
    ex[2] = dict(ex[2], endings=[ex[2]["endings"][0] + " and then" * 40] + ex[2]["endings"][1:])
    res = H.evaluate(model, ex, batch_size=2)
    alone = H.evaluate(model, [e for i, e in enumerate(ex) if i != 2], batch_size=2)
    assert res["skipped"] == 1 and res["n"] == 3 and res["indices"] == [0, 1, 3]
    assert res["predictions"] == alone["predictions"] and res["acc_norm"] == alone["acc_norm"]


# ----------------------------------------------------------------------------- 7. load_examples

GOOD = {"ctx": "A man opens the door.", "endings": ["He walks in.", "He sings.", "It rains.", "A cat."], "label": 0}


@pytest.mark.parametrize("bad", [
    '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 1',           # truncated JSON
    'not json at all',
    '{"ctx": "x", "label": 1}',                                             # missing endings
    '{"endings": ["a", "b", "c", "d"], "label": 1}',                        # missing ctx
    '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 7}',            # label out of range
    '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": -1}',
    '{"ctx": "x", "endings": ["a", "b", "c"], "label": 1}',                 # 3 endings
    '{"ctx": "x", "endings": ["a", "b", "c", 4], "label": 1}',              # non-string ending
    '{"ctx": "x", "endings": "abcd", "label": 1}',                          # endings not a list
    '[1, 2, 3]',                                                            # not an object
    '{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "\u00b2"}',   # a digit int() cannot read
    '[' * 100_000 + ']' * 100_000,                                          # nested past the recursion limit
])
def test_load_examples_corrupt_line_names_path_and_line(tmp_path, bad):
    """A corrupt line raises cli.Error (a ValueError) naming the file path and 'line 2'."""
    p = write_jsonl(tmp_path / "hs.jsonl", [GOOD], extra_lines=[bad, json.dumps(GOOD)])
    with pytest.raises(cli.Error) as ei:
        H.load_examples(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "line 2" in msg
    assert isinstance(ei.value, ValueError)


def test_load_examples_invalid_utf8_line_names_path_and_line(tmp_path):
    """A line that is not valid UTF-8 is a corrupt line too: cli.Error naming the path and 'line 2'."""
    p = tmp_path / "hs.jsonl"
    bad = b'{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}\n'  # Latin-1, not UTF-8
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + bad)
    with pytest.raises(cli.Error) as ei:
        H.load_examples(p)
    assert str(p) in str(ei.value)
    assert "line 2" in str(ei.value)


def test_load_examples_skips_blank_lines_and_counts_physical_lines(tmp_path):
    """Blank lines are skipped; a later bad line is reported by its physical (1-based) line number."""
    ex2 = {"ctx": "She smiles.", "endings": ["a", "b", "c", "d"], "label": 3}
    p = tmp_path / "hs.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(ex2) + "\n\n")
    got = H.load_examples(p)
    assert len(got) == 2
    for g, want in zip(got, [GOOD, ex2]):
        assert (g["ctx"], list(g["endings"]), g["label"]) == (want["ctx"], want["endings"], want["label"])

    q = tmp_path / "hs_bad.jsonl"
    q.write_text(json.dumps(GOOD) + "\n\n" + '{"ctx": "x", "endings": ["a"], "label": 0}' + "\n")
    with pytest.raises(cli.Error, match="line 3"):
        H.load_examples(q)


# ----------------------------------------------------------------------------- 8. data_path

def _forbid_network(monkeypatch, exc):
    """Make every download route raise exc (and record whether one was attempted)."""
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise exc

    monkeypatch.setattr(urllib.request, "urlopen", boom)
    monkeypatch.setattr(urllib.request, "urlretrieve", boom)
    for name in ("urlopen", "urlretrieve"):
        if hasattr(H, name):
            monkeypatch.setattr(H, name, boom)
    monkeypatch.setattr(model_io, "fetch", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)
    return calls


def test_data_path_existing_file_touches_no_network(tmp_path, monkeypatch):
    """An existing hellaswag_{split}.jsonl in data_dir (or $HELLASWAG_DIR) is returned with no download."""
    calls = _forbid_network(monkeypatch, AssertionError("network touched"))
    f = write_jsonl(tmp_path / "hellaswag_val.jsonl", [GOOD])
    assert Path(H.data_path("val", data_dir=tmp_path)) == f
    assert Path(H.data_path("val", data_dir=str(tmp_path), download=True)) == f

    envdir = tmp_path / "env"
    envdir.mkdir()
    g = write_jsonl(envdir / "hellaswag_train.jsonl", [GOOD])
    monkeypatch.setenv("HELLASWAG_DIR", str(envdir))
    assert Path(H.data_path("train")) == g
    assert calls == []


def test_data_path_missing_file_offline_names_expected_path(tmp_path, monkeypatch):
    """A missing file whose download fails raises cli.Error naming the expected path, leaving no file."""
    _forbid_network(monkeypatch, urllib.error.URLError("offline"))
    d = tmp_path / "nothing_here"
    expected = d / "hellaswag_val.jsonl"
    with pytest.raises(cli.Error) as ei:
        H.data_path("val", data_dir=d)
    assert str(expected) in str(ei.value)
    assert not expected.exists()

    monkeypatch.setenv("HELLASWAG_DIR", str(d))
    with pytest.raises(cli.Error) as ei:
        H.data_path("val")
    assert str(expected) in str(ei.value)


def test_data_path_partial_download_leaves_no_file(tmp_path, monkeypatch):
    """A download that dies midway must not leave a truncated file that a later call would trust."""
    def partial(url, filename=None, *a, **k):
        if filename is not None:
            Path(filename).write_text('{"ctx": "half a li')
        raise urllib.error.URLError("connection reset")

    _forbid_network(monkeypatch, urllib.error.URLError("offline"))
    monkeypatch.setattr(urllib.request, "urlretrieve", partial)
    if hasattr(H, "urlretrieve"):
        monkeypatch.setattr(H, "urlretrieve", partial)
    monkeypatch.setattr(model_io, "fetch", lambda url, path: partial(url, path))
    with pytest.raises(cli.Error):
        H.data_path("val", data_dir=tmp_path)
    assert not (tmp_path / "hellaswag_val.jsonl").exists()


def test_data_path_concurrent_downloads_all_succeed(tmp_path, monkeypatch):
    """Ranks that download the same missing file at once (torchrun hellaswag.py) all get the complete file.

    (Beyond the written spec: guards the documented torchrun use on a fresh machine.)"""
    import threading

    content = json.dumps(GOOD) + "\n"
    barrier = threading.Barrier(2, timeout=10)

    def slow(url, filename=None, *a, **k):
        with open(filename, "w") as f:
            f.write(content[:10])
            f.flush()
            barrier.wait()  # both "ranks" are mid-download
            f.write(content[10:])
        return filename, None

    _forbid_network(monkeypatch, urllib.error.URLError("offline"))
    monkeypatch.setattr(urllib.request, "urlretrieve", slow)
    if hasattr(H, "urlretrieve"):
        monkeypatch.setattr(H, "urlretrieve", slow)
    monkeypatch.setattr(model_io, "fetch", lambda url, path: slow(url, path))
    results, errors = [], []

    def rank():
        try:
            results.append(H.data_path("val", data_dir=tmp_path))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [Path(r) for r in results] == [tmp_path / "hellaswag_val.jsonl"] * 2
    assert (tmp_path / "hellaswag_val.jsonl").read_text() == content


def test_data_path_default_dir_is_beside_module(monkeypatch):
    """Without data_dir or $HELLASWAG_DIR the expected file is hellaswag/ beside hellaswag.py."""
    expected = Path(H.__file__).resolve().parent / "hellaswag" / "hellaswag_val.jsonl"
    if expected.exists():
        assert Path(H.data_path("val", download=False)).resolve() == expected
        return
    monkeypatch.delenv("HELLASWAG_DIR", raising=False)
    _forbid_network(monkeypatch, urllib.error.URLError("offline"))
    with pytest.raises(cli.Error) as ei:
        H.data_path("val", download=False)
    assert str(expected) in str(ei.value) or os.path.relpath(expected) in str(ei.value)


# ----------------------------------------------------------------------------- 9. distributed

DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import hellaswag as H
    from model_io import load_model

    model_dir, data_file, out = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    model = load_model(model_dir).eval()
    examples = H.load_examples(data_file)

    def plain(res):
        preds = {k: [int(x) for x in v] for k, v in res["predictions"].items()}
        return {"n": int(res["n"]), "acc": float(res["acc"]), "acc_norm": float(res["acc_norm"]),
                "acc_norm_bytes": float(res["acc_norm_bytes"]), "predictions": preds}

    full = plain(H.evaluate(model, examples, batch_size=2, rank=rank, world_size=world))
    one = plain(H.evaluate(model, examples[:1], batch_size=2, rank=rank, world_size=world))  # rank 1 gets none
    with open(out, "w") as f:
        json.dump({"full": full, "one": one}, f)
    dist.destroy_process_group()
""")


def test_distributed_two_gloo_ranks_equal_one_process(tmp_path, tiny, ref):
    """Two gloo ranks splitting 11 examples (or 1) each return exactly the single-process result."""
    examples = ref["examples"]
    assert len(examples) % 2 == 1  # uneven split
    want = H.evaluate(tiny, examples, batch_size=16)
    want_one = H.evaluate(tiny, examples[:1], batch_size=16)
    save_pretrained(tiny, tmp_path / "model")
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT)
    env = sub_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = []
    for rank in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "model"), str(data), str(tmp_path / f"out{rank}.json")],
            cwd=REPO_ROOT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{outs[rank]}"
    for rank in range(2):
        got = json.loads((tmp_path / f"out{rank}.json").read_text())
        assert got["full"]["n"] == len(examples)
        assert_same_result(got["full"], want)
        assert got["one"]["n"] == 1
        assert_same_result(got["one"], want_one)


# ----------------------------------------------------------------------------- 10. CLI

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "hellaswag.py", *map(str, args)], cwd=REPO_ROOT, env=sub_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_cli_run_dir_uses_newest_complete_checkpoint(tmp_path, ref):
    """The CLI on a run dir evaluates the newest complete step_*/ checkpoint and writes the --json result."""
    examples = ref["examples"][:6]
    run = tmp_path / "run"
    old, new = make_model(seed=11), make_model(seed=12)
    save_pretrained(old, run / "step_000005")
    save_pretrained(new, run / "step_000010")
    (run / "step_000020").mkdir()
    (run / "step_000020" / "config.json").write_text((run / "step_000010" / "config.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "hellaswag_val.jsonl", examples)

    r = run_cli("--model", run, "--data_dir", data, "--json", tmp_path / "out.json", "--device", "cpu",
                "--dtype", "fp32")
    assert r.returncode == 0, r.stdout + r.stderr
    for k in ("acc_norm_bytes", "acc_norm", "acc", "n"):
        assert k in r.stdout
    got = json.loads((tmp_path / "out.json").read_text())
    assert {"n", "acc", "acc_norm", "acc_norm_bytes", "predictions"} <= got.keys()
    assert got["n"] == len(examples)
    for k in ("acc", "acc_norm", "acc_norm_bytes"):
        assert 0.0 <= got[k] <= 1.0
    want = H.evaluate(load_model(run / "step_000010").eval(), examples)
    assert_same_result(got, want)
    # the older checkpoint scores differently, so the test can tell which one was used
    other = H.score(load_model(run / "step_000005").eval(), [H.render(e, get_tokenizer()) for e in examples])[0]
    mine = H.score(load_model(run / "step_000010").eval(), [H.render(e, get_tokenizer()) for e in examples])[0]
    assert (other - mine).abs().max() > 1e-3


def test_cli_corrupt_data_fails_fast_before_model(tmp_path):
    """A corrupt data file exits 2 with one 'error:' line naming file and line, no traceback, model unread."""
    data = tmp_path / "data"
    data.mkdir()
    f = write_jsonl(data / "hellaswag_val.jsonl", [GOOD], extra_lines=['{"ctx": "x", "endings": ["a"], "label": 0}'])
    r = run_cli("--model", tmp_path / "does_not_exist", "--data_dir", data)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    err_lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1, out
    assert str(f) in err_lines[0] and "line 2" in err_lines[0]


# ----------------------------------------------------------------------------- 11. real data

@pytest.mark.skipif(not SHARED_VAL.is_file(), reason=f"{SHARED_VAL} not present")
def test_real_hellaswag_val_loads_and_evaluates(tiny):
    """The real validation file has 10042 valid examples and the first 20 evaluate to sane metrics."""
    examples = H.load_examples(SHARED_VAL)
    assert len(examples) == 10042
    res = plain(H.evaluate(tiny, examples[:20], batch_size=8))
    assert res["n"] == 20
    for k in ("acc", "acc_norm", "acc_norm_bytes"):
        assert 0.0 <= res[k] <= 1.0
        assert len(res["predictions"][k]) == 20
        assert all(0 <= p <= 3 for p in res["predictions"][k])


def test_unlabelled_test_split_gives_choices_without_accuracy(tmp_path):
    """Examples without a 'label' (HellaSwag's test split) load, and evaluate returns choices with accuracies None."""
    p = tmp_path / "hellaswag_test.jsonl"
    p.write_text(json.dumps({"ctx": "A man is", "endings": [" a", " b c", " d", " e"]}) + "\n")
    examples = H.load_examples(str(p))
    assert examples[0]["label"] is None
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    result = H.evaluate(model, examples)
    assert result["n"] == 1 and result["acc"] is None and result["acc_norm"] is None
    assert result["predictions"]["acc"][0] in range(4)
