"""
serve.py: a GPT-2 in real time. A web page to type a prompt into (or, for a chat model, to
chat with) and watch the tokens stream in, and an OpenAI-compatible API, completions and chat
completions (streaming or not), for tools that speak it.

    pip install -r requirements-serve.txt        # fastapi + uvicorn (training does not need them)
    python serve.py --model log/small            # a train.py or sft.py run dir, an HF-format dir, or gpt2
    # open http://127.0.0.1:8000/ , or with the openai package:
    #   client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    #   client.completions.create(model="gpt2", prompt="Hello", max_tokens=32, stream=True)
    #   client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}])  # a chat model

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}: 404
for another id), GET /health, GET / (the page, serve.html), and vLLM's POST /tokenize, POST
/detokenize {"tokens": [...]} -> {"prompt": text} and GET /tokenizer_info. The model object in /v1/models carries the
model's context length as vLLM names it, "max_model_len" (block_size: a prompt's tokens +
max_tokens must fit in it), and "chat": whether it is a chat model (chat.is_chat_model: sft.py
made it; the page shows its chat view then). POST /tokenize {"prompt": "text"} answers {"count",
"max_model_len", "tokens"}: the prompt's tokens exactly as /v1/completions counts them (an empty
prompt is <|endoftext|>); {"messages": [...]} (a chat model), the conversation's as
/v1/chat/completions renders it. The page uses it to fit its max tokens into the context left.

Chat (a chat model only; a base model answers 400 saying to fine-tune it with sft.py): the
request's messages, read by chat.parse_messages as sft.py reads conversation files (roles
system, user, assistant; OpenAI's "developer" is system; content a string or text parts; a
"weight" of 0 or 1 is checked and changes nothing here), are rendered by chat.render(messages,
generation_prompt=True), ChatML ending in an open assistant turn, and that is the prompt: its
tokens are usage.prompt_tokens, and it has /v1/completions' limits (413 past
--max_prompt_tokens; 400 context_length_exceeded when it and max_tokens do not fit). A reply
ends at <|im_end|> (the chat model's eos, not part of the text; finish_reason "stop", as for a
stop string) or at max_tokens ("length"); max_tokens (or max_completion_tokens, which wins)
defaults to the room the context leaves. A stream sends each choice's {"role": "assistant"}
delta first, then its content deltas, then a chunk with its finish_reason. Everything else
(sampling, n, stop, seed, stream_options, the engine) is shared with /v1/completions.
/v1/completions serves a chat model too: its markers are special tokens in a prompt's text and
text in a completion, so ChatML written by hand with stop "<|im_end|>" gets the chat endpoint's
reply; a completion still ends at <|endoftext|>.

Logprobs (what evaluation harnesses ask for). /v1/completions takes echo and logprobs (0 to 5, as
OpenAI's legacy API): choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset},
one entry per token: its name (its text; "bytes:\\xe6\\x97" for a piece of a character), its
logprob, {name: logprob} of the `logprobs` most likely tokens at its position and the token itself
(so up to logprobs + 1), and where its text starts in the choice's text (a character split across
tokens counts at the token that starts it). With echo the choice's text starts with the prompt's
(its tokens decoded) and its tokens come first, the first with logprob and top_logprobs null;
max_tokens 0 (with echo only) scores the prompt and generates nothing. Every sampled token is
listed, the <|endoftext|> that ends a choice too (its text is not in the choice's), as are those
after a stop string. Chat takes logprobs: true and top_logprobs (0 to 20, as OpenAI's chat):
choices[i].logprobs.content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
the reply's tokens (not its <|im_end|>). Both stream (each chunk has its tokens' logprobs) and take
n > 1. A logprob is the model's own (before temperature, top_p, top_k): log-softmax in fp32 over
the real vocabulary of the logits the token was sampled from (for the prompt: of the prompt's
forward pass); -9999 at the lowest. vLLM's prompt_logprobs and min_p are refused (400, named), as
is every field this server does not know.

lm-eval: lm_eval --model local-completions --model_args model=NAME,base_url=http://127.0.0.1:8000/v1/completions,
num_concurrent=8,max_length=1024 (the model's max_model_len; lm-eval's default, 2048, asks for more than
the context holds), batch_size at most --max_n (a request's prompts count as choices). Its default
tokenizer backend finds /tokenizer_info and /tokenize here and needs no Hub. Its requests are echo +
logprobs 1 + max_tokens 1 over the context and continuation's token ids.

How it runs (engine.py): one engine thread owns the model. Each turn of its loop it admits waiting
sequences (one per choice of a request) into free rows of a KV cache allocated at start and
prefills them, then runs ONE batched decode step over every active sequence, each at its own
position (continuous batching: a new request joins the running batch at the next step instead
of waiting for the others to finish), and posts each new token's text to its request. A
request whose client disconnects is dropped from the batch at the next step. Completions and
chats share the batch. A sequence of at most one new token (max_tokens 0 or 1: scoring, as lm-eval
asks) needs no KV-cache row: all those waiting go, sorted by length, into padded forward passes
over whole prompts (of up to --max_batch x the context in tokens each), in the same turn.

Sampling: choice c of a request with seed s gets the tokens of
model.generate(prompt, max_tokens, temperature=, top_p=, top_k=, seed=s + c, eos_token_id=eos),
cut at eos (<|endoftext|>; a chat's <|im_end|>), whatever else is in the batch: every choice
has its own torch.Generator, from which sample_next draws its noise as for that row alone (up
to float rounding: a batched forward pass gives logits within ~1e-6 of a one-row one, which
could in principle flip a sample; in the tests none does). A request without a seed gets a
random one.
"""

