"""Tests for serve.py: a real server in a subprocess on a free local port, serving a tiny
checkpoint (a base model, and a chat model for /v1/chat/completions), driven by the official
openai client, raw HTTP and headless Chromium. Every answer is checked against model.generate()
run here with the same seed."""
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (the openai client's own HTTP library)
from conftest import REPO_ROOT, error_line, perturb_  # noqa: E402

import chat  # noqa: E402
import cli  # noqa: E402
import decode  # noqa: E402
import openai_api  # noqa: E402
import serve  # noqa: E402
from model import EOT_TOKEN, GPT, GPTConfig  # noqa: E402
from model_io import IM_END, TextStream, get_tokenizer, load_model, save_pretrained  # noqa: E402
from engine import Engine, Job, Sequence  # noqa: E402
from launch import launch  # noqa: E402
from openai_api import APIError  # noqa: E402
from serve import job_events  # noqa: E402

ARTIFACTS = os.environ.get("TEST_ARTIFACTS", str(REPO_ROOT / "test-artifacts"))
PROMPTS = ["Hello, I'm a language model,", "The quick brown fox", "Once upon a time", "In 1905, Einstein",
           "def main():", "Zürich ist schön", "日本語のテキスト", "A"]


# ----------------------------------------------------------------------------- fixtures

def checkpoint(path, eot_boost, block_size=1024, im_end_boost=None):
    """A tiny GPT-2 (context block_size) saved as a checkpoint dir, and the model as loaded from it.
    With im_end_boost, a chat model (chat.to_chat_model) whose <|im_end|> logit is raised by it."""
    torch.manual_seed(0)
    m = perturb_(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size)), 1, scale=0.5)
    with torch.no_grad():
        m.transformer.wte.weight[EOT_TOKEN] += eot_boost * m.transformer.ln_f.bias
    if im_end_boost is not None:
        m = chat.to_chat_model(m)
        with torch.no_grad():
            m.transformer.wte.weight[IM_END] += im_end_boost * m.transformer.ln_f.bias
    save_pretrained(m, path)
    return load_model(path).eval(), path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Its <|endoftext|> logit is raised so that some samples end there (about a third of 60-token ones)."""
    return checkpoint(tmp_path_factory.mktemp("tiny"), eot_boost=1.7)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Rarely ends at <|endoftext|>: for requests that must run long (see LONG)."""
    model, path = checkpoint(tmp_path_factory.mktemp("plain"), eot_boost=0.0)
    for seed in (1, 2):  # premise: these run to max_tokens if nobody stops them
        assert reference(model, LONG["prompt"], LONG["max_tokens"], seed)[1] == "length"
    return model, path


LONG = {"prompt": "Hello", "max_tokens": 1000}  # about a second of decoding on the plain model


class Server:
    """serve.py in a subprocess on a free local port, its stderr kept in log_path."""

    def __init__(self, model_dir, log_path, *flags, preexec_fn=None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core machine; the model is tiny
        self.proc, self.url = launch(model_dir, *flags, stderr=self.log, env=env, preexec_fn=preexec_fn)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def post(self, body, timeout=60, path="/v1/completions"):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=timeout)

    def chat(self, body, timeout=60):
        return self.post(body, timeout, "/v1/chat/completions")

    def wait_idle(self, timeout=20):
        deadline = time.monotonic() + timeout
        while (h := self.health())["requests_in_flight"] or h["running"] or h["waiting"]:
            assert time.monotonic() < deadline, f"the server never went idle: {h}"
            time.sleep(0.02)
        return h

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    s = Server(tiny[1], tmp_path_factory.mktemp("logs") / "serve.log")
    yield s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log  # nothing crashed, not even a request's task


@pytest.fixture(scope="module")
def static_server(tiny, tmp_path_factory):
    """The same model served with the fixed-shape decode (--static_cache: what CUDA gets by default)."""
    s = Server(tiny[1], tmp_path_factory.mktemp("logs") / "static.log", "--static_cache")
    yield s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def limited(plain, tmp_path_factory):
    """A server with small limits: one request in flight, 64-token prompts, 4 choices, 20 kB bodies."""
    s = Server(plain[1], tmp_path_factory.mktemp("logs") / "limited.log", "--max_requests", "1",
               "--max_prompt_tokens", "64", "--max_tokens", "1000", "--max_n", "4", "--max_body_bytes", "20000")
    yield s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log


def reference(model, prompt, max_tokens, seed, stop=(), **sampling):
    """What the server must answer: generate() with that seed, cut at <|endoftext|> or before the
    first stop string. Returns (text, finish_reason, completion tokens when no stop string cut it)."""
    enc = get_tokenizer(chat=chat.is_chat_model(model))  # a chat model's markers decode to their text
    ids = enc.encode(prompt)
    new = model.generate(torch.tensor([ids]), max_tokens, seed=seed, **sampling)[0, len(ids):].tolist()
    finish, n = "length", len(new)
    if EOT_TOKEN in new:
        new, finish, n = new[: new.index(EOT_TOKEN)], "stop", new.index(EOT_TOKEN) + 1
    text = enc.decode(new)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cuts:
        text, finish, n = text[: min(cuts)], "stop", None
    return text, finish, n


def read_stream(stream):
    """An openai stream -> ({index: text}, {index: finish_reason}, chunks)."""
    texts, finishes, chunks = {}, {}, 0
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        chunks += 1
    return texts, finishes, chunks


# ----------------------------------------------------------------------------- chat: fixtures and references

