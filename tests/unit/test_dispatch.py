"""Calling a model's engine deployment (router/dispatch.py): each endpoint's method, asked until it answers within
the model's timeouts (the queue's, the first token's, the total), a full queue answered 429, and failures retried by
where they happened.

Driven without a cluster: scripted engine handles play each failure exactly as Ray Serve reports it (a
``BackPressureError`` from a full queue, a ``RayActorError`` from a dead replica, an ``engine_unavailable`` reply
from a replica whose engine died). The end-to-end tests show the same behaviour with real replicas.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.replies import ENGINE_UNAVAILABLE, Admitted, ErrorReply
from tests.unit.fakes import FakeHandle, Hang, chat, ok, post, router_client


@pytest.mark.parametrize(("path", "body", "endpoint"), [
    ("/v1/completions", {"model": "chat-a", "prompt": "Once"}, "completions"),
    ("/v1/embeddings", {"model": "chat-a", "input": ["a", "b"]}, "embeddings"),
    ("/v1/responses", {"model": "chat-a", "input": "hi", "store": True, "tools": []}, "responses"),
])
def test_other_endpoints_reach_their_engine_method(client: TestClient, engines, path, body, endpoint) -> None:
    assert post(client, path, body).json()["endpoint"] == endpoint
    assert engines["chat-a"].calls == [(endpoint, body)]


# --- backpressure and timeouts --------------------------------------------------------------------------------------

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


# --- failover -------------------------------------------------------------------------------------------------------

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
