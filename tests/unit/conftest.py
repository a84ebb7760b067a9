"""Fixtures for the unit tests: the router's access-log lines, closing every router client a test made, and the two
routers most tests drive (the edge router, and a router whose keys come from a file)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from router.ingress import OpenAIRouter, build_http_app
from tests.unit.fakes import (
    KEYED_CONFIG,
    KEYED_HASHED,
    KEYED_KEY,
    FakeHandle,
    answer_with_model,
    close_router_clients,
    edge_client,
    edge_engines,
    keys_yaml,
    sha256,
)


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


# --- the edge router: two chat models and an embedding model behind fake handles (fakes.edge_engines) ----------

@pytest.fixture
def engines() -> dict[str, FakeHandle]:
    return edge_engines()


@pytest.fixture
def client(engines: dict[str, FakeHandle], monkeypatch: pytest.MonkeyPatch) -> TestClient:
    return edge_client(engines, monkeypatch)


# --- a router whose keys come from a keys file (fakes.KEYED_*) -------------------------------------------------

@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(f"{{name: plain, key: {KEYED_KEY}}}",
                              f"{{name: hashed, key_sha256: {sha256(KEYED_HASHED)}}}"))
    return path


@pytest.fixture
def router(keys_path: Path, monkeypatch: pytest.MonkeyPatch) -> OpenAIRouter:
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    monkeypatch.setenv("RAYROUTE_API_KEYS_FILE", str(keys_path))
    return OpenAIRouter(KEYED_CONFIG, {"chat-a": FakeHandle(answer_with_model)})


@pytest.fixture
def app(router: OpenAIRouter) -> Any:
    return build_http_app(router)
