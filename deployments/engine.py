"""The Ray Serve deployment around one vLLM engine: one deployment per configured model.

Everything OpenAI-shaped below the HTTP edge is vLLM's own serving layer (``init_app_state`` builds the same
``OpenAIServingChat``, ``OpenAIServingCompletion`` and ``ServingEmbedding`` that ``vllm serve`` uses: chat
templates, sampling parameters, tool-call and reasoning parsers, structured outputs). This module only adapts it
to a Serve replica:

- a request arrives as the JSON dict the client sent (the router has already checked what OpenAI constrains)
  and is validated by vLLM's own request model;
- the reply is a generator, so the router can start the HTTP response on the first item: an :class:`ErrorReply`
  or a :class:`FullReply` for a finished answer, or SSE ``data:`` lines, each yielded as soon as vLLM makes it;
- the response names the model as the client did (an alias is answered under the alias), and a chat choice that
  returns tool calls says ``finish_reason: "tool_calls"``, which vLLM 0.32 gets wrong for a named tool choice.

When the client goes away the router cancels the Serve call; the cancellation reaches vLLM's generator here,
which aborts the engine request and frees its slot.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from deployments.config import ModelConfig

logger = logging.getLogger("rayroute.engine")


@dataclass(frozen=True)
class ErrorReply:
    """An error to send instead of a response; the router renders the OpenAI envelope."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class FullReply:
    """A complete (non-streaming) response body, already serialized as JSON."""

    body: str


EngineItem = ErrorReply | FullReply | str

# The model name the current request asked for; vLLM's serving layer names responses after it (see __init__).
_requested_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("requested_model", default=None)


@dataclass
class _Endpoint:
    """How one OpenAI endpoint maps onto vLLM: its request model and the serving object that answers it."""

    request_class: str  # "module:Class", imported in the replica only
    serving_attribute: str  # the attribute init_app_state sets on its state
    call: Callable[[Any, Any], Any]  # (serving object, request) → awaitable result
    prompt_param: str  # the parameter that holds the prompt, named when it is too long

    @functools.cached_property
    def request_adapter(self) -> Any:
        """Validates a body into vLLM's request type (a model, or a union of them for embeddings)."""
        import importlib

        from pydantic import TypeAdapter

        module, _, name = self.request_class.partition(":")
        return TypeAdapter(getattr(importlib.import_module(module), name))


ENDPOINTS = {
    "chat": _Endpoint("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                      "openai_serving_chat", lambda serving, request: serving.create_chat_completion(request),
                      "messages"),
    "completions": _Endpoint("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                             "openai_serving_completion", lambda serving, request: serving.create_completion(request),
                             "prompt"),
    "embeddings": _Endpoint("vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest",
                            "serving_embedding", lambda serving, request: serving(request), "input"),
}
_NOT_SUPPORTED = {"chat": "chat completions", "completions": "text completions", "embeddings": "embeddings"}


