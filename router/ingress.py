"""The HTTP edge: a FastAPI app on a Ray Serve ingress deployment.

A request's path through this file: the middleware authenticates and bounds the body (:mod:`router.middleware`)
→ FastAPI parses and checks it against the route's body model (:mod:`router.protocol`) → :meth:`OpenAIRouter.forward`
finds the model by the ``model`` field (ids and aliases), checks the key may use it and admits the request against
the key's limits, reserving what it may cost (:mod:`router.limits`), and calls the engine replica as a Serve stream,
within the model's timeouts and retrying a failed replica (:mod:`router.dispatch`) → the response starts on the
first item: an error, a finished body, or the first SSE line followed by the rest as they arrive → when the request
ends, however it ends, its reservation is released with the tokens it used (:class:`Hold`). Request caps (list
lengths, ``n``) are checked on the parsed JSON before the body models are built (:func:`build_http_app`).

The FastAPI app is built in the replica, after the constructor (``__serve_build_asgi_app__``), so its routes,
middleware and limits come from this deployment's config rather than from a module-level app frozen at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import Receive, Scope, Send

from deployments.api_keys import ApiKey
from deployments.config import RoutedModel, RouterArgs
from deployments.constants import (
    KEY_LIMITS_RETRY_AFTER_S,
    KEY_LIMITS_TIMEOUT_S,
    KEY_LIMITS_WARN_EVERY_S,
    RESERVATION_MARGIN_S,
)
from deployments.interface import Endpoint
from deployments.replies import Chunk, EngineItem, ErrorReply, FullReply
from router.auth import API_KEYS_FILE_ENV, ApiKeyAuth, follow_keys_file, load_api_keys
from router.auth_throttle import ClientAddresses
from router.channel_client import Channel, ChannelClient
from router.dispatch import FALLBACK_CODES, call_engine, cancel
from router.errors import OpenAIError, error_response, install_error_handlers
from router.limits import Admission
from router.media import check_media_urls, media_urls_allowed
from router.middleware import API_KEY_KEY, RECORD_KEY, install_middleware
from router.protocol import (
    NOT_STORED,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    RequestBody,
    ResponsesBody,
    check_request_caps,
    completion_tokens_limit,
    output_count,
    prompt_tokens_estimate,
    reject_media,
    reject_stateful,
)
from router.telemetry import GatewayMetrics, RequestRecord, enable_access_log

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# On an answer from a fallback: the name the client asked for, and why that model did not answer.
FALLBACK_FROM_HEADER, FALLBACK_REASON_HEADER = "X-Rayroute-Fallback-From", "X-Rayroute-Fallback-Reason"

T = TypeVar("T")

logger = logging.getLogger("rayroute.router")


class Hold:
    """A request's admission against its key's limits: the rate-limit headers its answers carry, and the
    reservation to release when it ends.

    Every way a request ends reaches :meth:`release` (a whole answer, an error reply or raised error, a stream's
    end, a client that left, a stream never started), and only the first call does anything, so the key's slot and
    unused tokens come back exactly once. The tokens charged are the request's own count at that moment. Not
    awaited: no answer waits for the bookkeeping, and a key-limits replica that is gone must not fail a request
    that is done (its reservation then expires there)."""

    def __init__(self, limits: DeploymentHandle | None = None, reservation: str | None = None,
                 record: RequestRecord | None = None, headers: dict[str, str] | None = None):
        self.limits = limits
        self.reservation = reservation
        self.record = record
        self.headers = headers or {}

    def release(self) -> None:
        if self.reservation is None or self.limits is None or self.record is None:
            return
        reservation, self.reservation = self.reservation, None
        try:
            self.limits.release.remote(reservation, self.record.prompt_tokens + self.record.completion_tokens)
        except Exception:
            logger.warning("could not release a key-limits reservation; it expires on its own", exc_info=True)


class HeldStreamingResponse(StreamingResponse):
    """A stream that, when the response is over, releases its request's :class:`Hold` and cancels its engine call,
    even if its body never started (the connection was gone when the response began), which its generator's own
    ``finally`` cannot: a generator never started never runs it."""

    def __init__(self, content: AsyncIterator[str | bytes], hold: Hold, call: DeploymentResponseGenerator,
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.hold = hold
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.call)  # nothing when the relay has ended it already
            self.hold.release()


class OpenAIRouter:
    """Routes OpenAI requests to engine deployments; :data:`Router` is this class as a Serve ingress deployment.

    ``limits`` is the handle of the :class:`router.limits.KeyLimits` deployment every router replica shares.
    """

    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle],
                 limits: DeploymentHandle | None = None):
        self.config = RouterArgs.model_validate(config)
        self.created = int(time.time())
        # Every name a client may send (ids, aliases, adapters) → the handle of the deployment serving it, and the
        # entry it is routed by (an adapter's is its base's under the adapter's name: a model of its own).
        self.handles: dict[str, DeploymentHandle] = {}
        self.models: dict[str, RoutedModel] = {}
        self.parents: dict[str, str] = {}  # adapter name → its base model's id
        for model in self.config.models:
            for name in model.names:
                self.handles[name] = engines[model.id].options(stream=True)
                self.models[name] = model
            for name in model.adapters:
                # Serve's multiplexing sends it to a replica that holds the adapter (deployments/adapters.py).
                self.handles[name] = engines[model.id].options(stream=True, multiplexed_model_id=name)
                self.models[name] = model.as_adapter(name)
                self.parents[name] = model.id
        self.limits = limits
        self.limits_warned_at = -float("inf")  # when unreachable key limits were last logged
        self.metrics = GatewayMetrics((name, model.id) for name, model in self.models.items())
        self.auth = ApiKeyAuth(load_api_keys())
        self.keys_follower: asyncio.Task | None = None
        with contextlib.suppress(RuntimeError):  # else with the first request (a test's router, built off-loop)
            self.metrics.publish_gauges()
            if keys_file := os.environ.get(API_KEYS_FILE_ENV):  # rotated keys take effect without a restart
                self.keys_follower = asyncio.get_running_loop().create_task(follow_keys_file(self.auth,
                                                                                            Path(keys_file)))
        self.channels = ChannelClient()
        enable_access_log()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    async def forward(self, endpoint: Endpoint, body: RequestBody, request: Request) -> Response:
        """Send a checked request to its model's engine and answer with what comes back."""
        model = self.models.get(body.model)
        if model is None:
            raise OpenAIError.model_not_found(body.model)
        key: ApiKey | None = getattr(request.state, API_KEY_KEY, None)
        if key is not None and not key.may_use(body.model, model.id):
            raise OpenAIError(403, f"This API key may not use the model `{body.model}`.", "permission_error",
                              "model", "model_not_allowed")
        if isinstance(body, ChatCompletionBody) and not model.multimodal:
            reject_media(body)
        await check_media_urls(body, model)  # media URLs only from the model's allowed domains (router/media.py)
        record: RequestRecord = getattr(request.state, RECORD_KEY)
        record.model, record.served_model = body.model, model.id
        hold = await self._admit(key, body, model, record)
        headers = dict(hold.headers)
        try:
            record.dispatched_at = time.perf_counter()
            self.metrics.started(record)
            streaming = bool(getattr(body, "stream", False))
            try:
                first, stream, model, since = await self._call(endpoint, model, body, record, key, streaming)
            except OpenAIError as exc:
                exc.headers.update(headers)
                raise
            if record.fallback_from is not None:
                headers.update({FALLBACK_FROM_HEADER: record.fallback_from,
                                FALLBACK_REASON_HEADER: record.fallback_reason})
            record.first_reply_at = time.perf_counter()
            self.metrics.first_reply(record)
            if isinstance(first, ErrorReply):
                hold.release()
                return error_response(first, headers)
            record.prompt_tokens, record.completion_tokens = first.prompt_tokens, first.completion_tokens
            if isinstance(first, FullReply):
                hold.release()
                return Response(first.body, media_type="application/json", headers=headers)
            deadline = since + model.timeouts.total_s
            return HeldStreamingResponse(self._relay(first, stream, record, deadline, hold), hold, stream,
                                         media_type="text/event-stream", headers={**_SSE_HEADERS, **headers})
        except BaseException:  # an error raised, or the client left while the engine was asked
            hold.release()
            raise

    async def _call(self, endpoint: Endpoint, model: RoutedModel, body: RequestBody, record: RequestRecord,
                    key: ApiKey | None, streaming: bool) -> tuple[EngineItem, Any, RoutedModel, float]:
        """The engine's first answer, the stream it came on, the model that gave it and when that model was asked:
        the requested model's, or, when that one cannot take the request at all, its first fallback's that can.
        Nothing has gone to the client yet, so trying another model changes nothing it could have seen."""
        fallbacks = [name for name in model.fallbacks if self._may_take(name, key, body)]
        payload = body.model_dump(exclude_unset=True)
        since = record.arrived_at
        while True:
            try:
                first, stream = await call_engine(self.handles[payload["model"]], endpoint, model, payload, record,
                                                  streaming, since)
            except OpenAIError as exc:
                if not fallbacks or exc.reply.code not in FALLBACK_CODES:
                    raise
                reason = exc.reply.code
            else:
                if not (fallbacks and isinstance(first, ErrorReply) and first.code in FALLBACK_CODES):
                    return first, stream, model, since
                cancel(stream)
                reason = first.code
            name = fallbacks.pop(0)
            model = self.models[name]
            payload = {**payload, "model": name}  # answered under the fallback's name: the client sees who answered
            self.metrics.fell_back(record, name, model.id, reason)
            since = time.perf_counter()  # the fallback gets its own timeouts

    def _may_take(self, name: str, key: ApiKey | None, body: RequestBody) -> bool:
        """Whether a fallback may answer this request: the key may use it (no reaching a model through another),
        and it takes the request's media, if any."""
        model = self.models[name]
        if key is not None and not key.may_use(name, model.id):
            return False
        if isinstance(body, ChatCompletionBody) and not model.multimodal:
            try:
                reject_media(body)
            except OpenAIError:
                return False
        return media_urls_allowed(body, model)  # the request's hosts, already resolved by check_media_urls

    async def _admit(self, key: ApiKey | None, body: RequestBody, model: RoutedModel,
                     record: RequestRecord) -> Hold:
        """A limited key's turn: its slot and the request's token reservation taken (:mod:`router.limits`), or a
        429 saying which limit refused it. The key-limits replica gets a bounded wait; past it, or when the call
        fails, ``routers.key_limits_unavailable`` decides (:meth:`_limits_unavailable`)."""
        if key is None or not key.limited or self.limits is None:
            return Hold()
        tokens = self._reservation(key, body)
        # Past the longest the request can live (its model's time, then each fallback's), a reservation left
        # unreleased was held by a router that died.
        hold_s = model.timeouts.total_s + sum(self.models[name].timeouts.total_s for name in model.fallbacks)
        call = None
        reservation = uuid.uuid4().hex  # ours, so that an admission we stop waiting for can be released
        try:
            call = self.limits.admit.remote(key.name, key.requests_per_minute, key.tokens_per_minute, tokens,
                                            key.max_concurrent_requests, hold_s + RESERVATION_MARGIN_S,
                                            reservation=reservation)
            async with asyncio.timeout(KEY_LIMITS_TIMEOUT_S):
                admission: Admission = await call
        except (TimeoutError, RayError, RayServeException) as exc:  # the replica is slow, gone or unreachable
            cancel(call)
            # A slow replica may still admit it: released now, it will hold nothing of the key's when it does.
            Hold(self.limits, reservation, record).release()
            return self._limits_unavailable(key, exc)
        headers = dict(admission.headers)
        if admission.allowed:
            return Hold(self.limits, admission.reservation, record, headers)
        if admission.oversize:
            raise OpenAIError(429, f"Request too large for `{key.name}` on tokens per minute: limit "
                              f"{key.tokens_per_minute}, requested {tokens} (the prompt's estimate and the "
                              "completion tokens it may generate, `n` × `max_tokens`). Reduce the prompt, "
                              "`max_tokens` or `n`.", "rate_limit_error", None, "rate_limit_exceeded", None, headers)
        if admission.limited_by == "concurrent":
            raise OpenAIError(429, f"Too many concurrent requests for `{key.name}`: at most "
                              f"{key.max_concurrent_requests} at once. Retry when one has finished.",
                              "rate_limit_error", None, "concurrency_limit_exceeded", admission.retry_after_s,
                              headers)
        raise OpenAIError(429, f"Rate limit reached for `{key.name}` on {admission.limited_by} per minute. "
                          f"Retry in {admission.retry_after_s:.1f}s.", "rate_limit_error", None,
                          "rate_limit_exceeded", admission.retry_after_s, headers)

    def _reservation(self, key: ApiKey, body: RequestBody) -> int:
        """The tokens the request may cost, reserved against the key's tokens per minute at admission: its
        prompt's estimate, and for each output its ``max_tokens``, or when unset the configured default, but no
        more of that than the key's minute leaves after the prompt (the client asked for no particular length, so
        it is not refused as too large)."""
        if not key.tokens_per_minute:
            return 0
        prompt = prompt_tokens_estimate(body)
        outputs = output_count(body)
        asked = completion_tokens_limit(body)
        if asked is not None:
            return prompt + outputs * asked
        default = outputs * self.config.routers.default_completion_tokens
        return prompt + min(default, max(0, key.tokens_per_minute - prompt))

    def _limits_unavailable(self, key: ApiKey, exc: Exception) -> Hold:
        """The key-limits replica did not answer: refuse (503, so no key exceeds its limits) or admit without
        limits, as ``routers.key_limits_unavailable`` says; logged once a period, not once per request."""
        refuse = self.config.routers.key_limits_unavailable == "refuse"
        now = time.monotonic()
        if now - self.limits_warned_at >= KEY_LIMITS_WARN_EVERY_S:
            self.limits_warned_at = now
            logger.warning("key limits unavailable (%s); %s limited keys' requests until they answer again",
                           type(exc).__name__ if not isinstance(exc, TimeoutError)
                           else f"no answer within {KEY_LIMITS_TIMEOUT_S:g}s",
                           "refusing" if refuse else "admitting without limits")
        if refuse:
            raise OpenAIError(503, "Rate limits cannot be checked right now. Retry shortly.", "server_error", None,
                              "limits_unavailable", KEY_LIMITS_RETRY_AFTER_S)
        return Hold()

    async def _relay(self, first: Chunk, rest: DeploymentResponseGenerator, record: RequestRecord,
                     deadline: float, hold: Hold) -> AsyncIterator[str | bytes]:
        """Pass SSE events through as they arrive, keeping count of tokens: the first came on the Serve call, the
        rest come on the stream's channel (:mod:`router.channel_client`).

        If the client leaves, Starlette stops this generator: dropping the channel makes the engine replica abort
        the vLLM request at its next write, and cancelling the Serve call aborts it at once. A stream that cannot go
        on (its replica died, or it ran out of time) ends with an error event and ``[DONE]``: its status line is
        long gone, and a client must not be left waiting."""
        channel: Channel | None = None
        expiry: asyncio.TimerHandle | None = None
        try:
            yield first.data
            last = time.perf_counter()
            if first.channel is not None:
                channel = await self._within(deadline, self.channels.open(first.channel))
                expiry = asyncio.get_running_loop().call_later(deadline - time.perf_counter(), channel.expire)
                while text := await channel.read():
                    now = time.perf_counter()
                    self.metrics.token_gap(record, now - last)
                    last = now
                    record.prompt_tokens, record.completion_tokens = channel.prompt_tokens, channel.completion_tokens
                    yield text
                # The whole stream is relayed; its Serve call ends with nothing more on it (the loop below only sees
                # its end). Its end must still be read: until then Serve counts the request as ongoing, which
                # autoscaling and replica choice go by.
            while True:
                try:
                    chunk = await self._within(deadline, rest.__anext__())
                except StopAsyncIteration:
                    break
                record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                if chunk.data:  # a stream without a channel (a test's scripted engine) sends its events here
                    now = time.perf_counter()
                    self.metrics.token_gap(record, now - last)
                    last = now
                    yield chunk.data
        except TimeoutError:
            record.status = 504
            yield ErrorReply(504, f"The stream did not finish within {deadline - record.arrived_at:g}s.",
                             "timeout_error", None, "request_timeout").sse()
        except (GeneratorExit, asyncio.CancelledError):
            record.client_disconnected = True
            raise
        except Exception:
            logger.exception("stream for %s broke off", record.served_model)
            record.status = 502
            yield ErrorReply(502, "The engine serving this stream failed. The output so far is incomplete.",
                             "server_error", None, "engine_error").sse()
        finally:
            if expiry is not None:
                expiry.cancel()
            if channel is not None:
                channel.close()
            cancel(rest)
            hold.release()

    @staticmethod
    async def _within(deadline: float, step: Awaitable[T]) -> T:
        async with asyncio.timeout(deadline - time.perf_counter()):
            return await step

    async def readiness(self) -> JSONResponse:
        """Every model Serve wants a replica of has one running: a deployment still starting, or failing, with none
        running is waited for; one scaled to zero (healthy with none) or scaling up on demand is not."""
        status = await asyncio.to_thread(serve.status)
        # By deployment name in any application: the model's own (router/app.py), or this one under `serve run`.
        deployments = {name: info for app in status.applications.values() for name, info in app.deployments.items()}
        waiting = []
        for model in self.config.models:
            info = deployments.get(model.deployment_name)
            if info is None or (info.replica_states.get("RUNNING", 0) == 0 and info.status != "HEALTHY"
                                and info.status_trigger != "AUTOSCALING"):
                waiting.append(model.id)
        if waiting:
            return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
        return JSONResponse({"status": "ready"})

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise OpenAIError.model_not_found(name)
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "rayroute"}
        if name in self.parents:  # as vLLM lists an adapter
            card["parent"] = self.parents[name]
        elif self.models[name].id != name:
            card["root"] = self.models[name].id
        return card


