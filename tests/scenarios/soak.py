"""Soak: a cluster under mixed traffic for half an hour, with every rayroute process's memory and the exported metric
series sampled throughout, to show that neither grows with time nor with what clients send.

    python -m tests.scenarios.soak [--minutes 30] [--sample-s 60] [--url URL --metrics-port PORT [--api-key KEY]]

Why: a leak per request (a buffer kept after a stream its client closed, a task left behind by a refused request,
a metric series per model name a client typed) is invisible in a test that lasts seconds; over thousands of requests
it is a process that grows until the machine ends it. Only time under traffic shows it.

Without ``--url`` it starts configs/local.yaml (``--config``) with ``make serve``'s launcher, its keys in a file as
the e2e cluster has them, and stops it at the end; with ``--url`` it soaks a cluster already running (``--api-key``
one of its keys, default ``$RAYROUTE_API_KEY``): tests/e2e/test_soak.py runs two minutes of it on the shared cluster.

Traffic: :data:`CLIENTS` threads, each sending back to back with a short think time, alternating a request that
generates (a stream, a whole answer, the config's first LoRA adapter, a stream the client closes after 2-3 events)
with a bad one (a body that is not JSON, an unknown model whose name is new each time, a wrong key, ``n`` too large,
malformed ``messages``), which must be a 4xx in OpenAI's error envelope. Each request's kind, status, duration,
``[DONE]`` and error events are kept; one without a byte for :data:`REQUEST_TIMEOUT_S` has hung.

Samples, every ``--sample-s``: the RSS (and USS) of each process of the cluster's session (the launcher's, which its
Ray daemons, replicas and engine cores share), by kind (:func:`process_kind`), summed and of the largest process; and
the series on Ray's metrics port: all, ``ray_rayroute_``, and those naming an unknown model (none may).

Verdict (:func:`verdict`): warm-up samples dropped (the first 20%, at least 2), a kind's growth is the mean of the
last third minus that of the middle third, flat under max(32 MiB, 5%); series, the last count minus the first after
warm-up. Prints a table per sample, then one JSON report on its last line; exits 1 on a failed request or growth.

Long because it is one run's life: the clients, the sampler and the verdict read best in one place, and the pure
parts (:func:`process_kind`, :func:`verdict`, :func:`table`) are the ones the e2e test reuses on the report.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from router.auth import API_KEYS_ENV, API_KEYS_FILE_ENV
from tests.e2e.harness import API_KEY, QUICK_STOP_ENV, ROOT, keys_file, launched

CLIENTS = 4
THINK_S = (0.1, 0.5)
MAX_TOKENS = 24  # short answers: a CPU engine keeps up with four clients
REQUEST_TIMEOUT_S = 120
# Each wrong key takes one of the client address's failed-key allowance (router/auth_throttle.py: 10, one back every
# 6 s); one every 15 s leaves it full, so the shared cluster's later tests still get 401, not 429.
WRONG_KEY_EVERY_S = 15
UNKNOWN_PREFIX = "soak-no-such-model-"
GOOD = ("stream", "complete", "adapter", "cancel")
BAD = ("bad_json", "bad_model", "bad_key", "bad_n", "bad_messages")
PROMPTS = ("Tell me about lighthouses.", "Name three rivers.", "What is a soak test?", "Write a haiku about rain.")
MIB = 1024 * 1024


def process_kind(command: str) -> str:
    """Which process of a cluster ``command`` (its command line, or the title Ray and vLLM give it) is. Ray names an
    actor's process ``ray::<class>``, a Serve replica's class being ``ServeReplica:<app>:<deployment>``; vLLM names
    its engine core ``VLLM::EngineCore`` and the engine core's worker (which holds the weights and the KV cache)
    ``VLLM::Worker``; the daemons are binaries, whose flags name one another."""
    executable = os.path.basename(command.split(" ", 1)[0])
    if executable in ("gcs_server", "raylet", "haproxy"):
        return "gcs" if executable == "gcs_server" else executable
    if "EngineCore" in command:
        return "engine_core"
    if command.startswith("VLLM::Worker"):
        return "engine_worker"
    if "ServeReplica:" in command:
        deployment = command.split("ServeReplica:", 1)[1].split(":", 1)[-1]
        if "OpenAIRouter" in deployment:
            return "router"
        if "KeyLimits" in deployment or deployment.startswith("key-limits"):
            return "key_limits"
        return "engine" if deployment.startswith("engine-") else "other"
    for marker, kind in (("ServeController", "controller"), ("HAProxyManager", "proxy"), ("ProxyActor", "proxy"),
                         ("PrefixTreeActor", "prefix_tree"), ("dashboard/agent.py", "agent"),
                         ("ray::DashboardAgent", "agent"), ("ray::RuntimeEnvAgent", "agent"),
                         ("dashboard/dashboard.py", "dashboard"), ("ray-dashboard-", "dashboard"),
                         ("ray.dashboard", "dashboard"), ("monitor.py", "ray_monitor"),
                         ("router.launch", "launcher"), ("ray::IDLE", "idle_worker")):
        if marker in command:
            return kind
    return "other"


def cluster_session(metrics_port: int) -> int | None:
    """The session of the cluster whose metrics are on ``metrics_port``: that of its dashboard agent and raylet, whose
    flags name the port. None: not found here."""
    flag = re.compile(rf"metrics[-_]export[-_]port={metrics_port}\b")
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if flag.search(" ".join(process.info["cmdline"] or ())):
                return os.getsid(process.pid)
    return None


def sample_memory(session: int | None) -> dict[str, dict[str, float]]:
    """Per kind: its processes, their RSS and USS summed, and the largest RSS (MiB). The session's processes; without
    one, every process of a known kind on the machine."""
    kinds: dict[str, dict[str, float]] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if session is not None and os.getsid(process.pid) != session:
                continue
            kind = process_kind(" ".join(process.info["cmdline"] or ()))
            if session is None and kind == "other":
                continue
            rss = process.memory_info().rss / MIB
            uss = process.memory_full_info().uss / MIB  # smaps_rollup: cheap
        except (psutil.Error, OSError):
            continue
        entry = kinds.setdefault(kind, {"processes": 0, "rss": 0.0, "rss_max": 0.0, "uss": 0.0})
        entry["processes"] += 1
        entry["rss"] += rss
        entry["uss"] += uss
        entry["rss_max"] = max(entry["rss_max"], rss)
    return {kind: {k: round(v, 1) for k, v in entry.items()} for kind, entry in sorted(kinds.items())}


def sample_series(metrics_port: int) -> dict[str, int | None]:
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {"series": None, "rayroute_series": None, "unknown_model_series": None}
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {"series": len(lines), "rayroute_series": sum(line.startswith("ray_rayroute_") for line in lines),
            "unknown_model_series": sum(UNKNOWN_PREFIX in line for line in lines)}


@dataclass
class Result:
    kind: str
    at_s: float  # since the soak began
    seconds: float = 0.0
    status: int | None = None  # None: no answer
    streamed: bool = False
    events: int = 0  # SSE data events, [DONE] included
    done: int = 0  # `data: [DONE]` events
    error_events: int = 0
    envelope: bool | None = None  # an error answer in OpenAI's envelope
    error: str | None = None  # the client's side: "timeout" (hung) or a transport error


def is_envelope(body: bytes) -> bool:
    with contextlib.suppress(ValueError):
        document = json.loads(body)
        error = document.get("error") if isinstance(document, dict) else None
        return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()
    return False


class Traffic:
    """The client threads, from :meth:`start` until :meth:`finish`; their requests' :class:`Result` in ``results``."""

    def __init__(self, base_url: str, api_key: str | None, model: str, adapter: str):
        self.base_url, self.api_key, self.model, self.adapter = base_url, api_key, model, adapter
        self.results: list[Result] = []
        self.began = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # Without keys any key is accepted: nothing to send wrong.
        self._bad = itertools.cycle(BAD if api_key else [k for k in BAD if k != "bad_key"])
        self._wrong_key_at = -math.inf
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> int:
        """Stop after the requests under way; returns how many clients did not end in time (hung)."""
        self._stop.set()
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 30
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self._threads)

    def _next_bad(self) -> str:
        with self._lock:
            kind = next(self._bad)
            if kind == "bad_key":
                if time.monotonic() - self._wrong_key_at < WRONG_KEY_EVERY_S:
                    return next(self._bad)
                self._wrong_key_at = time.monotonic()
            return kind

    def _client(self, index: int) -> None:
        good = itertools.islice(itertools.cycle(GOOD), index, None)  # each client starts elsewhere in the cycle
        with httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10)) as client:
            while not self._stop.is_set():
                for kind in (next(good), self._next_bad()):
                    self.results.append(self._send(client, kind))
                    if self._stop.wait(random.uniform(*THINK_S)):
                        return

    def _request(self, kind: str) -> tuple[bytes, str | None]:
        """The body and the API key of a request of ``kind``."""
        body: dict[str, Any] = {"model": self.adapter if kind == "adapter" else self.model, "max_tokens": MAX_TOKENS,
                                "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                                "stream": kind in ("stream", "cancel")}
        key = self.api_key
        if kind == "bad_json":
            return b'{"model": "' + self.model.encode() + b'", "messages": [', key
        if kind == "bad_model":  # a new name each time: a series per name would show as growth
            body["model"] = UNKNOWN_PREFIX + uuid.uuid4().hex[:12]
        elif kind == "bad_key":
            key = "sk-wrong-" + uuid.uuid4().hex
        elif kind == "bad_n":
            body["n"] = 1000
        elif kind == "bad_messages":
            body["messages"] = [{"role": "wizard", "content": ["not", "parts"]}]
        return json.dumps(body).encode(), key

    def _send(self, client: httpx.Client, kind: str) -> Result:
        content, key = self._request(kind)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        began = time.monotonic()
        result = Result(kind, at_s=round(began - self.began, 2))
        cancel_after = random.randint(2, 3)
        try:
            with client.stream("POST", "/v1/chat/completions", content=content, headers=headers) as response:
                result.status = response.status_code
                result.streamed = response.headers.get("content-type", "").startswith("text/event-stream")
                if not result.streamed:
                    response.read()
                    if response.status_code >= 400:
                        result.envelope = is_envelope(response.content)
                for line in response.iter_lines() if result.streamed else ():
                    if line.startswith("data:"):
                        data = line[5:].strip()
                        result.events += 1
                        result.done += data == "[DONE]"
                        result.error_events += data.startswith('{"error"')
                        if kind == "cancel" and result.events >= cancel_after:
                            break  # leaving the block closes the connection: the client went away
        except httpx.TimeoutException:
            result.error = "timeout"
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:200]
        result.seconds = round(time.monotonic() - began, 3)
        return result


