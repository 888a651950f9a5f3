"""
Train GPT-2 on token shards from fineweb.py: one process, or DDP under torchrun.

    python train.py --path data/small --model gpt2 --n_layer 4 --n_embd 128 ...   # one process
    torchrun --standalone --nproc_per_node=8 train.py --path edu_fineweb10B ...    # 8 GPUs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=run1 train.py --resume ...             # 2 nodes, on each
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --resume ...  # fault tolerant
    torchrun --standalone --nproc_per_node=8 train.py --recipe modern --max_steps 9537 ...  # Muon + wsd (--recipe)

Every optimizer step sees total_batch_size tokens: batch_size_per_device sequences of block_size
tokens per process per micro-step, accumulated over total / (batch x block x world) micro-steps.
The data loader makes the global batch of step k independent of the number of processes and of
the micro-batch, so those settings change speed, not the numbers.

Validation scores a fixed set of --val_tokens tokens (the first windows of the val shards, each
rank its share, summed exactly), so val loss too is the same for any layout. "val at step N" is
the model after N updates; the final model is evaluated too, at step max_steps.

A --log_dir holds one run (see rundir.py): log.jsonl (one JSON object per line: train, val and
HellaSwag results) and checkpoints step_NNNNNN/ (config.json + model.safetensors, loadable by
transformers, plus trainer_state.pt: optimizer, scaler, loader). --resume continues from the
newest checkpoint that verifies, exactly: on CPU, the same loss at every step as an
uninterrupted run. A NaN/inf loss, gradient norm or update stops the run before any checkpoint
can hold it.
"""

import argparse
import dataclasses
import gc
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
from data import DataLoader
from model import BLOCK_MATRICES, GPT, PRESETS, GPTConfig
from model_io import DTYPES, best_device, default_dtype, get_tokenizer, load_model
from rundir import RunDir


# A recipe is a set of defaults for the flags below; a flag given explicitly wins. A step count in a
# recipe that any run length may use is a share of --max_steps ("1.3%": 248 of the default 19,073 steps).
#   gpt2:   the GPT-2 / GPT-3 paper recipe as build-nanogpt replicates it (AdamW, cosine).
#   modern: measured on this repo (README: the modern recipe; bench.py --section recipe), the architecture
#           and checkpoint format unchanged: Muon on the blocks' matrices, warmup-stable-decay.
RECIPES = {
    "gpt2": dict(optimizer="adamw", schedule="cosine", max_lr=6e-4, min_lr=6e-5, warmup_steps=715, decay_frac=0.2,
                 weight_decay=0.1, muon_lr=None, muon_momentum=None, muon_weight_decay=None,
                 decay_embeddings=True, zero_init_residual=False),
    "modern": dict(optimizer="muon", schedule="wsd", max_lr=1.8e-3, min_lr=0.0, warmup_steps="1.3%", decay_frac=0.4,
                   weight_decay=0.1, muon_lr=3e-3, muon_momentum=0.95, muon_weight_decay=0.1,
                   decay_embeddings=True, zero_init_residual=True),
}
MUON_FLAGS = ("muon_lr", "muon_momentum", "muon_weight_decay")


def recipe_help(key, recipes):
    return "(default: by --recipe, " + ", ".join(f"{name} {r[key]}" for name, r in recipes.items() if r[key] is not None) + ")"


# Peak dense bf16 tensor-core FLOP/s (no sparsity), from the vendors' datasheets, for the MFU of
# the train lines. Matched by substring of torch.cuda.get_device_name(), first match wins (so the
# more specific first). fp16 has the same peak; fp32 runs on the TF32 tensor cores, whose dense
# peak is half the bf16 one on every device listed here (e.g. H100 SXM 989 -> 495, A100 312 -> 156).
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


