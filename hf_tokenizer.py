"""
GPT-2's tokenizer as transformers reads it, built offline from tiktoken's BPE: tokenizer.json,
vocab.json and merges.txt (what AutoTokenizer.from_pretrained loads beside a checkpoint), and a
chat model's chat_template for its tokenizer_config.json. model_io.py writes them beside every
checkpoint it saves and keeps the built files in its cache.
"""

import json

import cli

FILES_VERSION = 1  # model_io's cache of built files is keyed by it: bump it when build_files' output changes

# chat.render's tokens as transformers' apply_chat_template makes them (the Jinja template in a chat
# model's tokenizer_config.json): a developer message is a system message, text parts are joined by
# newlines (chat.parse_messages), another role is an error. (A message whose text spells a marker,
# "<|im_end|>", gets the marker there: the tokenizer reads markers in the rendered text.)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{%- if role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('roles are system, developer, user and assistant, not ' ~ message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + role + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}{{- ('\n' if not loop.first else '') + part['text'] }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def _byte_chars():
    """GPT-2's printable spelling of the 256 bytes (vocab.json and merges.txt are written in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]
    return dict(zip(bs + rest, map(chr, bs + [256 + n for n in range(len(rest))])))


def _merge_of(token, rank, ranks):
    """The two tokens that token (of rank >= 256) is the merge of: what BPE leaves of its bytes with
    only the merges before it (so merges.txt line k makes token 256 + k, as GPT-2's does)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, i = min(pairs)
        if r >= rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def build_files(ranks, specials, chat):
    """{name: bytes} of tokenizer.json, vocab.json and merges.txt for the byte-level BPE of `ranks`
    (tiktoken's {token bytes: rank}) with the special tokens `specials` ({text: id}); chat: a chat
    model's, whose pre-tokenizer keeps a message's role line apart from its text, as chat.render does."""
    char = _byte_chars()

    def spell(b):
        return "".join(char[x] for x in b)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) > 1:
            parts = _merge_of(token, rank, ranks)
            if len(parts) != 2:
                raise cli.Error(f"the BPE's token {rank} is not a merge of two tokens: not GPT-2's BPE")
            merges.append(" ".join(map(spell, parts)))
    vocab |= specials
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level
    if chat:
        # chat.render encodes a message's "role\n" and its text apart: a text that starts with white
        # space (as "  Hi") is not pre-tokenized into the newline before it. Isolating a leading role
        # line in each stretch between markers does the same.
        role_line = {"Regex": r"\A(?:system|user|assistant)\n"}
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": role_line, "behavior": "Isolated", "invert": False}, byte_level]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials.items()],
        "normalizer": None, "pre_tokenizer": pre,
        "post_processor": {**byte_level, "add_prefix_space": True, "trim_offsets": False},
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode(),
            "vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
            "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode()}
