"""One request's response: each completion's tokens decoded into text with stop strings cut off (`Choice`), and
the events of its jobs turned into an OpenAI response, whole or streamed (`Run`), with the prompt echoed and
log-probabilities where a completions request asks (`echo`, `logprobs`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from tinylora.serve.protocol import APIError
from tinylora.serve.worker import Job, QueueFull


@dataclass
class Prompt:
    """One prompt of a request: its token ids and, for `echo`, its text and where each token starts in it."""
    ids: list[int]
    text: str = ""
    offsets: list[int] | None = None


def decode_offsets(tokenizer, ids: list[int], skip_special_tokens: bool) -> tuple[list[int], str]:
    """Where each token's text starts in the text of `ids` decoded incrementally (as `Choice` decodes: a few
    tokens of context at a time; a token that ends half a character adds nothing, the next one adds it), and
    that text."""
    offsets, text, prefix, read = [], "", 0, 0
    for i in range(len(ids)):
        offsets.append(len(text))
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens)
        now = tokenizer.decode(ids[prefix:i + 1], skip_special_tokens=skip_special_tokens)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            text += now[len(before):]
            prefix, read = read, i + 1
    if read < len(ids):  # the end: whatever the last tokens decode to, even half a character
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens)
        text += tokenizer.decode(ids[prefix:], skip_special_tokens=skip_special_tokens)[len(before):]
    return offsets, text


class Choice:
    """One completion's tokens → text, decoded incrementally (each token costs a decode of a few tokens, not
    of the whole completion), with stop strings cut off, and streaming held back where a stop string or an
    unfinished UTF-8 character could still change the end."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.text, self.sent, self.finish = "", 0, None
        self.prefix = self.read = 0  # tokens[prefix:read] are decoded again as context for the next ones

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        """Take one token; True when it completed a stop string (the text is cut before it)."""
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix:self.read])
        now = self._decode(self.tokens[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new yet, or half a character
            return False
        seen = len(self.text)
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        if self.stops:
            start = max(0, seen - max(len(s) for s in self.stops) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.finish = self.text[:min(hits)], "stop"
                return True
        return False

    def close(self) -> None:
        """The row has ended: keep whatever the last tokens decode to, even half a character."""
        if self.finish != "stop" and self.read < len(self.tokens):
            before = self._decode(self.tokens[self.prefix:self.read])
            self.text += self._decode(self.tokens[self.prefix:])[len(before):]
            self.read = len(self.tokens)

    def take(self) -> str:
        """Text not sent yet that can no longer change."""
        end = len(self.text)
        if self.finish is None:
            end -= max((len(s) - 1 for s in self.stops), default=0)
        delta = self.text[self.sent:max(end, self.sent)]
        self.sent += len(delta)
        return delta


class Run:
    """The events of one request's jobs turned into an OpenAI response (whole, or streamed). `server`: the app's
    Server (its tokenizer decodes, its worker cancels rows and scores tokens). `n` choices per prompt; no jobs:
    nothing is generated (max_tokens=0, echo). `logprobs` (completions): each choice's tokens' log-probabilities
    and the `logprobs` most likely tokens, under the model with adapter `R` at temperature 1."""

    def __init__(self, server, jobs: list[Job], stops: list[str], kind: str, model: str, prompts: list[Prompt],
                 n: int = 1, include_usage: bool = False, echo: bool = False, logprobs: int | None = None, R=None):
        self.server, self.jobs, self.kind, self.model = server, jobs, kind, model
        self.prompts, self.n, self.echo, self.logprobs, self.R = prompts, n, echo, logprobs, R
        self.scoring: dict[tuple, asyncio.Future] = {}  # (prompt, tokens) -> its scores, computed once
        self.choices = [Choice(server.tokenizer, stops) for _ in prompts for _ in range(n)]
        self.open = sum(job.n for job in jobs)
        if not jobs:
            for c in self.choices:
                c.finish = "length"
        self.prompt_tokens = sum(len(p.ids) for p in prompts)  # each prompt counted once, however many choices
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.include_usage = include_usage  # streams end with a chunk of token counts
        self.created = int(time.time())

    def _job_of(self, index: int) -> tuple[Job, int]:
        n = self.jobs[0].n
        return self.jobs[index // n], index % n

    async def next_event(self) -> tuple[int, str | None]:
        """Apply one engine event; returns (choice index, finish reason if that choice just finished)."""
        kind, index, token, info = await self.jobs[0].events.get()
        c = self.choices[index]
        if kind == "error" or info == "error":
            self.open -= 1
            raise APIError(500, "generation failed: " + (info if kind == "error" else "non-finite logits (an adapter "
                           "with extreme values?) or out of memory"), type="server_error")
        if token is not None and c.finish is None and c.add(token):
            job, j = self._job_of(index)
            self.server.worker.cancel_row(job, j, "stop")
        if info is not None:  # the row has left the engine
            self.open -= 1
            c.close()
            c.finish = c.finish or info
            return index, c.finish
        return index, None

    def cancel_open(self) -> None:
        if self.open:
            for job in self.jobs:
                self.server.worker.cancel(job)

    def usage(self) -> dict:
        done = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def head(self) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[self.kind]
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    async def collect(self) -> dict:
        while self.open:
            await self.next_event()
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                        "logprobs": None} for i, c in enumerate(self.choices)]
        else:
            logprobs = [None] * len(self.choices)
            if self.logprobs is not None:
                logprobs = await asyncio.gather(*(self.logprobs_of(i) for i in range(len(self.choices))))
            choices = [{"index": i, "text": self.prompt_text(i) + c.text, "finish_reason": c.finish,
                        "logprobs": lp} for i, (c, lp) in enumerate(zip(self.choices, logprobs))]
        return {**self.head(), "choices": choices, "usage": self.usage()}

    def prompt_text(self, index: int) -> str:
        """What `echo` puts before choice `index`'s text."""
        return self.prompts[index // self.n].text if self.echo else ""

    async def logprobs_of(self, index: int) -> dict:
        """OpenAI's legacy `logprobs` object of choice `index`: its tokens (with echo, the prompt's first) as
        text, their log-probabilities (the first prompt token's null: it has no context), the `logprobs` most
        likely tokens at each position ({token text: log-probability}, the chosen token's always among them),
        and where each token starts in the choice's text."""
        c, p = self.choices[index], self.prompts[index // self.n]
        key = (index // self.n, tuple(c.tokens))  # choices alike (max_tokens=0, greedy) are scored once
        if key not in self.scoring:
            self.scoring[key] = asyncio.ensure_future(self.server.score(
                p.ids, c.tokens, self.R, echo=self.echo, top=self.logprobs, admit=not self.jobs))
        try:  # nothing generated: a request of scoring alone, admitted like any row
            scores = await asyncio.shield(self.scoring[key])
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}", type="rate_limit_error", code="queue_full") from e
        tokens = (p.ids if self.echo else []) + c.tokens
        text = self.server.token_texts(tokens + [t for ids in scores.top_ids for t in ids])
        token_logprobs = ([None] if self.echo else []) + scores.logprobs
        top = [None] if self.echo else []
        first = 1 if self.echo else 0  # tokens[first + j] is the token of scores' j-th position
        for j, (ids, lps) in enumerate(zip(scores.top_ids, scores.top_logprobs)):
            alternatives = {text[t]: lp for t, lp in zip(ids, lps)}
            alternatives.setdefault(text[tokens[first + j]], scores.logprobs[j])
            top.append(alternatives)
        own, _ = decode_offsets(self.server.tokenizer, c.tokens, skip_special_tokens=True)
        start = len(self.prompt_text(index))
        offsets = (p.offsets if self.echo else []) + [start + min(o, len(c.text)) for o in own]
        return {"tokens": [text[t] for t in tokens], "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def chunk(self, index: int, text: str, finish: str | None, first: bool = False) -> str:
        head = {**self.head(), "object": self._chunk_object()}
        if self.kind == "chat":
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    async def stream(self):
        try:
            if self.kind == "chat":
                for i in range(len(self.choices)):
                    yield self.chunk(i, "", None, first=True)
            elif self.echo or not self.jobs:  # the prompt first; with nothing to generate, that is all
                for i, c in enumerate(self.choices):
                    yield self.chunk(i, self.prompt_text(i), None if self.jobs else c.finish)
            while self.open:
                try:
                    index, finish = await self.next_event()
                except APIError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type}})}\n\n"
                    return
                text = self.choices[index].take()
                if text or finish:
                    yield self.chunk(index, text, finish)
            if self.include_usage:
                last = {**self.head(), "object": self._chunk_object(), "choices": [], "usage": self.usage()}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left mid-stream: free its rows
            self.cancel_open()
