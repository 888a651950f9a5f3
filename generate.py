"""
Sample text from a GPT-2: a train.py run, one of its checkpoints, a Hugging Face-format
directory, or OpenAI's weights; or, with --chat, talk to a chat model (one sft.py made).

    python generate.py --prompt "Hello, I'm a language model," --num_samples 3   # log/small: ./run.sh's model
    python generate.py --model log/small/step_000080 --temperature 0          # greedy
    python generate.py --model gpt2 --prompt "The meaning of life is" --top_p 0.9 --max_new_tokens 200
    python generate.py --chat --model log/chat --system "You are a helpful assistant."

The text streams to stdout as it is made. All --num_samples samples are drawn together, as one
batch (one forward pass per token for all of them); sample 1 streams live, the others follow it
once the batch is done, each under a header. A batch that needs more memory than the device has
free (its KV caches and logits, estimated before it starts) is refused, with the most it can take.
A sample ends at <|endoftext|> (not printed) or after --max_new_tokens. An empty --prompt samples
unconditionally, from <|endoftext|> as GPT-2 does (and <|endoftext|> in a prompt is that token).
The speed goes to stderr. For a fixed --seed the tokens are those of
model.generate(prompts, max_new_tokens, seed=..., eos_token_id=50256) on the same batch.

--chat: a conversation in the terminal. Type a message at `you> `; the reply streams after
`assistant> ` and ends at <|im_end|> or after --max_new_tokens. Every reply sees the whole
conversation so far (chat.py's template: the --system message, then your messages and its
replies). Commands: /reset clears the history (the --system message stays), /quit or /exit
(or Ctrl-D, or Ctrl-C at the prompt) ends. Ctrl-C during a reply stops it: what was printed
stays in the history as the reply, and the prompt returns. The n-th reply since the start or
the last /reset is sampled with seed --seed + n - 1, so the same messages and flags give the
same replies: each is model.generate(chat.render(history, generation_prompt=True), seed=...,
eos_token_id=<|im_end|>), cut before <|im_end|>. When the history no longer fits the model's
context with room for the reply (--max_new_tokens, at most half the context), its oldest turns
(your message and the reply, together) are dropped for good, the system message kept, and a
note says so; a message too long to fit even alone loses tokens from its start. A reply longer
than the room left slides the context window as plain sampling does. Notes go to stderr.

Ctrl-C (outside --chat) exits with status 130, a stdout closed by its reader (`| head -1`) with 141,
as SIGINT and SIGPIPE would end a program; neither prints a traceback.
"""

import argparse
import os
import signal
import sys
import threading
import time

if __name__ == "__main__":  # Ctrl-C while torch loads ends it quietly, as SIGINT does (see the end of the file)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import torch  # noqa: E402

import chat  # noqa: E402
import cli  # noqa: E402
import decode  # noqa: E402
import runtime  # noqa: E402
from decode import StaticDecoder  # noqa: E402
from model import PRESETS  # noqa: E402
from model_io import (IM_END, TextStream, checkpoint_dirs,  # noqa: E402
                      get_tokenizer, load_model)
from runtime import DTYPES  # noqa: E402

MAX_NEW_TOKENS = {"plain": 64, "chat": 256}  # --max_new_tokens's defaults


def prompt_ids(prompt):
    """The tokens of --prompt: text, where `<|endoftext|>` is that token; '' is <|endoftext|> alone."""
    enc = get_tokenizer()
    return enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]


