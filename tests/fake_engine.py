"""The real engine replica with vLLM replaced: what the load test (:mod:`tests.scenarios.load`) puts behind the router.

The load test measures the path around the engine: Serve, the router, the Ray hops, and the engine replica's own
code. So this is :class:`deployments.engine.VLLMEngine` itself (request validation by vLLM's own request models,
token counting, stream rewriting, errors, health) with only :meth:`~deployments.engine.VLLMEngine._start_vllm`
replaced: instead of an ``AsyncLLM`` and vLLM's serving objects it starts a model-free engine that makes a token
every ``token_interval_s`` (the first after ``first_token_delay_s``) and serving objects that turn them into
OpenAI-shaped SSE events as vLLM's do. Whatever a client sees beyond that cadence is the path in between (and the
machine's contention).

    serve.deployment(FakeEngine).options(name=engine_deployment_name("fake-model")).bind(model_config, tokens=32)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from deployments.config import ModelConfig
from deployments.engine import VLLMEngine

# Short words, so a token's chunk is the size of a real one and its content is checkable by eye.
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
EMBEDDING_DIMENSIONS = 8


class FakeEngine(VLLMEngine):
    """Streams ``tokens`` tokens per request (or the request's ``max_tokens`` / ``max_completion_tokens``)."""

    async def __init__(self, model: ModelConfig | dict[str, Any], tokens: int = 16, token_interval_s: float = 0.02,
                       first_token_delay_s: float | None = None, prompt_tokens: int = 8) -> None:
        self.tokens = tokens
        self.token_interval_s = token_interval_s
        # A real engine's first token costs a prefill step; by default one more interval, like any other token.
        self.first_token_delay_s = token_interval_s if first_token_delay_s is None else first_token_delay_s
        self.prompt_tokens = prompt_tokens
        await super().__init__(ModelConfig.model_validate(model))

    async def _start_vllm(self, model: ModelConfig) -> tuple[Any, dict[str, Any]]:
        engine = _FakeAsyncLLM(self)
        return engine, {"chat": _FakeServing(engine, "chat.completion"),
                        "completions": _FakeServing(engine, "text_completion"),
                        "embeddings": _FakeEmbedding(self.prompt_tokens), "responses": None}


class _FakeAsyncLLM:
    """The parts of vLLM's ``AsyncLLM`` the replica uses: ``generate`` yields a RequestOutput-shaped delta per
    token at the configured cadence, and reports progress as vLLM's stat logger would (the replica's health)."""

    errored = False

    def __init__(self, replica: FakeEngine):
        self.replica = replica
        self.unfinished = 0

    async def generate(self, count: int) -> AsyncIterator[Any]:
        replica = self.replica
        prompt = list(range(replica.prompt_tokens))
        self.unfinished += 1
        try:
            await asyncio.sleep(replica.first_token_delay_s)
            for i in range(count):
                if i:
                    # Relative to the last token, as a real engine's decode steps follow one another: when this
                    # replica is slow (its event loop busy), tokens come later rather than in a catch-up burst.
                    await asyncio.sleep(replica.token_interval_s)
                replica.progress.record(None, iteration_stats=True)
                yield SimpleNamespace(prompt_token_ids=prompt, encoder_prompt_token_ids=None,
                                      outputs=[SimpleNamespace(token_ids=[i], text=_word(i) if i == 0
                                                               else " " + _word(i))])
        finally:
            self.unfinished -= 1

    def get_num_unfinished_requests(self) -> int:
        return self.unfinished

    async def check_health(self) -> None:
        """A fake engine never dies."""

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return True  # a fake engine caches nothing

    def shutdown(self) -> None:
        pass


class _FakeServing:
    """vLLM's chat or completion serving object, reduced to what it does with the engine's outputs: SSE events
    (usage where ``stream_options`` asks, ``[DONE]`` last) or one finished response."""

    def __init__(self, engine: _FakeAsyncLLM, kind: str):
        self.engine_client = engine
        self.kind = kind

    async def create_chat_completion(self, request: Any) -> Any:
        return await self._create(request)

    async def create_completion(self, request: Any) -> Any:
        return await self._create(request)

    async def _create(self, request: Any) -> Any:
        limit = getattr(request, "max_completion_tokens", None) or request.max_tokens
        count = limit or self.engine_client.replica.tokens
        finish = "length" if limit else "stop"  # a model that stops by itself says "stop"
        chat = self.kind == "chat.completion"
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-fake{uuid.uuid4().hex}"
        outputs = self.engine_client.generate(count)
        if request.stream:
            options = request.stream_options
            return self._events(outputs, request, request_id, count, finish, bool(options and options.include_usage))
        text, prompt = "", 0
        async for output in outputs:
            text += output.outputs[0].text
            prompt = len(output.prompt_token_ids)
        usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
        body = {"id": request_id, "object": self.kind, "created": int(time.time()), "model": request.model,
                "usage": usage}
        if chat:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

            return ChatCompletionResponse.model_validate({**body, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]})
        from vllm.entrypoints.openai.completion.protocol import CompletionResponse

        return CompletionResponse.model_validate({**body, "choices": [
            {"index": 0, "text": text, "finish_reason": finish}]})

    async def _events(self, outputs: AsyncIterator[Any], request: Any, request_id: str, count: int, finish: str,
                      include_usage: bool) -> AsyncIterator[str]:
        chat = self.kind == "chat.completion"
        head = {"id": request_id, "object": f"{self.kind}.chunk" if chat else self.kind,
                "created": int(time.time()), "model": request.model}
        prompt = made = 0
        async for output in outputs:
            text = output.outputs[0].text
            prompt = len(output.prompt_token_ids)
            made += 1
            last = finish if made == count else None
            if chat:
                delta = {"role": "assistant", "content": text} if made == 1 else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": last}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last}
            yield f"data: {json.dumps({**head, 'choices': [choice]}, separators=(',', ':'))}\n\n"
        if include_usage:
            usage = {"prompt_tokens": prompt, "total_tokens": prompt + made, "completion_tokens": made}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage}, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"


class _FakeEmbedding:
    """vLLM's embedding serving object: one finished JSON response."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        inputs = request.input if isinstance(request.input, list) else [request.input]
        data = [{"object": "embedding", "index": i, "embedding": [0.125 * (i + 1)] * EMBEDDING_DIMENSIONS}
                for i in range(len(inputs))]
        tokens = self.prompt_tokens * len(inputs)
        return JSONResponse({"object": "list", "data": data, "model": request.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _word(i: int) -> str:
    return _WORDS[i % len(_WORDS)]
