"""
HellaSwag for GPT-2: exact completion-style scoring, batched, and distributed.

    python hellaswag.py --model gpt2          # OpenAI's 124M (online): acc_norm 0.2955 (README: reference numbers)
    python hellaswag.py --model log           # the newest checkpoint of a train.py run
    torchrun --nproc_per_node=8 hellaswag.py --model log/step_019073 --json results.json

Each example is a context and 4 endings; the model "chooses" the ending it finds most likely.
Rendering is GPT-2 completion style: the context's tokens, then the tokens of " " + ending,
and only the ending's tokens are scored. Three choices are reported:
  acc             the smallest summed loss (-log p) over the ending's tokens: lm-eval's acc
  acc_norm        the smallest mean per-token loss (build-nanogpt, llm.c, the reference table)
  acc_norm_bytes  the largest log-likelihood per UTF-8 byte of the ending, its leading space not
                  counted: exactly lm-eval's acc_bytes (lls / len(ending.encode())). lm-eval's own
                  hellaswag acc_norm divides by characters instead (the same choice on ASCII endings)
                  and scores cleaned text (its hellaswag/utils.py: "activity_label: " + ctx, [title]
                  and other brackets removed); this script scores the file's ctx and endings as they are.

Speed (scoring.py, which evals.py's lm-eval model uses too): the 4 endings of an example share
one context, so an example is packed into a single row (context, then the endings, each restarting
its positions after the context and attending only to the context and to itself), and the
50257-way lm_head runs only at the positions that predict an ending token. Several examples form
one padded batch. The scores equal those of running every context + ending alone (tested).
"""

import json
import os
import sys
import urllib.error
import urllib.request

import torch

import cli
import scoring
from scoring import unwrap

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SIZES = {"train": 39905, "val": 10042, "test": 10003}


# -----------------------------------------------------------------------------
# Data


