"""Resuming a started stream on another replica, from the tokens it had already sent, when its replica fails.

Why from token ids and not from the text: re-tokenizing text can give other tokens than the model made (a merge
across the cut), so the model would go on from a prompt it never wrote. From the ids, the new replica's prefill
rebuilds the state the dead one had, and greedy output goes on as it would have (a seeded sample goes on from a
fresh draw: no gap and no repeat at the cut, but not the same text as an uncut run).

The stream's frames carry its token ids (:mod:`deployments.stream_channel`), so the router always holds every
token its client has been sent, and the number of characters of their text sent. When the replica dies, its
channel breaks or its engine stops, the router asks another replica for the same request with a :class:`Resume`.
That replica renders the request as usual (vLLM's own chat template and serving layer), and in the one place its
serving layer hands vLLM the prompt (:class:`deployments.vllm_hooks.CountingEngine`) :class:`Continuation`:

- appends the tokens already made to the prompt, and lowers ``max_tokens`` (and ``min_tokens``) by as many;
- gives every output back the request's own prompt, so usage and counts name the prompt once;
- puts in front of the first output's text the part of those tokens' text the client has not received (vLLM holds
  back a stop string's length of text, or an unfinished character, until it knows what it is);
- rewrites the events (:meth:`Continuation.event`): the response's first id and ``created``, no second role
  announcement, and usage that counts every completion token once.

Only what continues exactly is resumed (:func:`not_resumable`): a parser's state (tool calls, reasoning), a grammar's
(structured output), several choices, echoed prompts and the Responses API's numbered events are not rebuilt
from tokens, so such a stream ends with an error event as before, and the README lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any


@dataclass(frozen=True)
class Resume:
    """What a stream had sent when its replica failed, as the router hands it to the replica that goes on."""

    token_ids: tuple[int, ...]  # every completion token made so far
    text_chars: int  # how many characters of their text the client has received
    response_id: str  # the response's ``id`` and ``created``, which the going-on events keep
    created: int


class NotResumable(Exception):
    """This stream cannot go on elsewhere exactly (the reason is the message)."""


def not_resumable(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why a stream of ``body`` cannot be resumed from its tokens; None when it can. The engine replica asks, and
    only a resumable stream's frames carry token ids; the router resumes only such a stream."""
    if endpoint not in ("chat", "completions"):
        return "only chat and text completions resume"
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1 or body.get("use_beam_search"):
        return "several choices"
    if body.get("echo"):
        return "an echoed prompt"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tool calls (the parser's state)"
    response_format = (body.get("response_format") or {}).get("type", "text")
    if response_format != "text" or body.get("structured_outputs") or any(k.startswith("guided_") for k in body):
        return "structured output (the grammar's state)"
    if endpoint == "completions" and body.get("logprobs") is not None:
        return "text-completion logprobs (their text offsets)"
    prompt = body.get("prompt")
    if endpoint == "completions" and isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return "several prompts"
    return None



class Continuation:
    """One resumed stream on the replica that goes on with it: what its prompt and parameters become, what its
    outputs and events are changed into. Made per request by the engine replica; ``tokenizer`` is vLLM's."""

    def __init__(self, resume: Resume, tokenizer: Any):
        self.resume = resume
        self.tokenizer = tokenizer
        self._prompt: list[int] = []
        self._held_back = ""  # text of the tokens already made that the client has not received
        self._announced = False

    def engine_call(self, prompt: Any, params: Any) -> tuple[Any, Any]:
        """vLLM's rendered prompt and sampling parameters for the going-on request."""
        made = list(self.resume.token_ids)
        if not isinstance(prompt, dict) or prompt.get("type", "token") not in ("token", "multimodal") \
                or "prompt_token_ids" not in prompt:
            raise NotResumable("the prompt is not token ids")
        left = None if params.max_tokens is None else params.max_tokens - len(made)
        if left is not None and left < 1:
            raise NotResumable("every token was already made")
        self._prompt = list(prompt["prompt_token_ids"])
        self._held_back = self._text_of(made, params)[self.resume.text_chars:]
        params = params.clone()
        params.max_tokens = left
        params.min_tokens = max(0, params.min_tokens - len(made))
        return {**prompt, "prompt_token_ids": [*self._prompt, *made]}, params

    def _text_of(self, made: list[int], params: Any) -> str:
        """The text vLLM's own detokenizer made of ``made`` after this prompt (the same class, the same state)."""
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        request = SimpleNamespace(request_id="resume", sampling_params=params, prompt_token_ids=self._prompt,
                                  prompt_embeds=None)
        detokenizer = IncrementalDetokenizer.from_new_request(self.tokenizer, request)
        detokenizer.update(made, False)
        return getattr(detokenizer, "output_text", "")

    def output(self, output: Any) -> Any:
        """One of vLLM's outputs for the going-on request, as the original request's would have been."""
        output.prompt_token_ids = self._prompt
        if self._held_back and output.outputs:
            choice = output.outputs[0]
            choice.text, self._held_back = self._held_back + choice.text, ""
        return output

    def event(self, event: str) -> str:
        """One SSE event as the original stream goes on: its id and time, no second announcement of the role, and
        usage with the tokens made before the cut; "" to drop it."""
        if not event.startswith("data: {"):
            return event  # [DONE]
        chunk = json.loads(event[len("data: "):])
        if not self._announced and _announces_role(chunk):
            self._announced = True
            return ""
        chunk["id"], chunk["created"] = self.resume.response_id, self.resume.created
        usage = chunk.get("usage")
        if usage:
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + len(self.resume.token_ids)
            usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage["completion_tokens"]
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def _announces_role(chunk: dict[str, Any]) -> bool:
    """A chat stream's first event: the assistant's role and no content yet."""
    choices = chunk.get("choices") or ()
    return bool(choices) and all((c.get("delta") or {}).get("role") and not (c.get("delta") or {}).get("content")
                                 for c in choices)


def announces_role(event: str) -> bool:
    """Whether an SSE event is a chat stream's announcement of the role. vLLM makes it from the stream's first
    output, before the event holding that output's text: its frame must not claim those tokens yet, or a replica
    dying between the two would leave the client without their text."""
    return event.startswith('data: {') and '"role"' in event and _announces_role(json.loads(event[len("data: "):]))


def first_event_identity(data: str) -> tuple[str, int]:
    """The ``id`` and ``created`` of a stream's first event (its SSE text), which a resumed stream keeps."""
    for line in data.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[len("data: "):])
            return chunk.get("id", ""), int(chunk.get("created", 0))
    return "", 0
