"""What the tests, the benchmark (``tests/bench.py``) and the load script (``tests/load.py``) share: the e2e
cluster's configuration and names, starting ``make serve``'s launcher and stopping it cleanly, waiting for a server,
and the arithmetic of their reports. ``conftest.py`` holds only fixtures and hooks; everything here is imported.

Two ways of starting Ray remain, on purpose: the launcher in a subprocess, exactly as ``make serve`` runs it (the
shared e2e cluster, the chart's serve test, the benchmark), and an in-process Ray where a script must shape the
cluster itself (the load script's two-CPU node with a model-free engine; the node-failure script's three raylets).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import yaml

from deployments.replies import Chunk
from router import processes
from router.ports import free_port
from router.ray_auth import RAY_AUTH_ENV  # conftest sets it before any test module imports Ray

__all__ = ["free_port", "RAY_AUTH_ENV"]  # the launcher's, shared

ROOT = Path(__file__).resolve().parent.parent
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
ROUTER_REPLICAS = 2
ALIAS = "gpt-4o-mini"
METRICS_ALIAS = "metrics-probe"  # a name only the metrics tests use, so their counters see no other traffic
EMBEDDING_MODEL = "all-minilm-l6-v2"
MAX_REQUEST_BYTES = 1024 * 1024
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

        from deployments.config import engine_deployment_name

        self.connect()
        name = engine_deployment_name(model_id)  # each model's application is named as its deployment
        return serve.get_deployment_handle(name, app_name=name)

    def engine_info(self, model_id: str) -> dict:
        """Ask an engine replica directly, through Ray, what it is running."""
        return self.engine_handle(model_id).engine_info.remote().result(timeout_s=30)

    def replica_infos(self, model_id: str, count: int) -> dict[int, dict]:
        """:meth:`engine_info` of each of the model's ``count`` replicas, by process id: Serve picks the replica
        of each call, so this asks until it has heard from that many (both of two within 60 calls, or it fails)."""
        infos: dict[int, dict] = {}
        for _ in range(60):
            info = self.engine_info(model_id)
            infos[info["pid"]] = info
            if len(infos) == count:
                return infos
        raise AssertionError(f"heard from {len(infos)} of {model_id}'s {count} replicas")

    def replicas(self, model_id: str) -> dict[str, int]:
        """The model's replicas by state (RUNNING, STARTING, STOPPING, ...), as Serve reports them."""
        from ray import serve

        from deployments.config import engine_deployment_name

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
    - a copy with two replicas serving two adapters, one at a time each (Serve's multiplexing);
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
    models.append({**first, "id": ELASTIC_MODEL, "aliases": [], "resources": one_cpu, "drain_timeout_s": 120,
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
    # each must go to the replica holding it.
    pirate = first["adapters"][PIRATE_ADAPTER]
    models.append({**first, "id": PAIR_MODEL, "aliases": [], "resources": one_cpu,
                   "adapters": {name: pirate for name in PAIR_ADAPTERS}, "max_adapters_per_replica": 1,
                   "autoscaling": {"min_replicas": 2, "max_replicas": 2}})
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


# --- the router without Ray: stand-ins for Serve handles, for unit tests --------------------------------------

class Hang:
    """A step that never completes (a replica that never answers)."""


class FakeStream:
    """A Serve streaming call's response: yields its steps; a :class:`Hang` waits forever, an exception is raised.

    As the engine's streams do (:mod:`deployments.stream_channel`), a stream's first chunk names a channel and the
    steps after it come on that channel: a :class:`FakeChannel` that :class:`FakeChannels` opens. So a script is
    written as the events in order, and the router relays them the one way it relays a real engine's."""

    def __init__(self, steps: list[Any]):
        self.steps = list(steps)
        self.cancelled = False
        self.failed: BaseException | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if not self.steps:
            raise StopAsyncIteration
        step = self.steps.pop(0)
        if isinstance(step, Hang):
            await asyncio.sleep(3600)
        if isinstance(step, BaseException):
            self.failed = step
            raise step
        if isinstance(step, Chunk) and step.channel is None:
            url = f"{FAKE_CHANNEL_SCHEME}{next(_channel_ids)}"
            _offered[url] = FakeChannel(self.steps)
            self.steps = []
            return replace(step, channel=url)
        return step

    def cancel(self) -> None:
        self.cancelled = True
        if self.failed is not None:  # as Ray's handle does: cancelling a failed call raises its error again
            raise self.failed


FAKE_CHANNEL_SCHEME = "fake-channel://"
_channel_ids = itertools.count()
_offered: dict[str, FakeChannel] = {}  # by URL, until the router opens it


class FakeChannel:
    """A stream's channel (:class:`router.channel_client.Channel`) playing a script's steps after its first chunk:
    each chunk's text with its counts; a :class:`Hang` waits until the stream runs out of time (:meth:`expire`);
    an exception is raised as a broken channel's error is."""

    def __init__(self, steps: list[Any]):
        self.steps = list(steps)
        self.prompt_tokens = self.completion_tokens = 0
        self.expired = asyncio.Event()
        self.closed = False

    async def read(self) -> bytes:
        while self.steps:
            step = self.steps.pop(0)
            if isinstance(step, Hang):
                await self.expired.wait()
            if self.expired.is_set():
                raise TimeoutError
            if isinstance(step, BaseException):
                raise step
            self.prompt_tokens, self.completion_tokens = step.prompt_tokens, step.completion_tokens
            if step.data:
                return step.data.encode()
        return b""

    def expire(self) -> None:
        self.expired.set()

    def close(self) -> None:
        self.closed = True


class FakeChannels:
    """The router's channel client (:class:`router.channel_client.ChannelClient`) for :class:`FakeStream`'s
    channels; any other URL (a real channel server's) is opened by a real client."""

    def __init__(self) -> None:
        self.real: Any = None

    async def open(self, url: str) -> Any:
        if url.startswith(FAKE_CHANNEL_SCHEME):
            return _offered.pop(url)
        if self.real is None:
            from router.channel_client import ChannelClient

            self.real = ChannelClient()
        return await self.real.open(url)

    async def close(self) -> None:
        if self.real is not None:
            await self.real.close()


class FakeHandle:
    """Stands in for a model's ``DeploymentHandle``: ``handle.options(stream=True).<endpoint>.remote(body)`` returns
    a :class:`FakeStream` of what ``answer(endpoint, body)`` gives; every call and stream is kept, and the handle
    options each call was made with (``multiplexed_model_id``)."""

    def __init__(self, answer: Callable[[str, dict], list[Any]]):
        self.answer = answer
        self.calls: list[tuple[str, dict]] = []
        self.streams: list[FakeStream] = []
        self.call_options: list[dict[str, Any]] = []
        self.chosen: dict[str, Any] = {}

    @classmethod
    def scripted(cls, *scripts: list[Any]) -> FakeHandle:
        """The n-th call plays the n-th script (the last one repeats)."""
        handle = cls(lambda endpoint, body: list(scripts[min(len(handle.calls), len(scripts)) - 1]))
        return handle

    def options(self, **options: Any) -> FakeHandle:
        optioned = copy.copy(self)  # shares the lists of calls and streams, as Serve's handles share a router
        optioned.chosen = {**self.chosen, **options}
        return optioned

    def __getattr__(self, endpoint: str) -> SimpleNamespace:
        if endpoint.startswith("_"):  # not an endpoint: what copy and pickle look for
            raise AttributeError(endpoint)

        def remote(body: dict) -> FakeStream:
            self.calls.append((endpoint, body))
            self.call_options.append(self.chosen)
            self.streams.append(FakeStream(self.answer(endpoint, body)))
            return self.streams[-1]

        return SimpleNamespace(remote=remote)


class LocalLimits:
    """:class:`router.limits.KeyLimits` behind the same ``.method.remote()`` calls a Serve handle takes."""

    def __init__(self) -> None:
        from router.limits import KeyLimits

        self.limits = KeyLimits()

    def __getattr__(self, method: str) -> SimpleNamespace:
        async def result(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.limits, method)(*args, **kwargs)

        def remote(*args: Any, **kwargs: Any) -> Any:
            return result(*args, **kwargs) if method == "admit" else getattr(self.limits, method)(*args, **kwargs)

        return SimpleNamespace(remote=remote)


MESSAGES = [{"role": "user", "content": "hi"}]
ROUTER_KEYS = [
    {"name": "free", "key": "sk-free-0000-0123456789", "models": ["gpt-4o-mini"], "requests_per_minute": 2},
    {"name": "tokens", "key": "sk-tokens-00-0123456789", "tokens_per_minute": 10},
    {"name": "admin", "key": "sk-admin-000-0123456789"},
]


def router_config(others: tuple[str, ...] = (), **model: Any) -> dict[str, Any]:
    """One model, ``chat-a`` (alias ``gpt-4o-mini``), with ``model``'s settings; and plain ones named ``others``."""
    return {"models": [{"id": "chat-a", "aliases": ["gpt-4o-mini"], **model},
                       *({"id": name} for name in others)]}


def router_client(handle: FakeHandle, monkeypatch: Any, others: dict[str, FakeHandle] | None = None,
                  **model: Any) -> Any:
    """A TestClient on a real router whose model ``chat-a`` (:func:`router_config`) is ``handle`` and whose
    ``others`` models are theirs, with :data:`ROUTER_KEYS` and per-key limits kept in this process."""
    from fastapi.testclient import TestClient

    from router.ingress import OpenAIRouter, build_http_app

    monkeypatch.setenv("RAYROUTE_API_KEYS", json.dumps(ROUTER_KEYS))
    others = others or {}
    router = OpenAIRouter(router_config(tuple(others), **model), {"chat-a": handle, **others}, LocalLimits(),
                          channels=FakeChannels())
    return TestClient(build_http_app(router), raise_server_exceptions=False)


def chat(client: Any, key: str = "sk-admin-000-0123456789", **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES, **body},
                       headers={"Authorization": f"Bearer {key}"})


def sse_events(text: str) -> list[Any]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def model_entry(document: dict, folder: str) -> dict:
    """The config's first model with its engine settings, served from ``folder`` under that folder's name (without
    the first model's adapters, which are made for its weights)."""
    from deployments.dev.local_models import ensure_model

    first = document["applications"][0]["args"]["models"][0]
    return {**first, "id": folder, "aliases": [], "adapters": {}, "source": str(ensure_model(folder)),
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


# --- timing a stream as a client sees it -----------------------------------------------------------------------

@dataclass
class StreamTiming:
    """One streamed response as its client saw it: when each server-sent event arrived, on the client's clock.
    The benchmark and the load script time streams with this one reader (:func:`read_stream`), so their TTFT and
    gap figures mean the same thing. Reading costs a count per socket read and no parsing, so a thousand streams in
    one client process measure the server, not the client; what is parsed is parsed after the stream ended."""

    started: float = 0.0  # request sent
    ended: float = 0.0  # response over (or failed)
    # One per event (its closing blank line), the time of the socket read that brought it: events that arrived
    # together share a time.
    arrivals: list[float] = field(default_factory=list)
    head: bytes = b""  # the start of the stream, through its first event (at most 8 kB)
    tail: bytes = b""  # its last 1 kB: the last chunk and ``data: [DONE]``
    events: list[bytes] | None = None  # every event's bytes, in order, if the caller asked for them ([] to ask)

    @property
    def first_at(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def ttft(self) -> float | None:
        """Request sent → first event in."""
        return self.arrivals[0] - self.started if self.arrivals else None

    def gaps(self) -> list[float]:
        """Between consecutive events, without the last (to ``[DONE]``, sent right after the last token, so it
        says nothing of the token cadence)."""
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:-1], strict=False)]


async def read_stream(chunks: AsyncIterator[bytes], timing: StreamTiming) -> None:
    """Read a response body to its end into ``timing``, stamping each event as the read that completes it comes."""
    pending = b""
    async for data in chunks:
        now = time.perf_counter()
        ends = (timing.tail[-1:] + data).count(b"\n\n")  # an event's end may straddle two reads
        if ends:
            timing.arrivals.extend([now] * ends)
        if len(timing.head) < 8192 and b"\n\n" not in timing.head:
            timing.head += data
        timing.tail = (timing.tail + data)[-1024:]
        if timing.events is not None:
            *complete, pending = (pending + data).split(b"\n\n")
            timing.events.extend(complete)


# --- reports ----------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU the processes have used so far (those that are gone count 0)."""
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy: beside ours, this shows any other work that shared the cores."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


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


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
