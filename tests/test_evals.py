"""evals.py: our model as lm-eval's "gpt2-repro" against lm-eval's own hf backend on the same checkpoint,
offline, over local YAML tasks written here (one multiple-choice, one loglikelihood_rolling, one
generate_until): the same per-request log-likelihoods (1e-4), greedy text and metrics; the same results
under 2 gloo ranks; --all_checkpoints resumable; a chat model's requests rendered as chat.render renders
them; a Hub task offline is one line."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, perturb_, write_task

try:
    import lm_eval
    from lm_eval.tasks import TaskManager
except Exception as e:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"lm-eval is not installed ({type(e).__name__}): pip install -r requirements-test.txt",
                allow_module_level=True)

import chat  # noqa: E402
import evals  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from model_io import get_tokenizer, save_pretrained  # noqa: E402

ATOL = 1e-4
TASKS = ["repro_mc", "repro_ppl", "repro_gen"]
EVALS = str(REPO_ROOT / "evals.py")

MC = [
    {"question": "The capital of France is", "choices": ["Paris.", "a small dog.", "blue", "Zürich, surely."], "answer": 0},
    {"question": "Water boils at", "choices": ["100 degrees Celsius.", "noon", "the café", "日本"], "answer": 0},
    {"question": "She opened the door and", "choices": ["walked in.", "the sky fell.", "said: «bonjour».", "x"],
     "answer": 2},
    {"question": "Two plus two equals", "choices": ["four", "five apples and a pear", "22", "ça dépend"], "answer": 3},
    {"question": "A word:", "choices": [" a", " b", " c", " d"], "answer": 1},  # one-token continuations
]
GEN = [{"q": q, "a": a} for q, a in [("What is 2 + 2?", "4"), ("Name a colour.", "blue"), ("Say hi.", "hi"),
                                     ("Where is Paris?", "France"), ("The opposite of up?", "down")]]


def corpus_texts(n, chars):
    files = sorted((Path(REPO_ROOT).parent / "shared" / "corpus").rglob("*.txt"))[:n]
    return [f.read_text(errors="replace")[:chars] for f in files]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_task(d, "repro_mc", MC, ["output_type: multiple_choice", 'doc_to_text: "{{question}}"',
                                   'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"', "metric_list:",
                                   *(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}"
                                     for m in ("acc", "acc_norm"))])
    # texts of 40 to 1200 characters: one rolling window of 64 tokens, and several
    texts = [t[:k] for t, k in zip(corpus_texts(4, 1200), (40, 300, 700, 1200))]
    write_task(d, "repro_ppl", [{"text": t} for t in texts],
               ["output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
                "metric_list:", "  - metric: word_perplexity", "  - metric: byte_perplexity",
                "  - metric: bits_per_byte"])
    write_task(d, "repro_gen", GEN, ["output_type: generate_until", 'doc_to_text: "Q: {{q}}\\nA:"',
                                     'doc_to_target: " {{a}}"', "generation_kwargs:", '  until: ["\\n\\n", "e"]',
                                     "  max_gen_toks: 12", "  do_sample: false", "metric_list:",
                                     "  - {metric: exact_match, aggregation: mean, higher_is_better: true}"])
    return d


def tiny(seed, chat_model=False):
    torch.manual_seed(seed)
    model = perturb_(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)), seed, 0.3)
    return chat.to_chat_model(model) if chat_model else model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals") / "step_000010"
    save_pretrained(tiny(0).eval(), d)
    return d


def run(model, model_args, tasks, names=TASKS, **kw):
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    evals.make_lm_class()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  batch_size=4, log_samples=True, bootstrap_iters=0, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0, **kw)
    return {t: sorted(s, key=lambda x: x["doc_id"]) for t, s in out["samples"].items()}, out["results"]


def lls(samples):
    return torch.tensor([[float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in s["filtered_resps"]]
                         for s in samples], dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_run(checkpoint, tasks):
    return run("hf", {"pretrained": str(checkpoint), "device": "cpu", "dtype": "float32"}, tasks)


@pytest.fixture(scope="module")
def our_run(checkpoint, tasks):
    return run("gpt2-repro", {"pretrained": str(checkpoint), "device": "cpu"}, tasks)


def test_ours_agrees_with_lm_evals_hf_backend(hf_run, our_run):
    """Per request: log-likelihoods within 1e-4 (multiple choice: every choice; rolling: every text's
    sum over its windows), the same is_greedy, the same greedy text; and the same metrics."""
    (hf, hf_results), (ours, our_results) = hf_run, our_run
    for task in TASKS:
        assert len(ours[task]) == len(hf[task]) > 0
        assert [s["arguments"] for s in ours[task]] == [s["arguments"] for s in hf[task]]
    torch.testing.assert_close(lls(ours["repro_mc"]), lls(hf["repro_mc"]), atol=ATOL, rtol=0)
    greedy = lambda ss: [[bool(r[1]) for r in s["resps"][k]] for s in ss for k in range(len(s["resps"]))]  # noqa
    assert greedy(ours["repro_mc"]) == greedy(hf["repro_mc"])
    torch.testing.assert_close(lls(ours["repro_ppl"]), lls(hf["repro_ppl"]), atol=ATOL, rtol=0)
    gen = lambda ss: [s["filtered_resps"] for s in ss]  # noqa: E731
    assert gen(ours["repro_gen"]) == gen(hf["repro_gen"])
    assert any(len(r[0]) > 3 for r in gen(hf["repro_gen"]))  # (text was generated, not all stopped at once)
    for m in ("acc", "acc_norm"):
        assert [s[m] for s in ours["repro_mc"]] == [s[m] for s in hf["repro_mc"]]
        assert our_results["repro_mc"][f"{m},none"] == hf_results["repro_mc"][f"{m},none"]
    assert our_results["repro_gen"]["exact_match,none"] == hf_results["repro_gen"]["exact_match,none"]
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert our_results["repro_ppl"][f"{m},none"] == pytest.approx(hf_results["repro_ppl"][f"{m},none"], rel=1e-4)
    # the rolling texts span several windows of 64 tokens (else the test proves little)
    assert max(len(get_tokenizer().encode(s["doc"]["text"])) for s in hf["repro_ppl"]) > 3 * 64


def evals_cmd(*args, torchrun=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return [*launcher, EVALS, *args]


def test_two_ranks_give_one_process_s_results(checkpoint, tasks, tmp_path):
    """evals.py under torchrun with 2 gloo ranks writes the same metrics and the same per-request answers
    as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = {}
    for n in (0, 2):
        out = tmp_path / f"r{n}"
        r = subprocess.run(evals_cmd("--model", str(checkpoint), "--tasks", ",".join(TASKS), "--include_path",
                                     str(tasks), "--device", "cpu", "--batch_size", "4", "--json", f"{out}.json",
                                     "--samples", f"{out}.samples.json", torchrun=n),
                           capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        samples = json.loads(Path(f"{out}.samples.json").read_text())
        got[n] = (json.loads(Path(f"{out}.json").read_text())["metrics"],
                  {t: sorted((s["doc_id"], json.dumps(s["filtered_resps"])) for s in ss) for t, ss in samples.items()})
    assert got[2] == got[0]
    assert sum(len(v) for v in got[0][1].values()) == len(MC) + len(GEN) + 4


def test_all_checkpoints_is_resumable(tasks, tmp_path):
    """--all_checkpoints scores each of a run's 3 checkpoints once into RUN/evals.jsonl; killed after the
    first and rerun, it scores only what is missing, and the file holds each (step, task) once."""
    run_dir = tmp_path / "run"
    for i, step in enumerate((10, 20, 30)):
        save_pretrained(tiny(i).eval(), run_dir / f"step_{step:06d}")
    cmd = evals_cmd("--model", str(run_dir), "--all_checkpoints", "--tasks", "repro_mc,repro_gen",
                    "--include_path", str(tasks), "--device", "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = run_dir / "evals.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not results.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert {r["step"] for r in first} == {10}, first
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 checkpoints, 1 already scored" in r.stdout, r.stdout
    records = [json.loads(ln) for ln in results.read_text().splitlines()]
    keys = [(x["step"], x["task"]) for x in records]
    assert sorted(keys) == sorted(set(keys)) == [(s, t) for s in (10, 20, 30) for t in ("repro_gen", "repro_mc")]
    assert [x for x in records if x["step"] == 10] == first  # step 10 was not scored again
    assert all(0 <= x["metrics"]["acc"] <= 1 for x in records if x["task"] == "repro_mc")
    # a third run has nothing to do
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "3 checkpoints, 3 already scored, 0 to score" in r.stdout, r.stdout + r.stderr
    assert [json.loads(ln) for ln in results.read_text().splitlines()] == records


def test_chat_model_requests_are_chat_render_s_tokens(tasks, tmp_path):
    """An sft.py (chat) checkpoint under --apply_chat_template: each multiple-choice request's context
    is exactly chat.render([user: question], generation_prompt=True), and our log-likelihoods are the hf
    backend's (transformers' chat_template) within 1e-4."""
    d = tmp_path / "chat"
    save_pretrained(tiny(5, chat_model=True).eval(), d)
    ours, _ = run("gpt2-repro", {"pretrained": str(d), "device": "cpu"}, tasks, ["repro_mc"], apply_chat_template=True)
    hf, _ = run("hf", {"pretrained": str(d), "device": "cpu", "dtype": "float32"}, tasks, ["repro_mc"],
                apply_chat_template=True)
    lm = evals.make_lm_class()(str(d), device="cpu")
    for s, doc in zip(ours["repro_mc"], MC):
        context = s["arguments"][0][0]
        want = chat.render([{"role": "user", "content": doc["question"]}], generation_prompt=True)[0]
        assert lm.tok_encode(context) == want
    torch.testing.assert_close(lls(ours["repro_mc"]), lls(hf["repro_mc"]), atol=ATOL, rtol=0)
    # a last message left open (lm-eval's add_generation_prompt=False): transformers' continue_final_message
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    for history in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}],
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": " It is"}]):
        want = tok.apply_chat_template(history, tokenize=False, continue_final_message=True)
        assert lm.apply_chat_template(history, add_generation_prompt=False) == want
        assert lm.apply_chat_template(history[:-1]) == tok.apply_chat_template(history[:-1], tokenize=False,
                                                                               add_generation_prompt=True)


