"""lm-eval (EleutherAI's harness, from PyPI) on this repo's checkpoints, offline: local YAML tasks over
JSON files written here, run through lm_eval.simple_evaluate with --model hf on a save_pretrained
directory and with --model local-completions against serve.py on the same directory. Every per-choice
log-likelihood agrees between the two (and with hellaswag.py's packed scoring), and hellaswag.py's
acc, acc_norm and acc_norm_bytes choose what lm-eval chooses on its own hellaswag task's preprocessing.
"""
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import perturb_, write_task

try:
    import lm_eval
    from lm_eval.tasks import TaskManager
except Exception as e:  # not installed, or without its [api] extra (then it fails to import with a NameError)
    if os.environ.get("CI") == "true":  # CI installs requirements-test.txt: there it must run
        raise
    pytest.skip(f"lm-eval[hf,api] is not installed ({type(e).__name__}): pip install -r requirements-test.txt",
                allow_module_level=True)

import hellaswag as H  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model_io import get_tokenizer, load_model, save_pretrained  # noqa: E402

LM_EVAL_HELLASWAG = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
ATOL = 1e-4

# A plain multiple-choice task (question, choices, answer), some choices non-ASCII.
MC = [
    {"question": "The capital of France is", "choices": ["Paris.", "a small dog.", "blue", "Zürich, surely."],
     "answer": 0},
    {"question": "Water boils at", "choices": ["100 degrees Celsius.", "noon", "the café", "日本"], "answer": 0},
    {"question": "She opened the door and", "choices": ["walked in.", "the sky fell.", "said: «bonjour».", "x"],
     "answer": 2},
    {"question": "Two plus two equals", "choices": ["four", "five apples and a pear", "22", "ça dépend"],
     "answer": 3},
]

# HellaSwag as lm-eval's hellaswag task reads it (the Hub's Rowan/hellaswag rows): its utils.process_docs
# builds "activity_label: ctx_a Ctx_b" and strips [title]/[step] brackets and double spaces.
HELLASWAG = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
    {"activity_label": "Making a cake", "ctx_a": "A woman pours flour into a bowl, cracks two eggs over it",
     "ctx_b": "and", "endings": ["whisks them.", "throws the bowl out of the window.", "sings «ah».",
                                 "places the bowl in the oven without stirring anything at all."], "label": "0"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a cast iron pan [title] Rinse the pan.",
     "ctx_b": "[step] while it is still warm,", "endings": ["scrub it  gently [substeps] with a brush.", "ok",
                                                            "dry it and oil it.", "paint it."], "label": "2"},
    {"activity_label": "Café", "ctx_a": "In the café, the barista steams the milk.", "ctx_b": "she",
     "endings": ["ありがとう。", "says «merci».", "ça va", "añade azúcar."], "label": "1"},
    {"activity_label": "Skiing", "ctx_a": "A person skis down a steep slope.", "ctx_b": "the",
     "endings": ["sun sets.", "snow is deep and soft.", "skier falls.", "dog"], "label": "0"},
]


METRICS = ["metric_list:", *(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}"
                             for m in ("acc", "acc_norm", "acc_bytes"))]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_task(d, "repro_mc", MC, ["output_type: multiple_choice", 'doc_to_text: "{{question}}"',
                                   'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"', *METRICS])
    # lm-eval's own hellaswag task (its utils.process_docs), every example once per label 0..3: lm-eval's
    # per-example acc, acc_norm and acc_bytes then say which ending each of its rules chose
    every_label = [{**ex, "label": str(label)} for ex in HELLASWAG for label in range(4)]
    write_task(d, "repro_hellaswag", every_label, [f"include: {json.dumps(str(LM_EVAL_HELLASWAG))}", *METRICS])
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)), 3).eval()
    d = tmp_path_factory.mktemp("lm_eval") / "step_000010"
    save_pretrained(model, d)  # with tokenizer.json etc.: what --model hf (AutoTokenizer) reads
    return d


def run(model, model_args, tasks):
    """lm_eval.simple_evaluate on both local tasks -> {task: [sample, ...] by doc_id}, metrics."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["repro_mc", "repro_hellaswag"],
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  num_fewshot=0, batch_size=8, log_samples=True, bootstrap_iters=0,
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in out["samples"].items()}
    return samples, out["results"]


def lls(samples):
    """Every sample's per-choice log-likelihoods, (docs, choices) float64."""
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_run(checkpoint, tasks):
    return run("hf", {"pretrained": str(checkpoint), "device": "cpu", "dtype": "float32"}, tasks)