CHATS = [  # conversations, each ending where the assistant is to answer
    [{"role": "user", "content": "Hi! Who are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"},
     {"role": "user", "content": "Go on, in Zürich 日本語"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "<|im_end|> is just text here"}],
    [{"role": "user", "content": "def main():"}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "🙂"}],
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A chat model (vocab 50,259, context 256) whose <|im_end|> logit is raised so that most replies end
    within 60 tokens, some not."""
    return checkpoint(tmp_path_factory.mktemp("chat"), eot_boost=0.0, block_size=256, im_end_boost=3.0)


@pytest.fixture(scope="module")
def chat_server(chat_model, tmp_path_factory):
    """Serves chat_model, taking prompts (rendered conversations) of up to 128 tokens."""
    s = Server(chat_model[1], tmp_path_factory.mktemp("logs") / "chat.log", "--max_prompt_tokens", "128")
    yield s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log


def chat_reference(model, messages, max_tokens, seed, **sampling):
    """What /v1/chat/completions must answer: generate() after the conversation rendered with an open
    assistant turn, with that seed, ending at <|im_end|> (not part of the text).
    Returns (text, finish_reason, completion tokens)."""
    ids = chat.render(messages, generation_prompt=True)[0]
    new = model.generate(torch.tensor([ids]), max_tokens, seed=seed, eos_token_id=IM_END, **sampling)[0, len(ids):].tolist()
    finish, n = "length", len(new)
    if IM_END in new:
        new, finish, n = new[: new.index(IM_END)], "stop", new.index(IM_END) + 1
    return get_tokenizer(chat=True).decode(new), finish, n


def read_chat_stream(stream):
    """An openai chat stream -> ({index: text}, {index: finish_reason}, {index: role})."""
    texts, finishes, roles = {}, {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles[c.index] = c.delta.role
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    return texts, finishes, roles


# ----------------------------------------------------------------------------- text deltas

def test_text_stream_holds_back_split_characters_and_stop_prefixes():
    enc = get_tokenizer()
    text = "naïve café, 日本語 and 🙂 emoji; then STOP here"
    tokens = enc.encode(text)
    assert any(len(enc.decode_single_token_bytes(t).decode("utf-8", "ignore")) == 0 for t in tokens), \
        "premise: some token is an incomplete UTF-8 character"
    ts, deltas = TextStream([]), []
    for i, t in enumerate(tokens):
        deltas.append(ts.push(enc.decode_single_token_bytes(t), final=i == len(tokens) - 1)[0])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # no character was ever sent broken
    # a stop string spanning tokens: everything before it, nothing of it, and nothing sent early
    ts, sent = TextStream(["STOP", "xyz"]), ""
    for t in tokens:
        delta, stopped = ts.push(enc.decode_single_token_bytes(t))
        sent += delta
        assert text.startswith(sent) and "S" not in sent  # not even the S that might begin STOP
        if stopped:
            break
    assert stopped and sent == text[: text.index("STOP")]
    # text held back as a possible stop prefix comes out when it turns out not to be one
    ts = TextStream(["ab!"])
    assert ts.push(b"xa") == ("x", False)
    assert ts.push(b"b") == ("", False)
    assert ts.push(b"c") == ("abc", False)
    assert ts.push(b"ab", final=True) == ("ab", False)  # the end releases what was held
    # bytes that never complete a character become U+FFFD at the end, as tiktoken's decode does
    ts = TextStream([])
    assert ts.push("é".encode()[:1]) == ("", False)
    assert ts.push(b"", final=True) == (b"\xc3".decode("utf-8", "replace"), False)


def engine_run(engine, prompt):
    """run(n): n sequences of 10 tokens after prompt, seeds 3, 4, ..., as one request to the engine."""
    ids = get_tokenizer().encode(prompt)

    async def run(n):
        job = Job(asyncio.get_running_loop())
        seqs = [Sequence(job, c, ids, 10, 1.0, 1.0, None, torch.Generator().manual_seed(3 + c), TextStream([]))
                for c in range(n)]
        assert engine.submit(job, seqs)
        texts = [""] * n
        async for events in job_events(job, n):
            for index, text, *_ in events:
                texts[index] += text
        return texts

    return lambda n: asyncio.run(run(n))


def test_engine_survives_a_failing_step(tiny, monkeypatch):
    """A step that raises (a bug, out of memory) fails the requests it was running with an error
    event and frees their places; the next request is served as before."""
    model, _ = tiny
    engine = Engine(model, max_batch=4, max_requests=2)
    run = engine_run(engine, PROMPTS[0])

    def fail(*args):
        raise RuntimeError("injected failure")

    try:
        real = decode.next_logits
        monkeypatch.setattr(decode, "next_logits", fail)
        with pytest.raises(APIError) as e:
            run(2)
        assert e.value.status == 500
        assert engine.load()["requests_in_flight"] == 0 and engine.load()["running"] == 0
        monkeypatch.setattr(decode, "next_logits", real)
        assert run(2) == [reference(model, PROMPTS[0], 10, 3 + c)[0] for c in range(2)]
    finally:
        engine.close()


def test_a_compiled_engine_is_warm_for_every_bucket_before_it_serves(tiny, monkeypatch):
    """serve.py --compile compiles (on CUDA: captures) the decode step for every bucket of rows up to
    --max_batch as the engine starts, in the engine's own thread (a CUDA graph belongs to the thread
    that records it), not at the first batch of each size. Answers are unchanged; a compile that
    fails is one error."""
    model, _ = tiny
    calls = []

    def compile_(fn, **kw):  # torch.compile's stand-in: notes each step's thread and rows
        def step(*args):
            calls.append((threading.current_thread().name, args[0].size(0)))
            return fn(*args)
        return step

    monkeypatch.setattr(torch, "compile", compile_)
    engine = Engine(model, max_batch=5, max_requests=2, compile=True)
    try:
        assert engine.decoder.compiled == {1, 2, 4, 5}
        assert {c[0] for c in calls} == {"engine"} and {c[1] for c in calls} == {1, 2, 4, 5}
        warm = len(calls)
        assert engine_run(engine, PROMPTS[1])(3) == [reference(model, PROMPTS[1], 10, 3 + c)[0] for c in range(3)]
        assert len(calls) > warm and engine.decoder.compiled == {1, 2, 4, 5}
    finally:
        engine.close()

    def fail(self):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(decode.StaticDecoder, "warm_up", fail)
    with pytest.raises(cli.Error, match="^compiling the decode step failed: RuntimeError: injected compile failure$"):
        Engine(model, max_batch=5, max_requests=2, compile=True)


# ----------------------------------------------------------------------------- the API

def test_completions_equal_generate(server, tiny):
    model, _ = tiny
    enc = get_tokenizer()
    cases = [(PROMPTS[0], 30, 11, {}), (PROMPTS[1], 25, 12, dict(temperature=0.7, top_p=0.9)),
             (PROMPTS[5], 20, 13, dict(temperature=0.0)), (PROMPTS[2], 60, 3, {}), (PROMPTS[3], 60, 2, {})]
    finishes = set()
    for prompt, max_tokens, seed, sampling in cases:
        r = server.client.completions.create(model="anything", prompt=prompt, max_tokens=max_tokens, seed=seed, **sampling)
        text, finish, n = reference(model, prompt, max_tokens, seed, **sampling)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish), (prompt, seed)
        prompt_tokens = len(enc.encode(prompt))
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, n, prompt_tokens + n)
        assert r.object == "text_completion" and r.id.startswith("cmpl-") and len(r.choices) == 1
        finishes.add(finish)
    assert finishes == {"stop", "length"}, "premise: the cases end both at <|endoftext|> and at max_tokens"


def test_a_tiny_temperature_is_greedy(server):
    """temperature 1e-300 (legal: 0 to 2) samples as temperature 0 does, the most likely token each
    time: the same text for every seed and choice."""
    for prompt in PROMPTS[:3]:
        greedy = server.post({"prompt": prompt, "max_tokens": 20, "temperature": 0}).json()["choices"][0]["text"]
        r = server.post({"prompt": prompt, "max_tokens": 20, "temperature": 1e-300, "n": 2, "seed": 5}).json()
        assert [c["text"] for c in r["choices"]] == [greedy, greedy], (prompt, r, greedy)


def test_stream_equals_nonstream_equals_generate_with_n(server, tiny):
    """n choices with seed s: choice c is generate(seed=s + c); streamed == not streamed."""
    model, _ = tiny
    kw = dict(model="m", prompt=PROMPTS[4], max_tokens=40, n=3, seed=100, temperature=0.9)
    full = server.client.completions.create(**kw)
    texts, finishes, chunks = read_stream(server.client.completions.create(stream=True, **kw))
    for c in range(3):
        expected = reference(model, PROMPTS[4], 40, 100 + c, temperature=0.9)[:2]
        assert (full.choices[c].text, full.choices[c].finish_reason) == expected
        assert (texts[c], finishes[c]) == expected
    assert len({texts[c] for c in range(3)}) == 3
    assert full.usage.completion_tokens == chunks  # one chunk per token
    # a list of prompts: choice index = prompt index * n + j, seed + index
    r = server.client.completions.create(model="m", prompt=PROMPTS[:2], max_tokens=12, n=2, seed=7)
    for p in range(2):
        for j in range(2):
            assert r.choices[p * 2 + j].text == reference(model, PROMPTS[p], 12, 7 + p * 2 + j)[0]


def test_stream_wire_format(server, tiny):
    """Raw SSE: OpenAI's chunk objects, a usage chunk when asked, and data: [DONE] last."""
    body = dict(prompt="Hi", max_tokens=5, seed=1, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == reference(tiny[0], "Hi", 5, 1)[0]


def test_stop_strings(server, tiny):
    model, _ = tiny
    full, _, _ = reference(model, PROMPTS[0], 40, 5)
    stop = full[12:15]  # three characters from inside the text, perhaps across tokens
    expected = (full[: full.index(stop)], "stop")
    kw = dict(model="m", prompt=PROMPTS[0], max_tokens=40, seed=5, stop=[stop, "never-in-the-text"])
    r = server.client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == expected
    texts, finishes, _ = read_stream(server.client.completions.create(stream=True, **kw))
    assert (texts[0], finishes[0]) == expected


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [server.health()["model"]]
    assert models.data[0].max_model_len == 1024  # the context, as vLLM names it
    assert server.health()["status"] == "ok"
    for path in ("/health", "/v1/models"):  # the model's name, never where it lies on the server's disk
        text = httpx.get(server.url + path, timeout=10).text
        assert "/" not in server.health()["model"] and os.sep + "tmp" not in text and "pytest" not in text, text


@pytest.mark.parametrize("headers,allowed", [
    ({}, True),  # the openai client, curl: no Origin
    ({"Origin": "SELF"}, True),  # the page itself
    ({"Origin": "http://evil.example"}, False),  # another site's page
    ({"Host": "evil.example", "Origin": "http://evil.example"}, False),  # DNS rebinding: its own name
    ({"Host": "evil.example:8000"}, False),
], ids=["no_origin", "same_origin", "other_origin", "rebinding", "other_host"])
def test_only_the_servers_own_origin_and_names_are_answered(server, headers, allowed):
    if headers.get("Origin") == "SELF":
        headers = {"Origin": server.url}
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 2}).encode()
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json", **headers})
    assert r.status_code == (200 if allowed else 403), r.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_only_json_bodies_are_accepted(server, content_type):
    """A web page can POST text/plain or a form to localhost without a preflight: such requests are
    refused (415) before anything runs, so no other site can make a user's browser use the server."""
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 2}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert server.post({"model": "m", "prompt": "Hello", "max_tokens": 2}).status_code == 200


