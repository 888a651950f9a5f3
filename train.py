"""
Train GPT-2 on token shards from fineweb.py: one process, or DDP under torchrun.

    python train.py --path data/small --model gpt2 --n_layer 4 --n_embd 128 ...   # one process
    torchrun --standalone --nproc_per_node=8 train.py --path edu_fineweb10B ...    # 8 GPUs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train.py --resume ...                            # 2 nodes (README)
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --resume ...  # fault tolerant
    torchrun --standalone --nproc_per_node=8 train.py --recipe modern --max_steps 9537 ...  # Muon + wsd (RECIPES)

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
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
from data import DataError, DataLoader
from model import DTYPES, GPT, PRESETS, GPTConfig, ModelLoadError, best_device, default_dtype, get_tokenizer, peak_flops
from rundir import RunDir, RunDirError


class TrainError(Exception):
    """Bad input: printed as one line, no traceback."""


# A recipe is a set of defaults for the flags below; a flag given explicitly wins.
#   gpt2:   the GPT-2 / GPT-3 paper recipe as build-nanogpt replicates it (AdamW, cosine).
#   modern: measured on this repo (README: the modern recipe; bench.py --section recipe), the architecture
#           and checkpoint format unchanged: Muon on the blocks' matrices, warmup-stable-decay.
RECIPES = {
    "gpt2": dict(optimizer="adamw", schedule="cosine", max_lr=6e-4, min_lr=6e-5, warmup_steps=715, decay_frac=0.2,
                 weight_decay=0.1, muon_lr=None, muon_momentum=None, muon_weight_decay=None,
                 decay_embeddings=True, zero_init_residual=False),
    "modern": dict(optimizer="muon", schedule="wsd", max_lr=1.8e-3, min_lr=0.0, warmup_steps=250, decay_frac=0.4,
                   weight_decay=0.1, muon_lr=3e-3, muon_momentum=0.95, muon_weight_decay=0.1,
                   decay_embeddings=True, zero_init_residual=True),
}
MUON_FLAGS = ("muon_lr", "muon_momentum", "muon_weight_decay")


def recipe_help(key):
    return "(default: by --recipe, " + ", ".join(f"{name} {r[key]}" for name, r in RECIPES.items() if r[key] is not None) + ")"


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--path", default="edu_fineweb10B", help="directory of token shards from fineweb.py")
    a("--recipe", choices=list(RECIPES), default="gpt2",
      help="defaults for the optimizer, schedule and learning-rate flags (those whose default is 'by --recipe')")
    a("--max_steps", type=cli.positive_int, default=19073, help="optimizer steps")
    a("--optimizer", choices=["adamw", "muon"], default=None,
      help="adamw everywhere, or muon on the blocks' 2-D matrices and adamw on the rest " + recipe_help("optimizer"))
    a("--warmup_steps", type=cli.non_negative_int, default=None,
      help="linear learning-rate warm-up steps " + recipe_help("warmup_steps"))
    a("--max_lr", type=cli.positive_float, default=None, help="peak learning rate of AdamW " + recipe_help("max_lr"))
    a("--min_lr", type=cli.non_negative_float, default=None,
      help="final learning rate of the decay (Muon's: scaled alike) " + recipe_help("min_lr"))
    a("--schedule", choices=["cosine", "wsd"], default=None,
      help="after the warm-up: cosine decay, or wsd (warmup-stable-decay: constant, then a linear decay) "
      + recipe_help("schedule"))
    a("--decay_frac", type=cli.float_range(0, 1, lo_open=True), default=None,
      help="wsd: the final fraction of the steps that decays to --min_lr " + recipe_help("decay_frac"))
    a("--weight_decay", type=cli.non_negative_float, default=None,
      help="AdamW's decoupled weight decay of matrices and embeddings " + recipe_help("weight_decay"))
    a("--decay_embeddings", action=argparse.BooleanOptionalAction, default=None,
      help="weight decay on the token and position embeddings too " + recipe_help("decay_embeddings"))
    a("--muon_lr", type=cli.positive_float, default=None,
      help="muon: peak learning rate, AdamW-scale (update RMS matched to AdamW's) " + recipe_help("muon_lr"))
    a("--muon_momentum", type=cli.float_range(0, 1, hi_open=True), default=None,
      help="muon: Nesterov momentum " + recipe_help("muon_momentum"))
    a("--muon_weight_decay", type=cli.non_negative_float, default=None,
      help="muon: decoupled weight decay " + recipe_help("muon_weight_decay"))
    a("--zero_init_residual", action=argparse.BooleanOptionalAction, default=None,
      help="start the residual projections (attn.c_proj, mlp.c_proj) at zero " + recipe_help("zero_init_residual"))
    a("--batch_size_per_device", type=cli.positive_int, default=64, help="sequences per process per micro-step")
    a("--total_batch_size", type=cli.positive_int, default=524288, help="tokens per optimizer step")
    a("--eval_step_interval", type=cli.positive_int, default=250, help="validate, HellaSwag and sample every N steps")
    a("--val_tokens", type=cli.positive_int, default=None,
      help="tokens scored at each validation, the same for any layout (default 10,485,760 = 20 x 0.5M)")
    a("--eval_max_steps", type=cli.positive_int, default=None, help="old form of --val_tokens: N x --total_batch_size tokens (default: unset)")
    a("--save_step", type=cli.positive_int, default=5000, help="checkpoint every N steps (and at the end)")
    a("--seed", type=cli.non_negative_int, default=1337, help="seed of the initialisation and the data order")
    a("--fp16", action="store_true", help="fp16 autocast with a gradient scaler (same as --dtype fp16)")
    a("--model", default="gpt2", choices=list(PRESETS), help="architecture preset")
    a("--n_layer", type=cli.positive_int, default=None, help="override the preset's")
    a("--n_head", type=cli.positive_int, default=None, help="override the preset's")
    a("--n_embd", type=cli.positive_int, default=None, help="override the preset's")
    a("--block_size", type=cli.positive_int, default=None, help="context length = training sequence length")
    a("--log_dir", default="log", help="the run's directory (log.jsonl, checkpoints); it holds one run only")
    a("--resume", action="store_true",
      help="continue the run in --log_dir from its newest checkpoint that verifies (or start it there)")
    a("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    a("--dtype", choices=list(DTYPES), default=None, help="default: bf16 where supported, else fp32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")
    a("--hellaswag_examples", type=cli.int_range(-1), default=-1,
      help="HellaSwag val examples per evaluation (0: off, -1: all)")
    a("--grad_clip", type=cli.positive_float, default=1.0, help="clip the gradient norm to this")
    a("--sample_prompt", default="Hello, I'm a language model,", help="prompt of the sample at each evaluation")
    a("--sample_tokens", type=cli.non_negative_int, default=32, help="length of the sample at each evaluation (0: none)")
    a("--keep_checkpoints", type=cli.non_negative_int, default=0, help="keep only this run's newest N checkpoints (0: all)")
    args = p.parse_args(argv)
    if args.fp16:
        args.dtype = "fp16"
    if args.val_tokens is None:
        args.val_tokens = args.eval_max_steps * args.total_batch_size if args.eval_max_steps else 20 * 524288
    recipe = RECIPES[args.recipe]
    optimizer = args.optimizer or recipe["optimizer"]
    if optimizer == "adamw":
        given = [f"--{k}" for k in MUON_FLAGS if getattr(args, k) is not None]
        if given:
            raise TrainError(f"{', '.join(given)} only apply to --optimizer muon")
    elif not hasattr(torch.optim, "Muon"):
        raise TrainError(f"--optimizer muon needs torch.optim.Muon, new in PyTorch 2.9; this is PyTorch {torch.__version__}")
    for k, v in recipe.items():
        if getattr(args, k) is None:
            if v is None and optimizer == "muon":  # --recipe gpt2 --optimizer muon: Muon's settings from modern
                v = RECIPES["modern"][k]
            setattr(args, k, v)
    if args.min_lr > args.max_lr:
        raise TrainError(f"--min_lr {args.min_lr} is above --max_lr {args.max_lr}")
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

MUON_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
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
        if args.optimizer == "muon" and name.endswith(MUON_MATRICES) and p.dim() == 2:
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


def run_settings(args, config):
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings = {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    return {**settings, **dataclasses.asdict(config)}


def save_checkpoint(ctx, step):
    """Rank 0 writes step_NNNNNN/ whole (see rundir.py); the others wait for it."""
    if ctx.rank == 0:
        state = {"step": step, "optimizer": ctx.optimizers[0].state_dict(), "scaler": ctx.scaler.state_dict(),
                 "loader": ctx.train_loader.state_dict(), "args": vars(ctx.args), "recipe": ctx.recipe,
                 "config": dataclasses.asdict(ctx.raw_model.config)}
        if len(ctx.optimizers) > 1:
            state["muon"] = ctx.optimizers[1].state_dict()
        ctx.run_dir.save(step, ctx.raw_model, state)
        if ctx.args.keep_checkpoints > 0:
            ctx.run_dir.prune(ctx.args.keep_checkpoints)
    if ctx.world_size > 1:
        dist.barrier()


def rank0_decides(ctx, fn):
    """Run fn() on rank 0 only and give every rank its result; an error there is raised everywhere
    (no rank is left waiting in a collective)."""
    result = [None]
    if ctx.rank == 0:
        try:
            result[0] = ("ok", fn())
        except (RunDirError, DataError, ModelLoadError, OSError) as e:
            result[0] = ("error", str(e))
    if ctx.world_size > 1:
        dist.broadcast_object_list(result, src=0)
    if result[0][0] == "error":
        raise TrainError(result[0][1])
    return result[0][1]


# -----------------------------------------------------------------------------
# Training


class Context:
    """What the loop needs, in one place."""


def setup(args):
    ctx = Context()
    ctx.args = args
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    ctx.rank = int(os.environ.get("RANK", 0))
    ctx.world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = args.device or best_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda asked, but CUDA is not available")
        if device == "cuda":  # set_device needs an index: this process's GPU under torchrun, else the first
            device = f"cuda:{local_rank if ddp else 0}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for whatever runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    ctx.device, ctx.device_type = device, device.split(":")[0]
    ctx.comm_device = device if ctx.device_type == "cuda" else "cpu"  # where collectives' tensors live (nccl, gloo)
    if args.dtype is None:
        args.dtype = default_dtype(ctx.device)
    if args.compile is None:
        args.compile = ctx.device_type == "cuda"
    ctx.ddp = ddp
    if ddp:
        init_process_group("nccl" if ctx.device_type == "cuda" else "gloo")
    return ctx


def init_process_group(backend):
    """torchrun's store outlives a restart (--max-restarts) and still holds the dead group's
    addresses under the same keys, so restarted ranks may connect to a dead port or hang. On one
    node each restart gets keys of its own (the restart count); across nodes the counts can
    differ, so there torchrun must be told to make a fresh store (README: multi-node)."""
    store, rank, world = next(dist.rendezvous("env://"))
    if os.environ.get("LOCAL_WORLD_SIZE") == str(world):
        store = dist.PrefixStore(f"restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def build(ctx):
    args = ctx.args
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k) is not None}
    try:
        config = GPTConfig.from_preset(args.model, **overrides)
    except ValueError as e:
        raise TrainError(str(e)) from None
    T, B = config.block_size, args.batch_size_per_device
    V = config.vocab_size
    ctx.train_loader = DataLoader(args.path, "train", T, B, args.total_batch_size, ctx.rank, ctx.world_size, args.seed, V)
    # Validation: micro-step k of rank r scores windows [k*B*world + r*B, +B) of the val stream,
    # the first val_windows of them count (the rest of the last micro-step are masked out).
    ctx.val_loader = DataLoader(args.path, "val", T, B, B * T * ctx.world_size, ctx.rank, ctx.world_size, args.seed, V)
    ctx.val_windows = args.val_tokens // T
    if ctx.val_windows == 0:
        raise TrainError(f"--val_tokens {args.val_tokens} is less than one sequence of {T} tokens")
    if ctx.val_windows > ctx.val_loader.epoch_windows:  # never wrap around: the same tokens twice
        raise TrainError(f"--val_tokens {args.val_tokens:,} is more than the val shards hold "
                         f"({ctx.val_loader.epoch_windows * T:,} in whole windows of {T}); pass at most that")
    ctx.grad_accum = ctx.train_loader.grad_accum_steps

    # Rank 0 claims the run directory (one run per directory) and, on resume, finds the newest
    # checkpoint that verifies; every rank then loads that one.
    resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0  # a torchrun restart resumes
    ctx.run_dir = RunDir(args.log_dir)
    settings = run_settings(args, config)

    def claim():
        ctx.run_dir.claim(settings, resume)
        ctx.run_dir.open_log()
        ctx.found = ctx.run_dir.newest_valid(config) if resume else None
        return ctx.found[0] if ctx.found else None

    resume_from = rank0_decides(ctx, claim)
    state = None
    if resume_from:
        if ctx.rank == 0:
            _, model, state = ctx.found
        else:
            model = GPT.from_pretrained(resume_from)
            state = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", weights_only=True)
    else:
        torch.manual_seed(args.seed)  # same initialisation on every rank
        model = GPT(config)
        if args.zero_init_residual:
            with torch.no_grad():
                for block in model.transformer.h:
                    block.attn.c_proj.weight.zero_()
                    block.mlp.c_proj.weight.zero_()
    ctx.found = None
    model.to(ctx.device)
    ctx.raw_model = model
    ctx.recipe = {"name": args.recipe, **{k: getattr(args, k) for k in RECIPES[args.recipe]}}  # with the flags given
    ctx.optimizers = build_optimizers(model, args, ctx.device_type)
    ctx.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in ctx.optimizers]
    ctx.scaler = torch.amp.GradScaler(ctx.device_type, enabled=args.dtype == "fp16")
    ctx.start_step = 0
    if state is not None:
        ctx.optimizers[0].load_state_dict(state["optimizer"])
        if len(ctx.optimizers) > 1:
            ctx.optimizers[1].load_state_dict(state["muon"])
        ctx.scaler.load_state_dict(state["scaler"])
        ctx.train_loader.load_state_dict(state["loader"])
        ctx.start_step = state["step"]
    if args.compile:
        model = torch.compile(model)
    ctx.eval_model = model  # validation: not through DDP (no collectives, ranks may score unequal shares)
    if ctx.ddp:
        model = DDP(model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if ctx.device_type == "cuda" else None)
    ctx.model = model
    ctx.autocast = torch.autocast(ctx.device_type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    ctx.flops_per_token = ctx.raw_model.flops_per_token(config.block_size)
    ctx.peak = peak_flops(torch.cuda.get_device_name(ctx.device), args.dtype) if ctx.device_type == "cuda" else None
    if resume_from and ctx.rank == 0:
        print(f"resuming from {resume_from} at step {ctx.start_step}")
    return ctx


def log(ctx, record):
    if ctx.rank == 0:
        ctx.run_dir.log(record)


def val_loss(ctx):
    """Mean loss over the first val_windows windows of the val stream: each rank sums its share
    (token losses x tokens, in float64), then one all-reduce. Exact for any micro-batch or world size."""
    B, T = ctx.args.batch_size_per_device, ctx.val_loader.seq_len
    ctx.val_loader.reset()
    losses, counts = [], []
    with torch.no_grad():
        for first in range(ctx.rank * B, ctx.val_windows + ctx.rank * B, B * ctx.world_size):
            x, y = ctx.val_loader.next_batch()
            rows = max(0, min(B, ctx.val_windows - first))
            if rows < B:  # windows past val_windows: ignored padding (the shapes stay fixed under compile)
                y = y.clone()
                y[rows:] = -1
            with ctx.autocast:
                _, loss = ctx.eval_model(x.to(ctx.device), y.to(ctx.device), return_logits=False)
            losses.append(loss.float())
            counts.append(rows * T)
    total = torch.tensor([0.0, 0.0], dtype=torch.float64)
    if losses:
        total[0] = torch.stack(losses).cpu().double() @ torch.tensor(counts, dtype=torch.float64)
        total[1] = sum(counts)
    if ctx.ddp:
        total = total.to(ctx.comm_device)
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def evaluate(ctx, step):
    args, model = ctx.args, ctx.model
    model.eval()
    loss = val_loss(ctx)
    log(ctx, {"step": step, "val_loss": loss, "val_tokens": ctx.val_windows * ctx.val_loader.seq_len})
    message = f"step {step:6d} | val loss {loss:.6f}"
    if ctx.hellaswag is not None:
        import hellaswag

        with ctx.autocast:  # the raw model: no recompilation for the packed shapes under --compile
            r = hellaswag.evaluate(ctx.raw_model, ctx.hellaswag, rank=ctx.rank, world_size=ctx.world_size)
        log(ctx, {"step": step, "hellaswag_acc_norm": r["acc_norm"], "hellaswag_acc": r["acc"], "hellaswag_n": r["n"]})
        message += f" | hellaswag acc_norm {r['acc_norm']:.4f} (n={r['n']})"
    if ctx.rank == 0:
        print(message)
        if args.sample_tokens > 0:
            enc = get_tokenizer()
            prompt = torch.tensor([enc.encode(args.sample_prompt)], device=ctx.device)
            with ctx.autocast:
                out = ctx.raw_model.generate(prompt, args.sample_tokens, top_k=50, seed=args.seed + step)
            print(f"sample: {enc.decode(out[0].tolist())!r}")
    model.train()


def load_hellaswag(ctx):
    """HellaSwag val examples for the periodic evaluation, or None (off, or no data offline).
    On for all ranks or for none: a rank that cannot load it turns it off everywhere."""
    n = ctx.args.hellaswag_examples
    if n == 0:
        return None
    import hellaswag

    try:
        examples = hellaswag.load_examples(hellaswag.data_path("val"))
    except hellaswag.HellaSwagError as e:
        examples, why = None, str(e)
    if ctx.ddp:
        ok = torch.tensor(int(examples is not None), device=ctx.comm_device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if examples is not None and not ok.item():
            examples, why = None, "another rank could not load it"
    if examples is None:
        if ctx.rank == 0:
            print(f"warning: HellaSwag is off: {why}")
        return None
    return examples if n < 0 else examples[:n]


def params_finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train(ctx):
    args, model, optimizers = ctx.args, ctx.model, ctx.optimizers
    tokens_per_step = args.total_batch_size
    recent = []  # the last steps' times, for the ETA
    for step in range(ctx.start_step, args.max_steps + 1):
        # here the model has had `step` updates: evaluate it, checkpoint it, then train step `step`
        last = step == args.max_steps
        if step % args.eval_step_interval == 0 or last:
            evaluate(ctx, step)
        if step > ctx.start_step and (step % args.save_step == 0 or last):
            save_checkpoint(ctx, step)
        if last:
            break
        t0 = time.time()
        model.train()
        loss_sum = torch.zeros((), device=ctx.device)
        for micro in range(ctx.grad_accum):
            x, y = (t.to(ctx.device) for t in ctx.train_loader.next_batch())
            if ctx.ddp:  # all-reduce the gradients only once, on the last micro-step
                model.require_backward_grad_sync = micro == ctx.grad_accum - 1
            with ctx.autocast:
                _, loss = model(x, y, return_logits=False)
            loss = loss.float() / ctx.grad_accum
            loss_sum += loss.detach()
            ctx.scaler.scale(loss).backward()
        if ctx.ddp:
            dist.all_reduce(loss_sum)  # (SUM: ReduceOp.AVG is missing on gloo in older PyTorch)
            loss_sum /= ctx.world_size
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite (NaN or inf) train loss {train_loss} at step {step}")
        for opt in optimizers:  # fp16: every optimizer's gradients unscaled before clipping
            ctx.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.raw_model.parameters(), args.grad_clip).item()
        if not math.isfinite(grad_norm) and not ctx.scaler.is_enabled():  # (fp16: the scaler skips the step)
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {step}")
        lr = get_lr(step, args)
        set_lr(optimizers, ctx.base_lrs, lr / args.max_lr)
        scale_before = ctx.scaler.get_scale() if ctx.scaler.is_enabled() else None
        for opt in optimizers:
            ctx.scaler.step(opt)
        ctx.scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if not params_finite(ctx.raw_model):
            raise FloatingPointError(f"the update of step {step} (lr {lr:.3e}) made weights non-finite")
        if ctx.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        recent = (recent + [dt])[-20:]
        tok_s = tokens_per_step / dt
        mfu = tok_s * ctx.flops_per_token / (ctx.peak * ctx.world_size) if ctx.peak else None
        record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tok_s, "mfu": mfu}
        if len(optimizers) > 1:
            record["muon_lr"] = optimizers[1].param_groups[0]["lr"]
        if scale_before is not None and ctx.scaler.get_scale() < scale_before:
            record["skipped"] = True  # fp16: inf/NaN gradients, the scaler skipped this step
        log(ctx, record)
        if ctx.rank == 0:
            eta = duration(sum(recent) / len(recent) * (args.max_steps - step - 1))  # (evaluations not counted)
            print(f"step {step:6d} | loss {train_loss:.6f} | lr {lr:.3e} | norm {grad_norm:.4f} | "
                  f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s" + (f" | mfu {mfu * 100:.1f}%" if mfu else "")
                  + f" | eta {eta}" + (" | skipped (fp16 overflow)" if record.get("skipped") else ""))


def duration(seconds):
    """1h02m, 3m05s, 42s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def main(argv=None):
    ctx = None
    try:
        args = parse_args(argv)
        ctx = setup(args)
        ctx = build(ctx)
        if ctx.start_step >= args.max_steps:
            if ctx.rank == 0:
                print(f"{args.log_dir}: this run has finished ({args.max_steps} steps); nothing to do")
            return 0
        ctx.hellaswag = load_hellaswag(ctx)
        if args.sample_tokens > 0:
            get_tokenizer()  # fail now, not at the first evaluation, if the BPE cannot be had
        log(ctx, {"step": ctx.start_step, "recipe": ctx.recipe})
        if ctx.rank == 0:
            print(f"recipe {args.recipe}: " + ", ".join(f"{k} {v}" for k, v in ctx.recipe.items()
                                        if v is not None and k != "name"))
            print(f"{ctx.raw_model.num_params():,} parameters | {ctx.world_size} process(es) on {ctx.device} | "
                  f"{args.dtype} | grad accumulation {ctx.grad_accum} | steps {ctx.start_step}..{args.max_steps}")
        train(ctx)
    except (TrainError, DataError, ModelLoadError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}; stopping. The last good checkpoint is kept (lower --max_lr, or use bf16/fp32).", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a directory gone: --resume continues from the last checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if ctx is not None and getattr(ctx, "run_dir", None) is not None:
            ctx.run_dir.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
