"""How an engine replica adjusts vLLM's stream: errors into OpenAI's envelope, tool-call finishes, token counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

from deployments.replies import StreamRewriter
from deployments.vllm_hooks import TokenCount


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


def output(prompt: int, *deltas: int, encoder: int | None = None) -> SimpleNamespace:
    """A vLLM RequestOutput as a stream sees it: per choice, the tokens made since the last output."""
    return SimpleNamespace(prompt_token_ids=list(range(prompt)),
                           encoder_prompt_token_ids=None if encoder is None else list(range(encoder)),
                           outputs=[SimpleNamespace(token_ids=list(range(n))) for n in deltas])


def test_token_count_sums_every_choices_deltas() -> None:
    count = TokenCount()
    for out in (output(12, 1), output(12, 3), output(12, 0)):  # a merged output carries three tokens
        count.add(out)
    assert (count.prompt, count.completion) == (12, 4)
    several = TokenCount()
    several.add(output(5, 1, 1, 2))
    assert (several.prompt, several.completion) == (5, 4)


def test_token_count_includes_an_encoders_prompt() -> None:
    count = TokenCount()
    count.add(output(4, 1, encoder=6))
    assert count.prompt == 10


def test_responses_announcements_go_out_with_the_engines_first_output() -> None:
    """vLLM sends response.created and response.in_progress before its engine made anything; they become part of
    the first chunk, so the first chunk (TTFT, the first-token timeout, retries) is the engine's first output."""
    import asyncio

    from deployments.endpoints import typed_events

    class Event(SimpleNamespace):
        def model_dump_json(self, **_: object) -> str:
            return json.dumps({"type": self.type})

    closed = []

    async def vllm_events():
        try:
            for kind in ("response.created", "response.in_progress", "response.output_item.added",
                         "response.output_text.delta", "response.completed"):
                yield Event(type=kind)
        finally:
            closed.append(True)

    async def collect() -> list[str]:
        return [chunk async for chunk in typed_events(vllm_events())]

    chunks = asyncio.run(collect())
    assert [chunk.count("event: ") for chunk in chunks] == [3, 1, 1]
    assert chunks[0].startswith('event: response.created\ndata: {"type": "response.created"}\n\n')
    assert chunks[0].endswith("event: response.output_item.added\n" 'data: {"type": "response.output_item.added"}\n\n')
    assert closed == [True]
