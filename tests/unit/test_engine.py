"""The engine replica's answers that need no vLLM engine running: a replica built around stand-ins for vLLM's
engine and serving objects (the request is still validated by vLLM's own request model)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel

from deployments.adapters import AdapterLoadError
from deployments.engine import VLLMEngine
from deployments.replies import ENGINE_UNAVAILABLE, Admitted, ErrorReply, FullReply
from deployments.vllm_hooks import EngineProgress

BODY = {"model": "alias", "messages": [{"role": "user", "content": "hi"}]}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Answer(BaseModel):
    """A finished chat response, as vLLM's serving layer returns one."""

    model: str
    usage: Usage


class Models:
    def model_name(self, lora_request: Any = None) -> str:
        return "canonical"


class ChatServing:
    """vLLM's chat serving object, reduced to naming its answer as vLLM's does."""

    def __init__(self) -> None:
        self.models = Models()
        self.engine_client = SimpleNamespace()

    async def create_chat_completion(self, request: Any) -> Answer:
        return Answer(model=self.models.model_name(None), usage=Usage(prompt_tokens=4, completion_tokens=2))


class Adapters:
    async def load(self, name: str) -> str:
        raise AdapterLoadError("no such folder")


def replica(errored: bool = False, adapters: Any = None) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # what __init__ sets, with stand-ins for what _start_vllm makes
    engine.model = SimpleNamespace(id="m", adapters=["pirate"])
    engine.progress = EngineProgress()
    engine.adapters = adapters
    engine.admitted = 0
    engine.kv_feed = None
    engine.engine = SimpleNamespace(errored=errored, get_num_unfinished_requests=lambda: 0, shutdown=lambda: None)
    engine._serving = {"chat": ChatServing(), "completions": None, "embeddings": None, "responses": None}
    return engine


def serve(engine: VLLMEngine, endpoint: str, body: dict[str, Any]) -> list[Any]:
    async def collect() -> list[Any]:
        return [item async for item in engine._serve(endpoint, body)]

    return asyncio.run(collect())


def test_a_dead_engine_answers_before_admitting_so_the_router_can_go_elsewhere() -> None:
    [reply] = serve(replica(errored=True), "chat", BODY)
    assert reply == ErrorReply.server("The engine serving `m` on this replica has stopped.", status=503,
                                      code=ENGINE_UNAVAILABLE)


def test_an_endpoint_the_model_does_not_serve_is_a_400_naming_the_model() -> None:
    admitted, reply = serve(replica(), "embeddings", {"model": "alias", "input": "hi"})
    assert admitted == Admitted()
    assert (reply.status, reply.type, reply.param, reply.code) == (400, "invalid_request_error", "model",
                                                                  "model_not_supported")
    assert reply.message == "The model `alias` does not support embeddings."


def test_an_adapter_that_cannot_load_is_a_500() -> None:
    _, reply = serve(replica(adapters=Adapters()), "chat", {**BODY, "model": "pirate"})
    assert (reply.status, reply.type, reply.code) == (500, "server_error", "adapter_load_failed")


def test_a_finished_answer_names_the_model_as_the_client_did_with_its_usage() -> None:
    engine = replica()
    _, reply = serve(engine, "chat", BODY)
    assert isinstance(reply, FullReply) and (reply.prompt_tokens, reply.completion_tokens) == (4, 2)
    assert json.loads(reply.body)["model"] == "alias"
    # The replica's serving object still answers under vLLM's name: the alias was this request's only.
    assert engine._serving["chat"].models.model_name() == "canonical"


def test_a_stream_is_one_serve_item_after_admitted_and_the_rest_on_its_channel() -> None:
    """Every Serve item costs CPU at both ends, so a stream's events after the first go on its channel; and a stream
    that breaks off after its first event raises on its Serve call, where the router reads it (the channel itself
    only ends)."""
    from deployments.stream_channel import StreamChannel
    from deployments.vllm_hooks import TokenCount
    from router.channel_client import ChannelClient
    from tests.unit.fakes import event

    async def vllm_events(fail: bool):
        for text in "abc":
            yield event(text)
        if fail:
            raise RuntimeError("vLLM's serving layer broke off")

    async def relayed(fail: bool) -> tuple[str, BaseException | None]:
        engine = replica()
        engine.channel = StreamChannel()
        await engine.channel.start("127.0.0.1")
        client = ChannelClient()
        try:
            stream = engine._stream(vllm_events(fail), TokenCount(), fix_tool_calls=False)
            first = await anext(stream)
            rest = asyncio.ensure_future(anext(stream, None))  # the replica writes the rest on the channel
            channel = await client.open(first.channel)
            texts = [first.data]
            while text := await channel.read():
                texts.append(text.decode())
            raised = None
            try:
                assert await rest is None  # no second Serve item
            except RuntimeError as exc:
                raised = exc
            return "".join(texts), raised
        finally:
            await client.close()
            await engine.channel.stop()

    assert asyncio.run(relayed(fail=False)) == (event("a") + event("b") + event("c"), None)
    text, raised = asyncio.run(relayed(fail=True))
    assert text == event("a") + event("b") + event("c") and isinstance(raised, RuntimeError)
