"""Fixtures and hooks only; what tests share besides them is in :mod:`tests.harness`.

``cluster`` is one real local cluster for the whole test session, started exactly as ``make serve`` starts it, on
:func:`tests.harness.e2e_config`. Its users are marked ``e2e``; ``pytest -m 'not e2e'`` never starts it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import yaml

from router.ray_auth import read_token
from tests.harness import (
    API_KEYS,
    HASHED_KEY,
    RAY_AUTH_ENV,
    Cluster,
    HarnessError,
    e2e_config,
    keys_file,
    launched,
    secrets_in_logs,
)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(RAY_AUTH_ENV)  # before any test module imports Ray (see RAY_AUTH_ENV)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests without the shared cluster first: those that start clusters of their own (node failure, load) then
    # have the machine to themselves. Tests that kill engines or redeploy go last, in their file's order: every
    # other test sees the shared cluster as it was started.
    items.sort(key=lambda item: ("cluster" in getattr(item, "fixturenames", ()),
                                 item.get_closest_marker("disruptive") is not None))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_log_lines() -> Iterator[list[str]]:
    """The router's access-log lines (JSON) written in this process during the test."""
    from router.telemetry import access_log

    handler = _Collect()
    access_log.addHandler(handler)
    yield handler.lines
    access_log.removeHandler(handler)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    config = e2e_config(tmp)
    # Ray exports metrics every 10 s by default; each second keeps the metrics tests short.
    # Replicas and handles report autoscaling metrics every 10 s by default; each second keeps the scaling tests
    # short.
    # The keys come from a file, as from a mounted Secret, so a test can rotate them (tests/test_faults.py).
    keys_file(tmp).write_text(yaml.safe_dump(API_KEYS))
    env = {**{k: v for k, v in os.environ.items() if k != "RAYROUTE_API_KEYS"},
           "RAYROUTE_API_KEYS_FILE": str(keys_file(tmp)), "RAY_DEDUP_LOGS": "0",
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
