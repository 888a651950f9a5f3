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

Read it in order: TrainConfig (every setting and its flag), train_step (one optimizer step), fit (the
loop around it), main (train.py's model and data; sft.py brings its own).
"""

import dataclasses
import math
import os
import sys
import time
from argparse import BooleanOptionalAction
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cli
import fsdp
import runtime
from data import DataLoader
from model import GPT, PRESETS, GPTConfig
from model_io import get_tokenizer
from optim import build_optimizers, get_lr, set_lr
import rundir
from runtime import DTYPES

# A recipe is a set of defaults for the flags marked "by --recipe"; a flag given explicitly wins. A step count in
# a recipe that any run length may use is a share of --max_steps ("1.3%": 248 of the default 19,073 steps).
#   gpt2:   the GPT-2 / GPT-3 paper recipe as build-nanogpt replicates it (AdamW, cosine).
#   modern: tuned on this repo (README: the modern recipe; bench.py --section recipe), the architecture
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
NEW = object()  # a setting every run has had


def setting(default=None, help="", type=None, *, run=False, older=NEW, recipe=False, flag=True, **argparse_kw):
    """A TrainConfig field and its flag. run: it defines the run's numbers (run.json; --resume refuses a
    change). older: the value runs from before the setting existed had (run.json leaves it out while it
    holds that value, so they still resume). recipe: its default comes from --recipe. flag: False for a
    field the script fills in itself."""
    return field(default=default, metadata=dict(help=help, type=type, run=run, older=older, recipe=recipe,
                                                flag=flag, argparse=argparse_kw))


@dataclass(kw_only=True)
class TrainConfig:
    """Every setting of a training run, each the flag of the same name (train.py's and sft.py's)."""
    recipe: str = setting("gpt2", "defaults for the optimizer, schedule and learning-rate flags (those whose "
                          "default is 'by --recipe')", choices=list(RECIPES))
    max_steps: int = setting(19073, "optimizer steps", cli.positive_int, run=True)
    optimizer: str = setting(None, "adamw everywhere, or muon on the blocks' 2-D matrices and adamw on the rest",
                             run=True, older="adamw", recipe=True, choices=["adamw", "muon"])
    warmup_steps: int = setting(None, "linear learning-rate warm-up: steps, or a share of --max_steps such as 2%",
                                cli.steps_or_percent, run=True, recipe=True)
    max_lr: float = setting(None, "peak learning rate of AdamW", cli.positive_float, run=True, recipe=True)
    min_lr: float = setting(None, "final learning rate of the decay (Muon's: scaled alike)", cli.non_negative_float,
                            run=True, recipe=True)
    schedule: str = setting(None, "after the warm-up: cosine decay, or wsd (warmup-stable-decay: constant, then a "
                            "linear decay)", run=True, recipe=True, choices=["cosine", "wsd"])
    decay_frac: float = setting(None, "wsd: the final fraction of the steps that decays to --min_lr",
                                cli.float_range(0, 1, lo_open=True), run=True, recipe=True)
    weight_decay: float = setting(None, "AdamW's decoupled weight decay of matrices and embeddings",
                                  cli.non_negative_float, run=True, recipe=True)
    decay_embeddings: bool = setting(None, "weight decay on the token and position embeddings too", run=True,
                                     older=True, recipe=True, action=BooleanOptionalAction)
    muon_lr: float = setting(None, "muon: peak learning rate, AdamW-scale (update RMS matched to AdamW's)",
                             cli.positive_float, run=True, older=None, recipe=True)
    muon_momentum: float = setting(None, "muon: Nesterov momentum", cli.float_range(0, 1, hi_open=True), run=True,
                                   older=None, recipe=True)
    muon_weight_decay: float = setting(None, "muon: decoupled weight decay", cli.non_negative_float, run=True,
                                       older=None, recipe=True)
    zero_init_residual: bool = setting(None, "start the residual projections (attn.c_proj, mlp.c_proj) at zero",
                                       run=True, older=False, recipe=True, action=BooleanOptionalAction)
    total_batch_size: int = setting(524288, "tokens per optimizer step", cli.positive_int, run=True)
    batch_size_per_device: int = setting(64, "sequences per process per micro-step", cli.positive_int)
    val_tokens: int = setting(None, "tokens scored at each validation, the same for any layout (default 10,485,760 = "
                              "20 x 0.5M)", cli.positive_int, run=True)
    eval_step_interval: int = setting(250, "validate, HellaSwag and sample every N steps", cli.positive_int)
    hellaswag_examples: int = setting(-1, "HellaSwag val examples per evaluation (0: off, -1: all)", cli.int_range(-1))
    sample_prompt: str = setting("Hello, I'm a language model,", "prompt of the sample at each evaluation")
    sample_tokens: int = setting(32, "length of the sample at each evaluation (0: none)", cli.non_negative_int)
    save_step: int = setting(5000, "checkpoint every N steps (and at the end)", cli.positive_int)
    keep_checkpoints: int = setting(0, "keep only this run's newest N checkpoints (0: all)", cli.non_negative_int)
    seed: int = setting(1337, "seed of the initialisation and the data order", cli.non_negative_int, run=True)
    log_dir: str = setting("log", "the run's directory (log.jsonl, checkpoints); it holds one run only")
    resume: bool = setting(False, "continue the run in --log_dir from its newest checkpoint that verifies (or start "
                           "it there)", action="store_true")
    device: str = setting(None, "cuda, mps or cpu (default: the best available)", cli.device)
    dtype: str = setting(None, "autocast dtype; fp16 adds a gradient scaler (default: bf16 where supported, else fp32)",
                         run=True, choices=list(DTYPES))
    compile: bool = setting(None, "torch.compile (default: on for CUDA)", action=BooleanOptionalAction)
    grad_clip: float = setting(1.0, "clip the gradient norm to this", cli.positive_float, run=True)
    fsdp: bool = setting(False, "shard parameters, gradients and optimizer state across the processes (FSDP2) "
                         "instead of DDP's copy on each: for models that do not fit one GPU", action="store_true")


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """train.py's: a new GPT-2 of --model's shape on fineweb.py's token shards."""
    path: str = setting("edu_fineweb10B", "directory of token shards from fineweb.py")
    model: str = setting("gpt2", "architecture preset", choices=list(PRESETS))
    n_layer: int = setting(None, f"layers (default: --model's, gpt2 {PRESETS['gpt2']['n_layer']})", cli.positive_int)
    n_head: int = setting(None, f"attention heads (default: --model's, gpt2 {PRESETS['gpt2']['n_head']})",
                          cli.positive_int)
    n_embd: int = setting(None, f"width (default: --model's, gpt2 {PRESETS['gpt2']['n_embd']})", cli.positive_int)
    block_size: int = setting(None, "context length = training sequence length (default: --model's, gpt2 "
                              f"{GPTConfig.block_size})", cli.positive_int)
    eval_max_steps: int = setting(None, "old form of --val_tokens: N x --total_batch_size tokens (default: unset)",
                                  cli.positive_int)


