"""A model's fallbacks (router/fallbacks.py): asked in order when the model cannot take a request at all (full, no
replica in time, a prompt longer than its context), never for other errors, never for a key that may not use them;
the answer comes under the fallback's name with headers and an access-log line saying why.
"""

from __future__ import annotations

import json

import pytest
from ray.serve.exceptions import BackPressureError

from deployments.replies import Admitted, ErrorReply
from tests.unit.fakes import MESSAGES, FakeHandle, Hang, chat, ok, router_client, stream_of

CONTEXT_TOO_LONG = ErrorReply.invalid_request("This model's maximum context length is 8 tokens.", param="messages",
                                              code="context_length_exceeded")


@pytest.mark.parametrize(("primary", "reason"), [
    ([BackPressureError(num_queued_requests=5, max_queued_requests=5)], "model_at_capacity"),
    ([Hang()], "model_unavailable"),
    ([Admitted(), CONTEXT_TOO_LONG], "context_length_exceeded"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_fallback_answers_when_the_model_cannot(monkeypatch, access_log_lines, primary: list, reason: str,
                                                    stream: bool) -> None:
    small, large = FakeHandle.scripted(primary), FakeHandle.scripted(stream_of("a", "b") if stream else ok())
    client = router_client(small, monkeypatch, {"chat-c": large}, fallbacks=["chat-c"], timeouts={"queue_s": 0.3})
    response = chat(client, stream=stream)
    assert response.status_code == 200, response.text
    assert response.headers["x-rayroute-fallback-from"] == "chat-a"
    assert response.headers["x-rayroute-fallback-reason"] == reason
    assert [body["model"] for _, body in large.calls] == ["chat-c"]  # answered under the fallback's name
    assert len(small.calls) == 1
    line = json.loads(access_log_lines[-1])
    assert (line["model"], line["served_model"], line["fallback_from"], line["fallback_reason"]) == (
        "chat-c", "chat-c", "chat-a", reason)


def test_fallbacks_are_tried_in_order_and_other_errors_do_not_fall_back(monkeypatch) -> None:
    full = [BackPressureError(num_queued_requests=5, max_queued_requests=5)]
    second, third = FakeHandle.scripted(full), FakeHandle.scripted(ok())
    client = router_client(FakeHandle.scripted(full), monkeypatch, {"chat-b": second, "chat-c": third},
                           fallbacks=["chat-b", "chat-c"])
    response = chat(client)
    assert response.status_code == 200 and len(second.calls) == 1 and len(third.calls) == 1
    assert response.headers["x-rayroute-fallback-from"] == "chat-a"
    bad_request = ErrorReply.invalid_request("bad", param="temperature", code="invalid_value")
    unused = FakeHandle.scripted(ok())
    client = router_client(FakeHandle.scripted([Admitted(), bad_request]), monkeypatch, {"chat-b": unused},
                           fallbacks=["chat-b"])
    response = chat(client)
    assert response.status_code == 400 and not unused.calls and "x-rayroute-fallback-from" not in response.headers


def test_the_last_fallbacks_error_is_the_answer_when_none_can(monkeypatch) -> None:
    full = [BackPressureError(num_queued_requests=5, max_queued_requests=5)]
    client = router_client(FakeHandle.scripted(full), monkeypatch, {"chat-b": FakeHandle.scripted([Admitted(),
                           CONTEXT_TOO_LONG])}, fallbacks=["chat-b"])
    response = chat(client)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_a_key_never_reaches_a_model_through_a_fallback(monkeypatch) -> None:
    """Key ``free`` may send only ``gpt-4o-mini`` (chat-a's alias): chat-a's fallback chat-b is not for it."""
    fallback = FakeHandle.scripted(ok())
    client = router_client(FakeHandle.scripted([BackPressureError(num_queued_requests=5, max_queued_requests=5)]),
                           monkeypatch, {"chat-b": fallback}, fallbacks=["chat-b"])
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES},
                           headers={"Authorization": "Bearer sk-free-0000-0123456789"})
    assert response.status_code == 429 and response.json()["error"]["code"] == "model_at_capacity"
    assert not fallback.calls


def test_a_fallback_must_be_a_configured_name_not_the_model_itself() -> None:
    from deployments.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="not a configured model name"):
        parse_args({"models": [{"id": "a", "source": "org/a", "fallbacks": ["b"]}]})
    with pytest.raises(ConfigError, match="one of its own names"):
        parse_args({"models": [{"id": "a", "source": "org/a", "aliases": ["x"], "fallbacks": ["x"]}]})
    parse_args({"models": [{"id": "a", "source": "org/a", "fallbacks": ["b"]}, {"id": "b", "source": "org/b"}]})