# A plain class underneath, so tests can drive it with fake engine handles and no Ray cluster; router.app sets
# its replicas and limits from the config.
Router = serve.deployment(serve.ingress()(OpenAIRouter))


def build_http_app(router: OpenAIRouter) -> FastAPI:
    app = FastAPI(title="rayroute", version="1", summary="OpenAI-compatible API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_middleware(app, router.metrics, router.auth, router.config.max_request_bytes,
                       addresses=ClientAddresses(hops=router.config.routers.trusted_proxy_hops))

    def capped(endpoint: Endpoint) -> Any:
        """The request caps (``request_limits``) of an endpoint, as a dependency: FastAPI runs dependencies after
        parsing the JSON (``request.json()`` returns that same parse) and before validating the body model, so an
        oversized list is refused before a single object is built for it."""
        async def check(request: Request) -> None:
            try:
                raw = await request.json()
            except ValueError:  # not JSON: the body model's validation says so
                return
            check_request_caps(endpoint, raw, router.config.request_limits)

        return Depends(check)

    @app.post("/v1/chat/completions", dependencies=[capped("chat")])
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        return await router.forward("chat", body, request)

    @app.post("/v1/completions", dependencies=[capped("completions")])
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await router.forward("completions", body, request)

    @app.post("/v1/embeddings", dependencies=[capped("embeddings")])
    async def embeddings(body: EmbeddingBody, request: Request) -> Response:
        return await router.forward("embeddings", body, request)

    @app.post("/v1/responses", dependencies=[capped("responses")])
    async def responses(body: ResponsesBody, request: Request) -> Response:
        reject_stateful(body)
        return await router.forward("responses", body, request)

    # The Responses API's stored-response routes: nothing is stored (see router.protocol.NOT_STORED). Not in the
    # OpenAPI document, which describes what is served.
    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"], include_in_schema=False)
    @app.api_route("/v1/responses/{response_id}/{action}", methods=["GET", "POST"], include_in_schema=False)
    async def stored_response(response_id: str, action: str = "") -> Response:
        raise OpenAIError(400, f"Stored responses cannot be read or cancelled: {NOT_STORED}", param=None,
                          code="unsupported_endpoint")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [router.model_card(name) for name in router.models]}

    # `:path` because model ids contain slashes (Qwen/Qwen2.5-7B-Instruct).
    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return router.model_card(model_id)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the router process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return await router.readiness()

    return app
