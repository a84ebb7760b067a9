"""A key's cost is admitted before any engine works on it (router/admission.py), seen through real routers: each
limit's 429 and OpenAI's rate-limit headers, concurrency slots across router replicas, token reservations settled
when the request ends (however it ends), and what happens when the key-limits replica does not answer.

Driven without a cluster: real routers in front of fake engine handles (:class:`tests.unit.fakes.FakeHandle`), and
the real :class:`router.limits.KeyLimits` behind the same calls a Serve handle takes
(:class:`tests.unit.fakes.LocalLimits`); two routers sharing one ``KeyLimits`` are two router replicas. The
``KeyLimits`` rules asked directly are ``test_limits.py``.
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
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

import router.admission
import router.limits
from deployments.config import RequestLimits, RouterArgs, parse_args
from deployments.constants import RESERVATION_MARGIN_S
from deployments.replies import Admitted, Chunk, ErrorReply
from router.ingress import build_http_app
from router.limits import KeyLimits
from tests.unit.fakes import (
    HI,
    KEYS,
    MESSAGES,
    FakeHandle,
    Hang,
    LocalLimits,
    chat,
    client_of,
    error_of,
    make_router,
    ok,
    router_client,
    stream_of,
)
from tests.unit.fakes import post_as as post


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


# --- requests and tokens per minute ---------------------------------------------------------------------------------

def test_requests_per_minute_limit(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted(ok()), monkeypatch)
    answers = [client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES},
                           headers={"Authorization": "Bearer sk-free-0000-0123456789"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[2]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert int(refused.headers["retry-after"]) in (29, 30)  # a 2-per-minute bucket refills one in 30 s
    assert "x-ratelimit-limit-tokens" not in refused.headers
    assert "x-ratelimit-limit-requests" not in chat(client).headers  # the admin key has no limits


def test_tokens_per_minute_limit_charges_what_was_used(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted(ok(prompt=6, completion=6)), monkeypatch)
    first = chat(client, key="sk-tokens-00-0123456789", max_tokens=5)  # reserves 1 (the prompt's estimate) + 5
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "4"
    second = chat(client, key="sk-tokens-00-0123456789", max_tokens=1)  # 12 used of 10: refused until it refills
    assert second.status_code == 429
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "tokens per minute" in second.json()["error"]["message"]


def test_streamed_tokens_are_charged(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted([*stream_of(*"abcdefgh"), Chunk("data: [DONE]\n\n", 3, 8)]), monkeypatch)
    assert chat(client, key="sk-tokens-00-0123456789", stream=True).status_code == 200
    assert chat(client, key="sk-tokens-00-0123456789", stream=True).status_code == 429  # 3 + 8 > 10


# --- concurrent requests --------------------------------------------------------------------------------------------

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


# --- token reservations ---------------------------------------------------------------------------------------------

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


def test_the_default_completion_estimate_is_configurable_and_capped_by_the_keys_minute(monkeypatch) -> None:
    limits = CountingLimits()
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), handle_on(limits),
                                   config={"routers": {"default_completion_tokens": 500}}))
    post(client, "roomy")
    post(client, "tokens")
    assert [args[3] for args in limits.admitted] == [1 + 500, 100]  # tokens: at most its 100 a minute


# --- every way a request ends releases its reservation, once --------------------------------------------------------

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


# --- when the key-limits replica does not answer --------------------------------------------------------------------

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


# --- the config's defaults ------------------------------------------------------------------------------------------

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
