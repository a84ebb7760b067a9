"""``/ready`` without a cluster: Serve's deployment details are faked, as the controller reports them.

What is pinned down: a model that keeps replicas (``min_replicas`` ≥ 1) is waited for until one runs, and named;
a model that scales to zero never holds readiness back, however its on-demand replica is doing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.serve.schema import DeploymentSchema

import router.readiness
from router.ingress import OpenAIRouter, build_http_app
from router.readiness import min_replicas
from tests.unit.fakes import FakeHandle

CONFIG = {"models": [{"id": "chat-a"}, {"id": "org/chat-b:v1"}]}


def deployment(status: str, running: int, minimum: int | None = None, fixed: int | None = None,
               starting: int = 0) -> SimpleNamespace:
    """A deployment's details: autoscaled from ``minimum`` replicas, or ``fixed`` replicas."""
    config = (DeploymentSchema(name="d", num_replicas=fixed) if fixed is not None
              else DeploymentSchema(name="d", autoscaling_config={"min_replicas": minimum, "max_replicas": 2}))
    replicas = [SimpleNamespace(state="RUNNING")] * running + [SimpleNamespace(state="STARTING")] * starting
    return SimpleNamespace(status=status, replicas=replicas, deployment_config=config)


@pytest.fixture
def serve_reports(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The deployments Serve reports, by name (each model's is named as its engine deployment); fill it in."""
    deployments: dict[str, Any] = {"engine-org_chat-b_v1": deployment("HEALTHY", 1, minimum=1),
                                   "OpenAIRouter": deployment("HEALTHY", 2, fixed=2)}
    monkeypatch.setattr(router.readiness, "serve_deployments", lambda: deployments)
    return deployments


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    engines = {"chat-a": FakeHandle(lambda *_: []), "org/chat-b:v1": FakeHandle(lambda *_: [])}
    return TestClient(build_http_app(OpenAIRouter(CONFIG, engines)))


@pytest.mark.parametrize(("status", "running", "starting", "ready"), [
    ("HEALTHY", 1, 0, True),
    ("UPDATING", 1, 1, True),    # a redeploy: the old replica still serves
    ("UPDATING", 0, 1, False),   # first start
    ("UNHEALTHY", 0, 0, False),  # its replica failed to start
    ("UPSCALING", 0, 1, False),  # its one replica died and is being replaced
])
def test_a_model_that_keeps_a_replica_is_waited_for_until_one_runs(client, serve_reports, status: str,
                                                                   running: int, starting: int,
                                                                   ready: bool) -> None:
    serve_reports["engine-chat-a"] = deployment(status, running, minimum=1, starting=starting)
    response = client.get("/ready")
    if ready:
        assert (response.status_code, response.json()) == (200, {"status": "ready"})
    else:
        assert (response.status_code, response.json()) == (503, {"status": "starting", "waiting_for": ["chat-a"]})


@pytest.mark.parametrize(("status", "starting"), [
    ("HEALTHY", 0),      # scaled to zero, idle
    ("UPSCALING", 1),    # starting on demand
    ("UPSCALING", 0),    # asked for, and no node can place its replica
    ("UPDATING", 0),     # redeployed while its unplaceable replica was still wanted
    ("UNHEALTHY", 0),    # its on-demand replica failed to start
])
def test_a_model_that_scales_to_zero_never_holds_readiness_back(client, serve_reports, status: str,
                                                                starting: int) -> None:
    serve_reports["engine-chat-a"] = deployment(status, 0, minimum=0, starting=starting)
    response = client.get("/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_a_model_not_deployed_yet_is_waited_for(client, serve_reports) -> None:
    serve_reports["engine-chat-a"] = deployment("HEALTHY", 1, minimum=1)
    del serve_reports["engine-org_chat-b_v1"]
    response = client.get("/ready")
    assert (response.status_code, response.json()["waiting_for"]) == (503, ["org/chat-b:v1"])


def test_min_replicas_is_read_from_the_applied_config() -> None:
    assert min_replicas(deployment("HEALTHY", 0, minimum=0)) == 0
    assert min_replicas(deployment("HEALTHY", 0, minimum=3)) == 3
    assert min_replicas(deployment("HEALTHY", 0, fixed=2)) == 2  # no autoscaling: Serve's DEFAULT for it
