"""train.py --fsdp (FSDP2 on 2 gloo ranks): the losses of DDP and of one process, checkpoints whose
weights are DDP's and whose optimizer shards (DCP) resume exactly on any number of processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (REPO_ROOT, TRAIN, T, TINY, base_args, check_ok, env, error_line, one_gloo_rank, read_log,
                      run_train)

# a step of 2 micro-steps on each of 2 ranks, or of 4 in one process: the same 16 sequences a step
FLAGS = dict(batch_size_per_device=4, total_batch_size=16 * T, eval_step_interval=2, val_tokens=24 * T)


def args(data_dir, log_dir, steps, *extra, **kw):
    return [*TINY, *base_args(data_dir, log_dir, steps, **{**FLAGS, **kw}), *extra]


def losses(log_dir):
    """{("train"|"val", step): loss} of a run's log.jsonl."""
    out = {}
    for r in read_log(log_dir):
        for key, kind in (("train_loss", "train"), ("val_loss", "val")):
            if key in r:
                out[(kind, r["step"])] = r[key]
    return out


def assert_close(a, b, rel=1e-5):
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    bad = {k: (a[k], b[k]) for k in a if abs(a[k] - b[k]) > rel * abs(b[k])}
    assert not bad, bad


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The same 6-step fp32 run three ways: FSDP on 2 ranks, DDP on 2 ranks, one process (no DDP),
    each checkpointing at steps 3 and 6."""
    out = {}
    for name, nproc, extra in (("fsdp", 2, ["--fsdp"]), ("ddp", 2, []), ("one", 1, [])):
        log = tmp_path_factory.mktemp(name) / "log"
        proc = run_train(*args(data_dir, log, 6, *extra, save_step=3, sample_tokens=12), nproc=nproc, timeout=300)
        check_ok(proc)
        out[name] = log
        out[name + " samples"] = [ln for ln in proc.stdout.splitlines() if ln.startswith("sample: ")]
    return out


def test_fsdp_losses_are_ddps_and_one_processes(runs):
    """Train and val losses at every step within 1e-5 (relative) of DDP's and of one process's."""
    fsdp, ddp, one = (losses(runs[k]) for k in ("fsdp", "ddp", "one"))
    assert any(k[0] == "val" for k in fsdp) and sum(k[0] == "train" for k in fsdp) == 6
    assert_close(fsdp, ddp)
    assert_close(fsdp, one)


def test_fsdp_samples_at_each_evaluation_as_ddp_does(runs):
    """Every rank samples in step (no rank holds the whole model) and rank 0 prints: the same samples,
    seed by seed, as the DDP run (whose weights are these to float rounding)."""
    assert len(runs["fsdp samples"]) == 4 and runs["fsdp samples"] == runs["ddp samples"], runs["fsdp samples"]


def test_fsdp_checkpoint_holds_ddps_weights_and_loads_in_transformers(runs):
    """model.safetensors of an --fsdp checkpoint (gathered on rank 0) equals the DDP run's at the same
    step (to fp32 rounding, which AdamW scales up for gradients near zero), and transformers loads it with our logits; its optimizer state is DCP
    shards, listed in checkpoint.json."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from model_io import load_model

    ours, theirs = (load_file(str(runs[k] / "step_000006" / "model.safetensors")) for k in ("fsdp", "ddp"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5)  # (the ranks sum in another order)
    ckpt = runs["fsdp"] / "step_000006"
    files = json.loads((ckpt / "checkpoint.json").read_text())["files"]
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= set(files), files
    model = load_model(str(ckpt)).eval()
    hf = GPT2LMHeadModel.from_pretrained(str(ckpt)).eval()
    idx = torch.randint(0, 50257, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def torchrun(*a, nproc):
    """train.py under torchrun, with one process too (--fsdp needs torchrun's process group)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN,
            *map(str, a)]


def kill_group_when(cmd, marker, timeout=300):
    """Run cmd (torchrun and its ranks) in a session of its own and SIGKILL all of it as soon as the
    checkpoint `marker` exists."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not Path(marker).exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"{marker} never appeared"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("first,then", [(2, 2), (2, 1), (1, 2)], ids=["2_then_2", "2_then_1", "1_then_2"])
def test_fsdp_run_killed_after_a_checkpoint_resumes_exactly(runs, data_dir, tmp_path, first, then):
    """An --fsdp run (torchrun, `first` ranks) SIGKILLed once step 3's checkpoint exists, resumed on
    `then` (2: --fsdp again; 1: one plain process, DCP resharding the optimizer state for it): the
    losses of the run that never stopped, exactly on the same layout, within 1e-5 across layouts."""
    log = tmp_path / "log"
    kill_group_when(torchrun(*args(data_dir, log, 6, "--fsdp", save_step=3), nproc=first), log / "step_000003")
    assert not (log / "step_000006").exists()
    extra = ["--fsdp"] if then == 2 else []
    check_ok(run_train(*args(data_dir, log, 6, "--resume", *extra, save_step=3), nproc=then, timeout=300))
    got, want = losses(log), losses(runs["fsdp"])
    if first == then == 2:
        assert got == want
    else:
        assert_close(got, want)


def test_a_damaged_optimizer_shard_falls_back_to_the_previous_checkpoint(runs, data_dir, tmp_path):
    """A truncated DCP shard in the newest checkpoint (step 6, the run's last): --resume warns once,
    sets it aside and resumes from step 3, training steps 3-6 again with the same losses."""
    import shutil

    log = tmp_path / "log"
    shutil.copytree(runs["fsdp"], log)
    shard = log / "step_000006" / "optimizer" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = run_train(*args(data_dir, log, 6, "--resume", "--fsdp", save_step=3), nproc=2, timeout=300)
    check_ok(proc)
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("warning: skipping")]
    assert len(warnings) == 1 and "step_000006" in warnings[0], warnings
    assert "resuming from" in proc.stdout and "step_000003" in proc.stdout
    assert (log / "step_000006.corrupt").exists() and (log / "step_000006" / "checkpoint.json").exists()
    assert losses(log) == losses(runs["fsdp"])  # steps 3-6 again, logged anew: the same losses


def test_fsdp_refuses_muon_fp16_and_no_torchrun_in_one_line(data_dir, tmp_path):
    for extra, word in ((["--optimizer", "muon"], "muon"), (["--dtype", "fp16"], "fp16"), (["--dtype", "fp32"], "torchrun")):
        a = [x for x in args(data_dir, tmp_path / "log", 2, "--fsdp") if x not in ("--dtype", "fp32")]
        proc = run_train(*a, *extra)
        assert proc.returncode == 2 and "--fsdp" in error_line(proc) and word in error_line(proc), proc.stderr
        assert not (tmp_path / "log").exists()


def test_fsdp_reduces_gradients_once_per_optimizer_step(data_dir, tmp_path, monkeypatch):
    """With gradient accumulation, FSDP must reduce-scatter the gradients only on the last micro-step:
    4 micro-steps a step make as many gradient reductions as 1. (One gloo rank in this process; FSDP2's
    foreach_reduce, one call per sharded group's reduction, is counted.)"""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    import train

    one_gloo_rank(monkeypatch)
    calls = []
    real = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for accum, B in [(1, 4), (4, 1)]:
        calls.clear()
        argv = [str(a) for a in base_args(data_dir, tmp_path / f"accum{accum}", 3, batch_size_per_device=B,
                                          total_batch_size=4 * T, sample_tokens=0)] + [*TINY, "--fsdp"]
        assert train.main(argv) == 0
        counts[accum] = len(calls)
    assert counts[1] >= 3 and counts[4] == counts[1], counts
