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
GPT-2: its tokenizer_config.json holds this template as Jinja (model_io.CHAT_TEMPLATE), so that
transformers' apply_chat_template gives render's tokens, and generation_config.json ends a reply at
<|im_end|>. Message text is encoded as ordinary text, so a user who types "<|im_end|>" gets those
characters, never the marker. sft.py trains on the assistant's tokens only: each assistant
message's text and the <|im_end|> that closes it (so the model learns to stop); everything
else (the markers' lines, system and user text) is context, with target -1.

Messages come in OpenAI's form, read by one set of rules (parse_messages) for conversation files,
hf: datasets and serve.py's requests: role system, developer (OpenAI's newer name for system),
user or assistant; content a string or a list of text parts [{"type": "text", "text": ...}],
joined by newlines; and, from OpenAI's fine-tuning format, an assistant message's "weight": 1
(the default) trains on it, 0 makes it context.

    python chat.py chats.jsonl   # check a conversation file: one error line, or its first conversation rendered
"""

from dataclasses import asdict

import numpy as np
import torch

import cli
from data import BaseLoader
from model import EOT_TOKEN, GPT, GPTConfig
from model_io import CHAT_VOCAB_SIZE, IM_END, IM_START, get_tokenizer

ROLES = ("system", "user", "assistant")


def _pieces(m):
    """One message's tokens in three pieces: <|im_start|>role\\n; its text and <|im_end|>; \\n."""
    enc = get_tokenizer()
    head = [IM_START] + enc.encode_ordinary(m["role"] + "\n")
    return head, enc.encode_ordinary(m["content"]) + [IM_END], enc.encode_ordinary("\n")


def render(messages, generation_prompt=False, continue_last=False):
    """messages [{"role", "content"}] (parse_messages') -> (token ids, trained flags), one flag per
    token: True for the assistant's text and its closing <|im_end|>, unless that message has weight 0.
    generation_prompt=True ends the tokens with an open assistant turn (<|im_start|>assistant\\n),
    the prompt a reply is sampled after; continue_last=True leaves the last message open instead
    (no <|im_end|>\\n: a reply to continue, transformers' continue_final_message)."""
    ids, trained = [], []
    for i, m in enumerate(messages):
        head, body, tail = _pieces(m)
        if continue_last and i == len(messages) - 1:
            body, tail = body[:-1], []
        ids += head + body + tail
        trained += [False] * len(head) + [is_trained(m)] * len(body) + [False] * len(tail)
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
    while (sum(sizes[:system]) + sum(sizes[system + dropped:]) + len(gen) > limit
           and system + dropped + 2 < len(messages)):
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


def is_trained(m):
    return m["role"] == "assistant" and m.get("weight", 1) == 1


