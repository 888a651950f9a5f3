"""
bench.py's sections on the data: fineweb (fineweb.py end to end against a build-nanogpt-style
pipeline and against the machine's limit) and chat_loader (sft.py's ChatLoader against the per-row
order it replaced). Nothing here imports torch at the top: the fineweb section runs in a process
without it, as fineweb.py itself does.
"""

import multiprocessing as mp
import os
import shutil
import tempfile
import time

import numpy as np

from bench_timing import paired, repeats
from fineweb import usable_cores


# build-nanogpt's fineweb.py, rewritten: module-level encoder (inherited by forked workers),
# one document per task, chunksize 16, tokens gathered and written by the parent.
_bn_encoder = None


def _bn_tokenize(doc):
    tokens = [50256] + _bn_encoder.encode_ordinary(doc)
    return np.array(tokens).astype(np.uint16)


def _bn_run(texts, out_dir, shard_size):
    buf, fill, index = np.empty(shard_size, dtype=np.uint16), 0, 0
    with mp.get_context("fork").Pool(max(1, usable_cores() // 2)) as pool:
        for tokens in pool.imap(_bn_tokenize, texts, chunksize=16):
            while len(tokens):
                take = min(len(tokens), shard_size - fill)
                buf[fill : fill + take], tokens = tokens[:take], tokens[take:]
                fill += take
                if fill == shard_size:
                    np.save(os.path.join(out_dir, f"shard_{index:06d}.npy"), buf)
                    fill, index = 0, index + 1
    if fill:
        np.save(os.path.join(out_dir, f"shard_{index:06d}.npy"), buf[:fill])


def bench_fineweb(args):
    """fineweb.py end to end vs a build-nanogpt-style pipeline and vs cores x one core's rate."""
    global _bn_encoder
    import fineweb

    os.environ.setdefault("TQDM_DISABLE", "1")
    corpus = args.corpus
    files = fineweb.local_files(corpus)
    enc = _bn_encoder = fineweb.init_worker()
    texts = [d for f in files for d in fineweb.read_file(f, "text")]
    n_tokens = sum(len(enc.encode_ordinary(t)) + 1 for t in texts)
    work = tempfile.mkdtemp(prefix="bench-fineweb-")
    shard_size = 1_000_000

    def ours():
        out = os.path.join(work, "ours")
        shutil.rmtree(out, ignore_errors=True)
        assert fineweb.main(["--source", corpus, "--path", out, "--shard_size", str(shard_size)]) == 0

    def baseline():  # reads the files too, as build-nanogpt's load_dataset does
        out = os.path.join(work, "baseline")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        _bn_run([d for f in files for d in fineweb.read_file(f, "text")], out, shard_size)

    def one_core():
        for t in texts:
            enc.encode_ordinary(t)

    try:
        t = paired({"ours": ours, "baseline": baseline, "one_core": one_core}, repeats(args, 9))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limit = usable_cores() * n_tokens / t["one_core"]
    ours_rate = n_tokens / t["ours"]
    label = f"fineweb.py {n_tokens / 1e6:.1f}M tokens, {usable_cores()} workers (tok/s)"
    return [(label, ours_rate, n_tokens / t["baseline"], "build-nanogpt Pool.imap"),
            (label, ours_rate, limit, "limit: cores x 1-core rate")]


def bench_chat_loader(args):
    """chat.ChatLoader's micro-step at 1M conversations (random uint16 tokens and bool flags, held in
    memory) against the per-row order it replaced: the same batches, each row drawing its epoch's
    permutation again."""
    import torch

    from chat import ChatLoader

    N, T, B = 1_000_000, 1024, 32
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50259, (N, T + 1), dtype=np.uint16)
    trained = tokens < 25_000  # (bool straight away: no temporary as large as the tokens)

    class PerRow(ChatLoader):
        def row(self, g):
            epoch, i = divmod(g, self.epoch_windows)
            return int(np.random.default_rng([self.seed, epoch]).permutation(self.epoch_windows)[i])

    ours, ref = (cls(tokens, trained, "train", T, B, B * T, seed=1) for cls in (ChatLoader, PerRow))
    t0 = time.perf_counter()
    first = ours.next_batch()
    t_first = time.perf_counter() - t0
    assert all(torch.equal(a, b) for a, b in zip(first, ref.next_batch())), "the two loaders' batches differ"
    n = 50 if args.quick else 500
    t0 = time.perf_counter()
    for _ in range(n):
        ours.next_batch()
    t_ours = (time.perf_counter() - t0) / n
    t_ref = paired({"ref": ref.next_batch}, 1 if args.quick else 3, warmup=0)["ref"]
    print(f"chat_loader {N:,} conversations, {B} rows x {T}: {t_ours * 1e3:.3f} ms a batch (target: under 5), "
          f"the epoch's first {t_first * 1e3:.1f} ms (its order drawn), per-row order {t_ref * 1e3:,.0f} ms")
    return [(f"chat_loader {N / 1e6:g}M conversations, {B}x{T} (batches/s)", 1 / t_ours, 1 / t_ref,
             "the order drawn per row")]
