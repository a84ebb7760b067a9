"""Which of a model's replicas takes a request: a model's ``replica_choice``, as its deployment's Serve request router.

One policy per model, every router replica's handle to the model uses it:

- ``kv_cache`` (the default where the engine caches prefixes): the replica whose KV cache holds the largest share
  of the prompt's start, weighed against its free room, among those not much busier than the least busy, from the
  engines' own KV-cache events (:mod:`deployments.kv_routing`).
- ``least_loaded`` (the default for pooling models, which cache no prefixes): Serve's power of two choices, the
  less busy of two random replicas.
- ``prefix_cache``: the replica that was sent the longest matching text, as Ray Serve LLM guesses it
  (:mod:`deployments.prefix_routing`).
- ``session``: requests of one session (the ``X-Session-Id`` header, or the body's ``user``) to one replica while it
  has room, by consistent hashing over the replicas: Ray Serve's ``ConsistentHashRouter``. The cheapest affinity:
  nothing is tokenized, nothing reported.

Why ``kv_cache`` by default: where caches hold only part of all prefixes it keeps 3x Serve's default hit rate at a
seventh of its p90 time to first token; it keeps as much as ``prefix_cache`` with one router or several, while
choosing at half its cost and without its one shared tree actor, whose loss stops every choice; without shared
prefixes it costs nothing measurable (docs/benchmarks.md, "Which replica").

    >>> request_router_options(ModelConfig(id="m", source="org/m", engine_args={"runner": "pooling"}))
    {}
"""

from __future__ import annotations

from typing import Any

from deployments.constants import KV_STATS_PERIOD_S, KV_STATS_TIMEOUT_S, SESSION_FALLBACK_REPLICAS
from deployments.model_config import ModelConfig

SESSION_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


def request_router_options(model: ModelConfig) -> dict[str, Any]:
    """The deployment options (``serve.deployment(...).options(**)``) that select the model's request router."""
    from ray.serve.config import RequestRouterConfig

    if model.replica_choice == "prefix_cache":
        from deployments.prefix_routing import request_router_config

        return request_router_config()
    if model.replica_choice == "kv_cache":
        from deployments.kv_routing import KvCacheRouter, router_kwargs

        return {"request_router_config": RequestRouterConfig(
            request_router_class=f"{KvCacheRouter.__module__}.{KvCacheRouter.__name__}",
            request_router_kwargs=router_kwargs(model.resolved_source, sorted(model.adapters),
                                                model.engine_args.get("chat_template")),
            request_routing_stats_period_s=KV_STATS_PERIOD_S, request_routing_stats_timeout_s=KV_STATS_TIMEOUT_S)}
    if model.replica_choice == "session":
        return {"request_router_config": RequestRouterConfig(
            request_router_class=SESSION_ROUTER,
            request_router_kwargs={"num_fallback_replicas": SESSION_FALLBACK_REPLICAS})}
    return {}
