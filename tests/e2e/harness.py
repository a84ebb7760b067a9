"""The end-to-end tests' cluster: its configuration and names, starting ``make serve``'s launcher and stopping it
cleanly (through the launcher's own :mod:`router.processes`), waiting for a server. ``conftest.py`` beside this
holds only fixtures and hooks; the scenarios and benchmarks import from here too.

Two ways of starting Ray remain, on purpose: the launcher in a subprocess, exactly as ``make serve`` runs it (the
shared e2e cluster, the chart's serve test, the benchmark), and an in-process Ray where a script must shape the
cluster itself (the load scenario's two-CPU node with a model-free engine; the node scenarios' several raylets).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from router import processes
from router.ports import free_port
from router.ray_auth import RAY_AUTH_ENV  # conftest sets it before any test module imports Ray

__all__ = ["free_port", "RAY_AUTH_ENV"]  # the launcher's, shared

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-" + "0123456789abcdef"
LIMITED_KEY = "sk-limited-" + "0123456789"  # may use the default chat and embedding models, 4 requests a minute
TOKENS_KEY = "sk-tokens-" + "0123456789"  # 60 tokens a minute
HASHED_KEY = "sk-hashed-" + "0123456789abcdef"  # in the keys file only as its sha256 (key_sha256)
ROOMY_KEY = "sk-roomy-" + "0123456789abcdef"  # limited, with room: its requests always ask the key-limits replica
API_KEYS = [
    {"name": "tests", "key": API_KEY},
    {"name": "other", "key": "sk-other-key-0123456789"},
    {"name": "limited", "key": LIMITED_KEY, "models": ["smollm2-135m-instruct", "all-minilm-l6-v2"],
     "requests_per_minute": 4},
    {"name": "tokens", "key": TOKENS_KEY, "tokens_per_minute": 60},
    {"name": "hashed", "key_sha256": hashlib.sha256(HASHED_KEY.encode()).hexdigest()},
    {"name": "roomy", "key": ROOMY_KEY, "requests_per_minute": 100_000},
]
DEFAULT_MODEL = "smollm2-135m-instruct"
SECOND_MODEL = "acme/smollm2-135m:copy"  # also the backpressure subject: one request at a time, one queued
ELASTIC_MODEL = "smollm2-elastic"  # autoscaled 1-2 on engine load, with short delays; failures happen to it
COLD_MODEL = "smollm2-cold"  # scales to zero
PAIR_MODEL = "smollm2-pair"  # two replicas, each holding at most one of PAIR_ADAPTERS
PAIR_ADAPTERS = ("pirate-a", "pirate-b")
PIRATE_ADAPTER = "smollm2-pirate"  # the default model's adapter (configs/local.yaml)
UNPLACEABLE_MODEL = "needs-a-gpu"  # min_replicas 0 and a GPU this machine lacks: no replica ever starts
QUEUE_TIMEOUT_UNPLACEABLE_S = 3
TOTAL_TIMEOUT_SECOND_S = 40  # SECOND_MODEL's requests end after this long
ELASTIC_DRAIN_TIMEOUT_S = 120  # how long a stopping ELASTIC_MODEL replica may drain
ROUTER_REPLICAS = 2
ALIAS = "gpt-4o-mini"
METRICS_ALIAS = "metrics-probe"  # a name only the metrics tests use, so their counters see no other traffic
EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_REQUEST_BYTES = 1024 * 1024
# For a test cluster's stop. Serve keeps a stopping router replica reachable this long so that load balancers can
# drop it first (30 s by default, on every stop); nothing balances a test cluster's routers but its own HAProxy,
# which retries a refused connection on another replica.
QUICK_STOP_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
# For the shared cluster's routing. Before it sends a request, Serve's router asks candidate replicas their queue
# length and waits 0.1 s for the answer (doubling to 1 s); on two cores busy with engines an answer can take longer,
# and a request whose first choice did not answer in time is routed again among all replicas. For an adapter that
# first choice is the replica holding it, so under load the adapter-placement test saw a request land on the other
# replica (which then loaded the adapter, evicting its own). Deadlines a busy machine meets keep Serve's choice.
PROBE_DEADLINE_ENV = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1",
                      "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5"}
STARTUP_TIMEOUT_S = float(os.environ.get("RAYROUTE_TEST_STARTUP_TIMEOUT", "600"))


class HarnessError(RuntimeError):
    """A server did not start or stop as it must; the message holds the end of its log."""


def clients_python() -> Path:
    """The Python of the clients' environment (LangChain, LlamaIndex, schemathesis), which `make test` builds."""
    python = Path(os.environ.get("RAYROUTE_CLIENTS_VENV", ROOT / ".venv-clients")) / "bin" / "python"
    if not python.exists():
        raise HarnessError(f"no clients environment at {python.parent.parent}: run `make clients` (part of "
                           "`make test`)")
    return python