import argparse
import asyncio
import codecs
import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

import chat
import cli
from engine import Engine, Job, Sequence
from model import EOT_TOKEN, StaticDecoder
from model_io import DTYPES, IM_END, TextStream, best_device, default_dtype, get_tokenizer, load_model

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 200  # OpenAI allows 4 stop strings; their length bounds a scan per token
TOKEN_BYTES = 128  # GPT-2's longest token: n tokens are at most 128 n UTF-8 bytes, so at most 128 n characters
MAX_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20  # completions' logprobs (OpenAI's legacy cap), chat's top_logprobs (OpenAI's)


@dataclass
class Limits:
    """What one request, and the server as a whole, may ask for (the --max_* flags)."""
    max_prompt_tokens: int = 1024  # per prompt (prompt + max_tokens must also fit the model's block_size)
    max_tokens: int = 1024  # per choice
    max_n: int = 8  # choices per request: n x the number of prompts
    max_requests: int = 64  # requests in flight (decoding or waiting); more get 429
    max_batch: int = 16  # sequences decoded together: rows of the KV cache
    max_body_bytes: int = 1 << 20
    body_timeout: float = 10.0  # seconds to receive a request's body (a stalled upload gets 408)
    header_timeout: float = 10.0  # seconds to receive a request's head (the connection is closed after)


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


# -----------------------------------------------------------------------------
# Requests: parsing and validation (everything a client sends is checked here)


@dataclass
class CompletionRequest:
    """A parsed request of either endpoint: its prompts as token ids and how to sample after them."""
    prompts: list  # token-id lists, one per prompt (chat: one, the rendered conversation)
    max_tokens: int = 16  # OpenAI's default for completions (chat's: all the room the context leaves)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = None  # not OpenAI's; accepted as vLLM does
    n: int = 1
    stop: list = field(default_factory=list)
    seed: int = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    eos: int = EOT_TOKEN  # the token that ends a choice: <|endoftext|>, or a chat model's <|im_end|>
    logprobs: int = None  # None: no logprobs; else how many of the most likely tokens to list at each position
    echo: bool = False  # the prompt's text, and with logprobs its tokens' logprobs, come first


# The request bodies as /openapi.json declares them (for schema-driven clients and fuzzers); the
# checks themselves are parse_request's and parse_chat_request's.
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "default": 16},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "vLLM's; 0 or -1: off"},
    "n": {"type": "integer", "minimum": 1, "default": 1},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
    "seed": {"type": "integer"},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
REQUEST_SCHEMA = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             _TOKENS, {"type": "array", "items": _TOKENS, "minItems": 1}]},
        **_SAMPLING,
        "max_tokens": {"type": "integer", "minimum": 0, "default": 16, "description": "0: only with echo (the prompt "
                       "scored, nothing generated)"},
        "echo": {"type": "boolean", "default": False, "description": "the prompt's text (and logprobs) first"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                     "description": "each token's logprob and the most likely tokens at its position, this many"},
    },
}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
CHAT_REQUEST_SCHEMA = {
    "type": "object", "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]}, "content": _CONTENT,
                           "weight": {"enum": [0, 1], "description": "sft.py's (1 only on an assistant message); "
                                      "changes no reply"}}}},
        **_SAMPLING,
        "max_tokens": {"type": "integer", "minimum": 1, "description": "default: the room the context leaves"},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "max_tokens' newer name; wins"},
        "logprobs": {"type": "boolean", "default": False, "description": "each reply token's logprob"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                         "description": "with logprobs: the most likely tokens at each position, this many"},
    },
}


