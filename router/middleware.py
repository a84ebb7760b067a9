"""ASGI middleware that answers before a request body is read: authentication, then the body-size limit.

Order matters, and :func:`install_middleware` fixes it: authentication runs first (outermost), so a client
without a valid key learns nothing about the body rules and costs no body read; the size limit runs next, so no
oversized body is ever parsed. Both are plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which would
wrap every streamed response in an extra task and break the cancellation that aborts engine requests.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.engine import ErrorReply
from router.auth import CHALLENGE, ApiKeyAuth
from router.errors import error_response

# Routes under this prefix need a key; /health and /ready are for probes and need none.
PROTECTED_PREFIX = "/v1/"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, auth: ApiKeyAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX) and self.auth.enabled:
            failure = self.auth.check(_header(scope, b"authorization"))
            if failure is not None:
                await error_response(failure, CHALLENGE)(scope, receive, send)
                return
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
        reply = ErrorReply(413, f"The request body is larger than the limit of {self.max_bytes} bytes.",
                           "invalid_request_error", None, "request_too_large")
        await error_response(reply)(scope, receive, send)


def install_middleware(app: Any, auth: ApiKeyAuth, max_request_bytes: int) -> None:
    # add_middleware wraps what is already there: the last one added runs first. So: size limit, then auth.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(ApiKeyMiddleware, auth=auth)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