def sample(model, prompt, max_new_tokens, num_samples=1, on_text=None, **sampling):
    """Sample num_samples completions of the string `prompt` in one batch (decode.generate_stream, KV cache).
    on_text(piece) is called with sample 1's text as it is made, the prompt first.
    sampling: generate_stream's temperature, top_k, top_p, seed, decoder.
    Returns (texts: prompt + completion of each sample, steps: tokens made per row, seconds)."""
    eot = get_tokenizer().eot_token
    ids = prompt_ids(prompt)
    idx = torch.tensor([ids] * num_samples, device=model.transformer.wte.weight.device)
    # each token's bytes, a chat model's markers too
    token_bytes = get_tokenizer(chat=chat.is_chat_model(model)).decode_single_token_bytes
    streams = [TextStream() for _ in range(num_samples)]
    pieces = [[] for _ in range(num_samples)]

    def add(row, data, final=False):
        piece, _ = streams[row].push(data, final)
        pieces[row].append(piece)
        if row == 0 and piece and on_text is not None:
            on_text(piece)

    for row in range(num_samples):
        for t in ids:
            if t != eot:
                add(row, token_bytes(t))
    t0 = time.perf_counter()
    steps = 0
    for tokens in decode.generate_stream(model, idx, max_new_tokens, eos_token_id=eot, **sampling):
        steps += 1
        for row, t in enumerate(tokens.tolist()):  # a finished row keeps yielding eot: nothing to print
            if t != eot:
                add(row, token_bytes(t))
    seconds = time.perf_counter() - t0
    for row in range(num_samples):
        add(row, b"", final=True)
    return ["".join(p) for p in pieces], steps, seconds


def batch_bytes(model, rows, prompt_len, max_new_tokens, static=False):
    """About the memory sample() needs for a batch of rows, besides the weights: the KV caches (the whole
    context for the static cache's bucket of rows), the prefill's widest activations, and the (rows, vocab)
    fp32 logits, which sampling copies up to ~10 times (top_p sorts them, with int64 indices)."""
    c, itemsize = model.config, model.transformer.wte.weight.element_size()
    T = min(prompt_len, c.block_size)
    S = c.block_size if static else min(c.block_size, T + max_new_tokens)
    kv = (StaticDecoder.bucket(rows) if static else rows) * 2 * c.n_layer * S * c.n_embd * itemsize
    return kv + rows * (8 * T * c.n_embd * itemsize + 4 * c.n_head * T * T + 10 * 4 * c.vocab_size)


