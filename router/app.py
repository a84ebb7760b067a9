"""The router's Serve application, and a config file's expansion into it and one application per model (those are
``deployments/app.py``'s).

A config file (``configs/local.yaml``, the chart's ``serve`` values) holds one application entry whose ``args`` are
rayroute's whole config. :func:`serve_applications` expands it into what Serve deploys, each application with only
the part of the config its deployments read:

- per model, ``deployments.app:build_engine_app`` with that model's entry;
- the router application (the entry's name and route), ``router.app:build_router_app``: the router deployment and
  the key-limits replica, with the routers' settings and each model's routed fields (:meth:`ServeArgs.router_args`).

So changing one model's engine arguments gives only that model's application a new code version, and Serve
replaces only its replicas; the routers and every other engine keep running. A change to its scaling or request
limits (``IN_PLACE_FIELDS``) is applied to its running replicas, replacing none. ``make serve``
(``router/launch.py``), the tests and the chart (``helm/templates/_helpers.tpl``, compared by ``tests/test_chart.py``)
deploy this expansion; ``python -m router.app configs/local.yaml`` prints it as a Serve config file for
``serve deploy``. The entry's own ``import_path``, :func:`build_app`, builds everything as one application, which
``serve run configs/local.yaml`` takes; any change to it replaces every replica.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from deployments.app import SERVE_LOGGING, build_engine_apps, engine_applications
from deployments.config import ConfigError, RouterArgs, load_serve_config, parse_args
from deployments.constants import KEY_LIMITS_MAX_ONGOING
from router.ingress import Router
from router.limits import KeyLimits

IMPORT_PATH = "router.app:build_app"
ROUTER_IMPORT_PATH = "router.app:build_router_app"


def serve_applications(app: dict[str, Any]) -> list[dict[str, Any]]:
    """A config file's application entry (``import_path`` :data:`IMPORT_PATH`) as Serve's ``applications``: each
    model's engine application, then the router application under the entry's name and route. Every other field of
    the entry (``runtime_env``) goes to each of them."""
    if app.get("import_path") != IMPORT_PATH:
        raise ConfigError(f"application {app.get('name')!r}: import_path must be {IMPORT_PATH}")
    if app.get("deployments"):
        # Each application's `deployments:` overrides are generated from the model entries (engine_application).
        raise ConfigError(f"application {app.get('name')!r}: set replica options (autoscaling, "
                          "max_ongoing_requests, ...) in the model entries of `args`, not in `deployments`")
    config = parse_args(app.get("args"), origin=f"application {app.get('name')!r} args")
    shared = {k: copy.deepcopy(v) for k, v in app.items()
              if k not in ("name", "route_prefix", "import_path", "args", "deployments")}
    router = {"name": app.get("name", "rayroute"), "route_prefix": app.get("route_prefix", "/"),
              "import_path": ROUTER_IMPORT_PATH, "args": config.router_args(), **shared}
    return [*engine_applications(config, shared), router]


def serve_deploy_config(document: dict[str, Any]) -> dict[str, Any]:
    """A whole config file as the Serve config ``serve deploy`` takes: its rayroute application expanded; any
    other application (one already expanded, as in the chart's serveConfigV2) as it is."""
    return {**document, "applications": [
        expanded for app in document["applications"]
        for expanded in (serve_applications(app) if app.get("import_path") == IMPORT_PATH else [app])]}


def build_router_app(args: dict[str, Any]) -> Application:
    """The router application: routers and the key-limits replica, calling each model's engine application."""
    config = RouterArgs.model_validate(args)
    engines = {model.id: DeploymentHandle(model.deployment_name, app_name=model.app_name)
               for model in config.models}
    return router_application(config, engines)


def build_app(args: dict[str, Any]) -> Application:
    """Everything in one application, for ``serve run`` of a config file as it is (see the module's docstring)."""
    config = parse_args(args, origin="rayroute application args")
    return router_application(RouterArgs.model_validate(config.router_args()), build_engine_apps(config))


def router_application(config: RouterArgs, engines: dict[str, Any]) -> Application:
    # One replica, so every router replica sees the same buckets and slots; it holds a few floats per key and one
    # small record per request in flight of a limited key. Losing it loses them (a new one starts with full buckets):
    # the routers' bounded wait on it and `routers.key_limits_unavailable` cover the time until it is back.
    limits = serve.deployment(KeyLimits).options(
        name="key-limits", num_replicas=1, max_ongoing_requests=KEY_LIMITS_MAX_ONGOING, logging_config=SERVE_LOGGING,
        ray_actor_options={"num_cpus": 0, "resources": dict(config.routers.ray_resources)}).bind()
    return router_deployment(config).bind(config.model_dump(mode="json"), engines, limits)


def router_deployment(config: RouterArgs) -> serve.Deployment:
    return Router.options(
        num_replicas=config.routers.replicas,
        max_ongoing_requests=config.routers.max_ongoing_requests,
        logging_config=SERVE_LOGGING,
        ray_actor_options={"resources": dict(config.routers.ray_resources)},
        # A router replica stops (redeploy) only once its streams have ended, as long as any model's would.
        graceful_shutdown_timeout_s=max(model.drain_timeout_s for model in config.models),
    )


def main(argv: list[str] | None = None) -> int:
    """Print a config file as the Serve config that deploys it: ``python -m router.app configs/local.yaml``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m router.app CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        document, _ = load_serve_config(argv[0])
        expanded = serve_deploy_config(document)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(expanded, sort_keys=False, width=120))
    return 0


if __name__ == "__main__":
    sys.exit(main())
