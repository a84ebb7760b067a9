"""A key's cost is admitted before any engine works on it: concurrency slots, token reservations settled when the
request ends (however it ends), reservations that expire when their router is gone, request caps checked before
the body is parsed into objects, and what happens when the key-limits replica does not answer.

Driven without a cluster: real routers in front of fake engine handles (:class:`tests.harness.FakeHandle`), and
the real :class:`router.limits.KeyLimits` behind the same calls a Serve handle takes
(:class:`tests.harness.LocalLimits`); two routers sharing one ``KeyLimits`` are two router replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

import router.admission
import router.limits
from deployments.config import RequestLimits, RouterArgs, parse_args
from deployments.constants import MEDIA_PART_TOKENS, RESERVATION_MARGIN_S, RESERVATION_SWEEP_S
from deployments.replies import Admitted, Chunk, ErrorReply, FullReply
from router.ingress import OpenAIRouter, build_http_app
from router.limits import KeyLimits
from router.protocol import ChatCompletionBody, prompt_tokens_estimate
from tests.harness import FakeChannels, FakeHandle, Hang, LocalLimits

KEYS = {
    "plain": {"name": "plain", "key": "sk-plain-000000000000000"},
    "one-at-a-time": {"name": "one-at-a-time", "key": "sk-single-00000000000000", "max_concurrent_requests": 1},
    "tokens": {"name": "tokens", "key": "sk-tokens-00000000000000", "tokens_per_minute": 100},
    "roomy": {"name": "roomy", "key": "sk-roomy-000000000000000", "tokens_per_minute": 10_000,
              "max_concurrent_requests": 8},
}
HI = [{"role": "user", "content": "hi"}]  # a prompt estimated at 1 token (2 bytes / 4, rounded up)


def ok(prompt: int = 3, completion: int = 2) -> list[Any]:
    return [Admitted(), FullReply('{"ok": true}', prompt, completion)]


class CountingLimits(KeyLimits):
    """KeyLimits that remembers each admission's arguments and each release."""

    def __init__(self) -> None:
        super().__init__()
        self.admitted: list[tuple] = []
        self.released: list[tuple[str, int]] = []

    def admit(self, *args: Any, **kwargs: Any):
        self.admitted.append(args)
        return super().admit(*args, **kwargs)

    def release(self, reservation: str, tokens: int, now: float | None = None) -> None:
        self.released.append((reservation, tokens))
        super().release(reservation, tokens, now)


def handle_on(limits: KeyLimits) -> LocalLimits:
    """A key-limits handle on ``limits``: two routers given handles on one KeyLimits are two router replicas."""
    handle = LocalLimits()
    handle.limits = limits
    return handle


def make_router(monkeypatch, engine: FakeHandle, limits: Any = None, others: dict[str, FakeHandle] | None = None,
                config: dict[str, Any] | None = None, **model: Any) -> OpenAIRouter:
    monkeypatch.setenv("RAYROUTE_API_KEYS", json.dumps(list(KEYS.values())))
    others = others or {}
    args = {"models": [{"id": "chat-a", **model}, *({"id": name} for name in others)], **(config or {})}
    return OpenAIRouter(args, {"chat-a": engine, **others}, limits, channels=FakeChannels())


def client_of(router_: OpenAIRouter) -> TestClient:
    return TestClient(build_http_app(router_), raise_server_exceptions=False)


def post(client: TestClient, key: str, path: str = "/v1/chat/completions", **body: Any):
    body = {"model": "chat-a", **({"messages": HI} if path == "/v1/chat/completions" else {}), **body}
    return client.post(path, json=body, headers={"Authorization": f"Bearer {KEYS[key]['key']}"})


def error_of(response) -> dict:
    return response.json()["error"]


# --- concurrent requests -----------------------------------------------------------------------------------------

