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
           every row (as before #25); the time per batch in ms (target: under 5) and of the
           first, which draws the epoch's order.
  train    (only when asked for; meant for a GPU: tests/gpu_all.sh) train.py's tokens/s and MFU:
           --train_steps steps of the --n_layer/--n_embd model, --batch_size x --seq_len a
           micro-step, on --data (default: fineweb.py over --corpus); the median of the steps after
           the first two (compilation, warm-up) from its log.jsonl, against step 0 and the MFU goal.
  recipe   (only when asked for: it trains 7 small models, ~50 min on 2 cores) train.py
           --recipe modern against the classic recipe (gpt2, its --max_lr the best of
           --recipe_lrs) on ../shared/corpus, same token budget, seeds and data order: val loss
           at fixed points, step time, and the key ratio: the tokens modern needs to reach the
           baseline's final val loss / the baseline's tokens (goal: at most 0.6).
"""

import argparse
import glob
import multiprocessing as mp
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import cli
from fineweb import usable_cores

# torch is imported by the sections that use it: the fineweb section runs first, in a process
# without torch, as fineweb.py itself runs (forking a process that holds torch costs more).


def paired(fns, repeat, warmup=1):
    """Time several functions call by call in alternation, so that drifting machine load hits
    all of them alike; returns {name: median seconds per call}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def repeats(args, default):
    """Timed calls of each side: one under --quick, else --repeat, else the section's default."""
    return 1 if args.quick else args.repeat or default


# -----------------------------------------------------------------------------


def bench_model(args):
    """Ours vs transformers' GPT-2: training step and sampling, fp32 on this device."""
    import torch
    import transformers

    from model import GPT, GPTConfig

    from model_io import hf_state_dict

    transformers.logging.set_verbosity_error()
    L, H, C, T, B = args.n_layer, args.n_head, args.n_embd, args.seq_len, args.batch_size
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T)
    ours = GPT(cfg)
    hf_cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=T, vocab_size=cfg.vocab_size,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(hf_state_dict(ours), strict=False)  # same weights (lm_head is tied)
    data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]

    # Training step: each side as its users run it. Ours: the chunked fused loss and train.py's
    # optimizer (the gpt2 recipe: fused AdamW where available). Theirs: labels= and torch's AdamW.
    import train

    (opt_ours,) = train.build_optimizers(ours, train.parse_args([]), "cpu")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def step_ours():
        _, loss = ours(x, y, return_logits=False)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        loss = theirs(input_ids=x, labels=data[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    repeat = repeats(args, 9)
    t = paired({"ours": step_ours, "theirs": step_theirs}, repeat)
    tokens = B * T
    rows = [(f"train step fp32 L{L} C{C} B{B} T{T} (tok/s)", tokens / t["ours"], tokens / t["theirs"], "transformers")]

    # Sampling: greedy decoding of N new tokens after a P-token prompt, batch 1, KV cache on both.
    ours.eval()
    theirs.eval()
    theirs.load_state_dict(hf_state_dict(ours), strict=False)  # training moved them apart
    P, N = args.prompt_len, args.new_tokens
    prompt = data[:1, :P]

    def sample_ours():
        ours.generate(prompt, N, top_k=1)

    def sample_theirs():
        with torch.no_grad():
            theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N,
                            do_sample=False, use_cache=True, pad_token_id=0)

    with torch.no_grad():
        assert torch.equal(ours.generate(prompt, N, top_k=1)[0, P:],
                           theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N,
                                           min_new_tokens=N, do_sample=False, pad_token_id=0)[0, P:]), \
            "greedy outputs differ: the comparison would be meaningless"
    t = paired({"ours": sample_ours, "theirs": sample_theirs}, repeat)
    rows.append((f"greedy sampling {N} tokens after {P}, batch 1 (tok/s)", N / t["ours"], N / t["theirs"], "transformers"))
    return rows


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


