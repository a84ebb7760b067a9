"""Load, limits and faults on the real cluster: what a client sees when a model is full, cold, unplaceable,
limited, scaling, or losing an engine, and that none of it ends in a hang or a bare 5xx.

The models these tests use are set up in tests.e2e.harness.e2e_config. Tests marked ``disruptive`` kill engines or
redeploy, so they run after every other test (conftest orders them last).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from deployments.constants import API_KEYS_RELOAD_S, KEY_LIMITS_TIMEOUT_S
from deployments.names import engine_deployment_name
from tests.e2e.harness import (
    API_KEY,
    API_KEYS,
    COLD_MODEL,
    DEFAULT_MODEL,
    ELASTIC_DRAIN_TIMEOUT_S,
    ELASTIC_MODEL,
    EMBEDDING_MODEL,
    LIMITED_KEY,
    QUEUE_TIMEOUT_UNPLACEABLE_S,
    ROOMY_KEY,
    SECOND_MODEL,
    TOKENS_KEY,
    TOTAL_TIMEOUT_SECOND_S,
    UNPLACEABLE_MODEL,
    Cluster,
    keys_file,
)

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def post_chat(cluster: Cluster, key: str = API_KEY, timeout: float = 300, **body) -> httpx.Response:
    return httpx.post(cluster.base_url + "/v1/chat/completions", json={"messages": ASK, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def stream_events(cluster: Cluster, on_event=None, **body) -> list[str]:
    """The SSE data lines of one streamed chat completion; ``on_event(n)`` is called after the n-th."""
    events = []
    with httpx.stream("POST", cluster.base_url + "/v1/chat/completions", json={"messages": ASK, "stream": True,
                      **body}, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if on_event:
                    on_event(len(events))
    return events


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"not within {timeout:.0f}s: {what}")


# --- backpressure ------------------------------------------------------------------------------------------------

def test_full_model_answers_429_with_retry_after(cluster: Cluster) -> None:
    # SECOND_MODEL runs one request and queues one per router replica: a burst of twelve overflows it.
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post_chat(cluster, model=SECOND_MODEL, max_tokens=24, ignore_eos=True),
                                  range(12)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= 2 and statuses[429] >= 1, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "model_at_capacity"
        assert int(refused.headers["retry-after"]) >= 1
    assert post_chat(cluster, model=SECOND_MODEL, max_tokens=2).status_code == 200  # and it serves again


# --- scale to zero -----------------------------------------------------------------------------------------------

def test_model_scaled_to_zero_answers_its_first_request(cluster: Cluster) -> None:
    assert cluster.replicas(COLD_MODEL).get("RUNNING", 0) == 0
    started = time.monotonic()
    response = post_chat(cluster, model=COLD_MODEL, max_tokens=4)
    waited = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert waited > 5, waited  # it waited while an engine started, rather than failing
    assert cluster.replicas(COLD_MODEL).get("RUNNING") == 1


def test_stream_without_a_first_token_in_time_is_408(cluster: Cluster) -> None:
    response = post_chat(cluster, model=COLD_MODEL, max_tokens=16, stream=True)
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "first_token_timeout"
    assert response.json()["error"]["type"] == "timeout_error"


def test_stream_past_its_total_time_ends_with_an_error_event(cluster: Cluster) -> None:
    started = time.monotonic()
    events = stream_events(cluster, model=SECOND_MODEL, max_tokens=3000, ignore_eos=True)
    assert TOTAL_TIMEOUT_SECOND_S - 1 <= time.monotonic() - started <= TOTAL_TIMEOUT_SECOND_S + 15
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert len(events) > 10  # it was streaming until then
    # and the engine let the request go
    wait_for(lambda: cluster.engine_info(SECOND_MODEL)["running_requests"] == 0, 30, "the engine slot freed")


def test_no_replica_within_the_queue_timeout_is_503_with_retry_after(cluster: Cluster) -> None:
    started = time.monotonic()
    response = post_chat(cluster, model=UNPLACEABLE_MODEL, max_tokens=4)
    waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert response.json()["error"]["type"] == "server_error"
    assert int(response.headers["retry-after"]) >= 1
    assert QUEUE_TIMEOUT_UNPLACEABLE_S - 0.5 <= waited <= QUEUE_TIMEOUT_UNPLACEABLE_S + 10


# --- per-key limits ----------------------------------------------------------------------------------------------

def test_key_may_use_only_its_models(cluster: Cluster) -> None:
    response = post_chat(cluster, key=LIMITED_KEY, model=SECOND_MODEL, max_tokens=1)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert response.json()["error"]["code"] == "model_not_allowed"


def test_keys_rotate_without_a_restart(cluster: Cluster) -> None:
    """The keys file is rewritten under steady load, as Kubernetes rewrites a mounted Secret: the replaced key is
    refused and its successor accepted by every router replica within the reload period, no request fails, the
    allowance in progress stays with the key's name, and a file that does not parse changes nothing."""
    path = keys_file(cluster.config.parent)
    original = path.read_text()
    old, new = "sk-rotate-old-0123456789", "sk-rotate-new-0123456789"

    def replace(text: str) -> None:
        # Whole, as Kubernetes swaps a Secret's files: a write in place could be read half done (an empty file).
        staged = path.with_name(path.name + ".new")
        staged.write_text(text)
        os.replace(staged, path)

    def write(key: str) -> None:
        replace(yaml.safe_dump([*API_KEYS, {"name": "rotating", "key": key, "requests_per_minute": 1}]))

    # From an address of its own: its many refused tries (the new key before its reload, the old one after) are
    # throttled after a burst (a 429 instead of the 401), and must not throttle other tests' wrong keys.
    tries = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=30)

    def accepted(key: str) -> list[int]:  # six tries: the proxy spreads them over both router replicas
        return [tries.get(cluster.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                for _ in range(6)]

    def refused(key: str) -> bool:  # 401, or 429 once this address has failed too often: never let in
        return set(accepted(key)) <= {401, 429}

    statuses: list[int] = []
    stop = threading.Event()

    def steady_load() -> None:
        while not stop.is_set():
            statuses.append(post_chat(cluster, model=DEFAULT_MODEL, max_tokens=2).status_code)

    try:
        write(old)
        wait_for(lambda: accepted(old) == [200] * 6, 60, "the first key taken up")
        assert post_chat(cluster, key=old, model=DEFAULT_MODEL, max_tokens=1).status_code == 200  # its one a minute
        load = threading.Thread(target=steady_load)
        load.start()
        write(new)
        wait_for(lambda: accepted(new) == [200] * 6 and refused(old), 60, "the key rotated")
        # The proxy sends each try to the less busy router, so all may have reached the one that reloaded first:
        # every router has reloaded once a whole period has passed.
        time.sleep(API_KEYS_RELOAD_S + 1)
        assert accepted(new) == [200] * 6 and refused(old)
        over = post_chat(cluster, key=new, model=DEFAULT_MODEL, max_tokens=1)
        assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limit_exceeded"
        replace("- {name: rotating, key: [not a key\n")
        time.sleep(API_KEYS_RELOAD_S + 5)
        assert accepted(new) == [200] * 6 and accepted(API_KEY) == [200] * 6
        stop.set()
        load.join(timeout=120)
        assert statuses and set(statuses) == {200}, Counter(statuses)
        assert "API keys not reloaded" in cluster.log.read_text()
    finally:
        stop.set()
        tries.close()
        replace(original)


def test_requests_per_minute_hold_across_router_replicas(cluster: Cluster) -> None:
    """Twelve requests at once from a key allowed four a minute, spread over both router replicas by the proxy:
    four answered, eight refused, whichever replica each reached. (Embeddings: cheap, so the twelve reach the
    routers together instead of waiting for cores a generating engine holds.)"""
    run = f"rpm-{time.time_ns()}"

    def call(i: int) -> httpx.Response:
        return httpx.post(cluster.base_url + "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": ["a"]},
                          headers={"Authorization": f"Bearer {LIMITED_KEY}", "X-Request-Id": f"{run}-{i}"},
                          timeout=300)

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    # The bucket gives one request back every 15 s; a slow machine may stretch the burst over one of those.
    refilled = int((time.monotonic() - started) / 15)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    assert 4 <= statuses[200] <= 4 + refilled < 8, (statuses, refilled)  # per replica, 8 would pass
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "4"
        assert re.fullmatch(r"[0-9.]+m?s|\d+m[0-9.]+s", response.headers["x-ratelimit-reset-requests"])
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 15  # 4 a minute: one back every 15 s
    # Both router replicas answered some of them (their access lines name the replica's process).
    pids = wait_for(lambda: _router_pids_of(cluster.log, run) if len(_router_pids_of(cluster.log, run)) > 1
                    else None, 20, "access lines from two router replicas")
    assert len(pids) == 2


