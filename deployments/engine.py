"""The Ray Serve deployment around one vLLM engine: one deployment per configured model.

Everything OpenAI-shaped below the HTTP edge is vLLM's own serving layer (``init_app_state`` builds the same
``OpenAIServingChat`` that ``vllm serve`` uses: chat templates, sampling parameters, tool-call and reasoning
parsers, structured outputs). This module only adapts it to a Serve replica:

- the request arrives as the JSON dict the client sent (the router has already checked what OpenAI constrains)
  and is validated by vLLM's own request model;
- the reply is a generator, so the router can start the HTTP response on the first item: an :class:`ErrorReply`
  or a :class:`FullReply` for a finished answer, or SSE ``data:`` lines, each yielded as soon as vLLM makes it.

When the client goes away the router cancels the Serve call; the cancellation reaches vLLM's generator here,
which aborts the engine request and frees its slot.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
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
        self._chat = getattr(state, "openai_serving_chat", None)
        logger.info("engine for %s ready (source %s)", model.id, model.resolved_source)

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        """Run one chat completion; see the module docstring for what is yielded."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMError

        if self._chat is None:
            yield ErrorReply(400, f"model {self.model.id!r} does not support chat completions", "invalid_request_error")
            return
        request = None
        try:
            request = ChatCompletionRequest.model_validate(body)
            result = await self._chat.create_chat_completion(request)
        except ValidationError as exc:  # before ValueError, which it subclasses
            # Raised after the request validated, it is about a message part vLLM checks while rendering.
            yield validation_error(exc, body, root=None if request is None else "messages")
            return
        except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as exc:
            # What `vllm serve` turns into 4xx (a prompt longer than the context, `tool_choice` without `tools`),
            # raised by vLLM's request validators or its serving layer. Anything else is a real engine failure.
            yield _from_vllm_error(self._chat.create_error_response(exc))
            return
        if isinstance(result, ErrorResponse):
            yield _from_vllm_error(result)
        elif isinstance(result, AsyncIterator):
            async for chunk in result:
                yield chunk
        else:
            yield FullReply(result.model_dump_json(exclude_unset=False))

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


def validation_error(exc: Any, body: Any, root: str | None = None) -> ErrorReply:
    """A pydantic ``ValidationError`` as a 400 that names the offending parameter, OpenAI style (``messages[0].role``).

    Where a field is a union, pydantic reports one error per member; the error that is not a mere type mismatch
    (``stop`` with five items: "at most 4 items", not "not a string") is the one that says what to fix. Locations
    are read against the body the client sent, so union members' internal names never reach the client. Errors
    raised on a part of the request (vLLM validates content parts while rendering the prompt) are named after
    ``root``, the parameter that part came from.
    """
    errors = exc.errors()
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


def _from_vllm_error(response: Any) -> ErrorReply:
    """vLLM's ``ErrorResponse`` carries the HTTP status as a number in ``code``; OpenAI's code is a string."""
    error = response.error
    status = int(error.code) if isinstance(error.code, int) else HTTPStatus.INTERNAL_SERVER_ERROR
    if status == HTTPStatus.NOT_FOUND:
        kind = "not_found_error"
    elif status < 500:
        kind = "invalid_request_error"
    else:
        kind = "server_error"
    return ErrorReply(status, error.message, kind, error.param)
