"""End to end: metrics through a real Prometheus, and every Grafana dashboard query answered by it.

Prometheus (Debian's package, which `.ci/run` installs) scrapes the test cluster's one metrics port every two seconds.
Known traffic goes in; the token counters must move by exactly the `usage` the clients received.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.names import engine_deployment_name
from tests.e2e.harness import API_KEY, DEFAULT_MODEL, EMBEDDING_MODEL, METRICS_ALIAS, ROOT, Cluster, free_port

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
DASHBOARD = ROOT / "helm" / "dashboards" / "rayroute.json"
ASK = [{"role": "user", "content": "Tell me about the city of Lyon."}]
SCRAPE_INTERVAL = "2s"


class Prometheus:
    def __init__(self, url: str):
        self.url = url
        self.started = time.time()

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, (expr, response.text)
        return response.json()["data"]["result"]

    def had_data(self, expr: str, since: float) -> bool:
        """Whether ``expr`` gave any series at any scrape since ``since``: what a Grafana panel over that range
        shows. A gauge that Ray exports only while it is being set is gone from an instant query a second later
        (Prometheus marks a series stale once a scrape lacks it), but stays in the range."""
        # At the scrape interval: every step sees each scrape's samples, and a finer one only costs time. A join over
        # the whole module's range can take over 30 s on two cores busy with engines.
        response = httpx.get(self.url + "/api/v1/query_range", timeout=120,
                             params={"query": expr, "start": since, "end": time.time(), "step": SCRAPE_INTERVAL})
        assert response.status_code == 200, (expr, response.text)
        return bool(response.json()["data"]["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def settled(self, expr: str, quiet_s: float = 4, timeout: float = 60) -> float:
        """The value once it has not changed for ``quiet_s`` (earlier traffic fully exported and scraped)."""
        deadline = time.monotonic() + timeout
        value, since = self.value(expr), time.monotonic()
        while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
            time.sleep(1)
            current = self.value(expr)
            if current != value:
                value, since = current, time.monotonic()
        return value

    def wait_for(self, expr: str, expected: float, timeout: float = 60) -> float:
        """Poll until ``expr`` equals ``expected``: Ray exports metrics periodically, Prometheus scrapes them."""
        deadline = time.monotonic() + timeout
        value = self.value(expr)
        while value != expected and time.monotonic() < deadline:
            time.sleep(1)
            value = self.value(expr)
        return value



@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        # A scrape times out after its interval at the most; on two busy cores Ray's metrics page (every replica's
        # vLLM histograms) can take over a second to render, and a 1 s interval then never scrapes at all.
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{cluster.metrics_port}"]}]}],
    }))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first scrape comes a few seconds after start
            try:
                if server.query('up{job="ray"} == 1'):
                    break
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(1)
        else:
            targets = httpx.get(server.url + "/api/v1/targets", timeout=10).text[-1500:]
            pytest.fail(f"Prometheus never scraped the cluster; its targets: {targets}\n"
                        + (tmp / "prometheus.log").read_text()[-1500:])
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def scrape(cluster: Cluster) -> str:
    return httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text


def counter(model: str, name: str) -> str:
    return f'sum(ray_rayroute_{name}_total{{model="{model}"}})'


def test_scrape_passes_promtool(cluster: Cluster) -> None:
    httpx.post(cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=60,
               json={"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 2})
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(cluster), capture_output=True, text=True,
                            check=False)
    output = result.stdout + result.stderr
    # The scrape parses: promtool reports unparsable input as "error while linting".
    assert "error while linting" not in output, output[-3000:]
    # Lint: Ray's own metrics carry Ray's camelCase tags (WorkerId, ...) and names promtool frowns on; ours carry
    # nothing else to complain about.
    ours = [line for line in output.splitlines() if line.startswith("ray_rayroute_")]
    tolerated = "label names should be written in 'snake_case' not 'camelCase'"  # Ray's WorkerId on gauges
    assert all(line.endswith(tolerated) for line in ours), ours


def test_token_counters_equal_the_usage_clients_received(cluster: Cluster, prometheus: Prometheus) -> None:
    model = METRICS_ALIAS  # an alias, so the labels show the name the client used; no other test sends it
    before = {name: prometheus.settled(counter(model, name)) for name in ("prompt_tokens", "completion_tokens")}
    client = cluster.client()
    prompt = completion = 0
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=9)  # cut by max_tokens
    several = client.chat.completions.create(model=model, messages=ASK, max_tokens=7, n=3, temperature=1)
    for reply in (plain, several):
        prompt += reply.usage.prompt_tokens
        completion += reply.usage.completion_tokens
    streamed = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=11, stream=True,
                                                   stream_options={"include_usage": True}))
    prompt += streamed[-1].usage.prompt_tokens
    completion += streamed[-1].usage.completion_tokens
    legacy = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
    prompt += legacy.usage.prompt_tokens
    completion += legacy.usage.completion_tokens
    # A stream without include_usage still counts, by the usage the engine reported alongside.
    quiet = list(client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0, stream=True))
    assert all(chunk.usage is None for chunk in quiet)
    twin = client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0)
    prompt += 2 * twin.usage.prompt_tokens
    completion += 2 * twin.usage.completion_tokens

    assert prometheus.wait_for(counter(model, "prompt_tokens"), before["prompt_tokens"] + prompt) == (
        before["prompt_tokens"] + prompt)
    assert prometheus.wait_for(counter(model, "completion_tokens"), before["completion_tokens"] + completion) == (
        before["completion_tokens"] + completion)


def test_finished_streams_leave_nothing_ongoing_and_nothing_cancelled(cluster: Cluster,
                                                                      prometheus: Prometheus) -> None:
    """Serve must see every finished stream's call end: at the routers' handles, whose counts autoscaling goes by,
    and at the engine replica, whose count replica choice goes by; and count none of them as failed or cancelled
    (the router cancels a call only when its stream did not finish)."""
    deployment = engine_deployment_name(DEFAULT_MODEL)
    at_handles = f'sum(ray_serve_num_ongoing_requests_at_replicas{{deployment="{deployment}"}})'
    at_replica = f'sum(ray_serve_replica_processing_queries{{deployment="{deployment}"}})'
    failed = f'sum(ray_serve_deployment_error_counter_total{{deployment="{deployment}"}})'
    failed_before = prometheus.settled(failed)
    started = time.time()
    body = {"model": DEFAULT_MODEL, "messages": ASK, "stream": True, "max_tokens": 48, "ignore_eos": True}

    def stream(_: int) -> tuple[int, str]:
        with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                          timeout=300) as response:
            return response.status_code, [line for line in response.iter_lines() if line][-1]

    with ThreadPoolExecutor(8) as pool:
        ends = list(pool.map(stream, range(16)))
    assert ends == [(200, "data: [DONE]")] * 16
    # Not vacuous: both counts were seen above zero while the streams ran.
    assert prometheus.had_data(f"{at_handles} > 0", since=started)
    assert prometheus.had_data(f"{at_replica} > 0", since=started)
    assert prometheus.wait_for(at_handles, 0) == 0
    assert prometheus.wait_for(at_replica, 0) == 0
    assert prometheus.settled(failed) == failed_before


def test_abandoned_stream_counts_what_was_generated(cluster: Cluster, prometheus: Prometheus) -> None:
    model = DEFAULT_MODEL
    expr = counter(model, "completion_tokens")
    before = prometheus.settled(expr)
    received = 0
    body = {"model": model, "messages": ASK, "stream": True, "max_tokens": 2000, "ignore_eos": True}
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                received += 1
                if received == 20:
                    break
    deadline = time.monotonic() + 60
    while prometheus.value(expr) - before < received and time.monotonic() < deadline:
        time.sleep(1)
    counted = prometheus.value(expr) - before
    assert received <= counted < 2000


def test_request_and_engine_metrics_are_exported(cluster: Cluster, prometheus: Prometheus) -> None:
    httpx.post(cluster.base_url + "/v1/embeddings", headers=AUTH, timeout=60,
               json={"model": EMBEDDING_MODEL, "input": "cat"})
    httpx.post(cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=60,
               json={"model": "no-such-model", "messages": ASK})
    # A running request, so vLLM's gauges have a busy engine's values to show.
    busy = {"model": DEFAULT_MODEL, "messages": ASK, "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=120,
                      json=busy) as response:
        next(response.iter_lines())
        for expr in [
            'ray_rayroute_requests_total{endpoint="/v1/embeddings",status_code="200"}',
            'ray_rayroute_requests_total{status_code="404",model=""}',  # a made-up name never becomes a label
            'ray_vllm_num_requests_running{model_name="smollm2-135m-instruct"}',
            'ray_vllm_kv_cache_usage_perc',
            # Each model is a Serve application of its own (router/app.py), named as its engine deployment.
            f'ray_serve_deployment_replica_healthy{{application="{engine_deployment_name(DEFAULT_MODEL)}"}}',
            'ray_serve_deployment_replica_healthy{application="rayroute",deployment="OpenAIRouter"}',
        ]:
            deadline = time.monotonic() + 60
            while not prometheus.query(expr) and time.monotonic() < deadline:
                time.sleep(1)
            assert prometheus.query(expr), expr
    assert not prometheus.query('ray_rayroute_requests_total{model="no-such-model"}')


def test_gauges_are_data_while_idle(cluster: Cluster, prometheus: Prometheus) -> None:
    """An idle model's gauge panels show 0, not "No data" (a user reads "No data" as "the metrics are broken"):
    the router publishes its gauges every second for every configured name (an alias too), and each engine
    replica publishes vLLM's (which vLLM sets only while its engine steps) while it holds no request."""
    exprs = [f'{gauge}{{model="{METRICS_ALIAS}",served_model="{DEFAULT_MODEL}"}}'
             for gauge in ("ray_rayroute_requests_in_flight", "ray_rayroute_requests_waiting")]
    exprs += [f'{gauge}{{model_name="{DEFAULT_MODEL}"}}' for gauge in (
        "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc")]

    def idle(expr: str) -> bool:  # every replica's series is there, at 0
        # Over the last 10 s, not at one instant: with the tests' 1 s report interval Ray keeps a gauge's value for
        # 2 s, and on this busy machine one export can come late, so a scrape may miss a series for a moment. A
        # gauge nobody sets is missing for good.
        result = prometheus.query(f"last_over_time({expr}[10s])")
        return bool(result) and all(float(series["value"][1]) == 0 for series in result)

    for expr in exprs:  # idle once earlier tests end
        deadline = time.monotonic() + 60
        while not idle(expr) and time.monotonic() < deadline:
            time.sleep(1)
    # Still there well after the window: a series nothing sets again has left it by then.
    time.sleep(12)
    for expr in exprs:
        assert idle(expr), (expr, prometheus.query(expr))


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboard's variables at their defaults (All models, a 1-minute rate window)."""
    for variable in ("$model", "$served_model"):
        expr = expr.replace(variable, ".*")
    return expr.replace("$__rate_interval", "1m")