def _router_pids_of(log: Path, request_id_prefix: str) -> set[str]:
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        if request_id_prefix in line and '"request_id"' in line:
            found = re.search(r"pid=(\d+)", line)
            if found:
                pids.add(found.group(1))
    return pids


def test_tokens_per_minute(cluster: Cluster) -> None:
    started = time.monotonic()
    first = post_chat(cluster, key=TOKENS_KEY, model=DEFAULT_MODEL, max_tokens=40, ignore_eos=True)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    used = first.json()["usage"]["total_tokens"]
    assert used > 60
    second = post_chat(cluster, key=TOKENS_KEY, model=DEFAULT_MODEL, max_tokens=1)
    assert second.status_code == 429
    assert "tokens per minute" in second.json()["error"]["message"]
    elapsed = time.monotonic() - started
    # The next request reserves 13 tokens (its prompt's 45 bytes / 4, rounded up, and max_tokens): what is left is
    # less, however much refilled (one token a second) while the first ran (its reservation left the bucket below
    # its capacity) on a machine of any speed.
    assert 0 <= int(second.headers["x-ratelimit-remaining-tokens"]) < 13
    # The wait is for the overdraft (used - 60) and those 13 tokens, rounded up to whole seconds, less what refilled.
    assert used - 47 - elapsed - 1 <= int(second.headers["retry-after"]) <= used - 46


