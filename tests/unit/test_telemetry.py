"""The router's metrics without a cluster: whatever clients send, every label value comes from a fixed set, so no
client can make new series."""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.util.metrics import Counter, Gauge, Histogram

from deployments.replies import Admitted, FullReply
from router.ingress import OpenAIRouter, build_http_app
from router.middleware import LOGGED_PATH_CHARS, OTHER_ENDPOINT
from router.telemetry import GatewayMetrics, RequestRecord
from tests.unit.fakes import FakeHandle

KEY = "sk-metrics-" + "0123456789abcdef"
CONFIG = {"models": [{"id": "chat-a", "aliases": ["gpt-4o-mini"]}, {"id": "org/chat-b:v1"}]}
CONFIGURED = {("chat-a", "chat-a"), ("gpt-4o-mini", "chat-a"), ("org/chat-b:v1", "org/chat-b:v1")}
TEMPLATES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
             "/v1/models/{model_id}", "/v1/responses/{response_id}", "/v1/responses/{response_id}/{action}"}


class Recorder:
    """Stands in for one Ray metric: keeps the (metric, labels) pair of everything recorded on it."""

    def __init__(self, name: str, series: set[tuple[str, frozenset]]):
        self.name = name
        self.series = series

    def record(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.series.add((self.name, frozenset((tags or {}).items())))

    inc = observe = set = record


def recorded(metrics: GatewayMetrics) -> set[tuple[str, frozenset]]:
    series: set[tuple[str, frozenset]] = set()
    for name, value in list(vars(metrics).items()):
        if isinstance(value, Counter | Gauge | Histogram):
            setattr(metrics, name, Recorder(name, series))
    return series


def answer(endpoint: str, body: dict) -> list[Any]:
    return [Admitted(), FullReply(json.dumps({"model": body["model"]}), 2, 3)]


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> OpenAIRouter:
    monkeypatch.setenv("RAYROUTE_API_KEYS", KEY)
    return OpenAIRouter(CONFIG, {"chat-a": FakeHandle(answer), "org/chat-b:v1": FakeHandle(answer)})


def made_up(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits + "-_.:", k=rng.randint(1, 40)))


