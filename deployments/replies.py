"""What an engine replica sends back to the router, and the adjustments made to vLLM's replies on the way.

An engine call is a stream of items: first :class:`Admitted` (a replica took the request), then an
:class:`ErrorReply`, a :class:`FullReply`, or a :class:`Chunk` (SSE events), then, for a stream, more chunks (a
stream's events after the first travel on its channel, outside Serve, each framed with the counts so far).
Every reply carries the request's token usage so far, so the router can count exactly the tokens clients
received, also for a stream whose client left before its end.

vLLM's replies are adjusted to what OpenAI returns: usage reported only where the client asked for it, a choice
with tool calls finishing with ``"tool_calls"`` (vLLM 0.32 says ``"stop"`` when the tool was forced by name) and
``null`` content beside the calls, errors with OpenAI's string codes and parameter names.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class Admitted:
    """First item of every engine reply: a replica has taken the request.

    Until it arrives the request is waiting for a replica (queued, or for one to start from zero), which the
    router bounds with the model's queue timeout (503); after it, the wait is the engine's (first-token timeout,
    408), and a failure before the first token is retried elsewhere.
    """


@dataclass(frozen=True, kw_only=True)
class ErrorReply:
    """An error to send instead of a response; the router renders the OpenAI envelope.

    Made by the constructor named for its OpenAI ``type``, its parts by keyword, so a call reads as the error a
    client will see: ``ErrorReply.rate_limit("...", code="rate_limit_exceeded", retry_after_s=3)``.
    """

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After (429, 503)

    @classmethod
    def invalid_request(cls, message: str, *, param: str | None = None, code: str | None = None,
                        status: int = 400) -> ErrorReply:
        """The client's request is wrong (OpenAI also answers an unknown model, 404, with this type)."""
        return cls(status=status, message=message, type="invalid_request_error", param=param, code=code)

    @classmethod
    def authentication(cls, message: str, *, code: str = "invalid_api_key") -> ErrorReply:
        return cls(status=401, message=message, type="invalid_request_error", code=code)

    @classmethod
    def permission(cls, message: str, *, param: str | None = None, code: str | None = None) -> ErrorReply:
        return cls(status=403, message=message, type="permission_error", param=param, code=code)

    @classmethod
    def rate_limit(cls, message: str, *, code: str, retry_after_s: float | None = None) -> ErrorReply:
        return cls(status=429, message=message, type="rate_limit_error", code=code, retry_after_s=retry_after_s)

    @classmethod
    def timeout(cls, message: str, *, status: int, code: str) -> ErrorReply:
        """408 when nothing was produced in time (the client may retry), 504 when a started request overran."""
        return cls(status=status, message=message, type="timeout_error", code=code)

    @classmethod
    def server(cls, message: str, *, status: int = 500, code: str | None = None,
               retry_after_s: float | None = None) -> ErrorReply:
        """This side failed (an engine, or this code): the only kind of reply that is a 5xx."""
        return cls(status=status, message=message, type="server_error", code=code, retry_after_s=retry_after_s)

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> str:
        """The error as the last events of a stream that already started: OpenAI's envelope, then ``[DONE]``, so
        a client's SSE parser ends cleanly and raises the error instead of waiting or crashing on a cut."""
        return f"data: {json.dumps(self.envelope())}\n\ndata: [DONE]\n\n"


# The engine behind a replica is gone (its process died): the request never ran, so it may go elsewhere.
ENGINE_UNAVAILABLE = "engine_unavailable"


@dataclass(frozen=True)
class FullReply:
    """A complete (non-streaming) response body, already serialized as JSON, and its token usage."""

    body: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """SSE text for the client: one event (``data: ...\n\n``), or several when they were made faster than the
    path carried them; and the request's token usage so far, including every token in ``data``.

    A stream's first chunk names its ``channel``: the URL where the rest of its events follow as bytes, each framed
    with the counts so far (see :mod:`deployments.stream_channel`); the Serve call then ends with no further item,
    or with an ``engine_unavailable`` :class:`ErrorReply` when the engine stopped under the stream. A ``resumable``
    stream (:mod:`deployments.resume`) carries the ids of its tokens so far and the characters of their text sent."""

    data: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    channel: str | None = None
    resumable: bool = False
    token_ids: tuple[int, ...] = ()
    text_chars: int = 0


EngineItem = Admitted | ErrorReply | FullReply | Chunk


def fix_tool_call_finish(response: Any) -> None:
    """In a finished chat response (vLLM's pydantic model): choices with tool calls finish with "tool_calls"."""
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        if message is not None and message.tool_calls:
            choice.finish_reason = "tool_calls"
            if not message.content:
                message.content = None


