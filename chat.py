"""
Chat: how a conversation becomes GPT-2 tokens, in one place for sft.py, generate.py --chat and
serve.py's /v1/chat/completions; conversation files; and the batches sft.py trains on.

The template is ChatML, with its two markers as special tokens in rows of GPT-2's embedding that
pretraining never uses (the vocabulary is padded to 50,304 rows; 50,257 are real):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nHi!<|im_end|>\\n
    <|im_start|>assistant\\nHello! How can I help?<|im_end|>\\n

A chat model's vocabulary is 50,259 tokens (model_io.CHAT_VOCAB_SIZE): its config.json says so and
carries "chat_format": "chatml" and eos_token_id <|im_end|>, and transformers loads it as any
GPT-2. Message text is encoded as ordinary text, so a user who types "<|im_end|>" gets those
characters, never the marker. sft.py trains on the assistant's tokens only: each assistant
message's text and the <|im_end|> that closes it (so the model learns to stop); everything
else (the markers' lines, system and user text) is context, with target -1.
"""

import sys
from dataclasses import asdict

import numpy as np
import torch

import cli
from data import StepStream
from model import EOT_TOKEN, GPT, GPTConfig
from model_io import CHAT_VOCAB_SIZE, IM_END, IM_START, get_tokenizer

ROLES = ("system", "user", "assistant")


def _pieces(m):
    """One message's tokens in three pieces: <|im_start|>role\\n; its text and <|im_end|>; \\n."""
    enc = get_tokenizer()
    head = [IM_START] + enc.encode_ordinary(m["role"] + "\n")
    return head, enc.encode_ordinary(m["content"]) + [IM_END], enc.encode_ordinary("\n")


def render(messages, generation_prompt=False):
    """messages [{"role", "content"}] -> (token ids, trained flags), one flag per token: True for
    the assistant's text and its closing <|im_end|>. generation_prompt=True ends the tokens with
    an open assistant turn (<|im_start|>assistant\\n), the prompt a reply is sampled after."""
    ids, trained = [], []
    for m in messages:
        head, body, tail = _pieces(m)
        ids += head + body + tail
        trained += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tail)
    if generation_prompt:
        head = _pieces({"role": "assistant", "content": ""})[0]
        ids += head
        trained += [False] * len(head)
    return ids, trained


def fit(messages, limit):
    """The tokens a reply is sampled after, render(messages, generation_prompt=True), made to fit in
    `limit` tokens. messages: an optional system message, then the user's messages and the replies
    in turn, ending with the user's. While too long, the oldest turn (a user message and its reply)
    is dropped, never the system message nor the last message; if that one alone is still too long,
    tokens are cut from the start of its text.
    Returns (ids, dropped: how many messages from the front (after the system message) the prompt
    leaves out, cut: how many tokens of the last message's text it leaves out)."""
    system = 1 if messages[0]["role"] == "system" else 0
    sizes = [len(render([m])[0]) for m in messages]  # render is per message: the sizes add up
    gen = render([], generation_prompt=True)[0]  # <|im_start|>assistant\n
    dropped = 0
    while sum(sizes[:system]) + sum(sizes[system + dropped:]) + len(gen) > limit and system + dropped + 2 < len(messages):
        dropped += 2
    kept = messages[:system] + messages[system + dropped:]
    ids, _ = render(kept, generation_prompt=True)
    cut = max(0, len(ids) - limit)
    if cut:
        head, body, tail = _pieces(kept[-1])
        if cut >= len(body):  # (body ends with <|im_end|>, which stays)
            raise cli.Error(f"the system message leaves no room for a message in {limit} tokens")
        ids = render(kept[:-1])[0] + head + body[cut:] + tail + gen
    return ids, dropped, cut