def recipe_help(key, recipes):
    given = [f"{name} {r[key]}" for name, r in recipes.items() if r[key] is not None]
    return "(default: by --recipe, " + ", ".join(given) + ")"


def parser(config_class=PretrainConfig, recipes=RECIPES, description=__doc__):
    """The command line of a config class: one flag per field, in the order of the fields."""
    p = cli.Parser(description=description)
    own = [f for f in dataclasses.fields(config_class) if f.name not in TrainConfig.__annotations__]
    for f in own + [f for f in dataclasses.fields(config_class) if f not in own]:  # the script's own flags first
        m = f.metadata
        if not m["flag"]:
            continue
        text = m["help"] + (" " + recipe_help(f.name, recipes) if m["recipe"] else "")
        kw = dict(default=f.default, help=text.replace("%", "%%"), **m["argparse"])
        also = kw.pop("also", ())  # more option strings
        if m["type"] is not None:
            kw["type"] = m["type"]
        p.add_argument(f"--{f.name}", *also, **kw)
    return p


def parse_args(argv=None, config_class=PretrainConfig, recipes=RECIPES, p=None):
    """Parse a command line into a config (train.py's, or sft.py's) and fill in what the recipe decides."""
    args = (p or parser(config_class, recipes)).parse_args(argv)
    cfg = config_class(**vars(args))
    if cfg.val_tokens is None and isinstance(cfg, PretrainConfig):
        cfg.val_tokens = cfg.eval_max_steps * cfg.total_batch_size if cfg.eval_max_steps else 20 * 524288
    recipe = recipes[cfg.recipe]
    optimizer = cfg.optimizer or recipe["optimizer"]
    if optimizer == "adamw":
        given = [f"--{k}" for k in MUON_FLAGS if getattr(cfg, k) is not None]
        if given:
            raise cli.Error(f"{', '.join(given)} only apply to --optimizer muon")
    elif not hasattr(torch.optim, "Muon"):
        raise cli.Error("--optimizer muon needs torch.optim.Muon, new in PyTorch 2.9; "
                        f"this is PyTorch {torch.__version__}")
    for k, v in recipe.items():
        if getattr(cfg, k) is None:
            if v is None and optimizer == "muon":  # --recipe gpt2 --optimizer muon: Muon's settings from modern
                v = RECIPES["modern"][k]
            setattr(cfg, k, v)
    if cfg.max_steps is not None:  # (sft.py knows its own only once it has read the data: fit() then)
        cfg.warmup_steps = cli.steps_of(cfg.warmup_steps, cfg.max_steps)
    if cfg.fsdp and (cfg.optimizer == "muon" or cfg.dtype == "fp16"):
        what = "--optimizer muon (it orthogonalises whole matrices)" if cfg.optimizer == "muon" else "--dtype fp16"
        raise cli.Error(f"--fsdp does not take {what}: use --optimizer adamw with --dtype bf16 or fp32")
    if cfg.min_lr > cfg.max_lr:
        raise cli.Error(f"--min_lr {cfg.min_lr} is above --max_lr {cfg.max_lr}")
    return cfg