def problem(result: Result) -> str | None:
    """What is wrong with one request's outcome, if anything."""
    if result.error:
        return result.error
    if result.status is not None and result.status >= 500:
        return f"HTTP {result.status}"
    if result.kind in BAD and not (result.status and 400 <= result.status < 500 and result.envelope):
        return f"HTTP {result.status}, envelope {result.envelope}"
    if result.kind in GOOD and result.status != 200:
        return f"HTTP {result.status}"
    if result.error_events:
        return f"{result.error_events} error events"
    if result.streamed and result.kind != "cancel" and result.done != 1:
        return f"{result.done} [DONE] in {result.events} events"
    return None


def summarize(results: list[Result]) -> dict[str, dict[str, Any]]:
    """Per request kind: counts by status (``None``: no answer), hung, broken streams, answers without envelope."""
    summary = {}
    for kind in GOOD + BAD:
        mine = [r for r in results if r.kind == kind]
        seconds = sorted(r.seconds for r in mine) or [None]
        summary[kind] = {
            "count": len(mine), "statuses": dict(Counter(str(r.status) for r in mine)),
            "hung": sum(r.error == "timeout" for r in mine),
            "client_errors": sum(r.error not in (None, "timeout") for r in mine),
            "error_events": sum(r.error_events for r in mine),
            "without_envelope": sum(r.status is not None and r.status >= 400 and not r.envelope for r in mine),
            "streams_not_one_done": sum(r.streamed and r.kind != "cancel" and not r.error and r.done != 1
                                        for r in mine),
            "p50_s": seconds[len(seconds) // 2], "max_s": seconds[-1],
        }
    return summary


def warmup(count: int) -> int:
    """How many first samples are warm-up: 20%, at least 2."""
    return max(2, math.ceil(0.2 * count))


def memory_verdict(levels: list[float]) -> dict[str, Any]:
    """One kind's samples (MiB, in order): the mean of the last third after warm-up minus the middle third's; flat
    under max(32 MiB, 5% of the middle's)."""
    rest = levels[warmup(len(levels)):]
    if len(rest) < 3:
        return {"verdict": "too few samples"}
    third = len(rest) / 3
    middle, last = statistics.fmean(rest[int(third):int(2 * third)]), statistics.fmean(rest[int(2 * third):])
    bound = max(32.0, 0.05 * middle)
    return {"middle_mib": round(middle, 1), "last_mib": round(last, 1), "growth_mib": round(last - middle, 1),
            "bound_mib": round(bound, 1), "verdict": "flat" if last - middle < bound else "growing"}


def series_growth(counts: list[int | None]) -> dict[str, int | None]:
    """The last sample's series minus those of the first sample after warm-up."""
    first = warmup(len(counts))
    if len(counts) <= first or counts[first] is None or counts[-1] is None:
        return {"after_warmup": None, "last": None, "growth": None}
    return {"after_warmup": counts[first], "last": counts[-1], "growth": counts[-1] - counts[first]}


def verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    kinds = sorted({kind for sample in samples for kind in sample["memory"]})
    memory = {kind: memory_verdict([s["memory"].get(kind, {}).get("rss", 0.0) for s in samples]) for kind in kinds}
    return {"warmup_samples": warmup(len(samples)), "memory": memory,
            "memory_flat": all(v["verdict"] != "growing" for v in memory.values()),
            "series": series_growth([s["series"] for s in samples]),
            "rayroute_series": series_growth([s["rayroute_series"] for s in samples]),
            "unknown_model_series": max((s["unknown_model_series"] or 0 for s in samples), default=0)}


def table(report: dict[str, Any]) -> str:
    """The report for a reader: RSS per kind at each sample, the verdict, the requests."""
    samples, judged = report["samples"], report["verdict"]
    kinds = sorted({kind for sample in samples for kind in sample["memory"]})
    header = f"{'min':>6}" + "".join(f"{kind:>12}" for kind in kinds) + f"{'series':>8}{'rayroute':>9}{'requests':>9}"
    rows = ["RSS in MiB, summed over each kind's processes; metric series (all, ray_rayroute_); requests sent",
            header, "-" * len(header)]
    rows += [f"{s['minute']:>6.1f}" + "".join(f"{s['memory'].get(k, {}).get('rss', 0):>12.0f}" for k in kinds)
             + f"{s['series']!s:>8}{s['rayroute_series']!s:>9}{s['requests']:>9}" for s in samples]
    rows.append(f"\nverdict after {judged['warmup_samples']} warm-up samples (mean of the last third minus the middle "
                "third's, MiB; largest process in the last sample):")
    for kind, v in judged["memory"].items():
        largest = samples[-1]["memory"].get(kind, {}).get("rss_max", 0)
        rows.append(f"  {kind:<12} {v['verdict']:<16}" + (f"{v['middle_mib']:>8.0f} -> {v['last_mib']:.0f} "
                    f"({v['growth_mib']:+.0f}, flat under {v['bound_mib']:.0f}); largest {largest:.0f}"
                    if "growth_mib" in v else ""))
    series, ours = judged["series"], judged["rayroute_series"]
    rows.append(f"  series {series['after_warmup']} after warm-up, {series['last']} at the end; ray_rayroute_ "
                f"{ours['after_warmup']}, {ours['last']}; unknown model names sent {report['unknown_models_sent']}, "
                f"in series {judged['unknown_model_series']}")
    rows.append(f"\n{'kind':<14}{'count':>7}{'p50 s':>8}{'max s':>8}  statuses")
    rows += [f"{kind:<14}{s['count']:>7}{s['p50_s'] or 0:>8.2f}{s['max_s'] or 0:>8.2f}  {s['statuses']}"
             for kind, s in report["requests"].items()]
    rows += [f"  {count} x {what}" for what, count in report["problems"].items()]
    return "\n".join(rows)


def soak(base_url: str, metrics_port: int, api_key: str | None, model: str, adapter: str, minutes: float,
         sample_s: float, session: int | None) -> dict[str, Any]:
    traffic = Traffic(base_url, api_key, model, adapter)
    traffic.start()
    samples: list[dict[str, Any]] = []
    end = traffic.began + minutes * 60
    while True:
        now = time.monotonic()
        samples.append({"minute": round((now - traffic.began) / 60, 2), "memory": sample_memory(session),
                        **sample_series(metrics_port), "requests": len(traffic.results)})
        print(f"{samples[-1]['minute']:.1f} min: {samples[-1]['requests']} requests", file=sys.stderr, flush=True)
        if now >= end:
            break
        time.sleep(max(0.0, min(traffic.began + len(samples) * sample_s, end) - time.monotonic()))
    hung_clients = traffic.finish()
    results = list(traffic.results)
    problems = Counter(f"{r.kind}: {p}" for r in results if (p := problem(r)))
    return {"url": base_url, "minutes": minutes, "sample_s": sample_s,
            "scope": f"session {session}" if session else "machine", "samples": samples,
            "requests": summarize(results), "problems": dict(problems.most_common(20)),
            "problem_count": sum(problems.values()), "hung": hung_clients + sum(r.error == "timeout" for r in results),
            "unknown_models_sent": sum(r.kind == "bad_model" for r in results), "verdict": verdict(samples),
            "examples": [asdict(r) for r in results if problem(r)][:5]}


def _interrupt(*_: Any) -> None:
    """SIGTERM (a test's timeout) must still reach the `finally` that stops the cluster."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=60)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--url", help="soak this running cluster instead of starting one")
    parser.add_argument("--metrics-port", type=int, help="with --url: its Ray metrics export port")
    parser.add_argument("--api-key", default=os.environ.get("RAYROUTE_API_KEY"), help="with --url: one of its keys")
    opts = parser.parse_args(argv)
    if opts.url and opts.metrics_port is None:
        parser.error("--url needs --metrics-port")
    signal.signal(signal.SIGTERM, _interrupt)
    # The config's first model and its first adapter (the e2e cluster's are the same).
    first = yaml.safe_load(opts.config.read_text())["applications"][0]["args"]["models"][0]
    model, adapter = first["id"], next(iter(first["adapters"]))
    report: dict[str, Any] = {}
    workdir = None if opts.url else Path(tempfile.mkdtemp(prefix="rayroute-soak-"))
    try:
        if workdir is None:
            report |= soak(opts.url.rstrip("/"), opts.metrics_port, opts.api_key, model, adapter, opts.minutes,
                           opts.sample_s, cluster_session(opts.metrics_port))
        else:
            keys_file(workdir).write_text(yaml.safe_dump([{"name": "soak", "key": API_KEY}]))
            env = {**{k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, "RAY_ADDRESS")},
                   API_KEYS_FILE_ENV: str(keys_file(workdir)), "RAY_DEDUP_LOGS": "0", **QUICK_STOP_ENV}
            with launched(opts.config, workdir / "serve.log", env) as cluster:
                report |= soak(cluster.base_url, cluster.metrics_port, API_KEY, model, adapter, opts.minutes,
                               opts.sample_s, cluster.process.pid)  # the launcher leads its own session
    except BaseException:  # a start or stop that failed, or Ctrl-C: the report says so, with what was measured
        report["error"] = traceback.format_exc()[-4000:]
        if workdir is not None:
            print(f"the launcher's log is in {workdir}", file=sys.stderr)
    else:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    if "samples" in report:
        print(table(report))
    print(json.dumps(report))
    failed = "error" in report or report["problem_count"] or report["hung"] or report["verdict"]["unknown_model_series"]
    return 1 if failed or not report["verdict"]["memory_flat"] else 0


if __name__ == "__main__":
    sys.exit(main())
