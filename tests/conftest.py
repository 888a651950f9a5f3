"""Shared pytest setup: import path, offline settings and the tiktoken cache; tiny train.py runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Never touch the network from tests; keep transformers quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Point tiktoken at the shared offline cache (../shared/tiktoken_cache) unless already set.
_shared_cache = REPO_ROOT.parent / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _shared_cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared_cache)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, run only with RUN_SLOW=1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny in-process models gain nothing from intra-op threads, and threads make them crawl on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturb_(module, seed, scale=0.1):
    """Add scale*randn to every parameter (so LayerNorm gains/biases etc. are nontrivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


# ----------------------------------------------------------------------------------------------
# tiny train.py runs: a 2-layer, 32-wide model on CPU over synthetic shards (test_train.py, test_results.py)
# ----------------------------------------------------------------------------------------------

TRAIN = str(REPO_ROOT / "train.py")
VOCAB = 50257
T = 32  # --block_size in every run

TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", str(T),
        "--no-compile", "--hellaswag_examples", "0"]


def synth_tokens(n, rng, pattern):
    """A repeating pattern of a few hundred token ids with 10% uniform noise: easy to learn."""
    reps = n // len(pattern) + 1
    toks = np.tile(pattern, reps)[:n].copy()
    noise = rng.random(n) < 0.10
    toks[noise] = rng.integers(0, VOCAB, size=int(noise.sum()))
    return toks.astype(np.uint16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One val shard and two ~20k-token train shards in edufineweb_{split}_NNNNNN.npy layout."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    vocab_subset = rng.choice(VOCAB, size=300, replace=False)
    pattern = rng.choice(vocab_subset, size=97)
    np.save(d / "edufineweb_val_000000.npy", synth_tokens(8_000, rng, pattern))
    np.save(d / "edufineweb_train_000001.npy", synth_tokens(20_000, rng, pattern))
    np.save(d / "edufineweb_train_000002.npy", synth_tokens(20_011, rng, pattern))
    return d


def env():
    e = os.environ.copy()
    e["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention (and runs must be repeatable)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def train_cmd(*args, nproc=1, script=TRAIN):
    """The command line of train.py (or another script: sft.py), in one process or under torchrun."""
    args = [str(a) for a in args]
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def run_train(*args, nproc=1, timeout=180, cwd=REPO_ROOT, extra_env=None, script=TRAIN):
    return subprocess.run(train_cmd(*args, nproc=nproc, script=script), cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def kill_when(cmd, marker, timeout=150):
    """Run cmd and SIGKILL it as soon as the path `marker` (a checkpoint) exists; returns whether it
    was still running then (a run that had already finished proves nothing)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while not Path(marker).exists():
            assert proc.poll() is None or Path(marker).exists(), proc.stdout.read()
            assert time.time() < deadline, f"{marker} never appeared"
            time.sleep(0.005)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return still_running


def one_gloo_rank(monkeypatch):
    """torchrun's environment for one rank in this process, on a free local port: a script's main
    then starts a gloo process group of one (a test can count its collectives)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


def check_ok(proc):
    assert proc.returncode == 0, (f"train.py failed rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
                                  f"\nstderr:\n{proc.stderr[-4000:]}")


def base_args(data_dir, log_dir, steps, **kw):
    """Common flags for a tiny fp32 run; keyword arguments override/add --flags."""
    opts = dict(path=data_dir, log_dir=log_dir, max_steps=steps, warmup_steps=2, max_lr=3e-3, min_lr=3e-4,
                batch_size_per_device=4, total_batch_size=4 * T, eval_step_interval=1000, val_tokens=8 * T,
                save_step=1000, seed=1337, dtype="fp32")
    opts.update(kw)
    out = list(TINY)
    for k, v in opts.items():
        out += [f"--{k}", str(v)]
    return out


def read_log(log_dir):
    path = Path(log_dir) / "log.jsonl"
    assert path.is_file(), f"no log.jsonl in {log_dir}: {os.listdir(log_dir)}"
    lines = path.read_text().splitlines()
    recs = []
    for ln in lines:
        assert ln.strip(), "blank line in log.jsonl"
        rec = json.loads(ln)
        assert isinstance(rec, dict) and "step" in rec, ln
        recs.append(rec)
    return recs


def error_line(proc):
    """Assert a clean input error (exit 2, one 'error:' line on stderr, no traceback); return the line."""
    out = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, out
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, out
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error:"), out
    return lines[0]


# ----------------------------------------------------------------------------------------------
# lm-eval: a local task (offline), for test_lm_eval.py and test_evals.py
# ----------------------------------------------------------------------------------------------

def write_task(d, name, data, yaml_lines):
    """lm-eval's d/name.yaml, a task over d/name.json (lines of JSON), its datasets cache in d."""
    data_file = d / f"{name}.json"
    data_file.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in data))
    head = [f"task: {name}", "dataset_path: json", "dataset_name: null",
            f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data_file))}}}, "
            f"cache_dir: {json.dumps(str(d / 'datasets'))}}}",
            "training_split: null", "validation_split: null", "test_split: test"]
    (d / f"{name}.yaml").write_text("\n".join(head + yaml_lines) + "\n")
