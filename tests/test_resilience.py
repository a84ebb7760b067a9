"""What the router does when engines are slow, full, dying or gone, and when a key runs out of allowance.

Driven without a cluster: scripted engine handles play each failure exactly as Ray Serve reports it (a
``BackPressureError`` from a full queue, a ``RayActorError`` from a dead replica, an ``engine_unavailable`` reply
from a replica whose engine died). The end-to-end tests show the same behaviour with real replicas.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.autoscaling import KV_CACHE, RUNNING, WAITING, EngineLoadPolicy, serve_autoscaling_config
from deployments.config import Autoscaling, ModelConfig
from deployments.constants import STALL_TIMEOUT_S
from deployments.replies import ENGINE_UNAVAILABLE, Admitted, Chunk, ErrorReply, FullReply
from deployments.vllm_hooks import EngineProgress
from router.limits import KeyLimits, duration
from tests.harness import MESSAGES, FakeHandle, Hang, chat, router_client, sse_events


def ok(body: str = "{}", prompt: int = 3, completion: int = 2) -> list[Any]:
    return [Admitted(), FullReply(body, prompt, completion)]


def stream_of(*texts: str) -> list[Any]:
    return [Admitted(), *(Chunk(f"data: {json.dumps({'t': t})}\n\n", 3, i + 1) for i, t in enumerate(texts))]


# --- backpressure and timeouts -----------------------------------------------------------------------------------

def test_full_queue_is_429_with_retry_after(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted([BackPressureError(num_queued_requests=5, max_queued_requests=5)]),
                         monkeypatch)
    response = chat(client)
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.json()["error"]["code"] == "model_at_capacity"
    assert response.headers["retry-after"] == "1"


def test_no_replica_within_the_queue_timeout_is_503_with_retry_after(monkeypatch) -> None:
    engine = FakeHandle.scripted([Hang()])
    client = router_client(engine, monkeypatch, timeouts={"queue_s": 0.2})
    response = chat(client)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert engine.streams[0].cancelled


def test_no_first_token_in_time_is_408(monkeypatch) -> None:
    engine = FakeHandle.scripted([Admitted(), Hang()])
    client = router_client(engine, monkeypatch, timeouts={"first_token_s": 0.2})
    response = chat(client, stream=True)
    assert response.status_code == 408
    assert response.json()["error"] == {"message": "The model `chat-a` produced no token within 0.2s.",
                                        "type": "timeout_error", "param": None, "code": "first_token_timeout"}
    assert engine.streams[0].cancelled


def test_first_token_timeout_does_not_apply_to_whole_answers(monkeypatch) -> None:
    engine = FakeHandle.scripted([Admitted(), Hang()])
    client = router_client(engine, monkeypatch, timeouts={"first_token_s": 0.1, "total_s": 0.4})
    response = chat(client)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"


def test_stream_past_its_total_time_ends_with_an_error_event(monkeypatch) -> None:
    engine = FakeHandle.scripted([*stream_of("a"), Hang()])
    client = router_client(engine, monkeypatch, timeouts={"total_s": 0.5})
    response = chat(client, stream=True)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0] == '{"t": "a"}'
    assert json.loads(events[1])["error"]["code"] == "request_timeout"
    assert events[2] == "[DONE]"


# --- failover ----------------------------------------------------------------------------------------------------

def test_replica_that_died_before_admitting_is_retried(monkeypatch) -> None:
    engine = FakeHandle.scripted([ActorDiedError()],
                                 [ErrorReply.server("gone", status=503, code=ENGINE_UNAVAILABLE)],
                                 ok('{"answer": 1}'))
    response = chat(router_client(engine, monkeypatch))
    assert response.status_code == 200 and response.json() == {"answer": 1}
    assert len(engine.streams) == 3


def test_failure_after_admission_is_retried_once_only(monkeypatch) -> None:
    engine = FakeHandle.scripted([Admitted(), ActorDiedError()])
    response = chat(router_client(engine, monkeypatch))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "engine_error"
    assert len(engine.streams) == 2  # the request itself may be what kills engines


def test_retries_stop_at_the_queue_timeout(monkeypatch) -> None:
    engine = FakeHandle.scripted([ActorDiedError()])
    response = chat(router_client(engine, monkeypatch, timeouts={"queue_s": 1}))
    assert response.status_code == 503
    assert 2 <= len(engine.streams) <= 5


def test_stream_whose_replica_dies_midway_ends_with_an_error_event(monkeypatch) -> None:
    engine = FakeHandle.scripted([*stream_of("a", "b"), ActorDiedError()])
    response = chat(router_client(engine, monkeypatch), stream=True)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [json.loads(e) for e in events[:2]] == [{"t": "a"}, {"t": "b"}]
    assert json.loads(events[2])["error"] == {
        "message": "The engine serving this stream failed. The output so far is incomplete.",
        "type": "server_error", "param": None, "code": "engine_error"}
    assert events[3] == "[DONE]"
    assert len(engine.streams) == 1  # tokens were sent: a retry would repeat them


# --- fallbacks ----------------------------------------------------------------------------------------------------

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


# --- per-key access and limits -----------------------------------------------------------------------------------

def test_key_limited_to_some_models_gets_403_for_others(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted(ok()), monkeypatch)
    response = chat(client, key="sk-free-0000-0123456789")
    assert response.status_code == 403
    assert response.json()["error"] == {"message": "This API key may not use the model `chat-a`.",
                                        "type": "permission_error", "param": "model", "code": "model_not_allowed"}
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES},
                           headers={"Authorization": "Bearer sk-free-0000-0123456789"})
    assert response.status_code == 200


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


def test_token_bucket_refills_at_the_per_minute_rate() -> None:
    limits = KeyLimits()
    assert limits.admit("k", 60, None, now=0).allowed
    for _ in range(59):
        limits.admit("k", 60, None, now=0)
    refused = limits.admit("k", 60, None, now=0)
    assert not refused.allowed and refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    assert limits.admit("k", 60, None, now=1.0).allowed  # one a second comes back
    held = limits.admit("k", None, 100, 10, now=1.0)
    limits.release(held.reservation, 150, now=1.0)  # 150 used of the 10 reserved
    tokens = limits.admit("k", None, 100, now=1.0)
    assert not tokens.allowed and tokens.limited_by == "tokens"
    assert tokens.retry_after_s == pytest.approx(51 * 0.6)  # from -50 to 1 at 100/min
    assert limits.admit("k", None, 100, now=1.0 + 31).allowed


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"),
                                               (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_durations_read_like_openai(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# --- engine load: autoscaling signal and health ------------------------------------------------------------------

def test_engine_load_policy_sizes_to_the_targets() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.5)
    assert policy.desired_replicas(1, [(4, 0, 0.1)]) == 1
    assert policy.desired_replicas(1, [(16, 0, 0.1)]) == 2  # by requests
    assert policy.desired_replicas(2, [(2, 0, 0.9), (2, 0, 0.6)]) == 3  # by KV cache: 1.8 + 1.2
    assert policy.desired_replicas(2, [(1, 1, 0.1), (0, 0, 0.0)]) == 3  # anything waiting: one more
    assert policy.desired_replicas(3, [(0, 0, 0.0)] * 3) == 0  # idle; Ray keeps min_replicas and the delay
    # Requests queued at the routers (or an engine that did not report in time) still count.
    assert policy.desired_replicas(1, [(0, 0, 0.0)], requests=20) == 3


def test_engine_load_policy_reads_ray_context() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.8)
    ctx = SimpleNamespace(aggregated_metrics={RUNNING: {"r1": 8.0, "r2": 8.0}, WAITING: {"r1": 0.0, "r2": 2.0},
                                              KV_CACHE: {"r1": 0.2, "r2": 0.3}},
                          current_num_replicas=2, target_num_replicas=2, policy_state={"s": 1},
                          total_num_requests=18.0)
    assert policy(ctx) == (3, {"s": 1})
    ctx.total_num_requests = 40.0
    assert policy(ctx) == (5, {"s": 1})
    ctx.aggregated_metrics = {}
    assert policy(ctx) == (2, {"s": 1})


def test_engine_load_policy_does_not_flap() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=2, target_kv_cache_usage=0.8)
    busy_then = {RUNNING: {"r1": 6.0}, WAITING: {"r1": 1.0}, KV_CACHE: {"r1": 0.1}}
    # Just scaled down, nothing ongoing: the look-back window's load is the past, not a reason to scale up again.
    ctx = SimpleNamespace(aggregated_metrics=busy_then, current_num_replicas=1, target_num_replicas=1,
                          policy_state={}, total_num_requests=0.0)
    assert policy(ctx) == (0, {})
    # A second replica is starting while requests come: a dip in the running one's figures does not stop it.
    ctx = SimpleNamespace(aggregated_metrics={RUNNING: {"r1": 1.0}, WAITING: {"r1": 0.0}, KV_CACHE: {"r1": 0.1}},
                          current_num_replicas=1, target_num_replicas=2, policy_state={}, total_num_requests=1.0)
    assert policy(ctx) == (2, {})
    # Once it runs, the same figures size the deployment down as usual.
    ctx.current_num_replicas = 2
    assert policy(ctx) == (1, {})


def test_autoscaling_config_is_what_ray_serve_accepts() -> None:
    from ray.serve.config import AutoscalingConfig

    for policy in ("requests", "engine_load"):
        scaling = Autoscaling(min_replicas=0, max_replicas=3, policy=policy, upscale_delay_s=1)
        checked = AutoscalingConfig(**serve_autoscaling_config(scaling))
        assert (checked.min_replicas, checked.max_replicas, checked.upscale_delay_s) == (0, 3, 1)
        assert checked.policy.is_default_policy_function() == (policy == "requests")
        if policy == "engine_load":
            assert callable(checked.policy.get_policy())


def test_engine_progress_reports_load_only_while_busy_and_notices_a_stall() -> None:
    progress = EngineProgress()
    progress.record(SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.4), None)
    assert progress.load(unfinished_requests=4) == {RUNNING: 3.0, WAITING: 1.0, KV_CACHE: 0.4}
    assert progress.load(unfinished_requests=0) == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}
    start = progress.last_progress
    assert not progress.stalled(unfinished_requests=2, now=start + STALL_TIMEOUT_S - 1)
    assert progress.stalled(unfinished_requests=2, now=start + STALL_TIMEOUT_S + 1)
    progress.record(None, SimpleNamespace())  # a step made output
    assert not progress.stalled(unfinished_requests=2)
    # A long idle spell is not a stall: the clock starts when work arrives after it.
    idle_seen = start + 10 * STALL_TIMEOUT_S
    assert not progress.stalled(unfinished_requests=0, now=idle_seen)
    assert not progress.stalled(unfinished_requests=3, now=idle_seen + 5)
    assert progress.stalled(unfinished_requests=3, now=idle_seen + STALL_TIMEOUT_S + 1)


# --- replica choice ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "text"), [
    ({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, "Be brief.Hi"),
    ({"model": "m", "prompt": "Once upon"}, "Once upon"),
    ({"model": "m", "input": "Name three rivers."}, "Name three rivers."),
])
def test_prefix_router_reads_the_prompt_from_rayroute_bodies(body: dict, text: str) -> None:
    """Ray's prefix-affinity router looks for a ``messages`` or ``prompt`` attribute; the engine methods take the
    OpenAI body as a dict (Responses names it ``input``). Without the override it raises for every request."""
    from deployments.prefix_routing import PrefixCacheRouter

    router = PrefixCacheRouter.__new__(PrefixCacheRouter)  # no Serve controller here: the reading needs no state
    assert router._extract_text_from_request(SimpleNamespace(args=[body], kwargs={})) == text


def test_replica_choice_selects_the_deployments_request_router() -> None:
    from deployments.app import engine_deployment
    from deployments.prefix_routing import router_kwargs

    model = {"id": "m", "source": "org/m"}
    default = engine_deployment(ModelConfig.model_validate(model))
    prefix = engine_deployment(ModelConfig.model_validate({**model, "replica_choice": "prefix_cache"}))
    assert "PowerOfTwo" in str(default._deployment_config.request_router_config.request_router_class)
    assert prefix._deployment_config.request_router_config.request_router_class == (
        "deployments.prefix_routing.PrefixCacheRouter")
    assert prefix._deployment_config.request_router_config.request_router_kwargs == router_kwargs()