def test_a_hub_task_offline_is_one_line(checkpoint, tmp_path):
    """Offline, a task whose data is on the Hub: one line naming it and how to use local files, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(evals_cmd("--model", str(checkpoint), "--tasks", "arc_easy", "--device", "cpu"),
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: task arc_easy:") and "--include_path" in lines[0], lines


def test_the_suite_yaml_lists_the_suite():
    """eval_tasks/gpt2-suite.yaml (lm-eval's CLI) and evals.SUITE (evals.py's metrics) name the same tasks."""
    import yaml

    doc = yaml.safe_load((Path(REPO_ROOT) / "eval_tasks" / "gpt2-suite.yaml").read_text())
    assert doc["group"] == evals.SUITE_NAME and doc["task"] == list(evals.SUITE)
    # each is one of lm-eval's own tasks (its YAMLs, read here: indexing them all through TaskManager is slow)
    root = Path(lm_eval.__file__).parent / "tasks"
    names = {ln.split(":", 1)[1].strip() for f in root.rglob("*.yaml") for ln in f.read_text(errors="replace").splitlines()
             if ln.startswith("task:")}
    assert set(evals.SUITE) <= names, set(evals.SUITE) - names



def test_readme_evals_lines_run_as_pasted(tasks, tmp_path):
    """README's evals.py lines, run from a directory holding log/small (2 checkpoints) and log/small-chat,
    with only the tasks changed (a local one: offline): each finishes and prints the task's accuracy;
    --all_checkpoints scores both checkpoints; the torchrun line is the first line's, launched by torchrun
    (test_two_ranks_give_one_process_s_results runs that)."""
    readme = (Path(REPO_ROOT) / "README.md").read_text()
    block = next(b for b in (b.split("```")[0] for b in readme.split("```bash\n")[1:]) if "python evals.py" in b)
    lines = [ln.split("  #")[0].strip() for ln in block.splitlines() if "evals.py" in ln]
    assert len(lines) == 5, lines
    assert lines[2] == "torchrun --standalone --nproc_per_node=8 " + lines[0].split(" --limit")[0][len("python "):]
    for i, step in enumerate((40, 80)):
        save_pretrained(tiny(i).eval(), tmp_path / "log" / "small" / f"step_{step:06d}")
    save_pretrained(tiny(7, chat_model=True).eval(), tmp_path / "log" / "small-chat")
    local = f"--tasks repro_mc --include_path {tasks}"
    for line in lines[:2] + lines[3:]:
        if "--tasks" in line:
            line = line.replace(line.split("--tasks ")[1].split()[0], "repro_mc") + f" --include_path {tasks}"
        else:
            line += " " + local
        argv = line.replace("python evals.py", f"{sys.executable} {EVALS}").split()
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and "Traceback" not in r.stderr, (line, r.stdout[-2000:], r.stderr[-3000:])
        assert "repro_mc" in r.stdout and "acc" in r.stdout, (line, r.stdout)
    steps = sorted({json.loads(ln)["step"] for ln in (tmp_path / "log" / "small" / "evals.jsonl").read_text().splitlines()})
    assert steps == [40, 80]


def test_a_context_longer_than_max_length_is_cropped_as_the_hf_backend_crops_it(checkpoint, tasks):
    """max_length 8 (questions of 4 to 6 tokens, choices of 1 to 6): each request keeps the last 9 tokens of
    context + continuation, as lm-eval's hf backend does; the choices of one question then share a row
    only where their cropped contexts are equal. Log-likelihoods within 1e-4."""
    hf, _ = run("hf", {"pretrained": str(checkpoint), "device": "cpu", "dtype": "float32", "max_length": 8}, tasks,
                ["repro_mc"])
    ours, _ = run("gpt2-repro", {"pretrained": str(checkpoint), "device": "cpu", "max_length": 8}, tasks, ["repro_mc"])
    full, _ = run("gpt2-repro", {"pretrained": str(checkpoint), "device": "cpu"}, tasks, ["repro_mc"])
    torch.testing.assert_close(lls(ours["repro_mc"]), lls(hf["repro_mc"]), atol=ATOL, rtol=0)
    assert (lls(ours["repro_mc"]) - lls(full["repro_mc"])).abs().max() > 0.01  # (the crop did change some)
