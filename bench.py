"""
Benchmarks of every hot path, each against a reference run in the same process, printed as
ratios (these machines are noisy; absolute numbers from one run mean little).

    python bench.py                  # every section
    python bench.py --section model  # one section
    python bench.py --quick          # fewer repetitions (a smoke run)
    python bench.py --markdown t.md  # also the tables for BENCHMARKS.md (date, machine, torch, command)

Sections:
  model    training step (forward + backward + AdamW) and KV-cache sampling, ours against
           transformers' GPT2LMHeadModel at the same config, same inputs.
  memory   (computed: no device, seconds) the bytes each rank holds for training (fp32 parameters,
           gradients and AdamW's two moments) at the four GPT-2 presets: DDP against FSDP2
           (fully_shard on each block, then the root) at 2, 4 and 8 ranks, read from the sharding plan
           itself (a meta-device model over a fake process group), and DDP / FSDP2 at 8 ranks (goal at
           1.5B: at least 6).
  hellaswag  examples/s of hellaswag.score at 124M shape (random weights) against build-nanogpt's
           way: one example (its 4 endings padded) per forward pass, full logits.
  fineweb  fineweb.py end to end (read, tokenize, write shards) over ../shared/corpus (or
           --corpus), against a build-nanogpt-style Pool.imap and against the machine's
           limit: cores x the single-process encode_ordinary rate.
  serve    serve.py (a subprocess; random weights at --n_layer/--n_embd; --serve_flags): 1, 4
           and 16 (--serve_clients) streaming clients at once against the same requests one at a
           time; total tokens/s and the median time to first token.
  score    serve.py scoring --score_examples multiple-choice examples (a context and 4 endings) as
           lm-eval's local-completions sends them (one request per ending: token ids, echo, logprobs 1,
           max_tokens 1; longest first): --score_clients (8) at once against one at a time, examples/s,
           and the forward passes each took (the server batches concurrent scoring requests).
  evals    evals.py's lm-eval model (packed scoring) against lm-eval's hf backend on the same
           checkpoint (random weights at --n_layer/--n_embd), task (--evals_examples multiple-choice
           examples cut from the corpus) and batch size: lm-eval's requests per second.
  decode   (only when asked for; meant for a GPU: tests/gpu_decode.sh) greedy sampling at
           batch 1, 16, 64, 124M: ours with the static cache (compiled into CUDA graphs on CUDA)
           against ours on the dynamic path, transformers' generate and a cache-less loop, and
           the share of greedy tokens the two paths agree on.
  chat_loader  sft.py's batches (chat.ChatLoader) at 1M conversations of 1,024 tokens, 32 rows a
           micro-step: batches/s against the same batches with the epoch's order drawn again for
           every row (the way it replaced); the time per batch in ms (against its target) and of the
           first, which draws the epoch's order.
  train    (only when asked for; meant for a GPU: tests/gpu_all.sh) train.py's tokens/s and MFU:
           --train_steps steps of the --n_layer/--n_embd model, --batch_size x --seq_len a
           micro-step, on --data (default: fineweb.py over --corpus); the median of the steps after
           the first two (compilation, warm-up) from its log.jsonl, against step 0 and the MFU goal.
  fsdp     (only when asked for; meant for a GPU) the train section's run with --fsdp against DDP,
           each under torchrun with one process: tokens/s.
  recipe   (only when asked for: it trains 7 small models, long on a CPU) train.py
           --recipe modern against the classic recipe (gpt2, its --max_lr the best of
           --recipe_lrs) on ../shared/corpus, same token budget, seeds and data order: val loss
           at fixed points, step time, and the key ratio: the tokens modern needs to reach the
           baseline's final val loss / the baseline's tokens (goal: at most 0.6).
"""

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import cli
from bench_data import bench_chat_loader, bench_fineweb
from bench_model import bench_decode, bench_hellaswag, bench_memory, bench_model
from bench_serve import bench_evals, bench_score, bench_serve
from bench_timing import paired
from fineweb import usable_cores

# The sections live in bench_data.py, bench_model.py and bench_serve.py (train and recipe here); each
# imports torch when it runs: the fineweb section runs first, in a process without torch, as fineweb.py
# itself runs (forking a process that holds torch costs more).


# -----------------------------------------------------------------------------
# train.py as users run it: the recipe and train sections


