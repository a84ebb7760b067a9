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
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import ServeArgs
from deployments.replies import Chunk, ErrorReply, FullReply
from router.auth import ApiKeyAuth, load_api_keys
from router.errors import OpenAIError, error_response, install_error_handlers
from router.middleware import RECORD_KEY, install_middleware
from router.protocol import ChatCompletionBody, CompletionBody, EmbeddingBody, reject_media
from router.telemetry import GatewayMetrics, RequestRecord, enable_access_log

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIRouter:
    """Routes OpenAI requests to engine deployments; :data:`Router` is this class as a Serve ingress deployment."""

    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle]):
        self.config = ServeArgs.model_validate(config)
        self.created = int(time.time())
        # Every name a client may send (ids and aliases) → the handle of the deployment serving it.
        self.handles: dict[str, DeploymentHandle] = {}
        self.models = {}
        for model in self.config.models:
            for name in model.names:
                self.handles[name] = engines[model.id].options(stream=True)
                self.models[name] = model
        self.metrics = GatewayMetrics()
        enable_access_log()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self)

    async def forward(self, endpoint: str, body: ChatCompletionBody | CompletionBody | EmbeddingBody,
                      request: Request) -> Response:
        """Send a checked request to its model's engine and answer with what comes back."""
        handle = self.handles.get(body.model)
        if handle is None:
            raise OpenAIError.model_not_found(body.model)
        if isinstance(body, ChatCompletionBody) and not self.models[body.model].multimodal:
            reject_media(body)
        record: RequestRecord = getattr(request.state, RECORD_KEY)
        record.model, record.served_model = body.model, self.models[body.model].id
        record.dispatched_at = time.perf_counter()
        self.metrics.started(record)
        stream: DeploymentResponseGenerator = getattr(handle, endpoint).remote(body.model_dump(exclude_unset=True))
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(502, "The engine ended the response without output.", "server_error") from None
        except BaseException:
            stream.cancel()
            raise
        record.first_reply_at = time.perf_counter()
        self.metrics.first_reply(record)
        if isinstance(first, ErrorReply):
            return error_response(first)
        record.prompt_tokens, record.completion_tokens = first.prompt_tokens, first.completion_tokens
        if isinstance(first, FullReply):
            return Response(first.body, media_type="application/json")
        return StreamingResponse(self._relay(first, stream, record), media_type="text/event-stream",
                                 headers=_SSE_HEADERS)

    async def _relay(self, first: Chunk, rest: DeploymentResponseGenerator,
                     record: RequestRecord) -> AsyncIterator[str]:
        """Pass SSE events through as they arrive, keeping count of tokens. If the client leaves, Starlette
        cancels this generator; cancelling the Serve call carries that to the engine replica, where vLLM aborts
        the request."""
        try:
            yield first.data
            last = time.perf_counter()
            async for chunk in rest:
                now = time.perf_counter()
                self.metrics.token_gap(record, now - last)
                last = now
                record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                yield chunk.data
        except (GeneratorExit, asyncio.CancelledError):
            record.client_disconnected = True
            raise
        finally:
            rest.cancel()

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


# A plain class underneath, so tests can drive it with fake engine handles and no Ray cluster.
Router = serve.deployment(max_ongoing_requests=4096)(serve.ingress()(OpenAIRouter))


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
