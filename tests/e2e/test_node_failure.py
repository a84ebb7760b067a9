"""The head lost, a worker drained, a worker lost and Redis lost, each under load: the phases of
``tests/scenarios/nodes.py``, run once in its own process and session on one cluster (starting a cluster and its
engines is most of what each would cost alone), one test per phase on that run's report."""

from __future__ import annotations

import pytest

from tests.e2e.harness import run_scenario, scenario_phase
from tests.scenarios.nodes import LONG_TOKENS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nodes_report() -> dict:
    return run_scenario("tests.scenarios.nodes")


def phase(report: dict, name: str) -> dict:
    """One phase's entry of the report, printed without its requests."""
    entry = scenario_phase(report, name)
    print(name, {k: v for k, v in entry.items() if k not in ("results", "hook_output")},
          f"{len(entry['results'])} requests")
    return entry


def test_losing_the_head_leaves_the_endpoint_serving(nodes_report: dict) -> None:
    """With GCS fault tolerance on a real Redis, every process of the head is killed under load. The router node's
    proxy, router and the engine answer every request meanwhile; the head starts again, Serve's controller returns
    with its applications from Redis and finds the engine replica it had, and a redeploy that also scales the model
    to two replicas goes through."""
    report = phase(nodes_report, "head")
    results = report["results"]
    assert report["hung_threads"] == 0
    assert report["head_processes_killed"] >= 3  # at least the GCS, the raylet and Serve's controller
    assert report["while_head_gone"] >= 6, "no traffic while the head was gone"
    for result in results:
        assert "exception" not in result, result
        assert result["status"] == 200 and result["done"], result
        if result["stream"]:
            assert not result["error_event"] and result["completion_tokens"] == 24, result
    # Requests slow down (they do not stop) while the new head's processes start on the cores the engine uses here;
    # an engine restarted by the recovering controller would be a gap of its whole start (45 s, measured).
    assert report["longest_gap_s"] < 30, report["longest_gap_s"]
    assert set(report["applications_after_restart"].values()) == {"RUNNING"}, report["applications_after_restart"]
    assert report["engine_replicas_kept"], "the recovering controller replaced the engine"
    assert report["replicas_after_redeploy"] == {"RUNNING": 2}, report["replicas_after_redeploy"]
    assert report["after_status"] == 200


def test_draining_a_worker_node_breaks_nothing(nodes_report: dict) -> None:
    """The chart's preStop hook drains an engine's node under load, with a spot instance's short deadline: every
    request answered in full, none left on the drained node, a replacement placed on the spare node; the long streams
    the drained replica still ran when Serve stopped it at the deadline went on elsewhere, whole."""
    report = phase(nodes_report, "drain")
    for result in report["long_streams"]:
        assert result.get("status") == 200 and result["done"] and not result["error_event"], result
        assert result["completion_tokens"] == LONG_TOKENS, result
    assert report["long_streams_moved"] >= 1, "no stream outlasted the drain's deadline"
    assert report["hook_exit"] == 0, report["hook_output"]
    assert report["victim_replicas_after"] == 0 and len(report["engine_nodes_after"]) == 2, report
    assert report["hung_threads"] == 0
    assert report["in_flight_at_drain"] >= 1 and report["during_drain"] >= 4, "no traffic while draining"
    for result in report["results"]:
        assert "exception" not in result, result
        assert result["status"] == 200 and result["done"], result
        if result["stream"]:
            assert not result["error_event"] and result["completion_tokens"] == 24, result
    assert report["after_status"] == 200


def test_losing_a_worker_node_loses_no_request_not_even_a_started_stream(nodes_report: dict) -> None:
    """An engine's node loses every process at once under load: every request answered, and every stream whole,
    those it was running too (they go on on the surviving replica, deployments/resume.py); the model answers
    afterwards."""
    report = phase(nodes_report, "loss")
    assert report["engines_spread"], report["engine_nodes"]
    results = report["results"]
    assert report["hung_threads"] == 0
    assert report["removed_after_requests"] >= 4, "the node went before there was traffic"
    assert len(results) >= 12
    for result in results:
        assert "exception" not in result, result
        assert result["status"] == 200 and result["done"], result
        if result["stream"]:
            assert not result["error_event"] and result["completion_tokens"] == 24, result
    assert report["after_status"] == 200


def test_losing_redis_with_its_data_costs_clients_nothing(nodes_report: dict) -> None:
    """Redis SIGKILLed under load and started again from its append-only file: the GCS exits when its store goes
    (Ray 2.60 does not reconnect), the head restarts, takes the cluster over from Redis, and finds its replicas; the
    routers and engines answer throughout."""
    report = phase(nodes_report, "redis_kept")
    assert report["hung_threads"] == 0
    assert report["while_redis_gone"] >= 6, "no traffic while Redis was gone"
    assert report["failed_before_head_restart"] == 0 and report["failed_after_head_restart"] == 0, report
    assert report["longest_gap_s"] < 30, report["longest_gap_s"]
    assert report["engine_replicas_kept"], "the engines were started again"
    assert report["applications"].get("rayroute") == "RUNNING", report["applications"]
    assert report["endpoint_answers"]


def test_losing_redis_and_its_data_loses_the_cluster_once_the_head_restarts(nodes_report: dict) -> None:
    """Redis started again empty: the routers and engines serve on until the head restarts, but a head on an empty
    store is a new cluster, which every worker leaves (their raylets exit) and Serve's applications are gone: the
    endpoint is down until the worker pods restart and the Serve config is deployed again, a cold start (hence the
    README's requirement that Redis keep its data)."""
    report = phase(nodes_report, "redis_empty")
    assert report["hung_threads"] == 0
    assert report["while_redis_gone"] >= 6, "no traffic while Redis was gone"
    assert report["failed_before_head_restart"] == 0, report
    assert report["workers_left"] == [] and report["applications"] == {}, report
    assert not report["endpoint_answers"]
