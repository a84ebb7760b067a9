"""The preStop hook's wait (deployments/kubernetes/node_drain.py), with Ray's drain call and state API replaced."""

from __future__ import annotations

import time

import pytest

from deployments.kubernetes import node_drain

REPLICA = "ServeReplica:engine-m:engine-m"


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr(node_drain, "request_drain", lambda *args: calls.append(args))
    return calls


def test_a_replica_serve_stops_at_the_deadline_is_waited_for(monkeypatch: pytest.MonkeyPatch, asked) -> None:
    gone_at = time.monotonic() + 0.3  # Serve kills it just after the drain's deadline (0 s here)
    monkeypatch.setattr(node_drain, "serve_replicas_on",
                        lambda node: [REPLICA] if time.monotonic() < gone_at else [])
    assert node_drain.drain("gcs:6379", "node-1", 0, poll_s=0.05) == []
    assert asked == [("gcs:6379", "node-1", 0, "the pod is stopping")]


def test_a_replica_still_there_after_the_deadline_is_reported(monkeypatch: pytest.MonkeyPatch, asked) -> None:
    monkeypatch.setattr(node_drain, "DEADLINE_SETTLE_S", 0.2)
    monkeypatch.setattr(node_drain, "serve_replicas_on", lambda node: [REPLICA])
    started = time.monotonic()
    assert node_drain.drain("gcs:6379", "node-1", 0, poll_s=0.05) == [REPLICA]
    assert time.monotonic() - started < 2
