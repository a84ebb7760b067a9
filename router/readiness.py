"""``/ready``: whether every model that is meant to be running has a replica running.

Who asks: the test harness and scripts before they send traffic, and operators or load balancers that want to know
the configured capacity is up. ``make serve``'s launcher (:mod:`router.launch`) waits for Serve's applications to be
RUNNING instead, which needs the same replicas. Not the chart's pod probes: they use Serve's own ``/-/healthz``,
since a router pod keeps serving every model it can place even while one model lacks the GPUs for a replica, and
a failing probe would take all of them away.

What it means: 200 when every model whose deployment keeps at least one replica (its ``min_replicas`` as Serve
applies it, ≥ 1) has one RUNNING, or its deployment is HEALTHY; else 503 naming the models waited for. A model
scaled to zero when idle (``min_replicas`` 0) never holds readiness back, whether idle, starting on demand, or
asked for and unplaceable: its first request waits for its replica (or gets 503 ``model_unavailable``), and
readiness would otherwise flip with whatever request last asked for it. A model whose deployment does not exist
(yet) is waited for: nothing can answer for it.

``min_replicas`` is read from the deployment as Serve runs it, not from the router's args: a model's scaling is
changed in place (``IN_PLACE_FIELDS``), without a new router application, so the router's own copy could be stale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from fastapi.responses import JSONResponse

from deployments.config import RoutedModel


def serve_deployments() -> dict[str, Any]:
    """Every Serve deployment by name, in any application, with its applied config (``DeploymentDetails``): each
    model's own application (router/app.py), or this one under ``serve run``. What ``serve.status()`` reads, with
    the deployment config it leaves out."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    details = ServeInstanceDetails(**client.get_serve_details())
    return {name: deployment for app in details.applications.values()
            for name, deployment in app.deployments.items()}


def min_replicas(deployment: Any) -> int:
    """The replicas a deployment keeps however idle: its autoscaling ``min_replicas``, or its fixed count."""
    config = deployment.deployment_config
    scaling = config.autoscaling_config  # a dict when set; Serve's DEFAULT.VALUE when the count is fixed
    if isinstance(scaling, dict):
        return int(scaling.get("min_replicas", 1))
    if hasattr(scaling, "min_replicas"):
        return int(scaling.min_replicas)
    return config.num_replicas if isinstance(config.num_replicas, int) else 1


def waiting_for(models: Iterable[RoutedModel], deployments: dict[str, Any]) -> list[str]:
    """The ids of the models readiness waits for (see the module's docstring)."""
    waiting = []
    for model in models:
        deployment = deployments.get(model.deployment_name)
        if deployment is None:
            waiting.append(model.id)
        elif min_replicas(deployment) >= 1 and deployment.status != "HEALTHY" and not any(
                replica.state == "RUNNING" for replica in deployment.replicas):
            waiting.append(model.id)
    return waiting


async def readiness(models: Iterable[RoutedModel]) -> JSONResponse:
    deployments = await asyncio.to_thread(serve_deployments)
    waiting = waiting_for(models, deployments)
    if waiting:
        return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
    return JSONResponse({"status": "ready"})
