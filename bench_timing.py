"""
How bench.py's sections time ours against a reference: call by call in alternation (paired), so
that drifting machine load hits every side alike, and how many timed calls a side gets (repeats).
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
