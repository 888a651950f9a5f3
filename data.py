"""
Token shards on disk -> training batches, the same for any number of GPUs.

fineweb.py writes uint16 .npy shards named <prefix>_val_NNNNNN.npy / <prefix>_train_NNNNNN.npy.
A shard is found by its exact name, <prefix>_<split>_ and 6 digits, whose prefix holds no split
name of its own (my_val_data_train_000001.npy is refused, never read as train). Where fineweb.py
wrote a manifest.json (checked field by field), the shards are the ones it lists, each checked at
open to be there with its listed token count, and it must list every shard on disk; a dataset
fineweb.py has not finished (complete: false) is refused. A shard is a regular file in the
directory (no FIFO, no link out of it). Their sha256 is checked by fineweb.py --verify, not
here: at every start that would read the whole dataset.
Token ids are checked against vocab_size batch by batch: a max over one batch costs next to nothing,
where checking whole shards at open would read every shard from disk.

DataLoader cuts each shard into windows of seq_len + 1 tokens (x = window[:-1], y = window[1:])
and lays them out as one stream:

  train: epoch after epoch, the shards in an order shuffled by (seed, epoch) and the windows
         of each shard in an order shuffled by (seed, epoch, shard). Reshuffled every epoch,
         so no periodic pattern shows in the loss.
  val:   the shards in name order, the windows in file order; reset() starts it over, so
         every evaluation sees the same batches.

Optimizer step k consumes the G = total_batch_size / seq_len stream windows [k*G, (k+1)*G),
and micro-step m of rank r takes its B = micro_batch_size windows at k*G + (m*world + r)*B.
So the tokens of step k depend only on (data, seed, total_batch_size, seq_len, k): a run on
8 GPUs, on 1 GPU with gradient accumulation, or with a different micro-batch sees the same
global batches. The loader's state is two integers (step, micro-step).
"""

import bisect
import functools
import os

import numpy as np
import torch

import cli
from shards import SHARD_NAME, SPLIT_IN_PREFIX, building, file_problem, read_manifest


def open_shard(path, min_tokens=2, listed=None):
    """Memory-map a token shard, checking that it is a 1-D uint16 .npy of at least min_tokens
    (and of exactly `listed` tokens, when manifest.json lists it), in a regular file of its directory."""
    name = os.path.basename(path)
    if why := file_problem(path):  # before any open: a FIFO would block it forever
        if listed is not None:
            raise cli.Error(f"{name}: {why}, though manifest.json lists it ({path}); run the fineweb.py command that "
                            "made the dataset again to rebuild it")
        raise cli.Error(f"{name}: {why} ({path}); a shard must be a file in the dataset's directory")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle
    except Exception as e:  # truncated file, pickled objects, not an .npy at all
        raise cli.Error(f"{path}: not a valid token shard ({type(e).__name__}: {e})") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise cli.Error(f"{name}: expected a 1-D uint16 token array, found {tokens.ndim}-D {tokens.dtype} ({path})")
    if os.path.getsize(path) != tokens.offset + tokens.nbytes:
        raise cli.Error(f"{name}: {os.path.getsize(path) - tokens.offset - tokens.nbytes:,} bytes after the "
                        f"{len(tokens):,} tokens its header announces ({path})")
    if listed is not None and len(tokens) != listed:
        raise cli.Error(f"{name}: {len(tokens):,} tokens, but manifest.json lists {listed:,} ({path}); run the "
                        "fineweb.py command that made the dataset again to rebuild it")
    if len(tokens) < min_tokens:
        raise cli.Error(f"{name}: {len(tokens)} tokens, too short for one sequence of {min_tokens - 1} ({path})")
    return tokens


def find_shards(path, split):
    """[(file, token count manifest.json lists or None)] of split's shards, in name order."""
    if not os.path.isdir(path):
        raise cli.Error(f"data directory {path!r} does not exist (make one with fineweb.py)")
    on_disk = []
    for name in sorted(os.listdir(path)):
        m = SHARD_NAME.fullmatch(name)
        if not m:
            continue
        if SPLIT_IN_PREFIX.search(m[1]):
            raise cli.Error(f"{name}: ambiguous shard name, its prefix {m[1]!r} holds a split name ({path}); rename it")
        if m[2] == split:
            on_disk.append(name)
    info = read_manifest(path)  # checked field by field
    if info is None:  # hand-made shards
        if not on_disk:
            raise cli.Error(f"no '<prefix>_{split}_NNNNNN.npy' shards in {path!r} (make them with fineweb.py)")
        return [(os.path.join(path, name), None) for name in on_disk]
    manifest = os.path.join(path, "manifest.json")
    if not info["complete"]:  # its shards so far: a resume on the finished dataset would find other data
        raise cli.Error(f"{path}: the dataset is incomplete ({manifest} says complete: false): "
                        + ("fineweb.py is writing it now; wait for it to finish" if building(path) else
                           "fineweb.py stopped before finishing it; run the fineweb.py command that made it again "
                           "to finish it"))
    listed = {s["name"]: s["tokens"] for s in info["shards"] if s["split"] == split}
    for name in on_disk:
        if name not in listed:
            raise cli.Error(f"{name}: a {split} shard that {manifest} does not list; move it out of {path!r}")
    if not listed:
        raise cli.Error(f"{manifest} lists no {split} shards (make them with fineweb.py)")
    return [(os.path.join(path, name), listed[name]) for name in sorted(listed)]


