"""
bench.py's sections on serving and evaluating: serve (serve.py's streaming clients at once against
the same requests one at a time), score (serve.py scoring lm-eval-style requests, concurrent against
one at a time) and evals (evals.py's lm-eval model against lm-eval's hf backend). Each starts what it
measures on a checkpoint of random weights it writes; torch and the clients are imported when it runs.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from bench_timing import corpus_tokens, multiple_choice, paired, repeats


def test_launcher():
    """tests/launch.py's launch(): serve.py in a subprocess, waited for (the tests' harness)."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from launch import launch

    return launch


def bench_serve(args):
    """serve.py: k streaming clients at once (continuous batching) vs the same k requests one at a time."""
    import asyncio
    import json

    import httpx

    import torch

    from model import GPT, GPTConfig
    from model_io import save_pretrained

    launch = test_launcher()

    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="bench-serve-")
    save_pretrained(GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)), work)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc, url = launch(work, *args.serve_flags.split(), env=env, timeout=900)  # (--compile: minutes; errors show)
    P, N = args.prompt_len, 32 if args.quick else args.new_tokens
    g = torch.Generator().manual_seed(0)
    counts = [int(k) for k in args.serve_clients.split(",")]
    bodies = [{"prompt": torch.randint(0, 50000, (P,), generator=g).tolist(), "max_tokens": N, "seed": i,
               "stream": True} for i in range(max(counts))]

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

    from model import GPT, GPTConfig
    from model_io import get_tokenizer, save_pretrained

    launch = test_launcher()

    enc = get_tokenizer()
    n = 20 if args.quick else args.score_examples
    rendered, source = multiple_choice(args.corpus, enc, n)
    inputs = sorted((ctx + e for ctx, ends in rendered for e in ends), key=lambda t: (-len(t), tuple(t)))  # lm-eval's
    bodies = [{"model": "m", "prompt": [t], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True} for t in inputs]
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="bench-score-")
    save_pretrained(GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)), work)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc, url = launch(work, *args.serve_flags.split(), env=env, timeout=900)
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
    text, g = corpus_tokens(args.corpus, enc)

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