def test_every_dashboard_query_parses_and_returns_data(cluster: Cluster, prometheus: Prometheus) -> None:
    import promql_parser

    client = cluster.client()
    for _ in range(3):  # traffic for every panel: streams (inter-token gaps), plain answers
        list(client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=8, stream=True))
        client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=4)
    queries = dashboard_queries()
    assert len(queries) >= 12
    missing = {}
    deadline = time.monotonic() + 90
    # Streams keep coming meanwhile (for the rate and latency panels: a rate over a window with no request is
    # empty), and each query is asked over the module's whole time range, as a dashboard panel does.
    done = threading.Event()
    outcomes: list[str] = []  # what the busy streams got, for the failure message

    def keep_busy(tokens: int) -> None:
        busy = {"model": DEFAULT_MODEL, "messages": ASK, "stream": True, "max_tokens": tokens, "ignore_eos": True}
        while not done.is_set():
            try:
                with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", headers=AUTH, timeout=120,
                                  json=busy) as response:
                    for _ in response.iter_lines():
                        if done.is_set():
                            break
                    outcomes.append(f"{tokens}:{response.status_code}")
            except httpx.HTTPError as exc:
                outcomes.append(f"{tokens}:{type(exc).__name__}")
                time.sleep(1)

    # One long stream keeps the engine stepping; short ones keep requests starting and answering.
    workers = [threading.Thread(target=keep_busy, args=(tokens,), daemon=True) for tokens in (400, 24)]
    for worker in workers:
        worker.start()
    try:
        for title, expr in queries:
            promql = grafana_to_promql(expr)
            promql_parser.parse(promql)  # raises on a syntax error
            # Each range query takes seconds on two busy cores (it took 222 s asked twice each at a 1 s step).
            had = prometheus.had_data(promql, prometheus.started)
            while not had and time.monotonic() < deadline:
                time.sleep(1)
                had = prometheus.had_data(promql, prometheus.started)
            if not had:
                missing[title] = promql
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
    if missing:
        exported = {sample.name for family in text_string_to_metric_families(scrape(cluster))
                    for sample in family.samples}
        absent = sorted(name for name in {"ray_rayroute_requests_in_flight", "ray_rayroute_requests_waiting",
                                          "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc"}
                        if name not in exported)
        counts = {outcome: outcomes.count(outcome) for outcome in set(outcomes)}
        pytest.fail(f"no data for {missing}; busy streams ended {counts}; not in a scrape now: {absent}")
