"""vLLM's engine and serving objects as a replica builds them, and the objects the replica hands vLLM to learn
from them or to change what they answer.

Built as ``vllm serve`` builds them (:func:`start_vllm`), with two stat loggers: vLLM's own metrics as Ray
metrics, and :class:`EngineProgress`, the replica's view of its engine for health and autoscaling.

Two things are per request, and vLLM's serving layer takes nothing per request but the request: it reaches the
engine through its ``engine_client`` attribute and names responses through its ``models`` attribute
(``models.model_name(lora_request)``, which is told nothing about the request). So :func:`for_request` gives each
request a shallow copy of the serving object with those two replaced: :class:`CountingEngine`, which counts the
stream's tokens into its :class:`TokenCount`, and :class:`RequestModels`, which names the response as the client
named the model. The alternative, patching the shared engine and models and finding the request again in them,
has no key to find it by: ``model_name`` gets no request, and vLLM accepts a client's ``request_id`` even when
another running request has it. A copy is sound because vLLM's serving objects set their attributes only in
``__init__`` (``tests/test_vllm_hooks.py`` checks the installed vLLM): a copy shares their stores, locks and
parsers, and differs only in the two views.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.autoscaling import KV_CACHE, RUNNING, WAITING
from deployments.config import ModelConfig
from deployments.constants import STALL_TIMEOUT_S
from deployments.endpoints import ENDPOINTS


class EngineProgress:
    """A vLLM stat logger (the per-engine kind ``AsyncLLM(stat_loggers=...)`` takes) that keeps the engine's last
    scheduler state, for autoscaling, and when it last made a token, for health."""

    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_cache_usage = 0.0
        self.last_progress = time.monotonic()

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.running, self.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:  # the engine core finished a step
            self.last_progress = time.monotonic()

    def stalled(self, unfinished_requests: int, now: float | None = None) -> bool:
        """Requests are waiting on the engine and nothing has come out for too long. Called by every health
        check: an idle engine owes nothing, so the clock restarts whenever one is seen idle."""
        now = time.monotonic() if now is None else now
        if unfinished_requests == 0:
            self.last_progress = now
            return False
        return now - self.last_progress > STALL_TIMEOUT_S

    def load(self, unfinished_requests: int) -> dict[str, float]:
        """The scheduler's counts are as of its last step; an idle engine has no step, so trust them only while
        requests are unfinished."""
        if unfinished_requests == 0:
            return {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}
        return {RUNNING: float(self.running), WAITING: float(self.waiting), KV_CACHE: self.kv_cache_usage}

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


@dataclass
class TokenCount:
    """A stream's tokens so far, read from vLLM's own outputs as they pass (see :class:`CountingEngine`), so no SSE
    event is parsed to learn them. Counted as vLLM's serving layer counts ``usage``: prompt (with an encoder's) and
    the generated tokens of every choice; an output is counted before the event made from it is sent.

    A stream that can be resumed elsewhere (``traced``, :mod:`deployments.resume`) also keeps the ids of the tokens
    made since its last frame (:meth:`take_ids`) and how many characters of their text vLLM has let out."""

    prompt: int = 0
    completion: int = 0
    traced: bool = False
    text_chars: int = 0
    new_ids: list[int] = field(default_factory=list)
    # vLLM's generators feeding this stream, so it can close them (closing one aborts its engine request).
    sources: list[AsyncIterator[Any]] = field(default_factory=list)

    def add(self, output: Any) -> None:
        if not self.prompt:
            self.prompt = len(output.prompt_token_ids or ()) + len(output.encoder_prompt_token_ids or ())
        for choice in output.outputs:
            self.completion += len(choice.token_ids)  # a stream's outputs are deltas
            if self.traced:
                self.new_ids.extend(choice.token_ids)
                self.text_chars += len(choice.text)

    def take_ids(self) -> list[int]:
        """The ids of the tokens made since the last call (the ones the next frame carries)."""
        ids, self.new_ids = self.new_ids, []
        return ids


class CountingEngine:
    """vLLM's engine (``AsyncLLM``) as one stream's serving object sees it: ``generate`` counts each output into the
    stream's :class:`TokenCount` and hands the stream vLLM's generator to close; the rest is the engine itself. A
    resumed stream's ``continuation`` (:class:`deployments.resume.Continuation`) changes the prompt it is given and
    the outputs it yields."""

    def __init__(self, engine: Any, count: TokenCount, continuation: Any = None) -> None:
        self._engine = engine
        self._count = count
        self._continuation = continuation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        going_on = self._continuation
        if going_on is not None:  # vLLM's serving layer passes the prompt and its sampling parameters first
            args = (*going_on.engine_call(args[0], args[1]), *args[2:])
        outputs = self._engine.generate(*args, **kwargs)
        self._count.sources.append(outputs)
        async for output in outputs:
            if going_on is not None:
                output = going_on.output(output)
            self._count.add(output)
            yield output


class RequestModels:
    """vLLM's served models (``OpenAIServingModels``) as one request sees them: the base model is named as the
    request named it, so an alias is answered under the alias (vLLM would name the first served name). An adapter
    keeps its own name; the rest is vLLM's object itself."""

    def __init__(self, models: Any, requested: str | None) -> None:
        self._models = models
        self._requested = requested

    def __getattr__(self, name: str) -> Any:
        return getattr(self._models, name)

    def model_name(self, lora_request: Any = None) -> str:
        if lora_request is None and self._requested:
            return self._requested
        return self._models.model_name(lora_request)