def default_data_dir():
    return os.environ.get("HELLASWAG_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


def data_path(split, data_dir=None, download=True):
    """Path of hellaswag_{split}.jsonl in data_dir, downloaded there once if it is missing."""
    if split not in SIZES:
        raise cli.Error(f"unknown split {split!r}; choose one of {', '.join(SIZES)}")
    data_dir = data_dir or default_data_dir()
    path = os.path.join(data_dir, f"hellaswag_{split}.jsonl")
    if os.path.isfile(path):
        return path
    url = URL.format(split=split)
    if download:
        try:
            os.makedirs(data_dir, exist_ok=True)
            # (a private temporary name: ranks that download at once don't trip over each other)
            cli.atomic_write(path, lambda tmp: urllib.request.urlretrieve(url, tmp))
            return path
        except (urllib.error.URLError, OSError) as e:
            reason = f"download failed ({e})"
    else:
        reason = "downloading is off"
    raise cli.Error(f"{path} not found and {reason}. Fetch {url} on a machine with internet and "
                         f"put it at {path} (or pass --data_dir / set HELLASWAG_DIR)")


def load_examples(path):
    """Read and validate every line of a HellaSwag jsonl file."""
    examples = []
    for where, ex in cli.read_jsonl(path):
        if not isinstance(ex, dict) or not isinstance(ex.get("ctx"), str) or not ex["ctx"].strip():
            raise cli.Error(f"{where}: no 'ctx' string (or an empty one)")
        endings = ex.get("endings")
        if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
            raise cli.Error(f"{where}: 'endings' must be a list of 4 strings")
        label = ex.get("label")  # absent in the test split, whose answers are hidden
        if isinstance(label, str) and label.isdecimal() and label.isascii():
            label = int(label)
        if "label" in ex and (not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4):
            raise cli.Error(f"{where}: 'label' must be 0..3, got {ex.get('label')!r}")
        examples.append({"ctx": ex["ctx"], "endings": endings, "label": label})
    if not examples:
        raise cli.Error(f"{path}: no examples")
    return examples


# -----------------------------------------------------------------------------
# Rendering and packing


def render(example, enc):
    """(context tokens, [tokens of " " + ending for each ending])."""
    return enc.encode(example["ctx"]), [enc.encode(" " + e) for e in example["endings"]]


def _crop(context, endings, block_size):
    """Crop the context from the left so that context + the longest ending fit block_size."""
    if not context or not all(endings):
        raise cli.Error("an example needs a non-empty context and 4 non-empty endings")
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise cli.Error(f"an ending of {longest} tokens does not fit block_size {block_size}")
    return context[max(0, len(context) + longest - block_size) :]


# -----------------------------------------------------------------------------
# Scoring


def score(model, rendered, batch_size=16, progress=None):
    """rendered: [(ctx_tokens, endings_tokens)] -> (losses float64 (N, 4): summed -log p of each
    ending's tokens, counts long (N, 4): tokens per ending). The context is cropped from the left so
    that it and the longest ending fit block_size; scoring.score packs the endings after one copy of
    it, batch_size examples (4 * batch_size endings) to a forward pass; progress counts endings."""
    block_size = unwrap(model).config.block_size
    pairs = []
    for context, ends in rendered:
        context = _crop(context, ends, block_size)
        pairs += [(context, e) for e in ends]
    scored = scoring.score(model, pairs, 4 * batch_size, progress=progress)
    losses = torch.tensor([-logprob for logprob, _ in scored], dtype=torch.float64).reshape(-1, 4)
    counts = torch.tensor([[len(e) for e in ends] for _, ends in rendered], dtype=torch.long).reshape(-1, 4)
    return losses, counts


def choose(losses, counts, byte_lengths):
    """The chosen ending of each example under each metric."""
    return {
        "acc": losses.argmin(dim=1),
        "acc_norm": (losses / counts).argmin(dim=1),
        "acc_norm_bytes": (losses / byte_lengths).argmin(dim=1),
    }


def evaluate(model, examples, batch_size=16, rank=0, world_size=1, progress=False):
    """Score examples (this rank takes every world_size-th one) and return, on every rank, the
    combined {"n", "skipped", "acc", "acc_norm", "acc_norm_bytes", "predictions": {metric: [choice, ...]},
    "indices": [example index of each choice]}. An example with an ending of block_size tokens or
    more leaves no room for its context: it is skipped, and counted in "skipped" (contexts too long
    are cropped from the left, as GPT-2 would see them)."""
    from model_io import get_tokenizer

    enc = get_tokenizer()
    block_size = unwrap(model).config.block_size
    mine, skipped = [], 0
    rendered = []
    for i in range(rank, len(examples), world_size):
        context, ends = render(examples[i], enc)
        if max(len(e) for e in ends) >= block_size:  # no room for context: skipped, and counted
            skipped += 1
            continue
        mine.append(i)
        rendered.append((context, ends))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=4 * len(mine), desc=f"hellaswag (rank 0 of {world_size})", unit="ending")
    losses, counts = score(model, rendered, batch_size, bar)
    if bar is not None:
        bar.close()
    # lm-eval's acc_bytes: the ending's own bytes, not those of the " " it is scored with
    byte_lengths = torch.tensor([[len(e.encode("utf-8")) for e in examples[i]["endings"]] for i in mine],
                                dtype=torch.float64).reshape(-1, 4)
    chosen = {k: v.tolist() for k, v in choose(losses, counts, byte_lengths).items()}
    local = [(i, {k: chosen[k][j] for k in chosen}) for j, i in enumerate(mine)]
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, (local, skipped))
        local = sorted(x for part, _ in gathered for x in part)
        skipped = sum(n for _, n in gathered)
    predictions = {k: [p[k] for _, p in local] for k in ("acc", "acc_norm", "acc_norm_bytes")}
    labels = [examples[i]["label"] for i, _ in local]
    n = len(labels)
    result = {"n": n, "skipped": skipped}
    for k, preds in predictions.items():  # None without labels (the test split): choices only
        result[k] = None if None in labels or n == 0 else sum(int(p == y) for p, y in zip(preds, labels)) / n
    result["predictions"] = predictions
    result["indices"] = [i for i, _ in local]
    return result


# -----------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--model", default="gpt2",
                   help="HF-format dir, train.py run dir (newest checkpoint), or gpt2[-medium|-large|-xl]")
    p.add_argument("--split", default="val", choices=list(SIZES), help="which HellaSwag file to score")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="score only the first N examples")
    p.add_argument("--batch_size", type=cli.positive_int, default=16, help="examples per forward pass")
    p.add_argument("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (default: bf16 on CUDA, else fp32)")
    p.add_argument("--data_dir", default=None,
                   help="where the jsonl files are (default: $HELLASWAG_DIR or ./hellaswag)")
    p.add_argument("--json", default=None, help="write the results and per-example choices here")
    args = p.parse_args(argv)
    import runtime
    from model_io import load_model

    try:
        examples = load_examples(data_path(args.split, args.data_dir))[: args.limit]  # fail fast on bad data
        rt = runtime.setup(args.device, args.dtype)
        model = load_model(args.model).to(rt.device)
    except cli.Error as e:
        return cli.fail(e)
    with rt.autocast():
        result = evaluate(model, examples, args.batch_size, rt.rank, rt.world_size, progress=True)
    if rt.rank == 0:
        if result["skipped"]:
            print(f"{result['skipped']} examples skipped: an ending of block_size tokens or more")
        if result["acc"] is None:
            print(f"{args.model} on HellaSwag {args.split}, n={result['n']}: no labels in this split; "
                  "the choices are in --json")
        else:
            print(f"{args.model} on HellaSwag {args.split}, n={result['n']}: acc {result['acc']:.4f}  "
                  f"acc_norm {result['acc_norm']:.4f}  acc_norm_bytes {result['acc_norm_bytes']:.4f}")
        if args.json:
            cli.atomic_write(args.json, json.dumps({"model": args.model, "split": args.split, **result}))
    runtime.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