# --- autoscaling -------------------------------------------------------------------------------------------------

def test_replicas_follow_engine_load_up_to_the_maximum_and_back(cluster: Cluster) -> None:
    wait_for(lambda: cluster.replicas(ELASTIC_MODEL) == {"RUNNING": 1}, 120, "one elastic replica to start with")
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            response = post_chat(cluster, model=ELASTIC_MODEL, max_tokens=32, ignore_eos=True)
            if response.status_code != 200:
                failures.append(response.text)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        # 8 requests against a target of 2 per replica: the policy wants 4, and max_replicas caps it at 2.
        wait_for(lambda: _serving_replicas(cluster, ELASTIC_MODEL) == 2, 300, "a second replica under load")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    # Idle again: back to min_replicas after the downscale delay.
    wait_for(lambda: cluster.replicas(ELASTIC_MODEL) == {"RUNNING": 1}, 180, "back to one replica when idle")


def _serving_replicas(cluster: Cluster, model_id: str, calls: int = 12) -> int:
    """How many of the model's replicas answer a dozen calls through one Serve handle. Asked of the replicas, not
    of Serve's controller: with every model an application of its own, a status call took up to a minute while a
    replica started under load on two cores (measured), long enough to miss a scale-up altogether."""
    handle = cluster.engine_handle(model_id)
    return len({handle.engine_info.remote().result(timeout_s=60)["pid"] for _ in range(calls)})


# --- faults ------------------------------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

def _engine_core(replica_pid: int) -> psutil.Process:
    for child in psutil.Process(replica_pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()):
            return child
    pytest.fail(f"no vLLM engine-core process under replica {replica_pid}")