def run_settings(cfg, config, extra=None):
    """What run.json records: the fields marked run (less those at their `older` value), the model's
    config, and the script's extra identity (sft.py's data)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.metadata["run"] and getattr(cfg, f.name) != f.metadata["older"]}
    return {**settings, **dataclasses.asdict(config), **(extra or {})}


def older_settings(cfg):
    """{setting: the value runs from before it existed had}, for RunDir.claim."""
    return {f.name: f.metadata["older"] for f in dataclasses.fields(cfg) if f.metadata["older"] is not NEW}


# -----------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    loss: float  # the mean loss over the step's targets, on every rank
    grad_norm: float  # before clipping
    skipped: bool  # fp16: an inf/NaN gradient, and no optimizer stepped


def train_step(model, batches, optimizers, scaler, grad_clip, rt, step=0):
    """One optimizer step over a list of (x, y) micro-batches: forward and backward each, then
    unscale, clip, step every optimizer (or none), and zero the gradients. model is the training
    model (DDP under torchrun); the learning rates are set beforehand (set_lr)."""
    # The step's loss is the mean over all its targets, whichever micro-step and rank holds them:
    # each micro-batch's mean weighs in by its share of the step's targets (x world_size, as DDP
    # averages the ranks' gradients). Without masked targets the weight is 1 / len(batches).
    targets = torch.tensor([float((y >= 0).sum()) for _, y in batches], dtype=torch.float64)
    step_targets = targets.sum()
    if rt.distributed:
        step_targets = step_targets.to(rt.comm_device)
        dist.all_reduce(step_targets)
    step_targets = step_targets.item()
    loss_sum = torch.zeros((), device=rt.device)
    for micro, (x, y) in enumerate(batches):
        x, y = x.to(rt.device), y.to(rt.device)
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP: reduce-scatter only on the last micro-step
            model.set_requires_gradient_sync(micro == len(batches) - 1)
        elif rt.distributed:  # DDP: all-reduce the gradients only once, on the last micro-step
            model.require_backward_grad_sync = micro == len(batches) - 1
        with rt.autocast():
            _, loss = model(x, y, return_logits=False)
        share = targets[micro].item() * rt.world_size
        loss = loss.float() / (step_targets / share) if share else loss.float() * 0.0
        loss_sum += loss.detach()
        scaler.scale(loss).backward()  # fp16: scaled, so that small gradients do not underflow
    if rt.distributed:
        dist.all_reduce(loss_sum)  # (SUM: ReduceOp.AVG is missing on gloo in older PyTorch)
        loss_sum /= rt.world_size
    loss = loss_sum.item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite (NaN or inf) train loss {loss} at step {step}")
    for opt in optimizers:  # fp16: every optimizer's gradients unscaled before clipping
        scaler.unscale_(opt)
    # clip the whole gradient's norm: one unlucky batch cannot throw the weights far (GPT-3's 1.0)
    grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).item()
    skipped = not math.isfinite(grad_norm)  # fp16 only: an overflow, which the scaler backs off from
    if skipped and not scaler.is_enabled():
        raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {step}")
    # One rule for all optimizers: an inf/NaN anywhere in the gradients (an fp16 overflow) and none
    # steps. GradScaler checks each optimizer's own gradients only: AdamW would step beside a Muon
    # overflow (on gradients the clip zeroed) and Muon's orthogonalised update would ignore the clip.
    if not skipped:
        for opt in optimizers:
            scaler.step(opt)
    scaler.update()  # fp16: backs the scale off after an overflow
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    # a non-finite weight must never reach a checkpoint (one host sync for all parameters)
    if not fsdp.all_finite(model.parameters()):
        lr = optimizers[0].param_groups[0]["lr"]
        raise FloatingPointError(f"the update of step {step} (lr {lr:.3e}) made weights non-finite")
    return StepResult(loss, grad_norm, skipped)


# -----------------------------------------------------------------------------
# The loop around it

def val_loss(model, loader, windows, rt, batch_size):
    """Mean loss over the first `windows` windows of the val stream: each rank sums its share
    (token losses x tokens, in float64), then one all-reduce. Exact for any micro-batch or world size."""
    B = batch_size
    loader.reset()
    losses, counts = [], []
    with torch.no_grad():
        for first in range(rt.rank * B, windows + rt.rank * B, B * rt.world_size):
            x, y = loader.next_batch()
            rows = max(0, min(B, windows - first))
            if rows < B:  # windows past `windows`: ignored padding (the shapes stay fixed under compile)
                y = y.clone()
                y[rows:] = -1
            with rt.autocast():
                _, loss = model(x.to(rt.device), y.to(rt.device), return_logits=False)
            losses.append(loss.float())
            counts.append(int((y >= 0).sum()))  # rows * T, less the targets a task masks out (sft.py)
    total = torch.tensor([0.0, 0.0], dtype=torch.float64)
    if losses:
        total[0] = torch.stack(losses).cpu().double() @ torch.tensor(counts, dtype=torch.float64)
        total[1] = sum(counts)
    if rt.distributed:
        total = total.to(rt.comm_device)
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


@dataclass
class Evaluation:
    """What is scored at each evaluation: the val stream, HellaSwag examples (or None), the sample."""
    loader: object
    windows: int
    hellaswag: list
    sample: tuple  # (prompt token ids, tokenizer, end token or None)


def evaluate(cfg, rt, model, raw_model, ev, run_dir, step):
    """Val loss (model: compiled, not DDP: no collectives), HellaSwag and a sample (raw_model)."""
    model.eval()
    loss = val_loss(model, ev.loader, ev.windows, rt, cfg.batch_size_per_device)
    if cfg.fsdp:  # FSDP keeps the root's parameters whole after a forward without backward
        raw_model.reshard()
    records = [{"step": step, "val_loss": loss, "val_tokens": ev.windows * ev.loader.seq_len}]
    message = f"step {step:6d} | val loss {loss:.6f}"
    if ev.hellaswag is not None:
        import hellaswag

        with rt.autocast():  # the raw model: no recompilation for the packed shapes under --compile
            r = hellaswag.evaluate(raw_model, ev.hellaswag, rank=rt.rank, world_size=rt.world_size)
        records.append({"step": step, "hellaswag_acc_norm": r["acc_norm"], "hellaswag_acc": r["acc"],
                        "hellaswag_n": r["n"]})
        message += f" | hellaswag acc_norm {r['acc_norm']:.4f} (n={r['n']})"
    if rt.rank == 0:
        for record in records:
            run_dir.log(record)
        print(message)
    if cfg.sample_tokens > 0 and (rt.rank == 0 or cfg.fsdp):  # (FSDP: every rank samples the same tokens in step)
        ids, enc, end = ev.sample
        with rt.autocast():
            out = raw_model.generate(torch.tensor([ids], device=rt.device), cfg.sample_tokens, top_k=50,
                                     seed=cfg.seed + step, eos_token_id=end)
        if cfg.fsdp:
            raw_model.reshard()
        if rt.rank == 0:
            print(f"sample: {enc.decode(out[0].tolist())!r}")
    model.train()


def load_hellaswag(n, rt):
    """n HellaSwag val examples (-1: all) for the periodic evaluation, or None (off, or no data
    offline). On for all ranks or for none: a rank that cannot load it turns it off everywhere."""
    if n == 0:
        return None
    import hellaswag

    try:
        examples = hellaswag.load_examples(hellaswag.data_path("val"))
    except cli.Error as e:
        examples, why = None, str(e)
    if rt.distributed:
        ok = torch.tensor(int(examples is not None), device=rt.comm_device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if examples is not None and not ok.item():
            examples, why = None, "another rank could not load it"
    if examples is None:
        if rt.rank == 0:
            print(f"warning: HellaSwag is off: {why}")
        return None
    return examples if n < 0 else examples[:n]


def save_checkpoint(cfg, rt, run_dir, step, raw_model, optimizers, scaler, loader, recipe):
    state = {"step": step, "scaler": scaler.state_dict(), "loader": loader.state_dict(), "recipe": recipe,
             "args": dataclasses.asdict(cfg), "config": dataclasses.asdict(raw_model.config)}
    rundir.save_checkpoint(run_dir, rt, step, raw_model, optimizers, state, cfg.keep_checkpoints,
                           lambda: GPT(raw_model.config))


def prepare(cfg, rt, raw_model, state, path):
    """The model on its device (sharded under --fsdp), its optimizers, their peak learning rates and
    the gradient scaler; on resume (state: the checkpoint's at path), with their state."""
    if cfg.fsdp:  # parameters, gradients and optimizer state sharded across the ranks, moved to the device
        raw_model = fsdp.shard(raw_model, rt)  # block by block: no GPU ever holds the whole model
    else:
        raw_model = raw_model.to(rt.device)
    optimizers = build_optimizers(raw_model, cfg, rt.device_type)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]  # (before a state sets them)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=cfg.dtype == "fp16")
    if state is not None and state.get("sharded_optimizers"):  # written under --fsdp: DCP reshards it
        fsdp.load_optimizers(raw_model, optimizers, os.path.join(path, state["sharded_optimizers"]))
    elif state is not None:
        if cfg.fsdp:
            raise cli.Error(f"{path} was written without --fsdp: resume it without --fsdp")
        for opt, key in zip(optimizers, ("optimizer", "muon")):
            opt.load_state_dict(state[key])
    if state is not None:
        scaler.load_state_dict(state["scaler"])
    return raw_model, optimizers, base_lrs, scaler


