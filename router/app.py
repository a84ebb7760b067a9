"""The Serve application: one engine deployment per configured model, behind one router.

This is the ``import_path`` of every config file (``router.app:build_app``): ``serve run configs/local.yaml``,
``make serve`` and KubeRay's ``serveConfigV2`` all come through here with the file's ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import ModelConfig, check_engine_args, parse_args
from deployments.engine import VLLMEngine
from router.ingress import Router


def build_app(args: dict[str, Any]) -> Application:
    config = parse_args(args, origin="rayroute application args")
    for model in config.models:  # here, so a misspelt engine argument fails before any replica starts
        check_engine_args(model)
    engines = {model.id: engine_deployment(model).bind(model) for model in config.models}
    return Router.bind(config.model_dump(mode="json"), engines)


def engine_deployment(model: ModelConfig) -> serve.Deployment:
    scaling = model.autoscaling
    return serve.deployment(VLLMEngine).options(
        name=model.deployment_name,
        max_ongoing_requests=model.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        },
        ray_actor_options={
            **model.resources.replica_actor_resources(),
            "runtime_env": {"env_vars": {**model.resources.engine_env(), **model.env}},
        },
        placement_group_bundles=model.resources.placement_group_bundles(),
        placement_group_strategy="STRICT_PACK",
        # Loading weights and starting an engine takes minutes on big models; a health check is an engine ping.
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=30,
    )
