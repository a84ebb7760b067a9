"""ASGI middleware around every request: the request id and access log, authentication, the body-size limit.

Order matters, and :func:`install_middleware` fixes it. The request log is outermost, so every answer, a 401 or
a 413 too, carries an ``X-Request-Id`` and gets its log line and metrics. Authentication comes next, so a client
without a valid key learns nothing about the body rules and costs no body read (and one that keeps failing is
throttled: :mod:`router.auth_throttle`); the size limit runs last, so no oversized body is ever parsed. All are
plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would wrap every streamed response in an extra
task and break the cancellation that aborts engine requests.

Metric labels take values from fixed sets only, whatever a client sends: a request's ``endpoint`` is the template
of the route it matched (``/v1/models/{model_id}``), or ``other`` when none did, never its path; otherwise every
made-up URL would be a new time series in every router replica and in Prometheus. The access log keeps the path
too (``path``, cut to :data:`LOGGED_PATH_CHARS`): which URL a misconfigured client asks for is worth seeing there.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.replies import ErrorReply
from router.auth import CHALLENGE, ApiKeyAuth
from router.auth_throttle import ClientAddresses, FailedAuthThrottle
from router.errors import error_response
from router.telemetry import GatewayMetrics, RequestRecord, access_log

# Routes under this prefix need a key; /health and /ready are for probes and need none.
PROTECTED_PREFIX = "/v1/"


# A client's own request id is kept when it is short and plain; anything else is replaced, never echoed.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RECORD_KEY = "rayroute_record"  # where the request's RequestRecord lives in scope["state"]
API_KEY_KEY = "rayroute_api_key"  # where the caller's ApiKey lives in scope["state"] (absent without auth)
OTHER_ENDPOINT = "other"  # the endpoint label of a request no route matched
# The access log keeps a request's path as sent, cut to this many characters: enough for any real route and model
# id, and a client cannot make a line as long as it likes.
LOGGED_PATH_CHARS = 256


class RequestLogMiddleware:
    """Gives each API request an id (the client's ``X-Request-Id`` or a new one), returns it in the response
    headers, and when the response is done logs one JSON line and records the request's metrics."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        offered = _header(scope, b"x-request-id")
        request_id = offered if offered and _CLIENT_REQUEST_ID.match(offered) else f"req-{uuid.uuid4().hex}"
        record = RequestRecord(request_id=request_id, endpoint=route_template(scope), model="", served_model="",
                               path=scope["path"][:LOGGED_PATH_CHARS])
        scope.setdefault("state", {})[RECORD_KEY] = record
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not started:  # Starlette's outermost handler answers 500, outside this middleware
                record.status = 500
            raise
        finally:
            record.finished_at = time.perf_counter()
            self.metrics.finished(record)
            access_log.info(record.log_line())


class ApiKeyMiddleware:
    """401 for a missing or wrong key, or 429 once its client address has failed too often (``throttle``)."""

    def __init__(self, app: ASGIApp, auth: ApiKeyAuth, throttle: FailedAuthThrottle, addresses: ClientAddresses):
        self.app = app
        self.auth = auth
        self.throttle = throttle
        self.addresses = addresses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX) and self.auth.enabled:
            found = self.auth.check(_header(scope, b"authorization"))
            if isinstance(found, ErrorReply):
                client = scope.get("client")
                address = self.addresses(client[0] if client else None, _headers(scope, b"x-forwarded-for"))
                wait = self.throttle.failed(address)
                if wait is not None:
                    found = self.throttle.reply(wait)
                await error_response(found, CHALLENGE if wait is None else None)(scope, receive, send)
                return
            scope.setdefault("state", {})[API_KEY_KEY] = found
            record = scope["state"].get(RECORD_KEY)
            if record is not None:
                record.key_name = found.name
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``, by its Content-Length or, when chunked, by what arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        # Read the whole body up front (Serve's proxy has buffered it already) and hand it on unchanged.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        reply = ErrorReply.invalid_request(f"The request body is larger than the limit of {self.max_bytes} bytes.",
                                           code="request_too_large", status=413)
        await error_response(reply)(scope, receive, send)


def install_middleware(app: Any, metrics: GatewayMetrics, auth: ApiKeyAuth, max_request_bytes: int,
                       throttle: FailedAuthThrottle | None = None, addresses: ClientAddresses | None = None) -> None:
    """``throttle`` and ``addresses``: the failed-key throttle and how a client's address is found behind proxies;
    by default, as :mod:`deployments.constants` sets them. Each app has its own throttle, so each router replica."""
    # add_middleware wraps what is already there: the last one added runs first. So: log, auth, size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(ApiKeyMiddleware, auth=auth, throttle=throttle or FailedAuthThrottle(),
                       addresses=addresses or ClientAddresses())
    app.add_middleware(RequestLogMiddleware, metrics=metrics)


def route_template(scope: Scope) -> str:
    """The path template of the route the request matches (as Starlette's router will pick it: the first full
    match, else the first that matches all but the method, which answers 405), or :data:`OTHER_ENDPOINT`. Asked
    here, before routing, because authentication can answer before the router runs."""
    partial = None
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path_format", OTHER_ENDPOINT)
        if match is Match.PARTIAL and partial is None:
            partial = route
    return getattr(partial, "path_format", OTHER_ENDPOINT)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]