def _bn_choose(model, ctx, endings):
    """build-nanogpt's HellaSwag scoring of one example: 4 rows of context + ending, padded,
    full logits, mean loss over the ending tokens; returns the acc_norm choice."""
    import torch
    import torch.nn.functional as F

    rows = [ctx + e for e in endings]
    T = max(len(r) for r in rows)
    tokens = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T)
    for i, (r, e) in enumerate(zip(rows, endings)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, len(ctx) : len(r)] = 1
    logits, _ = model(tokens)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none")
    losses = losses.view(4, -1) * mask[:, 1:]
    return int((losses.sum(1) / mask[:, 1:].sum(1)).argmin())


def bench_hellaswag(args):
    """hellaswag.score (packed, batched, lm_head only where scored) vs one example per forward."""
    import torch

    import hellaswag
    from model import GPT, GPTConfig
    from model_io import get_tokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    enc = get_tokenizer()
    n = 4 if args.quick else args.hellaswag_examples
    real = os.path.join("..", "shared", "hellaswag", "hellaswag_val.jsonl")
    if os.path.isfile(real):
        examples, source = hellaswag.load_examples(real)[:n], "val"
        rendered = [hellaswag.render(ex, enc) for ex in examples]
    else:  # HellaSwag-like lengths (context 30-90 tokens, endings 10-35) cut from the corpus
        text = enc.encode_ordinary(" ".join(open(f).read() for f in sorted(glob.glob(os.path.join(args.corpus, "*", "*.txt")))[:20]))
        g = np.random.default_rng(0)
        cut = lambda k: (lambda s: text[s : s + k])(int(g.integers(0, len(text) - 100)))  # noqa: E731
        rendered = [(cut(int(g.integers(30, 91))), [cut(int(g.integers(10, 36))) for _ in range(4)]) for _ in range(n)]
        source = "synthetic"

    def ours():
        losses, counts = hellaswag.score(model, rendered, batch_size=args.hellaswag_batch)
        return (losses / counts).argmin(1).tolist()

    def theirs():
        with torch.no_grad():
            return [_bn_choose(model, c, e) for c, e in rendered]

    assert ours() == theirs(), "the two scorings disagree: the comparison would be meaningless"
    t = paired({"ours": ours, "theirs": theirs}, 1, warmup=0)  # one call is already n examples
    label = f"hellaswag 124M fp32, {n} {source} examples (ex/s)"
    return [(label, n / t["ours"], n / t["theirs"], "build-nanogpt: 1 example/forward")]


