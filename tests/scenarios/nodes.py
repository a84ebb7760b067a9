"""Nodes lost and drained under load, on one cluster: the head lost, a worker drained, a worker lost without warning,
Redis lost.

Run by tests/e2e/test_node_failure.py in its own process (a process joins one Ray cluster, and the test session's is
another); prints one JSON report on its last line, one entry per phase:

    python -m tests.scenarios.nodes [--model-source PATH]

One cluster for the three phases, in this order, because starting a cluster and its engines is most of what each
phase would cost alone. It is the chart's layout on one machine, each node a real ``ray start`` with its own loopback
address, environment and temp dir, as a pod has:

- Debian's ``redis-server`` with a password: the GCS's external storage (KubeRay's ``gcsFaultToleranceOptions``
  gives the head pod the same ``RAY_REDIS_ADDRESS`` and password). It is there from the start, as on a cluster
  that has GCS fault tolerance; only the head phase needs it.
- A head on 127.0.0.1 with no CPUs: Ray's control plane, its dashboard (the state API the drain hook asks) and
  Serve's controller only.
- A router node on 127.0.0.2 holding the router and the key-limits replica (the only node with ``rayroute_router``,
  one CPU: the router's), with Serve's HTTP proxy (HAProxy). Clients call this node's proxy, as the chart's Service
  sends them to the pods that serve HTTP and never to the head.
- Three one-CPU workers on 127.0.0.3-5 for SmolLM2's engine replicas: one replica at first, two after the head
  phase's redeploy, and a spare for the drain's replacement.

The phases, each a function below with the report entry the test checks:

1. :func:`lose_the_head`: under six clients' load, every process of the head is SIGKILLed; the load goes on with
   the head gone; the head starts again with the same command, Serve's controller comes back with its state from
   Redis, and a changed config (a new engine argument and a second replica) deploys through Serve's declarative
   path. What a client must see: nothing.
2. :func:`drain_a_worker`: under three clients' load, an engine's worker is drained the way the chart's ``preStop``
   hook drains a pod (``python -m deployments.kubernetes.node_drain``), with a deadline as short as a spot
   instance's notice, then stopped. Serve starts a replacement on the spare worker and stops the drained replica
   ``drain_timeout_s`` before the deadline, its replacement running or not; the long streams started with the drain
   are still running then, and go on on the other replica (:mod:`deployments.resume`). No request fails and no
   stream breaks; the hook returns once no replica is left on the node.
3. :func:`lose_a_worker`: under six clients' load, one of the engines' workers loses every process at once (SIGKILL),
   as a machine does. Every request is answered: one that had not started streaming is routed or retried on the
   surviving replica, and a stream already running on the lost node goes on there from the tokens it had sent
   (:mod:`deployments.resume`); nothing hangs; the model answers afterwards.
4. :func:`lose_redis` twice: Redis, the GCS's store, SIGKILLed under load and started again 20 s later, first with
   its data (its append-only file), then empty (a Redis without a persistent volume). What the report shows: whether
   the GCS exited, what clients saw meanwhile, how long until the endpoint answered again, and whether Serve's
   applications and engine replicas came through. Last, because an empty Redis may cost the cluster.

The head goes first: its redeploy is what brings the model to the two replicas the other phases need, and the drain
and the node loss then also run against a head that took the cluster over from Redis. A phase that fails ends the
run (the cluster's state is then unknown); the report says which, with its traceback.

Long because it is one cluster's life: its nodes (:class:`Nodes`), its clients (:class:`Load`) and the phases
that use both read best in one place.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path

import httpx
import psutil

from tests.e2e.harness import RAY_AUTH_ENV, ROOT, free_port, http_status, run_phases, serve_document, wait_for

MODEL = "smollm2-135m-instruct"
LOAD_THREADS = 6
# The drain's clients: enough for requests in flight at its start and throughout, few enough that the replacement's
# start (on two cores shared with the engines) does not wait on them.
DRAIN_LOAD_THREADS = 3
ASK = [{"role": "user", "content": "Tell me about lighthouses."}]

# The head takes the machine's address (Ray turns 127.0.0.1 into it); every other node a loopback address of its
# own, so each node's HAProxy binds the same HTTP port on its own address.
HEAD_IP = "127.0.0.1"
ROUTER_NODE = "router"
WORKERS = ("w1", "w2", "w3")
NODE_IPS = {ROUTER_NODE: "127.0.0.2", "w1": "127.0.0.3", "w2": "127.0.0.4", "w3": "127.0.0.5"}
HEAD_GONE_S = 20  # how long the load runs with no head
# The drain's deadline, as short as a spot instance's notice: Serve stops the drained replica DRAIN_TIMEOUT_S (the
# model's drain_timeout_s) before it, its replacement running or not, and kills it at the deadline.
DRAIN_DEADLINE_S = 45
DRAIN_TIMEOUT_S = 10
# Streams started with the drain that are still running at its deadline: they go on elsewhere.
LONG_STREAMS, LONG_TOKENS = 4, 600
# How long a worker's raylet waits for the GCS to come back before it exits (Ray's default is 60 s); KubeRay sets
# it on worker pods when GCS fault tolerance is on.
GCS_RECONNECT_S = 600
# Redis gone this long under load, in each Redis phase.
REDIS_GONE_S = 20
# How long a Redis phase waits for the endpoint to answer again once Redis (and, if it exited, the head) is back.
RECOVERY_WAIT_S = 180
PHASES = ("head", "drain", "loss", "redis_kept", "redis_empty")
NODE_ENV = "RAYROUTE_TEST_NODE"  # which node (and which run) a process belongs to, inherited by all it starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-source", default="~/.cache/rayroute/models/smollm2-135m-instruct")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="Which phases to run, in their fixed order (default: all).")
    options = parser.parse_args(argv)
    chosen = options.phases.split(",")

    os.environ.update(RAY_AUTH_ENV)  # before Ray is imported: this process connects as a driver, as does the hook
    report: dict = {}
    nodes = Nodes()
    try:
        started = time.monotonic()
        nodes.start()
        args = app_args(options.model_source)
        args["routers"] = {"replicas": 1, "ray_resources": {"rayroute_router": 1}}
        args["models"][0]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
        nodes.deploy_first(args)
        report["started_seconds"] = round(time.monotonic() - started, 1)
        phases = {"head": lambda: lose_the_head(nodes, args), "drain": lambda: drain_a_worker(nodes),
                  "loss": lambda: lose_a_worker(nodes), "redis_kept": lambda: lose_redis(nodes, keep_data=True),
                  "redis_empty": lambda: lose_redis(nodes, keep_data=False)}
        run_phases(report, [(name, phases[name]) for name in PHASES if name in chosen], log)
    except Exception:
        report["error"] = traceback.format_exc()[-4000:]
    finally:
        nodes.shutdown()
    failed = "error" in report or any("error" in entry for entry in report.values() if isinstance(entry, dict))
    if failed:
        log(f"the nodes' logs are in {nodes.workdir}")
    else:
        shutil.rmtree(nodes.workdir, ignore_errors=True)
    print(json.dumps(report))
    return 1 if failed else 0


def lose_the_head(nodes: Nodes, args: dict) -> dict:
    """Every head process killed under load, the head started again, Serve back from Redis, then a redeploy."""
    report: dict = {}
    engines_before = replica_actors(nodes.gcs, "engine-")
    with Load(nodes.base, LOAD_THREADS) as traffic:
        time.sleep(8)  # traffic before the loss
        report["head_processes_killed"] = nodes.kill("head")
        killed_at = time.monotonic()
        time.sleep(HEAD_GONE_S)
        restarted_at = time.monotonic()
        nodes.restart_head()
        report["head_restart_seconds"] = time.monotonic() - restarted_at
        time.sleep(5)  # traffic after the head is back
        report["hung_threads"] = traffic.end()
    report["results"] = results = traffic.results
    report["while_head_gone"] = sum(1 for r in results if killed_at <= r["started_at"] < restarted_at)
    report["longest_gap_s"] = longest_gap(results)

    # Serve's controller is back with its applications from Redis, and takes a new config: a changed engine
    # argument and two replicas instead of one, as an operator's redeploy and a scale-up would ask.
    recovered = time.monotonic()
    with nodes.driver():
        from ray import serve

        from router.launch import deploy

        status = wait_for(lambda: serve.status().applications, 120, "Serve's controller")
        report["controller_back_seconds"] = time.monotonic() - recovered
        report["applications_when_back"] = {name: app.status for name, app in status.items()}
        # Recovering, the controller shows its applications DEPLOYING until it has found their replicas again.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: {app.status for app in serve.status().applications.values()} == {"RUNNING"}, 120,
                     "the applications running")
        report["applications_after_restart"] = {n: app.status for n, app in serve.status().applications.items()}
        report["running_again_seconds"] = time.monotonic() - recovered
        # Found again, not started again: a replaced engine would have cost its whole start.
        report["engine_replicas_kept"] = replica_actors(nodes.gcs, "engine-") == engines_before
        args["models"][0]["engine_args"]["max_num_seqs"] = 4
        args["models"][0]["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
        redeployed = time.monotonic()
        deploy(serve_document(args))
        report["redeploy_seconds"] = time.monotonic() - redeployed
        engine = next(name for name in serve.status().applications if name.startswith("engine-"))
        report["replicas_after_redeploy"] = dict(serve.status().applications[engine].deployments[engine].replica_states)
    report["after_status"] = answer(nodes.base)
    return report


def drain_a_worker(nodes: Nodes) -> dict:
    """The chart's preStop hook drains an engine's worker under load; then the node stops, as its pod would."""
    report: dict = {}
    with nodes.driver(), Load(nodes.base, DRAIN_LOAD_THREADS) as traffic:
        before = replica_nodes(nodes.gcs, "engine-")
        report["engine_nodes_before"] = sorted(nodes.name(node) for node in before)
        victim = next(node for node in before if nodes.name(node) in WORKERS)
        report["victim"] = nodes.name(victim)
        time.sleep(8)  # traffic on both replicas
        long_streams = [[] for _ in range(LONG_STREAMS)]
        streamers = [threading.Thread(target=long_stream, args=(nodes.base, i, long_streams[i]))
                     for i in range(LONG_STREAMS)]
        for streamer in streamers:
            streamer.start()
        time.sleep(2)  # the long streams under way on both replicas
        drain_started = time.monotonic()
        hook = subprocess.run([sys.executable, "-m", "deployments.kubernetes.node_drain", "--address", nodes.gcs,
                               "--node-id", victim, "--deadline-s", str(DRAIN_DEADLINE_S)],
                              # The hook finds its pod's one cluster by itself; this machine may have another.
                              env={**os.environ, "RAY_ADDRESS": nodes.gcs}, cwd=ROOT, capture_output=True, text=True,
                              timeout=DRAIN_DEADLINE_S + 60)
        report["drain_seconds"] = drain_seconds = time.monotonic() - drain_started
        report["hook_exit"], report["hook_output"] = hook.returncode, (hook.stdout + hook.stderr)[-3000:]
        after = replica_nodes(nodes.gcs, "engine-")
        report["engine_nodes_after"] = sorted(nodes.name(node) for node in after)
        report["victim_replicas_after"] = after.count(victim)
        # What Kubernetes does once the hook returned.
        report["victim_processes_stopped"] = nodes.stop(nodes.name(victim))
        time.sleep(10)  # traffic on the replacement
        report["hung_threads"] = traffic.end()
        for streamer in streamers:
            streamer.join(timeout=300)
        report["hung_threads"] += sum(streamer.is_alive() for streamer in streamers)
    report["long_streams"] = [found[0] if found else {} for found in long_streams]
    report["long_streams_moved"] = sum(line.get("migrations", 0) for line in nodes.access_lines("long-"))
    report["results"] = results = traffic.results
    report["in_flight_at_drain"] = sum(1 for r in results if r["started_at"] < drain_started < r.get("ended_at", 0))
    report["during_drain"] = sum(1 for r in results if drain_started <= r["started_at"] < drain_started + drain_seconds)
    report["after_status"] = answer(nodes.base)
    return report


def lose_redis(nodes: Nodes, keep_data: bool) -> dict:
    """Redis, the GCS's store, SIGKILLed under load and started again after REDIS_GONE_S: with its data (its
    append-only file, as a Redis with a persistent volume restarts) or empty (one without). A head whose GCS exited
    meanwhile is started again, as KubeRay restarts the head pod's container when its ``ray start`` exits. The phase
    ends when the endpoint answers again, or when no worker is left (a cluster that lost its state)."""
    report: dict = {}
    engines_before = replica_actors(nodes.gcs, "engine-")
    with Load(nodes.base, LOAD_THREADS) as traffic:
        time.sleep(5)  # traffic before the loss
        nodes.redis.kill()
        nodes.redis.wait()
        killed_at = time.monotonic()
        report["gcs_exited_after_s"] = None
        while time.monotonic() < killed_at + REDIS_GONE_S:
            if report["gcs_exited_after_s"] is None and not nodes.gcs_running():
                report["gcs_exited_after_s"] = round(time.monotonic() - killed_at, 1)
            time.sleep(0.5)
        if not keep_data:
            nodes.wipe_redis()
        nodes.start_redis()
        head_restart = time.monotonic()
        report["head_restarted"] = not nodes.gcs_running()
        if report["head_restarted"]:
            nodes.kill("head")  # what is left of it: KubeRay restarts the whole container
            nodes.restart_head()

        def answering() -> bool:
            return http_status(nodes.base + "/ready") == 200 and answer(nodes.base) == 200

        with contextlib.suppress(TimeoutError):  # either way, the report says what the cluster came to
            wait_for(lambda: answering() or nodes.alive_nodes() == ["head"], RECOVERY_WAIT_S,
                     "the endpoint answering, or no worker left")
        report["workers_left"] = [node for node in nodes.alive_nodes() if node != "head"]
        time.sleep(5)  # traffic after
        report["hung_threads"] = traffic.end()
    report["results"] = results = traffic.results
    report["while_redis_gone"] = sum(1 for r in results if killed_at <= r["started_at"] < head_restart)
    # Until the head restarts, only Ray's control plane is gone: the routers and engines serve on.
    report["failed_before_head_restart"] = sum(1 for r in results if r["ended_at"] < head_restart and not ok(r))
    report["failed_after_head_restart"] = sum(1 for r in results if r["ended_at"] >= head_restart and not ok(r))
    first_failure = min((r["ended_at"] for r in results if not ok(r)), default=None)
    report["first_failure_after_head_restart_s"] = (None if first_failure is None
                                                    else round(first_failure - head_restart, 1))
    report["longest_gap_s"] = round(longest_gap(results), 1)
    report["endpoint_answers"] = http_status(nodes.base + "/ready") == 200
    try:
        with nodes.driver():
            from ray import serve

            report["applications"] = {name: app.status for name, app in serve.status().applications.items()}
        report["engine_replicas_kept"] = replica_actors(nodes.gcs, "engine-") == engines_before
    except Exception as exc:  # a cluster that lost its state may not take a driver
        report["applications"] = f"no answer: {exc!r}"[:300]
    return report


def ok(result: dict) -> bool:
    """A request answered in full: 200, and a stream with all its tokens and no error event."""
    return (result.get("status") == 200 and result.get("done", False) and not result.get("error_event")
            and (not result.get("stream") or result.get("completion_tokens") == 24))


def lose_a_worker(nodes: Nodes) -> dict:
    """An engine's worker loses every process at once under load."""
    report: dict = {}
    with nodes.driver():
        engine_nodes, router_nodes = replica_nodes(nodes.gcs, "engine-"), replica_nodes(nodes.gcs, "OpenAIRouter")
    report["engine_nodes"] = sorted(nodes.name(node) for node in engine_nodes)
    report["router_nodes"] = sorted(nodes.name(node) for node in router_nodes)
    report["engines_spread"] = len(set(engine_nodes)) == 2
    # A worker holding an engine replica and not the router (losing the only router is a different failure: Serve
    # restarts it, but its streams are gone).
    victim = next(nodes.name(node) for node in engine_nodes if nodes.name(node) in WORKERS and node not in router_nodes)
    report["victim"] = victim
    with Load(nodes.base, LOAD_THREADS) as traffic:
        time.sleep(8)  # traffic on both replicas
        removed_at = time.monotonic()
        report["victim_processes_killed"] = nodes.kill(victim)
        time.sleep(20)
        report["hung_threads"] = traffic.end()
    report["results"] = results = traffic.results
    report["removed_after_requests"] = sum(1 for r in results if r["started_at"] < removed_at)
    report["after_status"] = answer(nodes.base)
    return report


