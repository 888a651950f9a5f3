"""
FineWebEdu (or your own text) -> GPT-2 token shards for train.py.

    python fineweb.py                                    # FineWebEdu sample-10BT, all of it (10B tokens)
    python fineweb.py --max_tokens 20_000_000            # a quick 20M-token dataset
    python fineweb.py --source ../shared/corpus --path data/corpus --shard_size 1_000_000
    python fineweb.py --verify --path data/corpus        # check every shard's sha256

Every document is preceded by <|endoftext|> and tokenized with GPT-2's BPE in --workers processes
(fork or spawn); the token stream is cut into shards of --shard_size tokens saved as uint16 .npy:
<prefix>_val_000000.npy first, then <prefix>_train_000001.npy, ... The prefix follows the source:
edufineweb for FineWebEdu, the source's name for local data (../shared/corpus gives
corpus_val_000000.npy, ...), unless --prefix says otherwise; a dataset being resumed keeps the
prefix it was made with, and a prefix holding _train or _val as a word is refused (data.py could
not tell the splits apart). FineWebEdu streams from the Hugging Face Hub: a Hub that cannot be
reached is one error line at once, and a failed run leaves no empty directory.

Resumable: re-running the same command after a crash or Ctrl-C keeps the finished shards and
continues; the result is byte-identical to an uninterrupted run. Every re-run, even of a complete
dataset, checks that each shard manifest.json lists is on disk at its size, and rebuilds from the
first that is not. One builder at a time: a second fineweb.py into the same directory is refused.
--verify recomputes every shard's sha256 against manifest.json (a shard overwritten with zeros has
the right size: only the hash tells), prints one line per bad shard and a summary, and exits 1 if
any is bad or the dataset is incomplete, else 0; delete a bad shard and re-run the command that
made the dataset to rebuild it. The format on disk (shards, manifest.json, the lock) is shards.py's.
"""

import glob
import gzip
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait

import numpy as np

import cli
from shards import SPLIT_IN_PREFIX, lock_dir, read_manifest, shard_name, shard_problem, verify, write_json, write_shard

EOT = 50256
TOKENIZER = "r50k_base"  # tiktoken's name for the GPT-2 BPE, as model_io.get_tokenizer loads it
HF_DATASET, HF_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
HF_PREFIX = "edufineweb"  # the shard prefix of FineWebEdu; local text is named after its source (default_prefix)
HUB_PROBE_TIMEOUT = 5  # seconds the Hub has to answer before streaming starts
FORMATS = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt")
BATCH_CHARS = 1 << 18  # characters of text per task sent to a worker
# Tasks in flight per worker. Results are taken in order, so while the oldest task runs the
# others must have work queued: a few per worker keep every worker busy.
TASKS_PER_WORKER = 8


# -----------------------------------------------------------------------------
# Reading documents


def local_files(source):
    """The files a --source names: a file, a directory (recursively) or a glob; sorted."""
    if os.path.isfile(source):
        files = [source]
    elif os.path.isdir(source):
        files = [os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs]
    else:
        files = glob.glob(source, recursive=True)
        if not files:
            raise cli.Error(f"source {source!r} not found (no such file, directory or glob match)")
    files = sorted(f for f in files if f.endswith(FORMATS) and os.path.isfile(f))
    if not files:
        raise cli.Error(f"source {source!r} holds no {', '.join(FORMATS)} files")
    return files