def test_hf_agrees_with_serve_py(checkpoint, tasks, hf_run):
    """--model local-completions through serve.py (echo + logprobs; /tokenizer_info and /tokenize: lm-eval's
    remote tokenizer) gives every choice the log-likelihood --model hf gives it (1e-4), and the same acc,
    acc_norm and acc_bytes, example for example."""
    from launch import launch

    proc, url = launch(checkpoint, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:  # as README says, lm-eval's default tokenizer backend (it finds serve.py's /tokenizer_info)
        served = run("local-completions", {"model": "step_000010", "base_url": f"{url}/v1/completions",
                                           "num_concurrent": 8, "max_length": 128, "max_retries": 1}, tasks)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (hf, hf_results), (api, api_results) = hf_run, served
    for task in ("repro_mc", "repro_hellaswag"):
        assert len(api[task]) == len(hf[task]) > 0
        assert [s["arguments"] for s in api[task]] == [s["arguments"] for s in hf[task]]
        torch.testing.assert_close(lls(api[task]), lls(hf[task]), atol=ATOL, rtol=0)
        for m in ("acc", "acc_norm", "acc_bytes"):
            assert [s[m] for s in api[task]] == [s[m] for s in hf[task]], (task, m)
            assert api_results[task][f"{m},none"] == hf_results[task][f"{m},none"]


def test_hellaswag_py_chooses_what_lm_eval_chooses(checkpoint, hf_run):
    """On lm-eval's hellaswag task (its text preprocessing), hellaswag.py's acc is lm-eval's acc and its
    acc_norm_bytes lm-eval's acc_bytes, example for example; its acc_norm (per token) is the choice of
    lm-eval's log-likelihoods per token; its summed losses are lm-eval's log-likelihoods (1e-4)."""
    samples = hf_run[0]["repro_hellaswag"]
    docs = samples[::4]  # every example came 4 times, with labels 0..3
    assert [s["doc"]["label"] for s in samples] == [str(i % 4) for i in range(len(samples))]
    examples = [{"ctx": s["doc"]["query"], "endings": s["doc"]["choices"], "label": int(s["doc"]["label"])}
                for s in docs]
    # hellaswag.py's rendering is lm-eval's: the context, then " " + ending
    assert [[tuple(a) for a in s["arguments"]] for s in docs] == [
        [(ex["ctx"], " " + e) for e in ex["endings"]] for ex in examples]
    assert not any("[" in t for ex in examples for t in [ex["ctx"], *ex["endings"]])  # lm-eval's cleaning ran

    def chose(metric):  # lm-eval's choice: the label for which its metric scored 1
        picks = [[i % 4 for i in range(k, k + 4) if samples[i][metric] == 1.0] for k in range(0, len(samples), 4)]
        assert all(len(p) == 1 for p in picks), (metric, picks)
        return [p[0] for p in picks]

    model = load_model(checkpoint).eval()
    res = H.evaluate(model, examples)
    enc = get_tokenizer()
    losses, counts = H.score(model, [H.render(ex, enc) for ex in examples])
    ll = lls(docs)
    torch.testing.assert_close(-losses, ll, atol=ATOL, rtol=0)
    # lm-eval's continuation tokens: those of context + continuation after the context's
    n_tokens = torch.tensor([[len(enc.encode(ex["ctx"] + " " + e)) - len(enc.encode(ex["ctx"])) for e in ex["endings"]]
                             for ex in examples], dtype=torch.float64)
    assert torch.equal(n_tokens, counts.double())
    nbytes = torch.tensor([[len(e.encode()) for e in ex["endings"]] for ex in examples], dtype=torch.float64)
    assert res["predictions"]["acc"] == chose("acc")
    assert res["predictions"]["acc_norm_bytes"] == chose("acc_bytes")
    assert res["predictions"]["acc_norm"] == (ll / n_tokens).argmax(1).tolist()
    assert res["predictions"]["acc_norm_bytes"] == (ll / nbytes).argmax(1).tolist()
    # the examples tell the rules apart (else the test proves little), and no choice is a near-tie
    nchars = torch.tensor([[len(e) for e in ex["endings"]] for ex in examples], dtype=torch.float64)
    old = torch.tensor([[len((" " + e).encode()) for e in ex["endings"]] for ex in examples], dtype=torch.float64)
    assert chose("acc") != chose("acc_bytes") != res["predictions"]["acc_norm"]
    assert (ll / old).argmax(1).tolist() != chose("acc_bytes")  # hellaswag.py's old denominator, " " counted
    assert (ll / nchars).argmax(1).tolist() == chose("acc_norm") != chose("acc_bytes")  # lm-eval's: characters
    for v in (ll, ll / n_tokens, ll / nbytes):
        top = v.sort(dim=1, descending=True).values
        assert (top[:, 0] - top[:, 1]).min() > 10 * ATOL, "near-tie: change the examples or the seed"


def test_readme_lm_eval_lines_run_as_pasted(checkpoint, tasks, hf_run, tmp_path):
    """README's two lm_eval lines, run by lm-eval's own CLI from a directory holding log/small/step_000080
    (serve.py on log/small, so its model is named small), with only the task (a local one: offline) and
    serve.py's port changed: both finish and print the acc and acc_norm --model hf gave in-process."""
    import re
    import shutil
    import sys

    from conftest import REPO_ROOT
    from launch import launch

    readme = (Path(REPO_ROOT) / "README.md").read_text()
    block = next(b for b in (b.split("```")[0] for b in readme.split("```bash\n")[1:]) if "lm_eval --model hf" in b)
    lines = [ln.split("  #")[0] for ln in block.replace("\\\n", " ").splitlines() if ln.startswith("lm_eval ")]
    assert len(lines) == 2 and "--model local-completions" in lines[1], lines
    shutil.copytree(checkpoint, tmp_path / "log" / "small" / "step_000080")
    proc, url = launch(tmp_path / "log" / "small", env={**os.environ, "OMP_NUM_THREADS": "1"})
    lm_eval_cli = str(Path(sys.executable).parent / "lm_eval")
    want = {m: hf_run[1]["repro_mc"][f"{m},none"] for m in ("acc", "acc_norm")}
    try:
        for line in lines:
            assert "--tasks hellaswag" in line and ("http://127.0.0.1:8000/" in line) == (line is lines[1])
            line = line.replace("--tasks hellaswag", f"--tasks repro_mc --include_path {tasks}")
            argv = line.replace("http://127.0.0.1:8000", url).split()
            r = subprocess.run([lm_eval_cli, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-3000:])
            got = dict(re.findall(r"^\|\s*(?:repro_mc)?\s*\|[^|]*\|[^|]*\|[^|]*\|(acc(?:_norm)?)\s*\|[^|]*\|\s*([\d.]+)\s*\|",
                                  r.stdout, re.M))
            assert {m: float(v) for m, v in got.items()} == pytest.approx(want, abs=1e-4), (line, r.stdout[-2000:])
    finally:
        proc.terminate()
        proc.wait()