def test_made_up_paths_and_models_make_no_new_series(router: OpenAIRouter) -> None:
    """1,000 requests to made-up /v1 paths and models, with and mostly without a key, after a first 60 of the same
    kinds: not one new (metric, labels) pair, and every label value is a route template, ``other``, a configured
    name or empty."""
    series = recorded(router.metrics)
    client = TestClient(build_http_app(router), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {KEY}"}
    rng = random.Random(7)

    def one(i: int) -> int:
        name = made_up(rng)
        kind = i % 7
        if kind == 0:
            return client.get(f"/v1/{name}").status_code
        if kind == 1:
            return client.get(f"/v1/models/{name}/{made_up(rng)}").status_code
        if kind == 2:
            return client.post("/v1/chat/completions", json={"model": name, "messages": []}).status_code
        if kind == 3:
            return client.post("/v1/chat/completions", headers=auth,
                               json={"model": name, "messages": [{"role": "user", "content": "hi"}]}).status_code
        if kind == 4:
            return client.request(rng.choice(["GET", "POST", "DELETE"]), f"/v1/{name}/{made_up(rng)}",
                                  headers=auth).status_code
        if kind == 5:
            return client.get(f"/v1/models/{name}", headers=auth).status_code
        return client.post("/v1/chat/completions", headers=auth,
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).status_code

    statuses = {one(i) for i in range(60)}
    assert {200, 401, 404, 429} <= statuses  # answered, refused, unknown, and throttled once the failures add up
    before = set(series)
    for i in range(1000):
        one(i)
    assert series == before
    labels: dict[str, set[str]] = {}
    for _, tags in series:
        for key, value in tags:
            labels.setdefault(key, set()).add(value)
    assert labels["endpoint"] <= TEMPLATES | {OTHER_ENDPOINT} and OTHER_ENDPOINT in labels["endpoint"]
    assert labels["model"] <= {model for model, _ in CONFIGURED} | {""}
    assert labels["served_model"] <= {served for _, served in CONFIGURED} | {""}
    assert labels["status_code"] <= {"200", "400", "401", "404", "405", "422", "429"}


@pytest.mark.parametrize(("method", "path", "endpoint"), [
    ("POST", "/v1/chat/completions", "/v1/chat/completions"),
    ("GET", "/v1/models/org/chat-b:v1", "/v1/models/{model_id}"),
    ("GET", "/v1/responses/resp_123", "/v1/responses/{response_id}"),
    ("POST", "/v1/responses/resp_123/cancel", "/v1/responses/{response_id}/{action}"),
    ("GET", "/v1/chat/completions", "/v1/chat/completions"),  # 405: the route, with the wrong method
    ("GET", "/v1/nothing", OTHER_ENDPOINT),
])
@pytest.mark.parametrize("key", [KEY, None])
def test_endpoint_is_the_routes_template_with_or_without_a_key(
        router: OpenAIRouter, access_log_lines: list[str], method: str, path: str, endpoint: str,
        key: str | None) -> None:
    series = recorded(router.metrics)
    client = TestClient(build_http_app(router), raise_server_exceptions=False)
    client.request(method, path, headers={"Authorization": f"Bearer {key}"} if key else {},
                   json={"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]})
    assert {dict(tags).get("endpoint") for name, tags in series if name == "requests"} == {endpoint}
    line = json.loads(access_log_lines[-1])
    assert (line["endpoint"], line["path"]) == (endpoint, path)


def test_the_access_log_keeps_a_bounded_path(router: OpenAIRouter, access_log_lines: list[str]) -> None:
    client = TestClient(build_http_app(router), raise_server_exceptions=False)
    client.get("/v1/" + "x" * 10_000)
    line = json.loads(access_log_lines[-1])
    assert line["endpoint"] == OTHER_ENDPOINT and line["path"] == ("/v1/" + "x" * 10_000)[:LOGGED_PATH_CHARS]


def test_model_labels_are_configured_names_only() -> None:
    """Whatever a record holds, the model labels are a pair the metrics were built with, or empty (not routed), or
    ``other``: a client's name can never become one."""
    metrics = GatewayMetrics([("chat-a", "chat-a")])
    series = recorded(metrics)
    for model in ("chat-a", "", "made-up"):
        record = RequestRecord(request_id="r", endpoint="/v1/chat/completions", model=model,
                               served_model=model, dispatched_at=0.0, first_reply_at=0.0, finished_at=0.0)
        metrics.first_reply(record)
        metrics.token_gap(record, 0.01)
        metrics.fell_back(record, "made-up-too", "made-up-too", "model_at_capacity")
        metrics.finished(record)
    values = {value for _, tags in series for key, value in tags if key in ("model", "served_model", "fallback")}
    assert values == {"chat-a", "", "other"}


def test_a_request_that_fails_unhandled_is_counted_as_the_500_it_gets(router: OpenAIRouter,
                                                                      access_log_lines: list[str]) -> None:
    series = recorded(router.metrics)

    def broken(endpoint: str, body: dict) -> list[Any]:
        raise RuntimeError("engine handle broke")

    router.routes["chat-a"] = replace(router.routes["chat-a"], handle=FakeHandle(broken))
    client = TestClient(build_http_app(router), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 500
    assert {dict(tags)["status_code"] for name, tags in series if name == "requests"} == {"500"}
    assert json.loads(access_log_lines[-1])["status"] == 500


def test_the_gauges_are_published_while_the_app_runs(router: OpenAIRouter) -> None:
    """Built, the router publishes nothing (no event loop yet); its app's lifespan publishes every configured name's
    gauges from the start, and stops with the app."""
    series = recorded(router.metrics)
    assert router.metrics._publisher is None
    with TestClient(build_http_app(router)):
        publisher = router.metrics._publisher
        assert publisher is not None and not publisher.done()
        for _ in range(100):
            if {"in_flight", "waiting", "replica_choice"} <= {name for name, _ in series}:
                break
            time.sleep(0.01)
    published = {(name, dict(tags)["model"]) for name, tags in series if name != "replica_choice"}
    assert published == {(gauge, model) for gauge in ("in_flight", "waiting") for model, _ in CONFIGURED}
    # And each served model's replica choice, which the dashboard joins vLLM's per-model metrics by.
    choices = {tuple(sorted(tags)) for name, tags in series if name == "replica_choice"}
    assert choices == {(("replica_choice", model.replica_choice), ("served_model", model.id))
                       for model in router.config.models}
    assert router.metrics._publisher is None and publisher.done()


def test_router_gauges_cover_every_configured_name_from_the_start() -> None:
    """Both gauges are published for every name from the first second, however the names are given (the router
    passes a generator: read once, it left the second gauge with no series until a request came)."""
    import asyncio

    from router.telemetry import GatewayMetrics

    metrics = GatewayMetrics((name, "chat-a") for name in ("chat-a", "gpt-4o-mini"))
    published: dict[str, set[str]] = {"in_flight": set(), "waiting": set()}
    for kind, names in published.items():
        setattr(metrics, kind, type("Recorder", (), {"set": lambda self, value, tags, names=names: names.add(
            tags["model"])})())

    async def one_round() -> None:
        metrics.publish_gauges()
        await asyncio.sleep(0.05)

    asyncio.run(one_round())
    assert published == {"in_flight": {"chat-a", "gpt-4o-mini"}, "waiting": {"chat-a", "gpt-4o-mini"}}
