"""The HTTP edge: a FastAPI app on a Ray Serve ingress deployment.

A request's path through this file: the middleware authenticates and bounds the body (:mod:`router.middleware`)
→ FastAPI parses and checks it against the route's body model (:mod:`router.protocol`) → :meth:`OpenAIRouter.forward`
looks up the model's deployment handle by the ``model`` field (ids and aliases) and calls the engine replica as a
Serve stream → the response starts on its first item: an error, a finished body, or the first SSE line followed
by the rest as they arrive.

The FastAPI app is built in the replica, after the constructor (``__serve_build_asgi_app__``), so its routes,
middleware and limits come from this deployment's config rather than from a module-level app frozen at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import ModelConfig, ServeArgs
from deployments.replies import ENGINE_UNAVAILABLE, Admitted, Chunk, EngineItem, ErrorReply, FullReply
from router.auth import ApiKey, ApiKeyAuth, load_api_keys
from router.errors import OpenAIError, error_response, install_error_handlers
from router.limits import Admission
from router.middleware import API_KEY_KEY, RECORD_KEY, install_middleware
from router.protocol import ChatCompletionBody, CompletionBody, EmbeddingBody, reject_media
from router.telemetry import GatewayMetrics, RequestRecord, enable_access_log

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Between attempts at a request whose replica failed: long enough for Serve to notice, short next to a timeout.
_RETRY_PAUSE_S, _RETRY_PAUSE_MAX_S = 0.25, 2.0
# What a 503 (no replica within the queue timeout) tells clients to wait: about the time a replica takes to start.
_UNAVAILABLE_RETRY_AFTER_S = 10.0

logger = logging.getLogger("rayroute.router")


class OpenAIRouter:
    """Routes OpenAI requests to engine deployments; :data:`Router` is this class as a Serve ingress deployment.

    ``limits`` is the handle of the :class:`router.limits.KeyLimits` deployment every router replica shares.
    """

    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle],
                 limits: DeploymentHandle | None = None):
        self.config = ServeArgs.model_validate(config)
        self.created = int(time.time())
        # Every name a client may send (ids and aliases) → the handle of the deployment serving it.
        self.handles: dict[str, DeploymentHandle] = {}
        self.models: dict[str, ModelConfig] = {}
        for model in self.config.models:
            for name in model.names:
                self.handles[name] = engines[model.id].options(stream=True)
                self.models[name] = model
        self.limits = limits
        self.metrics = GatewayMetrics()
        enable_access_log()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    async def forward(self, endpoint: str, body: ChatCompletionBody | CompletionBody | EmbeddingBody,
                      request: Request) -> Response:
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
        record: RequestRecord = getattr(request.state, RECORD_KEY)
        record.model, record.served_model = body.model, model.id
        headers = await self._admit(key)
        record.dispatched_at = time.perf_counter()
        self.metrics.started(record)
        streaming = bool(getattr(body, "stream", False))
        try:
            first, stream = await self._dispatch(endpoint, model, body.model_dump(exclude_unset=True), record,
                                                 streaming)
        except OpenAIError as exc:
            exc.headers.update(headers)
            raise
        record.first_reply_at = time.perf_counter()
        self.metrics.first_reply(record)
        if isinstance(first, ErrorReply):
            return error_response(first, headers)
        record.prompt_tokens, record.completion_tokens = first.prompt_tokens, first.completion_tokens
        if isinstance(first, FullReply):
            self._charge(key, record)
            return Response(first.body, media_type="application/json", headers=headers)
        deadline = record.arrived_at + model.timeouts.total_s
        return StreamingResponse(self._relay(first, stream, record, deadline, key), media_type="text/event-stream",
                                 headers={**_SSE_HEADERS, **headers})

    async def _admit(self, key: ApiKey | None) -> dict[str, str]:
        """A limited key's turn: its rate-limit headers, or a 429 when it has used its minute's allowance."""
        if key is None or not key.limited or self.limits is None:
            return {}
        admission: Admission = await self.limits.admit.remote(key.name, key.requests_per_minute,
                                                              key.tokens_per_minute)
        if not admission.allowed:
            raise OpenAIError(429, f"Rate limit reached for `{key.name}` on {admission.limited_by} per minute. "
                              f"Retry in {admission.retry_after_s:.1f}s.", "rate_limit_error", None,
                              "rate_limit_exceeded", admission.retry_after_s, dict(admission.headers))
        return dict(admission.headers)

    def _charge(self, key: ApiKey | None, record: RequestRecord) -> None:
        if key is not None and key.tokens_per_minute and self.limits is not None:
            # Not awaited: the answer need not wait for the bookkeeping.
            self.limits.charge.remote(key.name, key.tokens_per_minute,
                                      record.prompt_tokens + record.completion_tokens)

    async def _dispatch(self, endpoint: str, model: ModelConfig, payload: dict[str, Any], record: RequestRecord,
                        streaming: bool) -> tuple[EngineItem, DeploymentResponseGenerator]:
        """Call the engine until it gives a first answer, within the model's timeouts.

        A call that fails before its replica admitted the request (the replica is gone, or its engine died) never
        ran, so it is sent again, after a short pause, until the queue timeout: meanwhile Serve replaces the
        replica or routes to another. One that fails after admission is retried once only, so a request that
        itself kills engines cannot take down one replica after another.
        """
        timeouts = model.timeouts
        queue_deadline = record.arrived_at + timeouts.queue_s
        total_deadline = record.arrived_at + timeouts.total_s
        handle = self.handles[payload["model"]]
        failed_after_admission = 0
        pause = _RETRY_PAUSE_S
        while True:
            record.attempts += 1
            stream: DeploymentResponseGenerator | None = None
            admitted = False
            first_token_deadline = total_deadline
            try:
                stream = getattr(handle, endpoint).remote(payload)
                async with asyncio.timeout(queue_deadline - time.perf_counter()):
                    item = await stream.__anext__()
                if isinstance(item, Admitted):
                    admitted = True
                    if streaming:
                        first_token_deadline = min(total_deadline, time.perf_counter() + timeouts.first_token_s)
                    async with asyncio.timeout(first_token_deadline - time.perf_counter()):
                        item = await stream.__anext__()
            except TimeoutError:
                _cancel(stream)
                raise self._timeout(model, admitted, first_token_deadline < total_deadline) from None
            except BackPressureError as exc:
                _cancel(stream)
                raise OpenAIError(429, f"The model `{payload['model']}` is at capacity: too many requests are "
                                  "queued for it. Retry shortly.", "rate_limit_error", None, "model_at_capacity",
                                  exc.retry_after_s or 1.0) from None
            except RayActorError:
                _cancel(stream)
                item = None  # the replica died or cannot be reached
            except StopAsyncIteration:
                raise OpenAIError(502, "The engine ended the response without output.", "server_error") from None
            except BaseException:
                _cancel(stream)
                raise
            if item is not None and not (isinstance(item, ErrorReply) and item.code == ENGINE_UNAVAILABLE):
                return item, stream
            _cancel(stream)
            failed_after_admission += admitted
            if failed_after_admission > 1:
                raise OpenAIError(502, "The engine failed while answering this request, twice. It was not "
                                  "retried again.", "server_error", None, "engine_error")
            if time.perf_counter() + pause > queue_deadline:
                raise self._timeout(model, False, False)
            logger.warning("retrying a %s request for %s after a replica failure (attempt %d)", endpoint,
                           model.id, record.attempts)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_PAUSE_MAX_S)

    @staticmethod
    def _timeout(model: ModelConfig, admitted: bool, first_token: bool) -> OpenAIError:
        timeouts = model.timeouts
        if not admitted:
            return OpenAIError(503, f"No replica of `{model.id}` could take the request within "
                               f"{timeouts.queue_s:g}s (starting up or busy). Retry later.", "server_error", None,
                               "model_unavailable", _UNAVAILABLE_RETRY_AFTER_S)
        if first_token:
            return OpenAIError(408, f"The model `{model.id}` produced no token within {timeouts.first_token_s:g}s.",
                               "timeout_error", None, "first_token_timeout")
        return OpenAIError(504, f"The request to `{model.id}` did not finish within {timeouts.total_s:g}s.",
                           "timeout_error", None, "request_timeout")

    async def _relay(self, first: Chunk, rest: DeploymentResponseGenerator, record: RequestRecord,
                     deadline: float, key: ApiKey | None) -> AsyncIterator[str]:
        """Pass SSE events through as they arrive, keeping count of tokens. If the client leaves, Starlette
        cancels this generator; cancelling the Serve call carries that to the engine replica, where vLLM aborts
        the request. A stream that cannot go on (its replica died, or it ran out of time) ends with an error
        event and ``[DONE]``: its status line is long gone, and a client must not be left waiting."""
        try:
            yield first.data
            last = time.perf_counter()
            while True:
                try:
                    async with asyncio.timeout(deadline - last):
                        chunk = await rest.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    record.status = 504
                    yield ErrorReply(504, f"The stream did not finish within {deadline - record.arrived_at:g}s.",
                                     "timeout_error", None, "request_timeout").sse()
                    break
                except Exception:
                    logger.exception("stream for %s broke off", record.served_model)
                    record.status = 502
                    yield ErrorReply(502, "The engine serving this stream failed. The output so far is incomplete.",
                                     "server_error", None, "engine_error").sse()
                    break
                now = time.perf_counter()
                self.metrics.token_gap(record, now - last)
                last = now
                record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                yield chunk.data
        except (GeneratorExit, asyncio.CancelledError):
            record.client_disconnected = True
            raise
        finally:
            _cancel(rest)
            self._charge(key, record)

    async def readiness(self) -> JSONResponse:
        """Every model that should have a replica has one running."""
        status = await asyncio.to_thread(serve.status)
        app_status = status.applications.get(serve.get_replica_context().app_name)
        deployments = app_status.deployments if app_status else {}
        waiting = []
        for model in self.config.models:
            info = deployments.get(model.deployment_name)
            running = info.replica_states.get("RUNNING", 0) if info else 0
            if running == 0 and model.autoscaling.min_replicas > 0:
                waiting.append(model.id)
        if waiting:
            return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
        return JSONResponse({"status": "ready"})

    def model_card(self, name: str) -> dict[str, Any]:
        if name not in self.models:
            raise OpenAIError.model_not_found(name)
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "rayroute"}
        if self.models[name].id != name:
            card["root"] = self.models[name].id
        return card


def _cancel(stream: DeploymentResponseGenerator | None) -> None:
    if stream is not None:
        # Cancelling a call that already failed raises its error again (Ray 2.60); it is handled where it came.
        with contextlib.suppress(Exception):
            stream.cancel()


# A plain class underneath, so tests can drive it with fake engine handles and no Ray cluster; router.app sets
# its replicas and limits from the config.
Router = serve.deployment(serve.ingress()(OpenAIRouter))


def build_http_app(router: OpenAIRouter) -> FastAPI:
    app = FastAPI(title="rayroute", version="1", summary="OpenAI-compatible API", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    install_middleware(app, router.metrics, ApiKeyAuth(load_api_keys()), router.config.max_request_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        return await router.forward("chat", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await router.forward("completions", body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, request: Request) -> Response:
        return await router.forward("embeddings", body, request)

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
