"""Each OpenAI endpoint in vLLM's terms (deployments/endpoints.py): every endpoint of the contract has its entry, and
the Responses API's announcements go out with the engine's first output."""

from __future__ import annotations

import json
from types import SimpleNamespace

from deployments.endpoints import ENDPOINTS
from deployments.interface import ENDPOINT_NAMES


def test_each_endpoint_maps_to_vllm() -> None:
    assert set(ENDPOINTS) == set(ENDPOINT_NAMES)


def test_responses_announcements_go_out_with_the_engines_first_output() -> None:
    """vLLM sends response.created and response.in_progress before its engine made anything; they become part of
    the first chunk, so the first chunk (TTFT, the first-token timeout, retries) is the engine's first output."""
    import asyncio

    from deployments.endpoints import typed_events

    class Event(SimpleNamespace):
        def model_dump_json(self, **_: object) -> str:
            return json.dumps({"type": self.type})

    closed = []

    async def vllm_events():
        try:
            for kind in ("response.created", "response.in_progress", "response.output_item.added",
                         "response.output_text.delta", "response.completed"):
                yield Event(type=kind)
        finally:
            closed.append(True)

    async def collect() -> list[str]:
        return [chunk async for chunk in typed_events(vllm_events())]

    chunks = asyncio.run(collect())
    assert [chunk.count("event: ") for chunk in chunks] == [3, 1, 1]
    assert chunks[0].startswith('event: response.created\ndata: {"type": "response.created"}\n\n')
    assert chunks[0].endswith("event: response.output_item.added\n" 'data: {"type": "response.output_item.added"}\n\n')
    assert closed == [True]
