"""The Ray Serve deployment around one vLLM engine: one deployment per configured model.

Everything OpenAI-shaped below the HTTP edge is vLLM's own serving layer (``init_app_state`` builds the same
``OpenAIServingChat``, ``OpenAIServingCompletion`` and ``ServingEmbedding`` that ``vllm serve`` uses: chat
templates, sampling parameters, tool-call and reasoning parsers, structured outputs). This module only adapts it
to a Serve replica (how vLLM is built, and what the replica hands it per request, is :mod:`deployments.vllm_hooks`;
which serving object answers which endpoint, :mod:`deployments.endpoints`):

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
router sends it elsewhere (or waits for the replacement) instead of failing it. A stream whose engine dies after
its first token ends its channel and says so, and the router goes on with it elsewhere (:mod:`deployments.resume`).

Long because it is one actor class, every method of which Serve or the router calls: each is a few lines over
vLLM, and what grew in one (streaming, resuming, health) already lives in modules of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from deployments.adapters import AdapterLoadError, AdapterSlots
from deployments.config import ModelConfig
from deployments.constants import GAUGE_PUBLISH_S, STALL_TIMEOUT_S
from deployments.endpoints import ENDPOINTS, token_usage
from deployments.kv_events import STATS_LOAD, KvEventsFeed
from deployments.logs import send_our_logs_to_serve, serve_log_handlers_kept
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
from deployments.resume import Continuation, Resume, announces_role, not_resumable
from deployments.stream_channel import CHANNEL_HOST_ENV, ChannelClosed, StreamChannel, write_event
from deployments.vllm_hooks import EngineProgress, TokenCount, for_request, ray_metrics, ray_workers, start_vllm

logger = logging.getLogger("rayroute.engine")


def _node_address() -> str:
    """Where this replica's stream channel listens: its node's address, as Ray's own worker ports do, unless the
    cluster is one machine (see :data:`deployments.stream_channel.CHANNEL_HOST_ENV`)."""
    import ray

    return os.environ.get(CHANNEL_HOST_ENV) or ray.util.get_node_ip_address()


class VLLMEngine:
    """One replica: a vLLM ``AsyncLLM`` plus vLLM's OpenAI serving objects for it. Implements
    :class:`deployments.interface.EngineReplica`, what the router calls."""

    async def __init__(self, model: ModelConfig) -> None:
        send_our_logs_to_serve()  # first, so that whatever this replica logs is in its Serve log file
        self.model = model
        self.progress = EngineProgress()
        self.adapters: AdapterSlots | None = None  # the model's LoRA adapters, if it lists any; set by _start_vllm
        # What the engine's KV cache holds, for routers choosing by it (replica_choice: kv_cache).
        self.kv_feed = KvEventsFeed() if model.replica_choice == "kv_cache" else None
        self.admitted = 0  # requests this replica has taken, for tests and operators (engine_info)
        # A reasoning parser's state is not rebuilt from tokens: such a model's streams end where a replica fails.
        self.resumes = "reasoning_parser" not in model.engine_args
        with serve_log_handlers_kept():
            self.engine, self._serving = await self._start_vllm(model)
        self._idle_gauges = asyncio.get_running_loop().create_task(self._publish_idle_gauges())
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
        # One EngineProgress for every engine of the replica; read when vLLM makes its loggers, after this returns.
        engine, serving, models = await start_vllm(model, lambda vllm_config, engine_index: self.progress,
                                                   self.kv_feed.engine_args() if self.kv_feed else None)
        if self.kv_feed is not None:
            self.kv_feed.start(max_blocks=engine.vllm_config.cache_config.num_gpu_blocks or 0,
                               block_size=engine.vllm_config.cache_config.block_size)
        if model.adapters:
            self.adapters = AdapterSlots(models, engine, model)
        return engine, serving

    async def chat(self, body: dict[str, Any], resume: Resume | None = None) -> AsyncIterator[EngineItem]:
        """A chat completion; see the module docstring for what is yielded. With ``resume``, the rest of a stream
        another replica started (:mod:`deployments.resume`)."""
        async for item in self._serve("chat", body, resume):
            yield item

    async def completions(self, body: dict[str, Any], resume: Resume | None = None) -> AsyncIterator[EngineItem]:
        async for item in self._serve("completions", body, resume):
            yield item

    async def embeddings(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("embeddings", body):
            yield item

    async def responses(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        async for item in self._serve("responses", body):
            yield item

    async def _serve(self, endpoint: str, body: dict[str, Any], resume: Resume | None = None,
                     ) -> AsyncIterator[EngineItem]:
        from pydantic import BaseModel, ValidationError
        from starlette.responses import Response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:  # before Admitted: the router may send this request to another replica
            yield self._engine_unavailable()
            return
        yield Admitted()
        self.admitted += 1
        serving = self._serving[endpoint]
        spec = ENDPOINTS[endpoint]
        if serving is None:
            yield ErrorReply.invalid_request(f"The model `{body.get('model')}` does not support {spec.what}.",
                                             param="model", code="model_not_supported")
            return
        name = body.get("model")
        if self.adapters is not None and name in self.model.adapters:
            try:
                await self.adapters.load(name)  # at once if this replica holds it, as Serve's routing intends
            except AdapterLoadError as exc:
                logger.error("adapter %s of %s could not be loaded: %s", name, self.model.id, exc)
                yield ErrorReply.server(f"The adapter `{name}` could not be loaded.", code="adapter_load_failed")
                return
            except EngineDeadError:
                yield self._engine_unavailable()
                return
        streaming = bool(body.get("stream")) and endpoint != "embeddings"
        # A stream that can go on elsewhere if this replica fails carries its token ids (deployments/resume.py).
        traced = streaming and self.resumes and not_resumable(endpoint, body) is None
        continuation = None
        if resume is not None:
            if not traced:
                yield ErrorReply.server("This request cannot be resumed.", code="not_resumable")
                return
            continuation = Continuation(resume, self.engine.tokenizer)
        # A resumed stream's counts go on from what the client already has.
        count = TokenCount(traced=traced, completion=len(resume.token_ids) if resume else 0,
                           text_chars=resume.text_chars if resume else 0)
        # Answered under the name the client used; a stream's tokens counted from vLLM's outputs, free of parsing.
        serving = for_request(serving, name, count if streaming else None, continuation)
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
            yield FullReply(result.model_dump_json(), *token_usage(result))
        else:
            tools = endpoint == "chat" and bool(body.get("tools"))
            async for chunk in self._stream(spec.sse(result), count, tools, continuation):
                yield chunk

    async def _stream(self, events: AsyncIterator[str], count: TokenCount, fix_tool_calls: bool,
                      continuation: Continuation | None = None) -> AsyncIterator[EngineItem]:
        """vLLM's SSE events, each sent as soon as vLLM makes it: the first as a chunk on this Serve call, the rest
        on the stream's channel (:mod:`deployments.stream_channel`), each with the token counts so far; then the
        call ends. (No last item: every Serve item costs more CPU at both ends than all of a stream's channel
        writes together, and the counts are already with the router.)

        No timer and no buffer: vLLM's serving layer makes an event only when this generator asks for the next one.
        When this replica's loop or the connection falls behind the engine, the tokens made meanwhile wait in vLLM's
        per-request output collector, which merges them, and become one event carrying all of their text, logprobs
        and tool-call deltas, built by vLLM itself; usage counts every token whatever shares an event.

        When the engine dies under a resumable stream (``count.traced``), its error event is not sent: the channel
        ends and the call ends with ``engine_unavailable``, and the router goes on with the stream elsewhere.
        """
        rewriter = StreamRewriter(fix_tool_calls)
        link = None
        try:
            data = ""
            while not data:  # a resumed stream drops its second announcement of the role
                if (first := await anext(events, None)) is None:
                    return
                data = rewriter.rewrite(first)
                if continuation is not None and rewriter.error is None:
                    data = continuation.event(data)
            if rewriter.error is not None and self.engine.errored:
                # vLLM ends a stream with an error event when the engine dies; before any token, the router
                # can still retry the request elsewhere.
                yield self._engine_unavailable()
                return
            link = self.channel.offer()
            # The ids and characters a frame claims are those of the text it carries, or carried before it.
            claims = count.traced and not announces_role(data)
            yield Chunk(data, count.prompt, count.completion, channel=link.url, resumable=count.traced,
                        token_ids=tuple(count.take_ids()) if claims else (),
                        text_chars=count.text_chars if claims else 0)
            response = await link.writer()
            async for event in events:
                data = rewriter.rewrite(event)
                if rewriter.error is not None and count.traced and self.engine.errored:
                    link.close()
                    yield self._engine_unavailable()
                    return
                if continuation is not None and rewriter.error is None:
                    data = continuation.event(data)
                if data:
                    await write_event(response, data, count.prompt, count.completion, count.text_chars,
                                      count.take_ids())
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
        return ErrorReply.server(f"The engine serving `{self.model.id}` on this replica has stopped.", status=503,
                                 code=ENGINE_UNAVAILABLE)

    async def _publish_idle_gauges(self) -> None:
        """vLLM sets its gauges (requests running and waiting, KV-cache use) only when its engine steps, and Ray
        drops a gauge that is not set again within two export intervals: an idle engine's panels would show "No
        data" rather than 0. While no request is unfinished, this publishes what idle is: none running or waiting,
        no KV cache held (vLLM counts cached prefixes that no request uses as free)."""
        from vllm.v1.metrics.stats import SchedulerStats

        idle = SchedulerStats()
        while True:
            await asyncio.sleep(GAUGE_PUBLISH_S)
            metrics = ray_metrics(self.engine)
            if metrics is not None and self.engine.get_num_unfinished_requests() == 0:
                for index in metrics.engine_indexes:
                    metrics.record(idle, None, engine_idx=index)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica; the ``engine_load`` policy (:mod:`deployments.autoscaling`) reads it."""
        return self.progress.load(self.engine.get_num_unfinished_requests())

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's controller calls this on every replica and hands the result to every router's handle: the
        requests the engine holds, and for ``replica_choice: kv_cache`` the blocks its cache holds
        (:mod:`deployments.kv_routing`)."""
        stats: dict[str, Any] = {STATS_LOAD: self.engine.get_num_unfinished_requests()}
        if self.kv_feed is not None:
            stats.update(self.kv_feed.routing_stats())
        return stats

    async def reset_prefix_cache(self, pid: int | None = None) -> dict[str, Any]:
        """Drop every cached prefix (vLLM's own reset, which refuses while a request holds blocks): what a cache
        under pressure does to a tenant's blocks, at once. For operators and tests. A handle cannot pick a replica,
        so ``pid`` names the one meant: another replica answers without resetting, and the caller asks again."""
        reset = pid in (None, os.getpid()) and await self.engine.reset_prefix_cache()
        if reset and self.kv_feed is not None:
            # vLLM publishes its "all cleared" event at the engine's next step, which an idle engine never takes;
            # the cache is empty now, so the routers are told now (the event, when it comes, changes nothing).
            self.kv_feed.cleared()
        return {"pid": os.getpid(), "reset": reset}

    async def engine_info(self) -> dict[str, Any]:
        """What the tests and operators ask a replica: its platform, its workers and where they run, and how many
        requests it is running."""
        import ray
        from vllm.platforms import current_platform

        return {
            "model": self.model.id,
            "pid": os.getpid(),  # the replica's process; vLLM's engine core is its child
            "platform": current_platform.device_type,
            "running_requests": self.engine.get_num_unfinished_requests(),
            "admitted_requests": self.admitted,
            "kv_blocks": len(self.kv_feed.blocks) if self.kv_feed else None,  # held, as its KV events say
            "node_id": ray.get_runtime_context().get_node_id(),
            "workers": ray_workers(self.engine),  # empty: one worker, in the engine core
            # The adapters Serve counts as held here, and how many adapter loads this replica has done.
            "adapters": self.adapters.held() if self.adapters else [],
            "adapter_loads": self.adapters.loads if self.adapters else 0,
        }

    def __del__(self) -> None:
        # Serve calls this when it stops the replica: end vLLM's engine-core process with it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        feed = getattr(self, "kv_feed", None)
        if feed is not None:
            feed.close()

    async def check_health(self) -> None:
        # Serve calls this periodically; raising marks the replica unhealthy so Serve replaces it.
        await self.engine.check_health()  # raises once the engine-core process is gone
        if self.progress.stalled(self.engine.get_num_unfinished_requests()):
            raise RuntimeError(f"the engine has produced nothing for {STALL_TIMEOUT_S:.0f}s while holding requests")