def eight_clients_at_once(server, client):
    """client(openai_client, i) from 8 threads released together; returns {i: its result}."""
    barrier, results, errors = threading.Barrier(8), {}, []

    def run(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            barrier.wait()
            results[i] = client(c, i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 8, errors
    return results


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_eight_concurrent_streams_are_batched_and_correct(decode, request, tiny):
    """8 streams at once, batched, each exactly generate()'s text for its seed; with --static_cache
    (fixed shapes, the batch padded to a bucket of rows, rows joining and leaving) too."""
    server = request.getfixturevalue("server" if decode == "dynamic" else "static_server")
    model, _ = tiny
    before = server.wait_idle()

    def client(c, i):
        return read_stream(c.completions.create(model="m", prompt=PROMPTS[i], max_tokens=120, seed=50 + i,
                                                temperature=0.8, stream=True))

    results = eight_clients_at_once(server, client)
    for i in range(8):
        text, finish, _ = reference(model, PROMPTS[i], 120, 50 + i, temperature=0.8)
        assert (results[i][0][0], results[i][1][0]) == (text, finish), (i, results[i], text)
    after = server.wait_idle()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_tokens"] - before["decoded_tokens"]
    assert rows / steps >= 3, f"decode steps were not batched: {rows} tokens in {steps} steps"


def test_disconnect_stops_compute(limited):
    before = limited.wait_idle()
    # streaming: read a few tokens, then hang up
    stream = limited.client.completions.create(model="m", seed=1, stream=True, **LONG)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    mid = limited.wait_idle()
    assert mid["decoded_tokens"] - before["decoded_tokens"] < LONG["max_tokens"] / 2
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        limited.post({"seed": 2, **LONG}, timeout=httpx.Timeout(30, read=0.2))
    after = limited.wait_idle()
    assert after["decoded_tokens"] - mid["decoded_tokens"] < LONG["max_tokens"] / 2


def test_tokenize_counts_as_completions_do(server):
    """vLLM's POST /tokenize: the page fits max tokens into the context with its count."""
    tokenize = lambda body, **headers: httpx.post(server.url + "/tokenize", content=json.dumps(body), timeout=10,  # noqa: E731
                                                  headers={"Content-Type": "application/json", **headers})
    for prompt in PROMPTS + ["", "<|endoftext|>"]:
        r = tokenize({"prompt": prompt}).json()
        usage = server.post({"prompt": prompt, "max_tokens": 1}).json()["usage"]
        assert r["count"] == len(r["tokens"]) == usage["prompt_tokens"] and r["max_model_len"] == 1024, (prompt, r)
    for bad in ({"prompt": [1, 2]}, {}, [1]):
        assert tokenize(bad).status_code == 400
    assert tokenize({"prompt": "Hi"}, Origin="http://evil.example").status_code == 403


def test_page_is_self_contained(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in r.text and "/v1/chat/completions" in r.text  # both views
    assert "://" not in r.text and "src=" not in r.text  # no external assets


# ----------------------------------------------------------------------------- logprobs and scoring (lm-eval)

chat_tokenizer = functools.cache(lambda: get_tokenizer(chat=True))


@functools.cache
def name(t):
    """A token as OpenAI names it in logprobs: its text, or "bytes:\\xe6\\x97" for a piece of a character."""
    b = chat_tokenizer().decode_single_token_bytes(t)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def plain_logprobs(model, ids):
    """The reference: log-softmax in fp32 of one plain forward's logits over ids (no KV cache, no
    batch); row t is the distribution of token t + 1."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def sampled(model, ids, max_tokens, seed=0, eos=EOT_TOKEN, **sampling):
    """The tokens a choice samples after ids (generate() with that seed), up to and with its eos."""
    new = model.generate(torch.tensor([ids]), max_tokens, seed=seed, **sampling)[0, len(ids):].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def check_legacy(lp, full, start, ref, k, text):
    """A /v1/completions choice's logprobs (OpenAI's legacy shape) for the tokens full[start:] (start 0:
    an echoed prompt first) against ref = plain_logprobs(model, full): each token's logprob, the true
    top k (and the token itself) as top_logprobs, and text_offset where the choice's text holds the token."""
    ids = full[start:]
    assert lp["tokens"] == [name(t) for t in ids]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == len(ids)
    for j, t in enumerate(ids):
        i = start + j
        if i == 0:  # nothing before it: no logprob
            assert lp["token_logprobs"][j] is None and lp["top_logprobs"][j] is None
            continue
        assert abs(lp["token_logprobs"][j] - ref[i - 1, t].item()) < 1e-4, (j, lp["token_logprobs"][j], ref[i - 1, t])
        top = torch.topk(ref[i - 1], k)
        want = {name(u): v for u, v in zip(top.indices.tolist(), top.values.tolist())}
        want[name(t)] = ref[i - 1, t].item()
        got = lp["top_logprobs"][j]
        assert list(got) == list(want) and all(abs(got[key] - want[key]) < 1e-4 for key in want), (j, got, want)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for j, (t, off) in enumerate(zip(ids, offsets)):
        if t != EOT_TOKEN and not name(t).startswith("bytes:"):  # (<|endoftext|> ends a choice, not part of its text)
            assert text[off : off + len(name(t))] == name(t), (j, name(t), off, text)


def test_echo_logprobs_are_a_plain_forwards_log_softmax(server, tiny):
    """echo + logprobs + max_tokens 0 (lm-eval's scoring, a list of prompts, text or token ids):
    every prompt token's logprob is the log-softmax of a plain forward's logits at the position
    before it, top_logprobs its true top 5 and text_offset where the echoed text holds it."""
    model, _ = tiny
    enc = get_tokenizer()
    prompts = PROMPTS[:7] + [enc.encode(" The capital of France is Paris")]  # token ids, as lm-eval sends them
    r = server.post({"prompt": prompts, "echo": True, "logprobs": 5, "max_tokens": 0})
    assert r.status_code == 200, r.text
    r = r.json()
    assert r["usage"]["completion_tokens"] == 0 and len(r["choices"]) == 8
    for c, p in zip(r["choices"], prompts):
        ids = p if isinstance(p, list) else enc.encode(p)
        assert c["text"] == (p if isinstance(p, str) else enc.decode(p)) and c["finish_reason"] == "length"
        check_legacy(c["logprobs"], ids, 0, plain_logprobs(model, ids), 5, c["text"])
    # premise: some characters are split across tokens
    assert any(t.startswith("bytes:") for c in r["choices"] for t in c["logprobs"]["tokens"])
    # without logprobs, echo is the prompt's text alone
    c = server.post({"prompt": PROMPTS[0], "echo": True, "max_tokens": 0}).json()["choices"][0]
    assert (c["text"], c["logprobs"]) == (PROMPTS[0], None)


@pytest.mark.parametrize("max_tokens", [1, 12], ids=["one_pass", "decode_steps"])  # lm-eval's 1; prefill + decode
def test_logprobs_of_generated_tokens(server, tiny, max_tokens):
    """temperature 0, echo or not: the generated tokens are greedy generate()'s, and theirs and the
    prompt's logprobs a plain forward's over prompt + completion."""
    model, _ = tiny
    enc = get_tokenizer()
    ids = enc.encode(PROMPTS[0])
    new = sampled(model, ids, max_tokens, temperature=0)
    full = ids + new
    ref = plain_logprobs(model, full)
    for echo in (True, False):
        body = {"prompt": PROMPTS[0], "echo": echo, "logprobs": 3, "max_tokens": max_tokens, "temperature": 0}
        c = server.post(body).json()["choices"][0]
        assert c["text"] == (PROMPTS[0] if echo else "") + enc.decode([t for t in new if t != EOT_TOKEN])
        check_legacy(c["logprobs"], full, 0 if echo else len(ids), ref, 3, c["text"])


def read_sse(server, body, path="/v1/completions"):
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_streamed_logprobs_with_n_equal_the_whole_response(server, tiny):
    """stream + echo + logprobs + n 2 (sampled, seeds s + c): each choice's chunks add up to the whole
    response's choice (logprobs and offsets too), and that is the plain forward's over its tokens."""
    model, _ = tiny
    enc = get_tokenizer()
    body = {"prompt": PROMPTS[1], "echo": True, "logprobs": 2, "max_tokens": 10, "n": 2, "seed": 3, "temperature": 0.9}
    whole = server.post(body).json()["choices"]
    streamed = {c: {"text": "", "logprobs": {k: [] for k in whole[0]["logprobs"]}} for c in range(2)}
    for chunk in read_sse(server, {**body, "stream": True}):
        for c in chunk["choices"]:
            streamed[c["index"]]["text"] += c["text"]
            for k, v in c["logprobs"].items():
                streamed[c["index"]]["logprobs"][k] += v
    ids = enc.encode(PROMPTS[1])
    for c in range(2):
        assert streamed[c]["text"] == whole[c]["text"] and streamed[c]["logprobs"] == whole[c]["logprobs"]
        full = ids + sampled(model, ids, 10, seed=3 + c, temperature=0.9)
        check_legacy(whole[c]["logprobs"], full, 0, plain_logprobs(model, full), 2, whole[c]["text"])
    assert whole[0]["text"] != whole[1]["text"]


def test_the_openai_client_scores_prompts_and_retrieves_the_model(server, tiny):
    """client.completions.create(echo=True, logprobs=1, max_tokens=0) and client.models.retrieve(id)."""
    model, _ = tiny
    prompt = "Scores of a prompt, as lm-eval asks for them"
    r = server.client.completions.create(model="m", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    ids = get_tokenizer().encode(prompt)
    assert r.choices[0].text == prompt
    check_legacy(r.choices[0].logprobs.model_dump(), ids, 0, plain_logprobs(model, ids), 1, prompt)
    model_id = server.health()["model"]
    m = server.client.models.retrieve(model_id)
    assert (m.id, m.object, m.max_model_len) == (model_id, "model", 1024)
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")


def test_chat_logprobs(chat_server, chat_model):
    """logprobs + top_logprobs through the client, whole and streamed: each reply token's logprob,
    bytes and true top 4 from a plain forward over the conversation and the reply (not its <|im_end|>)."""
    model, _ = chat_model
    enc = get_tokenizer(chat=True)
    kw = dict(model="m", messages=CHATS[1], logprobs=True, top_logprobs=4, temperature=0, max_tokens=30)
    r = chat_server.client.chat.completions.create(**kw)
    stream = chat_server.client.chat.completions.create(stream=True, **kw)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    ids = chat.render(CHATS[1], generation_prompt=True)[0]
    new = sampled(model, ids, 30, eos=IM_END, temperature=0)
    ref = plain_logprobs(model, ids + new)
    content = r.choices[0].logprobs.content
    reply = [t for t in new if t != IM_END]
    assert [e.token for e in content] == [name(t) for t in reply] and reply
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    for j, (e, t) in enumerate(zip(content, reply)):
        row = ref[len(ids) + j - 1]
        assert abs(e.logprob - row[t].item()) < 1e-4 and e.bytes == list(enc.decode_single_token_bytes(t))
        top = torch.topk(row, 4)
        assert [x.token for x in e.top_logprobs] == [name(u) for u in top.indices.tolist()]
        assert all(abs(x.logprob - v) < 1e-4 for x, v in zip(e.top_logprobs, top.values.tolist()))
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert r.choices[0].finish_reason == ("stop" if new[-1] == IM_END else "length")
    plain = chat_server.client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_scoring_requests_are_batched_into_one_forward(tiny):
    """Eight scoring requests waiting at once (max_tokens 0 and 1, lm-eval's) take one padded forward
    pass, on an engine of two KV-cache rows (they need none), each scored as a plain forward scores it."""
    model, _ = tiny
    enc = get_tokenizer()
    engine = Engine(model, max_batch=2, max_requests=16)

    async def run():
        loop, jobs = asyncio.get_running_loop(), []
        with engine.lock:  # the engine looks at the queue once all eight are in it
            for i, prompt in enumerate(PROMPTS):
                job, ids = Job(loop), enc.encode(prompt)
                seq = Sequence(job, 0, ids, i % 2, 0.0, 1.0, None, torch.Generator(), TextStream([]), EOT_TOKEN,
                               logprobs=2, echo=True)
                assert engine.submit(job, [seq])
                jobs.append((job, ids, i % 2))
        out = []
        for job, ids, max_tokens in jobs:
            entries = []
            async for events in job_events(job, 1):
                entries += [x for e in events for x in e[4]]
            out.append((ids, max_tokens, entries))
        return out

    try:
        results = asyncio.run(run())
        assert (engine.stats["score_forwards"], engine.stats["scored_sequences"]) == (1, 8), engine.stats
        assert engine.stats["prefilled_tokens"] == engine.stats["decode_steps"] == 0
    finally:
        engine.close()
    for ids, max_tokens, entries in results:
        full = ids + sampled(model, ids, max_tokens, temperature=0)
        ref = plain_logprobs(model, full)
        assert [e[0] for e in entries] == full and entries[0][1:] == (None, None)
        for i, (t, lp, top) in enumerate(entries[1:], 1):
            assert abs(lp - ref[i - 1, t].item()) < 1e-4
            assert [u for u, _ in top] == torch.topk(ref[i - 1], 2).indices.tolist()


def test_concurrent_scoring_clients_share_forwards(server, tiny):
    """Eight clients scoring at once through HTTP: fewer forward passes than requests, each answer right."""
    model, _ = tiny
    enc = get_tokenizer()
    before = server.wait_idle()

    def client(c, i):
        return c.completions.create(model="m", prompt=PROMPTS[i], echo=True, logprobs=1, max_tokens=1, temperature=0)

    results = eight_clients_at_once(server, client)
    after = server.wait_idle()
    for i, r in results.items():
        ids = enc.encode(PROMPTS[i])
        full = ids + sampled(model, ids, 1, temperature=0)
        check_legacy(r.choices[0].logprobs.model_dump(), full, 0, plain_logprobs(model, full), 1, r.choices[0].text)
    assert after["scored_sequences"] - before["scored_sequences"] == 8
    assert after["score_forwards"] - before["score_forwards"] < 8, (before, after)


def test_lm_eval_can_use_the_server(server, tiny):
    """What lm-eval's local-completions asks: its remote tokenizer (GET /tokenizer_info, POST /tokenize
    and /detokenize, as lm_eval.utils.RemoteTokenizer calls them), then echo requests with max_tokens 1
    whose logprobs it sums from the context's length to the last but one. With lm_eval installed,
    lm_eval itself (its auto tokenizer backend, 4 concurrent requests)."""
    model, _ = tiny
    enc = get_tokenizer()
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    tokenize = lambda text: httpx.post(server.url + "/tokenize", timeout=10,  # noqa: E731
                                       json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert tokenize(info["eos_token"]) == [EOT_TOKEN] and tokenize("Hello world") == enc.encode("Hello world")
    ids = enc.encode(PROMPTS[5])
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}, timeout=10).json() == {"prompt": PROMPTS[5]}
    assert httpx.post(server.url + "/detokenize", json={"tokens": [99999]}, timeout=10).status_code == 400
    pairs = [("The quick brown fox", " jumps over the lazy dog"), ("Once upon a time", " there was"),
             ("In 1905,", " Einstein")]

    def expected(context, continuation):
        ctx, whole = enc.encode(context), enc.encode(context + continuation)
        ref = plain_logprobs(model, whole)
        lps = [ref[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))]
        return sum(lps), all(ref[i - 1].argmax().item() == whole[i] for i in range(len(ctx), len(whole)))

    for context, continuation in pairs:  # the payload of LocalCompletionsAPI._create_payload(generate=False)
        ctx, whole = enc.encode(context), enc.encode(context + continuation)
        body = {"model": "m", "prompt": [whole], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                "echo": True}
        lp = server.post(body).json()["choices"][0]["logprobs"]
        score = sum(lp["token_logprobs"][len(ctx) : -1])
        tops = lp["top_logprobs"][len(ctx) : -1]
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx) : -1], tops))
        want = expected(context, continuation)
        assert abs(score - want[0]) < 1e-4 and greedy == want[1]
    if not all(importlib.util.find_spec(m) for m in ("lm_eval", "aiohttp", "tenacity")):
        return  # lm-eval[api] is not installed: the payloads above are what it sends
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=server.health()["model"], max_length=1024,
                             num_concurrent=4)
    assert lm.tokenizer_backend == "remote"
    results = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (score, greedy), pair in zip(results, pairs):
        want = expected(*pair)
        assert abs(score - want[0]) < 1e-4 and greedy == want[1], (pair, score, want)


