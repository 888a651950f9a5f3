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

Endpoints: POST /v1/completions and POST /v1/chat/completions (what they take and answer, logprobs
and chat's rules included: openai_api.py), GET /v1/models (and /v1/models/{id}: 404 for another id),
GET /health, GET / (the page, serve.html), and vLLM's POST /tokenize, POST /detokenize {"tokens":
[...]} -> {"prompt": text} and GET /tokenizer_info. The model object in /v1/models carries the
model's context length as vLLM names it, "max_model_len" (a prompt's tokens + max_tokens must fit
in it), and "chat": whether it is a chat model (chat.is_chat_model: sft.py made it; the page shows
its chat view then). POST /tokenize {"prompt": "text"} answers {"count", "max_model_len", "tokens"}:
the prompt's tokens exactly as /v1/completions counts them (an empty prompt is <|endoftext|>);
{"messages": [...]} (a chat model), the conversation's as /v1/chat/completions renders it. The page
uses it to fit its max tokens into the context left.

How it runs: a route checks where a request comes from, reads its body and parses it
(openai_api.py), hands its sequences, one per choice, to the engine (engine.py: one thread that owns
the model and decodes every request's sequences together, continuous batching) and streams back the
text the engine posts. A request whose client disconnects is dropped from the batch at the next step.

What a client cannot do: drive the server from another site's page (a cross-origin request, a
non-JSON body or, on a server bound to this machine, a Host that is not its own is refused), hold a
connection open without sending (--header_timeout, --body_timeout), or run the process out of file
descriptors (new connections are closed past a cap below its limit).
"""

import argparse
import asyncio
import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import torch

import chat
import cli
import runtime
from decode import StaticDecoder
from engine import Engine, Job, Sequence
from model import EOT_TOKEN
from model_io import IM_END, TextStream, get_tokenizer, load_model
from openai_api import (CHAT_REQUEST_SCHEMA, DETOKENIZE_SCHEMA, REQUEST_SCHEMA, TOKENIZE_SCHEMA, APIError,
                        ChatChoices, CompletionChoices, Limits, parse_chat_request, parse_detokenize, parse_request,
                        parse_tokenize)
from runtime import DTYPES

try:  # starlette (fastapi's base): the classes the routes take and answer; fastapi is imported by create_app
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
except ImportError:  # serve.py imports without them (main() then says what to install)
    ClientDisconnect = Request = HTMLResponse = JSONResponse = None
    Response = object

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class Served:
    """What the routes share: made once by create_app, kept on app.state.served."""
    engine: Engine
    model_id: str  # the model's name in the API
    enc: object  # its tokenizer (a chat model's has its markers as special tokens)
    limits: Limits
    block_size: int  # its context length
    is_chat: bool  # whether /v1/chat/completions serves it
    loopback_only: bool  # bound to this machine only: it answers to its own names only
    card: dict  # its model object in /v1/models
    page: str  # serve.html


def served(request):
    return request.app.state.served


def create_app(model, model_id, limits, loopback_only=True, static_cache=None, compile=False):
    """The FastAPI app that serves `model` as model_id, its engine started (and stopped with the app)."""
    from fastapi import FastAPI

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
    card = {"id": model_id, "object": "model", "created": started, "owned_by": "gpt2-repro",
            "max_model_len": block_size,  # vLLM's name for the context length
            "chat": is_chat}  # whether /v1/chat/completions serves it
    app = FastAPI(title="gpt2-repro serve.py", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.served = Served(engine=engine, model_id=model_id, enc=enc, limits=limits, block_size=block_size,
                              is_chat=is_chat, loopback_only=loopback_only, card=card, page=page)
    app.add_exception_handler(Exception, internal_error)
    add_routes(app)
    return app


@contextlib.asynccontextmanager
async def lifespan(app):  # the engine's thread stops with the app
    yield
    app.state.served.engine.close()


def add_routes(app):
    """The routes below, on app, with the request bodies /openapi.json declares."""
    def body_schema(schema):
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    for path, handler, name in (("/health", health, None), ("/v1/models", models, None),
                                ("/v1/models/{name:path}", model_card, "model"),
                                ("/tokenizer_info", tokenizer_info, None)):
        app.add_api_route(path, handler, methods=["GET"], name=name)
    for path, handler, schema in (("/tokenize", tokenize, TOKENIZE_SCHEMA),
                                  ("/detokenize", detokenize, DETOKENIZE_SCHEMA),
                                  ("/v1/completions", completions, REQUEST_SCHEMA),
                                  ("/v1/chat/completions", chat_completions, CHAT_REQUEST_SCHEMA)):
        app.add_api_route(path, handler, methods=["POST"], openapi_extra=body_schema(schema))


def error(e):
    return JSONResponse(e.body, status_code=e.status)


async def internal_error(request, exc):  # whatever a route raised: logged, answered 500 in OpenAI's format
    traceback.print_exception(exc)
    return error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


# -----------------------------------------------------------------------------
# The routes (no docstrings: FastAPI would publish them in /openapi.json)


async def index(request: Request):
    return served(request).page


async def health(request: Request):
    s = served(request)
    return {"status": "ok", "model": s.model_id, **s.engine.load()}


async def models(request: Request):
    return {"object": "list", "data": [served(request).card]}


async def model_card(request: Request, name: str):
    s = served(request)
    if name != s.model_id:
        return error(APIError(404, f"The model '{name[:100]}' does not exist (this server serves '{s.model_id}')",
                              "model", "model_not_found"))
    return s.card


async def tokenizer_info(request: Request):  # vLLM's, which lm-eval's tokenizer_backend=remote (its default) reads
    s, eot = served(request), "<|endoftext|>"
    return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|im_end|>" if s.is_chat else eot, "bos_token": eot,
            "unk_token": eot, "pad_token": None, "model_max_length": s.block_size, "vocab_size": s.enc.n_vocab,
            "chat_template": None}


async def tokenize(request: Request):
    s = served(request)

    def reply(raw):  # the JSON made here too, in read_request's thread: FastAPI's encoder is slow for many ids
        ids = parse_tokenize(raw, s.enc, s.is_chat)
        return Response(json.dumps({"count": len(ids), "max_model_len": s.block_size, "tokens": ids}),
                        media_type="application/json")

    return await read_request(request, reply)


async def detokenize(request: Request):
    enc = served(request).enc
    return await read_request(request, lambda raw: JSONResponse({"prompt": enc.decode(parse_detokenize(raw, enc))}))


async def completions(request: Request):
    s = served(request)
    req = await read_request(request, lambda raw: parse_request(raw, s.enc, s.block_size, s.limits))
    if isinstance(req, Response):
        return req
    return await answer(request, req, CompletionChoices(req, s.enc, s.engine.token_names, s.engine.token_bytes))


async def chat_completions(request: Request):
    s = served(request)

    def parse(raw):
        if not s.is_chat:
            raise APIError(400, f"{s.model_id} is a base model, not a chat model: /v1/chat/completions needs one "
                           "fine-tuned for chat by sft.py (python sft.py --model ... --data chats.jsonl); "
                           "this one answers /v1/completions", "model", "model_not_chat")
        return parse_chat_request(raw, s.block_size, s.limits)

    req = await read_request(request, parse)
    if isinstance(req, Response):
        return req
    return await answer(request, req, ChatChoices(req, s.engine.token_names, s.engine.token_bytes))


# -----------------------------------------------------------------------------
# What the routes share: reading a request, running it, answering it


async def read_request(request, parse):
    """check_origin, then the body, then parse(raw) -> its result, or the Response to answer instead.
    parse runs in a thread: tokenizing a long prompt must not stop the event loop."""
    s = served(request)
    try:
        check_origin(request.headers, s.loopback_only)
        return await asyncio.to_thread(parse, await read_body(request, s.limits.max_body_bytes, s.limits.body_timeout))
    except APIError as e:
        return error(e)
    except Disconnected:
        return Response(status_code=400)  # never sent: the client is gone; nothing to log


async def answer(request, req, choices):
    """Run req through the engine and answer it, streamed or whole, in its endpoint's format:
    choices, an openai_api.CompletionChoices or ChatChoices, makes the choices of each chunk or of
    the whole response."""
    s = served(request)
    job = Job(asyncio.get_running_loop())
    seqs = sequences(job, req, s.engine.device)
    if not s.engine.submit(job, seqs):
        return error(APIError(429, f"the server is busy: {s.limits.max_requests} requests are in flight; retry later",
                              code="rate_limit_exceeded", type="rate_limit_error"))
    watcher = asyncio.create_task(cancel_on_disconnect(request, lambda: s.engine.cancel(job)))
    head = {"id": f"{choices.id_prefix}{secrets.token_hex(12)}", "created": int(time.time()), "model": s.model_id}
    prompt_tokens = sum(len(p) for p in req.prompts)
    usage = lambda counts: {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),  # noqa: E731
                            "total_tokens": prompt_tokens + sum(counts)}

    def cleanup():
        s.engine.cancel(job)  # a no-op when it finished
        watcher.cancel()

    if req.stream:
        chunk = {"id": head["id"], "object": choices.chunk_object, **head,
                 **({"usage": None} if req.include_usage else {})}
        return EventStream(event_chunks(job, len(seqs), chunk, choices, req.include_usage and usage), cleanup)
    try:
        head = {"id": head["id"], "object": choices.whole_object, **head}
        return await whole_response(job, len(seqs), head, choices.whole, usage)
    finally:
        cleanup()


def sequences(job, req, device):
    """req's sequences, one per choice: choice c = prompt p * n + j, sampling with a generator of its
    own seeded s + c (s: the request's seed, else a random one)."""
    seed = secrets.randbits(63) if req.seed is None else req.seed
    seqs = []
    for p, prompt in enumerate(req.prompts):
        for j in range(req.n):
            c = p * req.n + j
            gen = torch.Generator(device).manual_seed((seed + c) % (1 << 64))  # torch's seed range
            seqs.append(Sequence(job, c, prompt, req.max_tokens, req.temperature, req.top_p, req.top_k, gen,
                                 TextStream(req.stop), req.eos, req.logprobs, req.echo))
    return seqs


async def event_chunks(job, n, chunk, choices, usage=None):
    """A stream's events: the opening chunks, then a chunk per choice of each event (those at hand
    in one write), the error if the model failed, with usage(counts) a last chunk of token counts."""
    counts = [0] * n
    if choices.opening:
        yield b"".join(sse({**chunk, "choices": [c]}) for c in choices.opening)
    try:
        async for events in job_events(job, n):
            out = []
            for index, text, finish, k, entries in events:
                counts[index] = k
                out += [sse({**chunk, "choices": [c]}) for c in choices.chunk(index, text, finish, entries)]
            yield b"".join(out)  # the tokens at hand in one write
    except APIError as e:
        yield sse(e.body)
    if usage:
        yield sse({**chunk, "choices": [], "usage": usage(counts)})
    yield b"data: [DONE]\n\n"


async def whole_response(job, n, head, choice, usage):
    """A request's n choices gathered into one response: head, choice(index, text, finish_reason,
    entries) for each, and usage(counts)."""
    texts, finishes, counts, entries = [""] * n, [None] * n, [0] * n, [[] for _ in range(n)]
    try:
        async for events in job_events(job, n):
            for index, text, finish, k, more in events:
                texts[index] += text
                finishes[index], counts[index] = finish, k
                entries[index] += more or ()
    except APIError as e:
        return error(e)
    if None in finishes:  # the client left before the end; nobody reads this
        return Response(status_code=499)
    choices = [choice(i, t, f, e) for i, (t, f, e) in enumerate(zip(texts, finishes, entries))]
    # (JSONResponse, not a dict: FastAPI's encoder would walk every logprob)
    return JSONResponse({**head, "choices": choices, "usage": usage(counts)})


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


def sse(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


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




class Disconnected(Exception):
    """The client went away while sending its request: there is no one to answer."""


async def read_body(request, limit, timeout):
    """read_body_now within `timeout` seconds (408 after: a stalled upload must not hold a
    connection forever); a client that aborts its upload raises Disconnected."""
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
        raise APIError(415, f"Content-Type must be application/json, not {kind or 'none'!r}",
                       code="unsupported_media_type")
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
    while). GuardedHTTP counts closed ones out. A connection gets TCP_NODELAY: asyncio sets it only
    on sockets whose proto says TCP, and accept() gives proto 0, so a response's head and body, written
    apart, waited for the client's delayed ACK before the body left."""
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


# -----------------------------------------------------------------------------


def parser():
    p = cli.Parser(description="Serve a GPT-2: a web page at / and an OpenAI-compatible /v1/completions API "
                               "(and /v1/chat/completions for a chat model from sft.py), streaming, with continuous "
                               "batching.")
    p.add_argument("--model", required=True,
                   help="train.py or sft.py run dir (newest checkpoint), HF-format dir, or gpt2[-medium|-large|-xl]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=cli.int_range(0, 65535), default=8000,
                   help="port (0: any free one; the URL is printed)")
    p.add_argument("--device", type=cli.device, default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weights' dtype (default: bf16 on CUDA, else fp32)")
    p.add_argument("--static_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with fixed shapes: whole-context KV caches, the batch padded to 1, 2, 4, ... rows "
                        "(default: with --compile, which makes its steps CUDA graphs; the same tokens)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: with the static cache, one CUDA graph per batch size, all made "
                        "before the server answers (slow start, fastest steps); without, the transformer blocks")
    d = Limits()
    for flag, kind, help in (
            ("max_prompt_tokens", cli.positive_int, "longest prompt in tokens (longer: HTTP 413)"),
            ("max_tokens", cli.positive_int, "largest max_tokens a request may ask (more: HTTP 400)"),
            ("max_n", cli.positive_int, "most choices per request, n x prompts (more: HTTP 400)"),
            ("max_requests", cli.positive_int, "requests in flight, decoding or queued (more: HTTP 429)"),
            ("max_batch", cli.positive_int, "sequences decoded together (KV-cache rows)"),
            ("max_body_bytes", cli.positive_int, "largest request body in bytes (larger: HTTP 413)"),
            ("body_timeout", cli.positive_float, "seconds to receive a request body (slower: HTTP 408)"),
            ("header_timeout", cli.positive_float,
             "seconds to receive a request's head, from connecting or the last response (slower: closed)")):
        p.add_argument(f"--{flag}", type=kind, default=getattr(d, flag), help=help)
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log level")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    limits = Limits(**{k: getattr(args, k) for k in vars(Limits())})
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
        rt = runtime.setup(args.device, args.dtype, distributed=False)
        device, dtype = rt.device, rt.dtype
        model = load_model(args.model).to(device=device, dtype=DTYPES[dtype])
        static = StaticDecoder.wanted(args.static_cache, args.compile)
        if args.compile and not static:
            for block in model.transformer.h:
                block.compile(dynamic=True)
        elif args.compile:
            print(f"serve.py: compiling the decode step for 1 to {args.max_batch} rows (on CUDA, CUDA graphs)...",
                  file=sys.stderr)
        app = create_app(model, os.path.basename(os.path.normpath(args.model)), limits,  # a name, not a path
                         loopback_only=args.host in LOOPBACK_NAMES, static_cache=static, compile=args.compile)
        max_connections, sock.limit = connection_caps()
    except (cli.Error, OSError) as e:
        return cli.fail(e)
    c = model.config
    host = f"[{args.host}]" if ":" in args.host else args.host
    kind = "a chat model, " if app.state.served.is_chat else ""
    print(f"serve.py: {args.model} ({kind}{c.n_layer} layers x {c.n_embd}, context {c.block_size}) on {device} "
          f"{dtype}, at http://{host}:{sock.getsockname()[1]}/", flush=True)
    # asyncio's loop, not uvloop: Listener.accept is asyncio's
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=1, loop="asyncio",
                                           http=guarded_http(sock, args.header_timeout, max_connections)))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
