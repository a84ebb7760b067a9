"""The ``engine_load`` autoscaling policy (deployments/autoscaling.py): sized to the engines' targets from Ray's
context, without flapping, and a config Ray Serve accepts for either policy."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.autoscaling import KV_CACHE, RUNNING, WAITING, EngineLoadPolicy, serve_autoscaling_config
from deployments.model_config import Autoscaling


def test_engine_load_policy_sizes_to_the_targets() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.5)
    assert policy.desired_replicas(1, [(4, 0, 0.1)]) == 1
    assert policy.desired_replicas(1, [(16, 0, 0.1)]) == 2  # by requests
    assert policy.desired_replicas(2, [(2, 0, 0.9), (2, 0, 0.6)]) == 3  # by KV cache: 1.8 + 1.2
    assert policy.desired_replicas(2, [(1, 1, 0.1), (0, 0, 0.0)]) == 3  # anything waiting: one more
    assert policy.desired_replicas(3, [(0, 0, 0.0)] * 3) == 0  # idle; Ray keeps min_replicas and the delay
    # Requests queued at the routers (or an engine that did not report in time) still count.
    assert policy.desired_replicas(1, [(0, 0, 0.0)], requests=20) == 3


def test_engine_load_policy_reads_ray_context() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=8, target_kv_cache_usage=0.8)
    ctx = SimpleNamespace(aggregated_metrics={RUNNING: {"r1": 8.0, "r2": 8.0}, WAITING: {"r1": 0.0, "r2": 2.0},
                                              KV_CACHE: {"r1": 0.2, "r2": 0.3}},
                          current_num_replicas=2, target_num_replicas=2, policy_state={"s": 1},
                          total_num_requests=18.0)
    assert policy(ctx) == (3, {"s": 1})
    ctx.total_num_requests = 40.0
    assert policy(ctx) == (5, {"s": 1})
    ctx.aggregated_metrics = {}
    assert policy(ctx) == (2, {"s": 1})


def test_engine_load_policy_does_not_flap() -> None:
    policy = EngineLoadPolicy(target_ongoing_requests=2, target_kv_cache_usage=0.8)
    busy_then = {RUNNING: {"r1": 6.0}, WAITING: {"r1": 1.0}, KV_CACHE: {"r1": 0.1}}
    # Just scaled down, nothing ongoing: the look-back window's load is the past, not a reason to scale up again.
    ctx = SimpleNamespace(aggregated_metrics=busy_then, current_num_replicas=1, target_num_replicas=1,
                          policy_state={}, total_num_requests=0.0)
    assert policy(ctx) == (0, {})
    # A second replica is starting while requests come: a dip in the running one's figures does not stop it.
    ctx = SimpleNamespace(aggregated_metrics={RUNNING: {"r1": 1.0}, WAITING: {"r1": 0.0}, KV_CACHE: {"r1": 0.1}},
                          current_num_replicas=1, target_num_replicas=2, policy_state={}, total_num_requests=1.0)
    assert policy(ctx) == (2, {})
    # Once it runs, the same figures size the deployment down as usual.
    ctx.current_num_replicas = 2
    assert policy(ctx) == (1, {})


def test_autoscaling_config_is_what_ray_serve_accepts() -> None:
    from ray.serve.config import AutoscalingConfig

    for policy in ("requests", "engine_load"):
        scaling = Autoscaling(min_replicas=0, max_replicas=3, policy=policy, upscale_delay_s=1)
        checked = AutoscalingConfig(**serve_autoscaling_config(scaling))
        assert (checked.min_replicas, checked.max_replicas, checked.upscale_delay_s) == (0, 3, 1)
        assert checked.policy.is_default_policy_function() == (policy == "requests")
        if policy == "engine_load":
            assert callable(checked.policy.get_policy())
