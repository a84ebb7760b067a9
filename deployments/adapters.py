"""LoRA adapters as models: which replica holds which adapter is Ray Serve's model multiplexing; vLLM serves them.

Why multiplexing: a model may list more adapters than one replica should hold (each takes memory, and vLLM batches
only ``max_loras`` of them at once). The router's handle for an adapter name carries it as Serve's
``multiplexed_model_id``; Serve's request router then prefers a replica that already holds it (each replica
reports what it holds), else the one holding fewest. Each replica loads an adapter the first time a request for it
arrives and keeps at most ``max_adapters_per_replica``, the least recently used making room. Nothing here routes.

What loading is: vLLM's own ``OpenAIServingModels.load_lora_adapter``, the handler behind ``vllm serve``'s
``/v1/load_lora_adapter``, which registers the name with vLLM's serving layer (a request whose ``model`` is the
adapter's name is then generated with it, and answered under that name) and loads its weights into the engine.
An adapter Serve evicts keeps its name in vLLM's table, so a request already past this point still finds it; its
weights leave vLLM's own LRU cache, which holds the same number (``max_cpu_loras`` defaults to ``max_loras``), and
come back from disk if it is asked for again.

    slots = AdapterSlots(state.openai_serving_models, engine, model)   # in the replica's constructor
    await slots.load("smollm2-pirate")                                  # before the request reaches vLLM
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.config import ModelConfig


class AdapterLoadError(RuntimeError):
    """vLLM could not load a configured adapter (a missing folder, a rank above ``max_lora_rank``)."""


class AdapterSlots:
    """One replica's adapters: Serve's multiplexed loader around vLLM's, with a count of the loads it did."""

    def __init__(self, serving_models: Any, engine: Any, model: ModelConfig) -> None:
        self.serving_models = serving_models
        self.engine = engine
        self.model = model
        self.loads = 0  # adapter loads on this replica: requests that found theirs loaded add none

        async def load_adapter(name: str) -> str:
            return await self._load(name)

        # Wrapped here rather than decorating a method: the bound comes from the model's config.
        self.load = serve.multiplexed(max_num_models_per_replica=model.max_adapters_per_replica)(load_adapter)
        self._loader = load_adapter  # Serve keeps its cache on the function it wrapped

    async def _load(self, name: str) -> str:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        self.loads += 1
        known = self.serving_models.lora_requests.get(name)
        if known is not None:  # evicted earlier: its name is still registered; put its weights back in the engine
            await self.engine.add_lora(known)
            return name
        result = await self.serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=self.model.adapter_source(name)),
            base_model_name=self.model.id)
        if isinstance(result, ErrorResponse):
            raise AdapterLoadError(result.error.message)
        return name

    def held(self) -> list[str]:
        """The adapters Serve counts as loaded here, least recently used first."""
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []
