"""What the router checks in a request before it spends an engine's time on it.

Only the OpenAI-defined constraints that vLLM does not enforce itself, or enforces with a less useful message:
types, ranges and required fields. Every other field passes through untouched (``extra="allow"``) to vLLM's own
request model in the engine replica, so vendor extensions such as ``top_k`` keep working. Scalars are strict, as
OpenAI's are: ``"temperature": "0.5"`` is a 400, not a silent conversion. These models are also what the app's
OpenAPI document (``/openapi.json``) says about each route.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.config import RequestLimits
from deployments.constants import MEDIA_PART_TOKENS, PROMPT_BYTES_PER_TOKEN
from deployments.interface import Endpoint
from deployments.replies import ErrorReply
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
            raise OpenAIError(ErrorReply.invalid_request(f"`{param}` is not supported: {NOT_STORED}", param=param,
                                                         code="unsupported_parameter"))
    if body.background:
        raise OpenAIError(ErrorReply.invalid_request(f"Background responses are not supported: {NOT_STORED}",
                                                     param="background", code="unsupported_parameter"))


def reject_media(body: ChatCompletionBody) -> None:
    """A text-only model gets a clear 400 for an image (or audio, video, file) part instead of a template error."""
    for i, message in enumerate(body.messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            kind = MEDIA_PARTS.get(part.get("type"))
            if kind:
                raise OpenAIError(ErrorReply.invalid_request(
                    f"The model `{body.model}` does not accept {kind}; send text content parts.",
                    param=f"messages[{i}].content[{j}]", code="model_not_multimodal"))


# --- request caps ---------------------------------------------------------------------------------------------------

def check_request_caps(endpoint: Endpoint, raw: Any, caps: RequestLimits) -> None:
    """A 400 in OpenAI's words for a request larger than ``caps`` allow (:class:`deployments.config.RequestLimits`).

    Reads the parsed JSON, before it becomes the body models: building 200,000 message objects costs half a second
    of a router's CPU, counting them nothing. Anything of the wrong type is left to the body models to refuse."""
    if not isinstance(raw, dict):
        return
    if endpoint == "chat":
        messages = raw.get("messages")
        _check_length("messages", messages, caps.max_messages)
        _check_content_parts("messages", messages, caps.max_content_parts)
    elif endpoint == "completions":
        _check_batch("prompt", raw.get("prompt"), caps.max_prompt_items)
    elif endpoint == "embeddings":
        _check_batch("input", raw.get("input"), caps.max_prompt_items)
    elif endpoint == "responses":
        items = raw.get("input")
        _check_length("input", items, caps.max_prompt_items)
        _check_content_parts("input", items, caps.max_content_parts)
    n = raw.get("n")
    if endpoint in ("chat", "completions") and type(n) is int and n > caps.max_n:
        raise OpenAIError(ErrorReply.invalid_request(
            f"Invalid 'n': integer above maximum value. Expected a value <= {caps.max_n}, but got {n} instead.",
            param="n", code="integer_above_max_value"))


def _check_length(param: str, value: Any, most: int) -> None:
    if isinstance(value, list) and len(value) > most:
        raise OpenAIError(ErrorReply.invalid_request(
            f"Invalid '{param}': array too long. Expected an array with maximum length {most}, but got an array "
            f"with length {len(value)} instead.", param=param, code="array_above_max_length"))


def _check_content_parts(param: str, items: Any, most: int) -> None:
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if isinstance(item, dict):
            _check_length(f"{param}[{i}].content", item.get("content"), most)


def _check_batch(param: str, prompt: Any, most: int) -> None:
    """A list of texts or of token lists is a batch; a list of token ids is one prompt, however long."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        _check_length(param, prompt, most)


# --- what a request may cost ------------------------------------------------------------------------------------------

def prompt_tokens_estimate(body: RequestBody) -> int:
    """The request's prompt tokens, estimated without a tokenizer (the engine tokenizes): UTF-8 bytes of its text
    (messages, prompts, inputs, instructions, tools) / :data:`PROMPT_BYTES_PER_TOKEN`, token ids as they are, and
    :data:`MEDIA_PART_TOKENS` per image, audio or video part. Reserved against the key's tokens per minute until
    the engine's own count replaces it."""
    size = _Size()
    if isinstance(body, ChatCompletionBody):
        for message in body.messages:
            size.add(message.content)
            size.add(message.model_extra)  # tool calls, names
    elif isinstance(body, CompletionBody):
        size.add(body.prompt)
    elif isinstance(body, EmbeddingBody):
        size.add(body.input)
    else:
        size.add(body.input)
        size.add(body.instructions)
        size.add(body.tools)
    size.add((body.model_extra or {}).get("tools"))
    return size.tokens + math.ceil(size.text_bytes / PROMPT_BYTES_PER_TOKEN)


def completion_tokens_limit(body: RequestBody) -> int | None:
    """The most tokens one output of the request may have, as the client set it (None: unset, or embeddings)."""
    if isinstance(body, ChatCompletionBody):
        return body.max_completion_tokens or body.max_tokens
    if isinstance(body, CompletionBody):
        return body.max_tokens
    if isinstance(body, ResponsesBody):
        return body.max_output_tokens
    return None


def output_count(body: RequestBody) -> int:
    """How many outputs the request generates: ``n`` of each prompt (a completions batch has several prompts); an
    embedding request generates none."""
    if isinstance(body, EmbeddingBody):
        return 0
    n = getattr(body, "n", None) or 1
    if isinstance(body, CompletionBody) and isinstance(body.prompt, list) and body.prompt \
            and not isinstance(body.prompt[0], int):
        return n * len(body.prompt)
    return n


class _Size:
    """Bytes of text and counted tokens in a JSON value, media parts at their fixed estimate."""

    def __init__(self) -> None:
        self.text_bytes = 0
        self.tokens = 0

    def add(self, value: Any) -> None:
        if isinstance(value, str):
            self.text_bytes += len(value) if value.isascii() else len(value.encode())
        elif isinstance(value, bool) or value is None:
            return
        elif isinstance(value, int):
            self.tokens += 1  # a token id
        elif isinstance(value, list):
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            if value.get("type") in MEDIA_PARTS or value.get("type") in ("input_image", "input_file"):
                self.tokens += MEDIA_PART_TOKENS
                return
            for key, item in value.items():
                self.text_bytes += len(key)
                self.add(item)
