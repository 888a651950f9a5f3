"""Tests for train.py: training, checkpoints, resume, DDP/accumulation equivalence and input errors.

Every run is a subprocess on CPU with a tiny model (2 layers, 2 heads, 32 wide, 32-token context)
over small synthetic uint16 shards, so the whole file runs in a few minutes on two cores.
"""
import copy
import json
import math
import os
import shutil
import signal
import sys
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (REPO_ROOT, TRAIN, T, base_args, check_ok, env, error_line, kill_when, one_gloo_rank, read_log,
                      run_train, train_cmd)

SEED_FLAGS = ["--max_steps", "19073", "--warmup_steps", "715", "--max_lr", "6e-4", "--min_lr", "6e-5",
              "--batch_size_per_device", "64", "--total_batch_size", "524288", "--eval_step_interval", "250",
              "--eval_max_steps", "20", "--save_step", "5000", "--seed", "1337", "--dtype", "fp16"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def train_losses(log_dir):
    """{step: train_loss}, the last logged value of each step."""
    return {r["step"]: r["train_loss"] for r in read_log(log_dir) if "train_loss" in r}


def checkpoints(log_dir):
    return sorted(p for p in Path(log_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def tree_snapshot(d):
    """{relative path: bytes} of every file under d (to prove nothing was touched)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def test_tiny_model_trains_logs_and_checkpoints(data_dir, tmp_path):
    """30 steps of a tiny model lower the loss; log lines are well-formed; the checkpoint loads."""
    from model_io import load_model

    log = tmp_path / "log"
    check_ok(run_train(*base_args(data_dir, log, 30, eval_step_interval=12, save_step=10)))
    recs = read_log(log)
    train = [r for r in recs if "train_loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert len(train) == 30 and len({r["step"] for r in train}) == 30, train
    for r in train:
        for k in ("train_loss", "lr", "grad_norm", "tokens_per_sec"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r)
        assert "mfu" in r and r["mfu"] is None, r  # no peak-FLOPs figure for a CPU
        assert 0 < r["lr"] <= 3e-3 * (1 + 1e-9), r
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] >= 0, r
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)
    assert val, "no val_loss lines with --eval_step_interval 12"
    assert all(math.isfinite(r["val_loss"]) for r in val)
    assert [r["step"] for r in val] == [0, 12, 24, 30], val  # "step N" = after N updates; 30 = the final model
    # full float precision, not a rounded string
    assert any(len(repr(r["train_loss"])) > 8 for r in train)

    losses = [r["train_loss"] for r in train]
    assert losses[0] > 9.0, losses  # ~ln(50257) = 10.8 at init
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert val[-1]["val_loss"] < val[0]["val_loss"] or len(val) == 1

    ckpts = checkpoints(log)
    assert ckpts, os.listdir(log)
    last = ckpts[-1]
    assert last.name == "step_000030", [c.name for c in ckpts]
    for name in ("config.json", "model.safetensors", "trainer_state.pt"):
        assert (last / name).is_file(), (name, os.listdir(last))
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(log)): oct(p.stat().st_mode & 0o777) for p in log.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # every file as any new file (not mkstemp's 0600)
    model = load_model(last)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size) == (2, 2, 32, T)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    assert state is not None
    # the last val line is the final checkpoint's val loss: a naive loop over the val windows
    # (--val_tokens 8*T: the first 8 windows of T+1 tokens at stride T) with the saved weights
    val_tokens = np.load(data_dir / "edufineweb_val_000000.npy").astype(np.int64)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for w in range(8):
            seq = torch.from_numpy(val_tokens[w * T : w * T + T + 1])[None]
            logits, _ = model(seq[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0].double(), seq[0, 1:], reduction="sum").item()
    assert val[-1]["val_tokens"] == 8 * T
    assert abs(val[-1]["val_loss"] - total / (8 * T)) < 1e-5, (val[-1], total / (8 * T))
    assert val[-1]["val_loss"] < losses[0] - 0.3, (val[-1], losses[0])


def val_losses(log_dir):
    """{step: val_loss}, the last logged value of each step."""
    return {r["step"]: r["val_loss"] for r in read_log(log_dir) if "val_loss" in r}


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_accumulation_and_ddp_give_same_losses(data_dir, tmp_path, recipe):
    """Per-step train losses match for 2x2 accumulation, one micro-batch of 4, and 2 gloo ranks x 2;
    val losses match too (rel 1e-6), at every evaluation, over a val set that no layout divides.
    modern: Muon (every rank applies the same update to the all-reduced gradient) and wsd."""
    common = dict(total_batch_size=4 * T, seed=1337, dtype="fp32", eval_step_interval=3, val_tokens=31 * T + 5,
                  recipe=recipe)
    runs = {
        "accum": (1, base_args(data_dir, tmp_path / "accum", 10, batch_size_per_device=2, **common)),
        "single": (1, base_args(data_dir, tmp_path / "single", 10, batch_size_per_device=4, **common)),
        "ddp": (2, base_args(data_dir, tmp_path / "ddp", 10, batch_size_per_device=2, **common)),
    }
    losses = {}
    for name, (nproc, args) in runs.items():
        check_ok(run_train(*args, nproc=nproc, timeout=240))
        losses[name] = train_losses(tmp_path / name)
        assert len(losses[name]) == 10, (name, losses[name])
    ref = losses["single"]
    for name in ("accum", "ddp"):
        assert losses[name].keys() == ref.keys(), (name, losses[name], ref)
        for step in ref:
            a, b = losses[name][step], ref[step]
            assert abs(a - b) <= 1e-4 * abs(b), (name, step, a, b, losses[name], ref)
    vals = {name: val_losses(tmp_path / name) for name in runs}
    assert sorted(vals["single"]) == [0, 3, 6, 9, 10], vals  # every interval, and the final model
    assert all(r["val_tokens"] == 31 * T for r in read_log(tmp_path / "ddp") if "val_loss" in r)
    for name in ("accum", "ddp"):
        assert vals[name].keys() == vals["single"].keys(), (name, vals)
        for step, b in vals["single"].items():
            assert abs(vals[name][step] - b) <= 1e-6 * b, (name, step, vals[name][step], b)


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_kill_and_resume_matches_uninterrupted_run(data_dir, tmp_path, recipe):
    """SIGKILL after step 8's checkpoint, then --resume: every step's loss equals an uninterrupted run's
    (modern: both optimizers' states, AdamW's and Muon's momentum, come back from trainer_state.pt)."""
    # 8 micro-steps per step so a step takes long enough to kill the run between checkpoints
    kw = dict(batch_size_per_device=4, total_batch_size=8 * 4 * T, save_step=4, eval_step_interval=6, recipe=recipe)
    check_ok(run_train(*base_args(data_dir, tmp_path / "A", 12, **kw)))
    ref = train_losses(tmp_path / "A")
    assert len(ref) == 12, ref

    logB = tmp_path / "B"
    args = base_args(data_dir, logB, 12, **kw)
    still_running = kill_when(train_cmd(*args), logB / "step_000008")
    assert still_running, "run B finished before it could be killed; the test needs slower steps"
    assert not (logB / "step_000012").exists()
    before = (logB / "log.jsonl").read_text()
    complete_before = before.splitlines(keepends=True)
    if complete_before and not complete_before[-1].endswith("\n"):
        complete_before = complete_before[:-1]  # a line cut by the kill
    assert len(complete_before) > 0

    check_ok(run_train(*args, "--resume"))
    after = (logB / "log.jsonl").read_text().splitlines(keepends=True)
    assert after[: len(complete_before)] == complete_before, "the log was not appended to"
    assert len(after) > len(complete_before)
    got = train_losses(logB)
    assert sorted(got) == sorted(ref), (got, ref)
    for step in ref:
        assert got[step] == ref[step], (step, got[step], ref[step])
    assert (logB / "step_000012").is_dir()
    assert sorted(c.name for c in checkpoints(logB)) == sorted(c.name for c in checkpoints(tmp_path / "A"))


@pytest.mark.parametrize("flags", [["--dtype", "fp16"], ["--dtype", "bf16"], ["--dtype", "bf16", "--recipe", "modern"]],
                         ids=["fp16", "bf16", "bf16_modern"])
def test_mixed_precision_runs_on_cpu(data_dir, tmp_path, flags):
    """--dtype fp16 (with its GradScaler) and --dtype bf16 (with AdamW, and with Muon) run 3 steps on CPU
    with finite losses."""
    args = base_args(data_dir, tmp_path / "log", 3)
    i = args.index("--dtype")
    del args[i : i + 2]  # let the flag under test pick the precision
    check_ok(run_train(*args, *flags))
    losses = train_losses(tmp_path / "log")
    assert len(losses) == 3, losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert checkpoints(tmp_path / "log")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="torch.compile on CPU is slow; set RUN_SLOW=1")
@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_compile_runs_on_cpu(data_dir, tmp_path, recipe):
    """--compile trains 2 steps on CPU (modern: Muon beside the compiled model)."""
    args = [a for a in base_args(data_dir, tmp_path / "log", 2, recipe=recipe) if a != "--no-compile"]
    check_ok(run_train(*args, "--compile", timeout=600))
    losses = train_losses(tmp_path / "log")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("flags,bad_step", [
    (dict(max_lr=1e39, min_lr=1e38, warmup_steps=1), 0),  # the first update itself overflows the weights
    (dict(max_lr=1e6, min_lr=1e5, warmup_steps=1, grad_clip=1e9), 1),  # finite weights, then a NaN loss
], ids=["inf_update", "nan_loss"])
def test_blow_up_stops_the_run_and_never_checkpoints_non_finite_values(data_dir, tmp_path, flags, bad_step):
    """A diverging run exits 1 with one line naming the step that went non-finite; every checkpoint
    written (save_step 1: one per good step) holds finite weights and optimizer state."""
    from model_io import load_model

    log = tmp_path / "log"
    proc = run_train(*base_args(data_dir, log, 12, save_step=1, **flags))
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "non-finite" in lines[0] and f"step {bad_step}" in lines[0], proc.stderr
    losses = train_losses(log)
    assert sorted(losses) == list(range(bad_step)) and all(math.isfinite(v) for v in losses.values()), losses
    ckpts = checkpoints(log)
    assert [c.name for c in ckpts] == [f"step_{s:06d}" for s in range(1, bad_step + 1)], ckpts
    for c in ckpts:
        model = load_model(c)
        assert all(torch.isfinite(p).all() for p in model.parameters()), c.name
        state = torch.load(c / "trainer_state.pt", weights_only=True)
        for s in state["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in s.values()), c.name


@pytest.mark.parametrize("where", ["weights", "adamw", "muon"])
def test_a_non_finite_value_anywhere_in_the_state_is_never_checkpointed(tmp_path, where):
    """RunDir.save refuses (and writes nothing) when the weights, the AdamW state or the Muon state
    holds a NaN: verify() would reject such a checkpoint on resume, so it must never be written."""
    import rundir
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    finite = lambda: {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}  # noqa: E731
    state = {"step": 5, "optimizer": finite(), "muon": finite(), "scaler": {}, "loader": {}}
    run = rundir.RunDir(str(tmp_path / "log"))
    run.claim({"seed": 1}, resume=False)
    run.save(4, model, state)  # all finite: written
    bad = {"weights": lambda: model.transformer.wte.weight.data.__setitem__((0, 0), float("nan")),
           "adamw": lambda: state["optimizer"]["state"][0]["exp_avg"].__setitem__(1, float("nan")),
           "muon": lambda: state["muon"]["state"][0]["exp_avg"].__setitem__(1, float("inf"))}
    bad[where]()
    with pytest.raises(FloatingPointError, match="not checkpointing step 5"):
        run.save(5, model, state)
    assert sorted(os.listdir(tmp_path / "log")) == ["run.json", "step_000004"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_gradients_are_unscaled_before_clipping(data_dir, tmp_path, optimizer):
    """--dtype fp16 scales the loss by 2^16: the logged gradient norm, the clipping and hence the losses must
    be those of the unscaled gradients, as in an fp32 run (to fp16 autocast's precision); with muon,
    the gradients of both optimizers' parameters."""
    runs = {}
    for name, flags in [("fp32", []), ("fp16", ["--dtype", "fp16"])]:
        args = base_args(data_dir, tmp_path / name, 4, optimizer=optimizer)
        if flags:
            i = args.index("--dtype")
            del args[i : i + 2]
        check_ok(run_train(*args, *flags))
        runs[name] = {r["step"]: r for r in read_log(tmp_path / name) if "train_loss" in r}
    assert runs["fp32"][0]["grad_norm"] > 1.0  # so --grad_clip 1.0 clips: the clipped update matters
    for step in range(4):
        a, b = runs["fp16"][step], runs["fp32"][step]
        assert abs(a["grad_norm"] - b["grad_norm"]) < 0.02 * b["grad_norm"], (step, a, b)
        assert abs(a["train_loss"] - b["train_loss"]) < 0.01, (step, a, b)


def optimizer_snapshot(model, optimizers, scaler):
    """Copies of every parameter, every optimizer's state and the fp16 scale."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, [copy.deepcopy(opt.state_dict()["state"]) for opt in optimizers], scaler.get_scale()


def same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("optimizer,where,bad", [
    ("muon", "muon", math.inf), ("muon", "muon", math.nan), ("muon", "decay", math.inf), ("muon", "decay", math.nan),
    ("adamw", "decay", math.inf), ("adamw", "decay", math.nan)],
    ids=["muon-inf_in_muon", "muon-nan_in_muon", "muon-inf_in_adamw", "muon-nan_in_adamw", "adamw-inf", "adamw-nan"])
def test_fp16_overflow_in_any_gradient_moves_nothing(data_dir, tmp_path, monkeypatch, optimizer, where, bad):
    """fp16: an inf or NaN planted in one element of one parameter's gradient (a Muon matrix, or a
    tensor of AdamW's) at step 2: on that step no parameter and no optimizer state changes, the scale
    backs off, the step is logged as skipped, and the run goes on to its end."""
    import optim
    import train

    BAD = 2
    snaps = {}
    calls = [0]  # train_step calls so far: the step being trained
    real_build, real_step = train.build_optimizers, train.train_step

    def build_optimizers(model, cfg, device_type):
        victim = dict(model.named_parameters())[optim.param_groups(model, cfg)[where][0]]

        def plant(p):
            if calls[0] == BAD:
                p.grad.view(-1)[0] = bad

        victim.register_post_accumulate_grad_hook(plant)
        return real_build(model, cfg, device_type)

    def train_step(model, batches, optimizers, scaler, *rest, **kw):  # snapshot before steps BAD-1..BAD+1
        if calls[0] in (BAD - 1, BAD, BAD + 1):
            snaps[calls[0]] = optimizer_snapshot(model, optimizers, scaler)
        try:
            return real_step(model, batches, optimizers, scaler, *rest, **kw)
        finally:
            calls[0] += 1

    monkeypatch.setattr(train, "build_optimizers", build_optimizers)
    monkeypatch.setattr(train, "train_step", train_step)
    args = base_args(data_dir, tmp_path / "log", 5, optimizer=optimizer, sample_tokens=0)
    i = args.index("--dtype")
    del args[i : i + 2]
    assert train.main([str(a) for a in args] + ["--dtype", "fp16"]) == 0
    log = {r["step"]: r for r in read_log(tmp_path / "log") if "train_loss" in r}
    assert sorted(log) == list(range(5)) and log[BAD].get("skipped") is True, log
    (p1, s1, scale1), (p2, s2, scale2), (p3, s3, scale3) = snaps[BAD - 1], snaps[BAD], snaps[BAD + 1]
    assert not same_state(p1, p2) and not same_state(s1, s2)  # the step before moved (the test can see a step)
    assert same_state(p2, p3), [n for n in p2 if not torch.equal(p2[n], p3[n])]
    assert same_state(s2, s3)
    assert scale3 < scale2, (scale2, scale3)


def test_ddp_all_reduces_once_per_optimizer_step(data_dir, tmp_path, monkeypatch):
    """With gradient accumulation, DDP must all-reduce only on the last micro-step: a run with 4
    micro-steps per step makes exactly as many all-reduce calls as one with a single micro-step.
    (One gloo process in this process; a comm hook counts DDP's bucket all-reduces.)"""
    import train

    one_gloo_rank(monkeypatch)
    calls = []
    real_ddp = train.DDP

    def counting_ddp(module, **kw):
        model = real_ddp(module, **kw)

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, hook)
        return model

    monkeypatch.setattr(train, "DDP", counting_ddp)
    counts = {}
    for accum, B in [(1, 4), (4, 1)]:
        calls.clear()
        argv = [str(a) for a in base_args(data_dir, tmp_path / f"accum{accum}", 3, batch_size_per_device=B,
                                          total_batch_size=4 * T, sample_tokens=0)]
        assert train.main(argv) == 0
        counts[accum] = len(calls)
    assert counts[1] >= 3 and counts[4] == counts[1], counts


# ----------------------------------------------------------------------------------------------
# input errors: exit 2, one "error:" line, no traceback
# ----------------------------------------------------------------------------------------------

def test_error_missing_data_dir(tmp_path):
    """A data directory that does not exist is a clean error naming it."""
    missing = tmp_path / "no_such_dir"
    line = error_line(run_train(*base_args(missing, tmp_path / "log", 2)))
    assert "no_such_dir" in line, line


def test_error_dir_without_shards(tmp_path):
    """A data directory with no shards is a clean error."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard")
    line = error_line(run_train(*base_args(empty, tmp_path / "log", 2)))
    assert "shard" in line.lower() or "empty" in line, line


def test_error_total_batch_not_divisible(data_dir, tmp_path):
    """--total_batch_size that micro-batch x block_size does not divide is a clean error."""
    line = error_line(run_train(*base_args(data_dir, tmp_path / "log", 2, total_batch_size=4 * T + 7)))
    assert "total_batch_size" in line or "divisible" in line, line


@pytest.mark.parametrize("flag,value", [("max_lr", 0), ("max_lr", -1e-3), ("max_steps", 0), ("max_steps", -5)])
def test_error_non_positive_lr_or_steps(data_dir, tmp_path, flag, value):
    """A non-positive --max_lr or --max_steps is a clean error naming the flag."""
    line = error_line(run_train(*base_args(data_dir, tmp_path / "log", 2, **{flag: value})))
    assert flag in line, line


def test_error_resume_with_different_model_shape(data_dir, tmp_path):
    """--resume with a different --n_embd than the checkpoint names n_embd and touches nothing."""
    log = tmp_path / "log"
    args = base_args(data_dir, log, 2, save_step=1)
    check_ok(run_train(*args))
    assert checkpoints(log)
    before = tree_snapshot(log)
    i = args.index("--n_embd")
    args[i + 1] = "64"
    line = error_line(run_train(*args, "--resume"))
    assert "n_embd" in line, line
    assert tree_snapshot(log) == before, "the log directory changed"


def test_error_token_outside_the_vocabulary(data_dir, tmp_path):
    """A shard holding a token id >= 50257 stops the run with one line naming the shard (not a NaN
    blamed on the learning rate, nor an IndexError mid-run)."""
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    for name in ("edufineweb_train_000001.npy", "edufineweb_train_000002.npy"):
        toks = np.load(bad / name)
        toks[::50] = 50300
        np.save(bad / name, toks)
    line = error_line(run_train(*base_args(bad, tmp_path / "log", 4)))
    assert "edufineweb_train_00000" in line and "50300" in line, line


def test_error_more_val_tokens_than_the_val_shards_hold(data_dir, tmp_path):
    """Validation never wraps around to score the same tokens twice: one line with what they hold."""
    line = error_line(run_train(*base_args(data_dir, tmp_path / "log", 2, val_tokens=10_000)))
    assert "--val_tokens" in line and "7,968" in line, line  # 8,000 tokens: 249 whole windows of 32


def test_error_log_dir_is_a_file(data_dir, tmp_path):
    (tmp_path / "log").write_text("not a directory")
    line = error_line(run_train(*base_args(data_dir, tmp_path / "log", 2)))
    assert "--log_dir" in line and "file" in line, line


def test_error_resume_with_another_dtype(data_dir, tmp_path):
    """Resuming an fp32 run with --dtype fp16 names the setting (was "The source state dict is empty")."""
    args = base_args(data_dir, tmp_path / "log", 2, save_step=1)
    check_ok(run_train(*args))
    args[args.index("--dtype") + 1] = "fp16"
    line = error_line(run_train(*args, "--resume"))
    assert "dtype" in line and "fp32" in line, line


def test_seed_command_line_parses(tmp_path):
    """The original seed's flags are all accepted: the run gets as far as the missing data dir."""
    missing = tmp_path / "edu_fineweb10B"
    # exactly the seed's flags; run from tmp_path so the default --log_dir lands there
    proc = run_train("--path", missing, *SEED_FLAGS, cwd=tmp_path)
    line = error_line(proc)
    assert "edu_fineweb10B" in line or "data" in line.lower(), line


@pytest.mark.parametrize("env, expected", [({}, "cuda:0"), ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1")])
def test_cuda_device_gets_an_index(monkeypatch, env, expected):
    """torch.cuda.set_device('cuda') raises on recent PyTorch (found on an H100): setup must pass
    an indexed device, the process's LOCAL_RANK under torchrun, else cuda:0."""
    import runtime
    import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    chosen = []

    def set_device(device):  # what torch.cuda's own _get_device_index insists on
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index, got {device}")
        chosen.append(str(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(runtime, "init_process_group", lambda *a, **k: None)
    cfg = train.parse_args(["--device", "cuda"])
    ctx = train.setup(cfg)
    assert chosen == [expected] and ctx.device == expected and ctx.device_type == "cuda"
    assert cfg.dtype == "bf16" and cfg.compile is True


# ----------------------------------------------------------------------------------------------
# one run per log directory, verified checkpoints, whole log records
# ----------------------------------------------------------------------------------------------

REF_KW = dict(batch_size_per_device=4, total_batch_size=8 * 4 * T, save_step=4, eval_step_interval=6)


@pytest.fixture(scope="module")
def ref_run(data_dir, tmp_path_factory):
    """An uninterrupted 12-step run with checkpoints at steps 4, 8 and 12 (copies of it are damaged below)."""
    log = tmp_path_factory.mktemp("ref") / "log"
    check_ok(run_train(*base_args(data_dir, log, 12, **REF_KW)))
    return log


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_same_numbers(log_dir, ref_dir):
    """Train and val losses (the later line of a repeated step wins) equal the reference run's, exactly."""
    assert train_losses(log_dir) == train_losses(ref_dir)
    assert val_losses(log_dir) == val_losses(ref_dir)


@pytest.mark.parametrize("keep", [0, 1])
def test_another_run_into_a_used_log_dir_is_refused(data_dir, tmp_path, keep):
    """A run with other settings, or the same run without --resume, into a directory holding a run:
    one error line, exit 2, and every file of the first run byte-identical."""
    log = tmp_path / "log"
    args = base_args(data_dir, log, 4, save_step=2, keep_checkpoints=keep)
    check_ok(run_train(*args))
    before = tree_snapshot(log)
    assert (log / "run.json").is_file() and len(checkpoints(log)) == (1 if keep else 2)
    other = base_args(data_dir, log, 4, save_step=1, keep_checkpoints=keep, seed=7)
    line = error_line(run_train(*other))
    assert "seed" in line and "--log_dir" in line, line
    line = error_line(run_train(*other, "--resume"))
    assert "seed" in line, line
    line = error_line(run_train(*args))
    assert "--resume" in line, line
    assert tree_snapshot(log) == before


@pytest.mark.parametrize("edit", ["a list", "null", "no settings", "no run_id", "no started"])
def test_a_hand_edited_run_json_is_one_line(data_dir, ref_run, tmp_path, edit):
    """run.json edited by hand: one error line naming it, and nothing in the run changed; only the
    start time, which is for people, may go."""
    log = copy_run(ref_run, tmp_path / "log")
    ident = json.loads((log / "run.json").read_text())
    new = {"a list": [], "null": None}.get(edit, ident)
    if edit.startswith("no "):
        del new[edit[3:]]
    (log / "run.json").write_text(json.dumps(new))
    before = tree_snapshot(log)
    proc = run_train(*base_args(data_dir, log, 12, **REF_KW), "--resume")
    if edit == "no started":
        check_ok(proc)
        assert "nothing to do" in proc.stdout
        return
    line = error_line(proc)
    assert "run.json" in line and "damaged" in line, line
    assert tree_snapshot(log) == before


def test_resume_names_the_settings_that_differ(data_dir, tmp_path):
    """--resume with another optimizer or recipe names the setting and both values (not "None", not
    only the first setting in alphabetical order)."""
    log = tmp_path / "log"
    check_ok(run_train(*base_args(data_dir, log, 2, optimizer="muon", save_step=1, sample_tokens=0)))
    line = error_line(run_train(*base_args(data_dir, log, 2, optimizer="adamw", save_step=1, sample_tokens=0), "--resume"))
    assert "optimizer 'muon' there, 'adamw' here" in line, line
    assert "None" not in line, line
    log = tmp_path / "modern"
    modern = base_args(data_dir, log, 2, save_step=1, sample_tokens=0)
    for flag in ("--warmup_steps", "--max_lr", "--min_lr"):  # the recipes' own
        i = modern.index(flag)
        del modern[i : i + 2]
    check_ok(run_train(*modern, "--recipe", "modern"))
    line = error_line(run_train(*modern, "--recipe", "gpt2", "--resume"))
    for k in ("decay_frac", "max_lr", "optimizer 'muon' there, 'adamw' here", "schedule 'wsd' there, 'cosine' here"):
        assert k in line, (k, line)


def test_a_dangling_symlink_as_log_dir_is_one_line(data_dir, tmp_path):
    (tmp_path / "log").symlink_to(tmp_path / "gone")
    line = error_line(run_train(*base_args(data_dir, tmp_path / "log", 2)))
    assert "symbolic link" in line and "gone" in line and "Errno" not in line, line


def test_log_dir_without_run_json_is_not_overwritten(data_dir, tmp_path):
    """A directory holding a log.jsonl but no run.json (an older run, or other files) is not taken over."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "log.jsonl").write_text('{"step": 0, "train_loss": 10.0}\n')
    line = error_line(run_train(*base_args(data_dir, log, 2)))
    assert "--resume" in line, line
    assert os.listdir(log) == ["log.jsonl"]


def test_second_live_run_is_refused(data_dir, tmp_path):
    """While a run holds its directory, another process writing there is refused (even with --resume)."""
    log = tmp_path / "log"
    args = base_args(data_dir, log, 100_000, **REF_KW)
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (log / "log.jsonl").is_file() or not (log / "log.jsonl").read_text():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        line = error_line(run_train(*args, "--resume"))
        assert "in use" in line, line
        assert proc.poll() is None, "the live run was disturbed"
    finally:
        proc.kill()
        proc.wait()


def damage(ckpt, kind):
    if kind == "truncated_weights":
        p = ckpt / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "garbage_trainer_state":  # same size, so only loading it can tell
        p = ckpt / "trainer_state.pt"
        p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
    elif kind == "nan_weight":  # same size and a valid header
        from safetensors.torch import load_file, save_file

        p = ckpt / "model.safetensors"
        w = load_file(p)
        w["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
        save_file(w, p, metadata={"format": "pt"})
    elif kind == "config_without_a_field":  # hand-edited: sizes updated to match
        p = ckpt / "config.json"
        cfg = json.loads(p.read_text())
        del cfg["n_positions"]
        p.write_text(json.dumps(cfg))
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta["files"]["config.json"] = p.stat().st_size
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    elif kind == "hostile_pickle":  # an object torch would have to unpickle as code; sizes updated to match
        p = ckpt / "trainer_state.pt"
        torch.save({"step": 12, "optimizer": {"state": {}}, "payload": Path("/")}, p)
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta["files"]["trainer_state.pt"] = p.stat().st_size
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    elif kind.startswith("checkpoint_json_"):  # hand-edited checkpoint.json
        p = ckpt / "checkpoint.json"
        meta = json.loads(p.read_text())
        if kind == "checkpoint_json_without_files":
            del meta["files"]
        elif kind == "checkpoint_json_files_a_list":
            meta["files"] = list(meta["files"])
        else:  # naming a file that is not there
            meta["files"]["extra.bin"] = 10
        p.write_text(json.dumps(meta))
    elif kind in ("nan_muon_state", "no_muon_state"):  # a muon run's checkpoint; sizes updated to match
        p = ckpt / "trainer_state.pt"
        state = torch.load(p, weights_only=True)
        if kind == "no_muon_state":
            del state["muon"]
        else:
            next(iter(state["muon"]["state"].values()))["momentum_buffer"][0, 0] = float("nan")
        torch.save(state, p)
        meta = json.loads((ckpt / "checkpoint.json").read_text())
        meta["files"]["trainer_state.pt"] = p.stat().st_size
        (ckpt / "checkpoint.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def muon_ref_run(data_dir, tmp_path_factory):
    """ref_run's schedule under --optimizer muon."""
    log = tmp_path_factory.mktemp("muon_ref") / "log"
    check_ok(run_train(*base_args(data_dir, log, 12, optimizer="muon", **REF_KW)))
    return log


@pytest.mark.parametrize("kind", ["truncated_weights", "garbage_trainer_state", "nan_weight", "hostile_pickle",
                                  "config_without_a_field", "checkpoint_json_without_files",
                                  "checkpoint_json_files_a_list", "checkpoint_json_names_a_missing_file",
                                  "nan_muon_state", "no_muon_state"])
def test_resume_falls_back_past_a_damaged_checkpoint(data_dir, ref_run, tmp_path, kind, request):
    """The newest checkpoint damaged: --resume warns once, sets it aside, resumes from the one before,
    and logs exactly the uninterrupted run's losses; no traceback."""
    muon = "muon" in kind
    ref = request.getfixturevalue("muon_ref_run") if muon else ref_run
    log = copy_run(ref, tmp_path / "log")
    damage(log / "step_000012", kind)
    proc = run_train(*base_args(data_dir, log, 12, **REF_KW, **(dict(optimizer="muon") if muon else {})), "--resume")
    check_ok(proc)
    assert "Traceback" not in proc.stdout + proc.stderr
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step_000012" in warnings[0] and "step_000008" in warnings[0], proc.stdout
    assert "resuming from" in proc.stdout and "step 8" in proc.stdout
    assert (log / "step_000012.corrupt").is_dir()
    assert [c.name for c in checkpoints(log)] == ["step_000004", "step_000008", "step_000012"]
    assert_same_numbers(log, ref)


def test_resume_with_no_checkpoint_that_verifies_is_one_error_line(data_dir, ref_run, tmp_path):
    """Every checkpoint damaged: one error line, and none of them is renamed or changed."""
    log = copy_run(ref_run, tmp_path / "log")
    for c in checkpoints(log):
        damage(c, "truncated_weights")
    before = tree_snapshot(log)
    line = error_line(run_train(*base_args(data_dir, log, 12, **REF_KW), "--resume"))
    assert "step_000012" in line and "verifies" in line, line
    assert tree_snapshot(log) == before


def test_torn_log_line_is_repaired_on_resume(data_dir, ref_run, tmp_path):
    """A record cut mid-write (kill, full disk) is removed on resume; every later record parses."""
    log = copy_run(ref_run, tmp_path / "log")
    shutil.rmtree(log / "step_000012")  # as if killed before the last checkpoint...
    with open(log / "log.jsonl", "a") as f:
        f.write('{"step": 11, "train_loss": 9.87')  # ...in the middle of writing a record
    proc = run_train(*base_args(data_dir, log, 12, **REF_KW), "--resume")
    check_ok(proc)
    assert "torn record" in proc.stdout, proc.stdout
    read_log(log)  # every line is one whole JSON record
    assert '9.87{' not in (log / "log.jsonl").read_text()
    assert_same_numbers(log, ref_run)


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "resumed"])
def test_a_last_record_missing_only_its_newline_is_kept(data_dir, ref_run, tmp_path, finished):
    """log.jsonl's last line a whole record without its newline (an editor can leave that): --resume
    keeps every record, on a finished run and on one that goes on; only a tail that does not parse is cut."""
    log = copy_run(ref_run, tmp_path / "log")
    if not finished:
        shutil.rmtree(log / "step_000012")
        text = "".join(ln for ln in (log / "log.jsonl").read_text().splitlines(keepends=True)
                       if json.loads(ln)["step"] < 8 or "recipe" in ln)
        (log / "log.jsonl").write_text(text)
    before = (log / "log.jsonl").read_text()
    (log / "log.jsonl").write_text(before.rstrip("\n"))
    proc = run_train(*base_args(data_dir, log, 12, **REF_KW), "--resume")
    check_ok(proc)
    assert "torn" not in proc.stdout, proc.stdout
    after = (log / "log.jsonl").read_text()
    assert after.startswith(before), (before[-300:], after[-300:])
    read_log(log)
    if finished:
        assert after == before
    else:
        assert_same_numbers(log, ref_run)


KILL_IN_SAVE = """
import os, signal, sys, torch
import rundir
real_save = torch.save
def save(obj, path, *a, **k):
    if os.path.basename(str(path)) == "trainer_state.pt" and obj.get("step") == 8:
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(100)  # half-written
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)
rundir.torch.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_killed_during_a_checkpoint_write_resumes_exactly(data_dir, ref_run, tmp_path):
    """SIGKILL in the middle of writing step 8's checkpoint: no step_000008/ appears; --resume
    continues from step 4 and logs the uninterrupted run's losses."""
    log = tmp_path / "log"
    args = [str(a) for a in base_args(data_dir, log, 12, **REF_KW)]
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], cwd=REPO_ROOT, env=env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert [c.name for c in checkpoints(log)] == ["step_000004"]
    assert (log / ".tmp-step_000008").is_dir()
    proc = run_train(*args, "--resume")
    check_ok(proc)
    assert "step 4" in proc.stdout
    assert not (log / ".tmp-step_000008").exists()
    assert_same_numbers(log, ref_run)


HELLASWAG_FAILS_ON_RANK_1 = """
import os, sys
sys.path.insert(0, {repo!r})
import cli, hellaswag, train
if os.environ["RANK"] == "1":
    def load_examples(path):
        raise cli.Error("cannot read it on this rank")
    hellaswag.load_examples = load_examples
sys.exit(train.main(sys.argv[1:]))
"""


def test_hellaswag_is_on_for_every_rank_or_for_none(data_dir, tmp_path):
    """One rank failing to load HellaSwag turns it off on all ranks (rank 0 would otherwise wait
    forever in HellaSwag's collective while rank 1 trains): the run finishes, with one warning."""
    hs = tmp_path / "hellaswag"
    hs.mkdir()
    with open(hs / "hellaswag_val.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"ctx": f"A man walks his dog number {i}.", "label": i % 4,
                                "endings": ["He runs.", "It rains.", "They sing a song.", "The dog barks."]}) + "\n")
    script = tmp_path / "wrap.py"
    script.write_text(HELLASWAG_FAILS_ON_RANK_1.format(repo=str(REPO_ROOT)))
    args = [str(a) for a in base_args(data_dir, tmp_path / "log", 3, batch_size_per_device=2, eval_step_interval=2)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args,
           "--hellaswag_examples", "-1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**env(), "HELLASWAG_DIR": str(hs)}, capture_output=True,
                          text=True, timeout=60)
    check_ok(proc)
    assert "HellaSwag is off: another rank could not load it" in proc.stdout, proc.stdout
    recs = read_log(tmp_path / "log")
    assert not any("hellaswag_acc_norm" in r for r in recs) and len(train_losses(tmp_path / "log")) == 3


def test_resume_adopts_an_older_run_and_keep_checkpoints_deletes_only_its_own(data_dir, ref_run, tmp_path):
    """A run directory from before run.json/checkpoint.json is continued with --resume (exactly), and
    --keep_checkpoints 1 then deletes only checkpoints this run wrote, never the older ones."""
    log = copy_run(ref_run, tmp_path / "log")
    (log / "run.json").unlink()
    for c in checkpoints(log):
        (c / "checkpoint.json").unlink()
    shutil.rmtree(log / "step_000012")
    args = base_args(data_dir, log, 12, **REF_KW, keep_checkpoints=1)
    line = error_line(run_train(*args))  # not without --resume
    assert "--resume" in line, line
    check_ok(run_train(*args, "--resume"))
    assert (log / "run.json").is_file()
    assert [c.name for c in checkpoints(log)] == ["step_000004", "step_000008", "step_000012"]
    assert_same_numbers(log, ref_run)


def worker_pids(parent):
    """{RANK: pid} of the worker processes torchrun (pid `parent`) started."""
    found = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                rank = [e[5:] for e in f.read().split(b"\0") if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0])] = int(d)
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.fixture(scope="module")
def ddp_ref_run(data_dir, tmp_path_factory):
    """An uninterrupted 2-rank run of 12 steps (checkpoints every 4)."""
    log = tmp_path_factory.mktemp("ddp_ref") / "log"
    check_ok(run_train(*base_args(data_dir, log, 12, **REF_KW), nproc=2, timeout=240))
    return log


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("victim", [0, 1])
def test_torchrun_restarts_a_killed_rank_and_resumes_exactly(data_dir, ddp_ref_run, tmp_path, victim):
    """torchrun --max-restarts 2 with 2 gloo ranks; one rank SIGKILLed after step 8's checkpoint:
    torchrun restarts the group, which resumes from step 8 and logs the uninterrupted run's losses."""
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           TRAIN, *[str(a) for a in base_args(data_dir, log, 12, **REF_KW)]]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 150
        while not (log / "step_000008").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "step_000008 never appeared"
            time.sleep(0.01)
        pids = worker_pids(proc.pid)
        assert sorted(pids) == [0, 1], pids
        assert not (log / "step_000012").exists(), "the run finished before it could be killed"
        os.kill(pids[victim], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert "resuming from" in out and "step 8" in out, out[-4000:]
    assert_same_numbers(log, ddp_ref_run)


def run_on_a_small_disk(args, file_limit):
    """train.py with files capped at file_limit bytes (EFBIG, as ENOSPC would be); returns its one
    error line, asserting it failed with exit 1 and printed only that."""
    import resource

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    proc = subprocess.run(train_cmd(*args), cwd=REPO_ROOT, env={**env(), "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=180, preexec_fn=small_disk)  # (no capped .pyc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    return lines[0]


def test_full_disk_is_one_line_and_resume_continues_exactly(data_dir, ref_run, tmp_path):
    """A checkpoint write that fails for space (files capped at 1 MB) ends the run with one error
    line; --resume with room gives the uninterrupted run's numbers."""
    log = tmp_path / "log"
    args = [str(a) for a in base_args(data_dir, log, 12, **REF_KW)]
    run_on_a_small_disk(args, 1 << 20)
    assert not checkpoints(log)
    check_ok(run_train(*args, "--resume"))
    assert_same_numbers(log, ref_run)


def test_full_disk_while_writing_the_trainer_state_is_one_line(data_dir, ref_run, tmp_path):
    """Files capped at 8 MB: model.safetensors (6.5 MB) fits, trainer_state.pt (AdamW's two moments,
    13 MB) does not, and torch.save raises a RuntimeError, not an OSError. One line, exit 1, no
    .tmp-step_* left behind; --resume with room gives the uninterrupted run's numbers."""
    log = tmp_path / "log"
    args = [str(a) for a in base_args(data_dir, log, 12, **REF_KW)]
    line = run_on_a_small_disk(args, 8 << 20)
    assert "step_000004" in line, line
    assert not checkpoints(log) and not list(log.glob(".tmp-*")), os.listdir(log)
    check_ok(run_train(*args, "--resume"))
    assert_same_numbers(log, ref_run)


RANK0_SAVE_FAILS = """
import os, sys
import rundir
def save(obj, path, *a, **k):
    if os.environ["RANK"] == "0":
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    raise AssertionError("only rank 0 writes checkpoints")
rundir.torch.save = save
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_checkpoint_write_failing_on_rank_0_stops_every_rank(data_dir, tmp_path):
    """2 gloo ranks, started without torchrun (whose agent would kill the survivors for them):
    rank 0's checkpoint write fails; both ranks exit non-zero with one error line, at once (rank 1
    was left waiting in a barrier)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [str(a) for a in base_args(data_dir, tmp_path / "log", 4, save_step=2, sample_tokens=0,
                                      total_batch_size=8 * T)]
    procs = []
    for rank in range(2):
        e = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK0_SAVE_FAILS, *args], cwd=REPO_ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode == 1 and "Traceback" not in err, (rank, p.returncode, err[-3000:])
        assert len(lines) == 1 and "unexpected pos" in lines[0], (rank, err[-3000:])
    assert not list((tmp_path / "log").glob(".tmp-*"))


def test_ctrl_c_is_one_line_and_resume_continues_exactly(data_dir, ref_run, tmp_path):
    """SIGINT (Ctrl-C) after the step-4 checkpoint: exit 130, one line saying where it stopped and
    where --resume continues, no traceback; --resume gives the uninterrupted run's numbers."""
    log = tmp_path / "log"
    args = [str(a) for a in base_args(data_dir, log, 12, **REF_KW)]
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (log / "step_000004").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("interrupted at step ") and "--resume continues from step 4" in lines[0], err
    check_ok(run_train(*args, "--resume"))
    assert_same_numbers(log, ref_run)


def test_wsd_schedule_follows_its_formula():
    """--schedule wsd: linear warm-up, max_lr until the last decay_frac of the steps, then linear to
    min_lr, reached at the last step; cosine unchanged."""
    import train

    a = train.parse_args(["--schedule", "wsd", "--max_steps", "1000", "--warmup_steps", "100", "--max_lr", "1e-3",
                          "--min_lr", "1e-4", "--decay_frac", "0.3"])
    lr = lambda s: train.get_lr(s, a)  # noqa: E731
    assert lr(0) == pytest.approx(1e-5) and lr(99) == pytest.approx(1e-3)  # warm-up: (step + 1) / 100
    assert lr(100) == lr(400) == lr(699) == 1e-3  # the plateau up to the decay start, 1000 - 300
    assert lr(700) == pytest.approx(1e-3 - 9e-4 / 300) and lr(850) == pytest.approx(1e-3 - 9e-4 * 151 / 300)
    assert lr(999) == pytest.approx(1e-4)  # the last step runs at min_lr
    assert all(lr(s) >= lr(s + 1) for s in range(99, 999))
    c = train.parse_args(["--max_steps", "1000", "--warmup_steps", "100", "--max_lr", "1e-3", "--min_lr", "1e-4"])
    assert c.schedule == "cosine" and train.get_lr(550, c) == pytest.approx(5.5e-4)  # the cosine's midpoint