class BaseLoader:
    """What every loader shares (DataLoader here, chat.ChatLoader for sft.py): a stream of rows
    (windows, conversations) of which optimizer step k takes G = total_batch_size / seq_len rows
    from k*G and rank r's micro-step m the B = micro_batch_size rows from k*G + (m*world + r)*B;
    the position (step, micro-step) is what a checkpoint saves. A subclass sets epoch_windows
    (rows per epoch) and turns next_rows() into tensors."""

    epoch_mismatch = "the data differ"  # what a different epoch_windows on resume means

    def __init__(self, split, seq_len, micro_batch_size, total_batch_size, rank=0, world_size=1, seed=0):
        if split not in ("train", "val"):
            raise cli.Error(f"split must be 'train' or 'val', not {split!r}")
        for name, v in [("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("total_batch_size", total_batch_size), ("world_size", world_size)]:
            if v <= 0:
                raise cli.Error(f"{name} must be positive, got {v}")
        if not 0 <= rank < world_size:
            raise cli.Error(f"rank {rank} is outside 0..{world_size - 1}")
        if not isinstance(seed, int) or seed < 0:
            raise cli.Error(f"seed must be a non-negative integer, got {seed!r}")
        per_micro_step = seq_len * micro_batch_size * world_size
        if total_batch_size % per_micro_step:
            raise cli.Error(
                f"total_batch_size {total_batch_size} is not divisible by seq_len {seq_len} x micro-batch "
                f"{micro_batch_size} x world size {world_size} = {per_micro_step} tokens per micro-step")
        self.split, self.seq_len, self.B = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.total_batch_size = total_batch_size
        self.grad_accum_steps = total_batch_size // per_micro_step
        self.windows_per_step = total_batch_size // seq_len
        self.reset()

    def reset(self):
        self.step, self.micro_step = 0, 0

    def next_rows(self):
        """The stream rows of this rank's next micro-step (and the position moves past them)."""
        first = self.step * self.windows_per_step + (self.micro_step * self.world_size + self.rank) * self.B
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.step, self.micro_step = self.step + 1, 0
        return range(first, first + self.B)

    def state_dict(self):
        return {"step": self.step, "micro_step": self.micro_step, "seed": self.seed, "split": self.split,
                "seq_len": self.seq_len, "total_batch_size": self.total_batch_size,
                "epoch_windows": self.epoch_windows}

    def load_state_dict(self, state):
        for key in ("seed", "split", "seq_len", "total_batch_size", "epoch_windows"):
            if state[key] != getattr(self, key):
                raise cli.Error(f"loader state is for {key}={state[key]!r}, this loader has {getattr(self, key)!r}"
                                + (f" ({self.epoch_mismatch})" if key == "epoch_windows" else ""))
        if state["micro_step"] >= self.grad_accum_steps:
            raise cli.Error(f"loader state is at micro-step {state['micro_step']}, but a step has only "
                            f"{self.grad_accum_steps} here")
        self.step, self.micro_step = state["step"], state["micro_step"]


class DataLoader(BaseLoader):
    epoch_mismatch = "the shards differ"

    def __init__(self, path, split, seq_len, micro_batch_size, total_batch_size, rank=0, world_size=1, seed=0,
                 vocab_size=50257):
        super().__init__(split, seq_len, micro_batch_size, total_batch_size, rank, world_size, seed)
        if vocab_size <= 0:
            raise cli.Error(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        found = find_shards(path, split)
        self.files = [f for f, _ in found]
        self.shards = [open_shard(f, seq_len + 1, listed) for f, listed in found]
        self.num_tokens = sum(len(s) for s in self.shards)
        self.windows = [(len(s) - 1) // seq_len for s in self.shards]
        self.epoch_windows = sum(self.windows)

    # -- the stream ----------------------------------------------------------

    @functools.lru_cache(maxsize=4)
    def _epoch_layout(self, epoch):
        """(shard order, cumulative window counts in that order) of one epoch."""
        if self.split == "train":
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        else:
            order = np.arange(len(self.shards))
        return order, np.cumsum([self.windows[i] for i in order]).tolist()

    @functools.lru_cache(maxsize=8)
    def _window_order(self, epoch, shard):
        if self.split == "train":
            return np.random.default_rng([self.seed, epoch, shard]).permutation(self.windows[shard])
        return None

    def locate(self, g):
        """(shard, first token) of stream window g."""
        epoch, i = divmod(g, self.epoch_windows)
        order, cum = self._epoch_layout(epoch)
        j = bisect.bisect_right(cum, i)  # position in this epoch's shard order
        shard = int(order[j])
        w = i - (cum[j - 1] if j else 0)
        perm = self._window_order(epoch, shard)
        if perm is not None:
            w = int(perm[w])
        return shard, w * self.seq_len

    def window(self, g):
        """Tokens (seq_len + 1,) of stream window g."""
        shard, start = self.locate(g)
        return self.shards[shard][start : start + self.seq_len + 1]

    def next_batch(self):
        """(x, y): int64 tensors (micro_batch_size, seq_len) of this rank's next micro-step."""
        rows = self.next_rows()
        buf = np.stack([self.window(g) for g in rows])
        if buf.max() >= self.vocab_size:
            b, t = np.argwhere(buf >= self.vocab_size)[0]
            shard, start = self.locate(rows[int(b)])
            raise cli.Error(f"{os.path.basename(self.files[shard])}: token {buf[b, t]} at position {start + t:,} is "
                            f"not below vocab_size {self.vocab_size} ({self.files[shard]})")
        buf = torch.from_numpy(buf.astype(np.int64))
        return buf[:, :-1], buf[:, 1:]