class Nodes:
    """Redis and the cluster's nodes, each a real ``ray start`` whose processes carry a marker of their node."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:8]
        self.workdir = Path(tempfile.mkdtemp(prefix="rr-n-"))  # short: Ray's socket paths have a length limit
        self.redis_password = "rayroute-" + uuid.uuid4().hex[:12]
        self.redis_port, gcs_port, http_port = free_port(), free_port(), free_port()
        self.gcs = f"{HEAD_IP}:{gcs_port}"
        self.base = f"http://{NODE_IPS[ROUTER_NODE]}:{http_port}"
        self.http_port = http_port
        self.redis: subprocess.Popen | None = None
        self.ids: dict[str, str] = {}  # Ray's node id by node name
        self.head_env = self.node_env("head", HEAD_IP, {"RAY_REDIS_ADDRESS": f"{HEAD_IP}:{self.redis_port}",
                                                        "RAY_external_storage_namespace": f"rayroute-{self.run}"})
        # Each node has a temp dir of its own, as a pod has (see :meth:`ray_start`).
        self.head_command = ["ray", "start", "--head", f"--port={gcs_port}", f"--temp-dir={self.workdir / 'head'}",
                             "--num-cpus=0", f"--redis-password={self.redis_password}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={free_port()}", "--disable-usage-stats",
                             *node_ports(10002, 11999)]

    def start(self) -> None:
        self.start_redis()
        self.ray_start("head", self.head_command, self.head_env)
        # One after another: a raylet waits a fixed 30 s for its agents, which several starting at once on two busy
        # cores can miss.
        for number, name in enumerate(NODE_IPS):
            self.start_worker(number, name)
        with self.driver():
            import ray

            wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 1 + len(NODE_IPS), 120, "every node")
            by_ip = {ip: name for name, ip in NODE_IPS.items()}
            self.ids = {by_ip.get(n["NodeManagerAddress"], "head"): n["NodeID"] for n in ray.nodes() if n["Alive"]}
        missing = set(NODE_IPS) - set(self.ids)
        if missing:
            raise RuntimeError(f"nodes not in the cluster: {sorted(missing)}")

    def start_redis(self) -> None:
        """Redis as the chart asks for it: a password, and every write kept in an append-only file (fsynced each
        second), so a restarted Redis has the GCS's state back."""
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", HEAD_IP, "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--requirepass", self.redis_password, "--dir", str(self.workdir / "redis")],
            stdout=(self.workdir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        wait_for(lambda: subprocess.run(["redis-cli", "-h", HEAD_IP, "-p", str(self.redis_port), "--no-auth-warning",
                                         "-a", self.redis_password, "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", 30, "Redis")

    def wipe_redis(self) -> None:
        """Redis's data gone, as with a Redis restarted without a persistent volume."""
        shutil.rmtree(self.workdir / "redis", ignore_errors=True)

    def gcs_running(self) -> bool:
        return any(_running(p) and "gcs_server" in p.name() for p in self.processes("head"))

    def alive_nodes(self) -> list[str]:
        """The nodes whose raylet still runs."""
        return [node for node in ("head", *NODE_IPS)
                if any(_running(p) and p.name() == "raylet" for p in self.processes(node))]

    def start_worker(self, number: int, name: str) -> None:
        ip = NODE_IPS[name]
        resources = '{"rayroute_router": 10}' if name == ROUTER_NODE else "{}"
        command = ["ray", "start", f"--address={self.gcs}", f"--node-ip-address={ip}", "--num-cpus=1",
                   f"--resources={resources}", f"--temp-dir={self.workdir / name}", "--disable-usage-stats",
                   *node_ports(12000 + 1500 * number, 13499 + 1500 * number)]
        env = self.node_env(name, ip, {"RAY_gcs_rpc_server_reconnect_timeout_s": str(GCS_RECONNECT_S)})
        self.ray_start(name, command, env)

    def ray_start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        """Start the node, again if it did not start in time (a raylet waits a fixed 30 s for the GCS and its agents,
        which a machine busy with other work can miss), after killing what the failed start left."""
        for attempt in range(3):
            # `ray start --head` refuses to start where its last start's address file names a GCS that a local
            # process (here a worker's raylet) still points at; a new head pod has no such file.
            (self.workdir / name / "ray_current_cluster").unlink(missing_ok=True)
            try:
                ray_start(command, env, self.workdir / f"{name}.log")
                return
            except RuntimeError as exc:
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                log(f"{name} did not start in time; trying again")
                self.kill(name)

    def deploy_first(self, args: dict) -> None:
        """Serve with an HTTP proxy on every node, the routers, then the model."""
        with self.driver():
            from ray import serve

            from router.launch import deploy

            serve.start(http_options={"host": HEAD_IP, "port": self.http_port}, proxy_location="EveryNode")
            # The routers first, with the model at no replica: an engine replica placed before them could take the
            # router node's one CPU, which the router needs.
            idle = copy.deepcopy(args)
            idle["models"][0]["autoscaling"] = {"min_replicas": 0, "max_replicas": 1}
            deploy(serve_document(idle))
            deploy(serve_document(args))
        wait_for(lambda: http_status(self.base + "/ready") == 200, 300, f"{self.base}/ready")

    def name(self, node_id: str) -> str:
        return next((name for name, known in self.ids.items() if known == node_id), node_id)

    def access_lines(self, request_id_prefix: str) -> list[dict]:
        """The router's access-log lines of the requests whose id starts with ``request_id_prefix``: the router
        replica writes them to its stderr, which Ray points at a file of its worker logs (found from the process)."""
        files = set()
        for process in self.processes(ROUTER_NODE):
            with contextlib.suppress(psutil.Error, OSError):
                if any("OpenAIRouter" in part for part in process.cmdline()):
                    files.add(os.readlink(f"/proc/{process.pid}/fd/2"))
        lines = {}
        for path in files:
            for text in Path(path).read_text(errors="replace").splitlines():
                start = text.find('{"request_id": "' + request_id_prefix)
                if start >= 0:
                    with contextlib.suppress(ValueError):
                        line = json.loads(text[start:])
                        lines[line["request_id"]] = line
        return list(lines.values())

    def node_env(self, node: str, ip: str, extra: dict[str, str]) -> dict[str, str]:
        """A node's environment: Serve as `make serve` and the chart run it, HAProxy on this node's own address and
        free ports, the Serve HA timeouts, and the marker :meth:`kill` finds its processes by."""
        from router.launch import ray_process_env, ray_runtime_env

        return {**os.environ, **RAY_AUTH_ENV, **ray_process_env(ip), **extra, NODE_ENV: f"{node}-{self.run}",
                "PYTHONPATH": ray_runtime_env()["env_vars"]["PYTHONPATH"], "RAY_DEDUP_LOGS": "0"}

    def restart_head(self) -> None:
        self.ray_start("head", self.head_command, self.head_env)

    @contextlib.contextmanager
    def driver(self):
        """This process connected to the cluster, on the head's node, and disconnected again (a driver on a node
        that dies dies with it)."""
        import ray

        from router.launch import ray_runtime_env

        ray.init(address=self.gcs, log_to_driver=False, runtime_env=ray_runtime_env())
        try:
            yield
        finally:
            ray.shutdown()

    def processes(self, node: str) -> list[psutil.Process]:
        """Every process of the node: those that inherited its marker from `ray start`, those that name its temp dir
        (the raylet starts its agents with an environment of their own, and they may outlive it), and everything
        they started."""
        marker, temp_dir = f"{node}-{self.run}", f"{self.workdir / node}/"
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.pid != os.getpid() and (process.environ().get(NODE_ENV) == marker
                                                   or any(temp_dir in arg for arg in process.cmdline())):
                    found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
        return list(found.values())

    def kill(self, node: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Signal every process of the node; the number signalled."""
        doomed = self.processes(node)
        for process in doomed:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)
        return len(doomed)

    def stop(self, node: str, grace_s: float = 30) -> int:
        """Stop the node as Kubernetes stops a pod: SIGTERM, then SIGKILL for what is left after ``grace_s``; the
        number of processes it had."""
        stopping = self.processes(node)
        for process in stopping:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        deadline = time.monotonic() + grace_s
        while (left := [p for p in stopping if _running(p)]) and time.monotonic() < deadline:
            time.sleep(1)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        return len(stopping)

    def shutdown(self) -> None:
        for node in ("head", *NODE_IPS):
            self.kill(node)
        if self.redis:
            self.redis.kill()


class Load:
    """``count`` clients sending :func:`load` until :meth:`end` (or the ``with`` block's end)."""

    def __init__(self, base: str, count: int) -> None:
        self.results: list[dict] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=load, args=(base, i, self.stop, self.results)) for i in range(count)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def end(self) -> int:
        """Stop the clients once their requests end; how many did not within 200 s."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=200)
        return sum(thread.is_alive() for thread in self.threads)

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()


def app_args(source: str) -> dict:
    engine_args = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024,
                   "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 8}
    return {"models": [{
        "id": MODEL, "source": source, "engine_args": engine_args,
        "resources": {"accelerator": "cpu", "cpus": 1},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "drain_timeout_s": DRAIN_TIMEOUT_S,
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"},
    }]}


def replica_nodes(address: str, deployment_prefix: str) -> list[str]:
    """The node of each live replica of the deployments whose name starts with ``deployment_prefix``."""
    return list(replica_actors(address, deployment_prefix).values())


def replica_actors(address: str, deployment_prefix: str) -> dict[str, str]:
    """Each live replica's actor id and node of the deployments whose name starts with ``deployment_prefix``, in the
    cluster at ``address`` (Ray's state API would otherwise look for the cluster on this machine, and may find two)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    # A replica's actor class is "ServeReplica:<application>:<deployment>"; each model is an application.
    return {a.actor_id: a.node_id for a in actors
            if a.class_name.startswith("ServeReplica:") and a.class_name.split(":")[2].startswith(deployment_prefix)}


def load(base: str, index: int, stop: threading.Event, results: list[dict]) -> None:
    """Back-to-back requests, alternating streaming and not, each recorded with how it ended."""
    number = 0
    with httpx.Client(timeout=180) as client:
        while not stop.is_set():
            stream = (index + number) % 2 == 0
            number += 1
            body = {"model": MODEL, "messages": ASK, "max_tokens": 24, "ignore_eos": True, "stream": stream}
            result = {"thread": index, "stream": stream, "started_at": time.monotonic()}
            try:
                if stream:
                    result.update(read_stream(client, base, body))
                else:
                    response = client.post(base + "/v1/chat/completions", json=body)
                    result["status"] = response.status_code
                    result["done"] = response.status_code == 200
            except httpx.HTTPError as exc:
                result["exception"] = repr(exc)
            result["ended_at"] = time.monotonic()
            results.append(result)
            if not ok(result):
                stop.wait(0.5)  # a client backs off instead of hammering an endpoint that is down


def long_stream(base: str, index: int, results: list[dict]) -> None:
    """One stream of LONG_TOKENS tokens (a prompt of its own), recorded with how it ended."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me story number {index}."}],
            "max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=180, headers={"X-Request-Id": f"long-{index}"}) as client:
        try:
            results.append(read_stream(client, base, body))
        except httpx.HTTPError as exc:
            results.append({"exception": repr(exc)})


def read_stream(client: httpx.Client, base: str, body: dict) -> dict:
    """A streamed chat completion as its client saw it: status, content events, error events, usage, [DONE]."""
    events = []
    with client.stream("POST", base + "/v1/chat/completions",
                       json={**body, "stream_options": {"include_usage": True}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    chunks = [json.loads(e) for e in events if e.startswith("{")]
    return {"status": response.status_code,
            "tokens": sum(1 for c in chunks for choice in c.get("choices", []) if choice["delta"].get("content")),
            "error_event": any("error" in c for c in chunks),
            "completion_tokens": next((c["usage"]["completion_tokens"] for c in chunks if c.get("usage")), None),
            "done": bool(events) and events[-1] == "[DONE]"}


def answer(base: str) -> int:
    """The status of one short request, after a phase."""
    return httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4},
                      timeout=120).status_code


def longest_gap(results: list[dict]) -> float:
    """The longest time with no request completing successfully, from the first success to the last."""
    ends = sorted(r["ended_at"] for r in results if r.get("status") == 200 and r.get("done")
                  and not r.get("error_event"))
    return max((b - a for a, b in zip(ends, ends[1:], strict=False)), default=0.0)


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


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an exited process its parent has not reaped yet)."""
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} nodes: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
