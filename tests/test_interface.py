"""The router ↔ engine contract (:mod:`deployments.interface`) holds for every engine, and imports run one way."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from deployments.endpoints import ENDPOINTS
from deployments.engine import VLLMEngine
from deployments.interface import ENDPOINT_NAMES, EngineReplica
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[1]


def _kind(function: object) -> str:
    if inspect.isasyncgenfunction(function):
        return "async generator"
    return "coroutine" if inspect.iscoroutinefunction(function) else "function"


def _shape(function: object) -> tuple[str, list[str]]:
    return _kind(function), list(inspect.signature(function).parameters)


CONTRACT = {name: _shape(member) for name, member in vars(EngineReplica).items()
            if callable(member) and not name.startswith("_")}


def test_the_contract_names_every_endpoint_and_what_serve_calls() -> None:
    assert set(CONTRACT) == {*ENDPOINT_NAMES, "engine_info", "check_health", "record_autoscaling_stats"}


@pytest.mark.parametrize("engine", [VLLMEngine, FakeEngine], ids=lambda engine: engine.__name__)
def test_engine_implements_the_contract(engine: type) -> None:
    for name, (kind, parameters) in CONTRACT.items():
        assert hasattr(engine, name), f"{engine.__name__} has no {name}"
        # A generator the router iterates must be one: `async def` returning a list would break only at run time.
        expected = "async generator" if name in ENDPOINT_NAMES else kind
        assert _shape(getattr(engine, name)) == (expected, parameters), name


def test_each_endpoint_maps_to_vllm() -> None:
    assert set(ENDPOINTS) == set(ENDPOINT_NAMES)


def test_deployments_never_import_router() -> None:
    """``router/`` uses ``deployments/``; the reverse would make the two one tangle (issue 12)."""
    offenders = []
    for path in sorted((ROOT / "deployments").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ("router", "tests")]
    assert not offenders