def test_concurrent_requests_are_limited_across_router_replicas(monkeypatch) -> None:
    """A key allowed one request at a time has one in flight on router A: router B refuses its second (429 with
    Retry-After), and once the first has ended (here with an error: its slot comes back all the same) B admits."""
    limits = CountingLimits()
    engine = FakeHandle(lambda endpoint, body: [Hang()] if body["messages"][0]["content"] == "wait" else ok())
    first_router = client_of(make_router(monkeypatch, engine, handle_on(limits), timeouts={"queue_s": 1.5}))
    second_router = client_of(make_router(monkeypatch, engine, handle_on(limits), timeouts={"queue_s": 1.5}))
    answers: list[Any] = []
    waiting = threading.Thread(target=lambda: answers.append(
        post(first_router, "one-at-a-time", messages=[{"role": "user", "content": "wait"}])))
    waiting.start()
    deadline = time.monotonic() + 5
    while not engine.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert limits.in_flight("one-at-a-time") == 1
    refused = post(second_router, "one-at-a-time")
    waiting.join(timeout=10)
    assert refused.status_code == 429
    assert error_of(refused) == {
        "message": "Too many concurrent requests for `one-at-a-time`: at most 1 at once. Retry when one has finished.",
        "type": "rate_limit_error", "param": None, "code": "concurrency_limit_exceeded"}
    assert refused.headers["retry-after"] == "1"
    assert answers[0].status_code == 503  # the first found no replica within queue_s
    assert limits.in_flight("one-at-a-time") == 0
    assert post(second_router, "one-at-a-time").status_code == 200
    assert len(engine.calls) == 2  # the refused request never reached the engine
    assert post(second_router, "plain").status_code == 200  # keys without limits never ask


# --- token reservations ------------------------------------------------------------------------------------------

def test_a_request_is_admitted_only_if_the_bucket_holds_its_whole_reservation(monkeypatch) -> None:
    """100 tokens a minute: a request that used 60 leaves 40, so one that may cost 51 (1 of prompt, max_tokens 50)
    waits, although the bucket is not empty; one that may cost 31 goes."""
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok(prompt=30, completion=30)), LocalLimits()))
    assert post(client, "tokens", max_tokens=10).status_code == 200
    refused = post(client, "tokens", max_tokens=50)
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limit_exceeded" and "tokens per minute" in error_of(refused)["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "40"
    assert int(refused.headers["retry-after"]) == 7  # 11 more tokens at 100 a minute: 6.6 s
    assert post(client, "tokens", max_tokens=30).status_code == 200


def test_the_unused_rest_of_a_reservation_comes_back_when_the_request_ends(monkeypatch) -> None:
    # The key-limits clock stands still: at 10,000 a minute the bucket refills a token every 6 ms, which a busy
    # machine spends between two requests.
    monkeypatch.setattr(router.limits, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    limits = CountingLimits()
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok(prompt=3, completion=2)), handle_on(limits)))
    first = post(client, "roomy", max_tokens=500)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 501)  # reserved: 1 + 500
    assert [tokens for _, tokens in limits.released] == [5]  # the engine's count
    second = post(client, "roomy", max_tokens=500)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 5 - 501)  # 496 of the 501 came back


def test_a_request_larger_than_the_keys_minute_is_refused_not_left_waiting(monkeypatch) -> None:
    engine = FakeHandle.scripted(ok())
    client = client_of(make_router(monkeypatch, engine, LocalLimits()))
    for body in ({"max_tokens": 200}, {"n": 4, "max_tokens": 30}, {"max_completion_tokens": 100}):
        refused = post(client, "tokens", **body)
        assert refused.status_code == 429, body
        error = error_of(refused)
        assert (error["type"], error["param"], error["code"]) == ("rate_limit_error", None, "rate_limit_exceeded")
        assert error["message"].startswith("Request too large for `tokens` on tokens per minute: limit 100, "
                                           "requested ")
        assert "retry-after" not in refused.headers  # no wait admits it
        assert refused.headers["x-ratelimit-limit-tokens"] == "100"
    assert not engine.calls
    # Without max_tokens the default completion estimate is capped at what the key's minute holds: it goes.
    assert post(client, "tokens").status_code == 200