@dataclass
class Cluster:
    base_url: str
    metrics_port: int
    process: subprocess.Popen
    log: Path
    config: Path
    dashboard_port: int | None = None  # Ray's dashboard (job API), when started with one

    def client(self, api_key: str | None = API_KEY):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key or "none", max_retries=0, timeout=120)

    def connect(self) -> None:
        """Join this cluster's Ray as a driver (once per test process), as `serve deploy` or an operator would."""
        import ray

        if not ray.is_initialized():
            # This cluster's address, from the launcher's banner: "auto" could find another cluster on the machine.
            address = re.search(r"Ray cluster: (\S+)", self.log.read_text()).group(1)
            ray.init(address=address, namespace="serve", log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})

    def engine_handle(self, model_id: str):
        """A Serve handle to the model's engine deployment, as this cluster's driver."""
        from ray import serve

        from deployments.names import engine_deployment_name

        self.connect()
        name = engine_deployment_name(model_id)  # each model's application is named as its deployment
        return serve.get_deployment_handle(name, app_name=name)

    def engine_info(self, model_id: str) -> dict:
        """Ask an engine replica directly, through Ray, what it is running."""
        return self.engine_handle(model_id).engine_info.remote().result(timeout_s=30)

    def replica_infos(self, model_id: str, count: int) -> dict[int, dict]:
        """:meth:`engine_info` of each of the model's ``count`` replicas, by process id: Serve picks the replica
        of each call, so this asks until it has heard from that many (both of two within 60 calls, or it fails)."""
        return infos_by_replica(lambda: self.engine_info(model_id), count, model_id)

    def reset_prefix_cache(self, model_id: str, pid: int) -> None:
        """Empty one replica's prefix cache, and wait until the replica reports it empty to the routers (a handle
        picks the replica: ask until the one meant answers)."""
        handle = self.engine_handle(model_id)
        for _ in range(60):
            if handle.reset_prefix_cache.remote(pid).result(timeout_s=30)["reset"]:
                break
        else:
            raise HarnessError(f"replica {pid} never answered")
        deadline = time.monotonic() + 30
        while self.replica_infos(model_id, 2)[pid]["kv_blocks"] != 0:
            if time.monotonic() > deadline:
                raise HarnessError(f"replica {pid} never reported its cache empty")
            time.sleep(0.5)

    def replicas(self, model_id: str) -> dict[str, int]:
        """The model's replicas by state (RUNNING, STARTING, STOPPING, ...), as Serve reports them."""
        from ray import serve

        from deployments.names import engine_deployment_name

        self.connect()
        name = engine_deployment_name(model_id)
        app = serve.status().applications.get(name)
        deployment = app.deployments.get(name) if app else None
        return dict(deployment.replica_states) if deployment else {}

    def session_dir(self) -> Path:
        """Ray's session folder of this cluster (its logs are under ``logs/``)."""
        import ray

        self.connect()
        return Path(ray._private.worker.global_worker.node.get_session_dir_path())


def secrets_in_logs(files: Iterable[Path], secrets: Iterable[str]) -> list[str]:
    """``file: secret-name`` for each secret (a key, its sha256, Ray's token) any of ``files`` holds: none may."""
    import hashlib

    needles = {}
    for secret in secrets:
        needles[secret.encode()] = f"{secret[:6]}..."
        needles[hashlib.sha256(secret.encode()).hexdigest().encode()] = f"sha256 of {secret[:6]}..."
    found = []
    for path in files:
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            found += [f"{path}: {name}" for needle, name in needles.items() if needle in data]
    return found


