"""
openai_api.py: the OpenAI API as serve.py speaks it, without the HTTP. What a request may ask
(Limits, the JSON schemas /openapi.json declares, the fields refused), each endpoint's body read
and checked into a CompletionRequest or refused with an APIError in OpenAI's error format, and the
engine's text and logprobs put in each endpoint's choices, streamed or whole. serve.py reads the
bodies, runs the engine and writes the responses.

Limits (serve.py's --max_* flags): a prompt past --max_prompt_tokens is refused with 413
(prompt_too_long), a prompt and max_tokens that do not fit the model's context with 400
(context_length_exceeded), max_tokens past --max_tokens and more choices (n x prompts) than --max_n
with 400. Text is checked against --max_prompt_tokens by its length before it is tokenized.

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

Sampling: choice c of a request with seed s gets the tokens of
model.generate(prompt, max_tokens, temperature=, top_p=, top_k=, seed=s + c, eos_token_id=eos),
cut at eos (<|endoftext|>; a chat's <|im_end|>), whatever else is in the batch: every choice
has its own torch.Generator, from which sample_next draws its noise as for that row alone (up
to float rounding: a batched forward pass gives logits a rounding error away from a one-row
one's, which could in principle flip a sample; in the tests none does). A request without a
seed gets a random one.
"""

import codecs
import json
from dataclasses import dataclass, field

import chat
import cli
from model import EOT_TOKEN
from model_io import IM_END

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
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
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
CHAT_UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none", "auto"),
                    "functions": (None, []), "function_call": (None, "none", "auto"),
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
    is_ids = lambda x: isinstance(x, list) and all(  # noqa: E731
        isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str):
        p = [p]
    elif is_ids(p) and p:
        p = [p]
    if not (isinstance(p, list) and p and all(isinstance(x, str) or (is_ids(x) and x) for x in p)):
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt")
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
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       "stop")
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
    tokenizing it (tokenizing a megabyte of text is slow)."""
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
        where, reduce = (("the messages", "the length of the messages or completion.") if chat_prompt
                         else ("your prompt", "your prompt; or completion length."))
        raise APIError(400, f"This model's maximum context length is {block_size} tokens, however you requested "
                       f"{longest + max_tokens} tokens ({longest} in {where}; {max_tokens} for the completion). "
                       f"Please reduce {reduce}", context_param, "context_length_exceeded")


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
    "messages": CHAT_REQUEST_SCHEMA["properties"]["messages"],
    "add_generation_prompt": {"type": "boolean", "default": True}}}


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
# Responses: the engine's events for one request -> each endpoint's choices
# (serve.answer sends them: chunk() for each event of a stream, after the `opening` chunks; whole() for
# each choice of a whole response. Arguments: the choice's index, its text (a stream: the event's),
# its finish_reason (a stream: None until its last event) and its logprob entries.)


class CompletionChoices:
    """/v1/completions' choices for `req`: a chunk per event, its text (perhaps "") and finish_reason.
    A choice's first event (a whole choice: its only one) starts with the echoed prompt."""
    id_prefix, chunk_object, whole_object, opening = "cmpl-", "text_completion", "text_completion", ()

    def __init__(self, req, enc, token_names, token_bytes):
        self.req, self.names, self.token_bytes = req, token_names, token_bytes
        self.echoed = [enc.decode(p) for p in req.prompts] if req.echo else None
        self.made = {}  # each choice's LegacyLogprobs, from its first event on

    def chunk(self, index, text, finish, entries):
        req, lp = self.req, self.made.get(index)
        if lp is None:
            prompt = index // req.n
            lp = self.made[index] = LegacyLogprobs(self.names, self.token_bytes,
                                                   len(req.prompts[prompt]) if req.echo else 0)
            text = (self.echoed[prompt] if req.echo else "") + text
        return [{"text": text, "index": index, "logprobs": None if req.logprobs is None else lp.add(entries),
                 "finish_reason": finish}]

    def whole(self, index, text, finish, entries):
        return self.chunk(index, text, finish, entries)[0]


class ChatChoices:
    """/v1/chat/completions' choices for `req`: a stream opens each choice with a chunk that says
    whose turn it is, then sends its text (and logprobs), if any, then its finish_reason."""
    id_prefix, chunk_object, whole_object = "chatcmpl-", "chat.completion.chunk", "chat.completion"

    def __init__(self, req, token_names, token_bytes):
        self.req, self.names, self.token_bytes = req, token_names, token_bytes
        self.opening = [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for c in range(req.n)]

    def logprobs(self, entries):
        return None if self.req.logprobs is None else {
            "content": chat_logprobs(entries, self.names, self.token_bytes, self.req.eos)}

    def chunk(self, index, text, finish, entries):
        lp = self.logprobs(entries)
        delta = lambda d, f=None, lp=None: {"index": index, "delta": d, "logprobs": lp,  # noqa: E731
                                            "finish_reason": f}
        return (([delta({"content": text}, lp=lp)] if text or (lp and lp["content"]) else [])
                + ([delta({}, finish)] if finish else []))

    def whole(self, index, text, finish, entries):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": self.logprobs(entries),
                "finish_reason": finish}