# Fields of OpenAI's APIs that this server does not implement, and the values that mean "off"
# (a request that turns one on is refused rather than silently answered without it).
_OFF = {"logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}
UNSUPPORTED = {"suffix": (None,), "best_of": (None, 1), **_OFF}
CHAT_UNSUPPORTED = {"tools": (None, []),
                    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
                    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
                    "prediction": (None,), **_OFF}
# Any other field is refused as OpenAI refuses it ("Unrecognized request argument"), but for OpenAI's
# "user" (an end user's id, for abuse monitoring: it changes no answer)
KNOWN = {*REQUEST_SCHEMA["properties"], *UNSUPPORTED, "user"}
CHAT_KNOWN = {*CHAT_REQUEST_SCHEMA["properties"], *CHAT_UNSUPPORTED, "user"}


def _number(body, name, default, lo, hi, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}", name)
    if not lo <= v <= hi:
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def _prompts(p, enc, vocab_size, max_tokens=None):
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids.
    In a string, the tokenizer's special tokens (<|endoftext|>; a chat model's markers too) are
    those tokens. A string too long to be max_tokens tokens is refused before it is tokenized."""
    is_ids = lambda x: isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa: E731
    if isinstance(p, str):
        p = [p]
    elif is_ids(p) and p:
        p = [p]
    if not (isinstance(p, list) and p and all(isinstance(x, str) or (is_ids(x) and x) for x in p)):
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    out = []
    for x in p:
        if isinstance(x, str):
            if max_tokens is not None:
                _check_chars(len(x), max_tokens, "prompt")
            # an empty prompt starts from <|endoftext|>, as GPT-2 was trained to start documents
            x = enc.encode(x, allowed_special="all") or [EOT_TOKEN]
        elif not all(0 <= t < vocab_size for t in x):
            raise APIError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
        out.append(x)
    return out


def _json_object(raw, unsupported, known):
    """A request body -> its JSON object, or APIError (400) when it is not one, has a field not in
    `known` or turns on an unsupported one."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    for name in body:
        if name not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {name[:60]}", name[:60])
    for name, off in unsupported.items():
        if body.get(name) not in off:
            raise APIError(400, f"{name} is not supported by this server", name)
    return body


def _flag(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise APIError(400, f"{name} must be a boolean, got {json.dumps(v)[:40]}", name)
    return bool(v)


def _sampling(body, limits, max_tokens_name="max_tokens", max_tokens_default=16, min_tokens=1):
    """The fields both endpoints share -> a CompletionRequest without prompts (400 on a bad value
    or one over the server's caps). n's cap is checked by the caller, which knows the prompts."""
    r = CompletionRequest(prompts=[])
    r.n = _number(body, "n", 1, 1, 1 << 30, integer=True)
    r.max_tokens = _number(body, max_tokens_name, max_tokens_default, min_tokens, 1 << 30, integer=True)
    r.temperature = _number(body, "temperature", 1.0, 0, 2)
    r.top_p = _number(body, "top_p", 1.0, 0, 1)
    if r.top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    r.top_k = _number(body, "top_k", None, -1, 1 << 30, integer=True)
    r.top_k = None if r.top_k in (0, -1) else r.top_k  # vLLM's "off" values
    r.seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    r.stream, opts = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(r.stream, bool) or not isinstance(opts, dict):
        raise APIError(400, "stream must be a boolean and stream_options an object", "stream")
    r.include_usage = bool(opts.get("include_usage")) and r.stream
    stop = body.get("stop")
    r.stop = [stop] if isinstance(stop, str) else stop or []
    if not (isinstance(r.stop, list) and all(isinstance(s, str) for s in r.stop)):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(r.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in r.stop):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters", "stop")
    r.stop = [s for s in r.stop if s]  # an empty stop string would stop before the first token
    if r.max_tokens is not None and r.max_tokens > limits.max_tokens:
        raise APIError(400, f"{max_tokens_name} is at most {limits.max_tokens} on this server, got {r.max_tokens}",
                       max_tokens_name)
    return r


def _check_choices(n, limits):
    if n > limits.max_n:
        raise APIError(400, f"this server gives at most {limits.max_n} choices per request (n x prompts); "
                       f"asked for {n}", "n")


def _check_chars(chars, max_tokens, param):
    """413 for a text of `chars` characters that cannot be max_tokens tokens, found without
    tokenizing it (a megabyte takes up to a second)."""
    if chars > max_tokens * TOKEN_BYTES:
        raise APIError(413, f"the prompt has {chars} characters, more than {max_tokens} tokens hold; this server "
                       f"takes at most {max_tokens} tokens", param, "prompt_too_long")


def _check_length(longest, max_tokens, block_size, limits, param, context_param, chat_prompt=False):
    """A prompt of `longest` tokens: 413 past --max_prompt_tokens, 400 context_length_exceeded when
    it and max_tokens do not fit the model's context."""
    if longest > limits.max_prompt_tokens:
        raise APIError(413, f"the prompt has {longest} tokens; this server takes at most {limits.max_prompt_tokens}",
                       param, "prompt_too_long")
    if longest + max_tokens > block_size:
        # GPT-2's positions are learned up to block_size: refused as OpenAI refuses it
        raise APIError(400, f"This model's maximum context length is {block_size} tokens, however you requested "
                       f"{longest + max_tokens} tokens ({longest} in " + ("the messages" if chat_prompt else "your prompt")
                       + f"; {max_tokens} for the completion). Please reduce " + ("the length of the messages or completion."
                       if chat_prompt else "your prompt; or completion length."), context_param, "context_length_exceeded")


def parse_request(raw, enc, block_size, limits):
    """The body of POST /v1/completions -> CompletionRequest, or APIError (400 or 413). enc: the
    model's tokenizer (a chat model's has its markers: token-id prompts may hold them)."""
    body = _json_object(raw, UNSUPPORTED, KNOWN)
    if "prompt" not in body:
        raise APIError(400, "prompt is required", "prompt")
    echo = _flag(body, "echo")
    r = _sampling(body, limits, min_tokens=0 if echo else 1)  # max_tokens 0: the prompt scored, nothing generated
    r.echo, r.logprobs = echo, _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    # The caps. The number of prompts is checked before any text is tokenized.
    n_prompts = len(body["prompt"]) if isinstance(body["prompt"], list) and body["prompt"] and \
        not isinstance(body["prompt"][0], int) else 1
    _check_choices(r.n * n_prompts, limits)
    r.prompts = _prompts(body["prompt"], enc, enc.n_vocab, limits.max_prompt_tokens)
    _check_length(max(len(p) for p in r.prompts), r.max_tokens, block_size, limits, "prompt", "max_tokens")
    return r


def chat_messages(messages):
    """OpenAI's messages -> chat.py's [{"role", "content"}], read by chat.parse_messages (the rules
    sft.py reads conversation files by), or APIError (400, param messages)."""
    try:
        return chat.parse_messages(messages, "invalid messages")
    except cli.Error as e:
        raise APIError(400, str(e), "messages") from None


def parse_chat_request(raw, block_size, limits):
    """The body of POST /v1/chat/completions -> CompletionRequest (one prompt: the conversation
    rendered with an open assistant turn; eos <|im_end|>), or APIError (400 or 413). Without
    max_tokens (or max_completion_tokens, which wins) a reply may fill the context."""
    body = _json_object(raw, CHAT_UNSUPPORTED, CHAT_KNOWN)
    if "messages" not in body:
        raise APIError(400, "messages is required", "messages")
    given = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    r = _sampling(body, limits, given, max_tokens_default=None)
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if _flag(body, "logprobs"):
        r.logprobs = top or 0
    elif top is not None:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    _check_choices(r.n, limits)
    messages = chat_messages(body["messages"])
    _check_chars(sum(len(m["content"]) for m in messages), limits.max_prompt_tokens, "messages")
    r.prompts = [chat.render(messages, generation_prompt=True)[0]]
    r.eos = IM_END
    length = len(r.prompts[0])
    if r.max_tokens is None:  # as much as fits (at least 1, else the error below says why)
        r.max_tokens = max(1, min(limits.max_tokens, block_size - length))
    _check_length(length, r.max_tokens, block_size, limits, "messages", "messages", chat_prompt=True)
    return r


TOKENIZE_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "prompt": {"type": "string"},
    "messages": CHAT_REQUEST_SCHEMA["properties"]["messages"], "add_generation_prompt": {"type": "boolean", "default": True}}}