def read_file(path, text_field):
    """Yield the documents of one local file."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise cli.Error(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                "set --text_field")
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for row, text in enumerate(batch.column(0).to_pylist()):
                    if not isinstance(text, str):
                        raise cli.Error(f"{path}: a row's {text_field!r} is {type(text).__name__}, not text")
                    yield text
        else:  # JSON lines, optionally gzipped
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise cli.Error(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise cli.Error(f"{path}, line {lineno}: record has no text field {text_field!r}; "
                                        "set --text_field")
                    yield record[text_field]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise cli.Error(f"cannot read {path}: {e}") from None
    except cli.Error:
        raise
    except Exception as e:  # e.g. a corrupt parquet file
        raise cli.Error(f"cannot read {path}: {type(e).__name__}: {e}") from None


def check_hub(dataset=HF_DATASET, instead="pass local files with --source"):
    """Fail fast, with one line, when the Hub cannot be reached: load_dataset would retry each
    request for a long while (its backoff is not a setting), printing a line per try. Any HTTP answer
    within HUB_PROBE_TIMEOUT seconds will do. In offline mode (HF_HUB_OFFLINE, or datasets'
    HF_DATASETS_OFFLINE) nothing is asked of the network, and load_dataset answers at once."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError as e:
        raise cli.Error(f"reading {dataset} needs the datasets package ({e}); pip install datasets, "
                        f"or {instead}") from None
    offline = os.environ.get("HF_DATASETS_OFFLINE")  # datasets' switch, before HF_HUB_OFFLINE where set
    if constants.is_offline_mode() if offline is None else offline.upper() in ("1", "ON", "YES", "TRUE"):
        return
    try:
        get_session().head(f"{constants.ENDPOINT}/api/datasets/{dataset}", timeout=HUB_PROBE_TIMEOUT)
    except Exception as e:
        raise cli.Error(f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to read {dataset}: "
                        f"{type(e).__name__}: {str(e) or 'no answer'}. "
                        f"Offline? {instead[0].upper() + instead[1:]}") from None


def documents(args, files):
    """The document stream of --source (streamed from the Hub, or the local files), in a fixed
    order. The Hub's dataset is opened here, at once: an cli.Error if it cannot be."""
    if files is None:
        check_hub()
        try:
            from datasets import load_dataset

            ds = iter(load_dataset(HF_DATASET, name=args.hf_config, split="train", streaming=True))
        except Exception as e:
            raise cli.Error(f"cannot stream {HF_DATASET} ({args.hf_config}): {type(e).__name__}: {e}. "
                             "Offline? Pass local files with --source") from None
        return _records(args, ds)
    return (doc for path in files for doc in read_file(path, args.text_field))


def _records(args, ds):
    """The texts of the Hub dataset's records."""
    i = 0
    try:
        for i, record in enumerate(ds):
            if not isinstance(record.get(args.text_field), str):
                raise cli.Error(f"{HF_DATASET} record {i} has no text field {args.text_field!r}; set --text_field")
            yield record[args.text_field]
    except cli.Error:
        raise
    except Exception as e:  # a dropped connection mid-stream
        raise cli.Error(f"streaming {HF_DATASET} failed at record {i}: {type(e).__name__}: {e}. "
                         "The finished shards are kept: run the same command again to continue") from None


def batches(docs):
    """Group documents into tasks of about BATCH_CHARS characters. The first tasks are
    smaller, so that every worker has something to do as soon as it starts."""
    batch, chars, target = [], 0, BATCH_CHARS // 16
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= target:
            yield batch
            batch, chars, target = [], 0, min(2 * target, BATCH_CHARS)
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Tokenizing (in worker processes)

_encoder = None


def init_worker():
    """Load the BPE once per process (forked workers inherit the parent's); returns it. tiktoken
    directly, not model_io.get_tokenizer: model_io imports torch, which would slow every start and
    every spawned worker, for nothing this script uses."""
    global _encoder
    if _encoder is None:
        import tiktoken

        try:
            _encoder = tiktoken.get_encoding(TOKENIZER)
        except Exception as e:
            raise cli.Error(f"cannot load the GPT-2 tokenizer (tiktoken {TOKENIZER}: {type(e).__name__}): offline, set "
                            "TIKTOKEN_CACHE_DIR to a directory holding its file (this repo's ../shared/tiktoken_cache "
                            "has it); python -c 'import model_io; model_io.get_tokenizer()' names the file") from None
        if _encoder.n_vocab > 2**16:
            raise cli.Error(f"tokenizer {_encoder.name} has {_encoder.n_vocab:,} tokens: "
                            "its ids do not fit in uint16 shards")
    return _encoder