def bench_serve(args):
    """serve.py: k streaming clients at once (continuous batching) vs the same k requests one at a time."""
    import asyncio
    import json

    import httpx

    import torch

    import serve
    from model import GPT, GPTConfig
    from model_io import save_pretrained

    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    save_pretrained(GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)), work)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc, url = serve.launch(work, *args.serve_flags.split(), env=env, timeout=900)  # (--compile: minutes; errors show)
    P, N = args.prompt_len, 32 if args.quick else args.new_tokens
    g = torch.Generator().manual_seed(0)
    counts = [int(k) for k in args.serve_clients.split(",")]
    bodies = [{"prompt": torch.randint(0, 50000, (P,), generator=g).tolist(), "max_tokens": N, "seed": i, "stream": True}
              for i in range(max(counts))]

    async def one(client, body, ttfts):
        t0, tokens = time.perf_counter(), 0
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    tokens += 1
                    if tokens == 1:
                        ttfts.append(time.perf_counter() - t0)
        return tokens

    async def clients(batch, at_once, ttfts):
        async with httpx.AsyncClient(timeout=None) as client:
            if at_once:
                return sum(await asyncio.gather(*(one(client, b, ttfts) for b in batch)))
            return sum([await one(client, b, ttfts) for b in batch])

    try:
        for k in counts:  # (rows yielded as they come: a run stopped part-way keeps the first counts')
            ttfts, tokens = {True: [], False: []}, {}

            def run(at_once, batch=bodies[:k]):
                tokens[at_once] = asyncio.run(clients(batch, at_once, ttfts[at_once]))

            # warm-up (under --compile: the graphs of these batch sizes), not counted; one row at a time is
            # the same at every k. (The sequential side of k=1 is the same thing as the concurrent one, timed twice.)
            run(True)
            if k == counts[0]:
                run(False)
            ttfts[True].clear(), ttfts[False].clear()
            t = paired({"at once": lambda: run(True), "one at a time": lambda: run(False)}, repeats(args, 3), warmup=0)
            yield (f"serve: {k} streaming clients, {N} tokens each (total tok/s)", tokens[True] / t["at once"],
                   tokens[False] / t["one at a time"], "the same requests one at a time")
            yield (f"serve: {k} streaming clients, time to first token (ms)", 1000 * statistics.median(ttfts[True]),
                   1000 * statistics.median(ttfts[False]), "the same, one at a time")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def bench_score(args):
    """serve.py scoring multiple-choice examples as lm-eval's local-completions asks it (each context +
    ending one request: its token ids, echo, logprobs 1, max_tokens 1, in lm-eval's order: longest first),
    --score_clients at once (lm-eval's num_concurrent) against one at a time."""
    import asyncio
    import json

    import httpx
    import torch

    import hellaswag
    import serve
    from model import GPT, GPTConfig
    from model_io import get_tokenizer, save_pretrained

    enc = get_tokenizer()
    n = 20 if args.quick else args.score_examples
    real = os.path.join("..", "shared", "hellaswag", "hellaswag_val.jsonl")
    if os.path.isfile(real):
        rendered, source = [hellaswag.render(ex, enc) for ex in hellaswag.load_examples(real)[:n]], "HellaSwag val"
    else:  # HellaSwag-like lengths (context 30-90 tokens, endings 10-35) cut from the corpus
        files = sorted(glob.glob(os.path.join(args.corpus, "*", "*.txt")))[:20]
        text = enc.encode_ordinary(" ".join(open(f).read() for f in files))
        g = np.random.default_rng(0)
        cut = lambda k: (lambda s: text[s : s + k])(int(g.integers(0, len(text) - 100)))  # noqa: E731
        rendered = [(cut(int(g.integers(30, 91))), [cut(int(g.integers(10, 36))) for _ in range(4)]) for _ in range(n)]
        source = "synthetic"
    inputs = sorted((ctx + e for ctx, ends in rendered for e in ends), key=lambda t: (-len(t), tuple(t)))  # lm-eval's
    bodies = [{"model": "m", "prompt": [t], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True} for t in inputs]
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="bench-score-")
    save_pretrained(GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)), work)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc, url = serve.launch(work, *args.serve_flags.split(), env=env, timeout=900)
    k = args.score_clients

    async def side(at_once):
        sem, out = asyncio.Semaphore(at_once), [None] * len(bodies)
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=at_once)) as client:
            async def one(i):
                async with sem:
                    r = await client.post(url + "/v1/completions", json=bodies[i])
                    r.raise_for_status()
                    out[i] = json.loads(r.content)["choices"][0]["logprobs"]["token_logprobs"]

            await asyncio.gather(*(one(i) for i in range(len(bodies))))
        return out

    results, forwards = {}, {}

    def run(at_once):
        before = httpx.get(url + "/health").json()
        results[at_once] = asyncio.run(side(at_once))
        after = httpx.get(url + "/health").json()
        forwards[at_once] = (after["score_forwards"] - before["score_forwards"],
                             after["scored_sequences"] - before["scored_sequences"])

    try:
        run(k)  # warm-up, not counted
        t = paired({"at once": lambda: run(k), "one at a time": lambda: run(1)}, repeats(args, 1), warmup=0)
        worst = max(abs(a - b) for x, y in zip(results[k], results[1]) for a, b in zip(x[1:], y[1:]))
        assert worst < 1e-3, f"the two sides' logprobs differ by {worst}: the comparison would be meaningless"
        yield (f"score: {n} {source} examples x 4 endings, {k} clients (examples/s)", n / t["at once"],
               n / t["one at a time"], "the same requests one at a time")
        yield (f"score: the {len(bodies)} requests' forward passes, {k} clients", forwards[k][0], forwards[1][0],
               "one at a time (one request each)")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _recipe_run(args, data, work, name, seed, flags):
    """One train.py run (a subprocess, as users run it); returns {val step: loss}."""
    import json
    import subprocess

    steps = args.recipe_steps
    log_dir = os.path.join(work, name)
    argv = [sys.executable, "train.py", "--path", data, "--log_dir", log_dir, "--seed", str(seed),
            "--n_layer", str(args.recipe_layers), "--n_embd", str(args.recipe_embd), "--n_head", str(args.recipe_embd // 64),
            "--block_size", str(args.recipe_block), "--batch_size_per_device", str(args.recipe_batch),
            "--total_batch_size", str(args.recipe_batch * args.recipe_block),
            "--max_steps", str(steps), "--eval_step_interval", str(max(1, steps // 10)), "--val_tokens", str(args.recipe_val_tokens),
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
            grid[lr] = _recipe_run(args, data, work, f"gpt2 max_lr {lr} seed 0", 0,
                                   ["--recipe", "gpt2", "--max_lr", lr, "--min_lr", f"{float(lr) / 10:g}", "--warmup_steps", warmup])
        best = min(grid, key=lambda lr: grid[lr][steps])
        base_flags = ["--recipe", "gpt2", "--max_lr", best, "--min_lr", f"{float(best) / 10:g}", "--warmup_steps", warmup]
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


def bench_train(args):
    """train.py's throughput as users run it (a subprocess): the steady-state median of its own
    per-step tokens/s and MFU, against step 0 (compilation, warm-up) and MFU's goal of 55%."""
    import subprocess

    L, C, B, T = args.n_layer, args.n_embd, args.batch_size, args.seq_len
    work = tempfile.mkdtemp(prefix="bench_train_")
    try:
        data = _shards(args, work)
        log_dir, steps = os.path.join(work, "run"), args.train_steps
        argv = [sys.executable, "train.py", "--path", data, "--log_dir", log_dir, "--n_layer", str(L), "--n_head",
                str(args.n_head), "--n_embd", str(C), "--block_size", str(T), "--batch_size_per_device", str(B),
                "--total_batch_size", str(B * T), "--max_steps", str(steps), "--eval_step_interval", str(steps),
                "--val_tokens", str(B * T), "--save_step", str(10 * steps), "--hellaswag_examples", "0",
                "--sample_tokens", "0", *args.train_flags.split()]  # (a --total_batch_size here comes last: it wins)
        t0 = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"train.py failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        steady, first = _steady(os.path.join(log_dir, "log.jsonl"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tok_s = statistics.median(r["tokens_per_sec"] for r in steady)
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    what = f"train.py {L}x{C}, {B}x{T} a micro-step, {args.train_flags or 'its defaults'}"
    span = f"steps {steady[0]['step']}-{steady[-1]['step']}"
    print(f"{what}: median of {span}: {tok_s:,.0f} tok/s"
          + (f", MFU {statistics.median(mfu) * 100:.1f}%" if mfu else "")
          + f"; step 0 at {first['tokens_per_sec']:,.0f} tok/s; the whole run {time.time() - t0:.0f} s", flush=True)
    yield (f"{what}: tokens/s, median of {span}", tok_s, first["tokens_per_sec"], "step 0 (compiling, warming up)")
    if mfu:
        yield (f"{what}: MFU (%), median of {span}", statistics.median(mfu) * 100, 55.0, "the goal: 55%")


def bench_decode(args):
    """Sampling speed: ours with the static cache (fixed shapes; compiled into CUDA graphs on CUDA),
    ours on the dynamic path, transformers' generate (KV cache), a cache-less loop (the whole
    sequence every step, as nanoGPT samples) and on CUDA the static cache uncompiled, greedy, at
    each --decode_batches size."""
    import torch
    import transformers
    from torch._dynamo.utils import counters

    from model import GPT, GPTConfig
    from model_io import DTYPES, best_device, default_dtype, hf_state_dict

    transformers.logging.set_verbosity_error()
    device = args.decode_device or best_device()
    dtype = DTYPES[default_dtype(device)]
    cuda = device.startswith("cuda")
    shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd) if args.decode_preset == "args" else {}
    cfg = GPTConfig.from_preset("gpt2", **shape) if not shape else GPTConfig(**shape)
    torch.manual_seed(0)
    ours = GPT(cfg).to(device=device, dtype=dtype).eval()
    hf_cfg = transformers.GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.block_size,
                                     vocab_size=cfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(hf_state_dict(ours), strict=False)
    theirs = theirs.to(device=device, dtype=dtype).eval()
    P, N = args.prompt_len, 32 if args.quick else args.new_tokens
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for B in [int(b) for b in args.decode_batches.split(",")]:
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B)).to(device)

        def timed(fn):
            def call():
                fn()
                sync()
            return call

        fns = {
            "static": timed(lambda: ours.generate(prompt, N, temperature=0, static_cache=True, compile=cuda)),
            "dynamic": timed(lambda: ours.generate(prompt, N, temperature=0, static_cache=False)),
            "transformers": timed(lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N,
                                                          min_new_tokens=N, do_sample=False, pad_token_id=0)),
            "no cache": timed(lambda: ours.generate(prompt, N, temperature=0, use_cache=False)),
        }
        if cuda:  # is the static cache worth having without CUDA graphs (the default on CUDA if so)?
            fns["static eager"] = timed(lambda: ours.generate(prompt, N, temperature=0, static_cache=True))
        with torch.no_grad():
            # (the static path's first call here compiles and captures it, outside the timing)
            same = (ours.generate(prompt, N, temperature=0, static_cache=True, compile=cuda)
                    == ours.generate(prompt, N, temperature=0, static_cache=False))[:, P:].float().mean().item()
            t = paired(fns, repeats(args, 3))
        where = f"{device} {str(dtype).removeprefix('torch.')}, {cfg.n_layer}x{cfg.n_embd}, batch {B}, {N} after {P}"
        print(f"decode {where}: greedy tokens the static path shares with the dynamic one: {same:.4f}")
        if cuda:  # a graph inductor would not capture (it says why under TORCH_LOGS=perf_hints) runs at eager speed
            skips = counters["inductor"]["cudagraph_skips"]
            print(f"decode {where}: compiled graphs run without CUDA graphs so far: {skips}")
        for ref in [r for r in fns if r != "static"]:  # (yielded batch by batch: see bench_serve)
            yield (f"decode {where}: static (tok/s)", B * N / t["static"], B * N / t[ref], f"ours {ref}"
                   if ref != "transformers" else "transformers generate")


