"""The Serve application: one engine deployment per configured model, behind one router.

This is the ``import_path`` of every config file (``router.app:build_app``): ``serve run configs/local.yaml``,
``make serve`` and KubeRay's ``serveConfigV2`` all come through here with the file's ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from deployments.autoscaling import serve_autoscaling_config
from deployments.config import ModelConfig, ServeArgs, check_engine_args, parse_args
from deployments.constants import (
    HEALTH_CHECK_PERIOD_S,
    HEALTH_CHECK_TIMEOUT_S,
    KEY_LIMITS_MAX_ONGOING,
    PLACEMENT_STRATEGY,
)
from deployments.engine import VLLMEngine
from router.ingress import Router
from router.limits import KeyLimits

# Serve writes one access line per call at every replica, and the router writes its own (router.telemetry), with
# the fields an operator needs and never a prompt. Serve's line cost each replica ~3% of its CPU (py-spy under load).
SERVE_LOGGING = LoggingConfig(enable_access_log=False)


def build_app(args: dict[str, Any]) -> Application:
    config = parse_args(args, origin="rayroute application args")
    for model in config.models:  # here, so a misspelt engine argument fails before any replica starts
        check_engine_args(model)
    engines = {model.id: engine_deployment(model).bind(model) for model in config.models}
    # One replica, so every router replica sees the same buckets; it holds a few floats per key.
    limits = serve.deployment(KeyLimits).options(
        name="key-limits", num_replicas=1, max_ongoing_requests=KEY_LIMITS_MAX_ONGOING, logging_config=SERVE_LOGGING,
        ray_actor_options={"num_cpus": 0, "resources": dict(config.routers.ray_resources)}).bind()
    return router_deployment(config).bind(config.model_dump(mode="json"), engines, limits)


def router_deployment(config: ServeArgs) -> serve.Deployment:
    return Router.options(
        num_replicas=config.routers.replicas,
        max_ongoing_requests=config.routers.max_ongoing_requests,
        logging_config=SERVE_LOGGING,
        ray_actor_options={"resources": dict(config.routers.ray_resources)},
        # A router replica stops (redeploy) only once its streams have ended, as long as any model's would.
        graceful_shutdown_timeout_s=max(model.drain_timeout_s for model in config.models),
    )


def engine_deployment(model: ModelConfig, engine_class: type = VLLMEngine) -> serve.Deployment:
    """The model's deployment; ``engine_class`` is the replica class (the load test's keeps the replica code and
    replaces only vLLM)."""
    return serve.deployment(engine_class).options(
        name=model.deployment_name,
        max_ongoing_requests=model.max_ongoing_requests,
        # Enforced by each router replica's handle: requests beyond it get a 429 instead of an unbounded queue.
        max_queued_requests=model.max_queued_requests,
        logging_config=SERVE_LOGGING,
        autoscaling_config=serve_autoscaling_config(model.autoscaling),
        ray_actor_options={
            **model.resources.replica_actor_resources(),
            "runtime_env": {"env_vars": {**model.resources.engine_env(), **model.env}},
        },
        placement_group_bundles=model.resources.placement_group_bundles(),
        placement_group_strategy=PLACEMENT_STRATEGY,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        # Scale-down and redeploys stop a replica only after its streams end (or this long has passed).
        graceful_shutdown_timeout_s=model.drain_timeout_s,
        **replica_choice(model),
    )


def replica_choice(model: ModelConfig) -> dict[str, Any]:
    """The deployment's request router: Serve's own unless the model asks for prefix-cache affinity. Every handle
    to the deployment (each router replica's) uses it."""
    if model.replica_choice == "prefix_cache":
        from deployments.prefix_routing import request_router_config

        return request_router_config()
    return {}
