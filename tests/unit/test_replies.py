"""How an engine replica adjusts vLLM's replies (deployments/replies.py): errors into OpenAI's envelope, named after
their parameter, and tool-call finishes."""

from __future__ import annotations

import json

import pytest

from deployments.replies import StreamRewriter, validation_error


def event(choices: list[dict], usage: dict | None = None) -> str:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


def test_plain_events_pass_untouched() -> None:
    """No event of a stream without tools is parsed or rebuilt: what vLLM wrote is what the client gets."""
    rewriter = StreamRewriter(fix_tool_calls=False)
    events = [event([{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]),
              event([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
              event([], {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}),
              "data: [DONE]\n\n"]
    assert [rewriter.rewrite(e) for e in events] == events
    assert rewriter.error is None


def test_vllm_error_event_becomes_openai_envelope() -> None:
    rewriter = StreamRewriter(fix_tool_calls=True)
    vllm_error = 'data: {"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}\n\n'
    sent = json.loads(rewriter.rewrite(vllm_error)[len("data: "):])
    assert sent == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    assert rewriter.error is not None and rewriter.error.status == 500


def test_tool_call_choice_finishes_with_tool_calls() -> None:
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    rewriter = StreamRewriter(fix_tool_calls=True)
    rewriter.rewrite(event([{"index": 0, "delta": {"tool_calls": [call]}}]))
    last = json.loads(rewriter.rewrite(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))[6:])
    assert last["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_calls_in_a_merged_event_still_fix_its_finish() -> None:
    """A busy replica sends one event for several tokens: the calls and the finish can share it."""
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    merged = event([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": "stop"}])
    sent = json.loads(StreamRewriter(fix_tool_calls=True).rewrite(merged)[6:])
    assert sent["choices"][0]["finish_reason"] == "tool_calls"


def test_a_choice_without_calls_keeps_stop() -> None:
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    rewriter = StreamRewriter(fix_tool_calls=True)
    rewriter.rewrite(event([{"index": 0, "delta": {"tool_calls": [call]}}]))
    plain = event([{"index": 1, "delta": {"content": "hi"}, "finish_reason": "stop"}])
    assert json.loads(rewriter.rewrite(plain)[6:])["choices"][0]["finish_reason"] == "stop"


def test_nested_part_errors_are_named_after_their_parameter() -> None:
    """vLLM validates content parts while rendering; their error locations start inside `messages`."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    class TextPart(BaseModel):
        type: str
        text: str

    with pytest.raises(ValidationError) as caught:
        TypeAdapter(list[TextPart | int]).validate_python([{"type": "nonsense"}])
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "nonsense"}]}]}
    reply = validation_error(caught.value.errors(), body, root="messages")
    assert reply.param == "messages"
    assert reply.message == "messages: 0.text: Field required"