def bench_chat_loader(args):
    """chat.ChatLoader's micro-step at 1M conversations (random tokens; 3 GB: uint16 tokens, bool
    flags) against the per-row order it replaced: the same batches, each row drawing its epoch's
    permutation again."""
    import torch

    from chat import ChatLoader

    N, T, B = 1_000_000, 1024, 32
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50259, (N, T + 1), dtype=np.uint16)
    trained = tokens < 25_000  # (bool straight away: no 2 GB temporary)

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


def bench_evals(args):
    """evals.py's gpt2-repro model (packed scoring: a question's context once, the lm_head only where
    scored) against lm-eval's hf backend on the same checkpoint, the same task and examples and the
    same batch size: lm-eval's loglikelihood requests per second, end to end (simple_evaluate)."""
    import json
    import logging

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    import evals
    from model import GPT, GPTConfig
    from model_io import get_tokenizer, save_pretrained

    enc = get_tokenizer()
    n = 20 if args.quick else args.evals_examples
    files = sorted(glob.glob(os.path.join(args.corpus, "*", "*.txt")))[:20]
    text = enc.encode_ordinary(" ".join(open(f).read() for f in files))
    g = np.random.default_rng(0)
    def cut(k):  # k tokens of the corpus as text, not blank
        while not (piece := enc.decode(text[(s := int(g.integers(0, len(text) - 100))) : s + k]).strip()):
            pass
        return piece

    docs = [{"question": cut(int(g.integers(30, 91))), "choices": [cut(int(g.integers(10, 36))) for _ in range(4)],
             "answer": int(g.integers(0, 4))} for _ in range(n)]  # HellaSwag-like lengths, from the corpus
    work = tempfile.mkdtemp(prefix="bench-evals-")
    try:
        with open(os.path.join(work, "mc.json"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        with open(os.path.join(work, "bench_mc.yaml"), "w") as f:
            f.write("\n".join(["task: bench_mc", "dataset_path: json", "dataset_name: null",
                               f"dataset_kwargs: {{data_files: {{test: {json.dumps(os.path.join(work, 'mc.json'))}}}, "
                               f"cache_dir: {json.dumps(os.path.join(work, 'datasets'))}}}",
                               "test_split: test", "output_type: multiple_choice", 'doc_to_text: "{{question}}"',
                               'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"', "metric_list:",
                               "  - metric: acc", "  - metric: acc_norm"]) + "\n")
        torch.manual_seed(0)
        ckpt = os.path.join(work, "model")
        save_pretrained(GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)), ckpt)
        evals.make_lm_class()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        manager = TaskManager(include_path=work, include_defaults=False)
        out = {}

        def side(name, model_args):
            def go():
                r = lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=["bench_mc"], task_manager=manager,
                                            batch_size=args.evals_batch, bootstrap_iters=0, log_samples=True,
                                            random_seed=0, numpy_random_seed=0, torch_random_seed=0)
                out[name] = [[float(x[0]) for x in s["filtered_resps"]] for s in
                             sorted(r["samples"]["bench_mc"], key=lambda s: s["doc_id"])]
            return go

        dev = args.evals_device
        t = paired({"ours": side("gpt2-repro", {"pretrained": ckpt, "device": dev}),
                    "hf": side("hf", {"pretrained": ckpt, "device": dev, "dtype": "float32"})},
                   repeats(args, 1), warmup=0)
        worst = max(abs(a - b) for x, y in zip(out["gpt2-repro"], out["hf"]) for a, b in zip(x, y))
        assert worst < 1e-3, f"the two backends' log-likelihoods differ by {worst}: the comparison would be meaningless"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    label = (f"evals: {n} multiple-choice examples x 4, {args.n_layer}x{args.n_embd} {dev} fp32, batch "
             f"{args.evals_batch} (requests/s)")
    return [(label, 4 * n / t["ours"], 4 * n / t["hf"], "lm-eval's hf backend")]