def _encode(text):
    """GPT-2 BPE of text as ordinary text (special-token strings are not special) -> uint32 array.
    encode_to_numpy skips building a Python list, which encode_ordinary builds."""
    if hasattr(_encoder, "encode_to_numpy"):
        return _encoder.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.array(_encoder.encode_ordinary(text), dtype=np.uint32)


def tokenize(texts):
    """Documents -> (uint16 tokens with <|endoftext|> before each document, per-document lengths)."""
    eot = np.array([EOT], dtype=np.uint32)
    parts = []
    for text in texts:
        parts += [eot, _encode(text)]
    lengths = np.fromiter((len(p) + 1 for p in parts[1::2]), dtype=np.int64, count=len(texts))
    # ids < n_vocab <= 2**16 (checked when the encoder loads): the cast in the copy is exact
    return np.concatenate(parts, dtype=np.uint16, casting="same_kind"), lengths


# -----------------------------------------------------------------------------
# Building the dataset


def load_manifest(args):
    """The manifest of this dataset, fresh or resumed; refuses a directory of another dataset."""
    settings = {"source": args.source if args.source == HF_DATASET else os.path.abspath(args.source),
                "hf_config": args.hf_config if args.source == HF_DATASET else None,
                "text_field": args.text_field, "shard_size": args.shard_size, "max_tokens": args.max_tokens,
                "prefix": args.prefix, "tokenizer": TOKENIZER}
    manifest = read_manifest(args.path)
    if manifest is not None:
        for key, value in settings.items():
            if manifest.get(key) != value:
                raise cli.Error(f"output directory {args.path!r} holds another dataset ({key}: {manifest.get(key)!r} "
                                 f"there, {value!r} asked); choose another --path")
        # keep the recorded shards that are on disk, whole; rebuild from the first that is not
        shards = manifest["shards"]
        for i, shard in enumerate(shards):
            f = os.path.join(args.path, shard["name"])
            if why := shard_problem(f, shard["tokens"]):
                print(f"{f}: {why}; rebuilding the dataset from this shard on "
                      f"({len(shards) - i} of {len(shards)} shards)")
                manifest.update(complete=False, shards=shards[:i])
                break
        return manifest
    others = glob.glob(os.path.join(args.path, "*_train_*.npy")) + glob.glob(os.path.join(args.path, "*_val_*.npy"))
    if others:
        raise cli.Error(f"output directory {args.path!r} holds shards without a manifest.json; choose another --path")
    return {**settings, "complete": False, "tokens": 0, "documents": 0, "shards": []}


def default_prefix(source):
    """--prefix when none is given: edufineweb for FineWebEdu; for local text the name of its
    source (a directory's name, a file's without its extension, a glob's last directory before
    the pattern), letters, digits, '.' and '-' kept and any other run of characters made '-'
    (so never _train or _val), or 'text' when nothing is left."""
    if source == HF_DATASET:
        return HF_PREFIX
    path = source
    while glob.has_magic(path):  # a glob: the directory its pattern starts in
        path = os.path.dirname(path)
    name = os.path.basename(os.path.abspath(path)) if path else ""
    if path == source and os.path.isfile(source):
        name = next((name[: -len(f)] for f in sorted(FORMATS, key=len, reverse=True) if name.endswith(f)), name)
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip(".-") or "text"


def make_dirs(path):
    """os.makedirs(path); returns the directories it created, deepest first."""
    created, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    os.makedirs(path, exist_ok=True)
    return created


def remove_empty(created):
    """Remove the directories make_dirs created, deepest first, while they are empty."""
    for d in created:
        try:
            os.rmdir(d)  # only ever removes an empty directory
        except OSError:
            return