@pytest.mark.parametrize(("path", "body", "reserved"), [
    ("/v1/chat/completions", {"max_tokens": 10, "n": 3}, 1 + 3 * 10),
    ("/v1/chat/completions", {"max_tokens": 10, "max_completion_tokens": 20}, 1 + 20),
    ("/v1/chat/completions", {}, 1 + 1024),  # routers.default_completion_tokens
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "héllo wörld"}], "max_tokens": 1}, 4 + 1),
    ("/v1/completions", {"prompt": ["one", "two", "six"], "n": 2, "max_tokens": 10}, 3 + 3 * 2 * 10),
    ("/v1/completions", {"prompt": [1, 2, 3, 4, 5], "max_tokens": 10}, 5 + 10),  # token ids count as they are
    ("/v1/embeddings", {"input": ["a" * 40, "b" * 40]}, 20),
    ("/v1/responses", {"input": "hi", "instructions": "Be brief.", "max_output_tokens": 7}, 3 + 7),
])
def test_what_a_request_reserves(monkeypatch, path: str, body: dict, reserved: int) -> None:
    limits = CountingLimits()
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), handle_on(limits)))
    assert post(client, "roomy", path, **body).status_code == 200
    assert limits.admitted[0][3] == reserved


def test_a_media_part_reserves_a_fixed_estimate_not_its_base64_size() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    body = ChatCompletionBody.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]})
    # The text part: its keys and values, "type", "text", "text", "what is it?": 23 bytes, 6 tokens.
    assert prompt_tokens_estimate(body) == MEDIA_PART_TOKENS + 6


def test_the_default_completion_estimate_is_configurable_and_capped_by_the_keys_minute(monkeypatch) -> None:
    limits = CountingLimits()
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), handle_on(limits),
                                   config={"routers": {"default_completion_tokens": 500}}))
    post(client, "roomy")
    post(client, "tokens")
    assert [args[3] for args in limits.admitted] == [1 + 500, 100]  # tokens: at most its 100 a minute


# --- every way a request ends releases its reservation, once ------------------------------------------------------

STREAM = [Admitted(), Chunk('data: {"t": 1}\n\n', 4, 1), Chunk('data: {"t": 2}\n\n', 4, 2),
          Chunk("data: [DONE]\n\n", 4, 2)]


@pytest.mark.parametrize(("script", "stream", "status", "tokens"), [
    (ok(prompt=3, completion=2), False, 200, 5),
    ([Admitted(), ErrorReply.invalid_request("too long", param="messages", code="context_length_exceeded")],
     False, 400, 0),
    ([BackPressureError(num_queued_requests=1, max_queued_requests=1)], False, 429, 0),  # raised after admission
    ([Admitted(), ActorDiedError()], False, 502, 0),
    (STREAM, True, 200, 6),
    ([*STREAM[:2], ActorDiedError()], True, 200, 5),  # broken mid-stream: what was made is charged
], ids=["whole", "error-reply", "raised-error", "engine-failed", "stream", "stream-broken"])
def test_every_end_of_a_request_releases_once(monkeypatch, script: list, stream: bool, status: int,
                                              tokens: int) -> None:
    limits = CountingLimits()
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(script), handle_on(limits)))
    response = post(client, "roomy", stream=stream, max_tokens=10)
    assert response.status_code == status
    assert [spent for _, spent in limits.released] == [tokens]
    assert limits.in_flight("roomy") == 0 and not limits._reservations


def test_an_answer_from_a_fallback_releases_once(monkeypatch) -> None:
    limits = CountingLimits()
    full = FakeHandle.scripted([BackPressureError(num_queued_requests=1, max_queued_requests=1)])
    client = client_of(make_router(monkeypatch, full, handle_on(limits), {"chat-b": FakeHandle.scripted(ok())},
                                   fallbacks=["chat-b"], timeouts={"total_s": 100}))
    response = post(client, "roomy", max_tokens=10)
    assert response.status_code == 200 and response.headers["x-rayroute-fallback-from"] == "chat-a"
    assert [spent for _, spent in limits.released] == [5]
    # Its reservation outlives the longest the request could take: its model's time, then its fallback's.
    assert limits.admitted[0][5] == 100 + 900 + RESERVATION_MARGIN_S


