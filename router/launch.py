"""Start a local Ray cluster and serve a config file in the foreground: what ``make serve`` runs.

    python -m router.launch configs/local.yaml [--host 0.0.0.0] [--port 8000]

Ctrl-C (or SIGTERM) shuts Serve down and stops the Ray processes this started. The file's application is
deployed as the applications ``router/app.py`` expands it into, through Serve's declarative deploy, as KubeRay
deploys the chart's.

What it uses: HAProxy's settings and setup hook (``router/haproxy.py``), free ports for HAProxy's pages
(``router/ports.py``), and ending what Ray's shutdown left running (``router/processes.py``); the tests start and
stop clusters with the same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from deployments.config import ConfigError, ServeArgs, load_serve_config
from deployments.model_config import local_path
from deployments.stream_channel import CHANNEL_HOST_ENV
from router import haproxy, processes
from router.auth import API_KEYS_ENV, API_KEYS_FILE_ENV
from router.ray_auth import RAY_AUTH_ENV, TOKEN_ENV, ensure_private_token

METRICS_EXPORT_PORT = 8080

# How Ray Serve runs here, for every Ray process, locally and on the chart's pods (a chart test compares them):
# Ray's documented high-throughput mode, with the overrides docs/architecture.md ("How Serve runs") explains.
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # HAProxy, not Serve's Python proxy, relays each SSE event
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one thread moves bytes at far beyond the engines' rate
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # router → engine over Serve's direct gRPC channel
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1),  # a reply is as large as its client asked
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",  # kept: vLLM's start must not block the replica's loop
    "RAY_SERVE_LOG_TO_STDERR": "1",  # kept: an operator sees a replica's last requests in its log
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def ray_process_env(host: str) -> dict[str, str]:
    """What a local cluster's Ray processes start with: Ray's token authentication; HAProxy as Serve's HTTP front,
    bound with its two pages to the serving host (:func:`router.haproxy.local_env`); engine replicas' stream
    channels on the loopback interface, since routers and engines share the machine."""
    return {**SERVE_ENV, **RAY_AUTH_ENV, **haproxy.local_env(host), CHANNEL_HOST_ENV: "127.0.0.1"}


def ray_runtime_env() -> dict[str, Any]:
    """The job runtime env of every local cluster (``make serve``, the load and node-failure scripts): replicas
    import `router` and `deployments` from this checkout, also where it is not pip-installed, and every worker runs
    HAProxy's setup hook."""
    return {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            "worker_process_setup_hook": haproxy.WORKER_SETUP_HOOK}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--host", help="address to bind (default: the file's http_options.host, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: the file's http_options.port, else 8000)")
    parser.add_argument("--metrics-port", type=int, default=METRICS_EXPORT_PORT)
    parser.add_argument("--dashboard-port", type=int, help="also run Ray's dashboard (and its job API) on "
                        "127.0.0.1 at this port, behind Ray's token; default: no dashboard")
    opts = parser.parse_args(argv)
    try:
        document, config = load_serve_config(opts.config)
        check_local_sources(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    http = document.get("http_options", {})
    host = opts.host or http.get("host", "127.0.0.1")
    port = opts.port or http.get("port", 8000)
    try:
        stop, ray_address = start(document, config, host, port, opts.metrics_port, opts.dashboard_port)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    first = config.models[0].id
    keyed = os.environ.get(API_KEYS_ENV) or os.environ.get(API_KEYS_FILE_ENV)
    auth = '-H "Authorization: Bearer $RAYROUTE_API_KEY" ' if keyed else ""
    body = json.dumps({"model": first, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    print(
        f"\nrayroute is serving {', '.join(m.id for m in config.models)}\n"
        f"  OpenAI API:  http://{shown_host}:{port}/v1\n"
        f"  metrics:     http://{shown_host}:{opts.metrics_port}/metrics\n"
        f"  Ray cluster: {ray_address}  (ray status --address {ray_address})\n"
        f"  Ray's token: {ensure_private_token() or '$' + TOKEN_ENV}  (the file; never printed)\n"
        + (f"  Ray dashboard: http://127.0.0.1:{opts.dashboard_port}\n" if opts.dashboard_port else "") +
        f"  try:\n"
        f"    curl http://{shown_host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
        f"{auth}"
        f"-d '{body}'\n"
        f"Ctrl-C stops everything.\n",
        flush=True,
    )
    wait_for_stop()
    print("stopping...", flush=True)
    stop()
    return 0


def start(document: dict[str, Any], config: ServeArgs, host: str, port: int, metrics_port: int,
          dashboard_port: int | None = None):
    """Start Ray and Serve and deploy the application; return a function that stops all of it, and Ray's address."""
    # Before Ray starts: its processes (and Serve's, which read these when imported) inherit this environment.
    os.environ.update(ray_process_env(host))
    ensure_private_token()
    import ray
    from ray import serve

    context = ray.init(
        num_cpus=logical_cpus(config),
        num_gpus=cpu_worker_places(config) or None,  # None: Ray counts the machine's GPUs
        resources=router_resources(config),
        # Ray's dashboard takes job submissions: only on the loopback, only when asked for, always behind the token.
        include_dashboard=dashboard_port is not None,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port or 8265,
        _metrics_export_port=metrics_port,
        runtime_env=ray_runtime_env(),
    )

    def stop() -> None:
        # Whatever this process started, directly or not, and is still alive 20 s after Ray's own shutdown is ended
        # (an engine core left behind by a replica that died mid-shutdown: router/processes.py).
        started = processes.descendants()
        serve.shutdown()
        ray.shutdown()
        processes.reap(started, timeout=20)

    try:
        serve.start(http_options={"host": host, "port": port},
                    proxy_location=document.get("proxy_location", "HeadOnly"))
        deploy(document)
    except BaseException:
        # A failed deployment or a Ctrl-C while engines load must not leave a Ray cluster behind.
        stop()
        raise

    return stop, context.address_info["gcs_address"]


def deploy(document: dict[str, Any], wait: bool = True) -> None:
    """Deploy a config file's applications through Serve's declarative path, the one ``serve deploy`` and KubeRay
    take (a redeploy replaces only the applications whose config changed), and (``wait``) wait until each is
    running. A new config replaces the last one whole: applications it no longer names are deleted."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from router.app import serve_deploy_config

    expanded = serve_deploy_config(document)
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(
        {k: v for k, v in expanded.items() if k not in ("proxy_location", "http_options")}))
    for app in expanded["applications"] if wait else []:
        try:
            client._wait_for_application_running(app["name"])
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None


def logical_cpus(config: ServeArgs) -> int:
    """Ray's logical CPUs: enough for every model at its most replicas plus the routers, never fewer than the
    machine has.

    vLLM's CPU engine uses its threads however Ray counts them; the count only has to let every replica place.
    """
    needed = config.routers.replicas + sum(
        sum(b.get("CPU", 0) for b in m.resources.placement_group_bundles()) * max(m.autoscaling.max_replicas, 1)
        for m in config.models
    )
    return max(os.cpu_count() or 1, math.ceil(needed))


def cpu_worker_places(config: ServeArgs) -> int:
    """Logical GPUs for the workers of CPU models with more than one: each worker's place in its replica's group
    (see :class:`deployments.replica_resources.Resources`), for every model at its most replicas."""
    return sum(m.resources.workers * max(m.autoscaling.max_replicas, 1)
               for m in config.models if m.resources.accelerator == "cpu" and m.resources.workers > 1)


def router_resources(config: ServeArgs) -> dict[str, float]:
    """The custom resources the routers and the key-limits replica ask for (``routers.ray_resources``): on
    Kubernetes only the router pods have them; here the one node has them."""
    return {name: amount * (config.routers.replicas + 1) for name, amount in config.routers.ray_resources.items()}


def check_local_sources(config: ServeArgs) -> None:
    for model in config.models:
        folders = [(f"models[{model.id}].source", model.local_source(), "model", "config.json")]
        folders += [(f"models[{model.id}].adapters.{name}", local_path(source), "adapter", "adapter_config.json")
                    for name, source in model.adapters.items()]
        for where, local, kind, marker in folders:
            if local is not None and not (local / marker).exists():
                hint = " (run `make model` to build the default models)" if "rayroute" in str(local) else ""
                raise ConfigError(f"{where}: no {kind} folder at {local}{hint}")


def wait_for_stop() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    sys.exit(main())
