"""Resuming a stream on another replica (deployments/resume.py): which streams can go on exactly, what the going-on
replica gives vLLM (the prompt with the tokens already made, the tokens still owed), and how its outputs and events
are made to continue the original response. vLLM's own detokenizer and the default model's tokenizer; no engine.
The end-to-end test kills the replica under real streams (tests/e2e/test_faults.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from deployments.dev.local_models import MODELS_DIR
from deployments.resume import (
    Continuation,
    NotResumable,
    Resume,
    announces_role,
    first_event_identity,
    not_resumable,
)

PROMPT = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
MADE = "Once upon a time, the lighthouse keeper's café was ☕ open"


@pytest.fixture(scope="module")
def tokenizer():
    from vllm.tokenizers.registry import get_tokenizer

    return get_tokenizer(str(MODELS_DIR / "smollm2-135m-instruct"))


@pytest.mark.parametrize(("endpoint", "body", "reason"), [
    ("chat", {"messages": []}, None),
    ("chat", {"tools": [{}], "tool_choice": "none"}, None),
    ("chat", {"logprobs": True, "top_logprobs": 2}, None),
    ("completions", {"prompt": [1, 2, 3]}, None),
    ("responses", {}, "only chat and text completions"),
    ("chat", {"n": 2}, "several choices"),
    ("chat", {"tools": [{}]}, "tool calls"),
    ("chat", {"response_format": {"type": "json_object"}}, "structured output"),
    ("chat", {"structured_outputs": {"regex": "a+"}}, "structured output"),
    ("completions", {"echo": True}, "an echoed prompt"),
    ("completions", {"logprobs": 1}, "text offsets"),
    ("completions", {"prompt": ["a", "b"]}, "several prompts"),
])
def test_what_can_go_on_exactly(endpoint: str, body: dict, reason: str | None) -> None:
    found = not_resumable(endpoint, body)
    assert found == reason if reason is None else reason in found


def test_the_going_on_prompt_holds_the_tokens_made_and_asks_only_for_the_rest(tokenizer) -> None:
    from vllm.sampling_params import SamplingParams

    prompt, made = tokenizer.encode(PROMPT), tokenizer.encode(MADE)
    going_on = Continuation(Resume(tuple(made), len(MADE), "chatcmpl-1", 7), tokenizer)
    asked = SamplingParams(max_tokens=50, min_tokens=20, seed=3)
    given, params = going_on.engine_call({"type": "token", "prompt_token_ids": prompt, "prompt": PROMPT}, asked)
    assert given == {"type": "token", "prompt_token_ids": prompt + made, "prompt": PROMPT}
    assert (params.max_tokens, params.min_tokens, params.seed) == (50 - len(made), 20 - len(made), 3)
    assert (asked.max_tokens, asked.min_tokens) == (50, 20)  # the request's own parameters are left alone

    # Its outputs name the request's own prompt, so usage and counts hold it once.
    output = SimpleNamespace(prompt_token_ids=prompt + made, outputs=[SimpleNamespace(text=" and", token_ids=[9])])
    assert going_on.output(output).prompt_token_ids == prompt
    assert output.outputs[0].text == " and"  # the client had every character already

    with pytest.raises(NotResumable, match="already made"):
        Continuation(Resume(tuple(made), 0, "", 0), tokenizer).engine_call(
            {"type": "token", "prompt_token_ids": prompt}, SamplingParams(max_tokens=len(made)))


@pytest.mark.parametrize("sent", [0, 12, len(MADE) - 3])
def test_text_the_client_never_got_comes_first(tokenizer, sent: int) -> None:
    """vLLM holds back text (a stop string's length, an unfinished character) that the dead replica never sent: the
    going-on replica sends it before its own, as vLLM's detokenizer makes it after this prompt."""
    from vllm.sampling_params import SamplingParams

    prompt, made = tokenizer.encode(PROMPT), tokenizer.encode(MADE)
    going_on = Continuation(Resume(tuple(made), sent, "chatcmpl-1", 7), tokenizer)
    going_on.engine_call({"type": "token", "prompt_token_ids": prompt}, SamplingParams(max_tokens=100, stop=["zz"]))
    output = SimpleNamespace(prompt_token_ids=[], outputs=[SimpleNamespace(text=" Then", token_ids=[5])])
    assert going_on.output(output).outputs[0].text == MADE[sent:] + " Then"
    later = SimpleNamespace(prompt_token_ids=[], outputs=[SimpleNamespace(text=" more", token_ids=[6])])
    assert going_on.output(later).outputs[0].text == " more"  # once only


def test_events_go_on_as_the_original_response(tokenizer) -> None:
    """The same id and time, no second announcement of the role, usage that counts every token made once."""
    going_on = Continuation(Resume((1, 2, 3), 3, "chatcmpl-first", 1700000000), tokenizer)

    def sse(chunk: dict) -> str:
        return f"data: {json.dumps(chunk)}\n\n"

    role = {"id": "chatcmpl-new", "created": 1700000009,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert going_on.event(sse(role)) == ""
    text = going_on.event(sse({**role, "choices": [{"index": 0, "delta": {"content": "hi"}}]}))
    assert json.loads(text[len("data: "):]) == {"id": "chatcmpl-first", "created": 1700000000,
                                               "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    usage = going_on.event(sse({**role, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                                                                  "total_tokens": 14}}))
    assert json.loads(usage[len("data: "):])["usage"] == {"prompt_tokens": 10, "completion_tokens": 7,
                                                          "total_tokens": 17}
    assert going_on.event("data: [DONE]\n\n") == "data: [DONE]\n\n"
    assert first_event_identity(sse(role)) == ("chatcmpl-new", 1700000009)
    # The announcement claims no tokens: vLLM makes it from the first output, before that output's text.
    assert announces_role(sse(role)) and not announces_role(text) and not announces_role("data: [DONE]\n\n")