def test_responses_do_not_wait_for_a_delayed_ack(server):
    """Every connection gets TCP_NODELAY (asyncio sets it only on sockets whose proto says TCP, and
    accept() gives proto 0): without it a response's body, written after its head, waited for the
    client's delayed ACK, 40 ms on Linux, on every request (lm-eval's thousands of scoring requests)."""
    with serve.Listener(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            conn, _ = listener.accept()
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            conn.close()
    with httpx.Client(timeout=30) as client:
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            r = client.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            times.append(time.perf_counter() - t0)
            assert r.status_code == 200
    assert min(times) < 0.035, times  # (each took 40 ms or more)


# ----------------------------------------------------------------------------- limits and errors

def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


def test_malformed_and_invalid_requests_get_400(limited):
    assert error_of(limited.post(b"{not json"), 400)["message"].startswith("request body is not valid JSON")
    error_of(limited.post(b"\xff\xfe"), 400)
    error_of(limited.post([1, 2]), 400)
    error_of(limited.post({"max_tokens": 3}), 400)
    assert "nested" in error_of(limited.post(b"[" * 9000 + b"]" * 9000), 400)["message"]  # past the recursion limit
    for field, value in [("temperature", "hot"), ("temperature", 3), ("top_p", 0), ("max_tokens", 0),
                         ("max_tokens", 2.5), ("n", True), ("seed", "x"), ("stop", ["a"] * 5), ("stop", 7),
                         ("stream", "yes"), ("echo", "yes"), ("echo", 1), ("logprobs", 6), ("logprobs", True),
                         ("logprobs", -1), ("prompt", [[1, 2], 3]), ("prompt", [99999]), ("prompt", []),
                         ("prompt", None), ("temprature", 0.5), ("suffix", "x"), ("best_of", 2),
                         ("prompt_logprobs", 1), ("min_p", 0.1)]:  # vLLM's extensions: not implemented, named
        body = {"prompt": "Hi", "max_tokens": 3, field: value}
        assert error_of(limited.post(body), 400)["param"] == field, (field, value)


def test_limits_get_400_and_413(limited):
    long_prompt = " ".join(["word"] * 100)  # 100 tokens > --max_prompt_tokens 64
    assert error_of(limited.post({"prompt": long_prompt, "max_tokens": 3}), 413)["code"] == "prompt_too_long"
    error_of(limited.post({"prompt": "x" * 30000, "max_tokens": 3}), 413)  # body over --max_body_bytes
    assert error_of(limited.post({"prompt": "Hi", "max_tokens": 1001}), 400)["param"] == "max_tokens"
    assert error_of(limited.post({"prompt": "Hi", "max_tokens": 3, "n": 5}), 400)["param"] == "n"
    assert error_of(limited.post({"prompt": ["a", "b", "c"], "max_tokens": 3, "n": 2}), 400)["param"] == "n"
    ctx = error_of(limited.post({"prompt": " ".join(["word"] * 60), "max_tokens": 1000}), 400)
    assert ctx["code"] == "context_length_exceeded" and "1024" in ctx["message"]
    with pytest.raises(openai.BadRequestError):
        limited.client.completions.create(model="m", prompt="Hi", max_tokens=5000)
    assert limited.post({"prompt": "Hi", "max_tokens": 3}).status_code == 200  # still serving


def test_requests_over_the_in_flight_cap_get_429(limited, plain):
    limited.wait_idle()
    stream = limited.client.completions.create(model="m", seed=1, stream=True, **LONG)
    next(iter(stream))  # the one allowed request is now decoding
    err = error_of(limited.post({"prompt": "Hi", "max_tokens": 3}), 429)
    assert err["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):
        limited.client.completions.create(model="m", prompt="Hi", max_tokens=3)
    stream.close()
    limited.wait_idle()
    r = limited.client.completions.create(model="m", prompt="Hi", max_tokens=8, seed=4)
    assert r.choices[0].text == reference(plain[0], "Hi", 8, 4)[0]  # and serving as before


def test_a_cancelled_queued_request_leaves_the_queue_at_once(plain, tmp_path):
    """--max_requests 2, one row: a long request decodes, a second waits for the row and its client
    leaves. The second no longer counts: a third is queued (not 429) while the first still runs, and
    gets generate()'s text once the first is stopped."""
    s = Server(plain[1], tmp_path / "serve.log", "--max_batch", "1", "--max_requests", "2")
    try:
        running = s.client.completions.create(model="m", seed=1, stream=True, n=8, **LONG)  # 8 x 1000 tokens in turn
        next(iter(running))
        with pytest.raises(httpx.ReadTimeout):
            s.post({"prompt": "Hi", "max_tokens": 8, "seed": 2}, timeout=httpx.Timeout(30, read=0.3))
        deadline = time.monotonic() + 2
        while (h := s.health())["requests_in_flight"] > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert h["running"] == 1 and h["waiting"] == 7, h  # the first one's 7 other choices wait; it still runs
        queued = s.client.completions.create(model="m", prompt="Hi", max_tokens=8, seed=4, stream=True)  # no 429
        running.close()
        assert read_stream(queued)[0][0] == reference(plain[0], "Hi", 8, 4)[0]
        assert s.wait_idle()["requests_in_flight"] == 0
    finally:
        s.stop()
    assert "Traceback" not in open(s.log_path).read()


def test_a_used_port_is_one_error_line_naming_port(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--model", str(tmp_path / "nope"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    line = error_line(r)
    assert f"port {port}" in line and "--port" in line, line


def test_bad_model_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# ----------------------------------------------------------------------------- chat: /v1/chat/completions

def test_chat_completions_equal_generate(chat_server, chat_model):
    """The openai client's chat.completions.create, whole and streamed: the reply is generate()'s
    after chat.render(messages, generation_prompt=True), cut before <|im_end|>, for that seed."""
    model, _ = chat_model
    cases = [(CHATS[0], 40, 11, {}), (CHATS[1], 40, 5, dict(temperature=0.7, top_p=0.9)),
             (CHATS[2], 30, 13, dict(temperature=0.0)), (CHATS[4], 60, 6, dict(top_k=50)), (CHATS[7], 3, 1, {})]
    finishes = set()
    for messages, max_tokens, seed, sampling in cases:
        kw = dict(model="m", messages=messages, max_tokens=max_tokens, seed=seed, **sampling)
        if "top_k" in kw:
            kw["extra_body"] = {"top_k": kw.pop("top_k")}  # vLLM's, not the client's
        r = chat_server.client.chat.completions.create(**kw)
        text, finish, n = chat_reference(model, messages, max_tokens, seed, **sampling)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish), (messages, seed)
        assert r.choices[0].message.role == "assistant" and len(r.choices) == 1
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        prompt_tokens = len(chat.render(messages, generation_prompt=True)[0])
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, n, prompt_tokens + n)
        texts, stream_finishes, roles = read_chat_stream(chat_server.client.chat.completions.create(stream=True, **kw))
        assert (texts[0], stream_finishes[0], roles[0]) == (text, finish, "assistant")
        finishes.add(finish)
    assert finishes == {"stop", "length"}, "premise: the cases end both at <|im_end|> and at max_tokens"
    # n choices with seed s: choice c is generate(seed=s + c); max_completion_tokens is max_tokens' newer name
    kw = dict(model="m", messages=CHATS[3], max_completion_tokens=40, n=3, seed=100, temperature=0.9)
    full = chat_server.client.chat.completions.create(**kw)
    texts, stream_finishes, roles = read_chat_stream(chat_server.client.chat.completions.create(stream=True, **kw))
    for c in range(3):
        expected = chat_reference(model, CHATS[3], 40, 100 + c, temperature=0.9)[:2]
        assert (full.choices[c].message.content, full.choices[c].finish_reason) == expected, c
        assert (texts[c], stream_finishes[c], roles[c]) == (*expected, "assistant"), c
    assert len({texts[c] for c in range(3)}) == 3
    # without max_tokens, a reply may fill the context: 256 tokens less the conversation's
    r = chat_server.client.chat.completions.create(model="m", messages=CHATS[5], seed=3, temperature=1.3)
    room = 256 - len(chat.render(CHATS[5], generation_prompt=True)[0])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == chat_reference(
        model, CHATS[5], room, 3, temperature=1.3)[:2]


def test_chat_stream_wire_format(chat_server, chat_model):
    """Raw SSE: each choice's first chunk is the delta {"role": "assistant", "content": ""}, then its
    content deltas, then a chunk with its finish_reason and an empty delta; with include_usage every
    chunk has "usage": null and a last one (no choices) the counts; data: [DONE] last."""
    body = dict(messages=CHATS[1], max_tokens=30, n=2, seed=21, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-") and all("usage" in c for c in chunks)
    *chunks, last = chunks
    assert last["choices"] == [] and all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    counts = 0
    for index in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        text, finish, n = chat_reference(chat_model[0], CHATS[1], 30, 21 + index)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["finish_reason"] is None
        assert all(set(c["delta"]) == {"content"} and c["delta"]["content"] and c["finish_reason"] is None for c in mine[1:-1])
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == finish
        assert "".join(c["delta"]["content"] for c in mine[1:-1]) == text
        counts += n
    prompt_tokens = len(chat.render(CHATS[1], generation_prompt=True)[0])
    assert last["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": counts, "total_tokens": prompt_tokens + counts}
    # without include_usage: no usage anywhere
    with httpx.stream("POST", chat_server.url + "/v1/chat/completions", json={**body, "stream_options": None}, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    assert chunks and all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


def test_eight_concurrent_chats_are_batched_and_correct(chat_server, chat_model):
    """8 conversations at once from 8 threads, half of them streamed: each gets its own reply."""
    model, _ = chat_model
    before = chat_server.wait_idle()

    def client(c, i):
        kw = dict(model="m", messages=CHATS[i], max_tokens=60, seed=70 + i, temperature=0.9)
        if i % 2:
            texts, finishes, _ = read_chat_stream(c.chat.completions.create(stream=True, **kw))
            return texts[0], finishes[0]
        r = c.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    results = eight_clients_at_once(chat_server, client)
    for i in range(8):
        assert results[i] == chat_reference(model, CHATS[i], 60, 70 + i, temperature=0.9)[:2], i
    after = chat_server.wait_idle()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_tokens"] - before["decoded_tokens"]
    assert rows / steps >= 2, f"decode steps were not batched: {rows} tokens in {steps} steps"


def test_chat_errors_are_openais(chat_server):
    """Bad messages get 400 with param "messages"; a conversation too long gets what a prompt as long
    gets from /v1/completions (413 prompt_too_long, 400 context_length_exceeded)."""
    ok = {"messages": CHATS[0], "max_tokens": 3}
    for messages in ["Hi", None, [], {"role": "user", "content": "Hi"}, ["Hi"], [{"role": "robot", "content": "Hi"}],
                     [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": 7}],
                     [{"content": "Hi"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]]:
        err = error_of(chat_server.chat({**ok, "messages": messages}), 400)
        assert err["param"] == "messages" and err["type"] == "invalid_request_error", (messages, err)
    assert "role 'robot'" in error_of(chat_server.chat({**ok, "messages": [{"role": "robot", "content": "Hi"}]}), 400)["message"]
    assert error_of(chat_server.chat({"max_tokens": 3}), 400)["param"] == "messages"
    for field, value in [("max_tokens", 0), ("max_completion_tokens", 2000), ("n", 9), ("temperature", "hot"),
                         ("top_p", 0), ("seed", 1.5), ("stop", 7), ("stream", "yes"), ("tools", [{"type": "function"}]),
                         ("logprobs", 1), ("top_logprobs", 21), ("top_logprobs", 2), ("echo", True),
                         ("response_format", {"type": "json_object"}), ("max_token", 3), ("min_p", 0.1)]:
        assert error_of(chat_server.chat({**ok, field: value}), 400)["param"] == field, (field, value)
    # OpenAI's developer role is a system message, and content may be a list of text parts
    r = chat_server.chat({**ok, "seed": 1, "messages": [{"role": "developer", "content": "Be brief."},
                                                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(chat.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], generation_prompt=True)[0])
    with pytest.raises(openai.BadRequestError, match="role"):
        chat_server.client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "Hi"}], max_tokens=3)
    # too long: the rendered conversation is the prompt
    ids = lambda messages: chat.render(messages, generation_prompt=True)[0]  # noqa: E731
    long = [{"role": "user", "content": " ".join(["word"] * 130)}]
    near = [{"role": "user", "content": " ".join(["word"] * 100)}]
    assert len(ids(long)) > 128 >= len(ids(near)) and len(ids(near)) + 200 > 256  # premises
    for messages, max_tokens, status, code in [(long, 3, 413, "prompt_too_long"), (near, 200, 400, "context_length_exceeded")]:
        err = error_of(chat_server.chat({"messages": messages, "max_tokens": max_tokens}), status)
        same = error_of(chat_server.post({"prompt": ids(messages), "max_tokens": max_tokens}), status)
        assert err["code"] == same["code"] == code and err["param"] == "messages", err
        assert err["message"].split(" (")[0] == same["message"].split(" (")[0], (err, same)
    assert "256" in err["message"] and str(len(ids(near)) + 200) in err["message"]
    with pytest.raises(openai.BadRequestError, match="context length"):
        chat_server.client.chat.completions.create(model="m", messages=near, max_tokens=200)
    assert chat_server.chat({"messages": near}).status_code == 200  # without max_tokens: the room left
    assert chat_server.chat(ok).status_code == 200  # and still serving


def test_chat_requests_read_messages_by_chat_pys_rules(chat_server):
    """One set of rules for a request's messages and sft.py's conversation files (chat.parse_messages):
    each of these is taken by both (the prompt is chat.render of what chat.py read) or refused by both
    (400, param messages, chat.py's message)."""
    hi, yo = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}
    cases = [[{"role": "developer", "content": "Be brief."}, hi],
             [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you", "x": 1}]}],
             [hi, {**yo, "weight": 0}, hi], [hi, {**yo, "weight": 1}, hi], [hi, {**yo, "weight": None}, hi],
             [{**hi, "weight": 0}], [{**hi, "name": "a"}],
             [{**hi, "weight": 1}], [hi, {**yo, "weight": 2}, hi], [hi, {**yo, "weight": "1"}, hi],
             [hi, {**yo, "weight": True}, hi], [hi, {**yo, "weight": 1.0}, hi],
             [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
             [{"role": "user", "content": []}], [{"role": "user", "content": [{"type": "text"}]}],
             [{"role": "user", "content": ["Hi"]}], [{"role": "tool", "content": "Hi"}], [hi, "Hi"]]
    taken = 0
    for messages in cases:
        try:
            expected = chat.parse_messages(messages, "invalid messages")
        except cli.Error as e:
            err = error_of(chat_server.chat({"messages": messages, "max_tokens": 1}), 400)
            assert (err["message"], err["param"]) == (str(e), "messages"), (messages, err)
            tokenized = httpx.post(chat_server.url + "/tokenize", json={"messages": messages}, timeout=10)
            assert error_of(tokenized, 400)["message"] == str(e), messages
            continue
        r = chat_server.chat({"messages": messages, "max_tokens": 1})
        assert r.status_code == 200, (messages, r.text)
        assert r.json()["usage"]["prompt_tokens"] == len(chat.render(expected, generation_prompt=True)[0]), messages
        taken += 1
    assert taken == 7  # premise: the cases hold both kinds


def test_chat_needs_a_chat_model(server, chat_server, chat_model):
    """A base model answers /v1/chat/completions with a 400 that says to fine-tune it with sft.py;
    /v1/models says which kind a model is; a chat model still serves /v1/completions (its markers are
    special tokens in a prompt, and text in a completion, so ChatML by hand with stop <|im_end|> is
    the chat endpoint's reply)."""
    err = error_of(server.chat({"messages": CHATS[0], "max_tokens": 3}), 400)
    assert "sft.py" in err["message"] and "not a chat model" in err["message"] and err["param"] == "model", err
    with pytest.raises(openai.BadRequestError, match="sft.py"):
        server.client.chat.completions.create(model="m", messages=CHATS[0], max_tokens=3)
    assert server.client.models.list().data[0].chat is False
    assert chat_server.client.models.list().data[0].chat is True
    assert server.post({"prompt": "Hi", "max_tokens": 2}).status_code == 200
    model, _ = chat_model
    r = chat_server.client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=30, seed=4)
    assert (r.choices[0].text, r.choices[0].finish_reason) == reference(model, PROMPTS[0], 30, 4)[:2]
    chatml = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHATS[1]) + "<|im_start|>assistant\n"
    tokens = httpx.post(chat_server.url + "/tokenize", json={"prompt": chatml}, timeout=10).json()["tokens"]
    assert tokens == chat.render(CHATS[1], generation_prompt=True)[0]
    for seed in (1, 2, 3):
        by_hand = chat_server.client.completions.create(model="m", prompt=chatml, max_tokens=40, seed=seed, stop="<|im_end|>")
        text, finish, _ = chat_reference(model, CHATS[1], 40, seed)
        assert (by_hand.choices[0].text, by_hand.choices[0].finish_reason) == (text, finish), seed


def test_tokenize_counts_messages_as_chat_does(server, chat_server):
    """vLLM's /tokenize with messages (add_generation_prompt, default true): the chat page fits max
    tokens with it."""
    for messages in CHATS[:4]:
        r = httpx.post(chat_server.url + "/tokenize", json={"messages": messages}, timeout=10).json()
        usage = chat_server.chat({"messages": messages, "max_tokens": 1}).json()["usage"]
        assert r["count"] == len(r["tokens"]) == usage["prompt_tokens"] and r["max_model_len"] == 256
        closed = httpx.post(chat_server.url + "/tokenize", json={"messages": messages, "add_generation_prompt": False},
                            timeout=10).json()
        assert closed["tokens"] == chat.render(messages)[0]
    bad = httpx.post(chat_server.url + "/tokenize", json={"messages": [{"role": "x", "content": "y"}]}, timeout=10)
    assert error_of(bad, 400)["param"] == "messages"
    assert error_of(httpx.post(server.url + "/tokenize", json={"messages": CHATS[0]}, timeout=10), 400)["param"] == "messages"


# ----------------------------------------------------------------------------- the page in a browser

def chromium_or_skip():
    """(Debian's chromium, playwright's sync_playwright), or skip the test (fail it on CI)."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if not chromium or not sync_playwright:
        why = "Debian's chromium is not installed" if not chromium else "the playwright package is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{why} (apt-get install chromium)")
    return chromium, sync_playwright


def watch_lengths(page):
    """Record the generated text's length at every change (window.lengths), to see it grow token by token."""
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => window.lengths.push(document.querySelector('#out .gen').textContent.length))
            .observe(document.querySelector('#out .gen'), {childList: true, characterData: true, subtree: true}); }""")


def generate_on_page(page):
    """Press Generate and wait for the answer; returns (generated text, stats line, whether it is an error)."""
    page.click("#go")
    page.wait_for_function("document.querySelector('#out .gen').textContent.length > 0 || "
                           "document.querySelector('#stats').classList.contains('error')", timeout=30000)
    page.wait_for_function("!document.querySelector('#go').disabled", timeout=60000)
    return page.text_content("#out .gen"), page.text_content("#stats"), page.evaluate(
        "document.querySelector('#stats').classList.contains('error')")


def tokens_per_s(stats):
    m = re.search(r"(\S+) tokens/s", stats)
    assert m, stats
    return float(m.group(1))  # "Infinity" and "NaN" parse too, and fail the bounds below


# The page's next stream from `path`, re-cut so that the page reads it one event at a time, 5 ms apart
# ("trickle": each delta must show as it comes, however the network coalesced them), or cut off after
# its first content delta until the page aborts it ("stall": for Stop).
WRAP_NEXT_STREAM = """([mode, path]) => {
  const realFetch = window.fetch;
  window.fetch = async (url, options) => {
    const response = await realFetch(url, options);
    if (!String(url).endsWith(path)) return response;
    window.fetch = realFetch;
    const reader = response.body.getReader(), decoder = new TextDecoder(), encoder = new TextEncoder();
    let buffer = '', stalled = false;
    const body = new ReadableStream({ async pull(controller) {
      for (;;) {
        const cut = buffer.indexOf('\\n\\n');
        if (cut >= 0 && !stalled) {
          const event = buffer.slice(0, cut + 2);
          buffer = buffer.slice(cut + 2);
          stalled = mode === 'stall' && event.includes('"delta":{"content"');
          await new Promise((resolve) => setTimeout(resolve, 5));
          return controller.enqueue(encoder.encode(event));
        }
        if (stalled) await new Promise((_, reject) => options.signal.addEventListener('abort',
            () => reject(new DOMException('aborted', 'AbortError'))));
        const { value, done } = await reader.read();
        if (done) return controller.close();
        buffer += decoder.decode(value, { stream: true });
      }
    }});
    return new Response(body, { status: response.status, headers: response.headers });
  };
}"""


@contextlib.contextmanager
def page_at(url, height=720):
    """A headless Chromium page opened at url's / (the test is skipped as chromium_or_skip says)."""
    chromium, sync_playwright = chromium_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": height})
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_page_streams_in_headless_chromium(limited, plain):
    with page_at(limited.url) as page:
        page.fill("#prompt", PROMPTS[0])
        for field, value in [("max_tokens", "300"), ("temperature", "0.8"), ("top_p", "0.95"), ("top_k", "50"),
                             ("seed", "7")]:
            page.fill(f"#{field}", value)
        watch_lengths(page)
        page.evaluate(WRAP_NEXT_STREAM, ["trickle", "/v1/completions"])  # each delta shown as it comes
        page.click("#go")
        page.wait_for_function("document.querySelector('#out .gen').textContent.length > 0", timeout=30000)
        page.wait_for_function("!document.querySelector('#out').classList.contains('running')", timeout=60000)
        text, stats, lengths = page.text_content("#out .gen"), page.text_content("#stats"), page.evaluate("window.lengths")
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "serve_page.png"), full_page=True)
    assert text == reference(plain[0], PROMPTS[0], 300, 7, temperature=0.8, top_p=0.95, top_k=50)[0]
    assert len(set(lengths)) >= 5, f"the text did not stream in: {lengths}"
    assert "tokens/s" in stats and "first token" in stats, stats


