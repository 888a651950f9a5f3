"""
A train.py run directory (--log_dir) holds one run and never loses it.

    run.json        the run's identity: an id and the settings that define its numbers, written
                    when the run starts. Another run into the directory is refused, and so is
                    this run started again without --resume.
    The directory is locked (fcntl.flock) by the live run: a second writer is refused.
    log.jsonl       one JSON record per line, each written whole in one write; a torn last
                    line (a kill or a full disk mid-write) is cut when the run resumes.
    step_NNNNNN/    the checkpoint after N steps: config.json + model.safetensors (Hugging Face
                    GPT-2) + trainer_state.pt + checkpoint.json (run id, step, file sizes).
                    Written into .tmp-step_NNNNNN/, fsynced, then renamed into place. On resume
                    each is verified; one that fails is renamed step_NNNNNN.corrupt (kept, never
                    read again) and the run falls back to the one before it.
"""

import json
import math
import os
import shutil
import time
import uuid

import torch

import cli
import fsdp
import runtime
from model_io import checkpoint_dirs, load_model, save_pretrained

try:
    import fcntl
except ImportError:  # Windows: no lock, the rest works
    fcntl = None


class BadCheckpoint(Exception):
    """Why a checkpoint failed verification."""


def _finite(tensors):
    """Names of the non-finite floating-point tensors in a {name: tensor} dict."""
    return [k for k, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def optimizer_tensors(opt_state):
    return {f"optimizer.{i}.{k}": t for i, s in opt_state["state"].items() for k, t in s.items()}


class RunDir:
    def __init__(self, path):
        self.path = path
        self.log_path = os.path.join(path, "log.jsonl")
        self.run_id = None
        self._lock = self._log = None

    # -- one run per directory ------------------------------------------------

    def claim(self, settings, resume, defaults=None):
        """Lock the directory and make sure it holds this run (or nothing yet); returns the run id.
        defaults: the value of each setting that run.json leaves out when it holds it."""
        if os.path.islink(self.path) and not os.path.exists(self.path):
            raise cli.Error(f"--log_dir {self.path!r} is a symbolic link to {os.readlink(self.path)!r}, "
                            "which does not exist")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise cli.Error(f"--log_dir {self.path!r} is a file, not a directory")
        os.makedirs(self.path, exist_ok=True)
        if fcntl is not None:  # the lock is on the directory itself: no file is added to it
            self._lock = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise cli.Error(f"{self.path} is in use by another live run; wait for it or pick another "
                                "--log_dir") from None
        ident_path = os.path.join(self.path, "run.json")
        try:
            with open(ident_path) as f:
                old = json.load(f)
        except FileNotFoundError:
            old = None
        except ValueError as e:
            raise cli.Error(f"{ident_path} is damaged ({e}); pick another --log_dir") from None
        if old is not None or os.path.exists(ident_path):  # (a file holding `null` too)
            if not (isinstance(old, dict) and isinstance(old.get("run_id"), str)
                    and isinstance(old.get("settings"), dict)):
                raise cli.Error(f"{ident_path} is damaged (not an object with a run_id and settings); "
                                "pick another --log_dir")
        has_log = os.path.isfile(self.log_path) and os.path.getsize(self.log_path) > 0
        has_files = bool(checkpoint_dirs(self.path)) or has_log
        if old is None:
            if has_files and not resume:
                raise cli.Error(f"{self.path} holds another run's log.jsonl or checkpoints; continue that run with "
                                  f"--resume (and its settings), or pick another --log_dir")
            self.run_id = uuid.uuid4().hex[:12]
            text = json.dumps({"run_id": self.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "settings": settings}, indent=2)
            cli.atomic_write(ident_path, text)
            return self.run_id
        defaults = defaults or {}
        there = {**defaults, **old["settings"]}
        here = {**defaults, **settings}
        diffs = [k for k in sorted(here.keys() | there.keys(), key=lambda k: (k not in ("optimizer", "schedule"), k))
                 if here.get(k) != there.get(k)]
        shown = [k for k in diffs if None not in (here.get(k), there.get(k))] or diffs  # (unset: another optimizer's)
        differ = ", ".join(f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in shown)
        where = f"{self.path} holds run {old['run_id']}" + (f" (started {old['started']})" if "started" in old else "")
        if not resume:
            if diffs:
                raise cli.Error(f"{where}, another run ({differ}); pick another --log_dir")
            raise cli.Error(f"{where}, this same run; add --resume to continue it, or pick another --log_dir")
        if diffs:
            raise cli.Error(f"cannot resume: {where}, whose settings differ ({differ}); use the run's settings "
                            f"(its run.json) or another --log_dir")
        self.run_id = old["run_id"]
        return self.run_id

    # -- log.jsonl ----------------------------------------------------------------

    def open_log(self):
        """Cut a torn last record (an interrupted write), then append whole records from here on."""
        if os.path.exists(self.log_path):
            with open(self.log_path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1
                if keep < len(data) and _record(data[keep:]):  # a whole record missing only its newline
                    f.write(b"\n")
                elif keep < len(data):
                    f.truncate(keep)
                    print(f"warning: {self.log_path} ended in a torn record ({len(data) - keep} bytes of an "
                          f"interrupted write); cut it")
        # (mode 0o666 less the umask, as any new file)
        self._log = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def log(self, record):
        line = (json.dumps(record) + "\n").encode()
        n = os.write(self._log, line)  # one write: a record is whole or (on a crash) the torn last line
        if n != len(line):
            raise OSError(f"short write to {self.log_path} ({n} of {len(line)} bytes): is the disk full?")

    def close(self):
        if self._log is not None:
            os.close(self._log)
        if self._lock is not None:
            os.close(self._lock)

    # -- checkpoints --------------------------------------------------------------

    def begin_save(self, step):
        """The empty temporary directory step_NNNNNN/ is written into (the ranks' optimizer shards
        first, under --fsdp, then save())."""
        tmp = self._tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)  # a write of this run that was interrupted
        os.makedirs(tmp)
        return tmp

    def save(self, step, model, state, begun=False):
        """Write step_NNNNNN/ whole: into a temporary directory, fsynced, then renamed into place.
        begun: begin_save() made the directory and the optimizer shards are in it already."""
        bad = _finite(model.state_dict())
        for key in ("optimizer", "muon"):
            if state.get(key) is not None:
                bad += _finite(optimizer_tensors(state[key]))
        if bad:
            raise FloatingPointError(f"not checkpointing step {step}: {len(bad)} non-finite tensors ({bad[0]}, ...)")
        final = os.path.join(self.path, f"step_{step:06d}")
        tmp = self._tmp(step) if begun else self.begin_save(step)
        try:
            save_pretrained(model, tmp)
            torch.save({**state, "run_id": self.run_id}, os.path.join(tmp, "trainer_state.pt"))
            names = ["config.json", "model.safetensors", "trainer_state.pt"]
            shards = state.get("sharded_optimizers")  # (the files every rank wrote, listed so that they are checked)
            if shards:
                names += [f"{shards}/{f}" for f in sorted(os.listdir(os.path.join(tmp, shards)))]
            files = {f: os.path.getsize(os.path.join(tmp, f)) for f in names}
            with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
                json.dump({"run_id": self.run_id, "step": step, "files": files}, f)
            for root, _, found in os.walk(tmp):
                for name in found:
                    cli.sync(os.path.join(root, name))
                cli.sync(root)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, RuntimeError):  # torch.save on a full disk: "[enforce fail at inline_container.cc] ..."
                raise OSError(f"cannot write {final}: {str(e).splitlines()[0]} (is the disk full?)") from None
            raise
        if os.path.exists(final):  # only after a fallback past a bad one that was then removed by hand
            os.rename(final, f"{final}.replaced-{int(time.time())}")
        os.rename(tmp, final)
        cli.sync(self.path)

    def _tmp(self, step):
        return os.path.join(self.path, f".tmp-step_{step:06d}")

    def prune(self, keep):
        """Delete all but the newest `keep` checkpoints of this run (never another run's)."""
        ours = [d for d in self.checkpoints()
                if _read_json(os.path.join(d, "checkpoint.json")).get("run_id") == self.run_id]
        for old in ours[:-keep]:
            shutil.rmtree(old)

    def checkpoints(self):
        return checkpoint_dirs(self.path, ("config.json", "model.safetensors", "trainer_state.pt"))

    def newest_valid(self, config, muon=False):
        """(directory, model, trainer state) of the newest checkpoint that verifies, or None when
        there is none at all. Each newer one that fails is renamed aside, with a warning saying why."""
        skipped = []
        for d in reversed(self.checkpoints()):
            try:
                found = (d, *verify(d, config, self.run_id, muon))
                break
            except BadCheckpoint as e:
                skipped.append((d, e))
        else:
            if skipped:
                raise cli.Error(f"no checkpoint in {self.path} verifies (newest, {skipped[0][0]}: {skipped[0][1]})")
            return None
        for d, why in skipped:
            aside = d + ".corrupt"
            while os.path.exists(aside):
                aside += "_"
            os.rename(d, aside)
            print(f"warning: skipping {d}: {why}; renamed it {os.path.basename(aside)}, resuming from {found[0]}")
        return found


