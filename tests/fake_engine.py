"""A model-free engine: answers the router the way :class:`deployments.engine.VLLMEngine` does, without vLLM.

The load test (:mod:`tests.load`) measures what the router and Serve's proxy add to a stream, so the engine under
them must cost next to nothing and keep a known cadence: it waits ``first_token_delay_s`` before the first token and
``token_interval_s`` between tokens, so whatever a client sees beyond that is the path in between (and the machine's
contention). It speaks the engine protocol of :mod:`deployments.replies` (``Admitted`` first, then a finished
body or SSE chunks carrying token usage; it never fails) with OpenAI-shaped payloads, so the router treats it as a
model. It has the real engine's request methods and health check, not its autoscaling stats or ``engine_info``:
deploy it with Serve's default (request-count) autoscaling or none.

    serve.deployment(FakeEngine).options(name=engine_deployment_name("fake-model")).bind(tokens=32)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.replies import Admitted, Chunk, EngineItem, FullReply

DONE = "data: [DONE]\n\n"
# Short words, so a token's chunk is the size of a real one and its content is checkable by eye.
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
EMBEDDING_DIMENSIONS = 8


class FakeEngine:
    """Streams ``tokens`` tokens per request (or the body's ``max_tokens`` / ``max_completion_tokens``)."""

    def __init__(self, tokens: int = 16, token_interval_s: float = 0.02, first_token_delay_s: float | None = None,
                 prompt_tokens: int = 8) -> None:
        self.tokens = tokens
        self.token_interval_s = token_interval_s
        # A real engine's first token costs a prefill step; by default one more interval, like any other token.
        self.first_token_delay_s = token_interval_s if first_token_delay_s is None else first_token_delay_s
        self.prompt_tokens = prompt_tokens

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._generate(body, "chat.completion", _chat_choice):
            yield item

    async def completions(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._generate(body, "text_completion", _text_choice):
            yield item

    async def embeddings(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        yield Admitted()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (i + 1)] * EMBEDDING_DIMENSIONS}
                for i in range(len(inputs))]
        usage = {"prompt_tokens": self.prompt_tokens * len(inputs), "total_tokens": self.prompt_tokens * len(inputs)}
        yield FullReply(json.dumps({"object": "list", "data": data, "model": body["model"], "usage": usage}),
                        usage["prompt_tokens"], 0)

    async def check_health(self) -> None:
        """Serve's health probe, as on the real engine; a fake engine is always healthy."""

    async def _generate(self, body: dict[str, Any], kind: str, choice: Any) -> AsyncIterator[EngineItem]:
        yield Admitted()
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        count = limit or self.tokens
        # A model that stops by itself says "stop"; one cut off at the client's limit says "length".
        finish = "length" if limit else "stop"
        prompt = self.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
        chunk_object = f"{kind}.chunk" if kind.startswith("chat") else kind
        request_id = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-fake{uuid.uuid4().hex}"
        created = int(time.time())

        def event(choices: list[dict[str, Any]], **extra: Any) -> str:
            payload = {"id": request_id, "object": chunk_object, "created": created, "model": body["model"],
                       "choices": choices, **extra}
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        if not body.get("stream"):
            await asyncio.sleep(self.first_token_delay_s + (count - 1) * self.token_interval_s)
            text = " ".join(_word(i) for i in range(count))
            whole = {"id": request_id, "object": kind, "created": created, "model": body["model"],
                     "choices": [choice(text, finish, first=True, whole=True)], "usage": usage}
            yield FullReply(json.dumps(whole), prompt, count)
            return

        await asyncio.sleep(self.first_token_delay_s)
        for i in range(count):
            if i:
                # Relative to the last token, as a real engine's decode steps follow one another: when this replica
                # is slow (its event loop busy), tokens come later rather than in a catch-up burst.
                await asyncio.sleep(self.token_interval_s)
            text = _word(i) if i == 0 else " " + _word(i)
            yield Chunk(event([choice(text, finish if i == count - 1 else None, first=i == 0)]), prompt, i + 1)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            yield Chunk(event([], usage=usage), prompt, count)
        yield Chunk(DONE, prompt, count)


def _word(i: int) -> str:
    return _WORDS[i % len(_WORDS)]


def _chat_choice(text: str, finish: str | None, first: bool, whole: bool = False) -> dict[str, Any]:
    if whole:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(text: str, finish: str | None, first: bool, whole: bool = False) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
