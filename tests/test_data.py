"""Tests for the data pipeline: fineweb.py (tokenize -> .npy shards) and data.py (DataLoader)."""
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT.parent / "shared" / "corpus" / "python-docs"
EOT = 50256
SHARD_RE = r"^{prefix}_(val|train)_(\d{{6}})\.npy$"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enc():
    from model_io import get_tokenizer

    return get_tokenizer()


def run_fineweb(*args, workers=2, timeout=120):
    """Run fineweb.py as a subprocess; return the CompletedProcess."""
    cmd = [sys.executable, "fineweb.py", *map(str, args)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=timeout)


def check_ok(proc):
    assert proc.returncode == 0, f"fineweb failed rc={proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}"


def final_shards(out, prefix=None):
    """Final-named shard files in `out`, sorted by index: those of `prefix`, by default of the
    prefix manifest.json records (of any prefix where there is none)."""
    if prefix is None:
        m = load_manifest(out)
        prefix = m["prefix"] if m else None
    pat = re.compile(SHARD_RE.format(prefix=re.escape(prefix) if prefix else "[^.].*"))
    names = [n for n in os.listdir(out) if pat.match(n)]
    return sorted(names, key=lambda n: int(pat.match(n).group(2)))


def load_manifest(out):
    p = Path(out) / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else None


def all_tokens(out, prefix=None):
    return np.concatenate([np.load(Path(out) / n, allow_pickle=False) for n in final_shards(out, prefix)])


def decode_docs(enc, tokens):
    """Split a token stream on EOT (each doc is PRECEDED by EOT) and decode each piece."""
    toks = [int(t) for t in tokens]
    assert toks[0] == EOT, "stream must start with <|endoftext|>"
    docs, cur = [], []
    for t in toks[1:]:
        if t == EOT:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    docs.append(cur)
    return [enc.decode(d) for d in docs]


def check_output(enc, out, docs, shard_size, prefix="src", source=None):
    """Shards decode to `docs` in order; sizes, names, dtype and manifest are consistent. The
    default prefix is that of local text in a directory named src, as most tests' sources are."""
    names = final_shards(out, prefix)
    assert names, f"no shards in {out}: {os.listdir(out)}"
    # names: first is val_000000, then train_000001, train_000002, ...
    expected = [f"{prefix}_val_000000.npy"] + [f"{prefix}_train_{i:06d}.npy" for i in range(1, len(names))]
    assert names == expected
    assert not [n for n in os.listdir(out) if "tmp" in n.lower()], os.listdir(out)
    arrays = [np.load(Path(out) / n, allow_pickle=False) for n in names]
    for i, a in enumerate(arrays):
        assert a.dtype == np.uint16 and a.ndim == 1
        if i < len(arrays) - 1:
            assert len(a) == shard_size, f"{names[i]} has {len(a)} tokens"
        else:
            assert 0 < len(a) <= shard_size
    stream = np.concatenate(arrays)
    assert decode_docs(enc, stream) == docs
    # a token-exact check too: EOT + encode_ordinary(doc) for each doc
    expect = []
    for d in docs:
        expect.append(EOT)
        expect.extend(enc.encode_ordinary(d))
    assert stream.tolist() == expect

    m = load_manifest(out)
    assert m is not None
    assert m["complete"] is True
    assert m["tokenizer"] == "r50k_base"
    assert m["prefix"] == prefix
    assert m["shard_size"] == shard_size
    assert m["tokens"] == len(stream)
    assert m["documents"] == len(docs)
    assert "source" in m and "text_field" in m
    assert len(m["shards"]) == len(names)
    for entry, name, a in zip(m["shards"], names, arrays):
        assert os.path.basename(entry["name"]) == name
        assert entry["split"] == ("val" if "_val_" in name else "train")
        assert entry["tokens"] == len(a)
        assert entry["sha256"] == hashlib.sha256((Path(out) / name).read_bytes()).hexdigest()
    return stream


WORDS = ("the of and to in is was for on that with as by at from this be are or an which it not "
         "model data token shard train value python function return class module error file read "
         "write stream batch window epoch seed order random memory tensor layer output input").split()


def synth_docs(n, words_per_doc, seed=0):
    """Deterministic English-ish documents with some punctuation, newlines and non-ASCII text."""
    rng = random.Random(seed)
    extras = ["café", "naïve", "日本語", "😀", "Ω≈ç", "\n\n", "\n", ", ", ". ", "; ", " (x=3)", " 42"]
    docs = []
    for i in range(n):
        parts = [f"Document {i}:"]
        for _ in range(words_per_doc):
            parts.append(rng.choice(WORDS))
            if rng.random() < 0.08:
                parts.append(rng.choice(extras))
        docs.append(" ".join(parts))
    return docs


def write_txt_dir(d, docs):
    """One doc per file; created in reverse so sorting (not creation order) must be used."""
    d.mkdir(parents=True, exist_ok=True)
    for i in reversed(range(len(docs))):
        (d / f"doc_{i:05d}.txt").write_text(docs[i], encoding="utf-8")
    return d


# ----------------------------------------------------------------------------------------------
# fineweb.py: formats and round trip
# ----------------------------------------------------------------------------------------------

def test_fineweb_txt_dir_roundtrip(tmp_path, enc):
    """A directory of .txt files (recursive, sorted by path) round-trips to the docs in order."""
    docs = synth_docs(30, 120, seed=1)
    src = tmp_path / "src"
    write_txt_dir(src, docs[:20])
    write_txt_dir(src / "sub", docs[20:])  # 'doc_*' < 'sub' in any path ordering
    (src / "README.md").write_text("not a supported file; must be ignored")
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1000))
    stream = check_output(enc, out, docs, 1000)
    assert len(final_shards(out)) >= 3


def test_fineweb_jsonl_roundtrip_and_prefix(tmp_path, enc):
    """Several .jsonl files (given as a glob) round-trip in file then record order; --prefix names the shards."""
    docs = synth_docs(25, 100, seed=2)
    src = tmp_path / "src"
    src.mkdir()
    chunks = [docs[:10], docs[10:18], docs[18:]]
    for i in reversed(range(3)):
        with open(src / f"part_{i:03d}.jsonl", "w", encoding="utf-8") as f:
            for j, d in enumerate(chunks[i]):
                f.write(json.dumps({"id": j, "text": d, "meta": {"x": 1}}) + "\n")
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", str(src / "*.jsonl"), "--path", out, "--shard_size", 777,
                         "--prefix", "mydata"))
    check_output(enc, out, docs, 777, prefix="mydata")
    assert not final_shards(out, "src")  # nothing named with the default prefix