def chat_on_page(page, action):
    """Send (or Regenerate, or Enter in the message box) and wait for the reply to end; returns
    (the last assistant bubble's text, the stats line, whether that is an error)."""
    action()
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60000)
    replies = page.locator("#conversation .msg.assistant")
    return (replies.last.text_content() if replies.count() else None), page.text_content("#stats"), page.evaluate(
        "document.querySelector('#stats').classList.contains('error')")




def test_chat_page_in_headless_chromium(chat_server, chat_model):
    """The page on a chat model shows the chat view: two turns, each reply streamed into its bubble
    and equal to generate()'s for the conversation so far and the page's seed; Regenerate replaces
    the last reply; Stop keeps what came (and the next reply follows it)."""
    model, _ = chat_model
    system, first, second, third = "You are a helpful assistant.", "Hi! Who are you?", "Tell me more, please.", "And then?"
    sampling = dict(temperature=0.9, top_p=0.95, top_k=50)
    conv = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    expected1 = chat_reference(model, conv, 40, 7, **sampling)
    assert expected1[2] >= 8, "premise: the first reply is long enough to be seen streaming"
    with page_at(chat_server.url, height=900) as page:
        page.wait_for_function("document.body.classList.contains('chat')", timeout=10000)
        views = page.evaluate("['#prompt', '#out', '#go', '#conversation', '#system', '#send'].map("
                              "(s) => document.querySelector(s).offsetParent !== null)")
        assert views == [False, False, False, True, True, True], "the chat view, not the completion view"
        page.fill("#system", system)
        for field, value in [("max_tokens", "40"), ("temperature", "0.9"), ("top_p", "0.95"), ("top_k", "50"),
                             ("seed", "7")]:
            page.fill(f"#{field}", value)
        # turn 1, read by the page one event at a time: the bubble grows with each delta
        page.fill("#message", first)
        page.evaluate(WRAP_NEXT_STREAM, ["trickle", "/v1/chat/completions"])
        page.evaluate("""() => { window.lengths = [];
            new MutationObserver(() => { const r = document.querySelectorAll('#conversation .msg.assistant');
                if (r.length) window.lengths.push(r[r.length - 1].textContent.length); })
            .observe(document.querySelector('#conversation'), {childList: true, characterData: true, subtree: true}); }""")
        reply1, stats1, error1 = chat_on_page(page, lambda: page.click("#send"))
        assert not error1 and reply1 == expected1[0], (reply1, stats1)
        lengths = page.evaluate("window.lengths")
        assert len(set(lengths)) >= 4, f"the reply did not stream in: {lengths}"
        assert "tokens/s" in stats1 and stats1.startswith(f"{expected1[2]} tokens"), stats1
        # turn 2 (Enter sends): the reply follows the whole conversation
        page.fill("#message", second)
        reply2, stats2, error2 = chat_on_page(page, lambda: page.press("#message", "Enter"))
        conv += [{"role": "assistant", "content": reply1}, {"role": "user", "content": second}]
        assert not error2 and reply2 == chat_reference(model, conv, 40, 7, **sampling)[0], (reply2, stats2)
        # Regenerate with another seed: the last reply is replaced
        page.fill("#seed", "8")
        reply3, stats3, error3 = chat_on_page(page, lambda: page.click("#regenerate"))
        assert not error3 and reply3 == chat_reference(model, conv, 40, 8, **sampling)[0] != reply2, (reply3, stats3)
        bubbles = page.eval_on_selector_all("#conversation .msg", "els => els.map((e) => [e.className, e.textContent])")
        assert bubbles == [["msg user", first], ["msg assistant", reply1], ["msg user", second], ["msg assistant", reply3]]
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "serve_chat_page.png"), full_page=True)
        # Stop: the stream stalls after its first content, Stop aborts it, the partial reply stays
        conv += [{"role": "assistant", "content": reply3}, {"role": "user", "content": third}]
        expected4 = chat_reference(model, conv, 40, 8, **sampling)[0]
        page.evaluate(WRAP_NEXT_STREAM, ["stall", "/v1/chat/completions"])
        page.fill("#message", third)
        page.click("#send")
        page.wait_for_function("document.querySelector('#conversation .msg.assistant.running').textContent.length > 0",
                               timeout=30000)
        page.click("#chat_stop")
        page.wait_for_function("!document.querySelector('#send').disabled", timeout=10000)
        stopped = page.eval_on_selector("#conversation .msg:last-child", "e => [e.className, e.textContent]")
        assert stopped[0] == "msg assistant stopped" and stopped[1] and expected4.startswith(stopped[1]), (stopped, expected4)
        assert "stopped" in page.text_content("#stats")
        # ... and Regenerate drops it for a whole reply
        reply5, _, error5 = chat_on_page(page, lambda: page.click("#regenerate"))
        assert not error5 and reply5 == expected4 and page.locator("#conversation .msg.assistant").count() == 3


