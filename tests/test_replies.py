"""How an engine replica adjusts vLLM's stream: token counting, usage only where asked, tool-call finishes."""

from __future__ import annotations

import json

from deployments.replies import StreamRewriter


def event(choices: list[dict], usage: dict | None = None) -> str:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream(n: int = 1) -> list[str]:
    """What vLLM sends with include_usage and continuous_usage_stats: usage on every chunk, then a usage chunk."""
    events = []
    for i in range(n):
        events.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}}], usage(10, 0)))
    for step in (1, 2, 3):
        for i in range(n):
            finish = "length" if step == 3 else None
            events.append(event([{"index": i, "delta": {"content": "x"}, "finish_reason": finish}], usage(10, step)))
    events.append(event([], usage(10, 3 * n)))
    events.append("data: [DONE]\n\n")
    return events


def run(rewriter: StreamRewriter, events: list[str]) -> list:
    return [c for c in (rewriter.rewrite(e) for e in events) if c is not None]


def test_usage_is_counted_but_not_shown_unless_asked() -> None:
    chunks = run(StreamRewriter(None, fix_tool_calls=True), stream())
    sent = [c.data for c in chunks]
    assert all('"usage"' not in data for data in sent)
    assert sent[-1] == "data: [DONE]\n\n" and len(sent) == 5  # role, three tokens, [DONE]
    assert [(c.prompt_tokens, c.completion_tokens) for c in chunks] == [(10, 0), (10, 1), (10, 2), (10, 3), (10, 3)]


def test_include_usage_keeps_only_the_final_usage_chunk() -> None:
    chunks = run(StreamRewriter({"include_usage": True}, fix_tool_calls=False), stream())
    with_usage = [json.loads(c.data[6:]) for c in chunks if '"usage"' in c.data]
    assert len(with_usage) == 1 and with_usage[0]["choices"] == [] and with_usage[0]["usage"]["completion_tokens"] == 3


def test_continuous_usage_keeps_every_chunks_usage() -> None:
    chunks = run(StreamRewriter({"include_usage": True, "continuous_usage_stats": True}, False), stream())
    assert sum('"usage"' in c.data for c in chunks) == 5


def test_several_choices_are_summed() -> None:
    chunks = run(StreamRewriter(None, fix_tool_calls=False), stream(n=3))
    assert chunks[-2].completion_tokens == 9  # three choices of three tokens each, before the closing usage
    assert chunks[-1].completion_tokens == 9


def test_cut_short_stream_counts_what_was_generated() -> None:
    chunks = run(StreamRewriter(None, fix_tool_calls=False), stream()[:3])  # the client left after two tokens
    assert chunks[-1].completion_tokens == 2


def test_tool_call_choice_finishes_with_tool_calls() -> None:
    call = {"index": 0, "id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    events = [event([{"index": 0, "delta": {"tool_calls": [call]}}], usage(5, 4)),
              event([{"index": 0, "delta": {}, "finish_reason": "stop"}], usage(5, 5))]
    last = json.loads(run(StreamRewriter(None, fix_tool_calls=True), events)[-1].data[6:])
    assert last["choices"][0]["finish_reason"] == "tool_calls"
    plain = [event([{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}], usage(5, 1))]
    assert json.loads(run(StreamRewriter(None, True), plain)[-1].data[6:])["choices"][0]["finish_reason"] == "stop"
