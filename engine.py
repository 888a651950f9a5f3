"""
serve.py's engine: one thread that owns the model and runs every request's sequences together
(continuous batching). Requests come in as Jobs (one per HTTP request, n choices = n Sequences);
the engine admits waiting sequences into free rows of its KV caches, prefills them, and runs one
decode step for all rows at a time, each row sampling with its own settings and generator, so a
choice gets the tokens model.generate() would give it alone. Requests of at most one new token
(scoring: lm-eval's echo + logprobs) go through one padded forward pass over their prompts, no
cache row. Events (text, finish reason, logprobs) go back to the asyncio loop once per step.
"""

import asyncio
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

import chat
import cli
import decode
from decode import StaticDecoder
from model import EOT_TOKEN, sample_next
from model_io import TextStream, get_tokenizer


def token_name(b):
    """A token's bytes as OpenAI names a token in logprobs: its text, or, when they are not whole UTF-8
    characters (a character split across tokens), "bytes:\\xe6\\x97" (so no two tokens share a name)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


class Job:
    """One HTTP request as the engine sees it: the engine delivers (index, text, finish_reason,
    tokens so far) events to its asyncio queue; the handler cancels it when the client leaves."""

    def __init__(self, loop):
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled = False
        self.live = 0  # its sequences still in the engine (set by submit, then under the engine's lock)

    @staticmethod
    def deliver(outbox):  # on the event loop: a step's events, [(job, event), ...]
        for job, event in outbox:
            job.events.put_nowait(event)

    def cancel(self):  # from the event loop
        if not self.cancelled:
            self.cancelled = True
            self.events.put_nowait(None)  # wakes a handler waiting for a token


@dataclass(eq=False)
class Sequence:
    """One choice: a prompt growing token by token in its own row of the KV cache."""
    job: Job
    index: int  # the choice's index in the response
    prompt: list
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator
    text: TextStream
    eos: int = EOT_TOKEN  # the token that ends it (not part of its text): <|endoftext|>, or <|im_end|> for a chat
    logprobs: int = None  # None: no logprobs; else the number of most likely tokens listed with each token's logprob
    echo: bool = False  # with logprobs: its prompt's tokens' logprobs too (the first prompt token's is None)
    pending: list = field(default_factory=list)  # logprob entries not yet sent: (token, logprob, [(token, logprob)])
    tokens: list = field(default_factory=list)  # sampled so far
    length: int = 0  # tokens in its KV-cache row
    finish_reason: str = None
    retired: bool = False  # out of the engine (finished, cancelled or failed)


class Engine:
    """static_cache: decode steps with fixed shapes (a decode.StaticDecoder of the engine's own: the batch
    padded up to a bucket of rows; default: with compile), compile: compiled into a CUDA graph per
    bucket. The same tokens either way."""

    def __init__(self, model, max_batch, max_requests, static_cache=None, compile=False):
        self.model, self.max_batch, self.max_requests = model.eval(), max_batch, max_requests
        self.device = model.transformer.wte.weight.device
        enc = get_tokenizer(chat=chat.is_chat_model(model))  # a chat model's markers are text: "<|im_start|>"
        self.token_bytes = [enc.decode_single_token_bytes(t) for t in range(model.config.vocab_size)]
        self.token_names = [token_name(b) for b in self.token_bytes]
        # a pass over whole prompts (sequences that need no KV-cache row) takes this many tokens, padding included
        self.score_tokens = max_batch * model.config.block_size
        self.decoder = StaticDecoder(model, max_batch, compile) if StaticDecoder.wanted(static_cache, compile) else None
        # Row i of every layer's cache belongs to self.active[i]. Zeroed: the decode step masks the
        # entries past each row's length. The logits exactly as generate() computes them.
        if self.decoder:
            self.caches, self.head_t = self.decoder.caches, self.decoder.head_t
        else:
            self.head_t = decode.decode_head(model)
            self.caches = decode.new_kv_caches(model, max_batch, model.config.block_size, self.device, zeroed=True)
        self.active = []  # engine thread only
        self.waiting = deque()  # guarded by self.lock, as is requests_in_flight
        self.lock = threading.Condition()
        self.requests_in_flight = 0  # jobs with a sequence waiting or decoding (a cancelled one leaves at once)
        self.stats = {"decode_steps": 0, "decoded_tokens": 0, "prefilled_tokens": 0, "score_forwards": 0,
                      "scored_sequences": 0}
        self.closed = False
        self.outbox = []  # this step's (job, event)s, handed to the event loop in one call
        self.ready, self.failed = threading.Event(), None  # set once a compiled decoder is warm
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.failed:
            raise cli.Error(f"compiling the decode step failed: {type(self.failed).__name__}: {self.failed}")

    def close(self):
        """Stop after the current step (at server shutdown, so no torch op is cut off mid-way)."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    def submit(self, job, seqs):
        """Queue a request's sequences; False when max_requests are already in flight."""
        with self.lock:
            if self.requests_in_flight >= self.max_requests:
                return False
            self.requests_in_flight += 1
            job.live = len(seqs)
            self.waiting.extend(seqs)
            self.lock.notify()
        return True

    def cancel(self, job):
        """Cancel a job (on the event loop, when its client leaves): its sequences still waiting for
        a row leave the queue now, so that it no longer counts toward max_requests; running ones
        leave the batch at the next step."""
        job.cancel()
        with self.lock:
            if any(s.job is job for s in self.waiting):
                for s in self.waiting:
                    if s.job is job:
                        self._retire(s)
                self.waiting = deque(s for s in self.waiting if s.job is not job)

    def load(self):
        return {"requests_in_flight": self.requests_in_flight, "running": len(self.active),
                "waiting": len(self.waiting), **self.stats}

    def _loop(self):
        try:  # here, not in __init__: CUDA graphs belong to the thread that records them
            if self.decoder and self.decoder.compiled is not None:
                with torch.no_grad():
                    self.decoder.warm_up()
        except Exception as e:
            traceback.print_exc()
            self.failed = e
            return
        finally:
            self.ready.set()
        while True:
            with self.lock:
                while not self.waiting and not self.active and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                # In the queue's order: sequences of at most one new token (scoring: lm-eval's echo requests)
                # all go in one pass over their prompts, up to score_tokens; the others into free rows.
                admit, score, left, budget = [], [], deque(), self.score_tokens
                for s in self.waiting:
                    if s.max_tokens <= 1 and (len(s.prompt) <= budget or not score):
                        score.append(s)
                        budget -= len(s.prompt)
                    elif s.max_tokens > 1 and len(self.active) + len(admit) < self.max_batch:
                        admit.append(s)
                    else:
                        left.append(s)
                self.waiting = left
            try:
                with torch.no_grad():
                    self._score(score)
                    self._step(admit)
            except Exception:  # a bug or out of memory: fail what was running, keep serving
                traceback.print_exc()
                for s in [s for s in set(self.active + admit + score) if not s.retired]:
                    self.outbox.append((s.job, (s.index, "", "error", len(s.tokens), None)))
                    self._retire(s)
                self.active = []
            if self.outbox:  # one wake-up of the event loop per step, not one per token
                try:
                    self.outbox[0][0].loop.call_soon_threadsafe(Job.deliver, self.outbox)
                except RuntimeError:  # the event loop has closed: the server is shutting down
                    pass
                self.outbox = []

    def _step(self, admit):
        self._remove([i for i, s in enumerate(self.active) if s.job.cancelled])
        for s in admit:
            if s.job.cancelled:
                self._retire(s)
        # Prefill the newcomers into the next free rows, those of equal prompt length together.
        by_length = {}
        for s in admit:
            if not s.job.cancelled:
                by_length.setdefault(len(s.prompt), []).append(s)
        for length, group in by_length.items():
            r = len(self.active)
            self.active += group
            rows = [(k[r : r + len(group)], v[r : r + len(group)]) for k, v in self.caches]
            idx = torch.tensor([s.prompt for s in group], device=self.device)
            h = self.model.hidden(idx, rows, 0)
            logits = (h[:, -1] @ self.head_t).float()  # decode.next_logits'
            self._prompt_logprobs([(s, h[i]) for i, s in enumerate(group)])
            self.stats["prefilled_tokens"] += idx.numel()
            for s in group:
                s.length = length
            self._sample(group, logits)
        self._remove([i for i, s in enumerate(self.active) if s.finish_reason])
        if not self.active:
            return
        # One decode step for everyone: row i feeds its last token at its own position.
        B = len(self.active)
        tokens = torch.tensor([[s.tokens[-1]] for s in self.active], device=self.device)
        pos = torch.tensor([s.length for s in self.active], device=self.device)
        if self.decoder:
            logits = self.decoder.step(tokens[:, 0], pos)
        else:
            logits = decode.next_logits(self.model, tokens, [(k[:B], v[:B]) for k, v in self.caches], pos, self.head_t)
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += B
        for s in self.active:
            s.length += 1
        self._sample(self.active, logits)
        self._remove([i for i, s in enumerate(self.active) if s.finish_reason])

    def _score(self, seqs):
        """Sequences that need one pass over their prompt and no KV-cache row (max_tokens 0 or 1: what
        lm-eval's scoring requests ask): sorted by length, as few padded forward passes as fit
        score_tokens each (right padding: causal attention keeps it out of every real position). Each
        gets its prompt's logprobs (echo) and its one token, sampled from its last position's logits."""
        seqs = sorted((s for s in seqs if not self._dropped(s)), key=lambda s: len(s.prompt))
        while seqs:
            B = 1
            while B < len(seqs) and (B + 1) * len(seqs[B].prompt) <= self.score_tokens:
                B += 1
            chunk, seqs = seqs[:B], seqs[B:]
            lengths = [len(s.prompt) for s in chunk]
            idx = torch.zeros(B, lengths[-1], dtype=torch.long)
            for r, s in enumerate(chunk):
                idx[r, : lengths[r]] = torch.tensor(s.prompt)
            h = self.model.hidden(idx.to(self.device))
            self.stats["score_forwards"] += 1
            self.stats["scored_sequences"] += B
            self._prompt_logprobs([(s, h[r, : lengths[r]]) for r, s in enumerate(chunk)])
            rows = [r for r, s in enumerate(chunk) if s.max_tokens == 1]
            if rows:
                at = torch.tensor([[r, lengths[r] - 1] for r in rows], device=self.device)
                logits = (h[at[:, 0], at[:, 1]] @ self.head_t).float()  # decode.next_logits'
                self._sample([chunk[r] for r in rows], logits)
            for s in chunk:
                if s.max_tokens == 0:  # echo only: the prompt's logprobs, no token
                    s.finish_reason = "length"
                    entries = s.pending if s.logprobs is not None else None
                    self.outbox.append((s.job, (s.index, "", "length", 0, entries)))
                self._retire(s)

    def _dropped(self, s):
        if s.job.cancelled:
            self._retire(s)
        return s.job.cancelled

    def _prompt_logprobs(self, pairs):
        """[(sequence, its prompt's hidden states (T, C))]: for those with echo and logprobs, each prompt
        token's logprob and the most likely tokens at its position, into pending (the first token's: None)."""
        pairs = [(s, h) for s, h in pairs if s.echo and s.logprobs is not None]
        if not pairs:
            return
        h = torch.cat([h[:-1] for _, h in pairs])  # position t predicts prompt token t + 1
        targets = [t for s, _ in pairs for t in s.prompt[1:]]
        entries = self._entries(h, targets, max(s.logprobs for s, _ in pairs))
        i = 0
        for s, _ in pairs:
            n = len(s.prompt) - 1
            s.pending = [(s.prompt[0], None, None)] + [(t, lp, top[: s.logprobs]) for t, (lp, top) in
                                                       zip(s.prompt[1:], entries[i : i + n])]
            i += n

    def _entries(self, x, targets, k, logits=False, rows=1024):
        """Hidden states x (N, C) (or logits, fp32) and the token that came after each -> [(its logprob,
        [(token, logprob)] of the k most likely)]: log-softmax in fp32 over the real vocabulary (head_t has
        no padding rows), in chunks of rows (a row of logits is 200 kB)."""
        out = []
        for i in range(0, len(targets), rows):
            z = x[i : i + rows] if logits else (x[i : i + rows] @ self.head_t).float()  # (a copy either way)
            t = torch.tensor(targets[i : i + rows], device=z.device)[:, None]
            z_t = z.gather(1, t)
            top, ids = torch.topk(z, k, dim=-1) if k > 1 else z.max(dim=-1, keepdim=True)
            # logsumexp in place (z is not needed after): one (rows, vocab) pass fewer, no second buffer
            lse = top[:, :1] + z.sub_(top[:, :1]).exp_().sum(dim=-1, keepdim=True).log_()
            lp = (z_t - lse).clamp_(min=-9999.0)[:, 0].tolist()  # (JSON has no -inf; OpenAI's floor)
            if k:
                top_lp = (top - lse).clamp_(min=-9999.0).tolist()
                out += [(a, list(zip(b, c))) for a, b, c in zip(lp, ids.tolist(), top_lp)]
            else:
                out += [(a, []) for a in lp]
        return out

    def _sample(self, seqs, logits):
        """Each sequence's next token from its row of logits (B, vocab): the rows with the same
        settings in one sample_next call, each drawing from its own generator exactly what
        generate() would draw for it alone. With logprobs: the token's, from these logits."""
        groups, tokens = {}, [None] * len(seqs)
        for i, s in enumerate(seqs):
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in groups.items():
            sampled = sample_next(logits if len(groups) == 1 else logits[rows], temperature, top_k, top_p,
                                  [seqs[i].generator for i in rows])
            for i, token in zip(rows, sampled.tolist()):
                tokens[i] = token
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        if rows:
            entries = self._entries(logits[rows], [tokens[i] for i in rows], max(seqs[i].logprobs for i in rows), True)
            for i, (lp, top) in zip(rows, entries):
                seqs[i].pending.append((tokens[i], lp, top[: seqs[i].logprobs]))
        for s, token in zip(seqs, tokens):
            self._add_token(s, token)

    def _add_token(self, s, token):
        s.tokens.append(token)
        last = token == s.eos or len(s.tokens) == s.max_tokens
        text, stopped = s.text.push(b"" if token == s.eos else self.token_bytes[token], final=last)
        s.finish_reason = "stop" if stopped or token == s.eos else "length" if last else None
        entries = None
        if s.logprobs is not None:
            entries, s.pending = s.pending, []
        self.outbox.append((s.job, (s.index, text, s.finish_reason, len(s.tokens), entries)))

    def _remove(self, rows):
        """Take these rows out of the batch, moving the last rows' caches into the gaps so the
        active sequences always fill rows 0..B-1."""
        for i in sorted(rows, reverse=True):  # from the end, so a moved row is never one to remove
            s, last = self.active[i], len(self.active) - 1
            if i != last:
                moved = self.active[last]
                for k, v in self.caches:
                    k[i, :, : moved.length] = k[last, :, : moved.length]
                    v[i, :, : moved.length] = v[last, :, : moved.length]
                self.active[i] = moved
            self.active.pop()
            self._retire(s)

    def _retire(self, s):
        with self.lock:  # the engine thread retires the sequences it took, cancel() those still waiting
            if s.retired:
                return
            s.retired = True
            s.job.live -= 1
            if s.job.live == 0:
                self.requests_in_flight -= 1
