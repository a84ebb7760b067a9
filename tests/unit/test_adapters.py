"""What a replica does to load an adapter (deployments/adapters.py), with vLLM's serving-models table and engine faked
(``tests/e2e/test_adapters.py`` runs it against real vLLM; Serve's multiplexer, which decides when to load, is
Serve's)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.adapters import AdapterLoadError, AdapterSlots
from deployments.config import ModelConfig

MODEL = ModelConfig(id="base", source="org/base", adapters={"pirate": "~/adapters/pirate", "sql": "org/sql-lora"})


class ServingModels:
    """vLLM's OpenAIServingModels as far as loading goes: a name → LoRARequest table and its load handler."""

    def __init__(self, error: Any = None) -> None:
        self.lora_requests: dict[str, Any] = {}
        self.loaded: list[tuple[str, str, str | None]] = []
        self.error = error

    async def load_lora_adapter(self, request: Any, base_model_name: str | None = None) -> Any:
        if self.error is not None:
            return self.error
        self.loaded.append((request.lora_name, request.lora_path, base_model_name))
        self.lora_requests[request.lora_name] = SimpleNamespace(lora_name=request.lora_name)
        return "Success"


class Engine:
    def __init__(self) -> None:
        self.added: list[Any] = []

    async def add_lora(self, lora_request: Any) -> bool:
        self.added.append(lora_request)
        return True


def test_an_adapter_is_loaded_by_vllm_from_its_source_and_put_back_after_eviction() -> None:
    models, engine = ServingModels(), Engine()
    slots = AdapterSlots(models, engine, MODEL)
    asyncio.run(slots._load("pirate"))
    asyncio.run(slots._load("sql"))
    home = MODEL.adapter_source("pirate")
    assert models.loaded == [("pirate", home, "base"), ("sql", "org/sql-lora", "base")]
    # Serve evicted it and a request asks again: its name is still registered, its weights go back to the engine.
    asyncio.run(slots._load("pirate"))
    assert engine.added == [models.lora_requests["pirate"]] and len(models.loaded) == 2
    assert slots.loads == 3


def test_an_adapter_vllm_cannot_load_is_an_error_naming_vllms_reason() -> None:
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    refused = ErrorResponse(error=ErrorInfo(message="Loading lora pirate failed: No adapter found",
                                            type="NotFoundError", code=404))
    with pytest.raises(AdapterLoadError, match="No adapter found"):
        asyncio.run(AdapterSlots(ServingModels(refused), Engine(), MODEL)._load("pirate"))
