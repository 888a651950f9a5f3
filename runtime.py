"""
Where a script runs: its device, its dtype, and under torchrun its process group, set up the same
way for train.py, sft.py, hellaswag.py, evals.py, generate.py and serve.py.

    rt = runtime.setup(args.device, args.dtype)     # torchrun's RANK/WORLD_SIZE start the group
    with rt.autocast():
        ...
    runtime.teardown()                              # in main's finally
"""

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the scripts' --dtype


def best_device():
    """What --device defaults to in every script: cuda, else mps, else cpu."""
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device):
    """What --dtype defaults to in every script: bf16 on a CUDA device that has it, else fp32."""
    return "bf16" if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


@dataclass
class Runtime:
    device: str  # "cuda:0", "mps", "cpu"
    dtype: str  # a key of DTYPES: the autocast dtype, or fp32 for none
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # under torchrun, with a process group

    @property
    def device_type(self):
        return self.device.split(":")[0]

    @property
    def comm_device(self):
        """Where the tensors of collectives live: the GPU for nccl, the CPU for gloo."""
        return self.device if self.device_type == "cuda" else "cpu"

    def autocast(self):
        return torch.autocast(self.device_type, dtype=DTYPES[self.dtype], enabled=self.dtype != "fp32")


def setup(device=None, dtype=None, distributed=True):
    """The Runtime of this process: device (default the best available; "cuda" under torchrun is
    this rank's GPU), dtype (default bf16 where supported, else fp32) and, under torchrun when
    `distributed`, the process group (nccl on CUDA, gloo elsewhere)."""
    torchrun = distributed and "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = device or best_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise cli.Error(f"--device {device} asked, but CUDA is not available")
        if device == "cuda":  # set_device needs an index: this process's GPU under torchrun, else the first
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) if torchrun else 0}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(device, dtype or default_dtype(device))
    if torchrun:
        if not dist.is_initialized():
            init_process_group("nccl" if rt.device_type == "cuda" else "gloo")
        rt.rank, rt.world_size, rt.distributed = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), True
    return rt


def init_process_group(backend):
    """torchrun's store outlives a restart (--max-restarts) and still holds the dead group's
    addresses under the same keys, so restarted ranks may connect to a dead port or hang. On one
    node each restart gets keys of its own (the restart count); across nodes the counts can
    differ, so there torchrun must be told to make a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    as train.py's docstring shows)."""
    store, rank, world = next(dist.rendezvous("env://"))
    if os.environ.get("LOCAL_WORLD_SIZE") == str(world):
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def teardown():
    if dist.is_available() and dist.is_initialized():
        # A DDP model holds the process group: let go of it first, or gloo's threads may be torn
        # down with the interpreter (a SIGABRT at exit).
        gc.collect()
        dist.destroy_process_group()


RANK0_ERRORS = (cli.Error, OSError, FloatingPointError)  # what a script's main turns into one line


def on_rank0(rt, fn):
    """Run fn() on rank 0 only and give every rank its result; an error there is raised on every
    rank, as the same kind of error (no rank is left waiting in a collective)."""
    result, error = [None], None
    if rt.rank == 0:
        try:
            result[0] = ("ok", fn())
        except RANK0_ERRORS as e:
            error = e
            result[0] = ("error", next(i for i, kind in enumerate(RANK0_ERRORS) if isinstance(e, kind)), str(e))
    if rt.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if error is not None:
        raise error
    if result[0][0] == "error":
        raise RANK0_ERRORS[result[0][1]](result[0][2])
    return result[0][1]


# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' datasheets, for the MFU of
# train.py's step lines. Matched by substring of torch.cuda.get_device_name(), first match wins (so
# the more specific first). fp16 has the same peak; fp32 runs on the TF32 tensor cores, whose dense
# peak is half the bf16 one on every device listed here.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H100", 989e12),  # SXM
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("MI300X", 1307e12),
]


def peak_flops(device_name, dtype="bf16"):
    """Peak FLOP/s of a device by its name for a --dtype (bf16, fp16 or fp32, the latter as
    TF32), or None when the device is unknown (then MFU is not reported)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    for key, flops in PEAK_BF16_FLOPS:
        if key in (device_name or ""):
            return flops / 2 if dtype == "fp32" else flops
    return None
