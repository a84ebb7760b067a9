"""What the router checks in a request before it spends an engine's time on it.

Only the OpenAI-defined constraints that vLLM does not enforce itself, or enforces with a less useful message:
types, ranges and required fields. Every other field passes through untouched (``extra="allow"``) to vLLM's own
request model in the engine replica, so vendor extensions such as ``top_k`` keep working. Scalars are strict, as
OpenAI's are: ``"temperature": "0.5"`` is a 400, not a silent conversion. These models are also what the app's
OpenAPI document (``/openapi.json``) says about each route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.errors import OpenAIError

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
# Content parts a text-only model cannot take; a model marked `multimodal` in the config gets them passed through.
MEDIA_PARTS = {"image_url": "images", "input_audio": "audio", "audio_url": "audio", "video_url": "video",
               "file": "files"}
Stop = str | Annotated[list[str], Field(max_length=4)] | None
TokenPrompt = str | list[str] | list[int] | list[list[int]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class ChatMessage(_Body):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: Stop = None
    seed: int | None = None
    user: str | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionBody(_Sampling):
    prompt: TokenPrompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None


class EmbeddingBody(_Body):
    model: str = Field(min_length=1)
    input: TokenPrompt
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class ResponsesBody(_Body):
    """``/v1/responses``: OpenAI's newer interface (the Agents SDK, coding agents speak it); vLLM answers it."""

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool | None = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    user: str | None = None


RequestBody = ChatCompletionBody | CompletionBody | EmbeddingBody | ResponsesBody

# Nothing is stored: a response lives in the replica that made it, and the next request may go to another replica
# (or the replica may be gone), so the parts of the Responses API that read a stored response are refused up
# front. ``store`` itself is accepted and answered as ``false``, as vLLM does: it is on by default in every client.
NOT_STORED = ("rayroute does not store responses: send the whole conversation in `input` (and `store: false`), or "
              "use /v1/chat/completions.")


def reject_stateful(body: ResponsesBody) -> None:
    """A clear 400 for what needs stored responses (a previous response, a conversation, background runs)."""
    for param in ("previous_response_id", "conversation"):
        if getattr(body, param) is not None:
            raise OpenAIError(400, f"`{param}` is not supported: {NOT_STORED}", param=param,
                              code="unsupported_parameter")
    if body.background:
        raise OpenAIError(400, f"Background responses are not supported: {NOT_STORED}", param="background",
                          code="unsupported_parameter")


def reject_media(body: ChatCompletionBody) -> None:
    """A text-only model gets a clear 400 for an image (or audio, video, file) part instead of a template error."""
    for i, message in enumerate(body.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            kind = MEDIA_PARTS.get(part.get("type"))
            if kind:
                raise OpenAIError(400, f"The model `{body.model}` does not accept {kind}; send text content parts.",
                                  param=f"messages[{i}].content[{j}]", code="model_not_multimodal")