@pytest.mark.parametrize("when", ["before the first byte", "mid-stream"])
def test_a_client_that_leaves_releases_once(monkeypatch, when: str) -> None:
    """Driven as an ASGI server would: the connection is gone when the response starts (a 2.4 server's send
    raises OSError; the stream's body never starts, so its generator's ``finally`` never runs), or the client's
    disconnect arrives after the first event (the relay is cancelled while it waits for the next)."""
    limits = CountingLimits()
    engine = FakeHandle.scripted([*STREAM[:2], Hang()])
    app = build_http_app(make_router(monkeypatch, engine, handle_on(limits)))
    body = json.dumps({"model": "chat-a", "messages": HI, "stream": True, "max_tokens": 10}).encode()
    first_event = asyncio.Event()

    async def receive() -> dict:
        if body_messages:
            return body_messages.pop(0)
        if when == "mid-stream":
            await first_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and when == "before the first byte":
            raise OSError("connection closed")
        if message["type"] == "http.response.body" and message.get("body"):
            first_event.set()

    body_messages = [{"type": "http.request", "body": body, "more_body": False}]
    spec = "2.4" if when == "before the first byte" else "2.3"
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"authorization", f"Bearer {KEYS['roomy']['key']}".encode()),
                         (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def serve_once() -> None:
        with contextlib.suppress(ClientDisconnect):  # what Starlette raises to the server for a closed connection
            await asyncio.wait_for(app(scope, receive, send), 10)
        await asyncio.sleep(0.05)  # a generator closed by the loop closes now

    asyncio.run(serve_once())
    assert len(limits.released) == 1
    assert limits.released[0][1] == 5  # the first event's count: 4 + 1
    assert limits.in_flight("roomy") == 0 and not limits._reservations
    assert engine.streams[0].cancelled


# --- reservations of a router that died ---------------------------------------------------------------------------

def test_a_reservation_never_released_expires() -> None:
    """A router that dies holding a request cannot release it: past its expiry the slot comes back and its tokens
    stay spent; its late release, if any, touches nothing of the request admitted since."""
    limits = KeyLimits()
    leaked = limits.admit("k", None, 100, 40, 1, hold_s=10, now=0)
    assert leaked.allowed and limits.in_flight("k") == 1
    waiting = limits.admit("k", None, 100, 1, 1, hold_s=10, now=5)
    assert not waiting.allowed and waiting.limited_by == "concurrent"
    later = limits.admit("k", None, 100, 1, 1, hold_s=10, now=11)
    assert later.allowed and limits.in_flight("k") == 1
    # 40 reserved and never settled: spent. 11 s refilled 18.3 of them, capped at the 100 a minute.
    assert later.headers["x-ratelimit-remaining-tokens"] == str(int(min(100, 60 + 11 * 100 / 60) - 1))
    limits.release(leaked.reservation, 0, now=12)
    assert limits.in_flight("k") == 1  # the expired reservation's release is ignored: not the live one's slot
    limits.release(later.reservation, 1, now=12)
    limits.release(later.reservation, 1, now=12)  # twice: nothing more
    assert limits.in_flight("k") == 0


def test_releases_settle_tokens_both_ways() -> None:
    limits = KeyLimits()
    admitted = limits.admit("k", None, 600, 100, now=0)
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "500"
    limits.release(admitted.reservation, 30, now=0)  # 70 come back
    assert limits.admit("k", None, 600, 0, now=0).headers["x-ratelimit-remaining-tokens"] == "570"
    over = limits.admit("k", None, 600, 10, now=0)
    limits.release(over.reservation, 580, now=0)  # 570 more than reserved: the bucket goes below zero
    refused = limits.admit("k", None, 600, 10, now=0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(20 * 0.1)  # from -10 to 10 at 10 a second


# --- request caps --------------------------------------------------------------------------------------------------

SMALL_CAPS = {"request_limits": {"max_n": 2, "max_messages": 3, "max_content_parts": 2, "max_prompt_items": 3}}
TEXT = {"type": "text", "text": "x"}


@pytest.mark.parametrize(("path", "body", "param", "code", "message"), [
    ("/v1/chat/completions", {"messages": HI * 4}, "messages", "array_above_max_length",
     "Invalid 'messages': array too long. Expected an array with maximum length 3, but got an array with length 4 "
     "instead."),
    ("/v1/chat/completions", {"messages": [*HI, {"role": "user", "content": [TEXT] * 3}]}, "messages[1].content",
     "array_above_max_length", "Invalid 'messages[1].content': array too long. Expected an array with maximum "
     "length 2, but got an array with length 3 instead."),
    ("/v1/chat/completions", {"n": 3}, "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 2, but got 3 instead."),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "array_above_max_length", None),
    ("/v1/completions", {"prompt": [[1], [2], [3], [4]]}, "prompt", "array_above_max_length", None),
    ("/v1/completions", {"prompt": "a", "n": 5}, "n", "integer_above_max_value", None),
    ("/v1/embeddings", {"input": ["a", "b", "c", "d"]}, "input", "array_above_max_length", None),
    ("/v1/responses", {"input": [{"role": "user", "content": "hi"}] * 4}, "input", "array_above_max_length", None),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 3}]},
     "input[0].content", "array_above_max_length", None),
])
def test_each_request_cap_is_a_400_naming_the_parameter(monkeypatch, path: str, body: dict, param: str, code: str,
                                                       message: str | None) -> None:
    engine = FakeHandle.scripted(ok())
    client = client_of(make_router(monkeypatch, engine, LocalLimits(), config=SMALL_CAPS))
    response = post(client, "plain", path, **body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    if message is not None:
        assert error["message"] == message
    assert not engine.calls


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": HI * 3, "n": 2}),
    ("/v1/completions", {"prompt": list(range(5000))}),  # token ids: one prompt, however long
    ("/v1/embeddings", {"input": [1, 2, 3, 4, 5]}),
    ("/v1/responses", {"input": "a long text " * 100}),
])
def test_requests_within_the_caps_pass(monkeypatch, path: str, body: dict) -> None:
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), LocalLimits(), config=SMALL_CAPS))
    assert post(client, "plain", path, **body).status_code == 200


