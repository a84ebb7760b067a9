"""The Ray Serve deployment around one vLLM engine: one deployment per configured model.

Everything OpenAI-shaped below the HTTP edge is vLLM's own serving layer (``init_app_state`` builds the same
``OpenAIServingChat``, ``OpenAIServingCompletion`` and ``ServingEmbedding`` that ``vllm serve`` uses: chat
templates, sampling parameters, tool-call and reasoning parsers, structured outputs). This module only adapts it
to a Serve replica:

- a request arrives as the JSON dict the client sent (the router has already checked what OpenAI constrains)
  and is validated by vLLM's own request model;
- the reply is a generator of :mod:`deployments.replies` items, so the router can start the HTTP response on the
  first: an error, a finished answer, or SSE events, each yielded as soon as vLLM makes it, with token usage;
- the response names the model as the client did (an alias is answered under the alias).

When the client goes away the router cancels the Serve call; the cancellation reaches vLLM's generator here,
which aborts the engine request and frees its slot.

Health means progress, not just a live process: a replica is unhealthy when vLLM's engine core has died, or
when it holds requests but has produced no token for :data:`STALL_TIMEOUT_S`; Serve then replaces it. A request
that reaches a replica whose engine is dead is answered ``engine_unavailable`` before it is admitted, so the
router sends it elsewhere (or waits for the replacement) instead of failing it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import logging.handlers
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.adapters import AdapterLoadError, AdapterSlots
from deployments.autoscaling import KV_CACHE, RUNNING, WAITING
from deployments.config import ModelConfig
from deployments.constants import GAUGE_PUBLISH_S, STALL_TIMEOUT_S
from deployments.replies import (
    ENGINE_UNAVAILABLE,
    Admitted,
    Chunk,
    EngineItem,
    ErrorReply,
    FullReply,
    StreamRewriter,
    fix_tool_call_finish,
    from_vllm_error,
    validation_error,
)
from deployments.stream_channel import CHANNEL_HOST_ENV, ChannelClosed, StreamChannel, write_event

logger = logging.getLogger("rayroute.engine")


class EngineProgress:
    """A vLLM stat logger (the per-engine kind ``AsyncLLM(stat_loggers=...)`` takes) that keeps the engine's last
    scheduler state, for autoscaling, and when it last made a token, for health."""

    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_cache_usage = 0.0
        self.last_progress = time.monotonic()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:  # the engine core finished a step
            self.last_progress = time.monotonic()

    def stalled(self, unfinished_requests: int, now: float | None = None) -> bool:
        """Requests are waiting on the engine and nothing has come out for too long. Called by every health
        check: an idle engine owes nothing, so the clock restarts whenever one is seen idle."""
        now = time.monotonic() if now is None else now
        if unfinished_requests == 0:
            self.last_progress = now
            return False
        return now - self.last_progress > STALL_TIMEOUT_S

    def load(self, unfinished_requests: int) -> dict[str, float]:
        """The scheduler's counts are as of its last step; an idle engine has no step, so trust them only while
        requests are unfinished."""
        if unfinished_requests == 0:
            return {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}
        return {RUNNING: float(self.running), WAITING: float(self.waiting), KV_CACHE: self.kv_cache_usage}

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


# The model name the current request asked for; vLLM's serving layer names responses after it (see __init__).
_requested_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("requested_model", default=None)


@dataclass
class TokenCount:
    """A stream's tokens so far, read from vLLM's own outputs as they pass (see :func:`_counted`), so no SSE event
    is parsed to learn them. Counted as vLLM's serving layer counts ``usage``: prompt (with an encoder's) and the
    generated tokens of every choice; an output is counted before the event made from it is sent."""

    prompt: int = 0
    completion: int = 0
    # vLLM's generators feeding this stream, so it can close them (closing one aborts its engine request).
    sources: list[AsyncIterator[Any]] = field(default_factory=list)

    def add(self, output: Any) -> None:
        if not self.prompt:
            self.prompt = len(output.prompt_token_ids or ()) + len(output.encoder_prompt_token_ids or ())
        for choice in output.outputs:
            self.completion += len(choice.token_ids)  # a stream's outputs are deltas


# The TokenCount of the stream being served in this task; vLLM's generate runs in it (and in tasks it starts).
_token_count: contextvars.ContextVar[TokenCount | None] = contextvars.ContextVar("token_count", default=None)


def _counted(generate: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """``AsyncLLM.generate``, counting each output into the current stream's :class:`TokenCount`."""

    async def generate_and_count(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        count = _token_count.get()
        outputs = generate(*args, **kwargs)
        if count is not None:
            count.sources.append(outputs)
        async for output in outputs:
            if count is not None:
                count.add(output)
            yield output

    return generate_and_count


@dataclass
class _Endpoint:
    """How one OpenAI endpoint maps onto vLLM: its request model and the serving object that answers it."""

    request_class: str  # "module:Class", imported in the replica only
    serving_attribute: str  # the attribute init_app_state sets on its state
    call: Callable[[Any, Any], Any]  # (serving object, request) → awaitable result
    prompt_param: str  # the parameter that holds the prompt, named when it is too long
    what: str  # what the endpoint makes, for "model X does not support ..."
    # A stream's events as SSE text: chat and text completions stream text already; Responses streams objects.
    sse: Callable[[AsyncIterator[Any]], AsyncIterator[str]] = lambda events: events

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
                      "messages", "chat completions"),
    "completions": _Endpoint("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                             "openai_serving_completion", lambda serving, request: serving.create_completion(request),
                             "prompt", "text completions"),
    "embeddings": _Endpoint("vllm.entrypoints.pooling.embed.protocol:EmbeddingRequest",
                            "serving_embedding", lambda serving, request: serving(request), "input",
                            "embeddings"),
    "responses": _Endpoint("vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
                           "openai_serving_responses", lambda serving, request: serving.create_responses(request),
                           "input", "responses", lambda events: _typed_events(events)),
}