def fit(cfg, rt, config, loaders, new_model, sample, settings=None):
    """Train a model of `config` on loaders (train, val) for cfg.max_steps steps, from scratch
    (new_model()) or from the newest checkpoint of cfg.log_dir; sample: the sample's (ids, tokenizer,
    end). sft.py calls this with its own model and batches. Returns the exit status."""
    train_loader, val_loader = loaders
    T = config.block_size
    cfg.warmup_steps = cli.steps_of(cfg.warmup_steps, cfg.max_steps)  # (sft.py's "N%": its max_steps is known now)
    windows = cfg.val_tokens // T
    if windows == 0:
        raise cli.Error(f"--val_tokens {cfg.val_tokens} is less than one sequence of {T} tokens")
    if windows > val_loader.epoch_windows:  # never wrap around: the same tokens twice
        raise cli.Error(f"--val_tokens {cfg.val_tokens:,} is more than the val shards hold "
                        f"({val_loader.epoch_windows * T:,} in whole windows of {T}); pass at most that")
    run_dir = rundir.RunDir(cfg.log_dir)
    step = saved_step = None
    try:
        resume = cfg.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0  # a torchrun restart resumes
        raw_model, state, resume_from = rundir.open_run(run_dir, rt, run_settings(cfg, config, settings),
                                                        older_settings(cfg), resume, config, cfg.optimizer == "muon")
        raw_model, optimizers, base_lrs, scaler = prepare(cfg, rt, raw_model or new_model(), state, resume_from)
        recipe = {"name": cfg.recipe, **{k: getattr(cfg, k) for k in RECIPES[cfg.recipe]}}  # with the flags given
        start_step = 0
        if state is not None:
            train_loader.load_state_dict(state["loader"])
            start_step = saved_step = state["step"]
        eval_model = torch.compile(raw_model) if cfg.compile else raw_model
        model = eval_model if not rt.distributed or cfg.fsdp else DDP(
            eval_model, device_ids=[int(os.environ.get("LOCAL_RANK", 0))] if rt.device_type == "cuda" else None)
        if resume_from and rt.rank == 0:
            print(f"resuming from {resume_from} at step {start_step}")
        if start_step >= cfg.max_steps:
            if rt.rank == 0:
                print(f"{cfg.log_dir}: this run has finished ({cfg.max_steps} steps); nothing to do")
            return 0
        if cfg.fsdp and rt.rank == 0 and cfg.hellaswag_examples:
            print("note: --fsdp: no HellaSwag during training (each rank scores its share, in passes FSDP "
                  "cannot run apart); score the checkpoints with hellaswag.py or evals.py")
        hellaswag_examples = None if cfg.fsdp else load_hellaswag(cfg.hellaswag_examples, rt)
        ev = Evaluation(val_loader, windows, hellaswag_examples, sample)
        if rt.rank == 0:
            run_dir.log({"step": start_step, "recipe": recipe})
            print_header(cfg, rt, raw_model, recipe, train_loader.grad_accum_steps, start_step)
        on_cuda = rt.device_type == "cuda"
        peak = runtime.peak_flops(torch.cuda.get_device_name(rt.device), cfg.dtype) if on_cuda else None
        recent = []  # the last steps' times, for the ETA
        for step in range(start_step, cfg.max_steps + 1):
            # here the model has had `step` updates: evaluate it, checkpoint it, then train step `step`
            last = step == cfg.max_steps
            if step % cfg.eval_step_interval == 0 or last:
                evaluate(cfg, rt, eval_model, raw_model, ev, run_dir, step)
            if step > start_step and (step % cfg.save_step == 0 or last):
                save_checkpoint(cfg, rt, run_dir, step, raw_model, optimizers, scaler, train_loader, recipe)
                saved_step = step
            if last:
                break
            t0 = time.time()
            model.train()
            lr = get_lr(step, cfg)
            set_lr(optimizers, base_lrs, lr / cfg.max_lr)
            batches = [train_loader.next_batch() for _ in range(train_loader.grad_accum_steps)]
            result = train_step(model, batches, optimizers, scaler, cfg.grad_clip, rt, step)
            if on_cuda:
                torch.cuda.synchronize()
            recent = (recent + [time.time() - t0])[-20:]
            if rt.rank == 0:
                report_step(cfg, rt, run_dir, step, result, lr, optimizers, recent,
                            raw_model.flops_per_token(T), peak)
    except KeyboardInterrupt:
        if rt.rank == 0:
            print(interrupted(step, saved_step), file=sys.stderr)
        return 130
    finally:
        run_dir.close()
    return 0