# fineweb first: see the imports at the top
SECTIONS = {"fineweb": bench_fineweb, "model": bench_model, "hellaswag": bench_hellaswag, "serve": bench_serve,
            "score": bench_score, "evals": bench_evals,
            "decode": bench_decode, "chat_loader": bench_chat_loader, "train": bench_train, "recipe": bench_recipe}
ON_REQUEST = ("recipe", "decode", "train")  # not in the default set: they train models or want a GPU


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
                   help="recipe: optimizer steps per run (of --recipe_batch x --recipe_block tokens; 0: the step time only)")
    p.add_argument("--recipe_seeds", type=int, default=2, help="recipe: seeds (initialisation and data order)")
    p.add_argument("--recipe_lrs", default="6e-4,1.2e-3", help="recipe: the baseline's --max_lr grid")
    p.add_argument("--recipe_layers", type=int, default=4, help="recipe: layers")
    p.add_argument("--recipe_embd", type=int, default=256, help="recipe: width (heads of 64)")
    p.add_argument("--recipe_block", type=int, default=256, help="recipe: sequence length")
    p.add_argument("--recipe_batch", type=int, default=16, help="recipe: sequences per step (no accumulation)")
    p.add_argument("--recipe_val_tokens", type=int, default=32768, help="recipe: tokens of each validation")
    p.add_argument("--data", "--recipe_data", default=None,
                   help="recipe and train sections: a shard directory (default: fineweb.py over --corpus)")
    p.add_argument("--recipe_train_flags", default="", help="recipe: extra train.py flags for every run (GPU: --device cuda --dtype bf16)")
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
