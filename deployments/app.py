"""The engine applications: one per model, its engine deployment and nothing else.

Each served model is an application of its own, so that Serve's declarative deploy (``serve deploy``, KubeRay's
``serveConfigV2``) replaces only the replicas of a model whose entry changed. Serve gives every deployment of an
application the application's code version, a hash of its ``import_path``, ``runtime_env`` and ``args``, and a new
version replaces each replica: with every model in one application's ``args``, changing one model's
``max_num_seqs`` restarted every engine and router (measured; see the README's failure table).

The options Serve can change on running replicas (scaling, request limits: ``IN_PLACE_FIELDS`` in
``deployments/model_config.py``) stay out of ``args``, in the application's ``deployments:`` overrides, which are
not part of the code version: a new ``max_replicas`` is applied to the running engines instead of replacing them (a GPU
engine takes minutes to load).
``router/app.py`` expands a config file into these applications (:func:`engine_applications`) plus the router's,
and builds them (:func:`build_engine_apps`) for ``serve run``'s everything-in-one application; an entry here is

    {"name": "engine-smollm2-135m-instruct", "route_prefix": null,
     "import_path": "deployments.app:build_engine_app", "args": {"model": {...one entry, less IN_PLACE_FIELDS...}},
     "deployments": [{"name": "engine-smollm2-135m-instruct", "autoscaling_config": {...}, ...}]}
"""

from __future__ import annotations

import copy
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.schema import LoggingConfig

from deployments.config import IN_PLACE_FIELDS, ModelConfig, ServeArgs, check_engine_args
from deployments.constants import HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S
from deployments.engine import VLLMEngine
from deployments.replica_choice import request_router_options

IMPORT_PATH = "deployments.app:build_engine_app"

# Serve writes one access line per call at every replica, and the router writes its own (router.telemetry), with
# the fields an operator needs and never a prompt. Serve's line cost each replica ~3% of its CPU (py-spy under load).
SERVE_LOGGING = LoggingConfig(enable_access_log=False)


@serve.deployment(autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1},
                  ray_actor_options={"num_cpus": 0}, logging_config=SERVE_LOGGING)
class EngineFront:
    """The ingress of an engine application whose engine deployment has a request router of its own
    (``replica_choice`` other than ``least_loaded``). Serve refuses a custom router on an application's ingress
    deployment, because HTTP traffic to an ingress goes through HAProxy and never through it; an engine application
    has no HTTP route, and the routers' handles go to the engine deployment behind this one (by name,
    router/app.py). Nothing calls it, so it never runs a replica."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine


def build_engine_app(args: dict[str, Any]) -> Application:
    """The application of ``args["model"]``, one entry of a config's ``models``. Expanded by
    :func:`engine_application`, the entry lacks ``IN_PLACE_FIELDS``: the deployment is built with their defaults,
    and Serve puts the application's ``deployments:`` overrides over them."""
    model = ModelConfig.model_validate(args["model"])
    check_engine_args(model)  # here, so a misspelt engine argument fails before any replica starts
    engine = engine_deployment(model).bind(model)
    return EngineFront.bind(engine) if request_router_options(model) else engine


def engine_application(model: ModelConfig) -> dict[str, Any]:
    """The model's entry in a Serve config's ``applications``: no HTTP route, only the router calls it."""
    return {"name": model.app_name, "route_prefix": None, "import_path": IMPORT_PATH,
            "args": {"model": model.model_dump(mode="json", exclude=set(IN_PLACE_FIELDS))},
            "deployments": [{"name": model.deployment_name, **model.in_place_options()}]}


def engine_applications(config: ServeArgs, shared: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model's entry (:func:`engine_application`), each with a copy of ``shared``: the fields of the config
    file's entry that go to every application (``runtime_env``)."""
    return [{**engine_application(model), **copy.deepcopy(shared)} for model in config.models]


def build_engine_apps(config: ServeArgs) -> dict[str, Application]:
    """Every model's application, by model id, built from its whole entry (``IN_PLACE_FIELDS`` included)."""
    return {model.id: build_engine_app({"model": model.model_dump(mode="json")}) for model in config.models}


def engine_deployment(model: ModelConfig, engine_class: type = VLLMEngine) -> serve.Deployment:
    """The model's deployment; ``engine_class`` is the replica class (the load test's keeps the replica code and
    replaces only vLLM)."""
    return serve.deployment(engine_class).options(
        name=model.deployment_name,
        **model.in_place_options(),
        logging_config=SERVE_LOGGING,
        ray_actor_options={
            **model.resources.replica_actor_resources(),
            "runtime_env": {"env_vars": {**model.resources.engine_env(), **model.env}},
        },
        placement_group_bundles=model.resources.placement_group_bundles(),
        placement_group_strategy=model.resources.placement_strategy(),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        # Scale-down and redeploys stop a replica only after its streams end (or this long has passed).
        graceful_shutdown_timeout_s=model.drain_timeout_s,
        **request_router_options(model),
    )

