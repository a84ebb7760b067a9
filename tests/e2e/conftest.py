"""Fixtures and hooks of the end-to-end tests; what they share besides them is in :mod:`tests.e2e.harness`.

``cluster`` is one real local cluster for the whole test session, started exactly as ``make serve`` starts it, on
:func:`tests.e2e.harness.e2e_config`. Every test here is marked ``e2e``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import yaml

from router.ray_auth import read_token
from tests.e2e.harness import (
    API_KEYS,
    HASHED_KEY,
    PROBE_DEADLINE_ENV,
    QUICK_STOP_ENV,
    Cluster,
    HarnessError,
    e2e_config,
    keys_file,
    launched,
    secrets_in_logs,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The one order the e2e tests rely on, and why:

    - Tests that start a cluster of their own (node scenarios, load, the chart's serve test, coalescing) run before
      the shared cluster starts, so two clusters never share the two cores (a slow start then times out).
    - Tests marked ``disruptive`` (they kill engines or redeploy models) run last, in their file's order, so every
      other test sees the shared cluster as it was started.

    Apart from that, no test depends on another having run.
    """
    items.sort(key=lambda item: ("cluster" in getattr(item, "fixturenames", ()),
                                 item.get_closest_marker("disruptive") is not None))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    config = e2e_config(tmp)
    # Ray exports metrics every 10 s by default, and replicas and handles report autoscaling metrics every 10 s:
    # each second keeps the metrics and scaling tests short.
    # The keys come from a file, as from a mounted Secret, so a test can rotate them (test_faults.py).
    keys_file(tmp).write_text(yaml.safe_dump(API_KEYS))
    env = {**{k: v for k, v in os.environ.items() if k != "RAYROUTE_API_KEYS"},
           "RAYROUTE_API_KEYS_FILE": str(keys_file(tmp)), "RAY_DEDUP_LOGS": "0", **QUICK_STOP_ENV, **PROBE_DEADLINE_ENV,
           "RAY_metrics_report_interval_ms": "1000", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    try:
        # With Ray's dashboard, so the security tests can show its job API refuses a call without Ray's token.
        with launched(config, tmp / "serve.log", env, dashboard=True) as started:
            logs = started.session_dir() / "logs"
            yield started
    except HarnessError as exc:
        pytest.fail(str(exc))
    # No log line of the whole run, the launcher's or any Ray process's, holds a key, a key's hash or Ray's token.
    secrets = [entry["key"] for entry in API_KEYS if "key" in entry] + [HASHED_KEY, read_token()]
    leaked = secrets_in_logs([tmp / "serve.log", *logs.rglob("*")], secrets)
    assert not leaked, leaked