def test_caps_are_checked_before_the_body_is_validated(monkeypatch) -> None:
    """Counting comes before building objects: a list over the cap is refused for its length even when each of
    its items is invalid, so the router never spends time validating 200,000 messages to refuse them."""
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), LocalLimits()))
    wizards = [{"role": "wizard"}] * 200_000  # 3.8 MiB: within the body limit
    response = post(client, "plain", messages=wizards)
    assert response.status_code == 400
    assert (error_of(response)["param"], error_of(response)["code"]) == ("messages", "array_above_max_length")
    assert "maximum length 2048, but got an array with length 200000" in error_of(response)["message"]
    assert error_of(post(client, "plain", messages=wizards[:3]))["param"] == "messages[0].role"


def test_request_defaults() -> None:
    args = RouterArgs.model_validate({"models": [{"id": "m"}]})
    assert args.max_request_bytes == 4 * 1024 * 1024
    assert args.request_limits == RequestLimits(max_n=16, max_messages=2048, max_content_parts=64,
                                                max_prompt_items=2048)
    assert (args.routers.key_limits_unavailable, args.routers.default_completion_tokens) == ("refuse", 1024)
    # The router application gets them from the whole config (router/app.py's expansion).
    whole = parse_args({"models": [{"id": "m", "source": "org/m"}], "request_limits": {"max_n": 4},
                        "routers": {"key_limits_unavailable": "allow"}})
    routed = RouterArgs.model_validate(whole.router_args())
    assert routed.request_limits.max_n == 4 and routed.routers.key_limits_unavailable == "allow"


def test_the_default_body_limit_is_4_mib(monkeypatch) -> None:
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), LocalLimits()))
    padding = "x" * (4 * 1024 * 1024)
    response = post(client, "plain", messages=[{"role": "user", "content": padding}])
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    assert post(client, "plain", messages=[{"role": "user", "content": padding[:-1024]}]).status_code == 200


