"""The soak's reading of a cluster's processes (tests/scenarios/soak.py): each process a kind, by the titles Ray and
vLLM give them, so a growing process is named and none hides under "other" (vLLM's worker, which holds the weights
and the KV cache, once did)."""

from __future__ import annotations

import pytest

from tests.scenarios.soak import process_kind, verdict

VENV = "/work/main/.venv"


@pytest.mark.parametrize(("command", "kind"), [
    ("VLLM::Worker", "engine_worker"),
    ("VLLM::EngineCore", "engine_core"),
    ("ray::ServeReplica:engine-smollm2-pair:engine-smollm2-pair", "engine"),
    ("ray::ServeReplica:rayroute:OpenAIRouter", "router"),
    ("ray::ServeReplica:rayroute:key-limits", "key_limits"),
    ("ray::ServeController", "controller"),
    ("ray::HAProxyManager", "proxy"),
    ("ray::ProxyActor", "proxy"),
    ("ray::DashboardAgent", "agent"),
    ("ray::RuntimeEnvAgent", "agent"),
    (f"{VENV}/bin/python {VENV}/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host=127.0.0.1", "dashboard"),
    (f"ray-dashboard-NodeHead-0 ({VENV}/bin/python -B -c \"from multiprocessing.forkserver import main\")",
     "dashboard"),
    (f"{VENV}/bin/python -u {VENV}/lib/python3.11/site-packages/ray/_private/log_monitor.py --session-dir=/tmp/ray",
     "ray_monitor"),
    (f"{VENV}/bin/python -u {VENV}/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py", "ray_monitor"),
    (f"{VENV}/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "gcs"),
    (f"{VENV}/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --node_id=abc", "raylet"),
    ("/usr/sbin/haproxy -f /tmp/haproxy.cfg", "haproxy"),
    (f"{VENV}/bin/python -m router.launch configs/local.yaml --port 8000", "launcher"),
    ("ray::IDLE", "idle_worker"),
])
def test_each_process_of_a_cluster_has_its_kind(command: str, kind: str) -> None:
    assert process_kind(command) == kind


def test_a_kind_that_keeps_growing_after_warm_up_is_judged_growing_and_a_settled_one_flat() -> None:
    def samples(router_mib):
        return [{"memory": {"router": {"rss": mib}}, "series": 100, "rayroute_series": 10, "unknown_model_series": 0}
                for mib in router_mib]

    assert verdict(samples([300 + 10 * minute for minute in range(30)]))["memory"]["router"]["verdict"] == "growing"
    settled = verdict(samples([300 + min(minute, 5) * 20 for minute in range(30)]))
    assert settled["memory"]["router"]["verdict"] == "flat" and settled["memory_flat"]
