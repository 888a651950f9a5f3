"""
Benchmarks of every hot path, each against a reference run in the same process, printed as
ratios (these machines are noisy; absolute numbers from one run mean little).

    python bench.py                  # every section
    python bench.py --section model  # one section
    python bench.py --quick          # fewer repetitions (a smoke run)

Sections:
  model  training step (forward + backward + AdamW) and KV-cache sampling, ours against
         transformers' GPT2LMHeadModel at the same config, same inputs.
"""

import argparse
import statistics
import time

import torch


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


# -----------------------------------------------------------------------------


def bench_model(args):
    """Ours vs transformers' GPT-2: training step and sampling, fp32 on this device."""
    import transformers

    from model import GPT, GPTConfig

    transformers.logging.set_verbosity_error()
    L, H, C, T, B = args.n_layer, args.n_head, args.n_embd, args.seq_len, args.batch_size
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=T)
    ours = GPT(cfg)
    hf_cfg = transformers.GPT2Config(n_layer=L, n_head=H, n_embd=C, n_positions=T, vocab_size=cfg.vocab_size,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = transformers.GPT2LMHeadModel(hf_cfg)
    theirs.load_state_dict(ours.hf_state_dict(), strict=False)  # same weights (lm_head is tied)
    data = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]

    # Training step: each side as its users run it. Ours: the chunked fused loss and
    # configure_optimizers (fused AdamW where available). Theirs: labels= and torch's AdamW.
    opt_ours = ours.configure_optimizers(0.1, 6e-4)
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

    repeat = 1 if args.quick else args.repeat
    t = paired({"ours": step_ours, "theirs": step_theirs}, repeat)
    tokens = B * T
    rows = [(f"train step fp32 L{L} C{C} B{B} T{T} (tok/s)", tokens / t["ours"], tokens / t["theirs"])]

    # Sampling: greedy decoding of N new tokens after a P-token prompt, batch 1, KV cache on both.
    ours.eval()
    theirs.eval()
    theirs.load_state_dict(ours.hf_state_dict(), strict=False)  # training moved them apart
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
    rows.append((f"greedy sampling {N} tokens after {P}, batch 1 (tok/s)", N / t["ours"], N / t["theirs"]))
    return rows, "transformers"


SECTIONS = {"model": bench_model}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=list(SECTIONS), action="append", help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="one timed call of each (smoke run)")
    p.add_argument("--repeat", type=int, default=9, help="timed calls of each side; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    print(f"{'benchmark':<58} {'ours':>12} {'reference':>12} {'ratio':>7}  reference")
    for name in args.section or list(SECTIONS):
        rows, ref_name = SECTIONS[name](args)
        for label, ours, ref in rows:
            print(f"{label:<58} {ours:>12,.1f} {ref:>12,.1f} {ours / ref:>6.2f}x  {ref_name}")


if __name__ == "__main__":
    main()