def run(args):
    if os.path.exists(args.path) and not os.path.isdir(args.path):
        raise cli.Error(f"output path {args.path!r} exists and is not a directory")
    created = make_dirs(args.path)
    lock = lock_dir(args.path)  # when refused, the directory is the other builder's: it stays
    try:
        if args.prefix is None:  # a dataset being resumed keeps the prefix it was made with
            recorded = read_manifest(args.path)
            args.prefix = recorded.get("prefix") if recorded and recorded.get("prefix") else default_prefix(args.source)
        if SPLIT_IN_PREFIX.search(args.prefix):
            raise cli.Error(f"--prefix {args.prefix!r} holds _train or _val as a word: its shards would read as the "
                            "wrong split; choose another")
        files = None if args.source == HF_DATASET else local_files(args.source)  # fail fast on a bad source
        manifest = load_manifest(args)
        if manifest["complete"]:
            print(f"{args.path}: already complete ({manifest['tokens']:,} tokens in {len(manifest['shards'])} shards)")
            return
        # What can fail at once does so before any shard is written: the Hub (unreachable, or no
        # such config) and the BPE (forked workers inherit it).
        docs = documents(args, files)
        init_worker()
        build(args, docs, manifest)
    except BaseException:
        remove_empty(created)  # a failed first run leaves no empty directory behind
        raise
    finally:
        if lock is not None:
            os.close(lock)


def build(args, docs, manifest):
    """Tokenize the documents of --source into args.path, which exists."""
    for f in glob.glob(os.path.join(args.path, ".tmp-*")):  # left by a crash
        os.remove(f)
    from tqdm import tqdm

    written = sum(s["tokens"] for s in manifest["shards"])
    bar = tqdm(total=args.max_tokens, initial=written, unit="tok", unit_scale=True, desc="tokenizing", smoothing=0.1)
    try:
        written = tokenize_into_shards(args, docs, manifest, bar)
    finally:
        bar.close()  # before any error message, so that it stands on a line of its own
    shards = manifest["shards"]
    if not written:
        raise cli.Error(f"--source {args.source!r} holds no text: no tokens to write")
    manifest.update(complete=True, tokens=written)
    write_json(os.path.join(args.path, "manifest.json"), manifest)
    print(f"{args.path}: {written:,} tokens in {len(shards)} shards ({shards[0]['name']} ... {shards[-1]['name']})")


# -----------------------------------------------------------------------------
# Tokenizing into shards: the worker processes, and the loop that feeds them and fills the shards


class WorkerError(Exception):
    """A tokenizer process died (e.g. killed for memory): printed as one line, no traceback."""