@pytest.fixture(scope="module")
def short_chat(tmp_path_factory):
    """A chat model whose context is 64 tokens (some replies end within 8 tokens, some not), and its server."""
    model, path = checkpoint(tmp_path_factory.mktemp("short_chat"), eot_boost=0.0, block_size=64, im_end_boost=1.7)
    s = Server(path, tmp_path_factory.mktemp("logs") / "short_chat.log")
    yield model, s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log


def test_chat_page_drops_the_oldest_turns_past_the_context(short_chat):
    """Issue #25: on a 64-token chat model the page refused the third turn ("The conversation has 67
    tokens; this model's context is 64: start a new chat"). It must do what generate.py --chat does
    (chat.fit, with reply_room's tokens kept for the reply): drop the oldest turns for good, keep the
    system prompt, say so in the page, and keep answering. Each request's messages are the terminal's
    history at that turn, and each reply is generate()'s for them. Max tokens 8, then empty (the
    server's default: the room the context leaves; 128 kept, at most half the context)."""
    from generate import reply_room

    model, server = short_chat
    system, seed = "Be brief.", 7
    sampling = dict(temperature=0.9, top_p=0.95, top_k=50)
    texts = ["Hi there, how are you today?", "Tell me a short story.", "What happens next?", "Why is that so?",
             "And then what?", "Thanks, that was nice!"]

    def converse(page, sent, max_tokens):
        """Send each of texts, checking each turn against the terminal's; returns ([[role, text]] of the
        conversation, [[class, text]] of the bubbles on the page, messages dropped at each turn)."""
        limit = 64 - reply_room(64, max_tokens or 128)
        history, shown, drops = [{"role": "system", "content": system}], [], []  # the terminal's history; the bubbles
        for i, text in enumerate(texts):
            page.fill("#message", text)
            reply, stats, error = chat_on_page(page, lambda: page.click("#send"))
            assert not error, (i, stats)
            history.append({"role": "user", "content": text})
            ids, dropped, cut = chat.fit(history, limit)
            del history[1 : 1 + dropped]
            drops.append(dropped)
            body = sent[-1]
            assert cut == 0 and body["messages"] == history, (i, cut, body["messages"], history)
            assert body.get("max_tokens") == max_tokens and len(ids) + (max_tokens or 0) <= 64, (i, body)
            assert reply == chat_reference(model, history, max_tokens or 64 - len(ids), seed, **sampling)[0], i
            history.append({"role": "assistant", "content": reply})
            shown += [["user", text], ["assistant", reply]]
            note = page.locator("#conversation .note")
            if sum(drops):
                assert note.is_visible() and note.text_content() == (
                    f"(the {sum(drops)} oldest messages dropped to fit the model's 64-token context)"), i
            else:
                assert note.count() == 0, i
        bubbles = page.eval_on_selector_all("#conversation .msg", "els => els.map((e) => [e.className, e.textContent])")
        whole = [{"role": r, "content": c} for r, c in shown]
        assert len(chat.render([history[0], *whole], generation_prompt=True)[0]) > 64  # premise: past the context
        assert drops[0] == 0 and sum(drops) >= 4, drops  # premise: later turns dropped some
        assert all(c for r, c in shown if r == "assistant"), shown  # premise: no reply is empty
        return shown, bubbles, drops

    with page_at(server.url, height=900) as page:
        page.wait_for_function("document.body.classList.contains('chat')", timeout=10000)
        page.fill("#system", system)
        for field, value in [("max_tokens", 8), ("temperature", 0.9), ("top_p", 0.95), ("top_k", 50), ("seed", seed)]:
            page.fill(f"#{field}", str(value))
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
                else None)
        runs = [converse(page, sent, 8)]
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "serve_chat_page_context64.png"), full_page=True)
        # New chat starts afresh (nothing dropped, no note); now with the server's max tokens
        page.click("#clear")
        assert page.locator("#conversation .note").count() == 0 and page.locator("#conversation .msg").count() == 0
        page.fill("#max_tokens", "")
        runs.append(converse(page, sent, None))
        # a message too long for the context even alone: said, not sent (the terminal cuts its start), and
        # nothing more dropped
        note = page.text_content("#conversation .note")
        page.fill("#message", " ".join(["word"] * 64))
        _, stats, error = chat_on_page(page, lambda: page.click("#send"))
        assert error and "Your message and the system prompt come to" in stats and "shorten it" in stats, stats
        assert page.text_content("#conversation .note") == note and len(sent) == 2 * len(texts)
        assert page.eval_on_selector_all("#conversation .msg", "els => els.map((e) => [e.className, e.textContent])") \
            == runs[-1][1] + [["msg user", " ".join(["word"] * 64)]]
    for shown, bubbles, drops in runs:  # every bubble stays on the page, the dropped ones marked so
        assert [[c.split()[1], t] for c, t in bubbles] == shown
        assert ["dropped" in c for c, _ in bubbles] == [k < sum(drops) for k in range(len(shown))], bubbles


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A server whose model's context is 64 tokens (rarely ends at <|endoftext|>)."""
    _, path = checkpoint(tmp_path_factory.mktemp("short"), eot_boost=0.0, block_size=64)
    s = Server(path, tmp_path_factory.mktemp("logs") / "short.log")
    yield s
    s.stop()
    log = open(s.log_path).read()
    assert "Traceback" not in log, log


