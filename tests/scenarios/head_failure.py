"""The head node lost under load, with GCS fault tolerance: the endpoint keeps answering.

Run by tests/e2e/test_node_failure.py in its own process; prints a JSON report as its last line.

The chart's layout on one machine, with real parts, each node a real ``ray start`` with its own environment:

- Debian's ``redis-server`` with a password: the GCS's external storage (KubeRay's ``gcsFaultToleranceOptions``
  gives the head pod the same ``RAY_REDIS_ADDRESS`` and password).
- A head node on 127.0.0.1 with no CPUs: Ray's control plane and Serve's controller only.
- A worker node on 127.0.0.2 (loopback, so both fit on one machine) holding the router, the key-limits replica
  and SmolLM2's engine, with Serve's HTTP proxy (HAProxy) beside them. Clients call this node's proxy, as the
  chart's Service sends them to the pods that serve HTTP and never to the head.

Under steady load (streams and whole answers), every process of the head is killed with SIGKILL (the GCS, the
raylet, Serve's controller, the head's own proxy). The load goes on with the head gone; then the head is started
again with the same command, Serve's controller comes back with its state from Redis, and a changed config (a new
engine argument and a second replica) deploys through Serve's declarative path as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

from tests.e2e.harness import RAY_AUTH_ENV, free_port, serve_document
from tests.scenarios.node_failure import ASK, LOAD_THREADS, MODEL, app_args, load

# The head takes the machine's address (Ray turns 127.0.0.1 into it); the worker a loopback address of its own, so
# each node's HAProxy binds the same HTTP port on its own address.
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
HEAD_GONE_S = 20  # how long the load runs with no head
# How long a worker's raylet waits for the GCS to come back before it exits (Ray's default is 60 s); KubeRay sets
# it on worker pods when GCS fault tolerance is on.
GCS_RECONNECT_S = 600
NODE_ENV = "RAYROUTE_TEST_NODE"  # which node (and which run) a process belongs to, inherited by all it starts
REDIS_PASSWORD = "rayroute-" + uuid.uuid4().hex[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-source", default="~/.cache/rayroute/models/smollm2-135m-instruct")
    options = parser.parse_args(argv)

    os.environ.update(RAY_AUTH_ENV)  # before Ray is imported: this process connects as a driver later
    run = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="rr-hf-"))  # short: Ray's socket paths under it have a length limit
    redis_port, gcs_port, http_port = free_port(), free_port(), free_port()
    report: dict = {"http_port": http_port}
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", HEAD_IP, "--save", "",
                              "--appendonly", "no", "--requirepass", REDIS_PASSWORD, "--dir", str(workdir)],
                             stdout=(workdir / "redis.log").open("w"), stderr=subprocess.STDOUT)
    head_env = node_env("head", run, HEAD_IP, {"RAY_REDIS_ADDRESS": f"{HEAD_IP}:{redis_port}",
                                               "RAY_external_storage_namespace": f"rayroute-{run}"})
    # The head's own temp dir, as a pod's: `ray start --head` refuses to start where its last start's address file
    # names a GCS that a local process (here the worker's raylet) still points at; a new head pod has no such file.
    head_command = ["ray", "start", "--head", f"--port={gcs_port}", f"--temp-dir={workdir / 'head'}",
                    "--num-cpus=0", f"--redis-password={REDIS_PASSWORD}", "--include-dashboard=false",
                    "--disable-usage-stats", *node_ports(10002, 14999)]
    stop = threading.Event()
    results: list[dict] = []
    threads: list[threading.Thread] = []
    try:
        ray_start(head_command, head_env, workdir / "head.log")
        ray_start(["ray", "start", f"--address={HEAD_IP}:{gcs_port}", f"--node-ip-address={WORKER_IP}",
                   "--num-cpus=4", '--resources={"rayroute_router": 10}', "--disable-usage-stats",
                   *node_ports(15000, 19999)],
                  node_env("worker", run, WORKER_IP, {"RAY_gcs_rpc_server_reconnect_timeout_s": str(GCS_RECONNECT_S)}),
                  workdir / "worker.log")
        base = f"http://{WORKER_IP}:{http_port}"
        args = app_args(options.model_source)
        args["routers"] = {"replicas": 1, "ray_resources": {"rayroute_router": 1}}
        args["models"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
        started = time.monotonic()
        with driver(gcs_port, head_env):
            from ray import serve

            from router.launch import deploy

            serve.start(http_options={"host": HEAD_IP, "port": http_port}, proxy_location="EveryNode")
            deploy(serve_document(args))
        wait_ready(base, 300)
        report["deployed_seconds"] = time.monotonic() - started

        threads = [threading.Thread(target=load, args=(base, i, stop, results)) for i in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(8)  # traffic before the loss
        report["head_processes_killed"] = kill_node("head", run)
        report["head_killed_at"] = killed_at = time.monotonic()
        time.sleep(HEAD_GONE_S)
        report["head_restarted_at"] = restarted_at = time.monotonic()
        (workdir / "head" / "ray_current_cluster").unlink(missing_ok=True)
        ray_start(head_command, head_env, workdir / "head-again.log")
        report["head_restart_seconds"] = time.monotonic() - restarted_at
        time.sleep(5)  # traffic after the head is back
        stop.set()
        for thread in threads:
            thread.join(timeout=200)
        report["hung_threads"] = sum(thread.is_alive() for thread in threads)
        report["results"] = results
        report["while_head_gone"] = sum(1 for r in results if killed_at <= r["started_at"] < restarted_at)
        report["longest_gap_s"] = longest_gap(results)

        # Serve's controller is back with its applications from Redis, and takes a new config: a changed engine
        # argument and two replicas instead of one, as an operator's redeploy and a scale-up would ask.
        recovered = time.monotonic()
        with driver(gcs_port, head_env):
            from ray import serve

            from router.launch import deploy

            status = wait_for(lambda: serve.status().applications, 120, "Serve's controller")
            report["applications_after_restart"] = {name: app.status for name, app in status.items()}
            report["controller_back_seconds"] = time.monotonic() - recovered
            args["models"][0]["engine_args"]["max_num_seqs"] = 4
            args["models"][0]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
            deploy(serve_document(args))
            engine = next(name for name in serve.status().applications if name.startswith("engine-"))
            report["replicas_after_redeploy"] = dict(
                serve.status().applications[engine].deployments[engine].replica_states)
        final = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4},
                           timeout=120)
        report["after_status"] = final.status_code
    finally:
        stop.set()
        kill_node("head", run)
        kill_node("worker", run)
        redis.kill()
    print(json.dumps(report))
    return 0


def node_env(node: str, run: str, ip: str, extra: dict[str, str]) -> dict[str, str]:
    """A node's environment: Serve as `make serve` and the chart run it, HAProxy on this node's own address and
    free ports, the Serve HA timeouts, and the marker :func:`kill_node` finds its processes by."""
    from router.launch import ray_process_env, ray_runtime_env

    return {**os.environ, **RAY_AUTH_ENV, **ray_process_env(ip), **extra, NODE_ENV: f"{node}-{run}",
            "PYTHONPATH": ray_runtime_env()["env_vars"]["PYTHONPATH"], "RAY_DEDUP_LOGS": "0"}


def node_ports(min_worker: int, max_worker: int) -> list[str]:
    """Ports two nodes on one machine must not share (Ray's defaults are fixed numbers)."""
    return [f"--min-worker-port={min_worker}", f"--max-worker-port={max_worker}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def ray_start(command: list[str], env: dict[str, str], log: Path) -> None:
    bin_dir = Path(sys.executable).parent
    with log.open("a") as out:
        done = subprocess.run([str(bin_dir / command[0]), *command[1:]], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def driver(gcs_port: int, env: dict[str, str]):
    """This process connected to the cluster, on the head's node, and disconnected again (a driver on a node that
    dies dies with it)."""
    import ray

    from router.launch import ray_runtime_env

    os.environ.update({k: env[k] for k in RAY_AUTH_ENV})
    ray.init(address=f"{HEAD_IP}:{gcs_port}", log_to_driver=False, runtime_env=ray_runtime_env())
    try:
        yield
    finally:
        ray.shutdown()


def kill_node(node: str, run: str) -> int:
    """SIGKILL every process of the node: those that inherited its marker from `ray start`, and everything they
    started (the raylet starts its agents with an environment of its own); the number killed."""
    marker = f"{node}-{run}"
    doomed: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get(NODE_ENV) == marker:
                doomed.update({p.pid: p for p in [process, *process.children(recursive=True)]})
    for process in doomed.values():
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    return len(doomed)


def wait_ready(base: str, timeout: float) -> None:
    wait_for(lambda: _status(base + "/ready") == 200, timeout, f"{base}/ready")


def _status(url: str) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=5).status_code
    return None


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := condition():
                return value
        time.sleep(1)
    raise TimeoutError(f"not within {timeout:.0f} s: {what}")


def longest_gap(results: list[dict]) -> float:
    """The longest time with no request completing successfully, from the first success to the last."""
    ends = sorted(r["ended_at"] for r in results if r.get("status") == 200 and r.get("done")
                  and not r.get("error_event"))
    return max((b - a for a, b in zip(ends, ends[1:], strict=False)), default=0.0)


if __name__ == "__main__":
    sys.exit(main())