def for_request(serving: Any, requested_model: str | None, count: TokenCount | None,
                continuation: Any = None) -> Any:
    """One of vLLM's serving objects for one request: responses named ``requested_model``, and when ``count`` is
    given (a stream) every output of the engine counted into it, and a resumed stream's prompt and outputs changed
    by its ``continuation``. A serving object without a served-model table (the load test's) is left to name
    responses itself."""
    view = copy.copy(serving)
    if getattr(serving, "models", None) is not None:
        view.models = RequestModels(serving.models, requested_model)
    if count is not None:
        view.engine_client = CountingEngine(serving.engine_client, count, continuation)
    return view


async def start_vllm(model: ModelConfig, stat_logger: Callable[[Any, int], Any],
                     replica_engine_args: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], Any]:
    """vLLM's engine, its serving object for each endpoint (None where the model serves none), and its served-model
    table. ``stat_logger`` makes the per-engine stat logger vLLM feeds (from its config and the engine's index);
    ``replica_engine_args`` are engine arguments of this replica alone (where it hears the engine's KV events)."""
    # vLLM reads these when it fetches a media URL (no redirects), in this process; its engine core inherits them.
    os.environ.update(model.media_env())
    # Imported here: vLLM (and torch) load only in engine replicas, never in the router.
    import ray
    from starlette.datastructures import State
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import FrontendArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    frontend_names = set(FrontendArgs.__dataclass_fields__)
    frontend_kwargs = {k: v for k, v in model.engine_args.items() if k in frontend_names}
    engine_kwargs = {k: v for k, v in model.engine_args.items() if k not in frontend_names}
    engine_args = AsyncEngineArgs(
        model=model.resolved_source,
        served_model_name=model.names,
        # An argument set in engine_args (max_lora_rank) wins over a derived one; the replica's own win over both.
        **{**model.engine_overrides(), **engine_kwargs, **(replica_engine_args or {})},
    )
    frontend_args = FrontendArgs(**frontend_kwargs)
    vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    # A replica of several workers: they go into the bundles its placement group reserved for them. vLLM's engine
    # core, a process of its own, starts them after connecting to Ray (ray.init), which must find this cluster, not
    # start one of its own.
    vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    if model.resources.workers > 1:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    engine = AsyncLLM.from_vllm_config(
        vllm_config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        disable_log_stats=engine_args.disable_log_stats,
        # vLLM's own metrics (vllm:num_requests_running, KV-cache use, TTFT, ...) as Ray metrics, so the node's one
        # metrics port exports them for every replica, tagged with its ReplicaId. A class: vLLM makes one for all
        # of the replica's engines, and then none of its own Prometheus logger (see ray_metrics).
        stat_loggers=[RayPrometheusStatLogger, stat_logger],
    )

    state = State()
    # vLLM's CLI hands init_app_state one flat namespace of front-end and engine arguments; so do we.
    args = argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))
    await init_app_state(engine, state, args, supported_tasks=await engine.get_supported_tasks())
    serving = {name: getattr(state, endpoint.serving_attribute, None) for name, endpoint in ENDPOINTS.items()}
    return engine, serving, state.openai_serving_models


def ray_workers(engine: Any) -> list[dict[str, Any]]:
    """The engine's workers that Ray runs (a replica of several workers: :class:`deployments.replica_resources.
    Resources`), each with its Ray actor name (vLLM's: ``vllm_Worker_<engine instance>_TP<rank>_PP<stage>``, a part
    only when its size is above 1), process and node; empty for an engine whose one worker runs in its engine core."""
    config = getattr(engine, "vllm_config", None)
    if config is None or config.parallel_config.distributed_executor_backend != "ray":
        return []
    # vLLM's engine core, not this replica, owns the worker actors; they are found by the name vLLM gives them.
    from ray._private.state import actors

    prefix = f"vllm_Worker_{config.instance_id}_"
    found = [info for info in actors(actor_state_name="ALIVE").values() if info["Name"].startswith(prefix)]
    return sorted(({"name": info["Name"], "pid": info["Pid"], "node_id": info["Address"]["NodeID"]}
                   for info in found), key=lambda worker: worker["name"])


def ray_metrics(engine: Any) -> Any:
    """The ``RayPrometheusStatLogger`` vLLM made for ``engine`` (:func:`start_vllm`), from the engine's own list of
    stat loggers; None when the engine keeps no stats, or is not vLLM's (the load test's)."""
    manager = getattr(engine, "logger_manager", None)
    if manager is None:
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return next((logger for logger in manager.stat_loggers if isinstance(logger, RayPrometheusStatLogger)), None)
