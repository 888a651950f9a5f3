"""
The dataset on disk, as fineweb.py writes it and data.py reads it: shard files and their names,
manifest.json (read and checked field by field), the checks of a shard against it (on every
re-run, and every sha256 under fineweb.py --verify), and the lock a builder holds on its directory.

A dataset directory holds <prefix>_val_000000.npy, <prefix>_train_000001.npy, ... (uint16 .npy,
each written whole or not at all) and manifest.json: the settings it was made with, whether it is
complete, and per shard its name, split, token count, sha256 and where in the document stream it ends.
"""

import hashlib
import json
import os
import re
import reprlib
import stat

import numpy as np

import cli

try:
    import fcntl
except ImportError:  # Windows: no lock, the rest works
    fcntl = None

# The shard names, as data.py finds them too: <prefix>_<split>_NNNNNN.npy (.tmp-* are unfinished),
# and a prefix that would make a shard's split ambiguous.
SHARD_NAME = re.compile(r"([^.].*)_(train|val)_\d{6}\.npy")
SPLIT_IN_PREFIX = re.compile(r"_(train|val)(_|$)")


# -----------------------------------------------------------------------------
# Writing shards


class _HashingWriter:
    """File wrapper that hashes what np.save writes (no fileno, so numpy writes through it)."""

    def __init__(self, f, sha):
        self.f, self.sha = f, sha

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)


def write_shard(path, tokens):
    """Save tokens as .npy, whole or not at all (cli.atomic_write); returns the file's sha256."""
    sha = hashlib.sha256()

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(_HashingWriter(f, sha), tokens)

    cli.atomic_write(path, write)
    return sha.hexdigest()


def write_json(path, obj):
    cli.atomic_write(path, json.dumps(obj, indent=1))


def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


# -----------------------------------------------------------------------------
# Reading manifest.json and checking shards against it


MANIFEST_FIX = "restore it, or delete the directory and build the dataset again with fineweb.py"


def plain_shard_name(name):
    """Whether name is a shard's name (as data.py finds shards) and nothing else: no directory, no '..'."""
    m = isinstance(name, str) and not re.search(r"[/\\\0]", name) and SHARD_NAME.fullmatch(name)
    return bool(m) and not SPLIT_IN_PREFIX.search(m[1])


def check_manifest(m, file):
    """Check manifest m, read from file, field by field: what fineweb.py and data.py read of it has
    its type and shape, and a shard's name is a plain file name in the dataset's directory."""
    def need(obj, key, where, ok, what):
        if key not in obj or not ok(obj[key]):
            found = f"{reprlib.repr(obj[key])}, not {what}" if key in obj else f"missing (it must be {what})"
            raise cli.Error(f"{file}: {where}{key} is {found}; {MANIFEST_FIX}")
        return obj[key]

    def count(v):  # an int >= 0, and not a bool (which is an int too)
        return type(v) is int and v >= 0

    if not isinstance(m, dict):
        raise cli.Error(f"{file}: not a JSON object but {reprlib.repr(m)}; {MANIFEST_FIX}")
    need(m, "complete", "", lambda v: type(v) is bool, "true or false")
    need(m, "tokens", "", count, "a token count (an integer >= 0)")
    if m.get("prefix") is not None:
        need(m, "prefix", "", lambda v: isinstance(v, str), "a string")
    seen = set()
    for i, s in enumerate(need(m, "shards", "", lambda v: isinstance(v, list), "a list")):
        where = f"shards[{i}]."
        if not isinstance(s, dict):
            raise cli.Error(f"{file}: shards[{i}] is {reprlib.repr(s)}, not an object; {MANIFEST_FIX}")
        name = need(s, "name", where, plain_shard_name,
                    "a shard's file name in the dataset's directory (<prefix>_<split>_NNNNNN.npy, no path)")
        if name in seen:
            raise cli.Error(f"{file}: {where}name is {name!r}, a shard listed before it; {MANIFEST_FIX}")
        seen.add(name)
        split = SHARD_NAME.fullmatch(name)[2]
        need(s, "split", where, lambda v: v == split, f"{split!r} as its name says")
        need(s, "tokens", where, count, "a token count (an integer >= 0)")
        need(s, "sha256", where, lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v), "a sha256 (hex)")
        need(s, "end_doc", where, count, "a document count (an integer >= 0)")
        need(s, "end_skip", where, count, "a token count (an integer >= 0)")