def test_fineweb_jsonl_gz_and_json_with_text_field(tmp_path, enc):
    """A .jsonl.gz file and a .json (JSON lines) file with --text_field round-trip; the field is recorded."""
    docs = synth_docs(20, 90, seed=3)
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(src / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[:12]:
            f.write(json.dumps({"content": d, "text": "WRONG FIELD"}) + "\n")
    with open(src / "b.json", "w", encoding="utf-8") as f:
        for d in docs[12:]:
            f.write(json.dumps({"content": d}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 500, "--text_field", "content"))
    check_output(enc, out, docs, 500)
    assert load_manifest(out)["text_field"] == "content"


def test_fineweb_parquet_roundtrip(tmp_path, enc):
    """Parquet files (several row groups, extra columns) round-trip in sorted file then row order."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = synth_docs(40, 80, seed=4)
    src = tmp_path / "src"
    src.mkdir()
    for i, chunk in reversed(list(enumerate([docs[:25], docs[25:]]))):
        table = pa.table({"id": list(range(len(chunk))), "text": chunk, "score": [0.5] * len(chunk)})
        pq.write_table(table, src / f"train-{i:05d}.parquet", row_group_size=7)
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1024))
    check_output(enc, out, docs, 1024)
    # a single parquet file as the source works too
    out2 = tmp_path / "out2"
    check_ok(run_fineweb("--source", src / "train-00001.parquet", "--path", out2, "--shard_size", 1024))
    check_output(enc, out2, docs[25:], 1024, prefix="train-00001")  # named after the file


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared python-docs corpus not present")
def test_fineweb_real_corpus_roundtrip(tmp_path, enc):
    """Real English text files (copied from the shared corpus) round-trip exactly."""
    files = sorted(CORPUS.glob("*.txt"))[:15]
    src = tmp_path / "src"
    src.mkdir()
    docs = []
    for f in files:
        text = f.read_bytes().decode("utf-8")
        (src / f.name).write_bytes(text.encode("utf-8"))
        docs.append(text)
    if any("\r" in d for d in docs):
        pytest.skip("corpus has CR characters; newline handling is out of scope")
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 8192))
    check_output(enc, out, docs, 8192)


def test_fineweb_max_tokens(tmp_path, enc):
    """--max_tokens M writes exactly M tokens: the prefix of the full stream."""
    docs = synth_docs(30, 200, seed=5)
    src = write_txt_dir(tmp_path / "src", docs)
    full = tmp_path / "full"
    check_ok(run_fineweb("--source", src, "--path", full, "--shard_size", 1000))
    full_stream = all_tokens(full)
    M = 2345
    assert len(full_stream) > M + 1000
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1000, "--max_tokens", M))
    sizes = [len(np.load(out / n)) for n in final_shards(out)]
    assert sizes == [1000, 1000, 345]
    assert all_tokens(out).tolist() == full_stream[:M].tolist()
    m = load_manifest(out)
    assert m["complete"] is True and m["tokens"] == M
    assert [s["tokens"] for s in m["shards"]] == sizes


def test_fineweb_rerun_after_completion_is_noop(tmp_path):
    """Re-running a finished command exits 0 and leaves every shard file and the manifest untouched."""
    src = write_txt_dir(tmp_path / "src", synth_docs(10, 100, seed=6))
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 600))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    time.sleep(0.05)
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 600))
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert after == before


def test_fineweb_workers_1_vs_2_identical(tmp_path):
    """--workers 1 and --workers 2 write byte-identical shards and the same manifest shard list."""
    src = write_txt_dir(tmp_path / "src", synth_docs(40, 400, seed=7))
    o1, o2 = tmp_path / "w1", tmp_path / "w2"
    check_ok(run_fineweb("--source", src, "--path", o1, "--shard_size", 2048, workers=1))
    check_ok(run_fineweb("--source", src, "--path", o2, "--shard_size", 2048, workers=2))
    n1, n2 = final_shards(o1), final_shards(o2)
    assert n1 == n2 and len(n1) >= 4
    for n in n1:
        assert (o1 / n).read_bytes() == (o2 / n).read_bytes(), n
    assert load_manifest(o1)["shards"] == load_manifest(o2)["shards"]


def test_fineweb_spawn_start_method_identical(tmp_path):
    """Under the spawn start method (macOS, Windows) the workers write the same shards as under fork."""
    src = write_txt_dir(tmp_path / "src", synth_docs(20, 300, seed=9))
    o1, o2 = tmp_path / "fork", tmp_path / "spawn"
    check_ok(run_fineweb("--source", src, "--path", o1, "--shard_size", 2048, "--start_method", "fork", workers=2))
    check_ok(run_fineweb("--source", src, "--path", o2, "--shard_size", 2048, "--start_method", "spawn", workers=2))
    assert final_shards(o1) == final_shards(o2)
    for n in final_shards(o1):
        assert (o1 / n).read_bytes() == (o2 / n).read_bytes(), n


def test_fineweb_special_token_text_is_ordinary_text(tmp_path, enc):
    """A document that contains the text '<|endoftext|>' is tokenized as ordinary text, not as the separator."""
    docs = ["before <|endoftext|> after", "second <|fim_prefix|> doc"]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1000))
    tokens = all_tokens(out).tolist()
    assert tokens == [t for d in docs for t in [50256] + enc.encode_ordinary(d)]
    assert tokens.count(50256) == 2


# ----------------------------------------------------------------------------------------------
# fineweb.py: crash + resume
# ----------------------------------------------------------------------------------------------

def _check_final_shards_valid(out, shard_size, seen):
    """Every final-named shard loads as a full-size uint16 shard (nothing half-written has a final name)."""
    for n in final_shards(out):
        if n in seen:
            continue
        a = np.load(out / n, allow_pickle=False)
        assert a.dtype == np.uint16 and a.shape == (shard_size,), f"invalid final-named shard {n}: {a.dtype} {a.shape}"
        seen.add(n)


def _processes_writing_to(out):
    """Pids of live processes whose command line names `out` (forked workers share the parent's)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(out).encode() in cmdline and state != "Z":
            pids.append(int(pid))
    return pids


def _check_workers_exit(out, within_s=10):
    """A parent killed with SIGKILL leaves no tokenizer processes behind: they see the closed
    task pipe and exit."""
    if not os.path.isdir("/proc"):
        return
    t0 = time.time()
    while (left := _processes_writing_to(out)) and time.time() - t0 < within_s:
        time.sleep(0.05)
    assert not left, f"worker processes {left} outlived their killed parent"


def _run_and_kill(src, out, shard_size, min_shards, deadline_s=60):
    """Start fineweb, SIGKILL it as soon as >= min_shards final shards exist. Returns True if killed
    mid-run, False if it finished first."""
    cmd = [sys.executable, "fineweb.py", "--source", str(src), "--path", str(out),
           "--shard_size", str(shard_size), "--workers", "1"]
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    seen = set()
    t0 = time.time()
    try:
        while True:
            if p.poll() is not None:
                err = p.stderr.read().decode()
                assert p.returncode == 0, f"fineweb failed: {err}"
                return False
            if out.is_dir():
                names = final_shards(out)
                if len(names) >= min_shards:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    _check_workers_exit(out)
                    break
            assert time.time() - t0 < deadline_s, "fineweb produced no shards in time"
            time.sleep(0.003)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    _check_final_shards_valid(out, shard_size, seen)
    m = load_manifest(out)
    if m is not None and m.get("complete") is True:
        return False  # finished between our check and the kill
    return True


def test_fineweb_kill_and_resume_is_byte_identical(tmp_path):
    """SIGKILL mid-run, then re-run (twice): final shards + manifest equal an uninterrupted run byte for byte."""
    shard_size = 4096
    base_docs = synth_docs(60, 15000, seed=8)  # 60 docs, ~1M tokens: an uninterrupted run takes > 2 s
    for attempt in range(3):
        reps = 4 ** attempt  # grow the data if the run finishes before it can be killed
        docs = [d + f"\n(copy {r})" for r in range(reps) for d in base_docs]
        src = write_txt_dir(tmp_path / f"src{attempt}", docs)
        out = tmp_path / f"killed{attempt}"
        if _run_and_kill(src, out, shard_size, min_shards=2):
            break
    else:
        pytest.fail("fineweb always finished before it could be killed, even on the largest data")
    m = load_manifest(out)
    assert m is None or m.get("complete") is not True
    n_after_first_kill = len(final_shards(out))

    # resume, and kill again later (resume of a resume); it may finish first, that's fine
    _run_and_kill(src, out, shard_size, min_shards=n_after_first_kill + 40)
    # resume to completion
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", shard_size, workers=1))

    ref = tmp_path / "reference"
    check_ok(run_fineweb("--source", src, "--path", ref, "--shard_size", shard_size, workers=1))
    names = final_shards(ref)
    assert final_shards(out) == names
    assert len(names) > n_after_first_kill
    for n in names:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), f"{n} differs after resume"
    mo, mr = load_manifest(out), load_manifest(ref)
    assert mo["complete"] is True and mr["complete"] is True
    assert mo["shards"] == mr["shards"]
    assert mo["tokens"] == mr["tokens"] and mo["documents"] == mr["documents"]
    assert not [n for n in os.listdir(out) if "tmp" in n.lower()], os.listdir(out)


KILL_WORKER = """
import os, signal, sys, time
import fineweb
tokenize = fineweb.tokenize
first_shard = os.path.join(sys.argv[sys.argv.index("--path") + 1], "src_val_000000.npy")
def tokenize_or_die(batch):  # a worker killed (as the kernel's OOM killer would) at one document
    if any("KILL THIS WORKER" in d for d in batch):
        t0 = time.time()
        while not os.path.exists(first_shard) and time.time() - t0 < 20:  # once a shard is finished
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return tokenize(batch)
fineweb.tokenize = tokenize_or_die
sys.exit(fineweb.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_fineweb_killed_worker_is_an_error_not_a_hang(tmp_path, workers):
    """A tokenizer process that dies mid-run ends the run with one clear line (multiprocessing.Pool
    would wait forever for its result); the finished shards are kept, and running the command
    again completes a dataset byte-identical to one never interrupted."""
    docs = synth_docs(40, 400, seed=11)
    src = write_txt_dir(tmp_path / "src", docs[:30] + ["KILL THIS WORKER " + docs[30]] + docs[31:])
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["--source", src, "--path", out, "--shard_size", 1024, "--start_method", "fork", "--workers", workers]
    proc = subprocess.run([sys.executable, "-c", KILL_WORKER, *map(str, args)], cwd=REPO_ROOT,
                          env=os.environ.copy(), capture_output=True, text=True, timeout=60)
    assert_clean_error(proc, "killed by signal 9", "run the same command again")
    m = load_manifest(out)
    assert m is not None and m["complete"] is False
    assert [s["name"] for s in m["shards"]] == final_shards(out) != []  # finished shards kept, and recorded
    _check_final_shards_valid(out, 1024, set())

    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1024))  # the marker stays: it is text
    check_ok(run_fineweb("--source", src, "--path", ref, "--shard_size", 1024, workers=1))
    assert final_shards(out) == final_shards(ref)
    for n in final_shards(ref):
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    assert load_manifest(out)["shards"] == load_manifest(ref)["shards"]


# ----------------------------------------------------------------------------------------------
# fineweb.py: bad input
# ----------------------------------------------------------------------------------------------

def assert_clean_error(proc, *must_contain):
    """Exit 2, exactly one 'error:' line on stderr naming the thing, no traceback."""
    assert proc.returncode == 2, f"rc={proc.returncode}\nstderr:{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    err_lines = [l for l in lines if l.startswith("error:")]
    assert len(err_lines) == 1, f"expected one 'error:' line, got stderr:\n{proc.stderr}"
    for s in must_contain:
        assert s in err_lines[0], f"{s!r} not in {err_lines[0]!r}"
    return err_lines[0]


def test_fineweb_error_missing_source(tmp_path):
    """A missing source path exits 2 with one 'error:' line naming the path."""
    missing = tmp_path / "does_not_exist_xyz"
    proc = run_fineweb("--source", missing, "--path", tmp_path / "out", "--shard_size", 100)
    assert_clean_error(proc, "does_not_exist_xyz")


@pytest.mark.parametrize("existing", [False, True])
def test_fineweb_error_empty_source(tmp_path, existing):
    """A source that holds no text (an empty .jsonl) exits 2 with one line, and marks nothing complete;
    the output directory (and its parent) it made are gone again, one that was there is kept."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jsonl").write_text("")
    out = tmp_path / "data" / "out"
    if existing:
        out.mkdir(parents=True)
    assert_clean_error(run_fineweb("--source", src, "--path", out, "--shard_size", 100), "no text")
    assert not (out / "manifest.json").exists()
    if existing:
        assert out.is_dir() and not list(out.iterdir())
    else:
        assert not (tmp_path / "data").exists()