def parse_tokenize(raw, enc, chat_model=False):
    """The body of POST /tokenize -> token ids, or APIError (400). vLLM's two forms: {"prompt":
    text}, tokenized as parse_request tokenizes a string prompt, and (chat models) {"messages": [...],
    "add_generation_prompt": true}, rendered as /v1/chat/completions renders them."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "request body is not valid JSON") from None
    if isinstance(body, dict) and "messages" in body:
        if not chat_model:
            raise APIError(400, "this model is not a chat model: tokenize a prompt instead of messages", "messages")
        open_turn = body.get("add_generation_prompt", True)
        if not isinstance(open_turn, bool):
            raise APIError(400, "add_generation_prompt must be a boolean", "add_generation_prompt")
        return chat.render(chat_messages(body["messages"]), generation_prompt=open_turn)[0]
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise APIError(400, "prompt must be a string", "prompt")
    return _prompts(body["prompt"], enc, enc.n_vocab)[0]


DETOKENIZE_SCHEMA = {"type": "object", "required": ["tokens"],
                     "properties": {"model": {"type": "string"}, "tokens": _TOKENS}}


def parse_detokenize(raw, enc):
    """The body of POST /detokenize (vLLM's; lm-eval's remote tokenizer decodes with it) -> token ids."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "request body is not valid JSON") from None
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
        raise APIError(400, "tokens must be a list of token ids", "tokens")
    if not all(0 <= t < enc.n_vocab for t in tokens):
        raise APIError(400, f"token ids must be in [0, {enc.n_vocab})", "tokens")
    return tokens


# -----------------------------------------------------------------------------
# Logprobs: the engine's entries (token, logprob, [(token, logprob)] of the most likely) -> OpenAI's shapes


class LegacyLogprobs:
    """One /v1/completions choice's logprobs, in OpenAI's legacy shape, as its entries come:
    {tokens, token_logprobs, top_logprobs: [{name: logprob}: the most likely and the token itself,
    so up to logprobs + 1], text_offset: where each token's text starts in the choice's text}.
    With echo the prompt's `echoed` tokens come first (its text decoded on its own, as it is echoed,
    then the completion's); a character split across tokens is counted at the token that starts it."""

    def __init__(self, names, token_bytes, echoed=0):
        self.names, self.token_bytes, self.echoed = names, token_bytes, echoed
        self.decoder, self.offset = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0

    def add(self, entries):
        """-> the logprobs object of these entries (one stream chunk's, or a whole choice's)"""
        names, out = self.names, {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            out["tokens"].append(names[token])
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if lp is None else {**{names[t]: v for t, v in top}, names[token]: lp})
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(self.token_bytes[token]))
            self.echoed -= 1
            if self.echoed == 0:  # the end of the echoed prompt: the completion's text is decoded from here
                self.offset += len(self.decoder.decode(b"", final=True))
        return out