def parse_messages(messages, where, training=False):
    """OpenAI's messages -> [{"role": one of ROLES, "content": str}, ...] ("weight" kept where given),
    or a cli.Error naming `where`. The rules (the module's docstring): "developer" is a system
    message; content is a string or a non-empty list of text parts, joined by newlines (as vLLM
    does); "weight" is 0 or 1 (absent or null: 1), and 1 only on an assistant message (only those
    are trained); other keys are ignored. training=True also requires a trained assistant message."""
    if not isinstance(messages, list) or not messages:
        raise cli.Error(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise cli.Error(f"{where}: message {i} is not an object")
        role, content, weight = m.get("role"), m.get("content"), m.get("weight")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise cli.Error(f"{where}: message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}, "
                            "developer")
        if isinstance(content, list) and content:
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise cli.Error(f"{where}: message {i} ({role}): content parts must be text, "
                                "{\"type\": \"text\", \"text\": \"...\"} (no images, audio or files)")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise cli.Error(f"{where}: message {i} ({role}) has no 'content' string (or list of text parts)")
        if weight is not None and (type(weight) is not int or weight not in (0, 1)):
            raise cli.Error(f"{where}: message {i} ({role}) has weight {weight!r}; weight must be 0 or 1")
        if weight == 1 and role != "assistant":
            raise cli.Error(f"{where}: message {i} ({role}) has weight 1, but only assistant messages are trained")
        out.append({"role": role, "content": content} | ({} if weight is None else {"weight": weight}))
    if training and not any(is_trained(m) for m in out):
        raise cli.Error(f"{where}: no assistant turn" + (" of weight 1" if any(m["role"] == "assistant" for m in out)
                                                         else "") + " (nothing to learn from)")
    return out


def check_messages(messages, where, training=False):
    """Raise cli.Error naming `where` unless parse_messages takes messages."""
    parse_messages(messages, where, training)


def read_conversations(path):
    """The conversations of a JSON-lines file, one {"messages": [...]} per line (OpenAI's
    fine-tuning format), each as parse_messages returns it; blank lines are skipped. A bad line is
    a cli.Error naming file and line."""
    out = []
    for where, record in cli.read_jsonl(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise cli.Error(f"{where}: expected an object with a 'messages' list")
        out.append(parse_messages(record["messages"], where, training=True))
    if not out:
        raise cli.Error(f"{path} holds no conversations")
    return out


def conversation_rows(conversations, seq_len):
    """Conversations -> (tokens (N, seq_len + 1) uint16, trained (N, seq_len + 1) bool, counts): one
    row per conversation, padded with <|endoftext|> (never trained). A conversation longer than a
    row is cropped at its end; one whose crop leaves no trained token is skipped. counts says how
    many were kept, cropped and skipped. (uint16: 3 bytes a token, 3 GB for 1M rows of 1,024.)"""
    tokens = np.full((len(conversations), seq_len + 1), EOT_TOKEN, dtype=np.uint16)
    trained = np.zeros((len(conversations), seq_len + 1), dtype=bool)
    counts = {"kept": 0, "cropped": 0, "skipped": 0}
    for messages in conversations:
        ids, flags = render(messages)
        if len(ids) > seq_len + 1:
            ids, flags = ids[: seq_len + 1], flags[: seq_len + 1]
            if not any(flags[1:]):
                counts["skipped"] += 1
                continue
            counts["cropped"] += 1
        n = counts["kept"]
        tokens[n, : len(ids)], trained[n, : len(ids)] = ids, flags
        counts["kept"] += 1
    return tokens[: counts["kept"]], trained[: counts["kept"]], counts


class ChatLoader(BaseLoader):
    """sft.py's batches, with data.DataLoader's interface and guarantees (data.BaseLoader): row g of
    the stream is a conversation (train: a new seeded order each epoch; val: in file order), so a
    step's rows are the same for any world size or micro-batch. y is -1 wherever the token is not
    the assistant's."""

    epoch_mismatch = "the conversations differ"

    def __init__(self, tokens, trained, split, seq_len, micro_batch_size, total_batch_size, rank=0, world_size=1,
                 seed=0):
        super().__init__(split, seq_len, micro_batch_size, total_batch_size, rank, world_size, seed)
        if len(tokens) == 0:
            raise cli.Error(f"no {split} conversations fit (every one was skipped)")
        self.tokens, self.trained = tokens, trained
        self.epoch_windows = len(tokens)
        self._order = (None, None)

    def order(self, epoch):
        """The train conversations' order in `epoch`, drawn by (seed, epoch): computed once, as the
        stream only moves forward (a resume or reset() may move it back: then again)."""
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.epoch_windows))
        return self._order[1]

    def row(self, g):
        """The conversation (row of tokens) of stream row g."""
        epoch, i = divmod(g, self.epoch_windows)
        return int(self.order(epoch)[i]) if self.split == "train" else i

    def next_batch(self):
        idx = [self.row(g) for g in self.next_rows()]
        t = torch.from_numpy(self.tokens[idx].astype(np.int64))
        y = t[:, 1:].masked_fill(~torch.from_numpy(self.trained[idx, 1:]), -1)
        return t[:, :-1], y


def is_chat_model(model):
    """A model sft.py made: its vocabulary holds the chat markers."""
    return model.config.vocab_size == CHAT_VOCAB_SIZE


def to_chat_model(model):
    """A pretrained GPT-2 with room for the chat markers: vocab_size 50,259, the two new rows of
    the (tied) embedding set to the mean of the real ones. The model's other weights are unchanged."""
    if is_chat_model(model):
        return model
    if model.config.vocab_size != EOT_TOKEN + 1:
        raise cli.Error(f"the model's vocabulary has {model.config.vocab_size} tokens; "
                        f"chat needs GPT-2's {EOT_TOKEN + 1}")
    chat = GPT(GPTConfig(**{**asdict(model.config), "vocab_size": CHAT_VOCAB_SIZE}))
    chat.load_state_dict(model.state_dict())
    with torch.no_grad():
        wte = chat.transformer.wte.weight
        wte[IM_START : CHAT_VOCAB_SIZE] = wte[: EOT_TOKEN + 1].mean(dim=0)
    return chat.to(model.transformer.wte.weight.device)


def main(argv=None):
    """`python chat.py [FILE]`: check a conversation file (one error line naming file and line, exit
    status 2), and show its first conversation rendered, the trained tokens in [brackets]."""
    p = cli.Parser(description="Check a conversation file (JSON lines of {\"messages\": [...]}) and show its first "
                   "conversation in the chat template, the tokens sft.py trains on in [brackets].")
    p.add_argument("file", nargs="?", help="the conversations (default: an example of two messages)")
    args = p.parse_args(argv)
    try:
        convs = read_conversations(args.file) if args.file else [[{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello!"}]]
        ids, flags = render(convs[0])
        enc = get_tokenizer(chat=True)
    except cli.Error as e:  # a bad line, a file that cannot be read, no BPE
        return cli.fail(e)
    print(f"{len(convs)} conversations; the first, {len(ids)} tokens (trained ones in [brackets]):")
    print("".join(f"[{enc.decode([t])}]" if f else enc.decode([t]) for t, f in zip(ids, flags)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