def keys_file(folder: Path) -> Path:
    """The shared cluster's API keys file (``RAYROUTE_API_KEYS_FILE``), beside its config."""
    return folder / "api-keys.yaml"


def e2e_config(tmp_path: Path) -> Path:
    """configs/local.yaml plus the models the tests need, all through the same schema and defaults:

    - a second copy of the chat model (marked multimodal, so images pass the router), which takes one request at a
      time and queues one more, so a third is refused (backpressure);
    - an autoscaled copy (1-2 replicas, engine-load policy, delays of seconds; a shorter context, with the default
      model as its fallback), a copy that scales to zero, and a model whose replicas cannot be placed;
    - a copy with two replicas serving two adapters, one at a time each (Serve's multiplexing), each request sent
      where the replicas' KV caches hold its prompt's start (``replica_choice: kv_cache``);
    - two router replicas, so per-key limits are shown to hold across them.
    """
    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    args = document["applications"][0]["args"]
    args["max_request_bytes"] = MAX_REQUEST_BYTES
    # The routers ask for the Ray resource the Helm chart gives only the head node; the launcher gives it to its one.
    args["routers"] = {"replicas": ROUTER_REPLICAS, "ray_resources": {"rayroute_router": 1}}
    models = args["models"]
    first = models[0]
    first["aliases"] = [ALIAS, METRICS_ALIAS]
    # One compute thread for the copies: with several busy engines on two cores, more would only fight over them.
    one_cpu = {**first["resources"], "cpus": 1}
    models.append({**first, "id": SECOND_MODEL, "aliases": [], "multimodal": True,
                   "allowed_media_domains": ["images.example.com"], "resources": one_cpu,
                   "max_ongoing_requests": 1, "max_queued_requests": 1,
                   "timeouts": {"total_s": TOTAL_TIMEOUT_SECOND_S}})
    # It also holds only 1,024 tokens and falls back to the default model (4,096) for longer prompts.
    models.append({**first, "id": ELASTIC_MODEL, "aliases": [], "resources": one_cpu,
                   "drain_timeout_s": ELASTIC_DRAIN_TIMEOUT_S,
                   "engine_args": {**first["engine_args"], "max_model_len": 1024}, "fallbacks": [DEFAULT_MODEL],
                   "autoscaling": {"policy": "engine_load", "min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": 2, "upscale_delay_s": 2, "downscale_delay_s": 20,
                                   "look_back_period_s": 10}})
    # No engine makes a first token within a millisecond: every stream to it ends in 408 (whole answers do not
    # have a first-token timeout).
    models.append({**first, "id": COLD_MODEL, "aliases": [], "resources": one_cpu,
                   "autoscaling": {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 30},
                   "timeouts": {"first_token_s": 0.001}})
    models.append({**first, "id": UNPLACEABLE_MODEL, "aliases": [], "resources": {"accelerator": "gpu"},
                   # Once asked for, its replica stays wanted: Ray's policy does not scale down a deployment with
                   # no running replica, so the application never counts as running again (see the redeploy test).
                   "autoscaling": {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 5},
                   "timeouts": {"queue_s": QUEUE_TIMEOUT_UNPLACEABLE_S}})
    # Two replicas with room for one adapter each, and two adapters (one folder under two names): requests for
    # each must go to the replica holding it. Replicas chosen by what their KV caches hold (256 MiB each, about 45
    # blocks of 128 tokens), which must keep adapters with the replica holding them.
    pirate = first["adapters"][PIRATE_ADAPTER]
    models.append({**first, "id": PAIR_MODEL, "aliases": [], "resources": one_cpu,
                   "adapters": {name: pirate for name in PAIR_ADAPTERS}, "max_adapters_per_replica": 1,
                   "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "replica_choice": "kv_cache"})
    for model in models:
        model["engine_args"] = {**model["engine_args"], "max_num_seqs": 16}
        if model is not first:  # the copies' engines hold 256 MiB of KV cache, not 1 GiB: nine fit in memory
            model["engine_args"]["kv_cache_memory_bytes"] = 256 * 1024 * 1024
            if model["id"] != PAIR_MODEL:
                model["adapters"] = {}  # adapter names are model names: one model each
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


# --- Ray in this process: for the scripts that shape the cluster themselves ------------------------------------

def serve_document(args: dict[str, Any]) -> dict[str, Any]:
    """A config file holding ``args`` (what :func:`router.launch.deploy` takes)."""
    from router.app import IMPORT_PATH

    return {"applications": [{"name": "rayroute", "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def start_serve_in_process(address: str, port: int, serve_options: dict[str, Any] | None = None,
                           **init_options: Any) -> None:
    """Ray (``address``: "local" for a new one-node cluster, or a ``ray.cluster_utils.Cluster``'s) and Serve on
    127.0.0.1:``port``, set up as ``make serve`` has them (HAProxy front, throughput mode); then ``serve.run`` the
    application. Stop with :func:`stop_serve_in_process`."""
    import ray
    from ray import serve

    from router.launch import ray_process_env, ray_runtime_env

    os.environ.update(ray_process_env("127.0.0.1"))  # before Ray starts its processes
    for attempt in range(3):
        try:
            ray.init(address=address, log_to_driver=False, runtime_env=ray_runtime_env(), **init_options)
            break
        except Exception as exc:
            # Ray gives its new raylet a fixed 30 s to register, which a machine busy with other work can miss.
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            print(f"Ray did not start in time ({exc}); trying again", file=sys.stderr, flush=True)
            stop_serve_in_process()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, **(serve_options or {}))


def stop_serve_in_process(reap: bool = True) -> None:
    """Serve, then Ray, then (``reap``) anything this process started that is still alive, as router/launch.py
    does (router/processes.py). A script with a ``ray.cluster_utils.Cluster`` passes ``reap=False`` and shuts its
    raylets down itself."""
    import ray
    from ray import serve

    started = processes.descendants()
    # Only with this process's own cluster up: serve.shutdown() without one would connect to whichever cluster it
    # finds on the machine (another session's) and shut that down.
    running = ray.is_initialized()
    if running:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    if not reap:
        return
    processes.reap(started, timeout=20 if running else 0)  # after a failed start nothing will stop on its own



def model_entry(document: dict, folder: str) -> dict:
    """The config's first model with its engine settings, served from ``folder`` under that folder's name (without
    the first model's adapters, which are made for its weights)."""
    from deployments.dev.local_models import ensure_model

    first = document["applications"][0]["args"]["models"][0]
    return {**first, "id": folder, "aliases": [], "adapters": {}, "source": str(ensure_model(folder)),
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}



def wait_until_ready(url: str, process: subprocess.Popen, log: Path | None = None, timeout: float = 600,
                     also: Callable[[], bool] = lambda: True) -> None:
    """Until ``url`` answers 200 (and ``also()`` holds); raises :class:`HarnessError` if the process exits first or
    time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise HarnessError(f"the server exited with {process.returncode}" + (f":\n{tail(log)}" if log else ""))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200 and also():
                return
        time.sleep(2)
    raise HarnessError(f"{url} was not ready after {timeout:.0f}s" + (f":\n{tail(log)}" if log else ""))


def start_launcher(config: Path, log: Path, env: dict[str, str], timeout: float = STARTUP_TIMEOUT_S,
                   dashboard: bool = False) -> Cluster:
    """``make serve``'s launcher on ``config``, on free ports of 127.0.0.1 (with Ray's dashboard: ``dashboard``),
    once the models answer and it has printed its banner (which :meth:`Cluster.connect` reads; /ready can answer a
    moment before the launcher's deploy call returns)."""
    port, metrics_port = free_port(), free_port()
    dashboard_port = free_port() if dashboard else None
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "router.launch", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", str(metrics_port),
             *(["--dashboard-port", str(dashboard_port)] if dashboard_port else [])],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    cluster = Cluster(f"http://127.0.0.1:{port}", metrics_port, process, log, config, dashboard_port)
    try:
        wait_until_ready(cluster.base_url + "/ready", process, log, timeout,
                         also=lambda: "Ray cluster: " in log.read_text(errors="replace"))
    except BaseException:
        with contextlib.suppress(HarnessError):
            stop_and_check(process, log)
        raise
    return cluster


@contextlib.contextmanager
def launched(config: Path, log: Path, env: dict[str, str], dashboard: bool = False) -> Iterator[Cluster]:
    """:func:`start_launcher`; on exit, stopped with Ctrl-C and checked to leave no process behind."""
    cluster = start_launcher(config, log, env, dashboard=dashboard)
    try:
        yield cluster
    finally:
        stop_and_check(cluster.process, log)


def stop_and_check(process: subprocess.Popen, log: Path) -> None:
    """Ctrl-C must stop every process the launcher started (Ray's raylet, GCS, workers, vLLM engine cores)."""
    import ray

    if ray.is_initialized():  # the tests' own connection, opened by Cluster.engine_info
        ray.shutdown()
    started = processes.launched_by(process.pid)  # its tree and its session, where Ray's daemons are
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise HarnessError(f"the launcher did not stop within 120s of Ctrl-C:\n{tail(log)}") from None
    alive = processes.still_running(started, timeout=60)
    if alive:
        names = [processes.describe(p) for p in alive]
        os.killpg(process.pid, signal.SIGKILL)
        raise HarnessError(f"processes left running after Ctrl-C: {names}")


def infos_by_replica(ask: Callable[[], dict], count: int, model_id: str) -> dict[int, dict]:
    """``ask()`` (one replica's ``engine_info``) until ``count`` replicas have answered, by process id: Serve picks
    the replica of each call (every one within 60 s, or it fails). Spaced out, and that long: right after a burst a
    replica's reported load is a second or two old, and every router sends a call to the less loaded one; a replica
    just started may answer Serve's queue-length probes later than their 0.1 s deadline for a while, and is passed
    over until it does."""
    infos: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = ask()
        infos[info["pid"]] = info
        if len(infos) == count:
            return infos
        time.sleep(0.25)
    raise AssertionError(f"heard from {len(infos)} of {model_id}'s {count} replicas")


def scenario_phase(report: dict, name: str) -> dict:
    """One phase's entry of a scenario's report (:func:`run_scenario`), which a phase (or the cluster's start) that
    failed leaves out or fills with its traceback."""
    failed = report.get("error") or (report.get(name) or {}).get("error")
    assert not failed, f"{failed}\n{report['output']}"
    assert name in report, f"the scenario ended before its {name} phase:\n{report['output']}"
    return report[name]


def http_status(url: str) -> int | None:
    """A GET's status, or None when nothing answered."""
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=5).status_code
    return None


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """``condition()``'s first true value, asked every second (an exception counts as not yet); TimeoutError after
    ``timeout`` seconds, naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := condition():
                return value
        time.sleep(1)
    raise TimeoutError(f"not within {timeout:.0f} s: {what}")


def run_phases(report: dict[str, Any], phases: Iterable[tuple[str, Callable[[], dict]]],
               log: Callable[[str], None]) -> None:
    """A scenario's phases in order, each one's entry in ``report`` (with its ``seconds``, or its traceback as
    ``error``); the first that fails ends the run, since the cluster's state is then unknown."""
    for name, phase in phases:
        log(f"phase {name}")
        began = time.monotonic()
        try:
            report[name] = phase()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-4000:]}
            return
        report[name]["seconds"] = round(time.monotonic() - began, 1)


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_scenario(module: str, args: Iterable[str] = ()) -> dict:
    """Run ``python -m <module> <args>`` in its own process and session; its report (the last line of its output),
    with the end of its output under ``output``."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    try:
        output, _ = process.communicate(timeout=1800)
    finally:
        # Whatever the scenario left (a raylet, an engine core orphaned by its node's loss) ends with it.
        for leftover in [p for p in psutil.process_iter() if _session(p) == process.pid]:
            leftover.send_signal(signal.SIGKILL)
    try:
        report = json.loads(output.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"{module} printed no report (exit {process.returncode}):\n{output[-6000:]}")
    return {**report, "output": output[-6000:]}


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None