def chat_logprobs(entries, names, token_bytes, eos):
    """A chat choice's logprobs.content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
    for the reply's tokens (not the <|im_end|> that ends it, which is not part of its content)."""
    item = lambda t, lp: {"token": names[t], "logprob": lp, "bytes": list(token_bytes[t])}  # noqa: E731
    return [{**item(t, lp), "top_logprobs": [item(u, v) for u, v in top]} for t, lp, top in entries if t != eos]


# -----------------------------------------------------------------------------
# The HTTP side


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def check_origin(headers, loopback_only):
    """403 unless the request is the server's own: a browser's Origin, when it sends one, must be
    the host the request was sent to, and a server bound to this machine only answers to its own
    names (a DNS-rebinding page, whose Host is its own domain, is refused)."""
    from urllib.parse import urlsplit

    host = headers.get("host", "")
    name = urlsplit("//" + host).hostname or ""
    if loopback_only and name not in LOOPBACK_NAMES:
        raise APIError(403, f"this server answers to localhost only, not {host!r}", code="forbidden_host")
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host:
        raise APIError(403, f"cross-origin request from {origin!r} refused", code="forbidden_origin")


def create_app(model, model_id, limits, loopback_only=True, static_cache=None, compile=False):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    is_chat = chat.is_chat_model(model)
    enc = get_tokenizer(chat=is_chat)  # a chat model's markers are special tokens in a prompt's text
    if model.config.vocab_size != enc.n_vocab:
        raise cli.Error(f"the model's vocabulary has {model.config.vocab_size} tokens; serve.py needs GPT-2's "
                        f"{EOT_TOKEN + 1} (a base model) or {IM_END + 1} (a chat model, from sft.py)")
    block_size = model.config.block_size
    engine = Engine(model, limits.max_batch, limits.max_requests, static_cache, compile)
    started = int(time.time())
    with open(PAGE, encoding="utf-8") as f:  # the only file the server reads, once, at start
        page = f.read()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="gpt2-repro serve.py", docs_url=None, redoc_url=None, lifespan=lifespan)

    def error(e):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        traceback.print_exception(exc)
        return error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.load()}

    card = {"id": model_id, "object": "model", "created": started, "owned_by": "gpt2-repro",
            "max_model_len": block_size,  # vLLM's name for the context length
            "chat": is_chat}  # whether /v1/chat/completions serves it

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            return error(APIError(404, f"The model '{name[:100]}' does not exist (this server serves '{model_id}')",
                                  "model", "model_not_found"))
        return card

    @app.get("/tokenizer_info")
    async def tokenizer_info():  # vLLM's, which lm-eval's tokenizer_backend=remote (its default) reads
        eot = "<|endoftext|>"
        return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|im_end|>" if is_chat else eot, "bos_token": eot,
                "unk_token": eot, "pad_token": None, "model_max_length": block_size, "vocab_size": enc.n_vocab,
                "chat_template": None}

    def body_schema(schema):
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    async def read_request(request, parse):
        """check_origin, then the body, then parse(raw) -> its result, or the Response to answer instead.
        parse runs in a thread: tokenizing a long prompt must not stop the event loop."""
        try:
            check_origin(request.headers, loopback_only)
            return await asyncio.to_thread(parse, await read_body(request, limits.max_body_bytes, limits.body_timeout))
        except APIError as e:
            return error(e)
        except Disconnected:
            return Response(status_code=400)  # never sent: the client is gone; nothing to log

    @app.post("/tokenize", openapi_extra=body_schema(TOKENIZE_SCHEMA))
    async def tokenize(request: Request):
        def answer(raw):  # the JSON made here too, in read_request's thread: FastAPI's encoder is slow for 1M ids
            ids = parse_tokenize(raw, enc, is_chat)
            return Response(json.dumps({"count": len(ids), "max_model_len": block_size, "tokens": ids}),
                            media_type="application/json")

        return await read_request(request, answer)

    @app.post("/detokenize", openapi_extra=body_schema(DETOKENIZE_SCHEMA))
    async def detokenize(request: Request):
        return await read_request(request, lambda raw: JSONResponse({"prompt": enc.decode(parse_detokenize(raw, enc))}))

    @app.post("/v1/completions", openapi_extra=body_schema(REQUEST_SCHEMA))
    async def completions(request: Request):
        req = await read_request(request, lambda raw: parse_request(raw, enc, block_size, limits))
        if isinstance(req, Response):
            return req

        echoed = [enc.decode(p) for p in req.prompts] if req.echo else None
        made = {}  # each choice's LegacyLogprobs, from its first event on

        def chunk_choices(index, text, finish, entries):  # one chunk per token, its text (perhaps "") and finish_reason
            lp = made.get(index)
            if lp is None:  # the choice's first event (a whole choice: its only one) starts with the echoed prompt
                prompt = index // req.n
                lp = made[index] = LegacyLogprobs(engine.token_names, engine.token_bytes,
                                                  len(req.prompts[prompt]) if req.echo else 0)
                text = (echoed[prompt] if req.echo else "") + text
            return [{"text": text, "index": index, "logprobs": None if req.logprobs is None else lp.add(entries),
                     "finish_reason": finish}]

        def choice(index, text, finish, entries):
            return chunk_choices(index, text, finish, entries)[0]

        return await answer(request, req, "cmpl-", "text_completion", "text_completion", chunk_choices, choice)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(CHAT_REQUEST_SCHEMA))
    async def chat_completions(request: Request):
        def parse(raw):
            if not is_chat:
                raise APIError(400, f"{model_id} is a base model, not a chat model: /v1/chat/completions needs one "
                               "fine-tuned for chat by sft.py (python sft.py --model ... --data chats.jsonl); "
                               "this one answers /v1/completions", "model", "model_not_chat")
            return parse_chat_request(raw, block_size, limits)

        req = await read_request(request, parse)
        if isinstance(req, Response):
            return req

        def logprobs(entries):
            return None if req.logprobs is None else {
                "content": chat_logprobs(entries, engine.token_names, engine.token_bytes, req.eos)}

        def chunk_choices(index, text, finish, entries):  # the text (and logprobs), if any, then the finish_reason
            lp = logprobs(entries)
            delta = lambda d, f=None, lp=None: {"index": index, "delta": d, "logprobs": lp,  # noqa: E731
                                                "finish_reason": f}
            return (([delta({"content": text}, lp=lp)] if text or (lp and lp["content"]) else [])
                    + ([delta({}, finish)] if finish else []))

        def choice(index, text, finish, entries):
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs(entries),
                    "finish_reason": finish}

        opening = [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for c in range(req.n)]  # each choice's first chunk says whose turn it is
        return await answer(request, req, "chatcmpl-", "chat.completion.chunk", "chat.completion", chunk_choices,
                            choice, opening)

    async def answer(request, req, id_prefix, chunk_object, whole_object, chunk_choices, choice, opening=()):
        """Run req through the engine and answer it, streamed or whole, in one endpoint's format:
        chunk_choices(index, text delta, finish_reason or None, logprob entries or None) -> the choices
        a stream sends for one of a choice's events, one chunk each (after the `opening` ones);
        choice(index, text, finish_reason, entries) -> a choice of the whole response. Choice c =
        prompt p * n + j, seed s + c."""
        job = Job(asyncio.get_running_loop())
        seed = secrets.randbits(63) if req.seed is None else req.seed
        seqs = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                c = p * req.n + j
                gen = torch.Generator(engine.device).manual_seed((seed + c) % (1 << 64))  # torch's seed range
                seqs.append(Sequence(job, c, prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, gen,
                                     TextStream(req.stop), req.eos, req.logprobs, req.echo))
        if not engine.submit(job, seqs):
            return error(APIError(429, f"the server is busy: {limits.max_requests} requests are in flight; retry later",
                                  code="rate_limit_exceeded", type="rate_limit_error"))
        watcher = asyncio.create_task(cancel_on_disconnect(request, lambda: engine.cancel(job)))
        head = {"id": f"{id_prefix}{secrets.token_hex(12)}", "created": int(time.time()), "model": model_id}
        prompt_tokens = sum(len(p) for p in req.prompts)
        usage = lambda counts: {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),  # noqa: E731
                                "total_tokens": prompt_tokens + sum(counts)}

        def cleanup():
            engine.cancel(job)  # a no-op when it finished
            watcher.cancel()

        if req.stream:
            chunk = {"id": head["id"], "object": chunk_object, **head, **({"usage": None} if req.include_usage else {})}

            async def chunks():
                counts = [0] * len(seqs)
                if opening:
                    yield b"".join(sse({**chunk, "choices": [c]}) for c in opening)
                try:
                    async for events in job_events(job, len(seqs)):
                        out = []
                        for index, text, finish, n, entries in events:
                            counts[index] = n
                            out += [sse({**chunk, "choices": [c]}) for c in chunk_choices(index, text, finish, entries)]
                        yield b"".join(out)  # the tokens at hand in one write
                except APIError as e:
                    yield sse(e.body)
                if req.include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(counts)})
                yield b"data: [DONE]\n\n"

            return EventStream(chunks(), cleanup)

        texts, finishes, counts = [""] * len(seqs), [None] * len(seqs), [0] * len(seqs)
        entries = [[] for _ in seqs]
        try:
            async for events in job_events(job, len(seqs)):
                for index, text, finish, n, more in events:
                    texts[index] += text
                    finishes[index], counts[index] = finish, n
                    entries[index] += more or ()
        except APIError as e:
            return error(e)
        finally:
            cleanup()
        if None in finishes:  # the client left before the end; nobody reads this
            return Response(status_code=499)
        choices = [choice(i, t, f, e) for i, (t, f, e) in enumerate(zip(texts, finishes, entries))]
        # (JSONResponse, not a dict: FastAPI's encoder would walk every logprob)
        return JSONResponse({"id": head["id"], "object": whole_object, **head, "choices": choices,
                             "usage": usage(counts)})

    class EventStream(Response):
        """Server-Sent Events. Unlike StreamingResponse, cleanup() runs however the stream ends,
        even when it never started (the client left before the first byte)."""

        media_type = "text/event-stream"

        def __init__(self, chunks, cleanup):
            self.status_code, self.background, self.chunks, self.cleanup = 200, None, chunks, cleanup
            self.init_headers({"Cache-Control": "no-cache"})  # no body: no Content-Length

        async def __call__(self, scope, receive, send):
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away mid-send
                pass
            finally:
                self.cleanup()
                await self.chunks.aclose()

    return app