class VLLMEngine:
    """One replica: a vLLM ``AsyncLLM`` plus vLLM's OpenAI serving objects for it."""

    async def __init__(self, model: ModelConfig) -> None:
        # Imported here: vLLM (and torch) load only in engine replicas, never in the router.
        import ray
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model = model
        frontend_names = set(FrontendArgs.__dataclass_fields__)
        frontend_kwargs = {k: v for k, v in model.engine_args.items() if k in frontend_names}
        engine_kwargs = {k: v for k, v in model.engine_args.items() if k not in frontend_names}
        engine_args = AsyncEngineArgs(
            model=model.resolved_source,
            served_model_name=model.names,
            **model.resources.engine_overrides(),
            **engine_kwargs,
        )
        frontend_args = FrontendArgs(**frontend_kwargs)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        # Tensor-parallel workers go into the bundles this replica's placement group reserved for them.
        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            disable_log_stats=engine_args.disable_log_stats,
        )

        state = State()
        # vLLM's CLI hands init_app_state one flat namespace of front-end and engine arguments; so do we.
        args = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
        await init_app_state(self.engine, state, args, supported_tasks=await self.engine.get_supported_tasks())
        # vLLM names every response after the first served name; answer under the name the client used instead.
        models = state.openai_serving_models
        canonical_name = models.model_name
        models.model_name = lambda lora_request=None: (
            _requested_model.get() if lora_request is None and _requested_model.get() else canonical_name(lora_request)
        )
        self._serving = {name: getattr(state, e.serving_attribute, None) for name, e in ENDPOINTS.items()}
        logger.info("engine for %s ready (source %s)", model.id, model.resolved_source)

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        """A chat completion; see the module docstring for what is yielded."""
        fixer = _ToolCallFinish()
        async for item in self._serve("chat", body):
            yield fixer.fix(item)

    async def completions(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("completions", body):
            yield item

    async def embeddings(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("embeddings", body):
            yield item

    async def _serve(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        from pydantic import BaseModel, ValidationError
        from starlette.responses import Response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMError

        serving = self._serving[endpoint]
        if serving is None:
            yield ErrorReply(400, f"The model `{body.get('model')}` does not support {_NOT_SUPPORTED[endpoint]}.",
                             "invalid_request_error", "model", "model_not_supported")
            return
        _requested_model.set(body.get("model"))
        spec = ENDPOINTS[endpoint]
        request = None
        try:
            request = spec.request_adapter.validate_python(body)
            result = await spec.call(serving, request)
        except ValidationError as exc:  # before ValueError, which it subclasses
            # Raised after the request validated, it is about a message part vLLM checks while rendering.
            yield validation_error(exc.errors(), body, root=None if request is None else "messages")
            return
        except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as exc:
            # What `vllm serve` turns into 4xx (a prompt longer than the context, `tool_choice` without `tools`),
            # raised by vLLM's request validators or its serving layer. Anything else is a real engine failure.
            yield from_vllm_error(serving.create_error_response(exc), spec.prompt_param)
            return
        if isinstance(result, ErrorResponse):
            yield from_vllm_error(result, spec.prompt_param)
        elif isinstance(result, Response):  # the pooling endpoints answer with a finished JSON response
            yield FullReply(bytes(result.body).decode())
        elif isinstance(result, BaseModel):
            yield FullReply(result.model_dump_json())
        else:
            async for chunk in result:
                yield chunk

    async def engine_info(self) -> dict[str, Any]:
        """What the tests and operators ask a replica: its platform and how many requests it is running."""
        from vllm.platforms import current_platform

        return {
            "model": self.model.id,
            "platform": current_platform.device_type,
            "running_requests": self.engine.get_num_unfinished_requests(),
        }

    async def check_health(self) -> None:
        # Serve calls this periodically; raising marks the replica unhealthy so Serve replaces it.
        await self.engine.check_health()


class _ToolCallFinish:
    """Make every chat choice that returned tool calls finish with ``"tool_calls"``, streamed or not.

    vLLM 0.32 reports ``"stop"`` when the tool was forced by name, and an empty string as the content beside the
    calls, where OpenAI sends ``null``. Streams are only parsed where a chunk carries tool calls or a finish reason.
    """

    def __init__(self) -> None:
        self.choices_with_calls: set[int] = set()

    def fix(self, item: EngineItem) -> EngineItem:
        if isinstance(item, FullReply):
            return self._fix_full(item)
        if isinstance(item, str) and ('"tool_calls":[{' in item or '"finish_reason":"stop"' in item):
            return self._fix_chunk(item)
        return item

    def _fix_full(self, item: FullReply) -> FullReply:
        if '"tool_calls":[{' not in item.body:
            return item
        response = json.loads(item.body)
        for choice in response.get("choices", []):
            if choice["message"].get("tool_calls"):
                choice["finish_reason"] = "tool_calls"
                if not choice["message"].get("content"):
                    choice["message"]["content"] = None
        return FullReply(json.dumps(response, separators=(",", ":")))

    def _fix_chunk(self, item: str) -> str:
        if not item.startswith("data: {"):
            return item
        chunk = json.loads(item[len("data: "):])
        changed = False
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("tool_calls"):
                self.choices_with_calls.add(choice["index"])
            if choice.get("finish_reason") == "stop" and choice["index"] in self.choices_with_calls:
                choice["finish_reason"] = "tool_calls"
                changed = True
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n" if changed else item


def validation_error(errors: list[dict[str, Any]], body: Any, root: str | None = None) -> ErrorReply:
    """Pydantic validation errors as a 400 that names the offending parameter, OpenAI style (``messages[0].role``).

    Where a field is a union, pydantic reports one error per member; the error that is not a mere type mismatch
    (``stop`` with five items: "at most 4 items", not "not a string") is the one that says what to fix. Locations
    are read against the body the client sent, so union members' internal names never reach the client. Errors
    raised on a part of the request (vLLM validates content parts while rendering the prompt) are named after
    ``root``, the parameter that part came from.
    """
    specific = [e for e in errors if not e["type"].endswith("_type")]
    first = (specific or errors)[0]
    param = _param_path(first["loc"], body)
    message = first["msg"].removeprefix("Value error, ")
    if root and not param:
        # Drop union members' class names (``ChatCompletionContentPartTextParam``): they mean nothing to a client.
        where = ".".join(str(part) for part in first["loc"] if not str(part)[:1].isupper())
        param, message = root, f"{where}: {message}" if where else message
    if first["type"] == "missing":
        code = "missing_required_parameter"
    else:
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return ErrorReply(400, f"{param}: {message}" if param else message, "invalid_request_error", param or None, code)


def _param_path(loc: tuple[Any, ...], body: Any) -> str:
    """Follow ``loc`` through ``body``, keeping the steps that exist in it (keys, list indexes) and skipping the
    union-member and validator tags pydantic inserts. A missing field, last in ``loc``, is named all the same."""
    path, node = "", body
    for depth, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = f"{path}[{part}]", node[part]
        elif isinstance(node, dict) and isinstance(part, str) and (
            part in node or (depth == len(loc) - 1 and (path or depth == 0))
        ):
            path, node = f"{path}.{part}" if path else part, node.get(part)
    return path


# vLLM's messages for a prompt that does not fit the context; OpenAI answers those with `context_length_exceeded`.
_CONTEXT_LENGTH_MARKERS = ("maximum context length", "context length is")


def from_vllm_error(response: Any, prompt_param: str) -> ErrorReply:
    """vLLM's ``ErrorResponse`` carries the HTTP status as a number in ``code``; OpenAI's code is a string."""
    error = response.error
    status = int(error.code) if isinstance(error.code, int) else HTTPStatus.INTERNAL_SERVER_ERROR
    code = None
    param = error.param
    if status == HTTPStatus.NOT_FOUND:
        kind = "not_found_error"
    elif status < 500:
        kind = "invalid_request_error"
        if any(marker in error.message for marker in _CONTEXT_LENGTH_MARKERS):
            code = "context_length_exceeded"
            param = prompt_param
    else:
        kind = "server_error"
    return ErrorReply(status, error.message, kind, param, code)
