"""What the router checks in a request before it spends an engine's time on it.

Only the OpenAI-defined constraints that vLLM does not enforce itself, or enforces with a less useful message:
types, ranges and required fields. Every other field passes through untouched (``extra="allow"``) to vLLM's own
request model in the engine replica, so vendor extensions such as ``top_k`` keep working. Scalars are strict, as
OpenAI's are: ``"temperature": "0.5"`` is a 400, not a silent conversion.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.engine import validation_error
from router.errors import OpenAIError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_Body):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(_Body):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = None
    user: str | None = None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def check_chat_body(body: dict[str, Any]) -> ChatCompletionBody:
    try:
        return ChatCompletionBody.model_validate(body)
    except ValidationError as exc:
        reply = validation_error(exc, body)
        raise OpenAIError(reply.status, reply.message, reply.type, reply.param, reply.code) from None