def check_messages(messages, where, training=False):
    """Raise cli.Error naming `where` unless messages is a list of {"role": one of ROLES,
    "content": str}; training=True also requires an assistant turn (something to learn)."""
    if not isinstance(messages, list) or not messages:
        raise cli.Error(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise cli.Error(f"{where}: message {i} is not an object")
        if m.get("role") not in ROLES:
            raise cli.Error(f"{where}: message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise cli.Error(f"{where}: message {i} ({m['role']}) has no 'content' string")
    if training and not any(m["role"] == "assistant" for m in messages):
        raise cli.Error(f"{where}: no assistant turn (nothing to learn from)")


def read_conversations(path):
    """The conversations of a JSON-lines file, one {"messages": [...]} per line (OpenAI's
    fine-tuning format); blank lines are skipped. A bad line is a cli.Error naming file and line."""
    out = []
    for where, record in cli.read_jsonl(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise cli.Error(f"{where}: expected an object with a 'messages' list")
        check_messages(record["messages"], where, training=True)
        out.append(record["messages"])
    if not out:
        raise cli.Error(f"{path} holds no conversations")
    return out


def rows(conversations, seq_len):
    """Conversations -> (tokens (N, seq_len + 1) int64, trained (N, seq_len + 1) bool, counts): one
    row per conversation, padded with <|endoftext|> (never trained). A conversation longer than a
    row is cropped at its end; one whose crop leaves no assistant token is skipped. counts says how
    many were kept, cropped and skipped."""
    tokens, trained = [], []
    counts = {"kept": 0, "cropped": 0, "skipped": 0}
    for messages in conversations:
        ids, flags = render(messages)
        if len(ids) > seq_len + 1:
            ids, flags = ids[: seq_len + 1], flags[: seq_len + 1]
            if not any(flags[1:]):
                counts["skipped"] += 1
                continue
            counts["cropped"] += 1
        pad = seq_len + 1 - len(ids)
        tokens.append(ids + [EOT_TOKEN] * pad)
        trained.append(flags + [False] * pad)
        counts["kept"] += 1
    return np.array(tokens, dtype=np.int64).reshape(-1, seq_len + 1), np.array(trained, dtype=bool).reshape(-1, seq_len + 1), counts


class ChatLoader(StepStream):
    """sft.py's batches, with data.DataLoader's interface and guarantees (data.StepStream): row g of
    the stream is a conversation (train: a new seeded order each epoch; val: in file order), so a
    step's rows are the same for any world size or micro-batch. y is -1 wherever the token is not
    the assistant's."""

    differs = "the conversations differ"

    def __init__(self, tokens, trained, split, seq_len, micro_batch_size, total_batch_size, rank=0, world_size=1,
                 seed=0):
        super().__init__(split, seq_len, micro_batch_size, total_batch_size, rank, world_size, seed)
        if len(tokens) == 0:
            raise cli.Error(f"no {split} conversations fit (every one was skipped)")
        self.tokens, self.trained = tokens, trained
        self.epoch_windows = len(tokens)

    def row(self, g):
        epoch, i = divmod(g, self.epoch_windows)
        if self.split == "train":
            i = int(np.random.default_rng([self.seed, epoch]).permutation(self.epoch_windows)[i])
        return i

    def next_batch(self):
        idx = [self.row(g) for g in self.next_rows()]
        x = torch.from_numpy(self.tokens[idx, :-1])
        y = torch.from_numpy(np.where(self.trained[idx, 1:], self.tokens[idx, 1:], -1))
        return x, y


def is_chat_model(model):
    """A model sft.py made: its vocabulary holds the chat markers."""
    return model.config.vocab_size == CHAT_VOCAB_SIZE


def to_chat_model(model):
    """A pretrained GPT-2 with room for the chat markers: vocab_size 50,259, the two new rows of
    the (tied) embedding set to the mean of the real ones. The model's other weights are unchanged."""
    if is_chat_model(model):
        return model
    if model.config.vocab_size != EOT_TOKEN + 1:
        raise cli.Error(f"the model's vocabulary has {model.config.vocab_size} tokens; chat needs GPT-2's {EOT_TOKEN + 1}")
    chat = GPT(GPTConfig(**{**asdict(model.config), "vocab_size": CHAT_VOCAB_SIZE}))
    chat.load_state_dict(model.state_dict())
    with torch.no_grad():
        wte = chat.transformer.wte.weight
        wte[IM_START : CHAT_VOCAB_SIZE] = wte[: EOT_TOKEN + 1].mean(dim=0)
    return chat.to(model.transformer.wte.weight.device)


if __name__ == "__main__":  # `python chat.py file.jsonl`: check a conversation file, show its first one rendered
    convs = read_conversations(sys.argv[1]) if len(sys.argv) > 1 else [[{"role": "user", "content": "Hi"},
                                                                        {"role": "assistant", "content": "Hello!"}]]
    ids, flags = render(convs[0])
    enc = get_tokenizer(chat=True)
    print(f"{len(convs)} conversations; the first, {len(ids)} tokens (trained ones in [brackets]):")
    print("".join(f"[{enc.decode([t])}]" if f else enc.decode([t]) for t, f in zip(ids, flags)))