@pytest.mark.disruptive
def test_losing_the_key_limits_replica_gives_bounded_answers_never_a_hang(cluster: Cluster) -> None:
    """The one key-limits replica's process is killed under a limited key's load (and each replacement, for a few
    seconds): every request still gets an answer within the limits call's bound (the configured policy: 503
    `limits_unavailable`), and once Serve has started a new replica the key is served again."""
    from ray._private.state import actors as actor_table

    def alive_limits() -> list[dict]:
        return [info for info in actor_table(actor_state_name="ALIVE").values()
                if info["ActorClassName"].endswith(":key-limits")]

    cluster.connect()
    limits = alive_limits()
    assert len(limits) == 1, limits
    stop = threading.Event()
    answers: list[tuple[int, str | None, float]] = []

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = post_chat(cluster, key=ROOMY_KEY, timeout=60, model=DEFAULT_MODEL, max_tokens=1)
            code = response.json()["error"]["code"] if response.status_code != 200 else None
            answers.append((response.status_code, code, time.monotonic() - started))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        time.sleep(3)
        # Kept down past the routers' wait for it (each replacement killed too), so that requests meet its absence
        # however fast Serve replaces it.
        down_until = time.monotonic() + 3 * KEY_LIMITS_TIMEOUT_S
        while time.monotonic() < down_until:
            for info in alive_limits():
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(info["Pid"]).kill()
            time.sleep(0.2)
        back_at = len(answers)
        wait_for(lambda: any(status == 200 for status, _, _ in answers[back_at + 4:]), 180,
                 "the limited key served again by a new key-limits replica")
        stop.set()
    assert {(status, code) for status, code, _ in answers} <= {(200, None), (503, "limits_unavailable")}, answers
    assert any(status == 503 for status, _, _ in answers), "no request saw the key-limits replica gone"
    assert max(seconds for _, _, seconds in answers) < 30, answers


@pytest.mark.disruptive
def test_a_stream_whose_only_engine_died_goes_on_once_the_replica_is_replaced(cluster: Cluster) -> None:
    """The engine core under a stream is SIGKILLed; the replica lives, says its engine stopped, and the stream waits
    for Serve's replacement (no other replica) and goes on there: every token, no error event, one [DONE]."""
    wait_for(lambda: cluster.replicas(ELASTIC_MODEL) == {"RUNNING": 1}, 180, "a single elastic replica")
    replica = cluster.engine_info(ELASTIC_MODEL)["pid"]
    engine_core = _engine_core(replica)

    with ThreadPoolExecutor(1) as pool:
        sent_meanwhile = []

        def kill_after_three(n: int) -> None:
            if n == 3:
                engine_core.send_signal(signal.SIGKILL)
                sent_meanwhile.append(pool.submit(post_chat, cluster, model=ELASTIC_MODEL, max_tokens=4))

        events = stream_events(cluster, kill_after_three, model=ELASTIC_MODEL, max_tokens=200, ignore_eos=True,
                               stream_options={"include_usage": True})
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [json.loads(e) for e in events[:-1]]
        assert not [c for c in chunks if "error" in c], chunks
        assert chunks[-1]["usage"]["completion_tokens"] == 200
        assert len({c["id"] for c in chunks}) == 1
        # A request sent while the only replica's engine is dead waits for the replacement instead of failing.
        response = sent_meanwhile[0].result(timeout=300)
    assert response.status_code == 200, response.text
    assert cluster.engine_info(ELASTIC_MODEL)["pid"] != replica  # Serve replaced the replica
    # Serve stops the failed replica while it starts the replacement, not before: the stop drains what the replica
    # still holds (at most the model's drain_timeout_s), runs its destructor, then kills it. So the old process may
    # outlive the new replica's first answer, but never that bound.
    wait_for(lambda: _gone(replica), ELASTIC_DRAIN_TIMEOUT_S + 60, "the failed replica's process to end")


