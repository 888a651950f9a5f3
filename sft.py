"""
Supervised fine-tuning: a trained GPT-2 becomes a chat model that answers in chat.py's template.

    python sft.py --model log/small --data chats.jsonl --log_dir log/chat        # one process
    torchrun --standalone --nproc_per_node=8 sft.py --model log/gpt2 --data ...   # 8 GPUs
    python generate.py --chat --model log/chat                                    # talk to it

--model is anything generate.py takes: a train.py run (its newest checkpoint), a step_NNNNNN/ or
Hugging Face-format directory, or gpt2[-medium|-large|-xl]. --data is conversations in OpenAI's
fine-tuning format, JSON lines of {"messages": [{"role": "system"|"developer"|"user"|"assistant",
"content": "..." or [{"type": "text", "text": "..."}], "weight": 0|1 (assistant messages; 0: context,
not trained)}]} (chat.parse_messages): local files, or a Hub dataset with a "messages" column named
hf:OWNER/NAME[:SPLIT] (read through `datasets`, e.g. hf:HuggingFaceTB/smol-smoltalk). `python chat.py
FILE` checks a file. The val loss is scored on held-out conversations, at most --val_conversations
of them (a sample drawn by --seed): --val_data's, or --val_frac of --data.

Batches: one conversation per row of block_size tokens, padded with <|endoftext|> (never packed,
so a token attends only to its own conversation). A longer conversation is cropped at its end,
and skipped when the crop leaves none of the assistant's tokens; both are counted and printed.
The loss covers the assistant's tokens only (chat.render), averaged over a step's trained tokens
whatever the micro-batch or number of processes.

This is train.py's loop, given another task (the model to start from, these batches): DDP,
bf16/fp16, exact --resume, atomic checkpoints, log.jsonl and the recipe and optimizer flags work
as they do there. Checkpoints are chat models: vocab_size 50,259 (GPT-2's and the two chat
markers), "chat_format": "chatml" in config.json; transformers loads them as any GPT-2.
"""

import argparse
import hashlib
import json
import math
import os

import numpy as np

import chat
import cli
import train
from model_io import IM_END, get_tokenizer, load_model

# The recipes' fine-tuning defaults: a gentler learning rate than pretraining's, a short warm-up (5% of the run),
# a decay to zero; the optimizers as in pretraining.
RECIPES = {
    "gpt2": {**train.RECIPES["gpt2"], "max_lr": 1e-4, "min_lr": 0.0, "warmup_steps": "5%", "zero_init_residual": False},
    "modern": {**train.RECIPES["modern"], "max_lr": 1e-4, "min_lr": 0.0, "warmup_steps": "5%", "muon_lr": 2e-4,
               "zero_init_residual": False},
}


def parser():
    p = cli.Parser(description=__doc__, conflict_handler="resolve")
    a = p.add_argument
    a("--model", required=True, help="the model to fine-tune: a train.py run, a checkpoint or HF-format dir, or gpt2")
    a("--data", nargs="+", required=True, help="conversation files (JSON lines) or hf:OWNER/NAME[:SPLIT]")
    a("--val_data", nargs="+", default=None, help="held-out conversations (default: --val_frac of --data)")
    a("--val_frac", type=cli.float_range(0, 1, lo_open=True, hi_open=True), default=0.05,
      help="the share of --data held out for the val loss when there is no --val_data (at least one conversation, "
      "at most --val_conversations)")
    a("--val_conversations", type=cli.positive_int, default=256,
      help="the most held-out conversations scored at each evaluation (a sample drawn by --seed)")
    a("--conversations_per_step", type=cli.positive_int, default=32,
      help="conversations (rows) per optimizer step, across all processes")
    a("--sample_prompt", default="Hello! What can you do?", help="the user's message sampled at each evaluation")
    train.add_training_flags(p, RECIPES)
    # train.py's flags with fine-tuning's defaults
    a("--max_steps", type=cli.positive_int, default=None, help="optimizer steps (default: one epoch of the train conversations)")
    a("--batch_size_per_device", type=cli.positive_int, default=8, help="conversations per process per micro-step")
    a("--eval_step_interval", type=cli.positive_int, default=50, help="validate and sample every N steps")
    a("--save_step", type=cli.positive_int, default=500, help="checkpoint every N steps (and at the end)")
    a("--log_dir", default="log/chat", help="the run's directory (log.jsonl, checkpoints); it holds one run only")
    a("--zero_init_residual", "--no-zero_init_residual", nargs=0, action=TrainPyOnly, default=None,
      help=argparse.SUPPRESS)
    p.set_defaults(hellaswag_examples=0)  # HellaSwag scores completions, not chats
    return p