def print_header(cfg, rt, raw_model, recipe, grad_accum, start_step):
    print(f"recipe {cfg.recipe}: " + ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None and k != "name"))
    if cfg.warmup_steps > cfg.max_steps / 4:
        print(f"warning: the warm-up is {cfg.warmup_steps} of this run's {cfg.max_steps} steps; for a short run pass "
              f"a share, e.g. --warmup_steps 2%")
    print(f"{raw_model.num_params():,} parameters | {rt.world_size} process(es) on {rt.device} | "
          f"{cfg.dtype} | grad accumulation {grad_accum} | steps {start_step}..{cfg.max_steps}")


def report_step(cfg, rt, run_dir, step, result, lr, optimizers, recent, flops_per_token, peak):
    """The step's record in log.jsonl and its line on the console (rank 0)."""
    dt = recent[-1]
    tok_s = cfg.total_batch_size / dt
    mfu = tok_s * flops_per_token / (peak * rt.world_size) if peak else None
    record = {"step": step, "train_loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
              "tokens_per_sec": tok_s, "mfu": mfu}
    if len(optimizers) > 1:
        record["muon_lr"] = optimizers[1].param_groups[0]["lr"]
    if result.skipped:
        record["skipped"] = True  # fp16: inf/NaN gradients, no optimizer stepped
    run_dir.log(record)
    eta = cli.duration(sum(recent) / len(recent) * (cfg.max_steps - step - 1))  # (evaluations not counted)
    print(f"step {step:6d} | loss {result.loss:.6f} | lr {lr:.3e} | norm {result.grad_norm:.4f} | "
          f"{dt * 1000:.0f} ms | {tok_s:,.0f} tok/s" + (f" | mfu {mfu * 100:.1f}%" if mfu else "")
          + f" | eta {eta}" + (" | skipped (fp16 overflow)" if result.skipped else ""))