# FineWebEdu from a Hub that cannot be reached (this machine may be offline or not: each case
# makes its own unreachable Hub with HF_ENDPOINT, and HF_HOME is empty, so nothing is cached)

class _Hub:
    """A Hub endpoint for one test: a closed port, a host that never resolves, a server that
    accepts connections and never answers, or one that answers every request with 404."""

    def __init__(self, kind):
        import socket
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.kind, self.requests, self._close = kind, [], lambda: None
        if kind == "unresolvable":
            self.url = "http://hub.invalid"  # .invalid never resolves (RFC 6761)
        elif kind in ("refused", "silent"):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            if kind == "refused":
                sock.close()
            else:
                sock.listen(16)  # the kernel completes the handshakes; nothing ever answers
                self._close = sock.close
        elif kind == "answers_404":
            requests = self.requests

            class NotFound(BaseHTTPRequestHandler):
                def do_HEAD(self):
                    requests.append(f"{self.command} {self.path}")
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                do_GET = do_HEAD

                def log_message(self, *args):
                    pass

            server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.url = f"http://127.0.0.1:{server.server_address[1]}"
            self._close = lambda: (server.shutdown(), server.server_close())
        else:  # the real Hub, for a machine that cannot reach it (this one)
            self.url = None

    def close(self):
        self._close()