class Disconnected(Exception):
    """The client went away while sending its request: there is no one to answer."""


async def read_body(request, limit, timeout):
    """read_body_now within `timeout` seconds (408 after: a stalled upload must not hold a
    connection forever); a client that aborts its upload raises Disconnected."""
    from starlette.requests import ClientDisconnect

    try:
        return await asyncio.wait_for(read_body_now(request, limit), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"request body not received within {timeout:g} s", code="request_timeout") from None
    except ClientDisconnect:
        raise Disconnected() from None


async def read_body_now(request, limit):
    """The request body, refused with 413 past `limit` bytes (without reading the rest), and with
    415 unless it is declared JSON: a web page's "simple" cross-origin POST (text/plain, form data)
    needs no preflight, so without this any site a user visits could drive the local server."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {kind or 'none'!r}", code="unsupported_media_type")
    if int(request.headers.get("content-length") or 0) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    return bytes(body)


async def cancel_on_disconnect(request, cancel):
    """Once the body is read, the next ASGI message is the client's disconnect: then cancel()."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


async def job_events(job, n):
    """A job's events, as lists of those at hand, until all of its n choices have finished
    (or it was cancelled)."""
    left = n
    while left:
        events = [await job.events.get()]
        while not job.events.empty():
            events.append(job.events.get_nowait())
        if None in events:  # cancelled
            return
        if any(e[2] == "error" for e in events):
            raise APIError(500, "the model failed on this request (see the server log)", type="server_error")
        left -= sum(e[2] is not None for e in events)
        yield events