def _recipe_run(args, data, work, name, seed, flags):
    """One train.py run (a subprocess, as users run it); returns {val step: loss}."""
    import json
    import subprocess

    steps = args.recipe_steps
    log_dir = os.path.join(work, name)
    argv = [sys.executable, "train.py", "--path", data, "--log_dir", log_dir, "--seed", str(seed),
            "--n_layer", str(args.recipe_layers), "--n_embd", str(args.recipe_embd),
            "--n_head", str(args.recipe_embd // 64),
            "--block_size", str(args.recipe_block), "--batch_size_per_device", str(args.recipe_batch),
            "--total_batch_size", str(args.recipe_batch * args.recipe_block),
            "--max_steps", str(steps), "--eval_step_interval", str(max(1, steps // 10)),
            "--val_tokens", str(args.recipe_val_tokens),
            "--save_step", str(10 * steps), "--hellaswag_examples", "0", "--sample_tokens", "0", "--dtype", "fp32",
            *args.recipe_train_flags.split(), *flags]
    t0 = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    val = {}
    with open(os.path.join(log_dir, "log.jsonl")) as f:
        for r in map(json.loads, f):
            if "val_loss" in r:
                val[r["step"]] = r["val_loss"]
    shutil.rmtree(log_dir)
    print(f"  {name:<34} final val {val[steps]:.4f}  ({time.time() - t0:.0f} s)", flush=True)
    return val


def _crossing(val, target, tokens_per_step):
    """Tokens at which the val curve first reaches target (linear between evaluations), or None."""
    pts = sorted(val.items())
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            frac = 1.0 if l0 == l1 else min(1.0, max(0.0, (l0 - target) / (l0 - l1)))
            return (s0 + frac * (s1 - s0)) * tokens_per_step
    return None


def _recipe_step_time(args):
    """Muon's cost: a training step (forward, backward, the optimizers) under modern's optimizers
    against gpt2's, same model and batch, timed call by call in alternation."""
    import torch

    import train
    from model import GPT, GPTConfig

    flags = train.parse_args(args.recipe_train_flags.split())
    device = flags.device or "cpu"
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=flags.dtype == "bf16")
    cfg = GPTConfig(n_layer=args.recipe_layers, n_head=args.recipe_embd // 64, n_embd=args.recipe_embd,
                    block_size=args.recipe_block)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50257, (args.recipe_batch, args.recipe_block), generator=g).to(device) for _ in range(2))
    fns = {}
    for name in ("gpt2", "modern"):
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        optimizers = train.build_optimizers(model, train.parse_args(["--recipe", name]), device.split(":")[0])

        def step(model=model, optimizers=optimizers):
            with autocast:
                _, loss = model(x, y, return_logits=False)
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        fns[name] = step
    t = paired(fns, repeat=3 if args.quick else 7)
    return t["modern"], t["gpt2"]


def _shards(args, work):
    """--data, or fineweb.py's shards of --corpus, made in work."""
    import subprocess

    if args.data:
        return args.data
    data = os.path.join(work, "data")
    subprocess.run([sys.executable, "fineweb.py", "--source", args.corpus, "--path", data, "--shard_size", "250000",
                    "--workers", "1"], check=True, capture_output=True)
    return data


