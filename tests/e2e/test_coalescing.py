"""Several tokens in one SSE event are exactly the tokens they replace.

The relay has no timer: an event leaves as soon as vLLM makes it, and when the replica's loop falls behind the
engine, vLLM's per-request output collector merges what was made meanwhile into one output, from which vLLM's
serving layer builds one event (see ``VLLMEngine._stream``). These tests prove that merge, and the replica code
around it (token counting, the tool-call finish fix), lose nothing: one greedy request is read twice by the
replica's own ``_serve`` on a real engine and its stream channel, once promptly and once through a channel whose
every write takes 0.25 s longer (a congested connection: the replica falls behind the engine), and both readings
reassemble to the same text, logprobs, tool calls, finish reason and usage. That one stream is not
held back waiting for company is ``test_e2e.test_stream_is_not_buffered``.

The engine runs in a Ray task on the shared test cluster (the replica class needs a Ray worker), serving the tiny
model that ``make bench`` uses (fast, deterministic under greedy decoding).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.e2e.harness import ROOT, Cluster

pytestmark = pytest.mark.e2e

# Long enough that a tiny model's engine makes several tokens while the reader pauses.
READER_PAUSE_S = 0.25
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Lyon", "Paris", "Nice"]}},
                   "required": ["city"], "additionalProperties": False}}}
BASE = {"messages": [{"role": "user", "content": "Write about lighthouses and the sea."}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
REQUESTS = {
    "text with logprobs": {**BASE, "logprobs": True, "top_logprobs": 2},
    "named tool call": {**BASE, "tools": [TOOL], "ignore_eos": False,
                        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}


def read_twice(model: dict[str, Any], bodies: dict[str, dict], pause_s: float) -> dict[str, tuple]:
    """In a Ray task: each body through one real engine, read promptly, then read slowly."""
    import asyncio

    return asyncio.run(_read_twice(model, bodies, pause_s))


async def _read_twice(model: dict[str, Any], bodies: dict[str, dict], pause_s: float) -> dict[str, tuple]:
    from deployments.config import ModelConfig
    from deployments.engine import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    await engine.__init__(ModelConfig.model_validate(model))  # as Serve builds a replica with an async __init__
    try:
        return {name: (await _read(engine, body, 0.0), await _read(engine, body, pause_s))
                for name, body in bodies.items()}
    finally:
        engine.engine.shutdown()


async def _read(engine: Any, body: dict, write_pause_s: float) -> tuple[str, tuple[int, int]]:
    """One request through the replica's ``_serve`` as a router reads it: the first event on the call, the rest on
    the stream's channel, each with the counts so far. With ``write_pause_s``, every write to the channel takes that
    much longer (a congested connection), so the replica falls behind the engine and vLLM's collector merges."""
    import asyncio

    import deployments.engine as engine_module
    from deployments.replies import Chunk
    from router.channel_client import ChannelClient

    write = engine_module.write_event

    async def slow_write(*args: Any) -> None:
        await write(*args)
        await asyncio.sleep(write_pause_s)

    items: list = []
    offered: asyncio.Future = asyncio.get_running_loop().create_future()

    async def serve() -> None:  # Serve runs a replica's generator on its own, whoever reads the channel
        async for item in engine._serve("chat", body):
            items.append(item)
            if isinstance(item, Chunk) and item.channel and not offered.done():
                offered.set_result(item.channel)
        if not offered.done():
            offered.set_result(None)

    engine_module.write_event = slow_write if write_pause_s else write
    try:
        serving = asyncio.create_task(serve())
        texts = []
        url = await offered
        client = ChannelClient()
        channel = await client.open(url)
        while text := await channel.read():
            texts.append(text.decode())
        await client.close()
        await serving
    finally:
        engine_module.write_event = write
    chunks = [item for item in items if isinstance(item, Chunk)]
    assert len(chunks) == 1  # the first event; everything after it came on the channel, and the call ended empty
    # What the router counts: the channel's counts.
    counted = channel.prompt_tokens, channel.completion_tokens
    return chunks[0].data + "".join(texts), counted


def reassemble(reading: tuple[str, tuple[int, int]]) -> dict[str, Any]:
    """What a client rebuilds from a stream, and how many content events carried it."""
    sse, counted = reading
    text, logprobs, finish, usage, calls, events = "", [], None, None, {}, 0
    for line in sse.split("\n\n"):
        if not line.startswith("data: {"):
            continue
        event = json.loads(line.removeprefix("data: "))
        assert "error" not in event, event
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            delta = choice["delta"]
            if delta.get("content") or delta.get("tool_calls"):
                events += 1
            text += delta.get("content") or ""
            logprobs += (choice.get("logprobs") or {}).get("content") or []
            for call in delta.get("tool_calls") or ():
                slot = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                slot["name"] += (call.get("function") or {}).get("name") or ""
                slot["arguments"] += (call.get("function") or {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"text": text, "logprobs": logprobs, "finish": finish, "usage": usage, "calls": calls, "events": events,
            "counted": counted}


@pytest.fixture(scope="module")
def readings(cluster: Cluster) -> dict[str, tuple[dict, dict]]:
    import ray

    from tests.e2e.harness import model_entry

    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    model = model_entry(document, "smollm2-tiny")
    # Prefix caching off: the second reading must compute exactly what the first did.
    model["engine_args"] = {**model["engine_args"], "enable_prefix_caching": False}
    cluster.connect()
    env = {"PYTHONPATH": str(ROOT), "VLLM_TARGET_DEVICE": "cpu"}
    reader = ray.remote(num_cpus=0, runtime_env={"env_vars": env})(read_twice)
    raw = ray.get(reader.remote(model, REQUESTS, READER_PAUSE_S), timeout=600)
    return {name: (reassemble(prompt), reassemble(lagging)) for name, (prompt, lagging) in raw.items()}


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_merged_events_reassemble_to_the_same_stream(readings: dict, request_name: str) -> None:
    prompt, lagging = readings[request_name]
    completion = prompt["usage"]["completion_tokens"]
    assert completion >= 4
    # The slow reader really got merged events (else this test would prove nothing) ...
    assert lagging["events"] <= completion // 2, (lagging["events"], completion)
    # ... and rebuilt exactly what the prompt reader did.
    for field in ("text", "finish", "usage", "calls"):
        assert lagging[field] == prompt[field], field
    assert [(p["token"], p["logprob"], p["top_logprobs"]) for p in lagging["logprobs"]] == \
        [(p["token"], p["logprob"], p["top_logprobs"]) for p in prompt["logprobs"]]
    # The replica's own count (what the token metrics and limits use) agrees with usage for both readings.
    for reading in (prompt, lagging):
        assert reading["counted"] == (reading["usage"]["prompt_tokens"], reading["usage"]["completion_tokens"])


def test_logprobs_cover_every_token(readings: dict) -> None:
    prompt, lagging = readings["text with logprobs"]
    assert len(lagging["logprobs"]) == len(prompt["logprobs"]) == prompt["usage"]["completion_tokens"]


def test_tool_call_deltas_merge_into_the_same_call(readings: dict) -> None:
    """The random-weight model pads its JSON with whitespace until max_tokens, so this call ends by length; the
    finish fix for a merged tool-call event is tests/test_replies.py's."""
    prompt, lagging = readings["named tool call"]
    (call,) = prompt["calls"].values()
    assert call["name"] == "get_weather" and call["arguments"].startswith("{")
    assert lagging["calls"] == prompt["calls"]