def test_page_defaults_fit_a_64_token_context(short):
    """Issue #15: with the page's defaults (max tokens was 128), a 64-token model answered 400
    context_length_exceeded; and tokens/s, timed from the first token, read ~1e5 when the stream
    came in one read. Generate with the defaults must stream, show no error, show the context,
    and report a sane tokens/s, also when the whole answer arrives at once (a buffering proxy)."""
    with page_at(short.url) as page:
        prompt = page.input_value("#prompt")  # the page's default prompt
        assert prompt, "the page has no default prompt"
        n = httpx.post(short.url + "/tokenize", json={"prompt": prompt}, timeout=10).json()["count"]
        page.wait_for_function(f"document.querySelector('#context').textContent.includes('prompt {n}')", timeout=10000)
        context = page.text_content("#context")
        watch_lengths(page)
        page.evaluate(WRAP_NEXT_STREAM, ["trickle", "/v1/completions"])
        text, stats, is_error = generate_on_page(page)
        max_tokens, lengths = page.input_value("#max_tokens"), page.evaluate("window.lengths")
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "serve_page_context64.png"), full_page=True)
        # The same with the whole answer held back (0.3 s more), then delivered in one piece, as a
        # buffering proxy does: the page's request lasts at least `held`, so a rate timed from
        # its start is at most tokens / held, where one timed from the first token is ~infinite.
        held = []

        def buffer(route):
            start = time.monotonic()
            response = route.fetch()
            time.sleep(0.3)
            held.append(time.monotonic() - start)
            route.fulfill(response=response)

        page.route("**/v1/completions", buffer)
        text2, stats2, is_error2 = generate_on_page(page)
    assert "context 64" in context, context
    assert not is_error and "400" not in stats and text, stats
    assert len(set(lengths)) >= 5, f"the text did not stream in: {lengths}"
    assert max_tokens == str(64 - n), (max_tokens, n)  # min(128, the room the prompt leaves)
    done = int(re.match(r"(\d+) tokens", stats).group(1))
    assert 0 < done <= 64 - n and "first token" in stats, stats
    assert 0 < tokens_per_s(stats) < 1e5, stats
    assert not is_error2 and text2 and len(held) == 1, stats2
    done2 = int(re.match(r"(\d+) tokens", stats2).group(1))
    assert 0 < tokens_per_s(stats2) <= done2 / held[0] * 1.01, (stats2, held)  # 1%: the page rounds to 0.1


def test_stalled_and_aborted_uploads_do_not_hold_or_flood_the_server(plain, tmp_path):
    """200 requests whose bodies stall half-sent and 200 uploads aborted mid-body: a normal request
    is still served within 2 s, each stalled one gets a 408 after --body_timeout, the server's
    open sockets return to what they were, and stderr stays quiet (no traceback per abort)."""
    import socket

    s = Server(plain[1], tmp_path / "serve.log", "--body_timeout", "1")
    try:
        host, port = s.url.split("//")[1].split(":")
        fds = lambda: len(os.listdir(f"/proc/{s.proc.pid}/fd"))  # noqa: E731
        s.post({"prompt": "Hi", "max_tokens": 1})
        baseline = fds()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\n\r\n").encode() + b'{"prompt": "Hel'
        stalled = []
        for _ in range(200):
            c = socket.create_connection((host, int(port)))
            c.sendall(head)
            stalled.append(c)
        for _ in range(200):
            c = socket.create_connection((host, int(port)))
            c.sendall(head)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
            c.close()
        t0 = time.monotonic()
        assert s.post({"prompt": "Hi", "max_tokens": 2}, timeout=10).status_code == 200
        assert time.monotonic() - t0 < 2.0
        answers = []
        for c in stalled:
            c.settimeout(10)
            answers.append(c.recv(100))
            c.close()
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:20] for a in answers}
        deadline = time.monotonic() + 10
        while fds() > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fds() <= baseline + 2, (fds(), baseline)
    finally:
        s.stop()
    lines = open(s.log_path).read().splitlines()
    assert len(lines) < 50 and not any("Traceback" in ln for ln in lines), "\n".join(lines[-60:])


