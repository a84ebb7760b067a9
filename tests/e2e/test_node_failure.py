"""Nodes lost, drained and the head lost under load: the scenarios in ``tests/scenarios/``, each run in its own
process and session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.e2e.harness import ROOT

pytestmark = pytest.mark.e2e


def run_scenario(module: str) -> dict:
    """Run ``python -m <module>`` in its own process and session; its report (the last line of its output)."""
    process = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        # Whatever the scenario left (a raylet, an engine core orphaned by its node's removal) ends with it.
        for leftover in [p for p in psutil.process_iter() if _session(p) == process.pid]:
            leftover.send_signal(signal.SIGKILL)
    assert process.returncode == 0, output[-6000:]
    return json.loads(output.strip().splitlines()[-1])


def test_losing_a_worker_node_loses_no_request_that_had_not_started() -> None:
    report = run_scenario("tests.scenarios.node_failure")
    assert report["engines_spread"], report["engine_nodes"]
    results = report["results"]
    assert report["hung_threads"] == 0
    assert report["removed_after_requests"] >= 4, "the node went before there was traffic"
    assert len(results) >= 12
    for result in results:
        assert "exception" not in result, result
        assert result["status"] == 200, result
        assert result["done"], result  # every stream ends in [DONE], even a broken one
        if result["stream"] and result["error_event"]:
            assert result["tokens"] > 0, result  # only a stream that had started may be cut
        elif result["stream"]:
            assert result["completion_tokens"] == 24, result
    assert report["after_status"] == 200


def test_draining_a_worker_node_breaks_nothing() -> None:
    """The chart's preStop hook drains an engine's node under load: every request answered in full, the replica
    replaced on the spare node before the hook returned, none left on the drained node."""
    report = run_scenario("tests.scenarios.node_drain")
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


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_losing_the_head_leaves_the_endpoint_serving() -> None:
    """With GCS fault tolerance on a real Redis (tests/scenarios/head_failure.py), every process of the head is
    killed under load. The worker's proxy, router and engine answer every request meanwhile; the head starts
    again, Serve's controller returns with its applications from Redis, and a redeploy that also scales the model
    to two replicas goes through."""
    report = run_scenario("tests.scenarios.head_failure")
    results = report["results"]
    print({k: v for k, v in report.items() if k != "results"}, f"{len(results)} requests")
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
    assert report["replicas_after_redeploy"] == {"RUNNING": 2}, report["replicas_after_redeploy"]
    assert report["after_status"] == 200