# Events vLLM sends before its engine has made anything: they announce the response.
_ANNOUNCEMENTS = ("response.created", "response.in_progress")


async def _typed_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Responses API events as vLLM's own route sends them: each names its type (``event: response.created``).

    vLLM announces a response before its engine has made anything; the announcements go out with the first event
    after them. So a stream's first chunk is the engine's first output, as on every other endpoint: the first-token
    timeout bounds the wait for it, TTFT measures it, and a replica that fails before it has the request retried."""
    held = ""
    try:
        async for event in events:
            text = f"event: {event.type}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
            if event.type in _ANNOUNCEMENTS:
                held += text
                continue
            yield held + text
            held = ""
        if held:
            yield held
    finally:
        await events.aclose()  # closing vLLM's generator aborts the engine request if it is still running


def _usage(response: Any) -> tuple[int, int]:
    """A finished response's (prompt, completion) tokens; the Responses API calls them input and output."""
    usage = response.usage
    if usage is None:
        return 0, 0
    if hasattr(usage, "input_tokens"):
        return usage.input_tokens, usage.output_tokens or 0
    return usage.prompt_tokens, usage.completion_tokens or 0


def _node_address() -> str:
    """Where this replica's stream channel listens: its node's address, as Ray's own worker ports do, unless the
    cluster is one machine (see :data:`deployments.stream_channel.CHANNEL_HOST_ENV`)."""
    import ray

    return os.environ.get(CHANNEL_HOST_ENV) or ray.util.get_node_ip_address()