def run_fineweb_from_hub(tmp_path, hub, *args, offline=False):
    """fineweb.py streaming FineWebEdu (its default source) from `hub`, with an empty HF cache and
    no offline mode (conftest sets HF_HUB_OFFLINE for the tests) unless `offline`; (proc, seconds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE",
                        "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path / "empty_hf_home")
    if hub.url:
        env["HF_ENDPOINT"] = hub.url
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "fineweb.py", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - t0


def _hub_reachable():
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["unresolvable", "refused", "silent", "offline_mode", "this_machine"])
def test_fineweb_unreachable_hub_is_one_line_at_once_and_leaves_nothing(tmp_path, kind):
    """Streaming FineWebEdu from a Hub that cannot be reached (no DNS, connection refused, no
    answer, HF_HUB_OFFLINE set, or this offline machine) ends within seconds, not after ~25 s of
    `datasets` retry lines: exit 2, one 'error:' line and nothing else on stderr, and no output
    directory (nor its parent) left behind."""
    if kind == "this_machine" and _hub_reachable():
        pytest.skip("this machine reaches the Hub (the other cases make their own unreachable one)")
    hub = _Hub(kind)
    try:
        out = tmp_path / "data" / "small"
        proc, seconds = run_fineweb_from_hub(tmp_path, hub, "--path", out, "--max_tokens", 1000,
                                             "--shard_size", 500, offline=kind == "offline_mode")
    finally:
        hub.close()
    line = assert_clean_error(proc, "HuggingFaceFW/fineweb-edu", "--source")
    assert proc.stderr.strip().splitlines() == [line], proc.stderr  # no retry lines, no progress bar
    assert seconds < 15, f"took {seconds:.1f} s"
    assert not (tmp_path / "data").exists(), os.listdir(tmp_path / "data")


def test_fineweb_unreachable_hub_keeps_an_existing_output_dir(tmp_path):
    """An output directory that was there before a failed run is kept, with what it holds."""
    hub = _Hub("refused")
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    for out in (empty, used):
        proc, _ = run_fineweb_from_hub(tmp_path, hub, "--path", out, "--max_tokens", 1000)
        assert_clean_error(proc, "cannot reach")
    assert empty.is_dir() and not list(empty.iterdir())
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


def test_fineweb_reachable_hub_is_streamed_from(tmp_path):
    """The quick look at the Hub lets a Hub that answers through: here one that answers 404 to
    everything, so load_dataset itself is what fails (at once: a 404 is not retried)."""
    hub = _Hub("answers_404")
    try:
        proc, seconds = run_fineweb_from_hub(tmp_path, hub, "--path", tmp_path / "out", "--max_tokens", 1000)
    finally:
        hub.close()
    line = assert_clean_error(proc, "cannot stream HuggingFaceFW/fineweb-edu")
    assert "cannot reach" not in line
    assert "HEAD /api/datasets/HuggingFaceFW/fineweb-edu" in hub.requests, hub.requests  # the probe
    assert len(hub.requests) > 1, hub.requests  # and load_dataset's own requests after it
    assert not (tmp_path / "out").exists()


def test_fineweb_complete_hub_dataset_reruns_offline(tmp_path):
    """Re-running the command of a finished FineWebEdu dataset asks nothing of the Hub: offline it
    is 'already complete' (exit 0), as before the Hub was looked at first."""
    src = write_txt_dir(tmp_path / "src", synth_docs(8, 100, seed=14))
    out = tmp_path / "data" / "small"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 500, "--max_tokens", 1000,
                         "--prefix", "edufineweb"))
    m = load_manifest(out)  # made as if streamed: the Hub's settings
    m.update(source="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT")
    (out / "manifest.json").write_text(json.dumps(m))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    hub = _Hub("refused")
    proc, _ = run_fineweb_from_hub(tmp_path, hub, "--path", out, "--shard_size", 500, "--max_tokens", 1000)
    check_ok(proc)
    assert "already complete" in proc.stdout, proc.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# The shards' prefix follows the source

def test_fineweb_default_prefix_names():
    """edufineweb for FineWebEdu; local data is named after its source, in characters a shard
    name can hold and never with a split name as a word."""
    from fineweb import HF_DATASET, SPLIT_IN_PREFIX, default_prefix

    assert default_prefix(HF_DATASET) == "edufineweb"
    assert default_prefix(str(REPO_ROOT.parent / "shared" / "corpus")) == "corpus"
    assert default_prefix("../shared/corpus/") == "corpus"
    assert default_prefix("data/my_train set/*.jsonl") == "my-train-set"
    assert default_prefix("data/**/*.parquet") == "data"
    assert default_prefix("*.txt") == "text"
    assert default_prefix(".hidden_val") == "hidden-val"
    assert default_prefix(str(REPO_ROOT / "requirements.txt")) == "requirements"  # a file: its extension dropped
    for name in ["my_train data", "x_val", "..", "/", "日本語", "a_train_b_val"]:
        prefix = default_prefix(name)
        assert prefix and not SPLIT_IN_PREFIX.search(prefix) and not prefix.startswith("."), (name, prefix)


def test_fineweb_prefix_follows_a_local_source(tmp_path):
    """Local text is not named edufineweb: a directory named notes gives notes_*.npy (a glob in it
    or a .jsonl named after it too), recorded in manifest.json, and data.py loads them."""
    from data import DataLoader

    docs = synth_docs(12, 150, seed=12)
    notes = write_txt_dir(tmp_path / "notes", docs)
    (tmp_path / "notes.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    outs = {source: tmp_path / f"out{i}" for i, source in enumerate([notes, notes / "*.txt", tmp_path / "notes.jsonl"])}
    for source, out in outs.items():
        check_ok(run_fineweb("--source", source, "--path", out, "--shard_size", 512))
        names = sorted(os.listdir(out))
        assert names[-1] == "notes_val_000000.npy" and len(names) >= 4, names
        assert all(n.startswith("notes_") for n in names if n.endswith(".npy")), names
        assert load_manifest(out)["prefix"] == "notes"
        train = DataLoader(str(out), "train", 64, 2, 128)
        assert [os.path.basename(f) for f in train.files] == [n for n in names if "_train_" in n]
        assert train.next_batch()[0].shape == (2, 64)
        assert DataLoader(str(out), "val", 64, 1, 64).num_tokens == 512
    first = {n: (outs[notes] / n).read_bytes() for n in os.listdir(outs[notes])}
    assert all((out / n).read_bytes() == b for out in outs.values() for n, b in first.items() if n.endswith(".npy"))


def test_fineweb_dataset_made_with_another_prefix_keeps_it(tmp_path):
    """A dataset of local text made before the prefix followed the source (named edufineweb_*):
    re-running its command, now without --prefix, resumes it, rebuilds it and finds it complete
    under its own names, byte-identical, never as another dataset."""
    from data import DataLoader

    src = write_txt_dir(tmp_path / "src", synth_docs(12, 150, seed=13))
    ref = tmp_path / "ref"
    check_ok(run_fineweb("--source", src, "--path", ref, "--shard_size", 512, "--prefix", "edufineweb"))
    names = final_shards(ref, "edufineweb")
    assert len(names) >= 5 and load_manifest(ref)["prefix"] == "edufineweb"

    interrupted = Path(shutil.copytree(ref, tmp_path / "interrupted"))  # as if stopped after 3 shards
    m = load_manifest(interrupted)
    m.update(complete=False, shards=m["shards"][:3])
    (interrupted / "manifest.json").write_text(json.dumps(m))
    for n in names[3:]:
        (interrupted / n).unlink()
    damaged = Path(shutil.copytree(ref, tmp_path / "damaged"))  # complete, one shard deleted since
    (damaged / names[2]).unlink()
    complete = Path(shutil.copytree(ref, tmp_path / "complete"))

    for out in (interrupted, damaged, complete):
        proc = run_fineweb("--source", src, "--path", out, "--shard_size", 512)
        check_ok(proc)
        assert ("already complete" in proc.stdout) == (out == complete), proc.stdout
        assert sorted(os.listdir(out)) == sorted(os.listdir(ref)), os.listdir(out)
        for n in os.listdir(ref):
            assert (out / n).read_bytes() == (ref / n).read_bytes(), (out, n)
        assert DataLoader(str(out), "train", 64, 2, 128).num_tokens == load_manifest(ref)["tokens"] - 512
    # an explicit --prefix that is not the dataset's is another dataset, as before
    assert_clean_error(run_fineweb("--source", src, "--path", complete, "--shard_size", 512, "--prefix", "src"),
                       "prefix")


def test_fineweb_error_source_shrunk_before_a_resume(tmp_path):
    """Resuming after the source lost documents: one line saying so; the finished shards are kept."""
    src = write_txt_dir(tmp_path / "src", synth_docs(12, 100, seed=7))
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 600))
    shards = sorted(out.glob("*.npy"), key=lambda p: p.name[-10:])  # by index: val_000000 first
    assert len(shards) >= 3
    shards[-1].unlink()  # the rerun rebuilds from here, after skipping the documents before it
    for f in sorted(src.iterdir())[2:]:
        f.unlink()
    kept = {p.name: p.read_bytes() for p in shards[:-1]}
    assert_clean_error(run_fineweb("--source", src, "--path", out, "--shard_size", 600), "fewer")
    assert {p.name: p.read_bytes() for p in shards[:-1]} == kept


def _disk_of(limit_bytes):
    """preexec_fn: files may not grow past limit_bytes (EFBIG, as a full disk's ENOSPC would fail a write)."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return limit


def test_fineweb_full_disk_is_one_line_and_a_rerun_finishes(tmp_path):
    """A write that fails for space ends the run with one error line; the same command afterwards
    (with room) gives the dataset of an uninterrupted run."""
    src = write_txt_dir(tmp_path / "src", synth_docs(30, 100, seed=8))
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "fineweb.py", "--source", str(src), "--path", str(out), "--shard_size", "1500",
           "--workers", "2"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_disk_of(3000),
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # (a capped .pyc would be torn)
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 1500))
    check_ok(run_fineweb("--source", src, "--path", ref, "--shard_size", 1500))
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == {p.name: p.read_bytes() for p in ref.glob("*.npy")}


def test_fineweb_error_tokenizer_unavailable(tmp_path, monkeypatch):
    """No BPE file in the cache and no network: one 'error:' line about the tokenizer, no shards."""
    src = write_txt_dir(tmp_path / "src", ["some text"])
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no download, even on a machine with internet
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    proc = run_fineweb("--source", src, "--path", tmp_path / "out", "--shard_size", 100)
    assert_clean_error(proc, "tokenizer", "TIKTOKEN_CACHE_DIR")
    assert not list((tmp_path / "out").glob("*.npy"))


def test_fineweb_refuses_a_vocabulary_too_big_for_uint16(monkeypatch):
    """Shards are uint16: a tokenizer whose ids can reach 2**16 is refused with a clear message."""
    import tiktoken

    import cli
    import fineweb

    class Big:  # what cl100k_base would be: 100,277 ids
        name, n_vocab = "cl100k_base", 100277

    monkeypatch.setattr(fineweb, "_encoder", None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: Big())
    with pytest.raises(cli.Error, match="100,277 tokens.*uint16"):
        fineweb.init_worker()


