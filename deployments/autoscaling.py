"""The ``engine_load`` autoscaling policy: replicas follow what the engines report, not the request count.

Ray Serve's own policy counts requests in flight. For an LLM engine that count misjudges load both ways: a few
long-context requests can fill the KV cache while the count looks low, and many short ones batch together
cheaply while it looks high. What shows saturation is the engine itself: requests it has accepted but cannot
schedule (waiting), and how full its KV cache is. Each replica reports both (``VLLMEngine.record_autoscaling_stats``)
and this policy sizes the deployment so that every replica sits at its targets:

    load of a replica = max(kv_cache_usage / target_kv_cache_usage, (running + waiting) / target_ongoing_requests)
    replicas          = ceil(sum of loads), and at least one more than now while any engine has requests waiting,
                        and never fewer than Ray's request count asks for

Waiting requests force a step up even when the averages look fine, because they are the one signal that an
engine has run out of room. The request count (requests at the replicas plus those queued at the routers) is a
floor because queued requests are load no engine has seen yet, and because an engine too busy to report in time
must not read as an idle one. Two guards against flapping: while a scale-up is still starting and requests
come, the target is held; and when Ray counts no request at all, the engines' look-back figures are ignored (they
describe requests that have ended). Ray applies ``min_replicas``/``max_replicas``, the delays and scale-from-zero around
this function, so scaling down stays as conservative as ``downscale_delay_s`` makes it.

Selected per model in the config::

    autoscaling: {policy: engine_load, min_replicas: 1, max_replicas: 4, target_kv_cache_usage: 0.8}
"""

from __future__ import annotations

import math
from typing import Any

# The metric names a replica reports and this policy reads.
RUNNING, WAITING, KV_CACHE = "engine_running_requests", "engine_waiting_requests", "engine_kv_cache_usage"


class EngineLoadPolicy:
    """A Ray Serve custom autoscaling policy (``AutoscalingPolicy(policy_function=...)``, built once per
    deployment with ``policy_kwargs``)."""

    def __init__(self, target_ongoing_requests: float, target_kv_cache_usage: float):
        self.target_ongoing_requests = target_ongoing_requests
        self.target_kv_cache_usage = target_kv_cache_usage

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx`` is Ray's ``AutoscalingContext``; returns the desired replica count and the policy state."""
        metrics = ctx.aggregated_metrics or {}
        running, waiting, kv = (metrics.get(name, {}) for name in (RUNNING, WAITING, KV_CACHE))
        replicas = set(running) | set(waiting) | set(kv)
        if not replicas:  # nothing reported yet (replicas starting): keep what there is
            return ctx.target_num_replicas, ctx.policy_state
        requests = ctx.total_num_requests
        if not requests:
            # Serve counts no request anywhere: what the engines reported over the look-back window is the past
            # (those requests have ended), and reading it would scale up again right after a scale-down.
            return 0, ctx.policy_state
        desired = self.desired_replicas(ctx.current_num_replicas, [
            (running.get(r, 0.0), waiting.get(r, 0.0), kv.get(r, 0.0)) for r in replicas
        ], requests)
        if ctx.target_num_replicas > ctx.current_num_replicas:
            # A scale-up is still starting (a vLLM replica takes a minute or more): while requests come, a dip in
            # the running engines' figures (they slow down while the new one loads) must not stop it half-way.
            desired = max(desired, ctx.target_num_replicas)
        return desired, ctx.policy_state

    def desired_replicas(self, current: int, loads: list[tuple[float, float, float]],
                         requests: float = 0.0) -> int:
        """``loads``: (running, waiting, kv_cache_usage) per reporting replica; ``requests``: Serve's count of the
        deployment's requests, running and queued."""
        total = sum(max(kv / self.target_kv_cache_usage, (running + waiting) / self.target_ongoing_requests)
                    for running, waiting, kv in loads)
        desired = math.ceil(max(total, requests / self.target_ongoing_requests) - 1e-9)
        if any(waiting > 0 for _, waiting, _ in loads):
            desired = max(desired, current + 1)
        return desired


# The fields of a model's ``autoscaling`` that Ray Serve's ``autoscaling_config`` has under the same names.
SERVE_FIELDS = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
                "look_back_period_s")


def serve_autoscaling_config(autoscaling: Any) -> dict[str, Any]:
    """A model's ``autoscaling`` section (:class:`deployments.model_config.Autoscaling`) as Ray Serve's
    ``autoscaling_config``."""
    config: dict[str, Any] = {key: getattr(autoscaling, key) for key in SERVE_FIELDS}
    if autoscaling.policy == "engine_load":
        config["policy"] = {
            "policy_function": f"{__name__}:{EngineLoadPolicy.__name__}",
            "policy_kwargs": {"target_ongoing_requests": autoscaling.target_ongoing_requests,
                              "target_kv_cache_usage": autoscaling.target_kv_cache_usage},
        }
    return config


def config_autoscaling(serve_config: dict[str, Any]) -> dict[str, Any]:
    """:func:`serve_autoscaling_config`'s inverse: Ray Serve's ``autoscaling_config`` as a model's ``autoscaling``."""
    section = {key: serve_config[key] for key in SERVE_FIELDS}
    policy = serve_config.get("policy")
    if policy:
        section.update(policy="engine_load", target_kv_cache_usage=policy["policy_kwargs"]["target_kv_cache_usage"])
    return section