class TrainPyOnly(argparse.Action):
    """A training flag that means nothing here: refused in one line rather than accepted and ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is train.py's (a new model's initialisation); "
                     "sft.py starts from --model's weights")


def read_data(sources):
    """Conversations of files and hf: datasets, in the order given."""
    out = []
    for source in sources:
        if source.startswith("hf:"):
            out += read_hub(source[3:])
        else:
            out += chat.read_conversations(source)
    return out


def read_hub(spec):
    name, _, split = spec.partition(":")
    import fineweb

    fineweb.check_hub(name, instead="download it and pass the JSON-lines file")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split=split or "train")
    except Exception as e:
        raise cli.Error(f"cannot load hf:{spec}: {type(e).__name__}: {e}") from None
    if "messages" not in ds.column_names:
        raise cli.Error(f"hf:{spec} has no 'messages' column (columns: {', '.join(ds.column_names)})")
    return [chat.parse_messages(m, f"hf:{spec} row {i}", training=True) for i, m in enumerate(ds["messages"])]


def sample(n, k, seed):
    """k of range(n), drawn by seed (a set)."""
    return set(np.random.default_rng(seed).permutation(n)[:k].tolist())


class FineTuning:
    """train.py's task for sft.py: start from --model (with room for the chat markers), train on
    conversations."""

    recipes = RECIPES

    def __init__(self):
        self.base = None

    def config(self, args):
        self.base = chat.to_chat_model(load_model(args.model))
        return self.base.config

    def loaders(self, args, config, rank, world_size):
        T, B = config.block_size, args.batch_size_per_device
        conversations = read_data(args.data)
        if args.val_data:
            train_convs, val_convs = conversations, read_data(args.val_data)
            if len(val_convs) > args.val_conversations:
                val_convs = [val_convs[i] for i in sorted(sample(len(val_convs), args.val_conversations, args.seed))]
        else:
            n_val = min(max(1, round(args.val_frac * len(conversations))), args.val_conversations)
            if n_val >= len(conversations):
                raise cli.Error(f"--data holds {len(conversations)} conversation(s): too few to hold out {n_val} "
                                "for the val loss; add some or pass --val_data")
            held_out = sample(len(conversations), n_val, args.seed)
            train_convs = [c for i, c in enumerate(conversations) if i not in held_out]
            val_convs = [c for i, c in enumerate(conversations) if i in held_out]
        train_rows, val_rows = chat.rows(train_convs, T), chat.rows(val_convs, T)
        if rank == 0:
            for name, (_, _, counts) in (("train", train_rows), ("val", val_rows)):
                print(f"{name}: {counts['kept']:,} conversations of at most {T} tokens "
                      f"({counts['cropped']:,} cropped, {counts['skipped']:,} skipped: no assistant token fits)")
        args.total_batch_size = args.conversations_per_step * T
        args.val_tokens = len(val_rows[0]) * T  # every held-out conversation, at every validation
        if args.max_steps is None:
            args.max_steps = math.ceil(len(train_rows[0]) / args.conversations_per_step)
            if args.max_steps < 20 and rank == 0:
                print(f"warning: one epoch of {len(train_rows[0])} conversations is {args.max_steps} step(s) of "
                      f"--conversations_per_step {args.conversations_per_step}, too few to learn from: pass --max_steps "
                      f"(more epochs) and a smaller --conversations_per_step (README: a small chat model)")
        # what run.json records: --resume refuses other data (or the same data split otherwise)
        self.data_sha256 = hashlib.sha256(json.dumps([train_convs, val_convs]).encode()).hexdigest()
        return (chat.ChatLoader(*train_rows[:2], "train", T, B, args.total_batch_size, rank, world_size, args.seed),
                chat.ChatLoader(*val_rows[:2], "val", T, B, B * T * world_size, rank, world_size, args.seed))

    def init_model(self, args, config):
        return self.base

    def settings(self, args):
        return {"task": "sft", "init_model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
                "data_sha256": self.data_sha256, "conversations_per_step": args.conversations_per_step}

    def sample_prompt(self, args):
        ids, _ = chat.render([{"role": "user", "content": args.sample_prompt}], generation_prompt=True)
        return ids, get_tokenizer(chat=True), IM_END


def main(argv=None):
    return train.main(argv, task=FineTuning(), parser=parser())


if __name__ == "__main__":
    raise SystemExit(main())