def free_memory(device):
    """Bytes free on device (CPU: MemAvailable, else all the physical memory), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) << 10 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_batch_fits(model, device, n, prompt_len, max_new_tokens, static=False):
    """cli.Error if n samples, drawn as one batch, need more memory than the device has free."""
    need, free = batch_bytes(model, n, prompt_len, max_new_tokens, static), free_memory(device)
    if free is None or need <= free:
        return
    fit = free // batch_bytes(model, 1, prompt_len, max_new_tokens, static)
    raise cli.Error(f"--num_samples {n}: drawn as one batch they need about {need / 2**30:,.1f} GiB (KV caches and "
                    f"logits), more than the {free / 2**30:,.1f} GiB free on {device}: "
                    + (f"ask for at most {fit}, or lower --max_new_tokens" if fit else "free some memory"))


def out_of_memory(e):
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)  # (CPU's)


def runs_under(root="log"):
    """The models under root that --model takes (train.py runs with checkpoints, HF-format dirs): root and its dirs."""
    try:
        dirs = [root] + sorted(os.path.join(root, d) for d in os.listdir(root))
    except OSError:
        return []
    return [d for d in dirs if checkpoint_dirs(d) or os.path.isfile(os.path.join(d, "config.json"))]


def load(spec):
    """load_model(spec); when spec names no model at all, the error says which ones it can see."""
    try:
        return load_model(spec)
    except cli.Error as e:
        if spec in PRESETS or checkpoint_dirs(spec) or os.path.isfile(os.path.join(spec, "config.json")):
            raise  # (a model that is there but wrong: its own error)
        runs = runs_under("log")
        seen = f"models under log/: {', '.join(runs)}" if runs else "no model under log/ (./run.sh trains log/small)"
        raise cli.Error(f"{e}; {seen}") from None


# -----------------------------------------------------------------------------
# --chat


def reply_room(block_size, max_new_tokens):
    """Tokens of the context kept free for a reply: --max_new_tokens, at most half the context."""
    return min(max_new_tokens, block_size // 2)


def check_system_fits(system, block_size, room):
    """cli.Error unless the system message leaves room for a user message of at least one token."""
    start = [{"role": "system", "content": system}] if system is not None else []
    ids, _ = chat.render(start + [{"role": "user", "content": "x"}], generation_prompt=True)
    if len(ids) > block_size - room:
        raise cli.Error(f"--system is {len(chat.render(start)[0])} tokens: with {room} tokens kept for the reply, "
                        f"it leaves no room for your messages in the model's {block_size}-token context (shorten it "
                        "or lower --max_new_tokens)")


class CtrlC:
    """Within `with CtrlC() as c:`, Ctrl-C (SIGINT) sets c.pressed instead of raising KeyboardInterrupt
    (in the main thread), so that a reply stops between two tokens: never between printing a piece
    and keeping it in the history."""

    def __enter__(self):
        self.pressed, self.installed = False, threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, signum, frame):
        self.pressed = True

    def __exit__(self, *exc):
        if self.installed:  # (None: a handler not set from Python)
            signal.signal(signal.SIGINT, signal.SIG_DFL if self.previous is None else self.previous)


def note(text):
    sys.stdout.flush()
    print(f"({text})", file=sys.stderr, flush=True)


def chat_loop(model, system=None, max_new_tokens=MAX_NEW_TOKENS["chat"], seed=42, **sampling):
    """generate.py --chat: read messages from stdin, stream the replies to stdout. Returns 0."""
    enc = get_tokenizer(chat=True)
    block_size = model.config.block_size
    room = reply_room(block_size, max_new_tokens)
    check_system_fits(system, block_size, room)
    device = model.transformer.wte.weight.device
    start = [{"role": "system", "content": system}] if system is not None else []
    messages, replies = list(start), 0
    echo = sys.stdin is None or not sys.stdin.isatty()  # a transcript: the messages read from a pipe or file
    if not echo:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    note(f"chatting with a {block_size}-token-context model; /reset clears the history, /quit or Ctrl-D ends, "
         "Ctrl-C stops a reply")
    while True:
        try:
            if sys.stdin is None:  # (stdin closed, `<&-`: as at its end)
                raise EOFError
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if echo:
            print(line)
        text = line.strip()
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages, replies = list(start), 0
            note("history cleared")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        stream, pieces, ended = TextStream(), [], False
        with CtrlC() as ctrl_c:
            ids, dropped, cut = chat.fit(messages, block_size - room)
            if dropped:
                del messages[len(start) : len(start) + dropped]
                note(f"history cropped: the {dropped} oldest messages dropped to fit the {block_size}-token context")
            if cut:
                note(f"message cropped: its first {cut} tokens dropped to fit the {block_size}-token context")
            print("assistant> ", end="", flush=True)
            idx = torch.tensor([ids], device=device)
            tokens = decode.generate_stream(model, idx, max_new_tokens, eos_token_id=IM_END, seed=seed + replies,
                                            **sampling)
            for tok in tokens:
                if ctrl_c.pressed:
                    break
                t = tok.item()
                if t == IM_END:
                    ended = True
                    break
                piece, _ = stream.push(enc.decode_single_token_bytes(t))
                print(piece, end="", flush=True)
                pieces.append(piece)
            tokens.close()
        stopped = ctrl_c.pressed and not ended
        if not stopped:  # (stopped: the reply is what was printed, an incomplete last character left out)
            pieces.append(stream.push(b"", final=True)[0])
            print(pieces[-1], end="")
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
        replies += 1
        if stopped:
            note("reply stopped: what was printed stays in the history")
        elif not ended:
            note(f"reply cut at --max_new_tokens {max_new_tokens}")


def main(argv=None):
    p = cli.Parser(description=__doc__)
    a = p.add_argument
    a("--model", default="log/small", help="train.py run dir (its newest checkpoint), a step_NNNNNN/ or other "
      "HF-format dir, or gpt2[-medium|-large|-xl] (downloads once) (default: log/small, the run ./run.sh trains)")
    a("--prompt", default="Hello, I'm a language model,", help="text to continue ('': unconditional; not with --chat)")
    a("--chat", action="store_true", help="talk to a chat model (one sft.py made) in the terminal: see above")
    a("--system", default=None, help="--chat: the system message that starts the conversation (default: none)")
    a("--max_new_tokens", type=cli.positive_int, default=None,
      help=f"tokens to sample per sample or reply, at most (default: {MAX_NEW_TOKENS['plain']}; "
           f"with --chat {MAX_NEW_TOKENS['chat']})")
    a("--temperature", type=cli.non_negative_float, default=1.0, help="0: greedy")
    a("--top_k", type=cli.non_negative_int, default=50, help="sample among the k most likely tokens (0: all)")
    a("--top_p", type=cli.float_range(0, 1, lo_open=True), default=1.0,
      help="nucleus: the most likely tokens up to this probability (1: all)")
    a("--num_samples", type=cli.positive_int, default=1, help="samples drawn together, as one batch (not with --chat)")
    a("--seed", type=cli.int_range(0, 2**63 - 1), default=42,
      help="the same seed, settings and model give the same samples (--chat: reply n uses seed + n - 1)")
    a("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    a("--dtype", choices=list(DTYPES), default=None, help="weights' dtype (default: bf16 on CUDA, else fp32)")
    a("--static_cache", action=argparse.BooleanOptionalAction, default=None,
      help="decode with fixed shapes (whole-context KV cache; default: with --compile, which makes its steps "
           "CUDA graphs); the same tokens")
    a("--compile", action="store_true",
      help="compile the decode step, on the static cache (on CUDA a CUDA graph; slow start)")
    args = p.parse_args(argv)
    if args.chat:
        for flag in ("prompt", "num_samples"):
            if getattr(args, flag) != p.get_default(flag):
                p.error(f"--{flag} is for plain sampling; --chat reads your messages from the terminal")
    elif args.system is not None:
        p.error("--system needs --chat")
    max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS["chat" if args.chat else "plain"]
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    try:
        rt = runtime.setup(args.device, args.dtype, distributed=False)
        device = rt.device
        get_tokenizer()  # fail before loading weights if the BPE cannot be had
        model = load(args.model).to(device=device, dtype=DTYPES[rt.dtype])
        static = StaticDecoder.wanted(args.static_cache, args.compile)
        if not args.chat:
            check_batch_fits(model, device, args.num_samples, len(prompt_ids(args.prompt)), max_new_tokens, static)
        if static:  # this run's decoder, for every sample or reply (a bucket of rows: what batch_bytes counts)
            rows = StaticDecoder.bucket(1 if args.chat else args.num_samples)
            sampling["decoder"] = StaticDecoder(model, rows, compile=args.compile)
            if args.compile:  # now: tokens/s counts no compiling
                print("(compiling the decode step...)", file=sys.stderr, flush=True)
                sampling["decoder"].warm_up()
        if args.chat:
            if not chat.is_chat_model(model):
                raise cli.Error(f"--model {args.model} is not a chat model (its vocabulary has no chat markers): "
                                "fine-tune it into one with sft.py (python sft.py --model ... --data chats.jsonl), "
                                "or sample from it without --chat")
            try:
                return chat_loop(model, args.system, max_new_tokens, args.seed, **sampling)
            except KeyboardInterrupt:  # a second Ctrl-C while one was being handled
                print()
                return 0
        if chat.is_chat_model(model):
            print("(a chat model: --chat talks to it; plain sampling prints its markers as text)", file=sys.stderr)
        n = args.num_samples
        if n > 1:
            print("--- sample 1 ---")
        try:
            texts, steps, seconds = sample(model, args.prompt, max_new_tokens, n, seed=args.seed, **sampling,
                                           on_text=lambda s: print(s, end="", flush=True))
        except (RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            sys.stdout.flush()
            raise cli.Error(f"out of memory on {device} drawing {n} samples of {max_new_tokens} tokens as one batch: "
                            "lower --num_samples or --max_new_tokens") from None
    except cli.Error as e:
        return cli.fail(e)
    print()
    for i, text in enumerate(texts[1:], 2):
        print(f"--- sample {i} ---\n{text}")
    print(f"{n} x {steps} tokens in {seconds:.2f} s: {n * steps / seconds:.1f} tokens/s ({device}, {rt.dtype})",
          file=sys.stderr)
    return 0


def quietly(main):
    """main()'s exit status, where Ctrl-C is 130 and a closed stdout (`| head -1`) 141, as SIGINT and SIGPIPE
    would make it, without a traceback; Python itself turns both into exceptions."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (SIG_DFL while torch loaded: see the imports)
    try:
        status = main()
        sys.stdout.flush()  # now, not at exit, where a broken pipe would be a message
        return status
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (what is still buffered goes nowhere)
        return 141


if __name__ == "__main__":
    sys.exit(quietly(main))
