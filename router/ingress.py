"""The HTTP edge: a FastAPI app on a Ray Serve ingress deployment.

A request's path: the middleware authenticates and bounds the body (:mod:`router.middleware`) → FastAPI parses and
checks it against the route's body model (:mod:`router.protocol`; request caps on the parsed JSON first,
:func:`build_http_app`) → :meth:`OpenAIRouter.forward` finds the name's route (:mod:`router.routes`), checks the key
may use it, admits the request against the key's limits (:mod:`router.admission`), and asks the model's engine,
or its fallbacks (:mod:`router.fallbacks`, :mod:`router.dispatch`) → the answer starts on the engine's first item:
an error, a finished body, or a stream relayed as it comes (:mod:`router.relay`) → when the request ends, however
it ends, its admission is released. ``/ready`` is :mod:`router.readiness`.

The FastAPI app is built in the replica, after the constructor (``__serve_build_asgi_app__``), so its routes,
middleware and limits come from this deployment's config rather than from a module-level app frozen at import.
The constructor only builds: work that runs on the replica's event loop (publishing the gauges, following the keys
file) starts with the app's lifespan (:meth:`OpenAIRouter.running`), which Serve runs when the replica starts and
stops, and a test runs by entering its ``TestClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api_keys import ApiKey
from deployments.config import RouterArgs, Routers
from deployments.constants import MAX_SESSION_CHARS
from deployments.interface import Endpoint
from deployments.logs import send_our_logs_to_serve
from deployments.prompt_tokens import import_transformers
from deployments.replies import ErrorReply, FullReply
from router.admission import Admitter
from router.auth import API_KEYS_FILE_ENV, ApiKeyAuth, follow_keys_file, load_api_keys
from router.auth_throttle import ClientAddresses
from router.channel_client import ChannelClient
from router.errors import OpenAIError, error_response, install_error_handlers
from router.fallbacks import call_with_fallbacks, fallback_headers, lifetime_s
from router.media import check_media_urls
from router.middleware import API_KEY_KEY, RECORD_KEY, install_middleware
from router.protocol import (
    NOT_STORED,
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    RequestBody,
    ResponsesBody,
    check_request_caps,
    reject_media,
    reject_stateful,
)
from router.readiness import readiness
from router.relay import streamed_response
from router.routes import build_routes, route_of
from router.telemetry import GatewayMetrics, RequestRecord, enable_access_log


class OpenAIRouter:
    """Routes OpenAI requests to engine deployments; :data:`Router` is this class as a Serve ingress deployment.

    ``limits`` is the handle of the :class:`router.limits.KeyLimits` deployment every router replica shares;
    ``channels`` opens streams' channels (a test's stands in for the engines' channel servers).
    """

    def __init__(self, config: dict[str, Any], engines: dict[str, DeploymentHandle],
                 limits: DeploymentHandle | None = None, *, channels: ChannelClient | None = None):
        self.config = RouterArgs.model_validate(config)
        self.created = int(time.time())
        self.routes = build_routes(self.config, engines)
        self.admitter = Admitter(limits, self.config.routers)
        self.metrics = GatewayMetrics(((name, route.model.id) for name, route in self.routes.items()),
                                      {model.id: model.replica_choice for model in self.config.models})
        self.auth = ApiKeyAuth(load_api_keys())
        self.channels = channels if channels is not None else ChannelClient()
        self.keys_follower: asyncio.Task | None = None
        enable_access_log()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's step after the constructor, in the replica only: the replica's log lines go to Serve's
        handlers here, not in the constructor, so a test that builds a router keeps the logging pytest set up."""
        send_our_logs_to_serve()
        if any(model.replica_choice == "kv_cache" for model in self.config.models):
            import_transformers()  # before the replica serves: see deployments/prompt_tokens.py
        return build_http_app(self)

    @contextlib.asynccontextmanager
    async def running(self, _: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan, on the loop that serves the requests: the gauges are published from the start, and
        a keys file (``RAYROUTE_API_KEYS_FILE``) is followed, so rotated keys take effect without a restart."""
        self.metrics.publish_gauges()
        if keys_file := os.environ.get(API_KEYS_FILE_ENV):
            self.keys_follower = asyncio.create_task(follow_keys_file(self.auth, Path(keys_file)))
        try:
            yield
        finally:
            follower, self.keys_follower = self.keys_follower, None
            if follower is not None:
                follower.cancel()
                await asyncio.wait([follower])
            await self.metrics.stop_publishing()
            await self.channels.close()

    async def forward(self, endpoint: Endpoint, body: RequestBody, request: Request) -> Response:
        """Send a checked request to its model's engine and answer with what comes back."""
        route = route_of(self.routes, body.model)
        model = route.model
        key: ApiKey | None = getattr(request.state, API_KEY_KEY, None)
        if key is not None and not key.may_use(body.model, model.id):
            raise OpenAIError(ErrorReply.permission(f"This API key may not use the model `{body.model}`.",
                                                    param="model", code="model_not_allowed"))
        if isinstance(body, ChatCompletionBody) and not model.multimodal:
            reject_media(body)
        await check_media_urls(body, model)  # media URLs only from the model's allowed domains (router/media.py)
        record: RequestRecord = getattr(request.state, RECORD_KEY)
        record.model, record.served_model = body.model, model.id
        hold = await self.admitter.admit(key, body, record, lifetime_s(self.routes, route))
        headers = dict(hold.headers)
        try:
            record.dispatched_at = time.perf_counter()
            self.metrics.started(record)
            streaming = bool(getattr(body, "stream", False))
            try:
                answer = await call_with_fallbacks(self.routes, route, endpoint, body, record, key, streaming,
                                                   self.metrics, session_of(request, body, self.config.routers))
            except OpenAIError as exc:
                exc.headers.update(headers)
                raise
            headers.update(fallback_headers(record))
            record.first_reply_at = time.perf_counter()
            self.metrics.first_reply(record)
            first = answer.first
            if isinstance(first, ErrorReply):
                hold.release()
                return error_response(first, headers)
            record.prompt_tokens, record.completion_tokens = first.prompt_tokens, first.completion_tokens
            if isinstance(first, FullReply):
                hold.release()
                return Response(first.body, media_type="application/json", headers=headers)
            return streamed_response(answer, endpoint, record, hold, self.channels, self.metrics, headers)
        except BaseException:  # an error raised, or the client left while the engine was asked
            hold.release()
            raise

    def model_card(self, name: str) -> dict[str, Any]:
        return route_of(self.routes, name).card(self.created)


def session_of(request: Request, body: RequestBody, routers: Routers) -> str | None:
    """The client's session, for a model placed by session (``replica_choice: session``): the session header, else
    the body's ``user``. Only hashed to pick a replica; cut to :data:`MAX_SESSION_CHARS` all the same."""
    session = request.headers.get(routers.session_header) or getattr(body, "user", None)
    return session[:MAX_SESSION_CHARS] if session else None


# A plain class underneath, so tests can drive it with fake engine handles and no Ray cluster; router.app sets
# its replicas and limits from the config.
Router = serve.deployment(serve.ingress()(OpenAIRouter))


def build_http_app(router: OpenAIRouter) -> FastAPI:
    app = FastAPI(title="rayroute", version="1", summary="OpenAI-compatible API", docs_url=None, redoc_url=None,
                  lifespan=router.running)
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
        raise OpenAIError(ErrorReply.invalid_request(f"Stored responses cannot be read or cancelled: {NOT_STORED}",
                                                     code="unsupported_endpoint"))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [route.card(router.created) for route in router.routes.values()]}

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
        return await readiness(router.config.models)

    return app