@pytest.mark.disruptive
def test_changing_one_model_replaces_only_its_replicas(cluster: Cluster) -> None:
    """Through Serve's declarative deploy (what ``serve deploy`` and KubeRay call): the elastic
    model's engine arguments change under steady load on it and on the default model. Only the elastic model's
    replica is replaced; every other replica (routers, key limits, the other engines) keeps its actor; no request
    to either model fails; a stream running through the old replica finishes whole before it stops. Then its
    scaling and queue limit change, and no replica at all is replaced."""
    from router.launch import deploy

    wait_for(lambda: cluster.replicas(ELASTIC_MODEL) == {"RUNNING": 1}, 180, "a single elastic replica")
    old_replica = cluster.engine_info(ELASTIC_MODEL)["pid"]
    before = _replica_actors(cluster)
    document = yaml.safe_load(cluster.config.read_text())
    for model in document["applications"][0]["args"]["models"]:
        if model["id"] == ELASTIC_MODEL:
            model["engine_args"]["max_num_seqs"] = 8

    results: list[tuple[str, int | str]] = []
    stop = threading.Event()

    def steady(model: str) -> None:
        while not stop.is_set():
            try:
                results.append((model, post_chat(cluster, model=model, max_tokens=4, timeout=600).status_code))
            except httpx.HTTPError as exc:
                results.append((model, repr(exc)))

    def redeploy(n: int) -> None:
        if n == 2:
            cluster.connect()
            # Not waiting for every application: the model no node can place never counts as running.
            deploy(document, wait=False)

    threads = [threading.Thread(target=steady, args=(model,)) for model in (DEFAULT_MODEL, ELASTIC_MODEL)]
    for thread in threads:
        thread.start()
    try:
        events = stream_events(cluster, redeploy, model=ELASTIC_MODEL, max_tokens=120, ignore_eos=True,
                               stream_options={"include_usage": True})
        # The replacement serves (one engine starting on two busy cores: a minute or two).
        wait_for(lambda: _answers_from_a_new_replica(cluster, old_replica), 600, "a new elastic replica", every=5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 120

    after = _replica_actors(cluster)
    elastic = engine_deployment_name(ELASTIC_MODEL)
    assert {d: ids for d, ids in after.items() if d != elastic} == {d: ids for d, ids in before.items() if d != elastic}
    assert after[elastic] and not after[elastic] & before[elastic]
    counts = Counter(results)
    assert all(status == 200 for _, status in results), counts
    assert counts[(DEFAULT_MODEL, 200)] >= 3 and counts[(ELASTIC_MODEL, 200)] >= 3, counts

    # Its scaling and request limits change next: Serve applies them to the running replica, replacing none.
    from ray.serve.context import _get_global_client

    for model in document["applications"][0]["args"]["models"]:
        if model["id"] == ELASTIC_MODEL:
            model["autoscaling"]["max_replicas"] = 3
            model["max_queued_requests"] = 100
    deploy(document, wait=False)

    def applied() -> bool:
        details = _get_global_client().get_serve_details()["applications"][elastic]["deployments"][elastic]
        config = details["deployment_config"]
        return config["autoscaling_config"]["max_replicas"] == 3 and config["max_queued_requests"] == 100

    wait_for(applied, 120, "the elastic model's new scaling applied")
    assert post_chat(cluster, model=ELASTIC_MODEL, max_tokens=2).status_code == 200
    unchanged = _replica_actors(cluster)
    assert {d: ids for d, ids in unchanged.items() if d != elastic} == \
        {d: ids for d, ids in after.items() if d != elastic}
    # Its replica kept its actor; with max_replicas raised, the engine-load policy may have added one beside it, or
    # taken a second away.
    assert unchanged[elastic] & after[elastic]


def _replica_actors(cluster: Cluster) -> dict[str, set[str]]:
    """The live Serve replica actors by deployment name, from the GCS's actor table (the launcher's cluster runs no
    dashboard, which Ray's state API needs)."""
    from ray._private.state import actors as actor_table

    cluster.connect()
    actors: dict[str, set[str]] = {}
    for actor_id, info in actor_table(actor_state_name="ALIVE").items():
        name = info["ActorClassName"]
        if name.startswith("ServeReplica:"):  # "ServeReplica:<application>:<deployment>"
            actors.setdefault(name.split(":")[2], set()).add(actor_id)
    return actors


def _answers_from_a_new_replica(cluster: Cluster, old_replica: int) -> bool:
    try:
        return cluster.engine_info(ELASTIC_MODEL)["pid"] != old_replica and post_chat(
            cluster, model=ELASTIC_MODEL, max_tokens=2, timeout=60).status_code == 200
    except Exception:  # the handle may still point at the stopping replica
        return False