def test_a_prompt_too_long_is_refused_before_it_is_tokenized(monkeypatch):
    """More characters than --max_prompt_tokens tokens can hold: 413 without tokenizing it (a megabyte
    of digits takes about a second). The bound never refuses a prompt that fits: no token is longer
    than openai_api.TOKEN_BYTES bytes, and a 64-token prompt of the longest ones is taken."""
    enc, limits = get_tokenizer(), openai_api.Limits(max_prompt_tokens=64)
    lengths = [len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)]
    assert max(lengths) == openai_api.TOKEN_BYTES and all(len(t) <= openai_api.TOKEN_BYTES for t in ("<|im_start|>", "<|im_end|>"))
    seen = []

    class Spy:  # the tokenizer, noting the length of each text it is given
        n_vocab = enc.n_vocab

        def encode(self, text, **kw):
            seen.append(len(text))
            return enc.encode(text, **kw)

    parse = lambda body: openai_api.parse_request(json.dumps(body), Spy(), 1024, limits)  # noqa: E731
    for prompt in ["7" * (64 * 128 + 1), ["Hi", "7" * 1_000_000]]:
        with pytest.raises(APIError) as e:
            parse({"prompt": prompt, "max_tokens": 1})
        assert e.value.status == 413 and e.value.body["error"]["code"] == "prompt_too_long"
    assert max(seen) == 2, seen  # "Hi" only
    longest = enc.decode_single_token_bytes(lengths.index(128)).decode("utf-8") * 64
    assert len(enc.encode(longest)) == 64 and len(longest.encode()) == 64 * 128  # premise: 64 tokens of 128 bytes
    assert parse({"prompt": longest, "max_tokens": 1}).prompts == [enc.encode(longest)]
    monkeypatch.setattr(chat, "render", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(APIError) as e:
        openai_api.parse_chat_request(json.dumps({"messages": [{"role": "user", "content": "7" * 5000}] * 2}), 1024, limits)
    assert e.value.status == 413 and e.value.body["error"]["param"] == "messages"


def test_tokenizing_does_not_hold_up_the_server(server):
    """Two clients have a megabyte of digits counted by /tokenize at once (about a second of
    tokenizing each): meanwhile /health answers within 0.5 s (tokenizing runs in a thread, not on
    the event loop)."""
    import random

    prompt = "".join(random.Random(0).choices("0123456789", k=1_000_000))
    counts = []

    def count():
        counts.append(httpx.post(server.url + "/tokenize", json={"prompt": prompt}, timeout=60).json()["count"])

    clients = [threading.Thread(target=count) for _ in range(2)]
    for t in clients:
        t.start()
    waits = []
    while any(t.is_alive() for t in clients):
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    assert counts[0] == counts[1] and 250_000 < counts[0] < 1_000_000, counts  # (test_tokenize_counts_... checks counts)
    assert len(waits) >= 3 and max(waits) < 0.5, waits


def test_half_sent_requests_and_huge_prompts_do_not_stall_the_server(plain, tmp_path):
    """Under a limit of 1024 open files: 1,100 connections each send one byte of a request head and
    wait, and 8 clients post 1 MB prompts in a loop (413: too long). /health answers in under 2 s
    throughout; every half-sent request is closed within --header_timeout, and the server's open
    files return to what they were."""
    import random
    import resource
    import socket

    def fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    s = Server(plain[1], tmp_path / "serve.log", "--header_timeout", "4", preexec_fn=fd_limit)
    host, port = s.url.split("//")[1].split(":")
    fds = lambda: len(os.listdir(f"/proc/{s.proc.pid}/fd"))  # noqa: E731
    body = json.dumps({"prompt": "".join(random.Random(0).choices("0123456789", k=1_000_000)), "max_tokens": 1})
    stop, answers = threading.Event(), []

    def flood():
        with httpx.Client(timeout=60, headers={"Content-Type": "application/json"}) as c:
            while not stop.is_set():
                try:
                    answers.append(c.post(s.url + "/v1/completions", content=body).status_code)
                except httpx.TransportError:  # its idle connection was closed for a waiting one
                    answers.append("closed")

    floods = [threading.Thread(target=flood) for _ in range(8)]
    held = []
    try:
        assert s.post({"prompt": "Hi", "max_tokens": 1}).status_code == 200
        baseline = fds()
        for t in floods:
            t.start()
        for _ in range(1100):
            held.append(socket.create_connection((host, int(port)), timeout=10))
            held[-1].sendall(b"P")
        opened, waits = time.monotonic(), []
        while time.monotonic() < opened + 3:  # while most are still held (--header_timeout 4)
            t0 = time.monotonic()
            assert httpx.get(s.url + "/health", timeout=30).status_code == 200
            waits.append(time.monotonic() - t0)
            time.sleep(0.1)
        stop.set()
        for t in floods:
            t.join(60)
        assert max(waits) < 2, waits
        assert set(answers) - {"closed"} == {413}, answers
        for c in held:  # closed: to make room for another, or at --header_timeout
            c.settimeout(max(0.1, opened + 4 + 3 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(1) == b""
        deadline = time.monotonic() + 10
        while fds() > baseline + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert fds() <= baseline + 2, (fds(), baseline)
        assert s.post({"prompt": "Hi", "max_tokens": 2}).status_code == 200
    finally:
        stop.set()
        for c in held:
            c.close()
        s.stop()
    lines = open(s.log_path).read().splitlines()
    assert not any("Traceback" in ln or "Too many open files" in ln for ln in lines), "\n".join(lines[-40:])


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_requests_get_4xx_never_500(request, endpoint):
    """Bodies built from the declared OpenAPI schema's fields with any JSON values (and any JSON
    at all): never a 500, the server keeps serving, its memory stays flat. Bounded: 150 examples."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    chat_endpoint = endpoint == "/v1/chat/completions"
    server = request.getfixturevalue("chat_server" if chat_endpoint else "limited")
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    schema = spec["paths"][endpoint]["post"]["requestBody"]["content"]["application/json"]["schema"]
    key = "messages" if chat_endpoint else "prompt"  # the required field
    assert schema["required"] == [key] and "max_tokens" in schema["properties"]
    ok = {"messages": CHATS[0], "max_tokens": 8} if chat_endpoint else {"prompt": "Hello there", "max_tokens": 8}
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
               | st.integers(min_value=-2, max_value=8)
               | st.sampled_from(["Hi", "", "<|endoftext|>", "<|im_end|>", "\x00", "😀", "user", "assistant"]))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=3),
                          max_leaves=12)

    def valid(sch):  # values of the declared type (small ones, so that requests stay quick)
        if "anyOf" in sch:
            return st.one_of([valid(x) for x in sch["anyOf"]])
        if "enum" in sch or "const" in sch:
            return st.sampled_from(sch.get("enum") or [sch["const"]])
        t = sch.get("type")
        if t == "integer":
            return st.integers(min_value=sch.get("minimum", -3), max_value=sch.get("minimum", 0) + 6)
        if t == "number":
            return st.floats(min_value=sch.get("minimum", 0), max_value=sch.get("maximum", 2))
        if t == "string":
            return st.text(max_size=12)
        if t == "boolean":
            return st.booleans()
        if t == "array":
            return st.lists(valid(sch["items"]), min_size=sch.get("minItems", 0), max_size=3)
        props, required = sch.get("properties", {}), sch.get("required", [])
        return st.fixed_dictionaries({k: valid(props[k]) for k in required},
                                     optional={k: valid(v) | values for k, v in props.items() if k not in required})

    props = schema["properties"]

    def one_field_off(bad):  # every field of the declared type but one, which gets any JSON value
        return st.fixed_dictionaries({bad: values, **({} if bad == key else {key: valid(props[key])})},
                                     optional={k: valid(v) for k, v in props.items() if k not in (bad, key)})

    bodies = st.sampled_from(sorted(props)).flatmap(one_field_off) | values | st.fixed_dictionaries(
        {key: valid(props[key]) | values}, optional={k: valid(v) | values for k, v in props.items() if k != key})
    rss = lambda: int(next(ln.split()[1] for ln in open(f"/proc/{server.proc.pid}/status") if ln.startswith("VmRSS")))  # noqa: E731
    for _ in range(20):  # warm up allocations before the baseline
        server.post(ok, path=endpoint)
    before = rss()
    statuses = set()

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=bodies)
    def post(body):
        r = server.post(body, timeout=60, path=endpoint)
        statuses.add(r.status_code)
        assert r.status_code < 500, (body, r.text)

    post()
    assert statuses & {400, 413} and server.post(ok, path=endpoint).status_code == 200
    assert rss() - before < 64 * 1024, (before, rss())  # kB


def test_the_gpu_decode_script_runs_on_a_cpu():
    """tests/gpu_decode.sh (issue #17's GPU figures) is run rarely, on borrowed GPU minutes: DRY=1 runs
    the same steps here with a tiny model, so a renamed flag or a broken table shows in CI first."""
    env = dict(os.environ, DRY="1", PY=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "tests/gpu_decode.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "FAILED" not in out, out[-3000:]
    for b in (1, 4):
        assert re.search(rf"batch {b}, .*greedy tokens the static path shares with the dynamic one: 1\.0000", out), out
        for ref in ("ours dynamic", "transformers generate", "ours no cache"):
            assert re.search(rf"batch {b}, .*static \(tok/s\) .*x  {ref}\n", out), (b, ref, out)
        assert re.search(rf"serve: {b} streaming clients, .*total tok/s.*x  the same requests one at a time", out), out
        assert re.search(rf"serve: {b} streaming clients, time to first token", out), out