@contextlib.contextmanager
def serve_log_handlers_kept():
    """Serve's replica log handlers, put back after vLLM's start.

    vLLM sets up its logging with ``logging.config.dictConfig``, which closes every logging handler of the process,
    Serve's among them: the replica logger's ``MemoryHandler`` loses its file. Serve notices only when a restarted
    controller recovers the replica (after the head's loss) and reads the log file's path from that handler: it
    fails, and Serve replaces a healthy engine (measured in tests/head_failure.py: every engine restarted, requests
    waited 45 s). A closed file handler reopens on its next line; the memory handler needs its file back.
    """
    serve_logger = logging.getLogger("ray.serve")
    targets = [(handler, handler.target) for handler in serve_logger.handlers
               if isinstance(handler, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None:
                handler.setTarget(target)


class VLLMEngine:
    """One replica: a vLLM ``AsyncLLM`` plus vLLM's OpenAI serving objects for it. Implements
    :class:`deployments.interface.EngineReplica`, what the router calls."""

    async def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.progress = EngineProgress()
        self.vllm_metrics: Any = None  # vLLM's Ray metrics, set by _start_vllm
        self.adapters: AdapterSlots | None = None  # the model's LoRA adapters, if it lists any; set by _start_vllm
        with serve_log_handlers_kept():
            self.engine, self._serving = await self._start_vllm(model)
        self._idle_gauges = asyncio.get_running_loop().create_task(self._publish_idle_gauges())
        # vLLM's serving layer calls generate on this object; counting there is free of any parsing.
        self.engine.generate = _counted(self.engine.generate)
        self.channel = StreamChannel()
        await self.channel.start(_node_address())
        # Built now rather than by the first request, which would otherwise wait for them (and the imports).
        for name, spec in ENDPOINTS.items():
            if self._serving[name] is not None:
                _ = spec.request_adapter
        logger.info("engine for %s ready (source %s)", model.id, model.resolved_source)

    async def _start_vllm(self, model: ModelConfig) -> tuple[Any, dict[str, Any]]:
        """vLLM's engine and its serving object for each endpoint (None where the model serves none). The one
        place vLLM itself is started: the load test's engine (tests/fake_engine.py) replaces only this."""
        # vLLM reads these when it fetches a media URL (no redirects), in this process; its engine core inherits them.
        os.environ.update(model.media_env())
        # Imported here: vLLM (and torch) load only in engine replicas, never in the router.
        import ray
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        replica = self

        class VllmMetrics(RayPrometheusStatLogger):
            """vLLM's own metrics, kept by the replica for :meth:`_publish_idle_gauges`."""

            def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
                super().__init__(vllm_config, engine_indexes)
                replica.vllm_metrics = self

        frontend_names = set(FrontendArgs.__dataclass_fields__)
        frontend_kwargs = {k: v for k, v in model.engine_args.items() if k in frontend_names}
        engine_kwargs = {k: v for k, v in model.engine_args.items() if k not in frontend_names}
        engine_args = AsyncEngineArgs(
            model=model.resolved_source,
            served_model_name=model.names,
            **model.engine_overrides(),
            **engine_kwargs,
        )
        frontend_args = FrontendArgs(**frontend_kwargs)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
        # Tensor-parallel workers go into the bundles this replica's placement group reserved for them.
        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
        engine = AsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            disable_log_stats=engine_args.disable_log_stats,
            # vLLM's own metrics (vllm:num_requests_running, KV-cache use, TTFT, ...) as Ray metrics, so the
            # node's one metrics port exports them for every replica, tagged with its ReplicaId.
            stat_loggers=[VllmMetrics, lambda config, index: self.progress],
        )

        state = State()
        # vLLM's CLI hands init_app_state one flat namespace of front-end and engine arguments; so do we.
        args = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
        await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
        # vLLM names every response after the first served name; answer under the name the client used instead.
        models = state.openai_serving_models
        canonical_name = models.model_name
        models.model_name = lambda lora_request=None: (
            _requested_model.get() if lora_request is None and _requested_model.get() else canonical_name(lora_request)
        )
        if model.adapters:
            self.adapters = AdapterSlots(models, engine, model)
        return engine, {name: getattr(state, e.serving_attribute, None) for name, e in ENDPOINTS.items()}

    async def chat(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        """A chat completion; see the module docstring for what is yielded."""
        async for item in self._serve("chat", body):
            yield item

    async def completions(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("completions", body):
            yield item

    async def embeddings(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("embeddings", body):
            yield item

    async def responses(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("responses", body):
            yield item

    async def _serve(self, endpoint: str, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        from pydantic import BaseModel, ValidationError
        from starlette.responses import Response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:  # before Admitted: the router may send this request to another replica
            yield self._engine_unavailable()
            return
        yield Admitted()
        serving = self._serving[endpoint]
        spec = ENDPOINTS[endpoint]
        if serving is None:
            yield ErrorReply(400, f"The model `{body.get('model')}` does not support {spec.what}.",
                             "invalid_request_error", "model", "model_not_supported")
            return
        name = body.get("model")
        if self.adapters is not None and name in self.model.adapters:
            try:
                await self.adapters.load(name)  # at once if this replica holds it, as Serve's routing intends
            except AdapterLoadError as exc:
                logger.error("adapter %s of %s could not be loaded: %s", name, self.model.id, exc)
                yield ErrorReply(500, f"The adapter `{name}` could not be loaded.", "server_error", None,
                                 "adapter_load_failed")
                return
            except EngineDeadError:
                yield self._engine_unavailable()
                return
        _requested_model.set(name)
        streaming = bool(body.get("stream")) and endpoint != "embeddings"
        count = TokenCount()
        _token_count.set(count if streaming else None)
        request = None
        try:
            request = spec.request_adapter.validate_python(body)
            result = await spec.call(serving, request)
        except ValidationError as exc:  # before ValueError, which it subclasses
            # Raised after the request validated, it is about a message part vLLM checks while rendering.
            yield validation_error(exc.errors(), body, root=None if request is None else spec.prompt_param)
            return
        except EngineDeadError:
            yield self._engine_unavailable()
            return
        except (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError) as exc:
            # What `vllm serve` turns into 4xx (a prompt longer than the context, `tool_choice` without `tools`),
            # raised by vLLM's request validators or its serving layer. Anything else is a real engine failure.
            yield from_vllm_error(serving.create_error_response(exc), spec.prompt_param)
            return
        if isinstance(result, ErrorResponse):
            yield self._engine_unavailable() if self.engine.errored else from_vllm_error(result, spec.prompt_param)
        elif isinstance(result, Response):  # the pooling endpoints answer with a finished JSON response
            body_text = bytes(result.body).decode()
            usage = json.loads(body_text).get("usage") or {}
            yield FullReply(body_text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        elif isinstance(result, BaseModel):
            fix_tool_call_finish(result)
            yield FullReply(result.model_dump_json(), *_usage(result))
        else:
            tools = endpoint == "chat" and bool(body.get("tools"))
            async for chunk in self._stream(spec.sse(result), count, fix_tool_calls=tools):
                yield chunk

    async def _stream(self, events: AsyncIterator[str], count: TokenCount, fix_tool_calls: bool,
                      ) -> AsyncIterator[EngineItem]:
        """vLLM's SSE events, each sent as soon as vLLM makes it: the first as a chunk on this Serve call, the rest
        on the stream's channel (:mod:`deployments.stream_channel`), each with the token counts so far; then the
        call ends. (No last item: every Serve item costs more CPU at both ends than all of a stream's channel
        writes together, and the counts are already with the router.)

        No timer and no buffer: vLLM's serving layer makes an event only when this generator asks for the next one.
        When this replica's loop or the connection falls behind the engine, the tokens made meanwhile wait in vLLM's
        per-request output collector, which merges them, and become one event carrying all of their text, logprobs
        and tool-call deltas, built by vLLM itself; usage counts every token whatever shares an event.
        """
        rewriter = StreamRewriter(fix_tool_calls)
        link = None
        try:
            first = await anext(events, None)
            if first is None:
                return
            data = rewriter.rewrite(first)
            if rewriter.error is not None and self.engine.errored:
                # vLLM ends a stream with an error event when the engine dies; before any token, the router
                # can still retry the request elsewhere.
                yield self._engine_unavailable()
                return
            link = self.channel.offer()
            yield Chunk(data, count.prompt, count.completion, channel=link.url)
            response = await link.writer()
            async for event in events:
                await write_event(response, rewriter.rewrite(event), count.prompt, count.completion)
        except ChannelClosed as exc:
            logger.info("stream ended early: %s", exc)  # the router (its client) left; the engine aborts below
        finally:
            if link is not None:
                link.close()
            # Closing vLLM's generators aborts the engine request if it is still running.
            await events.aclose()
            for source in count.sources:
                await source.aclose()

    def _engine_unavailable(self) -> ErrorReply:
        return ErrorReply(503, f"The engine serving `{self.model.id}` on this replica has stopped.", "server_error",
                          None, ENGINE_UNAVAILABLE)

    async def _publish_idle_gauges(self) -> None:
        """vLLM sets its gauges (requests running and waiting, KV-cache use) only when its engine steps, and Ray
        drops a gauge that is not set again within two export intervals: an idle engine's panels would show "No
        data" rather than 0. While no request is unfinished, this publishes what idle is: none running or waiting,
        no KV cache held (vLLM counts cached prefixes that no request uses as free)."""
        from vllm.v1.metrics.stats import SchedulerStats

        idle = SchedulerStats()
        while True:
            await asyncio.sleep(GAUGE_PUBLISH_S)
            if self.vllm_metrics is not None and self.engine.get_num_unfinished_requests() == 0:
                for index in self.vllm_metrics.engine_indexes:
                    self.vllm_metrics.record(idle, None, engine_idx=index)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica; the ``engine_load`` policy (:mod:`deployments.autoscaling`) reads it."""
        return self.progress.load(self.engine.get_num_unfinished_requests())

    async def engine_info(self) -> dict[str, Any]:
        """What the tests and operators ask a replica: its platform and how many requests it is running."""
        from vllm.platforms import current_platform

        return {
            "model": self.model.id,
            "pid": os.getpid(),  # the replica's process; vLLM's engine core is its child
            "platform": current_platform.device_type,
            "running_requests": self.engine.get_num_unfinished_requests(),
            # The adapters Serve counts as held here, and how many adapter loads this replica has done.
            "adapters": self.adapters.held() if self.adapters else [],
            "adapter_loads": self.adapters.loads if self.adapters else 0,
        }

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: end vLLM's engine-core process with it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    async def check_health(self) -> None:
        # Serve calls this periodically; raising marks the replica unhealthy so Serve replaces it.
        await self.engine.check_health()  # raises once the engine-core process is gone
        if self.progress.stalled(self.engine.get_num_unfinished_requests()):
            raise RuntimeError(f"the engine has produced nothing for {STALL_TIMEOUT_S:.0f}s while holding requests")