def parser():
    """train.py's command line: what it trains on (--path, --model and its shape), then the flags
    every training run has (add_training_flags; sft.py adds those to its own)."""
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--path", default="edu_fineweb10B", help="directory of token shards from fineweb.py")
    a("--model", default="gpt2", choices=list(PRESETS), help="architecture preset")
    gpt2 = PRESETS["gpt2"] | {"block_size": GPTConfig.block_size}
    for k, what in (("n_layer", "layers"), ("n_head", "attention heads"), ("n_embd", "width"),
                    ("block_size", "context length = training sequence length")):
        a(f"--{k}", type=cli.positive_int, default=None, help=f"{what} (default: --model's, gpt2 {gpt2[k]})")
    a("--total_batch_size", type=cli.positive_int, default=524288, help="tokens per optimizer step")
    a("--val_tokens", type=cli.positive_int, default=None,
      help="tokens scored at each validation, the same for any layout (default 10,485,760 = 20 x 0.5M)")
    a("--eval_max_steps", type=cli.positive_int, default=None, help="old form of --val_tokens: N x --total_batch_size tokens (default: unset)")
    a("--hellaswag_examples", type=cli.int_range(-1), default=-1,
      help="HellaSwag val examples per evaluation (0: off, -1: all)")
    a("--sample_prompt", default="Hello, I'm a language model,", help="prompt of the sample at each evaluation")
    add_training_flags(p)
    return p