def _record(line):
    """Whether a line of log.jsonl is a whole record (a JSON object)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # (UnicodeDecodeError too)
        return False


def _read_json(path):
    """A JSON object from a file, or {} when it is missing, damaged or not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _optimizer_state(s):
    return (isinstance(s, dict) and isinstance(s.get("state"), dict)
            and all(isinstance(v, dict) for v in s["state"].values()))


def verify(d, config, run_id, muon=False):
    """Load a checkpoint, checking sizes, headers, config, finiteness; raises BadCheckpoint(why).
    muon: the run has a Muon optimizer, whose state the checkpoint must hold too."""
    step = int(os.path.basename(d)[5:])
    meta_path = os.path.join(d, "checkpoint.json")
    if os.path.exists(meta_path):  # absent in checkpoints written before checkpoint.json existed
        meta = _read_json(meta_path)
        files = meta.get("files") if isinstance(meta, dict) else None
        if not (isinstance(files, dict) and all(isinstance(n, str) and type(v) is int for n, v in files.items())):
            raise BadCheckpoint("checkpoint.json is damaged (no {file: size} table)")
        if meta.get("run_id") != run_id:
            raise BadCheckpoint(f"it belongs to run {meta.get('run_id')}, not {run_id}")
        for name, size in files.items():
            path = os.path.join(d, name)
            if os.path.isabs(name) or ".." in name.split("/") or not os.path.isfile(path):
                raise BadCheckpoint(f"checkpoint.json names {name!r}, which is not a file there")
            actual = os.path.getsize(path)
            if actual != size:
                raise BadCheckpoint(f"{name} has {actual} bytes, {size} were written (truncated or altered)")
    try:
        model = load_model(d)
    except cli.Error as e:
        raise BadCheckpoint(str(e)) from None
    except Exception as e:  # a damaged config.json: missing or mistyped fields
        raise BadCheckpoint(f"config.json or model.safetensors does not load ({type(e).__name__}: {e})") from None
    if model.config != config:
        raise BadCheckpoint(f"its model config {model.config} is not this run's {config}")
    try:
        state = torch.load(os.path.join(d, "trainer_state.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or a pickle that needs more than tensors
        raise BadCheckpoint(f"trainer_state.pt does not load as plain tensors ({type(e).__name__})") from None
    sharded = isinstance(state, dict) and state.get("sharded_optimizers")  # --fsdp: the optimizers' state in DCP
    if sharded and not os.path.isfile(os.path.join(d, str(sharded), ".metadata")):
        raise BadCheckpoint(f"its sharded optimizer state ({sharded}/) has no .metadata")
    in_file = [] if sharded else ["optimizer", "muon"] if muon else ["optimizer"]  # the optimizers' states here
    if not (isinstance(state, dict) and state.get("step") == step
            and ("optimizer" not in in_file or _optimizer_state(state.get("optimizer")))):
        raise BadCheckpoint(f"trainer_state.pt is not the trainer state of step {step}")
    if not (isinstance(state.get("scaler"), dict) and isinstance(state.get("loader"), dict)):
        raise BadCheckpoint("trainer_state.pt lacks the scaler's or the loader's state")
    if "muon" in in_file and not _optimizer_state(state.get("muon")):
        raise BadCheckpoint("trainer_state.pt holds no Muon optimizer state")
    bad = _finite(model.state_dict())
    for key in in_file:
        bad += _finite(optimizer_tensors(state[key]))
    if bad:
        raise BadCheckpoint(f"{len(bad)} non-finite tensors ({bad[0]}, ...)")
    if not all(math.isfinite(v) for v in state.get("scaler", {}).values() if isinstance(v, float)):
        raise BadCheckpoint("non-finite gradient scaler state")
    return model, state


# -- a training run's side: every rank ---------------------------------------------

def open_run(run_dir, rt, settings, older, resume, config, muon):
    """Rank 0 claims the run directory (one run per directory) and, on resume, finds the newest
    checkpoint that verifies; every rank then loads that one. Returns (model, trainer state, path)
    or (None, None, None) for a new run. older: RunDir.claim's defaults."""
    found = []

    def claim_and_find():
        try:
            run_dir.claim(settings, resume, older)
            run_dir.open_log()
            found.append(run_dir.newest_valid(config, muon=muon) if resume else None)
        except OSError as e:  # the directory cannot be made or read: an input error
            raise cli.Error(str(e)) from None
        return found[0][0] if found[0] else None

    path = runtime.on_rank0(rt, claim_and_find)
    if not path:
        return None, None, None
    if rt.rank == 0:
        _, model, state = found[0]
    else:
        model = load_model(path)
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    return model, state, path


def save_checkpoint(run_dir, rt, step, model, optimizers, state, keep, new_model):
    """Checkpoint step `step` (state: the trainer's, less the optimizers'). Rank 0 writes step_NNNNNN/
    whole (RunDir.save) and keeps the newest `keep` (0: all); the others wait for it, and stop with it
    if it fails (a full disk). A sharded model (--fsdp): every rank first writes its shards of the
    optimizers' state into the directory (DCP), and rank 0 the weights gathered into new_model()."""
    sharded = fsdp.is_sharded(model)
    if sharded:
        tmp = runtime.on_rank0(rt, lambda: run_dir.begin_save(step))
        fsdp.save_optimizers(model, optimizers, os.path.join(tmp, "optimizer"))
        state = {**state, "sharded_optimizers": "optimizer"}
        model = fsdp.full_model(model, new_model)
    else:
        state = {**state, "optimizer": optimizers[0].state_dict()}
        if len(optimizers) > 1:
            state["muon"] = optimizers[1].state_dict()

    def save():
        run_dir.save(step, model, state, begun=sharded)
        if keep > 0:
            run_dir.prune(keep)

    runtime.on_rank0(rt, save)