def read_manifest(path):
    """The manifest.json of directory path, checked (check_manifest), or None where there is none."""
    file = os.path.join(path, "manifest.json")
    try:
        st = os.stat(file)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise cli.Error(f"cannot read {file}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):  # opening a FIFO would wait for a writer forever
        raise cli.Error(f"{file} is not a regular file; {MANIFEST_FIX}")
    try:
        with open(file) as f:
            m = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise cli.Error(f"{file} is unreadable ({type(e).__name__}: {e}); {MANIFEST_FIX}") from None
    check_manifest(m, file)
    return m


def file_problem(path):
    """Why the file at path cannot be a shard, whatever it holds, or None: missing, not a regular
    file, or a link out of its directory. Checked with os.stat before any open: opening a FIFO
    would wait for a writer forever."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, a device or a directory)"
    root, real = os.path.realpath(os.path.dirname(path)), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        return f"a link to {real}, outside the dataset's directory"
    return None


def shard_problem(path, tokens):
    """Why the file at path is not a shard of `tokens` tokens (from its header and size), or None."""
    if why := file_problem(path):
        return why
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        if a.dtype == np.uint16 and a.shape == (tokens,) and os.path.getsize(path) == a.offset + a.nbytes:
            return None
    except Exception:  # truncated below its header's size, or not an .npy at all
        pass
    return f"wrong size: {os.path.getsize(path):,} bytes, not the {tokens:,} tokens manifest.json lists"


def verify(path):
    """--verify: every shard's sha256 against the manifest; returns the exit status."""
    manifest = read_manifest(path)
    if manifest is None:
        raise cli.Error(f"{path!r} holds no manifest.json: not a dataset made by fineweb.py")
    from tqdm import tqdm

    shards = manifest["shards"]
    files = [os.path.join(path, s["name"]) for s in shards]
    bad = 0
    if manifest["complete"]:  # data.py refuses a shard a complete manifest does not list
        for name in sorted(set(filter(SHARD_NAME.fullmatch, os.listdir(path))) - {s["name"] for s in shards}):
            print(f"{os.path.join(path, name)}: not listed in manifest.json (another dataset's? move it away)")
            bad += 1
    total = sum(os.path.getsize(f) for f in files if file_problem(f) is None)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verifying")
    for shard, f in zip(shards, files):
        why = shard_problem(f, shard["tokens"])
        if why is None:
            sha = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    sha.update(chunk)
                    bar.update(len(chunk))
            if sha.hexdigest() != shard["sha256"]:
                why = "sha256 differs from manifest.json (overwritten or corrupted)"
        if why:
            tqdm.write(f"{f}: {why}")
            bad += 1
    bar.close()
    if bad:
        print(f"{path}: {bad} bad shard(s): delete them and run the command that made the dataset again "
              "to rebuild them")
    elif not manifest["complete"]:
        print(f"{path}: the {len(shards)} shards so far are good, but the dataset is incomplete: run the command "
              "that made it again to finish it")
    else:
        print(f"{path}: all {len(shards)} shards good ({manifest['tokens']:,} tokens, sha256 as in manifest.json)")
    return 1 if bad or not manifest["complete"] else 0


# -----------------------------------------------------------------------------
# One builder at a time


def lock_dir(path):
    """Lock directory path for this builder, as rundir.py locks train.py's run directory: flock on
    the directory itself (no file is added to it). Another fineweb.py into it is refused at once.
    Returns the descriptor that holds the lock (None where there is no fcntl)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise cli.Error(f"{path} is being written by another fineweb.py (it holds the directory's lock); wait for "
                        "it to finish, or choose another --path") from None
    return fd


def building(path):
    """Whether a fineweb.py is writing directory path now (holds its lock)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at close
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
