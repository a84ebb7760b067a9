"""The router ↔ engine contract (:mod:`deployments.interface`) holds for every engine."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from deployments.engine import VLLMEngine
from deployments.interface import ENDPOINT_NAMES, EngineReplica
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]


def _kind(function: object) -> str:
    if inspect.isasyncgenfunction(function):
        return "async generator"
    return "coroutine" if inspect.iscoroutinefunction(function) else "function"


def _shape(function: object) -> tuple[str, list[str]]:
    return _kind(function), list(inspect.signature(function).parameters)


CONTRACT = {name: _shape(member) for name, member in vars(EngineReplica).items()
            if callable(member) and not name.startswith("_")}


def test_the_contract_names_every_endpoint_and_what_serve_calls() -> None:
    assert set(CONTRACT) == {*ENDPOINT_NAMES, "engine_info", "check_health", "record_autoscaling_stats",
                             "record_routing_stats", "reset_prefix_cache"}


@pytest.mark.parametrize("engine", [VLLMEngine, FakeEngine], ids=lambda engine: engine.__name__)
def test_engine_implements_the_contract(engine: type) -> None:
    for name, (kind, parameters) in CONTRACT.items():
        assert hasattr(engine, name), f"{engine.__name__} has no {name}"
        # A generator the router iterates must be one: `async def` returning a list would break only at run time.
        expected = "async generator" if name in ENDPOINT_NAMES else kind
        assert _shape(getattr(engine, name)) == (expected, parameters), name