class Listener(socket.socket):
    """The listening socket, which keeps the process's open connections under `limit`: past it,
    accept() closes a new one at once (asyncio accepts bursts of connections before any protocol
    sees one; out of file descriptors, accept() would fail and asyncio would stop accepting for a
    second). GuardedHTTP counts closed ones out. A connection gets TCP_NODELAY: asyncio sets it only
    on sockets whose proto says TCP, and accept() gives proto 0, so a response's head and body, written
    apart, waited for the client's delayed ACK (40 ms on Linux) before the body left."""
    limit, connections = 1 << 30, 0

    def accept(self):
        conn, addr = super().accept()
        if self.connections >= self.limit:
            conn.close()
            raise BlockingIOError  # to asyncio: nothing more to accept this turn
        self.connections += 1
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


def guarded_http(listener, header_timeout, max_connections):
    """uvicorn's HTTP protocol (h11 or httptools) with what uvicorn lacks: its own limits are a
    request head's size and the idle time between keep-alive requests, so a client that sends one
    byte and waits holds a file descriptor for ever, and enough of them stop accept(). Here a
    connection that has not sent a whole request head within header_timeout seconds of opening (or
    of its last response) is closed, and past max_connections each new connection closes the one
    that has waited longest for its head (itself if none is waiting)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    waiting = {}  # connection -> the timer that closes it, oldest first

    class GuardedHTTP(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.await_head()
            if listener.connections > max_connections:
                oldest = next(iter(waiting))
                waiting.pop(oldest).cancel()
                oldest.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self in waiting and self.cycle is not None and not self.cycle.response_complete:  # a head arrived
                waiting.pop(self).cancel()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.await_head()  # the next request's (unless one was pipelined)

        def connection_lost(self, exc):
            listener.connections -= 1
            if self in waiting:
                waiting.pop(self).cancel()
            super().connection_lost(exc)

        def await_head(self):
            if self not in waiting:
                waiting[self] = self.loop.call_later(header_timeout, self.too_slow)

        def too_slow(self):
            waiting.pop(self, None)
            self.transport.close()

    return GuardedHTTP


def connection_caps(reserve=64):
    """(max_connections, limit) for guarded_http and Listener: limit keeps `reserve` of the
    process's file descriptors free (for files opened later), and max_connections is an eighth
    below it (room for the connections arriving while the ones they replace close)."""
    limit, in_use = 1 << 20, 64
    with contextlib.suppress(ImportError, OSError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = limit if soft == resource.RLIM_INFINITY else soft
        in_use = len(os.listdir("/proc/self/fd"))  # Linux; elsewhere a guess
    room = limit - in_use - reserve
    if room < 16:
        raise cli.Error(f"this process may open {limit} files (ulimit -n), {in_use} are open: too few to serve; "
                        "raise the limit")
    return room - room // 8, room


def sse(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def launch(model, *flags, stderr=None, env=None, timeout=120, preexec_fn=None):
    """Start serve.py in a subprocess on a free local port (--port 0) and wait until it answers
    /health; returns (process, base URL). For the tests and bench.py. preexec_fn: as Popen's (a
    test's resource limits)."""
    import subprocess

    import httpx

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--model", str(model), "--port", "0",
                             "--log_level", "warning", *flags], stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=env, preexec_fn=preexec_fn)
    first = []  # the line with the URL (read in a thread, to time out on a server that hangs)
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    deadline = time.monotonic() + timeout
    while first and " at http://" in first[0] and time.monotonic() < deadline:
        url = first[0].split(" at ")[-1].strip().rstrip("/")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"serve.py --model {model} did not start: {first[0] if first else 'no output'}")