def test_fineweb_error_jsonl_missing_field(tmp_path):
    """A .jsonl record without the text field exits 2 naming the file and the line number."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "records.jsonl", "w") as f:
        f.write(json.dumps({"text": "first doc"}) + "\n")
        f.write(json.dumps({"text": "second doc"}) + "\n")
        f.write(json.dumps({"body": "no text field here"}) + "\n")
        f.write(json.dumps({"text": "fourth doc"}) + "\n")
    proc = run_fineweb("--source", src, "--path", tmp_path / "out", "--shard_size", 100)
    line = assert_clean_error(proc, "records.jsonl")
    assert re.search(r"(?<!\d)3(?!\d)", line.replace("records.jsonl", "")), line


def test_fineweb_error_malformed_json(tmp_path):
    """A malformed JSON line exits 2 naming the file and the line number."""
    src = tmp_path / "broken.jsonl"
    src.write_text('{"text": "ok 1"}\n{"text": "ok 2"}\n{"text": "ok 3"}\n{"text": "oops\n{"text": "ok 5"}\n')
    proc = run_fineweb("--source", src, "--path", tmp_path / "out", "--shard_size", 100)
    line = assert_clean_error(proc, "broken.jsonl")
    assert re.search(r"(?<!\d)4(?!\d)", line.replace("broken.jsonl", "")), line


def test_fineweb_error_output_dir_for_other_source(tmp_path):
    """Writing into a directory whose manifest is for another source or other settings exits 2 naming the directory."""
    a = write_txt_dir(tmp_path / "src_a", synth_docs(5, 50, seed=9))
    b = write_txt_dir(tmp_path / "src_b", synth_docs(5, 50, seed=10))
    out = tmp_path / "shared_out_dir"
    check_ok(run_fineweb("--source", a, "--path", out, "--shard_size", 200))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_fineweb("--source", b, "--path", out, "--shard_size", 200)
    assert_clean_error(proc, "shared_out_dir")
    proc = run_fineweb("--source", a, "--path", out, "--shard_size", 300)
    assert_clean_error(proc, "shared_out_dir")
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # nothing was overwritten


# ----------------------------------------------------------------------------------------------
# data.py: DataLoader
# ----------------------------------------------------------------------------------------------

T = 16  # seq_len for the loader tests
TRAIN_LENS = [5 * T + 1, 3 * T + 1 + 7, 4 * T + 1, 6 * T + 1 + 3]  # 5, 3, 4, 6 windows (+ leftovers)
N_WIN = sum((n - 1) // T for n in TRAIN_LENS)  # 18 windows per epoch


def shard_values(s, n):
    """Distinct token values per shard and position (a window's first token identifies it)."""
    return ((np.arange(n) + 7000 * s + 11) % 50000).astype(np.uint16)


@pytest.fixture
def train_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for s, n in enumerate(TRAIN_LENS):
        np.save(d / f"toy_train_{s + 1:06d}.npy", shard_values(s, n))
    # val shards: written out of name order on purpose
    np.save(d / "toy_val_000001.npy", shard_values(20, 3 * T + 1))
    np.save(d / "toy_val_000000.npy", shard_values(10, 4 * T + 5))
    return d


def window_ids(x):
    """Map each row of x to (shard, window index) using the first token."""
    ids = []
    for row in x.tolist():
        v = row[0]
        s = (v - 11) // 7000
        start = (v - 11) % 7000
        assert start % T == 0, f"window does not start on a seq_len boundary: {row[:3]}"
        ids.append((s, start // T))
    return ids


def check_xy(x, y, B):
    """Shapes/dtypes are right and x, y are exactly shard[start:start+T], shard[start+1:start+T+1]."""
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == (B, T) and y.shape == (B, T)
    for (s, i), xr, yr in zip(window_ids(x), x.tolist(), y.tolist()):
        data = shard_values(s, TRAIN_LENS[s] if s < len(TRAIN_LENS) else 10 ** 4).astype(np.int64)
        assert xr == data[i * T:i * T + T].tolist()
        assert yr == data[i * T + 1:i * T + T + 1].tolist()
        assert xr[1:] == yr[:-1]


def global_batches(path, steps, B, world, total, seed=0, split="train"):
    """Simulate `world` ranks; return the global batch (x, y) of each optimizer step, in stream order."""
    from data import DataLoader

    loaders = [DataLoader(str(path), split, T, B, total, rank=r, world_size=world, seed=seed) for r in range(world)]
    accum = loaders[0].grad_accum_steps
    assert accum == total // (T * B * world)
    out = []
    for _ in range(steps):
        xs, ys = [], []
        for m in range(accum):
            for r in range(world):  # stream order: (m * world + r) * B
                x, y = loaders[r].next_batch()
                check_xy(x, y, B)
                xs.append(x)
                ys.append(y)
        out.append((torch.cat(xs), torch.cat(ys)))
    return out


def test_loader_global_batch_independent_of_layout(train_dir):
    """The global batch of each step is the same for any (world_size, micro_batch) split, across epochs."""
    total = 8 * T  # 8 windows per step; 18 windows per epoch -> steps straddle epoch boundaries
    steps = 7
    ref = global_batches(train_dir, steps, B=4, world=1, total=total)  # accum 2
    for B, world in [(8, 1), (4, 2), (2, 2), (1, 4)]:
        got = global_batches(train_dir, steps, B=B, world=world, total=total)
        for k in range(steps):
            assert torch.equal(got[k][0], ref[k][0]), f"step {k} x differs for B={B} world={world}"
            assert torch.equal(got[k][1], ref[k][1]), f"step {k} y differs for B={B} world={world}"


def _stream(path, n_windows, seed=0):
    """The first n_windows of the train stream as (shard, window) ids."""
    steps = -(-n_windows // 6)
    batches = global_batches(path, steps, B=6, world=1, total=6 * T, seed=seed)
    ids = [w for x, _ in batches for w in window_ids(x)]
    return ids[:n_windows]


def test_loader_epochs_cover_every_window_once(train_dir):
    """Each epoch visits every window exactly once, shard by shard; epochs differ; seeds differ."""
    epochs = 4
    ids = _stream(train_dir, epochs * N_WIN, seed=0)
    all_windows = {(s, i) for s, n in enumerate(TRAIN_LENS) for i in range((n - 1) // T)}
    per_epoch = [ids[e * N_WIN:(e + 1) * N_WIN] for e in range(epochs)]
    shard_orders = set()
    for e, ep in enumerate(per_epoch):
        assert len(set(ep)) == N_WIN and set(ep) == all_windows, f"epoch {e} does not cover each window once"
        # shards are visited one after another (windows of a shard are contiguous within the epoch)
        shard_seq = [s for s, _ in ep]
        runs = [s for j, s in enumerate(shard_seq) if j == 0 or shard_seq[j - 1] != s]
        assert sorted(runs) == list(range(len(TRAIN_LENS))), f"epoch {e} shard order {runs}"
        shard_orders.add(tuple(runs))
    assert len(shard_orders) > 1, "the shard order is never reshuffled between epochs"
    assert per_epoch[1] != per_epoch[0]
    assert len({tuple(ep) for ep in per_epoch}) == epochs
    # windows are shuffled within shards (not always file order)
    within = [[i for s2, i in ep if s2 == s] for ep in per_epoch for s in range(len(TRAIN_LENS))]
    assert any(w != sorted(w) for w in within), "windows are never shuffled within a shard"
    # a different seed gives a different order, the same seed the same order
    assert _stream(train_dir, 2 * N_WIN, seed=1) != ids[:2 * N_WIN]
    assert _stream(train_dir, 2 * N_WIN, seed=0) == ids[:2 * N_WIN]


def test_loader_attributes_and_reset(train_dir):
    """num_tokens counts the split's tokens; grad_accum_steps is right; reset() restarts the stream."""
    from data import DataLoader

    ld = DataLoader(str(train_dir), "train", T, 2, 8 * T, seed=3)
    assert ld.num_tokens == sum(TRAIN_LENS)
    assert ld.grad_accum_steps == 4
    first = [ld.next_batch() for _ in range(25)]  # past one epoch (18 windows = 9 batches)
    ld.reset()
    again = [ld.next_batch() for _ in range(25)]
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    val = DataLoader(str(train_dir), "val", T, 2, 2 * T)
    assert val.num_tokens == (4 * T + 5) + (3 * T + 1)


@pytest.mark.parametrize("consumed", [0, 3, 5, 13])
def test_loader_state_dict_roundtrip(train_dir, consumed):
    """A new loader given state_dict() continues with exactly the next batches (also mid-accumulation)."""
    from data import DataLoader

    def make():
        return DataLoader(str(train_dir), "train", T, 2, 8 * T, rank=1, world_size=2, seed=5)  # accum 2

    a = make()
    for _ in range(consumed):
        a.next_batch()
    sd = a.state_dict()
    assert isinstance(sd, dict)

    def leaves(o):
        if isinstance(o, dict):
            for k, v in o.items():
                assert isinstance(k, str)
                yield from leaves(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from leaves(v)
        else:
            yield o

    assert all(type(v) in (int, str, bool) or v is None for v in leaves(sd)), sd
    sd = json.loads(json.dumps(sd))  # survives a JSON round trip (e.g. saved in a checkpoint)
    b = make()
    b.next_batch()  # b's own position must be overwritten by load_state_dict
    b.load_state_dict(sd)
    for i in range(12):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {i} after restore differs"


def test_loader_val_in_order_and_repeatable(train_dir):
    """val: windows in file order, shards in name order, identical batches after reset()."""
    from data import DataLoader

    v0 = shard_values(10, 4 * T + 5).astype(np.int64)  # 4 windows
    v1 = shard_values(20, 3 * T + 1).astype(np.int64)  # 3 windows
    expected = [(v0, i) for i in range(4)] + [(v1, i) for i in range(3)]
    ld = DataLoader(str(train_dir), "val", T, 1, T)
    got = [ld.next_batch() for _ in range(7)]
    for (x, y), (data, i) in zip(got, expected):
        assert x.shape == (1, T) and x.dtype == torch.int64
        assert x[0].tolist() == data[i * T:i * T + T].tolist()
        assert y[0].tolist() == data[i * T + 1:i * T + T + 1].tolist()
    ld.reset()
    again = [ld.next_batch() for _ in range(7)]
    for (x1, y1), (x2, y2) in zip(got, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a fresh loader with a different seed gives the same val batches
    other = DataLoader(str(train_dir), "val", T, 1, T, seed=123)
    for x1, _ in got:
        assert torch.equal(other.next_batch()[0], x1)


def test_loader_on_fineweb_output(tmp_path, enc):
    """End to end: DataLoader reads fineweb.py's shards; the val batch is the val shard's first tokens."""
    from data import DataLoader

    src = write_txt_dir(tmp_path / "src", synth_docs(12, 150, seed=11))
    out = tmp_path / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 512))
    val = np.load(out / "src_val_000000.npy").astype(np.int64)
    ld = DataLoader(str(out), "val", 64, 2, 128)
    x, y = ld.next_batch()
    assert x.flatten()[:64].tolist() == val[:64].tolist()
    assert x[0, 0].item() == EOT
    tr = DataLoader(str(out), "train", 64, 2, 256)
    assert tr.num_tokens == sum(len(np.load(out / n)) for n in final_shards(out) if "_train_" in n)
    x, y = tr.next_batch()
    assert x.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])


# ----------------------------------------------------------------------------------------------
# data.py: bad shards and bad settings
# ----------------------------------------------------------------------------------------------

def _bad_shard(d, kind):
    name = f"bad-{kind}_train_000001.npy"
    p = d / name
    if kind == "truncated":
        np.save(p, np.arange(10 * T, dtype=np.uint16))
        b = p.read_bytes()
        p.write_bytes(b[:-37])
    elif kind == "float32":
        np.save(p, np.arange(10 * T, dtype=np.float32))
    elif kind == "int32":
        np.save(p, np.arange(10 * T, dtype=np.int32))
    elif kind == "pickled":
        arr = np.empty(10 * T, dtype=object)
        arr[:] = list(range(10 * T))
        np.save(p, arr, allow_pickle=True)
    elif kind == "too_short":
        np.save(p, np.arange(T, dtype=np.uint16))  # T tokens < T + 1
    elif kind == "two_dim":
        np.save(p, np.arange(10 * T, dtype=np.uint16).reshape(10, T))
    elif kind == "garbage":
        p.write_bytes(b"this is not a numpy file at all" * 10)
    elif kind == "header_only":
        np.save(p, np.arange(10 * T, dtype=np.uint16))
        p.write_bytes(p.read_bytes()[:128])
    return name


@pytest.mark.parametrize("kind", ["truncated", "float32", "int32", "pickled", "too_short", "two_dim",
                                  "garbage", "header_only"])
def test_loader_bad_shard_raises_dataerror(tmp_path, kind):
    """A broken shard (truncated, wrong dtype, pickled, too short, 2-D, not .npy) -> cli.Error naming the file."""
    import cli
    from data import DataLoader

    assert issubclass(cli.Error, ValueError)
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "good_train_000000.npy", np.arange(10 * T, dtype=np.uint16))
    name = _bad_shard(d, kind)
    with pytest.raises(cli.Error) as ei:
        DataLoader(str(d), "train", T, 2, 4 * T)
    assert name in str(ei.value)


def test_loader_missing_dir_and_no_shards(tmp_path):
    """Missing directory -> cli.Error naming it; no shards for the split -> cli.Error naming dir and split."""
    import cli
    from data import DataLoader

    missing = tmp_path / "no_such_dir_abc"
    with pytest.raises(cli.Error) as ei:
        DataLoader(str(missing), "train", T, 2, 4 * T)
    assert "no_such_dir_abc" in str(ei.value)

    d = tmp_path / "only_val_dir"
    d.mkdir()
    np.save(d / "toy_val_000000.npy", np.arange(10 * T, dtype=np.uint16))
    with pytest.raises(cli.Error) as ei:
        DataLoader(str(d), "train", T, 2, 4 * T)
    assert "only_val_dir" in str(ei.value) and "train" in str(ei.value)


@pytest.mark.parametrize("total,B,world", [(100 * T + 8, 4, 1), (12 * T, 4, 2), (8 * T, 4, 3), (2 * T, 4, 1)])
def test_loader_bad_batch_sizes(train_dir, total, B, world):
    """total_batch_size not divisible by seq_len * micro_batch * world_size -> cli.Error mentioning the numbers."""
    import cli
    from data import DataLoader

    with pytest.raises(cli.Error) as ei:
        DataLoader(str(train_dir), "train", T, B, total, rank=0, world_size=world)
    msg = str(ei.value)
    assert str(total) in msg, msg


# ----------------------------------------------------------------------------------------------
# shards are never trusted blindly: split names, manifest.json at open and on re-run, --verify, token ids
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source, dataset) of one fineweb.py run: a val shard and 4+ train shards of 512 tokens."""
    tmp = tmp_path_factory.mktemp("built")
    src = write_txt_dir(tmp / "src", synth_docs(12, 150, seed=11))
    out = tmp / "out"
    check_ok(run_fineweb("--source", src, "--path", out, "--shard_size", 512))
    assert len(final_shards(out)) >= 5
    return src, out


@pytest.fixture
def dataset(built, tmp_path):
    """A fresh copy of the built dataset, to damage."""
    return Path(shutil.copytree(built[1], tmp_path / "data"))


def rebuild(built, out):
    return run_fineweb("--source", built[0], "--path", out, "--shard_size", 512)


def verify(out):
    return run_fineweb("--verify", "--path", out, workers=None)


def damage(path, kind):
    """Delete a shard, cut bytes off its end or add some, rewrite it (a valid .npy) with fewer tokens,
    or put in its place a FIFO or a link to a copy of it outside its directory (the same bytes)."""
    if kind == "deleted":
        path.unlink()
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "link_out":
        outside = path.parent.parent / f"outside-{path.name}"
        shutil.copyfile(path, outside)
        path.unlink()
        path.symlink_to(outside)
    elif kind == "cut":
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "appended":
        path.write_bytes(path.read_bytes() + bytes(64))
    elif kind == "fewer_tokens":
        np.save(path, np.load(path)[:-5])


def test_loader_names_val_and_train_exactly(tmp_path):
    """A split is matched by the exact name <prefix>_<split>_NNNNNN.npy: val never leaks into train
    (or back) through a prefix, and look-alike files are not shards."""
    import cli
    from data import DataLoader

    d = tmp_path / "names"
    d.mkdir()
    np.save(d / "val_train_000001.npy", shard_values(0, 5 * T + 1))  # prefix 'val': a train shard
    np.save(d / "train_val_000000.npy", shard_values(1, 3 * T + 1))  # prefix 'train': a val shard
    for junk in ["x_train_1.npy", "toy_train_000002_copy.npy", "toy_train_000003.npy.bak", ".tmp-toy_train_000004.npy"]:
        np.save(d / "tmp.npy", shard_values(2, 4 * T + 1))
        os.replace(d / "tmp.npy", d / junk)
    assert DataLoader(str(d), "train", T, 1, T).num_tokens == 5 * T + 1
    assert DataLoader(str(d), "val", T, 1, T).num_tokens == 3 * T + 1

    # a prefix holding a split name is refused, whichever split is asked for
    for name in ["my_train_data_val_000000.npy", "my_val_data_train_000001.npy", "data_val_train_000001.npy"]:
        bad = tmp_path / name.replace(".npy", "")
        shutil.copytree(d, bad)
        np.save(bad / name, shard_values(3, 4 * T + 1))
        for split in ("train", "val"):
            with pytest.raises(cli.Error, match=re.escape(name)):
                DataLoader(str(bad), split, T, 1, T)


@pytest.mark.parametrize("prefix", ["my_val_data", "my_train_data", "data_train", "x_val"])
def test_fineweb_refuses_prefix_with_a_split_name(tmp_path, prefix):
    """A --prefix holding _train or _val as a word would name shards the loader cannot split: refused, nothing written."""
    src = write_txt_dir(tmp_path / "src", synth_docs(3, 50, seed=1))
    proc = run_fineweb("--source", src, "--path", tmp_path / "out", "--shard_size", 100, "--prefix", prefix)
    assert_clean_error(proc, repr(prefix), "--prefix")
    assert not (tmp_path / "out").exists()


class no_hang:
    """Fail, instead of hanging, where the body is still running after `seconds` (a FIFO opened for reading
    waits for a writer forever; SIGALRM interrupts the open)."""

    def __init__(self, seconds=20):
        self.seconds = seconds

    def __enter__(self):
        def timeout(*_):
            raise TimeoutError(f"still waiting after {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


@pytest.mark.parametrize("kind", ["deleted", "cut", "appended", "fewer_tokens", "fifo", "link_out"])
def test_loader_checks_shards_against_manifest(dataset, kind):
    """With a manifest, a deleted or truncated shard is a cli.Error naming it, not a smaller dataset;
    so is a FIFO in its place (at once: never opened) or a link to a copy outside the directory."""
    import cli
    from data import DataLoader

    name = final_shards(dataset)[2]
    damage(dataset / name, kind)
    with no_hang(), pytest.raises(cli.Error, match=re.escape(name)) as ei:
        DataLoader(str(dataset), "train", T, 1, T)
    if kind in ("deleted", "fewer_tokens", "fifo", "link_out"):  # a cut or grown file is no whole .npy, manifest or not
        assert "manifest.json" in str(ei.value)
    assert {"fifo": "not a regular file", "link_out": "outside"}.get(kind, "") in str(ei.value)
    assert DataLoader(str(dataset), "val", T, 1, T).num_tokens == 512  # the val split is intact


def test_loader_complete_manifest_lists_every_shard(dataset):
    """A shard on disk that a complete manifest does not list is refused."""
    import cli
    from data import DataLoader

    stray = "src_train_000099.npy"
    np.save(dataset / stray, shard_values(0, 4 * T + 1))
    with pytest.raises(cli.Error, match=stray):
        DataLoader(str(dataset), "train", T, 1, T)
    assert DataLoader(str(dataset), "val", T, 1, T).num_tokens == 512


def one_line_error(fn):
    """The message of the cli.Error that fn() raises, checked to be one line."""
    import cli

    with no_hang(), pytest.raises(cli.Error) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def test_loader_refuses_an_incomplete_dataset(dataset, tmp_path):
    """A manifest that says complete: false (fineweb.py still writing, or stopped) is refused with one line
    naming fineweb.py, by the loader and by train.py, for either split: trained on, its shards so far would
    be the data, and a --resume once the dataset is finished would meet other data."""
    import conftest
    from data import DataLoader

    m = load_manifest(dataset)
    m["complete"] = False
    m["shards"] = m["shards"][:-1]  # as fineweb.py leaves it, mid-run
    (dataset / "manifest.json").write_text(json.dumps(m))
    for split in ("train", "val"):
        msg = one_line_error(lambda: DataLoader(str(dataset), split, T, 1, T))
        assert "incomplete" in msg and "complete: false" in msg and "fineweb.py" in msg, msg
        assert "stopped" in msg and str(dataset) in msg, msg
    proc = conftest.run_train(*conftest.base_args(dataset, tmp_path / "run", 2))
    line = conftest.error_line(proc)
    assert "incomplete" in line and "fineweb.py" in line, line


OUTSIDE = "../ok/x_train_000001.npy"  # a valid shard, outside the dataset's directory
EDITS = {  # manifest.json edited by hand -> (the field the error names, how)
    "tokens_text": ("shards[2].tokens", lambda m: m["shards"][2].update(tokens="40000x")),
    "tokens_null": ("shards[2].tokens", lambda m: m["shards"][2].update(tokens=None)),
    "tokens_negative": ("shards[2].tokens", lambda m: m["shards"][2].update(tokens=-512)),
    "tokens_bool": ("shards[2].tokens", lambda m: m["shards"][2].update(tokens=True)),
    "tokens_float": ("shards[2].tokens", lambda m: m["shards"][2].update(tokens=512.0)),
    "tokens_missing": ("shards[2].tokens", lambda m: m["shards"][2].pop("tokens")),
    "name_int": ("shards[2].name", lambda m: m["shards"][2].update(name=5)),
    "name_outside": ("shards[2].name", lambda m: m["shards"][2].update(name=OUTSIDE)),
    "name_absolute": ("shards[2].name", lambda m: m["shards"][2].update(name="ABSOLUTE")),
    "name_subdir": ("shards[2].name", lambda m: m["shards"][2].update(name="sub/src_train_000002.npy")),
    "name_twice": ("shards[3].name", lambda m: m["shards"].__setitem__(3, m["shards"][2])),
    "split_wrong": ("shards[2].split", lambda m: m["shards"][2].update(split="val")),
    "sha256_int": ("shards[2].sha256", lambda m: m["shards"][2].update(sha256=7)),
    "shard_not_object": ("shards[2]", lambda m: m["shards"].__setitem__(2, "src_train_000002.npy")),
    "shards_not_list": ("shards", lambda m: m.update(shards={"src_train_000002.npy": 512})),
    "complete_text": ("complete", lambda m: m.update(complete="yes")),
    "total_text": ("tokens", lambda m: m.update(tokens="many")),
}


def edit_manifest(dataset, edit):
    """Apply EDITS[edit] to dataset's manifest.json; returns the field the error must name. A shard named
    outside the directory or in a subdirectory is there, valid and of the listed size, in place of the one
    it replaces: only its name can refuse it."""
    outside = dataset.parent / "ok" / "x_train_000001.npy"
    outside.parent.mkdir(exist_ok=True)
    name = final_shards(dataset)[2]
    if edit in ("name_outside", "name_absolute"):
        os.replace(dataset / name, outside)
    elif edit == "name_subdir":
        (dataset / "sub").mkdir()
        os.replace(dataset / name, dataset / "sub" / name)
    m = load_manifest(dataset)
    field, change = EDITS[edit]
    change(m)
    for s in m["shards"] if isinstance(m["shards"], list) else []:
        if isinstance(s, dict) and s.get("name") == "ABSOLUTE":
            s["name"] = str(outside)
    (dataset / "manifest.json").write_text(json.dumps(m))
    return field


@pytest.mark.parametrize("edit", list(EDITS))
def test_loader_refuses_a_hand_edited_manifest(built, dataset, edit):
    """Each field of manifest.json the loader reads is checked by type and shape: a bad one is one line
    naming the file and the field (not a traceback, not a size check skipped, not a file outside the
    directory read); and the same manifest is one line from fineweb.py too."""
    from data import DataLoader

    field = edit_manifest(dataset, edit)
    for split in ("train", "val"):
        msg = one_line_error(lambda: DataLoader(str(dataset), split, T, 1, T))
        assert f"{dataset / 'manifest.json'}: {field} is " in msg, msg
    if edit in ("tokens_text", "name_int", "name_outside"):
        for proc in (rebuild(built, dataset), verify(dataset)):
            assert_clean_error(proc, f"{dataset / 'manifest.json'}: {field} is ")


@pytest.mark.parametrize("kind", ["fifo", "directory", "cut_json", "deep_json"])
def test_loader_refuses_a_manifest_it_cannot_read(dataset, kind):
    """A manifest.json that is a FIFO (refused at once, never opened), a directory, cut-off JSON or JSON
    nested too deeply: one line naming it."""
    from data import DataLoader

    path = dataset / "manifest.json"
    text = path.read_text()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_text(text[: len(text) // 2] if kind == "cut_json" else "[" * 100_000)
    msg = one_line_error(lambda: DataLoader(str(dataset), "train", T, 1, T))
    assert str(path) in msg and ("not a regular file" if kind in ("fifo", "directory") else "unreadable") in msg, msg


def test_train_refuses_a_hand_edited_manifest(dataset, tmp_path):
    """Through train.py: a manifest with "tokens": "40000x" is one line naming the file and the field."""
    import conftest

    field = edit_manifest(dataset, "tokens_text")
    proc = conftest.run_train(*conftest.base_args(dataset, tmp_path / "run", 2))
    line = conftest.error_line(proc)
    assert f"manifest.json: {field} is '40000x'" in line, line


def test_loader_shards_are_regular_files_in_the_directory(train_dir, tmp_path):
    """Hand-made shards (no manifest): a FIFO named like one is refused at once, without opening it, and so
    is a link to a file outside the directory; a link to a file inside it is read as the file."""
    from data import DataLoader

    ref = DataLoader(str(train_dir), "train", T, 1, T)
    name = "toy_train_000002.npy"
    (train_dir / "sub").mkdir()
    os.replace(train_dir / name, train_dir / "sub" / "real.npy")
    (train_dir / name).symlink_to(Path("sub") / "real.npy")
    ld = DataLoader(str(train_dir), "train", T, 1, T)
    assert ld.num_tokens == ref.num_tokens and [ld.window(g).tolist() for g in range(N_WIN)] == \
        [ref.window(g).tolist() for g in range(N_WIN)]

    (train_dir / name).unlink()
    (train_dir / name).symlink_to(train_dir / "sub" / "real.npy")  # absolute, still inside
    assert DataLoader(str(train_dir), "train", T, 1, T).num_tokens == ref.num_tokens

    (train_dir / name).unlink()
    os.mkfifo(train_dir / name)
    msg = one_line_error(lambda: DataLoader(str(train_dir), "train", T, 1, T))
    assert name in msg and "not a regular file" in msg, msg

    (train_dir / name).unlink()
    os.replace(train_dir / "sub" / "real.npy", tmp_path / "real.npy")
    (train_dir / name).symlink_to(tmp_path / "real.npy")
    msg = one_line_error(lambda: DataLoader(str(train_dir), "train", T, 1, T))
    assert name in msg and "outside" in msg, msg
    assert DataLoader(str(train_dir), "val", T, 1, T).num_tokens == (4 * T + 5) + (3 * T + 1)  # val is elsewhere


def test_loader_token_out_of_vocab_raises(train_dir):
    """A token id >= vocab_size is a cli.Error naming the shard, the token and its position, raised
    by the batch that holds it (earlier batches are served)."""
    import cli
    from data import DataLoader

    pos = 2 * T + 5  # in window 2 of toy_train_000002.npy only
    tokens = shard_values(1, TRAIN_LENS[1])
    tokens[pos] = 50257
    np.save(train_dir / "toy_train_000002.npy", tokens)
    ld = DataLoader(str(train_dir), "train", T, 1, T)
    served = []
    with pytest.raises(cli.Error) as ei:
        for _ in range(N_WIN):
            served += window_ids(ld.next_batch()[0])
    msg = str(ei.value)
    assert "toy_train_000002.npy" in msg and "token 50257" in msg and f"position {pos}" in msg, msg
    assert (1, 2) not in served and len(served) < N_WIN

    ld = DataLoader(str(train_dir), "train", T, 1, T, vocab_size=50258)  # a larger vocabulary holds it
    assert len([ld.next_batch() for _ in range(N_WIN)]) == N_WIN
    ld = DataLoader(str(train_dir), "val", T, 2, 2 * T, vocab_size=1000)  # val batches are checked too
    with pytest.raises(cli.Error, match="toy_val_000000.npy.*vocab_size 1000"):
        ld.next_batch()


@pytest.mark.parametrize("kind", ["deleted", "cut", "appended", "fewer_tokens", "fifo", "link_out"])
def test_fineweb_rerun_rebuilds_a_missing_or_wrong_size_shard(built, dataset, kind):
    """Re-running a complete dataset checks each shard's size and kind: a deleted or truncated shard, a
    FIFO or a link out of the directory is reported, and it and the shards after it are rebuilt
    byte-identical, as regular files; those before are untouched."""
    names = final_shards(dataset)
    before = {n: (dataset / n).stat().st_mtime_ns for n in names}
    damage(dataset / names[2], kind)
    proc = rebuild(built, dataset)
    check_ok(proc)
    assert names[2] in proc.stdout and "rebuilding" in proc.stdout, proc.stdout
    assert "already complete" not in proc.stdout
    for n in names + ["manifest.json"]:
        assert (dataset / n).read_bytes() == (built[1] / n).read_bytes(), n
        assert (dataset / n).is_file() and not (dataset / n).is_symlink(), n
    assert [(dataset / n).stat().st_mtime_ns for n in names[:2]] == [before[n] for n in names[:2]]


def test_fineweb_verify(built, dataset):
    """--verify: exit 0 on a good dataset; a shard zeroed at its right size (which re-runs and the
    loader accept) is found by its sha256, as are a missing and an unlisted shard: one line each, exit 1."""
    from data import DataLoader

    proc = verify(dataset)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"all {len(final_shards(dataset))} shards good" in proc.stdout, proc.stdout
    manifest = (dataset / "manifest.json").read_text()
    (dataset / "manifest.json").write_text(manifest.replace('"complete": true', '"complete": false'))
    proc = verify(dataset)  # good shards, but not all of them yet
    assert proc.returncode == 1 and "incomplete" in proc.stdout, proc.stdout + proc.stderr
    (dataset / "manifest.json").write_text(manifest)

    names = final_shards(dataset)
    zeroed = dataset / names[1]
    zeroed.write_bytes(zeroed.read_bytes()[:128] + bytes(zeroed.stat().st_size - 128))
    assert np.load(zeroed).shape == (512,) and not np.load(zeroed).any()
    DataLoader(str(dataset), "train", T, 1, T)  # right size, valid ids: only the hash tells
    check_ok(rebuild(built, dataset))
    assert not np.load(zeroed).any()
    (dataset / names[3]).unlink()
    np.save(dataset / "src_train_000099.npy", np.zeros(600, dtype=np.uint16))
    proc = verify(dataset)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [l for l in proc.stdout.splitlines() if l.startswith(str(dataset) + os.sep)]
    assert len(bad) == 3, proc.stdout
    assert names[1] in bad[1] and "sha256" in bad[1], bad
    assert "src_train_000099.npy" in bad[0] and names[3] in bad[2] and "missing" in bad[2], bad
    assert "3 bad" in proc.stdout.splitlines()[-1]

    # no manifest: not a dataset of fineweb.py
    (dataset / "manifest.json").unlink()
    assert_clean_error(verify(dataset), "manifest.json")


GATED = """
import os, sys, time
import fineweb
write_shard = fineweb.write_shard
gate = sys.argv.pop(1)
def write_gated(path, tokens):  # the third shard waits for the gate file (the first two are in the manifest)
    if path.endswith("_000002.npy"):
        open(gate + ".reached", "w").close()
        while not os.path.exists(gate):
            time.sleep(0.01)
    return write_shard(path, tokens)
fineweb.write_shard = write_gated
sys.exit(fineweb.main(sys.argv[1:]))
"""


def test_fineweb_second_builder_into_a_path_is_refused(built, tmp_path):
    """While one fineweb.py builds a dataset, a second one into the same --path is one line at once and
    writes nothing (the loader meanwhile says the dataset is being written); the first one's dataset is
    byte-identical to a build alone, and once it is done the same command finds it complete."""
    from data import DataLoader

    src, ref = built
    out, gate = tmp_path / "out", tmp_path / "gate"
    args = ["--source", src, "--path", out, "--shard_size", 512]
    first = subprocess.Popen([sys.executable, "-c", GATED, str(gate), *map(str, args), "--workers", "1"], cwd=REPO_ROOT,
                             env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not Path(f"{gate}.reached").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() - t0 < 60, "the first builder never reached its third shard"
            time.sleep(0.01)
        manifest = (out / "manifest.json").read_bytes()
        assert len(json.loads(manifest)["shards"]) == 2
        t0 = time.time()
        assert_clean_error(run_fineweb(*args), str(out), "another fineweb.py")
        assert time.time() - t0 < 30  # at once: not after the first one ends
        assert (out / "manifest.json").read_bytes() == manifest
        assert sorted(os.listdir(out)) == sorted(final_shards(ref)[:2] + ["manifest.json"])
        msg = one_line_error(lambda: DataLoader(str(out), "train", T, 1, T))
        assert "incomplete" in msg and "fineweb.py is writing it now" in msg, msg
        gate.touch()
        stdout, stderr = first.communicate(timeout=60)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert final_shards(out) == final_shards(ref)
    for n in final_shards(ref) + ["manifest.json"]:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    again = run_fineweb(*args)
    check_ok(again)
    assert "already complete" in again.stdout, again.stdout
