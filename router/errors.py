"""OpenAI's error envelope, the only error shape a client of this API ever sees.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}

Client mistakes are 4xx with ``invalid_request_error`` (or the specific OpenAI type); a 5xx means an engine or
this code really failed. Handlers here replace FastAPI's and Starlette's own error bodies, which clients' SDKs
would not parse.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.replies import ErrorReply, validation_error

logger = logging.getLogger("rayroute.router")

_TYPE_BY_STATUS = {401: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
                   405: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    """Raise anywhere in the router to answer with ``reply`` (and ``headers``, e.g. rate-limit counts)."""

    def __init__(self, reply: ErrorReply, *, headers: dict[str, str] | None = None):
        super().__init__(reply.message)
        self.reply = reply
        self.headers = headers or {}

    @classmethod
    def model_not_found(cls, model: str) -> OpenAIError:
        return cls(ErrorReply.invalid_request(f"The model `{model}` does not exist or you do not have access to it.",
                                              param="model", code="model_not_found", status=404))


def error_response(reply: ErrorReply, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if reply.retry_after_s is not None:  # whole seconds: the HTTP form every client (and the OpenAI SDK) reads
        headers["Retry-After"] = str(max(1, math.ceil(reply.retry_after_s)))
    return JSONResponse(reply.envelope(), status_code=reply.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.reply, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes and wrong methods: still the envelope, so SDKs show the message.
        fallback = "invalid_request_error" if exc.status_code < 500 else "server_error"
        kind = _TYPE_BY_STATUS.get(exc.status_code, fallback)
        code = "unknown_url" if exc.status_code == 404 else None
        return error_response(ErrorReply(status=exc.status_code, message=str(exc.detail), type=kind, code=code),
                              getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI locates body errors under "body"; clients name parameters from the top of their JSON.
        errors = [{**e, "loc": tuple(e["loc"])[1:] if tuple(e["loc"])[:1] == ("body",) else tuple(e["loc"])}
                  for e in exc.errors()]
        broken = next((e for e in errors if e["type"] == "json_invalid"), None)
        if broken is not None:
            detail = broken.get("ctx", {}).get("error", broken["msg"])
            return error_response(ErrorReply.invalid_request(f"The request body is not valid JSON: {detail}",
                                                             code="invalid_json"))
        if any(not e["loc"] for e in errors):  # no body, or JSON that is not an object
            return error_response(ErrorReply.invalid_request("The request body must be a JSON object.",
                                                             code="invalid_json"))
        return error_response(validation_error(errors, exc.body))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the router")
        return error_response(ErrorReply.server("The server had an error while processing your request.",
                                                code="internal_error"))