def interrupted(step, saved_step):
    """The line Ctrl-C prints: where the run stopped and where --resume takes it up."""
    if step is None:
        return "interrupted before training started"
    again = (f"--resume continues from step {saved_step}" if saved_step
             else "no checkpoint yet: --resume starts it again")
    return f"interrupted at step {step}; {again}"


def run_main(body):
    """A training script's main: body() under the one-line errors, Ctrl-C and the process group's end."""
    try:
        return body()
    except cli.Error as e:
        return cli.fail(e)
    except FloatingPointError as e:
        print(f"error: {e}; stopping. The last good checkpoint is kept (lower --max_lr, or use bf16/fp32).",
              file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a directory gone: --resume continues from the last checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print(interrupted(None, None), file=sys.stderr)
        return 130
    finally:
        runtime.teardown()


# -----------------------------------------------------------------------------
# train.py: a new GPT-2 on token shards


def model_config(cfg):
    shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k) is not None}
    try:
        return GPTConfig.from_preset(cfg.model, **shape)
    except ValueError as e:
        raise cli.Error(str(e)) from None


def new_model(cfg, config):
    torch.manual_seed(cfg.seed)  # same initialisation on every rank
    model = GPT(config)
    if cfg.zero_init_residual:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
    return model


def loaders(cfg, config, rt):
    """(train, val) loaders. Validation: micro-step k of rank r scores windows [k*B*world + r*B, +B)
    of the val stream; the first val_tokens // T of them count (the rest of the last micro-step are
    masked out)."""
    T, B, V, rank, world = config.block_size, cfg.batch_size_per_device, config.vocab_size, rt.rank, rt.world_size
    return (DataLoader(cfg.path, "train", T, B, cfg.total_batch_size, rank, world, cfg.seed, V),
            DataLoader(cfg.path, "val", T, B, B * T * world, rank, world, cfg.seed, V))


def setup(cfg):
    """The Runtime of a run (runtime.setup), its dtype and --compile's default filled into cfg."""
    rt = runtime.setup(cfg.device, cfg.dtype)
    if cfg.fsdp and not rt.distributed:
        raise cli.Error("--fsdp shards the model across torchrun's processes: run it under torchrun "
                        "(torchrun --standalone --nproc_per_node=N train.py --fsdp ...)")
    cfg.dtype = rt.dtype
    if cfg.compile is None:
        cfg.compile = rt.device_type == "cuda"
    return rt


def main(argv=None):
    def body():
        cfg = parse_args(argv)
        rt = setup(cfg)
        config = model_config(cfg)
        data = loaders(cfg, config, rt)
        sample = None
        if cfg.sample_tokens > 0:  # the BPE now, not at the first evaluation: fail early if it cannot be had
            enc = get_tokenizer()
            sample = (enc.encode(cfg.sample_prompt), enc, None)
        return fit(cfg, rt, config, data, lambda: new_model(cfg, config), sample)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