def add_training_flags(p, recipes=RECIPES):
    """The flags of every training run (train.py's and sft.py's); recipes: the defaults by --recipe."""
    a = p.add_argument
    a("--recipe", choices=list(recipes), default="gpt2",
      help="defaults for the optimizer, schedule and learning-rate flags (those whose default is 'by --recipe')")
    a("--max_steps", type=cli.positive_int, default=19073, help="optimizer steps")
    a("--optimizer", choices=["adamw", "muon"], default=None,
      help="adamw everywhere, or muon on the blocks' 2-D matrices and adamw on the rest " + recipe_help("optimizer", recipes))
    a("--warmup_steps", type=cli.steps_or_percent, default=None,
      help="linear learning-rate warm-up: steps, or a share of --max_steps such as 2%% "
      + recipe_help("warmup_steps", recipes).replace("%", "%%"))
    a("--max_lr", type=cli.positive_float, default=None, help="peak learning rate of AdamW " + recipe_help("max_lr", recipes))
    a("--min_lr", type=cli.non_negative_float, default=None,
      help="final learning rate of the decay (Muon's: scaled alike) " + recipe_help("min_lr", recipes))
    a("--schedule", choices=["cosine", "wsd"], default=None,
      help="after the warm-up: cosine decay, or wsd (warmup-stable-decay: constant, then a linear decay) "
      + recipe_help("schedule", recipes))
    a("--decay_frac", type=cli.float_range(0, 1, lo_open=True), default=None,
      help="wsd: the final fraction of the steps that decays to --min_lr " + recipe_help("decay_frac", recipes))
    a("--weight_decay", type=cli.non_negative_float, default=None,
      help="AdamW's decoupled weight decay of matrices and embeddings " + recipe_help("weight_decay", recipes))
    a("--decay_embeddings", action=argparse.BooleanOptionalAction, default=None,
      help="weight decay on the token and position embeddings too " + recipe_help("decay_embeddings", recipes))
    a("--muon_lr", type=cli.positive_float, default=None,
      help="muon: peak learning rate, AdamW-scale (update RMS matched to AdamW's) " + recipe_help("muon_lr", recipes))
    a("--muon_momentum", type=cli.float_range(0, 1, hi_open=True), default=None,
      help="muon: Nesterov momentum " + recipe_help("muon_momentum", recipes))
    a("--muon_weight_decay", type=cli.non_negative_float, default=None,
      help="muon: decoupled weight decay " + recipe_help("muon_weight_decay", recipes))
    a("--zero_init_residual", action=argparse.BooleanOptionalAction, default=None,
      help="start the residual projections (attn.c_proj, mlp.c_proj) at zero " + recipe_help("zero_init_residual", recipes))
    a("--batch_size_per_device", type=cli.positive_int, default=64, help="sequences per process per micro-step")
    a("--eval_step_interval", type=cli.positive_int, default=250, help="validate, HellaSwag and sample every N steps")
    a("--save_step", type=cli.positive_int, default=5000, help="checkpoint every N steps (and at the end)")
    a("--seed", type=cli.non_negative_int, default=1337, help="seed of the initialisation and the data order")
    a("--fp16", action="store_true", help="fp16 autocast with a gradient scaler (same as --dtype fp16)")
    a("--log_dir", default="log", help="the run's directory (log.jsonl, checkpoints); it holds one run only")
    a("--resume", action="store_true",
      help="continue the run in --log_dir from its newest checkpoint that verifies (or start it there)")
    a("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    a("--dtype", choices=list(DTYPES), default=None, help="default: bf16 where supported, else fp32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")
    a("--grad_clip", type=cli.positive_float, default=1.0, help="clip the gradient norm to this")
    a("--sample_tokens", type=cli.non_negative_int, default=32, help="length of the sample at each evaluation (0: none)")
    a("--keep_checkpoints", type=cli.non_negative_int, default=0, help="keep only this run's newest N checkpoints (0: all)")


def parse_args(argv=None, p=None, recipes=RECIPES):
    """Parse train.py's command line (or p's: sft.py's) and fill in what the recipe decides."""
    args = (p or parser()).parse_args(argv)
    if args.fp16:
        args.dtype = "fp16"
    if getattr(args, "val_tokens", 0) is None:
        args.val_tokens = args.eval_max_steps * args.total_batch_size if args.eval_max_steps else 20 * 524288
    recipe = recipes[args.recipe]
    optimizer = args.optimizer or recipe["optimizer"]
    if optimizer == "adamw":
        given = [f"--{k}" for k in MUON_FLAGS if getattr(args, k) is not None]
        if given:
            raise cli.Error(f"{', '.join(given)} only apply to --optimizer muon")
    elif not hasattr(torch.optim, "Muon"):
        raise cli.Error(f"--optimizer muon needs torch.optim.Muon, new in PyTorch 2.9; this is PyTorch {torch.__version__}")
    for k, v in recipe.items():
        if getattr(args, k) is None:
            if v is None and optimizer == "muon":  # --recipe gpt2 --optimizer muon: Muon's settings from modern
                v = recipes["modern"][k]
            setattr(args, k, v)
    if args.max_steps is not None:  # (sft.py knows its own only once it has read the data: build() then)
        args.warmup_steps = cli.steps_of(args.warmup_steps, args.max_steps)
    if args.min_lr > args.max_lr:
        raise cli.Error(f"--min_lr {args.min_lr} is above --max_lr {args.max_lr}")
    return args


def get_lr(step, args):
    """Linear warm-up (step 0 already has lr > 0), then
    cosine: a cosine decay to min_lr at max_steps;
    wsd:    max_lr until the last decay_frac of the steps, then a linear decay whose last step
            (max_steps - 1) runs at min_lr."""
    if step < args.warmup_steps:
        return args.max_lr * (step + 1) / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    if args.schedule == "wsd":
        decay_start = max(args.warmup_steps, args.max_steps - round(args.decay_frac * args.max_steps))
        if step < decay_start:
            return args.max_lr
        return args.max_lr - (args.max_lr - args.min_lr) * (step - decay_start + 1) / (args.max_steps - decay_start)
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


# -----------------------------------------------------------------------------
# Optimizers

EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")


def param_groups(model, args):
    """Parameter names by optimizer group: {"muon": [...], "decay": [...], "no_decay": [...]}.
    muon: the 2-D matrices inside the blocks (under --optimizer muon); decay: AdamW with weight
    decay (the other 2-D tensors: the embeddings, one of them also the lm_head); no_decay:
    biases and LayerNorm (and the embeddings under --no-decay_embeddings)."""
    groups = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if args.optimizer == "muon" and name.endswith(BLOCK_MATRICES) and p.dim() == 2:
            groups["muon"].append(name)
        elif p.dim() >= 2 and (args.decay_embeddings or name not in EMBEDDINGS):
            groups["decay"].append(name)
        else:
            groups["no_decay"].append(name)
    return groups


def build_optimizers(model, args, device_type):
    """[AdamW] or [AdamW, Muon], each group at its peak learning rate (the schedule scales them alike)."""
    named = dict(model.named_parameters())
    groups = param_groups(model, args)
    adamw_groups = [{"params": [named[n] for n in groups["decay"]], "weight_decay": args.weight_decay},
                    {"params": [named[n] for n in groups["no_decay"]], "weight_decay": 0.0}]
    kw = dict(lr=args.max_lr, betas=(0.9, 0.95), eps=1e-8)
    try:  # the fused kernel, where this PyTorch has one for the device
        optimizers = [torch.optim.AdamW(adamw_groups, fused=device_type in ("cuda", "cpu", "mps", "xpu"), **kw)]
    except (RuntimeError, TypeError):
        optimizers = [torch.optim.AdamW(adamw_groups, **kw)]
    if groups["muon"]:
        # match_rms_adamw: the update's RMS is AdamW's, so AdamW-scale learning rates and decay carry over
        optimizers.append(torch.optim.Muon([named[n] for n in groups["muon"]], lr=args.muon_lr, momentum=args.muon_momentum,
                                           weight_decay=args.muon_weight_decay, nesterov=True, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_lr(optimizers, base_lrs, factor):
    for opt, lrs in zip(optimizers, base_lrs):
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr * factor


# -----------------------------------------------------------------------------
# Checkpoints

# The settings that define a run's numbers (with the model config): a --log_dir holds one run,
# and --resume refuses to change any of them.
RUN_SETTINGS = ("seed", "total_batch_size", "max_steps", "warmup_steps", "max_lr", "min_lr", "schedule", "decay_frac",
                "weight_decay", "grad_clip", "dtype", "val_tokens", "optimizer", "decay_embeddings", "zero_init_residual",
                *MUON_FLAGS)
# Settings added later are left out of run.json while they hold the value every older run had,
# so those runs still resume; Muon's only count under muon.
LATER_SETTINGS = {"optimizer": "adamw", "decay_embeddings": True, "zero_init_residual": False,
                  **{k: None for k in MUON_FLAGS}}


def run_settings(args, config, task=None):
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings = {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    return {**settings, **dataclasses.asdict(config), **(task or Pretraining()).settings(args)}


def save_checkpoint(run, step):
    """Rank 0 writes step_NNNNNN/ whole (see rundir.py); the others wait for it, and stop with it
    if it fails (a full disk)."""
    def save():
        state = {"step": step, "optimizer": run.optimizers[0].state_dict(), "scaler": run.scaler.state_dict(),
                 "loader": run.train_loader.state_dict(), "args": vars(run.args), "recipe": run.recipe,
                 "config": dataclasses.asdict(run.raw_model.config)}
        if len(run.optimizers) > 1:
            state["muon"] = run.optimizers[1].state_dict()
        run.run_dir.save(step, run.raw_model, state)
        if run.args.keep_checkpoints > 0:
            run.run_dir.prune(run.args.keep_checkpoints)

    rank0_decides(run, save)
    run.saved_step = step


RANK0_ERRORS = (cli.Error, OSError, FloatingPointError)  # what main() turns into one line


def rank0_decides(run, fn):
    """Run fn() on rank 0 only and give every rank its result; an error there is raised on every
    rank, as the same kind of error (no rank is left waiting in a collective)."""
    result, error = [None], None
    if run.rank == 0:
        try:
            result[0] = ("ok", fn())
        except RANK0_ERRORS as e:
            error = e
            result[0] = ("error", next(i for i, kind in enumerate(RANK0_ERRORS) if isinstance(e, kind)), str(e))
    if run.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if error is not None:
        raise error
    if result[0][0] == "error":
        raise RANK0_ERRORS[result[0][1]](result[0][2])
    return result[0][1]


# -----------------------------------------------------------------------------
# Training


class Run:
    """The run being trained: what the loop needs (model, optimizers, data, log), in one place."""


def setup(args):
    run = Run()
    run.args = args
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    run.rank = int(os.environ.get("RANK", 0))
    run.world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or best_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise cli.Error("--device cuda asked, but CUDA is not available")
        if device == "cuda":  # set_device needs an index: this process's GPU under torchrun, else the first
            device = f"cuda:{local_rank if ddp else 0}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    run.device, run.device_type = device, device.split(":")[0]
    run.comm_device = device if run.device_type == "cuda" else "cpu"  # where collectives' tensors live (nccl, gloo)
    if args.dtype is None:
        args.dtype = default_dtype(run.device)
    if args.compile is None:
        args.compile = run.device_type == "cuda"
    run.ddp = ddp
    if ddp:
        init_process_group("nccl" if run.device_type == "cuda" else "gloo")
    return run


def init_process_group(backend):
    """torchrun's store outlives a restart (--max-restarts) and still holds the dead group's
    addresses under the same keys, so restarted ranks may connect to a dead port or hang. On one
    node each restart gets keys of its own (the restart count); across nodes the counts can
    differ, so there torchrun must be told to make a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: the docstring)."""
    store, rank, world = next(dist.rendezvous("env://"))
    if os.environ.get("LOCAL_WORLD_SIZE") == str(world):
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


class Pretraining:
    """What train.py trains: a new GPT-2 of --model's shape on fineweb.py's token shards (--path).
    sft.py passes its own task (a trained model, conversations) to the same loop."""

    recipes = RECIPES

    def config(self, args):
        overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k) is not None}
        try:
            return GPTConfig.from_preset(args.model, **overrides)
        except ValueError as e:
            raise cli.Error(str(e)) from None

    def loaders(self, args, config, rank, world_size):
        """(train, val) loaders. Validation: micro-step k of rank r scores windows [k*B*world + r*B, +B)
        of the val stream; the first val_tokens // T of them count (the rest of the last micro-step are
        masked out)."""
        T, B, V = config.block_size, args.batch_size_per_device, config.vocab_size
        return (DataLoader(args.path, "train", T, B, args.total_batch_size, rank, world_size, args.seed, V),
                DataLoader(args.path, "val", T, B, B * T * world_size, rank, world_size, args.seed, V))

    def init_model(self, args, config):
        torch.manual_seed(args.seed)  # same initialisation on every rank
        model = GPT(config)
        if args.zero_init_residual:
            with torch.no_grad():
                for block in model.transformer.h:
                    block.attn.c_proj.weight.zero_()
                    block.mlp.c_proj.weight.zero_()
        return model

    def settings(self, args):
        """What run.json records beyond RUN_SETTINGS and the model config."""
        return {}

    def sample_prompt(self, args):
        """(prompt token ids, tokenizer, end token) of the sample printed at each evaluation."""
        enc = get_tokenizer()
        return enc.encode(args.sample_prompt), enc, None


def build(run, task=None):
    args = run.args
    task = run.task = task or Pretraining()
    config = task.config(args)
    T = config.block_size
    run.train_loader, run.val_loader = task.loaders(args, config, run.rank, run.world_size)
    args.warmup_steps = cli.steps_of(args.warmup_steps, args.max_steps)  # (sft.py's "N%": its max_steps is known now)
    run.val_windows = args.val_tokens // T
    if run.val_windows == 0:
        raise cli.Error(f"--val_tokens {args.val_tokens} is less than one sequence of {T} tokens")
    if run.val_windows > run.val_loader.epoch_windows:  # never wrap around: the same tokens twice
        raise cli.Error(f"--val_tokens {args.val_tokens:,} is more than the val shards hold "
                         f"({run.val_loader.epoch_windows * T:,} in whole windows of {T}); pass at most that")
    run.grad_accum = run.train_loader.grad_accum_steps

    # Rank 0 claims the run directory (one run per directory) and, on resume, finds the newest
    # checkpoint that verifies; every rank then loads that one.
    resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0  # a torchrun restart resumes
    run.run_dir = RunDir(args.log_dir)
    settings = run_settings(args, config, task)

    def claim():
        try:
            run.run_dir.claim(settings, resume, LATER_SETTINGS)
            run.run_dir.open_log()
            run.found = run.run_dir.newest_valid(config, muon=args.optimizer == "muon") if resume else None
        except OSError as e:  # the directory cannot be made or read: an input error
            raise cli.Error(str(e)) from None
        return run.found[0] if run.found else None

    resume_from = rank0_decides(run, claim)
    state = None
    if resume_from:
        if run.rank == 0:
            _, model, state = run.found
        else:
            model = load_model(resume_from)
            state = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", weights_only=True)
    else:
        model = task.init_model(args, config)
    run.found = None
    model.to(run.device)
    run.raw_model = model
    run.recipe = {"name": args.recipe, **{k: getattr(args, k) for k in RECIPES[args.recipe]}}  # with the flags given
    run.optimizers = build_optimizers(model, args, run.device_type)
    run.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in run.optimizers]
    run.scaler = torch.amp.GradScaler(run.device_type, enabled=args.dtype == "fp16")
    run.start_step = 0
    run.saved_step = None  # the newest checkpoint of this run, for the Ctrl-C message
    if state is not None:
        run.optimizers[0].load_state_dict(state["optimizer"])
        if len(run.optimizers) > 1:
            run.optimizers[1].load_state_dict(state["muon"])
        run.scaler.load_state_dict(state["scaler"])
        run.train_loader.load_state_dict(state["loader"])
        run.start_step = run.saved_step = state["step"]
    if args.compile:
        model = torch.compile(model)
    run.eval_model = model  # validation: not through DDP (no collectives, ranks may score unequal shares)
    if run.ddp:
        model = DDP(model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if run.device_type == "cuda" else None)
    run.model = model
    run.autocast = torch.autocast(run.device_type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    run.flops_per_token = run.raw_model.flops_per_token(config.block_size)
    run.peak = peak_flops(torch.cuda.get_device_name(run.device), args.dtype) if run.device_type == "cuda" else None
    if resume_from and run.rank == 0:
        print(f"resuming from {resume_from} at step {run.start_step}")
    return run


def log(run, record):
    if run.rank == 0:
        run.run_dir.log(record)


def val_loss(run):
    """Mean loss over the first val_windows windows of the val stream: each rank sums its share
    (token losses x tokens, in float64), then one all-reduce. Exact for any micro-batch or world size."""
    B = run.args.batch_size_per_device
    run.val_loader.reset()
    losses, counts = [], []
    with torch.no_grad():
        for first in range(run.rank * B, run.val_windows + run.rank * B, B * run.world_size):
            x, y = run.val_loader.next_batch()
            rows = max(0, min(B, run.val_windows - first))
            if rows < B:  # windows past val_windows: ignored padding (the shapes stay fixed under compile)
                y = y.clone()
                y[rows:] = -1
            with run.autocast:
                _, loss = run.eval_model(x.to(run.device), y.to(run.device), return_logits=False)
            losses.append(loss.float())
            counts.append(int((y >= 0).sum()))  # rows * T, less the targets a task masks out (sft.py)
    total = torch.tensor([0.0, 0.0], dtype=torch.float64)
    if losses:
        total[0] = torch.stack(losses).cpu().double() @ torch.tensor(counts, dtype=torch.float64)
        total[1] = sum(counts)
    if run.ddp:
        total = total.to(run.comm_device)
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def evaluate(run, step):
    args, model = run.args, run.model
    model.eval()
    loss = val_loss(run)
    log(run, {"step": step, "val_loss": loss, "val_tokens": run.val_windows * run.val_loader.seq_len})
    message = f"step {step:6d} | val loss {loss:.6f}"
    if run.hellaswag is not None:
        import hellaswag

        with run.autocast:  # the raw model: no recompilation for the packed shapes under --compile
            r = hellaswag.evaluate(run.raw_model, run.hellaswag, rank=run.rank, world_size=run.world_size)
        log(run, {"step": step, "hellaswag_acc_norm": r["acc_norm"], "hellaswag_acc": r["acc"], "hellaswag_n": r["n"]})
        message += f" | hellaswag acc_norm {r['acc_norm']:.4f} (n={r['n']})"
    if run.rank == 0:
        print(message)
        if args.sample_tokens > 0:
            ids, enc, end = run.task.sample_prompt(args)
            prompt = torch.tensor([ids], device=run.device)
            with run.autocast:
                out = run.raw_model.generate(prompt, args.sample_tokens, top_k=50, seed=args.seed + step, eos_token_id=end)
            print(f"sample: {enc.decode(out[0].tolist())!r}")
    model.train()


def load_hellaswag(run):
    """HellaSwag val examples for the periodic evaluation, or None (off, or no data offline).
    On for all ranks or for none: a rank that cannot load it turns it off everywhere."""
    n = run.args.hellaswag_examples
    if n == 0:
        return None
    import hellaswag

    try:
        examples = hellaswag.load_examples(hellaswag.data_path("val"))
    except cli.Error as e:
        examples, why = None, str(e)
    if run.ddp:
        ok = torch.tensor(int(examples is not None), device=run.comm_device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if examples is not None and not ok.item():
            examples, why = None, "another rank could not load it"
    if examples is None:
        if run.rank == 0:
            print(f"warning: HellaSwag is off: {why}")
        return None
    return examples if n < 0 else examples[:n]


def params_finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train(run):
    args, model, optimizers = run.args, run.model, run.optimizers
    tokens_per_step = args.total_batch_size
    recent = []  # the last steps' times, for the ETA
    for step in range(run.start_step, args.max_steps + 1):
        # here the model has had `step` updates: evaluate it, checkpoint it, then train step `step`
        run.step = step
        last = step == args.max_steps
        if step % args.eval_step_interval == 0 or last:
            evaluate(run, step)
        if step > run.start_step and (step % args.save_step == 0 or last):
            save_checkpoint(run, step)
        if last:
            break
        t0 = time.time()
        model.train()
        loss_sum = torch.zeros((), device=run.device)
        # The step's loss is the mean over all its targets, whichever micro-step and rank holds them:
        # each micro-batch's mean weighs in by its share of the step's targets (x world_size, as DDP
        # averages the ranks' gradients). Without masked targets the weight is 1 / grad_accum.
        batches = [run.train_loader.next_batch() for _ in range(run.grad_accum)]
        targets = torch.tensor([float((y >= 0).sum()) for _, y in batches], dtype=torch.float64)
        step_targets = targets.sum().to(run.comm_device) if run.ddp else targets.sum()
        if run.ddp:
            dist.all_reduce(step_targets)
        step_targets = step_targets.item()
        for micro, (x, y) in enumerate(batches):
            x, y = x.to(run.device), y.to(run.device)
            if run.ddp:  # all-reduce the gradients only once, on the last micro-step
                model.require_backward_grad_sync = micro == run.grad_accum - 1
            with run.autocast:
                _, loss = model(x, y, return_logits=False)
            share = targets[micro].item() * run.world_size
            loss = loss.float() / (step_targets / share) if share else loss.float() * 0.0
            loss_sum += loss.detach()
            run.scaler.scale(loss).backward()
        if run.ddp:
            dist.all_reduce(loss_sum)  # (SUM: ReduceOp.AVG is missing on gloo in older PyTorch)
            loss_sum /= run.world_size
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite (NaN or inf) train loss {train_loss} at step {step}")
        for opt in optimizers:  # fp16: every optimizer's gradients unscaled before clipping
            run.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.grad_clip).item()
        skipped = not math.isfinite(grad_norm)
        if skipped and not run.scaler.is_enabled():
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {step}")
        lr = get_lr(step, args)
        set_lr(optimizers, run.base_lrs, lr / args.max_lr)
        # One rule for all optimizers: an inf/NaN anywhere in the gradients (an fp16 overflow) and none
        # steps. GradScaler checks each optimizer's own gradients only: AdamW would step beside a Muon
        # overflow (on gradients the clip zeroed) and Muon's orthogonalised update would ignore the clip.
        if not skipped:
            for opt in optimizers:
                run.scaler.step(opt)
        run.scaler.update()  # fp16: backs the scale off after an overflow
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if not params_finite(run.raw_model):
            raise FloatingPointError(f"the update of step {step} (lr {lr:.3e}) made weights non-finite")
        if run.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        recent = (recent + [dt])[-20:]
        tok_s = tokens_per_step / dt
        mfu = tok_s * run.flops_per_token / (run.peak * run.world_size) if run.peak else None
        record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tok_s, "mfu": mfu}
        if len(optimizers) > 1:
            record["muon_lr"] = optimizers[1].param_groups[0]["lr"]
        if skipped:
            record["skipped"] = True  # fp16: inf/NaN gradients, no optimizer stepped
        log(run, record)
        if run.rank == 0:
            eta = duration(sum(recent) / len(recent) * (args.max_steps - step - 1))  # (evaluations not counted)
            print(f"step {step:6d} | loss {train_loss:.6f} | lr {lr:.3e} | norm {grad_norm:.4f} | "
                  f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s" + (f" | mfu {mfu * 100:.1f}%" if mfu else "")
                  + f" | eta {eta}" + (" | skipped (fp16 overflow)" if record.get("skipped") else ""))


def interrupted(run):
    """The line Ctrl-C prints: where the run stopped and where --resume takes it up."""
    step, saved = getattr(run, "step", None), getattr(run, "saved_step", None)
    if step is None:
        return "interrupted before training started"
    again = f"--resume continues from step {saved}" if saved else "no checkpoint yet: --resume starts it again"
    return f"interrupted at step {step}; {again}"


def duration(seconds):
    """1h02m, 3m05s, 42s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def main(argv=None, task=None, parser=None):
    """train.py's entry point; sft.py calls it with its own task and command line."""
    run = None
    task = task or Pretraining()
    try:
        args = parse_args(argv, parser, task.recipes)
        run = setup(args)
        run = build(run, task)
        if run.start_step >= args.max_steps:
            if run.rank == 0:
                print(f"{args.log_dir}: this run has finished ({args.max_steps} steps); nothing to do")
            return 0
        run.hellaswag = load_hellaswag(run)
        if args.sample_tokens > 0:
            task.sample_prompt(args)  # fail now, not at the first evaluation, if the BPE cannot be had
        log(run, {"step": run.start_step, "recipe": run.recipe})
        if run.rank == 0:
            print(f"recipe {args.recipe}: " + ", ".join(f"{k} {v}" for k, v in run.recipe.items()
                                        if v is not None and k != "name"))
            if args.warmup_steps > args.max_steps / 4:
                print(f"warning: the warm-up is {args.warmup_steps} of this run's {args.max_steps} steps; for a short run pass "
                      f"a share, e.g. --warmup_steps 2%")
            print(f"{run.raw_model.num_params():,} parameters | {run.world_size} process(es) on {run.device} | "
                  f"{args.dtype} | grad accumulation {run.grad_accum} | steps {run.start_step}..{args.max_steps}")
        train(run)
    except cli.Error as e:
        return cli.fail(e)
    except FloatingPointError as e:
        print(f"error: {e}; stopping. The last good checkpoint is kept (lower --max_lr, or use bf16/fp32).", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a directory gone: --resume continues from the last checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if run is None or getattr(run, "rank", 0) == 0:
            print(interrupted(run), file=sys.stderr)
        return 130
    finally:
        if run is not None and getattr(run, "run_dir", None) is not None:
            run.run_dir.close()
        if dist.is_initialized():
            # The DDP model holds the process group: let go of it first, or gloo's threads may be
            # torn down with the interpreter (a SIGABRT at exit, seen once on a loaded CI machine).
            if run is not None:
                run.__dict__.clear()
            gc.collect()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