def bench_recipe(args):
    """--recipe modern against the best classic (gpt2) recipe of an lr grid, at the same token budget."""
    modern_s, gpt2_s = _recipe_step_time(args)
    yield ("recipe: training step, modern's optimizers / gpt2's (ms)", modern_s * 1e3, gpt2_s * 1e3, "gpt2 (AdamW)")
    if args.recipe_steps == 0:
        return

    work = tempfile.mkdtemp(prefix="bench_recipe_")
    try:
        data = _shards(args, work)
        steps, tps = args.recipe_steps, args.recipe_batch * args.recipe_block
        from train import RECIPES

        # the baseline's warm-up: gpt2's fraction of the default 19,073 steps; modern as shipped (a share of the run)
        warmup = str(max(1, round(steps * RECIPES["gpt2"]["warmup_steps"] / 19073)))
        seeds = list(range(args.recipe_seeds))
        extra = args.recipe_flags.split()
        print(f"recipe: {args.recipe_layers} layers x {args.recipe_embd}, T={args.recipe_block}, {tps:,} tokens/step, "
              f"{steps} steps ({steps * tps:,} tokens), seeds {seeds}, data {args.data or args.corpus}, "
              f"train.py flags: --dtype fp32 {args.recipe_train_flags}", flush=True)
        grid = {}
        for lr in args.recipe_lrs.split(","):
            grid[lr] = _recipe_run(args, data, work, f"gpt2 max_lr {lr} seed 0", 0, ["--recipe", "gpt2", "--max_lr", lr,
                                   "--min_lr", f"{float(lr) / 10:g}", "--warmup_steps", warmup])
        best = min(grid, key=lambda lr: grid[lr][steps])
        base_flags = ["--recipe", "gpt2", "--max_lr", best, "--min_lr", f"{float(best) / 10:g}",
                      "--warmup_steps", warmup]
        modern_flags = ["--recipe", "modern", *extra]
        base, modern, half = {0: grid[best]}, {}, {}
        for seed in seeds:
            if seed not in base:
                base[seed] = _recipe_run(args, data, work, f"gpt2 max_lr {best} seed {seed}", seed, base_flags)
            modern[seed] = _recipe_run(args, data, work, f"modern seed {seed}", seed, modern_flags)
        for seed in seeds:  # modern given half the tokens: does it reach the baseline's final loss?
            half_args = argparse.Namespace(**{**vars(args), "recipe_steps": steps // 2})
            half[seed] = _recipe_run(half_args, data, work, f"modern, half the steps, seed {seed}", seed, modern_flags)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = [f"val loss (mean over seeds {seeds}; baseline: gpt2 recipe at max_lr {best}, {tps:,} tokens a step)", "",
             "| step | tokens | gpt2 | modern |", "| ---: | ---: | ---: | ---: |"]
    for step in sorted(base[0]):
        mean = lambda runs: statistics.mean(runs[s][step] for s in seeds)  # noqa: E731
        table.append(f"| {step} | {step * tps:,} | {mean(base):.4f} | {mean(modern):.4f} |")
    table.append("")
    ratios = []
    for seed in seeds:
        target = base[seed][steps]
        hit = _crossing(modern[seed], target, tps)
        ratios.append(hit / (steps * tps) if hit is not None else float("inf"))
        table.append(f"seed {seed}: gpt2 final {target:.4f} | modern reaches it at {ratios[-1]:.2f} of the tokens | "
                     f"modern with half the tokens ends at {half[seed][steps // 2]:.4f}")
    yield "\n".join(table)
    spread = f" (seeds: {', '.join(f'{r:.2f}' for r in ratios)})"
    yield (f"recipe: modern's tokens to gpt2's final val loss / gpt2's{spread}", statistics.mean(ratios), 1.0,
           "goal <= 0.6")


def _steady(log_path, skip=2):
    """train.py's log.jsonl: (the step records after the first skip, step 0's record); every step
    record has tokens_per_sec and mfu (None where the device's peak is unknown)."""
    import json

    with open(log_path) as f:
        steps = [r for r in map(json.loads, f) if "train_loss" in r]
    if len(steps) <= skip:
        raise SystemExit(f"{log_path}: {len(steps)} step records, none after the first {skip}: more --train_steps")
    return steps[skip:], steps[0]


def _train_run(args, work, name, extra=(), torchrun=False):
    """One train.py run of the train section (a subprocess, as users run it: under torchrun with one
    process when asked); returns its (steady step records, step 0's record)."""
    import subprocess

    L, C, B, T = args.n_layer, args.n_embd, args.batch_size, args.seq_len
    log_dir, steps = os.path.join(work, name), args.train_steps
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun \
        else [sys.executable]
    argv = [*launch, "train.py", "--path", _shards(args, work), "--log_dir", log_dir, "--n_layer", str(L),
            "--n_head", str(args.n_head), "--n_embd", str(C), "--block_size", str(T), "--batch_size_per_device",
            str(B), "--total_batch_size", str(B * T), "--max_steps", str(steps), "--eval_step_interval", str(steps),
            "--val_tokens", str(B * T), "--save_step", str(10 * steps), "--hellaswag_examples", "0",
            "--sample_tokens", "0", *args.train_flags.split(), *extra]  # (a --total_batch_size here comes last)
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return _steady(os.path.join(log_dir, "log.jsonl"))


def bench_fsdp(args):
    """The train section's run with --fsdp against DDP, each under torchrun with one process."""
    args.train_fsdp = True
    yield from bench_train(args)


def bench_train(args):
    """train.py's throughput as users run it: the steady-state median of its own per-step tokens/s
    and MFU, against step 0 (compilation, warm-up) and the MFU goal (the fsdp section: --fsdp against
    DDP)."""
    L, C, B, T = args.n_layer, args.n_embd, args.batch_size, args.seq_len
    work = tempfile.mkdtemp(prefix="bench_train_")
    t0 = time.time()
    try:
        if getattr(args, "train_fsdp", False):
            runs = {k: _train_run(args, work, k, flags, torchrun=True)
                    for k, flags in (("ddp", ()), ("fsdp", ["--fsdp"]))}
        else:
            steady, first = _train_run(args, work, "run")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    what = f"train.py {L}x{C}, {B}x{T} a micro-step, {args.train_flags or 'its defaults'}"
    if getattr(args, "train_fsdp", False):
        tok_s = {k: statistics.median(r["tokens_per_sec"] for r in steady) for k, (steady, _) in runs.items()}
        print(f"{what}, one process: --fsdp {tok_s['fsdp']:,.0f} tok/s, DDP {tok_s['ddp']:,.0f}", flush=True)
        yield (f"{what}: tokens/s, --fsdp (1 process)", tok_s["fsdp"], tok_s["ddp"], "DDP (1 process)")
        return
    tok_s = statistics.median(r["tokens_per_sec"] for r in steady)
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    span = f"steps {steady[0]['step']}-{steady[-1]['step']}"
    print(f"{what}: median of {span}: {tok_s:,.0f} tok/s"
          + (f", MFU {statistics.median(mfu) * 100:.1f}%" if mfu else "")
          + f"; step 0 at {first['tokens_per_sec']:,.0f} tok/s; the whole run {time.time() - t0:.0f} s", flush=True)
    yield (f"{what}: tokens/s, median of {span}", tok_s, first["tokens_per_sec"], "step 0 (compiling, warming up)")
    if mfu:
        yield (f"{what}: MFU (%), median of {span}", statistics.median(mfu) * 100, 55.0, "the goal: 55%")


# -----------------------------------------------------------------------------
# The runner

# fineweb first: see the imports at the top
SECTIONS = {"fineweb": bench_fineweb, "model": bench_model, "memory": bench_memory, "hellaswag": bench_hellaswag,
            "serve": bench_serve, "score": bench_score, "evals": bench_evals, "decode": bench_decode,
            "chat_loader": bench_chat_loader, "train": bench_train, "fsdp": bench_fsdp, "recipe": bench_recipe}
ON_REQUEST = ("recipe", "decode", "train", "fsdp")  # not in the default set: they train models or want a GPU


def without_markdown(argv):
    """The command line less --markdown FILE (where the tables went is no part of how they were taken)."""
    out = []
    for a in argv:
        if out[-1:] == ["--markdown"]:
            out.pop()
        elif not a.startswith("--markdown="):
            out.append(a)
    return out


def markdown(rows, blocks, argv):
    """One section's figures for BENCHMARKS.md: a line with the date, the machine, torch and the
    command, the rows as a table, then the section's own tables (blocks)."""
    import torch

    machine = (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available()
               else f"CPU, {usable_cores()} usable cores")
    out = [f"{time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}: `python bench.py {shlex.join(argv)}`",
           ""]
    if rows:
        out += ["| benchmark | ours | reference | ratio | reference |", "| --- | ---: | ---: | ---: | --- |"]
        fig = lambda v: f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"  # noqa: E731  (0.44, not 0.4)
        out += [f"| {label} | {fig(ours)} | {fig(ref)} | {ours / ref:.2f}x | {ref_name} |"
                for label, ours, ref, ref_name in rows]
        out.append("")
    return "\n".join(out + [b + "\n" for b in blocks])


def main():
    p = cli.Parser(description=__doc__)
    p.add_argument("--section", choices=list(SECTIONS), action="append", help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="one timed call of each (smoke run)")
    p.add_argument("--repeat", type=cli.positive_int, default=None,
                   help="timed calls of each side; the median is reported (default: 9; decode and serve 3)")
    p.add_argument("--markdown", default=None,
                   help="also write each section's figures to this file as tables for BENCHMARKS.md (with the date, "
                   "the machine, torch and the command), rewritten after each row (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--n_layer", type=int, default=6, help="model and serve sections: layers")
    p.add_argument("--n_head", type=int, default=6, help="model and serve sections: heads")
    p.add_argument("--n_embd", type=int, default=384, help="model and serve sections: width")
    p.add_argument("--seq_len", type=int, default=256, help="model section: training sequence length")
    p.add_argument("--batch_size", type=int, default=4, help="model section: training sequences per step")
    p.add_argument("--prompt_len", type=int, default=32, help="sampling: prompt tokens")
    p.add_argument("--new_tokens", type=int, default=128, help="sampling: new tokens")
    p.add_argument("--decode_device", default=None, help="decode section: the device (default: the best available)")
    p.add_argument("--decode_preset", choices=["gpt2", "args"], default="gpt2",
                   help="decode section: the 124M model, or --n_layer/--n_head/--n_embd's")
    p.add_argument("--decode_batches", default="1,16,64", help="decode section: batch sizes, comma-separated")
    p.add_argument("--serve_clients", default="1,4,16", help="serve section: client counts, comma-separated")
    p.add_argument("--serve_flags", default="--max_batch 16", help="serve section: serve.py's flags")
    p.add_argument("--score_examples", type=int, default=200,
                   help="score section: multiple-choice examples (4 endings each)")
    p.add_argument("--evals_examples", type=int, default=200, help="evals section: multiple-choice examples")
    p.add_argument("--evals_batch", type=int, default=16, help="evals section: batch size, both backends")
    p.add_argument("--evals_device", default="cpu", help="evals section: device, both backends")
    p.add_argument("--score_clients", type=int, default=8,
                   help="score section: clients at once (lm-eval's num_concurrent)")
    p.add_argument("--hellaswag_examples", type=int, default=64,
                   help="examples per side (batches are sorted by length, as in a full evaluation)")
    p.add_argument("--hellaswag_batch", type=int, default=16, help="hellaswag section: examples per batch")
    p.add_argument("--corpus", default=os.path.join("..", "shared", "corpus"),
                   help="text for the fineweb, recipe and train sections")
    p.add_argument("--recipe_steps", type=int, default=100,
                   help="recipe: optimizer steps per run (of --recipe_batch x --recipe_block tokens; "
                   "0: the step time only)")
    p.add_argument("--recipe_seeds", type=int, default=2, help="recipe: seeds (initialisation and data order)")
    p.add_argument("--recipe_lrs", default="6e-4,1.2e-3", help="recipe: the baseline's --max_lr grid")
    p.add_argument("--recipe_layers", type=int, default=4, help="recipe: layers")
    p.add_argument("--recipe_embd", type=int, default=256, help="recipe: width (heads of 64)")
    p.add_argument("--recipe_block", type=int, default=256, help="recipe: sequence length")
    p.add_argument("--recipe_batch", type=int, default=16, help="recipe: sequences per step (no accumulation)")
    p.add_argument("--recipe_val_tokens", type=int, default=32768, help="recipe: tokens of each validation")
    p.add_argument("--data", "--recipe_data", default=None,
                   help="recipe and train sections: a shard directory (default: fineweb.py over --corpus)")
    p.add_argument("--recipe_train_flags", default="",
                   help="recipe: extra train.py flags for every run (GPU: --device cuda --dtype bf16)")
    p.add_argument("--recipe_flags", default="", help="recipe: extra train.py flags for the modern runs")
    p.add_argument("--train_steps", type=cli.positive_int, default=10,
                   help="train section: steps; the median of those after the first two is reported")
    p.add_argument("--train_flags", default="", help="train section: extra train.py flags (GPU: --dtype bf16 --compile "
                   "--total_batch_size 524288; default: train.py's, one micro-step a step)")
    args = p.parse_args()
    sections = args.section or [s for s in SECTIONS if s not in ON_REQUEST]
    if set(sections) - {"fineweb"}:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{time.strftime('%Y-%m-%d')}, {usable_cores()} usable cores")
    print(f"{'benchmark':<58} {'ours':>12} {'reference':>12} {'ratio':>7}  reference")
    argv, done = without_markdown(sys.argv[1:]), []
    for name in sections:
        rows, blocks = [], []
        for item in SECTIONS[name](args):  # rows as they come, and a section's own tables (str)
            if isinstance(item, str):
                print(item)
                blocks.append(item)
            else:
                label, ours, ref, ref_name = item
                print(f"{label:<58} {ours:>12,.1f} {ref:>12,.1f} {ours / ref:>6.2f}x  {ref_name}")
                rows.append(item)
            if args.markdown:  # (after each row: a run stopped part-way leaves the rows it had)
                cli.atomic_write(args.markdown, "\n".join(done + [markdown(rows, blocks, argv)]))
        if args.markdown:
            done.append(markdown(rows, blocks, argv))


if __name__ == "__main__":
    main()
