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
from dataclasses import dataclass

import numpy as np

import chat
import cli
import train
from model_io import IM_END, get_tokenizer, load_model
from train import setting

# The recipes' fine-tuning defaults: a gentler learning rate than pretraining's, a short warm-up ("5%" of the run),
# a decay to zero; the optimizers as in pretraining.
RECIPES = {
    "gpt2": {**train.RECIPES["gpt2"], "max_lr": 1e-4, "min_lr": 0.0, "warmup_steps": "5%", "zero_init_residual": False},
    "modern": {**train.RECIPES["modern"], "max_lr": 1e-4, "min_lr": 0.0, "warmup_steps": "5%", "muon_lr": 2e-4,
               "zero_init_residual": False},
}


class TrainPyOnly(argparse.Action):
    """A training flag that means nothing here: refused in one line rather than accepted and ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is train.py's (a new model's initialisation); "
                     "sft.py starts from --model's weights")


@dataclass(kw_only=True)
class SFTConfig(train.TrainConfig):
    """sft.py's settings: train.py's, with fine-tuning's defaults, and the model and conversations."""
    model: str = setting(None, "the model to fine-tune: a train.py run, a checkpoint or HF-format dir, or gpt2",
                         required=True)
    data: list = setting(None, "conversation files (JSON lines) or hf:OWNER/NAME[:SPLIT]", nargs="+", required=True)
    val_data: list = setting(None, "held-out conversations (default: --val_frac of --data)", nargs="+")
    val_frac: float = setting(0.05, "the share of --data held out for the val loss when there is no --val_data (at "
                              "least one conversation, at most --val_conversations)",
                              cli.float_range(0, 1, lo_open=True, hi_open=True))
    val_conversations: int = setting(256, "the most held-out conversations scored at each evaluation (a sample "
                                     "drawn by --seed)", cli.positive_int)
    conversations_per_step: int = setting(32, "conversations (rows) per optimizer step, across all processes",
                                          cli.positive_int, run=True)
    sample_prompt: str = setting("Hello! What can you do?", "the user's message sampled at each evaluation")
    # train.py's flags with fine-tuning's defaults
    max_steps: int = setting(None, "optimizer steps (default: one epoch of the train conversations)",
                             cli.positive_int, run=True)
    batch_size_per_device: int = setting(8, "conversations per process per micro-step", cli.positive_int)
    eval_step_interval: int = setting(50, "validate and sample every N steps", cli.positive_int)
    save_step: int = setting(500, "checkpoint every N steps (and at the end)", cli.positive_int)
    log_dir: str = setting("log/chat", "the run's directory (log.jsonl, checkpoints); it holds one run only")
    zero_init_residual: bool = setting(None, argparse.SUPPRESS, run=True, older=False, recipe=False, nargs=0,
                                       action=TrainPyOnly, also=("--no-zero_init_residual",))
    # set here, not by flags: the batch from --conversations_per_step, validation from the held-out data
    total_batch_size: int = setting(None, run=True, flag=False)
    val_tokens: int = setting(None, run=True, flag=False)
    hellaswag_examples: int = setting(0, flag=False)  # HellaSwag scores completions, not chats


def parser():
    return train.parser(SFTConfig, RECIPES, __doc__)


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


def split(cfg, conversations):
    """(train, val) conversations: --val_data's (a sample of at most --val_conversations), or
    --val_frac of --data held out."""
    if cfg.val_data:
        val_convs = read_data(cfg.val_data)
        if len(val_convs) > cfg.val_conversations:
            val_convs = [val_convs[i] for i in sorted(sample(len(val_convs), cfg.val_conversations, cfg.seed))]
        return conversations, val_convs
    n_val = min(max(1, round(cfg.val_frac * len(conversations))), cfg.val_conversations)
    if n_val >= len(conversations):
        raise cli.Error(f"--data holds {len(conversations)} conversation(s): too few to hold out {n_val} "
                        "for the val loss; add some or pass --val_data")
    held_out = sample(len(conversations), n_val, cfg.seed)
    return ([c for i, c in enumerate(conversations) if i not in held_out],
            [c for i, c in enumerate(conversations) if i in held_out])


def loaders(cfg, T, rt):
    """(train, val) loaders of conversation rows, and the data's sha256 (run.json: --resume refuses
    other data, or the same data split otherwise). Sets the batch, val tokens and, by default, the
    steps (one epoch)."""
    B = cfg.batch_size_per_device
    train_convs, val_convs = split(cfg, read_data(cfg.data))
    train_rows, val_rows = chat.conversation_rows(train_convs, T), chat.conversation_rows(val_convs, T)
    if rt.rank == 0:
        for name, (_, _, counts) in (("train", train_rows), ("val", val_rows)):
            print(f"{name}: {counts['kept']:,} conversations of at most {T} tokens "
                  f"({counts['cropped']:,} cropped, {counts['skipped']:,} skipped: no assistant token fits)")
    cfg.total_batch_size = cfg.conversations_per_step * T
    cfg.val_tokens = len(val_rows[0]) * T  # every held-out conversation, at every validation
    if cfg.max_steps is None:
        cfg.max_steps = math.ceil(len(train_rows[0]) / cfg.conversations_per_step)
        if cfg.max_steps < 20 and rt.rank == 0:
            print(f"warning: one epoch of {len(train_rows[0])} conversations is {cfg.max_steps} step(s) of "
                  f"--conversations_per_step {cfg.conversations_per_step}, too few to learn from: pass --max_steps "
                  f"(more epochs) and a smaller --conversations_per_step (README: a small chat model)")
    sha256 = hashlib.sha256(json.dumps([train_convs, val_convs]).encode()).hexdigest()
    return (chat.ChatLoader(*train_rows[:2], "train", T, B, cfg.total_batch_size, rt.rank, rt.world_size, cfg.seed),
            chat.ChatLoader(*val_rows[:2], "val", T, B, B * T * rt.world_size, rt.rank, rt.world_size, cfg.seed),
            sha256)


def main(argv=None):
    def body():
        cfg = train.parse_args(argv, SFTConfig, RECIPES, parser())
        rt = train.setup(cfg)
        base = chat.to_chat_model(load_model(cfg.model))  # room for the chat markers
        *data, sha256 = loaders(cfg, base.config.block_size, rt)
        settings = {"task": "sft", "init_model": os.path.abspath(cfg.model) if os.path.exists(cfg.model) else cfg.model,
                    "data_sha256": sha256}
        ids, _ = chat.render([{"role": "user", "content": cfg.sample_prompt}], generation_prompt=True)
        return train.fit(cfg, rt, base.config, data, lambda: base, (ids, get_tokenizer(chat=True), IM_END), settings)

    return train.run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