class StreamRewriter:
    """Adjusts vLLM's SSE events where OpenAI's differ, reading only the events that can need it.

    Most events pass untouched: token counts come from vLLM's outputs, not from the events (see
    :class:`deployments.engine.TokenCount`), and vLLM already adds usage exactly where the client's
    ``stream_options`` asked for it. Two kinds are rewritten: vLLM's error event (the HTTP status as a number in
    ``code``) into OpenAI's envelope, and, in a chat with tools, a choice that streamed tool calls and finishes with
    ``"stop"`` into ``"tool_calls"``. A test on the text decides whether an event is parsed at all.
    """

    def __init__(self, fix_tool_calls: bool):
        self.fix_tool_calls = fix_tool_calls
        self.choices_with_calls: set[int] = set()
        self.error: ErrorReply | None = None  # set when vLLM ended the stream with an error event

    def rewrite(self, event: str) -> str:
        """The text to send for one of vLLM's SSE events."""
        if event.startswith('data: {"error"'):
            chunk = json.loads(event[len("data: "):])
            if "choices" not in chunk:
                self.error = from_vllm_error(SimpleNamespace(error=SimpleNamespace(**{
                    "message": "", "param": None, "code": 500, **chunk["error"]})), "messages")
                return f"data: {json.dumps(self.error.envelope())}\n\n"
        if not self.fix_tool_calls or not (
            '"tool_calls"' in event or (self.choices_with_calls and '"finish_reason":"stop"' in event)
        ):
            return event
        chunk = json.loads(event[len("data: "):])
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("tool_calls"):
                self.choices_with_calls.add(choice.get("index", 0))
            if choice.get("finish_reason") == "stop" and choice.get("index", 0) in self.choices_with_calls:
                choice["finish_reason"] = "tool_calls"
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def validation_error(errors: list[dict[str, Any]], body: Any, root: str | None = None) -> ErrorReply:
    """Pydantic validation errors as a 400 that names the offending parameter, OpenAI style (``messages[0].role``).

    Where a field is a union, pydantic reports one error per member; the error that is not a mere type mismatch
    (``stop`` with five items: "at most 4 items", not "not a string") is the one that says what to fix. Locations
    are read against the body the client sent, so union members' internal names never reach the client. Errors
    raised on a part of the request (vLLM validates content parts while rendering the prompt) are named after
    ``root``, the parameter that part came from.
    """
    specific = [e for e in errors if not e["type"].endswith("_type")]
    first = (specific or errors)[0]
    param = field_path(first["loc"], body)
    message = first["msg"].removeprefix("Value error, ")
    if root and not param:
        # Drop union members' class names (``ChatCompletionContentPartTextParam``): they mean nothing to a client.
        where = ".".join(str(part) for part in first["loc"] if not str(part)[:1].isupper())
        param, message = root, f"{where}: {message}" if where else message
    if first["type"] == "missing":
        code = "missing_required_parameter"
    else:
        code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return ErrorReply.invalid_request(f"{param}: {message}" if param else message, param=param or None, code=code)


def field_path(loc: tuple[Any, ...], data: Any, label: Callable[[Any], str | None] | None = None) -> str:
    """Where a pydantic error is, as the sender of ``data`` would name it: ``messages[0].role``.

    Follows ``loc`` through ``data``, keeping the steps that exist in it (keys, list indexes) and skipping the
    union-member and validator tags pydantic inserts; a missing field, last in ``loc``, is named all the same.
    ``label`` may add a name to a list item's index (the config names models: ``models[0 smollm2]``). Used for both
    a request's ``param`` and a config file's error locations.
    """
    path, node = "", data
    for depth, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            named = label(node) if label else None
            path = f"{path}[{part} {named}]" if named else f"{path}[{part}]"
        elif isinstance(node, dict) and isinstance(part, str) and (
            part in node or (depth == len(loc) - 1 and (path or depth == 0))
        ):
            path, node = f"{path}.{part}" if path else part, node.get(part)
    return path


# vLLM's messages for a prompt that does not fit the context; OpenAI answers those with `context_length_exceeded`.
_CONTEXT_LENGTH_MARKERS = ("maximum context length", "context length is")


def from_vllm_error(response: Any, prompt_param: str) -> ErrorReply:
    """vLLM's ``ErrorResponse`` carries the HTTP status as a number in ``code``; OpenAI's code is a string."""
    error = response.error
    status = int(error.code) if isinstance(error.code, int) else HTTPStatus.INTERNAL_SERVER_ERROR
    code = None
    param = error.param
    if status == HTTPStatus.NOT_FOUND:
        kind = "not_found_error"
    elif status < 500:
        kind = "invalid_request_error"
        if any(marker in error.message for marker in _CONTEXT_LENGTH_MARKERS):
            code = "context_length_exceeded"
            param = prompt_param
    else:
        kind = "server_error"
    return ErrorReply(status=status, message=error.message, type=kind, param=param, code=code)
