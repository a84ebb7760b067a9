"""Fixtures for the unit tests: the router's access-log lines, and closing every router client a test made."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.unit.fakes import close_router_clients


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


@pytest.fixture(autouse=True)
def _router_clients_closed() -> Iterator[None]:
    """Each :func:`tests.unit.fakes.router_client` ends with its test, as a replica's app ends: its lifespan stops
    the router's background tasks and closes its channel client's connections."""
    yield
    close_router_clients()