def _work(tasks, read_lock, results, write_lock, parent_ends):
    """A tokenizer process: tokenize the batches of the task pipe until the parent stops it
    (terminate) or is gone (the pipe reads EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    for conn in parent_ends:  # forked workers inherit them; a parent that dies must read as EOF
        conn.close()
    try:
        init_worker()
        while True:
            with read_lock:
                i, batch = tasks.recv()
            try:
                result = tokenize(batch)
            except Exception as e:
                result = e if isinstance(e, cli.Error) else WorkerError(f"tokenizer failed:\n{traceback.format_exc()}")
            with write_lock:
                results.send((i, result))
    except cli.Error as e:
        with write_lock:
            results.send((-1, e))
    except (EOFError, OSError):  # the parent is gone
        pass


class Workers:
    """A process pool for tokenize(): batches go out through one pipe, whichever worker is free
    takes the next, and results come back through another pipe, handed out in submission order.

    Why not multiprocessing.Pool: its worker-handler thread waits on the result pipe as well as
    on the workers, so it spins whenever a result lies there unread, taking CPU from the workers
    (BENCHMARKS.md's data pipeline has the figures). And a worker killed for memory makes
    Pool.get() wait forever; here it is an error."""

    def __init__(self, n, start_method=None):
        ctx = mp.get_context(start_method)
        tasks_r, self._tasks = ctx.Pipe(duplex=False)
        self._results, results_w = ctx.Pipe(duplex=False)
        self._locks = ctx.Lock(), ctx.Lock()  # kept: a spawned worker unpickles them after start()
        args = (tasks_r, self._locks[0], results_w, self._locks[1], (self._tasks, self._results))
        self._procs = [ctx.Process(target=_work, args=args, daemon=True) for _ in range(n)]
        for p in self._procs:
            p.start()
        tasks_r.close()  # the parent keeps only its own ends
        results_w.close()
        # Sending happens on a thread: a send blocks while the pipe is full, and the main
        # thread must go on reading results meanwhile, or a worker blocked on a full result
        # pipe would never read the task being sent (a deadlock).
        self._outbox = queue.SimpleQueue()
        threading.Thread(target=self._send, daemon=True).start()
        self._ready, self.submitted, self.taken = {}, 0, 0

    def _send(self):
        while (task := self._outbox.get()) is not StopIteration:
            try:
                self._tasks.send(task)
            except OSError:  # the workers are gone; take() reports it
                return

    def submit(self, batch):
        self._outbox.put((self.submitted, batch))
        self.submitted += 1

    def take(self):
        """The result of the oldest batch not yet taken (waits for it)."""
        assert self.taken < self.submitted
        while self.taken not in self._ready:
            ready = wait([self._results] + [p.sentinel for p in self._procs])
            if self._results not in ready:
                self._died()
            try:
                i, result = self._results.recv()
            except EOFError:  # every worker has exited
                self._died()
            if isinstance(result, Exception):
                raise result
            self._ready[i] = result
        self.taken += 1
        return self._ready.pop(self.taken - 1)

    def _died(self):
        """Raise the error for a worker that has exited (its sentinel is ready, or will be soon)."""
        ended = wait([p.sentinel for p in self._procs], timeout=10)
        dead = next((p for p in self._procs if p.sentinel in ended), self._procs[0])
        dead.join(10)
        code = dead.exitcode
        if code is None:  # not seen to exit: report what was seen
            raise WorkerError("the tokenizer processes stopped answering; run the same command again to continue")
        why = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        why += " (out of memory?)" if code == -getattr(signal, "SIGKILL", 9) else ""
        raise WorkerError(f"a tokenizer process {why}; the finished shards are kept: "
                          "run the same command again to continue")

    def terminate(self):
        """Stop the workers at once (work still in flight is not wanted, or there is none)."""
        for p in self._procs:
            if p.exitcode is None:
                p.terminate()
        for p in self._procs:
            p.join()
        self._outbox.put(StopIteration)


def tokenize_into_shards(args, docs_iter, manifest, bar):
    """Tokenize the documents of docs_iter after the manifest's finished shards into new shards,
    recording each in the manifest; returns the total tokens written."""
    shards = manifest["shards"]
    # where the finished shards end: documents wholly written, and tokens of the next one
    doc, skip = (shards[-1]["end_doc"], shards[-1]["end_skip"]) if shards else (0, 0)
    written = sum(s["tokens"] for s in shards)
    limit = args.max_tokens or float("inf")
    # A full shard is written (hashed, synced, renamed, then added to the manifest) by a
    # background thread while the workers go on filling the other of two buffers: a large shard's
    # write would otherwise starve the workers each time.
    buffers = [np.empty(args.shard_size, dtype=np.uint16), None]
    buf, fill, index, pending = buffers[0], 0, len(shards), None
    writer = ThreadPoolExecutor(1)

    def write(tokens, name, end_doc, end_skip):
        sha = write_shard(os.path.join(args.path, name), tokens)
        shards.append({"name": name, "split": "val" if not shards else "train", "tokens": len(tokens), "sha256": sha,
                       "end_doc": end_doc, "end_skip": end_skip})
        manifest.update(tokens=sum(s["tokens"] for s in shards), documents=end_doc)
        write_json(os.path.join(args.path, "manifest.json"), manifest)

    def flush(end_doc, end_skip):
        nonlocal buf, index, pending
        if pending is not None:
            pending.result()  # the other buffer's write is done (and its errors raised here)
        pending = writer.submit(write, buf[:fill], shard_name(args.prefix, index), end_doc, end_skip)
        index += 1
        if buffers[1] is None:
            buffers[1] = np.empty(args.shard_size, dtype=np.uint16)
        buf = buffers[1] if buf is buffers[0] else buffers[0]

    for i in range(doc):  # documents already in finished shards
        if next(docs_iter, None) is None:
            raise cli.Error(f"--source now holds {i:,} documents, fewer than the {doc:,} in the finished shards "
                             f"of {args.path!r}: it changed since they were made; choose another --path")
    workers = Workers(args.workers, args.start_method)
    try:
        tasks = batches(docs_iter)
        while written < limit:
            # bounded: memory stays at two shard buffers plus the batches in flight
            while workers.submitted - workers.taken < TASKS_PER_WORKER * args.workers:
                batch = next(tasks, None)
                if batch is None:
                    break
                workers.submit(batch)
            if workers.submitted == workers.taken:
                break
            tokens, lengths = workers.take()
            ends = np.cumsum(lengths)  # end of each document within `tokens`
            pos, skip = skip, 0  # a resumed run starts inside its first document
            while pos < len(tokens) and written < limit:
                take = int(min(len(tokens) - pos, args.shard_size - fill, limit - written))
                buf[fill : fill + take] = tokens[pos : pos + take]
                fill, pos, written = fill + take, pos + take, written + take
                bar.update(take)
                if fill == args.shard_size and written < limit:
                    d = int(np.searchsorted(ends, pos, side="right"))  # documents finished
                    flush(doc + d, pos - (int(ends[d - 1]) if d else 0))
                    fill = 0
            doc += int(np.searchsorted(ends, pos, side="right"))
            bar.set_postfix(docs=f"{doc:,}", refresh=False)
        if fill:
            flush(doc, 0)  # the last shard is written while the workers shut down
    finally:
        workers.terminate()
        writer.shutdown(wait=True)  # even on Ctrl-C: a shard being written is finished and recorded
    if pending is not None:
        pending.result()
    return written


def usable_cores():
    """The cores this process may run on (taskset, containers, SLURM), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--source", default=HF_DATASET,
                   help=f"{HF_DATASET} (streamed) or local data: a file, directory or glob of "
                        f"{', '.join(FORMATS)} (a .txt file is one document)")
    p.add_argument("--hf_config", default=HF_CONFIG, help="dataset config when streaming FineWebEdu")
    p.add_argument("--text_field", default="text", help="the text field of parquet/JSON records")
    p.add_argument("--path", default="edu_fineweb10B", help="output directory of shards and manifest.json")
    p.add_argument("--prefix", default=None,
                   help=f"shard name prefix, no _train or _val in it (default: {HF_PREFIX} for {HF_DATASET}; for local "
                        "data the source's name: a directory's name, a file's without its extension, a glob's last "
                        "directory before the pattern, with characters other than letters, digits, '.' and '-' made "
                        "'-', or 'text' if none is left; a --path holding a dataset keeps the prefix it was made with)")
    p.add_argument("--shard_size", type=cli.positive_int, default=100_000_000, help="tokens per shard")
    p.add_argument("--max_tokens", type=cli.positive_int, default=None,
                   help="stop after this many tokens (default: all of the source)")
    p.add_argument("--workers", type=cli.positive_int, default=usable_cores(),
                   help="tokenizer processes (default: one per usable core)")
    p.add_argument("--start_method", choices=mp.get_all_start_methods(), default=None,
                   help="multiprocessing start method (default: the platform's)")
    p.add_argument("--verify", action="store_true",
                   help="instead of building: check every shard of --path against manifest.json's sha256 "
                        "(exit 1 if any is bad or the dataset is incomplete)")
    args = p.parse_args(argv)
    try:
        if args.verify:
            return verify(args.path)
        run(args)
    except (cli.Error, WorkerError) as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk: what was finished is kept, as after Ctrl-C
        print(f"error: {e}; finished shards are kept: make room and run the same command again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