# -----------------------------------------------------------------------------


def main(argv=None):
    p = cli.Parser(description="Serve a GPT-2: a web page at / and an OpenAI-compatible /v1/completions API "
                                "(and /v1/chat/completions for a chat model from sft.py), streaming, with continuous batching.")
    p.add_argument("--model", required=True, help="train.py or sft.py run dir (newest checkpoint), HF-format dir, or gpt2[-medium|-large|-xl]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=cli.int_range(0, 65535), default=8000, help="port (0: any free one; the URL is printed)")
    p.add_argument("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="weights' dtype (default: bf16 on CUDA, else fp32)")
    p.add_argument("--static_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with fixed shapes: whole-context KV caches, the batch padded to 1, 2, 4, ... rows "
                        "(default: with --compile, which makes its steps CUDA graphs; the same tokens)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: with the static cache, one CUDA graph per batch size, all made "
                        "before the server answers (slow start, fastest steps); without, the transformer blocks")
    d = Limits()
    p.add_argument("--max_prompt_tokens", type=cli.positive_int, default=d.max_prompt_tokens, help="longest prompt in tokens (longer: HTTP 413)")
    p.add_argument("--max_tokens", type=cli.positive_int, default=d.max_tokens, help="largest max_tokens a request may ask (more: HTTP 400)")
    p.add_argument("--max_n", type=cli.positive_int, default=d.max_n, help="most choices per request, n x prompts (more: HTTP 400)")
    p.add_argument("--max_requests", type=cli.positive_int, default=d.max_requests, help="requests in flight, decoding or queued (more: HTTP 429)")
    p.add_argument("--max_batch", type=cli.positive_int, default=d.max_batch, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max_body_bytes", type=cli.positive_int, default=d.max_body_bytes, help="largest request body in bytes (larger: HTTP 413)")
    p.add_argument("--body_timeout", type=cli.positive_float, default=d.body_timeout,
                   help="seconds to receive a request body (slower: HTTP 408)")
    p.add_argument("--header_timeout", type=cli.positive_float, default=d.header_timeout,
                   help="seconds to receive a request's head, from connecting or the last response (slower: closed)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log level")
    args = p.parse_args(argv)
    limits = Limits(**{k: getattr(args, k) for k in vars(d)})
    device = args.device or best_device()
    dtype = args.dtype or default_dtype(device)
    try:
        import uvicorn
    except ImportError:
        print("error: serve.py needs fastapi and uvicorn: pip install -r requirements-serve.txt", file=sys.stderr)
        return 2
    try:
        # Bind here rather than in uvicorn: a taken port fails before the model loads, and
        # --port 0 can print the port it got.
        sock = Listener(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise cli.Error(f"port {args.port} on {args.host} is in use (another server?): choose another with --port "
                            "(--port 0: any free one)") from None
        model = load_model(args.model)
        model.to(device=device, dtype=DTYPES[dtype])
        static = StaticDecoder.chosen(args.static_cache, args.compile)
        if args.compile and not static:
            for block in model.transformer.h:
                block.compile(dynamic=True)
        elif args.compile:
            print(f"serve.py: compiling the decode step for 1 to {args.max_batch} rows (on CUDA, CUDA graphs)...", file=sys.stderr)
        app = create_app(model, os.path.basename(os.path.normpath(args.model)), limits,  # a name, not a path
                         loopback_only=args.host in LOOPBACK_NAMES, static_cache=static, compile=args.compile)
        max_connections, sock.limit = connection_caps()
    except (cli.Error, OSError) as e:
        return cli.fail(e)
    c = model.config
    host = f"[{args.host}]" if ":" in args.host else args.host
    kind = "a chat model, " if chat.is_chat_model(model) else ""
    print(f"serve.py: {args.model} ({kind}{c.n_layer} layers x {c.n_embd}, context {c.block_size}) on {device} {dtype}, "
          f"at http://{host}:{sock.getsockname()[1]}/", flush=True)
    # asyncio's loop, not uvloop: Listener.accept is asyncio's
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=1, loop="asyncio",
                                           http=guarded_http(sock, args.header_timeout, max_connections)))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
