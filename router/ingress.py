"""The HTTP edge: a FastAPI app on a Ray Serve ingress deployment.

A request's path through this file: authenticate (first thing in every ``/v1`` route) → parse and check the body
(:mod:`router.protocol`) → look up the model's deployment handle by the ``model`` field (ids and aliases) →
call the engine replica as a Serve stream → answer with its first item (an error, a finished body, or the first
SSE line followed by the rest as they arrive).
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
from deployments.engine import ErrorReply, FullReply
from router.auth import ApiKeyAuth, load_api_keys
from router.errors import OpenAIError, error_response, install_error_handlers
from router.protocol import check_chat_body, parse_json_object

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Module-level helpers stand above the class: Serve serializes the class when it is decorated.
async def _relay(first: str, rest: DeploymentResponseGenerator) -> AsyncIterator[str]:
    """Pass SSE lines through as they arrive. If the client leaves, Starlette cancels this generator; cancelling
    the Serve call carries that to the engine replica, where vLLM aborts the request."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        rest.cancel()


app = FastAPI(title="rayroute", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(app)


@serve.deployment(max_ongoing_requests=4096)
@serve.ingress(app)
class Router:
    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle]):
        self.config = ServeArgs.model_validate(config)
        self.created = int(time.time())
        # Every name a client may send (ids and aliases) → the handle of the deployment serving it.
        self.handles: dict[str, DeploymentHandle] = {}
        self.owner: dict[str, str] = {}
        for model in self.config.models:
            for name in model.names:
                self.handles[name] = engines[model.id].options(stream=True)
                self.owner[name] = model.id
        self.auth = ApiKeyAuth(load_api_keys())

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: the router process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: every model that should have a replica has one running."""
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

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self.auth(request)
        return {"object": "list", "data": [self._model_card(name) for name in self.handles]}

    # `:path` because model ids contain slashes (Qwen/Qwen2.5-7B-Instruct).
    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        self.auth(request)
        if model_id not in self.handles:
            raise OpenAIError.model_not_found(model_id)
        return self._model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        # Authenticate before reading the body: an unauthenticated client gets no work done on its behalf.
        self.auth(request)
        body = parse_json_object(await request.body())
        checked = check_chat_body(body)
        handle = self.handles.get(checked.model)
        if handle is None:
            raise OpenAIError.model_not_found(checked.model)
        stream: DeploymentResponseGenerator = handle.chat.remote(body)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(502, "The engine ended the response without output.", "server_error") from None
        except BaseException:
            stream.cancel()
            raise
        if isinstance(first, ErrorReply):
            return error_response(first)
        if isinstance(first, FullReply):
            return Response(first.body, media_type="application/json")
        return StreamingResponse(_relay(first, stream), media_type="text/event-stream", headers=_SSE_HEADERS)

    def _model_card(self, name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "rayroute"}
        if self.owner[name] != name:
            card["root"] = self.owner[name]
        return card
