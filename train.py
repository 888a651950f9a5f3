"""
Train GPT-2 on token shards from fineweb.py: one process, or DDP under torchrun.

    python train.py --path data/small --model gpt2 --n_layer 4 --n_embd 128 ...   # one process
    torchrun --standalone --nproc_per_node=8 train.py --path edu_fineweb10B ...    # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py --resume ...  # fault tolerant

Every optimizer step sees total_batch_size tokens: batch_size_per_device sequences of block_size
tokens per process per micro-step, accumulated over total / (batch x block x world) micro-steps.
The data loader makes the global batch of step k independent of the number of processes and of
the micro-batch, so those settings change speed, not the numbers.

Writes <log_dir>/log.jsonl (one JSON object per line: train, val and HellaSwag results) and
checkpoints <log_dir>/step_NNNNNN/ (config.json + model.safetensors, loadable by transformers,
plus trainer_state.pt: optimizer, scaler, loader, RNG of every rank). --resume continues from the
newest one exactly: on CPU, the same loss at every step as an uninterrupted run.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import DataError, DataLoader
from model import (DTYPES, GPT, PRESETS, GPTConfig, ModelLoadError, best_device, checkpoint_dirs, default_dtype,
                   get_tokenizer, peak_flops)


class TrainError(Exception):
    """Bad input: printed as one line, no traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--path", default="edu_fineweb10B", help="directory of token shards from fineweb.py")
    a("--max_steps", type=int, default=19073, help="optimizer steps")
    a("--warmup_steps", type=int, default=715, help="linear learning-rate warm-up steps")
    a("--max_lr", type=float, default=6e-4, help="peak learning rate")
    a("--min_lr", type=float, default=6e-5, help="final learning rate of the cosine decay")
    a("--batch_size_per_device", type=int, default=64, help="sequences per process per micro-step")
    a("--total_batch_size", type=int, default=524288, help="tokens per optimizer step")
    a("--eval_step_interval", type=int, default=250, help="validate, HellaSwag and sample every N steps")
    a("--eval_max_steps", type=int, default=20, help="validation batches per evaluation")
    a("--save_step", type=int, default=5000, help="checkpoint every N steps (and at the end)")
    a("--seed", type=int, default=1337)
    a("--fp16", action="store_true", help="fp16 autocast with a gradient scaler (same as --dtype fp16)")
    a("--model", default="gpt2", choices=list(PRESETS), help="architecture preset")
    a("--n_layer", type=int, default=None)
    a("--n_head", type=int, default=None)
    a("--n_embd", type=int, default=None)
    a("--block_size", type=int, default=None, help="context length = training sequence length")
    a("--log_dir", default="log")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --log_dir (if any)")
    a("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    a("--dtype", choices=list(DTYPES), default=None, help="default: bf16 where supported, else fp32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on for CUDA)")
    a("--hellaswag_examples", type=int, default=-1, help="HellaSwag val examples per evaluation (0: off, -1: all)")
    a("--weight_decay", type=float, default=0.1)
    a("--grad_clip", type=float, default=1.0)
    a("--sample_prompt", default="Hello, I'm a language model,")
    a("--sample_tokens", type=int, default=32, help="length of the sample at each evaluation (0: none)")
    a("--keep_checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    args = p.parse_args(argv)
    if args.fp16:
        args.dtype = "fp16"
    for name in ("max_steps", "batch_size_per_device", "total_batch_size", "eval_step_interval",
                 "eval_max_steps", "save_step"):
        if getattr(args, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.max_lr > 0 or not args.min_lr >= 0 or args.min_lr > args.max_lr:
        raise TrainError(f"learning rates must satisfy 0 <= min_lr <= max_lr and max_lr > 0 "
                         f"(got --max_lr {args.max_lr}, --min_lr {args.min_lr})")
    if args.warmup_steps < 0:
        raise TrainError(f"--warmup_steps must not be negative, got {args.warmup_steps}")
    return args


def get_lr(step, args):
    """Linear warm-up (step 0 already has lr > 0), then cosine decay to min_lr at max_steps."""
    if step < args.warmup_steps:
        return args.max_lr * (step + 1) / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints


def rng_state():
    np_state, py_state = np.random.get_state(), random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(py_state[1]), "python_version": py_state[0],
             "python_gauss": py_state[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(log_dir):
    """Complete checkpoint directories (weights and trainer state), oldest first."""
    return checkpoint_dirs(log_dir, ("config.json", "model.safetensors", "trainer_state.pt"))


def save_checkpoint(ctx, step):
    """All ranks call this (RNG states are gathered); rank 0 writes into a temporary directory
    and renames it, so a step_NNNNNN/ directory is always complete."""
    rngs = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if ctx.rank == 0:
        final = os.path.join(ctx.args.log_dir, f"step_{step:06d}")
        tmp = os.path.join(ctx.args.log_dir, f".tmp-step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.raw_model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": ctx.optimizer.state_dict(), "scaler": ctx.scaler.state_dict(),
                    "loader": ctx.train_loader.state_dict(), "rng": rngs, "args": vars(ctx.args),
                    "config": dataclasses.asdict(ctx.raw_model.config)}, os.path.join(tmp, "trainer_state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        if ctx.args.keep_checkpoints > 0:
            for old in checkpoints(ctx.args.log_dir)[: -ctx.args.keep_checkpoints]:
                shutil.rmtree(old)
    if ctx.world_size > 1:
        dist.barrier()


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
    if args.dtype is None:
        args.dtype = default_dtype(ctx.device)
    if args.compile is None:
        args.compile = ctx.device_type == "cuda"
    ctx.ddp = ddp
    if ddp:
        dist.init_process_group("nccl" if ctx.device_type == "cuda" else "gloo")
    return ctx


def build(ctx):
    args = ctx.args
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(args, k)}
    try:
        config = GPTConfig.from_preset(args.model, **overrides)
    except ValueError as e:
        raise TrainError(str(e)) from None
    T, B = config.block_size, args.batch_size_per_device
    ctx.train_loader = DataLoader(args.path, "train", T, B, args.total_batch_size, ctx.rank, ctx.world_size, args.seed)
    ctx.val_loader = DataLoader(args.path, "val", T, B, B * T * ctx.world_size, ctx.rank, ctx.world_size, args.seed)
    ctx.grad_accum = ctx.train_loader.grad_accum_steps

    resume_from = None
    if args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:  # a torchrun restart resumes
        found = checkpoints(args.log_dir)
        resume_from = found[-1] if found else None
    state = None
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), map_location="cpu", weights_only=True)
        for field, value in dataclasses.asdict(config).items():
            if state["config"].get(field) != value:
                raise TrainError(f"cannot resume from {resume_from}: its {field} is {state['config'].get(field)}, "
                                 f"this run's is {value}; use the checkpoint's settings or another --log_dir")

    torch.manual_seed(args.seed)  # same initialisation on every rank
    model = GPT(config) if state is None else GPT.from_pretrained(resume_from)
    model.to(ctx.device)
    ctx.raw_model = model
    ctx.optimizer = model.configure_optimizers(args.weight_decay, args.max_lr, device_type=ctx.device_type)
    ctx.scaler = torch.amp.GradScaler(ctx.device_type, enabled=args.dtype == "fp16")
    ctx.start_step = 0
    if state is not None:
        ctx.optimizer.load_state_dict(state["optimizer"])
        ctx.scaler.load_state_dict(state["scaler"])
        ctx.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
        ctx.start_step = state["step"]
    if args.compile:
        model = torch.compile(model)
    if ctx.ddp:
        model = DDP(model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if ctx.device_type == "cuda" else None)
    ctx.model = model
    ctx.autocast = torch.autocast(ctx.device_type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    ctx.flops_per_token = ctx.raw_model.flops_per_token(config.block_size)
    ctx.peak = peak_flops(torch.cuda.get_device_name(ctx.device)) if ctx.device_type == "cuda" else None
    if resume_from and ctx.rank == 0:
        print(f"resuming from {resume_from} at step {ctx.start_step}")
    return ctx


def log(ctx, record):
    if ctx.rank == 0:
        with open(os.path.join(ctx.args.log_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(ctx, step):
    args, model = ctx.args, ctx.model
    model.eval()
    ctx.val_loader.reset()
    total = torch.zeros((), device=ctx.device)
    with torch.no_grad():
        for _ in range(args.eval_max_steps):
            x, y = (t.to(ctx.device) for t in ctx.val_loader.next_batch())
            with ctx.autocast:
                _, loss = model(x, y, return_logits=False)
            total += loss.float() / args.eval_max_steps
    if ctx.ddp:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    log(ctx, {"step": step, "val_loss": total.item()})
    message = f"step {step:6d} | val loss {total.item():.6f}"
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
    """HellaSwag val examples for the periodic evaluation, or None (off, or no data offline)."""
    n = ctx.args.hellaswag_examples
    if n == 0:
        return None
    import hellaswag

    try:
        examples = hellaswag.load_examples(hellaswag.data_path("val"))
    except hellaswag.HellaSwagError as e:
        if ctx.rank == 0:
            print(f"warning: HellaSwag is off: {e}")
        return None
    return examples if n < 0 else examples[:n]


def train(ctx):
    args, model, opt = ctx.args, ctx.model, ctx.optimizer
    tokens_per_step = args.total_batch_size
    for step in range(ctx.start_step, args.max_steps):
        if step % args.eval_step_interval == 0 or step == args.max_steps - 1:
            evaluate(ctx, step)
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
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        train_loss = loss_sum.item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite (NaN or inf) train loss {train_loss} at step {step}")
        ctx.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(ctx.raw_model.parameters(), args.grad_clip).item()
        lr = get_lr(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        scale_before = ctx.scaler.get_scale() if ctx.scaler.is_enabled() else None
        ctx.scaler.step(opt)
        ctx.scaler.update()
        opt.zero_grad(set_to_none=True)
        if ctx.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tok_s = tokens_per_step / dt
        mfu = tok_s * ctx.flops_per_token / (ctx.peak * ctx.world_size) if ctx.peak else None
        record = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tok_s, "mfu": mfu}
        if scale_before is not None and ctx.scaler.get_scale() < scale_before:
            record["skipped"] = True  # fp16: inf/NaN gradients, the scaler skipped this step
        log(ctx, record)
        if ctx.rank == 0:
            print(f"step {step:6d} | loss {train_loss:.6f} | lr {lr:.3e} | norm {grad_norm:.4f} | "
                  f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s" + (f" | mfu {mfu * 100:.1f}%" if mfu else "")
                  + (" | skipped (fp16 overflow)" if record.get("skipped") else ""))
        if (step + 1) % args.save_step == 0 or step == args.max_steps - 1:
            save_checkpoint(ctx, step + 1)


def main(argv=None):
    try:
        args = parse_args(argv)
        ctx = setup(args)
        ctx = build(ctx)
        os.makedirs(args.log_dir, exist_ok=True)
        ctx.hellaswag = load_hellaswag(ctx)
        if args.sample_tokens > 0:
            get_tokenizer()  # fail now, not at the first evaluation, if the BPE cannot be had
        if ctx.rank == 0:
            print(f"{ctx.raw_model.num_params():,} parameters | {ctx.world_size} process(es) on {ctx.device} | "
                  f"{args.dtype} | grad accumulation {ctx.grad_accum} | steps {ctx.start_step}..{args.max_steps}")
        train(ctx)
    except (TrainError, DataError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}; stopping. The last good checkpoint is kept (lower --max_lr, or use bf16/fp32).", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
