"""What each OpenAI endpoint is in vLLM's terms, and how its replies are read on the way out.

Kept apart from the replica (:mod:`deployments.engine`) because it is data about vLLM's serving layer, not
serving: which request model validates a body, which of the objects ``init_app_state`` builds answers it, and how
its stream becomes SSE text. It imports nothing of vLLM until a replica first validates a request: the processes
that only deploy the replica class, or test it, never load vLLM (or torch).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

# Events vLLM sends before its engine has made anything: they announce the response.
ANNOUNCEMENTS = ("response.created", "response.in_progress")


async def typed_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Responses API events as vLLM's own route sends them: each names its type (``event: response.created``).

    vLLM announces a response before its engine has made anything; the announcements go out with the first event
    after them. So a stream's first chunk is the engine's first output, as on every other endpoint: the first-token
    timeout bounds the wait for it, TTFT measures it, and a replica that fails before it has the request retried."""
    held = ""
    try:
        async for event in events:
            text = f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
            if event.type in ANNOUNCEMENTS:
                held += text
                continue
            yield held + text
            held = ""
        if held:
            yield held
    finally:
        await events.aclose()  # closing vLLM's generator aborts the engine request if it is still running


def _text_events(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Chat and text completions: vLLM's serving layer already streams SSE text."""
    return events


def token_usage(response: Any) -> tuple[int, int]:
    """A finished response's (prompt, completion) tokens; the Responses API calls them input and output."""
    usage = response.usage
    if usage is None:
        return 0, 0
    if hasattr(usage, "input_tokens"):
        return usage.input_tokens, usage.output_tokens or 0
    return usage.prompt_tokens, usage.completion_tokens or 0


@dataclass
class Endpoint:
    """How one OpenAI endpoint maps onto vLLM: its request model and the serving object that answers it."""

    request_class: str  # "module:Class", imported in the replica only
    serving_attribute: str  # the attribute init_app_state sets on its state
    call: Callable[[Any, Any], Any]  # (serving object, request) → awaitable result
    prompt_param: str  # the parameter that holds the prompt, named when it is too long
    what: str  # what the endpoint makes, for "model X does not support ..."
    # A stream's events as SSE text: chat and text completions stream text already; Responses streams objects.
    sse: Callable[[AsyncIterator[Any]], AsyncIterator[str]] = _text_events

    @functools.cached_property
    def request_adapter(self) -> Any:
        """Validates a body into vLLM's request type (a model, or a union of them for embeddings)."""
        import importlib

        from pydantic import TypeAdapter

        module, _, name = self.request_class.partition(":")
        return TypeAdapter(getattr(importlib.import_module(module), name))


ENDPOINTS = {
    "chat": Endpoint("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                     "openai_serving_chat", lambda serving, request: serving.create_chat_completion(request),
                     "messages", "chat completions"),
    "completions": Endpoint("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                            "openai_serving_completion", lambda serving, request: serving.create_completion(request),
                            "prompt", "text completions"),
    "embeddings": Endpoint("vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest",
                           "serving_embedding", lambda serving, request: serving(request), "input",
                           "embeddings"),
    "responses": Endpoint("vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
                          "openai_serving_responses", lambda serving, request: serving.create_responses(request),
                          "input", "responses", typed_events),
}
