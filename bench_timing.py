"""
How bench.py's sections time ours against a reference: call by call in alternation (paired), so
that drifting machine load hits every side alike, and how many timed calls a side gets (repeats);
the multiple-choice examples the hellaswag and score sections time.
"""

import statistics
import time


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


def corpus_tokens(corpus, enc):
    """The token ids of the corpus's first 20 documents, and the generator the sections cut their
    pieces with (seeded: the same pieces every run)."""
    import glob
    import os

    import numpy as np

    files = sorted(glob.glob(os.path.join(corpus, "*", "*.txt")))[:20]
    return enc.encode_ordinary(" ".join(open(f).read() for f in files)), np.random.default_rng(0)


def multiple_choice(corpus, enc, n):
    """(n rendered examples [(context ids, [4 ending ids])], their source): HellaSwag val where it lies
    beside the project, else HellaSwag-like lengths (context 30-90 tokens, endings 10-35) cut from the
    corpus."""
    import os

    import hellaswag

    real = os.path.join("..", "shared", "hellaswag", "hellaswag_val.jsonl")
    if os.path.isfile(real):
        return [hellaswag.render(ex, enc) for ex in hellaswag.load_examples(real)[:n]], "HellaSwag val"
    text, g = corpus_tokens(corpus, enc)

    def cut(k):
        start = int(g.integers(0, len(text) - 100))
        return text[start : start + k]

    rendered = [(cut(int(g.integers(30, 91))), [cut(int(g.integers(10, 36))) for _ in range(4)]) for _ in range(n)]
    return rendered, "synthetic"
