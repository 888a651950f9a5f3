"""
Sample text from a GPT-2: a train.py run, one of its checkpoints, a Hugging Face-format
directory, or OpenAI's weights.

    python generate.py --model log/small --prompt "Hello, I'm a language model," --num_samples 3
    python generate.py --model log/small/step_000080 --temperature 0          # greedy
    python generate.py --model gpt2 --prompt "The meaning of life is" --top_p 0.9 --max_new_tokens 200

The text streams to stdout as it is made. All --num_samples samples are drawn together, as one
batch (one forward pass per token for all of them); sample 1 streams live, the others follow it
once the batch is done, each under a header. A sample ends at <|endoftext|> (not printed) or
after --max_new_tokens. An empty --prompt samples unconditionally, from <|endoftext|> as GPT-2
does. The speed goes to stderr. For a fixed --seed the tokens are those of
model.generate(prompts, max_new_tokens, seed=..., eos_token_id=50256) on the same batch.
"""

import codecs
import sys
import time

import torch

import cli
from model_io import DTYPES, best_device, default_dtype, get_tokenizer, load_model



def sample(model, prompt, max_new_tokens, num_samples=1, on_text=None, **sampling):
    """Sample num_samples completions of the string `prompt` in one generate_stream batch (KV cache).
    on_text(piece) is called with sample 1's text as it is made, the prompt first.
    sampling: generate_stream's temperature, top_k, top_p, seed.
    Returns (texts: prompt + completion of each sample, steps: tokens made per row, seconds)."""
    enc = get_tokenizer()
    eot = enc.eot_token
    ids = enc.encode(prompt) or [eot]
    idx = torch.tensor([ids] * num_samples, device=model.transformer.wte.weight.device)
    # Tokens are byte strings, and a character's UTF-8 bytes may be split across tokens: an
    # incremental decoder holds back an incomplete character until its last byte arrives.
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    pieces = [[] for _ in range(num_samples)]

    def add(row, data, final=False):
        piece = decoders[row].decode(data, final=final)
        pieces[row].append(piece)
        if row == 0 and piece and on_text is not None:
            on_text(piece)

    for row in range(num_samples):
        for t in ids:
            if t != eot:
                add(row, enc.decode_single_token_bytes(t))
    t0 = time.perf_counter()
    steps = 0
    for tokens in model.generate_stream(idx, max_new_tokens, eos_token_id=eot, **sampling):
        steps += 1
        for row, t in enumerate(tokens.tolist()):  # a finished row keeps yielding eot: nothing to print
            if t != eot:
                add(row, enc.decode_single_token_bytes(t))
    seconds = time.perf_counter() - t0
    for row in range(num_samples):
        add(row, b"", final=True)  # a trailing incomplete character becomes U+FFFD, as in enc.decode
    return ["".join(p) for p in pieces], steps, seconds


def main(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--model", default="log", help="train.py run dir (its newest checkpoint), a step_NNNNNN/ or other "
      "HF-format dir, or gpt2[-medium|-large|-xl] (downloads once)")
    a("--prompt", default="Hello, I'm a language model,", help="text to continue ('': unconditional)")
    a("--max_new_tokens", type=cli.positive_int, default=64, help="tokens to sample per sample, at most")
    a("--temperature", type=cli.non_negative_float, default=1.0, help="0: greedy")
    a("--top_k", type=cli.non_negative_int, default=50, help="sample among the k most likely tokens (0: all)")
    a("--top_p", type=cli.float_range(0, 1, lo_open=True), default=1.0, help="nucleus: the most likely tokens up to this probability (1: all)")
    a("--num_samples", type=cli.positive_int, default=1, help="samples drawn together, as one batch")
    a("--seed", type=cli.int_range(0, 2**63 - 1), default=42, help="the same seed, settings and model give the same samples")
    a("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    a("--dtype", choices=list(DTYPES), default=None, help="weights' dtype (default: bf16 on CUDA, else fp32)")
    args = p.parse_args(argv)
    device = args.device or best_device()
    dtype = args.dtype or default_dtype(device)
    try:
        get_tokenizer()  # fail before loading weights if the BPE cannot be had
        model = load_model(args.model).to(device=device, dtype=DTYPES[dtype])
    except cli.Error as e:
        return cli.fail(e)

    n = args.num_samples
    if n > 1:
        print("--- sample 1 ---")
    texts, steps, seconds = sample(model, args.prompt, args.max_new_tokens, n, on_text=lambda s: print(s, end="", flush=True),
                                   temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)
    print()
    for i, text in enumerate(texts[1:], 2):
        print(f"--- sample {i} ---\n{text}")
    print(f"{n} x {steps} tokens in {seconds:.2f} s: {n * steps / seconds:.1f} tokens/s ({device}, {dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