def test_an_admission_released_before_it_is_made_holds_nothing() -> None:
    """A router gave up waiting for a slow replica and released its reservation; the admission, arriving after
    that, takes neither a slot nor tokens (else a key limited to one request at a time would be locked out until
    the reservation expired)."""
    limits = KeyLimits()
    limits.release("given-up", 0, now=0)
    late = limits.admit("k", 10, 100, 40, 1, now=1, reservation="given-up")
    assert not late.allowed and limits.in_flight("k") == 0 and not limits._reservations
    fresh = limits.admit("k", 10, 100, 40, 1, now=2, reservation="next")
    assert fresh.allowed and fresh.reservation == "next"
    assert fresh.headers["x-ratelimit-remaining-tokens"] == "60"
    assert fresh.headers["x-ratelimit-remaining-requests"] == "9"
    limits.release("forgotten", 0, now=3)
    limits.admit("other", None, None, 0, 1, now=3 + RESERVATION_MARGIN_S + RESERVATION_SWEEP_S)
    assert "forgotten" not in limits._abandoned  # remembered for a while only: no unbounded growth


# --- when the key-limits replica does not answer ------------------------------------------------------------------

class UnansweringLimits:
    """A key-limits handle whose replica is gone: ``admit`` never answers (``hang``) or fails as a dead actor's
    call does; ``release`` fails too, and must not reach the request."""

    def __init__(self, hang: bool):
        self.hang = hang
        self.calls = 0
        self.admitted: list[str] = []  # the router's reservation ids, as asked for and as released
        self.released: list[str] = []

    def __getattr__(self, method: str) -> SimpleNamespace:
        async def admit(*args: Any, reservation: str) -> Any:
            self.calls += 1
            self.admitted.append(reservation)
            if self.hang:
                await asyncio.sleep(3600)
            raise ActorDiedError()

        def release(reservation: str, tokens: int) -> None:
            self.released.append(reservation)
            raise ActorDiedError()

        return SimpleNamespace(remote=admit if method == "admit" else release)


@pytest.mark.parametrize("hang", [True, False], ids=["no-answer", "actor-died"])
@pytest.mark.parametrize("policy", ["refuse", "allow"])
def test_unreachable_key_limits_follow_the_policy_never_a_hang(monkeypatch, caplog, hang: bool,
                                                               policy: str) -> None:
    monkeypatch.setattr(router.admission, "KEY_LIMITS_TIMEOUT_S", 0.2)
    limits = UnansweringLimits(hang)
    engine = FakeHandle.scripted(ok())
    client = client_of(make_router(monkeypatch, engine, limits,
                                   config={"routers": {"key_limits_unavailable": policy}}))
    with caplog.at_level(logging.WARNING, logger="rayroute.router"):
        started = time.monotonic()
        answers = [post(client, "roomy", max_tokens=5) for _ in range(3)]
        waited = time.monotonic() - started
    assert waited < 3 * 0.2 + 2  # bounded by the limits call's wait, however the replica fails
    assert limits.calls == 3
    assert limits.released == limits.admitted  # each admission given up on is released: a slow replica keeps none
    if policy == "refuse":
        assert {a.status_code for a in answers} == {503}
        assert error_of(answers[0]) == {"message": "Rate limits cannot be checked right now. Retry shortly.",
                                        "type": "server_error", "param": None, "code": "limits_unavailable"}
        assert int(answers[0].headers["retry-after"]) >= 1
        assert not engine.calls
    else:
        assert {a.status_code for a in answers} == {200}
        assert "x-ratelimit-limit-tokens" not in answers[0].headers
        assert len(engine.calls) == 3
    warnings = [r.getMessage() for r in caplog.records if "key limits unavailable" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once a period, not once a request
    assert post(client, "plain").status_code == 200  # a key without limits never asks


def test_a_release_that_fails_does_not_reach_the_request(monkeypatch) -> None:
    """The admission answered, then the replica went: the request's own answer is unaffected."""
    limits = handle_on(KeyLimits())
    limits.release = SimpleNamespace(remote=lambda *args: (_ for _ in ()).throw(ActorDiedError()))
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), limits))
    assert post(client, "roomy", max_tokens=5).status_code == 200
    stream = client_of(make_router(monkeypatch, FakeHandle.scripted(STREAM), limits))
    response = post(stream, "roomy", max_tokens=5, stream=True)
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
