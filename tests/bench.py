"""Benchmark: rayroute against vLLM's own OpenAI server, same model, same engine settings, same machine.

    python -m tests.bench [--config configs/local.yaml] [--concurrency 1 8 32] [--out bench-results]

Starts one server at a time (the machine's cores are the resource being measured): first rayroute through the
same launcher as `make serve`, then `vllm.entrypoints.openai.api_server` bare, with the engine arguments of the
config's first model. Each is driven with concurrent streaming chat requests of a fixed shape (a ~120-token prompt,
128 output tokens with `ignore_eos`) at each concurrency level. Prints a table with output tokens/s, TTFT p50/p95,
inter-token latency p50/p95, errors, and ours/bare ratios; writes it as JSON and a PNG chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("You are reviewing a city guide. Summarise, in plain prose, what a first-time visitor to Lyon should "
          "know about its old town, its food, its two rivers, the hill of Fourvière, getting around by metro and "
          "tram, the best season to visit, and how many days to plan. Keep a friendly tone and avoid lists. ") * 2
OUTPUT_TOKENS = 128


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    errors: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    ttfts: list[float] = field(default_factory=list, repr=False)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str,
                      key: str | None) -> tuple[float, list[float], int]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start = time.perf_counter()
    first = None
    arrivals = []
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                arrivals.append(now)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return (first or time.perf_counter()) - start, gaps, len(arrivals)


async def run_level(server: str, base_url: str, model: str, key: str | None, concurrency: int) -> LevelResult:
    total = max(8, concurrency * 3)
    queue = list(range(total))
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0
    errors = 0

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await one_request(client, base_url + "/v1/chat/completions", model, key)  # warm-up, not counted

        async def worker() -> None:
            nonlocal tokens, errors
            while queue:
                queue.pop()
                try:
                    ttft, request_gaps, count = await one_request(client, base_url + "/v1/chat/completions",
                                                                  model, key)
                except httpx.HTTPError:
                    errors += 1
                    continue
                ttfts.append(ttft)
                gaps.extend(request_gaps)
                tokens += count

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LevelResult(server, concurrency, total, errors, tokens / elapsed, percentile(ttfts, 0.5) * 1000,
                       percentile(ttfts, 0.95) * 1000, percentile(gaps, 0.5) * 1000, percentile(gaps, 0.95) * 1000,
                       ttfts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{url} not ready after {timeout}s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def start_rayroute(document: dict, model: dict, workdir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    document = {**document, "applications": [{**document["applications"][0],
                                              "args": {**document["applications"][0]["args"], "models": [model]}}]}
    config = workdir / "bench.yaml"
    config.write_text(yaml.safe_dump(document))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAYROUTE_API_KEYS"}
    process = subprocess.Popen([sys.executable, "-m", "router.launch", str(config), "--port", str(port),
                                "--metrics-port", str(free_port())], cwd=ROOT, env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/ready", process)
    return process, base


def start_bare_vllm(model: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """vLLM's own server, with the model's engine arguments as `vllm serve` flags."""
    from deployments.config import ModelConfig

    config = ModelConfig.model_validate(model)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", config.resolved_source,
               "--served-model-name", config.id, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in {**config.resources.engine_overrides(), **config.engine_args}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    # The same compute threads as the replica gets: Ray sets OMP_NUM_THREADS from the replica's CPUs.
    threads = str(int(config.resources.replica_actor_resources()["num_cpus"]))
    env = {**os.environ, **config.resources.engine_env(), **config.env, "OMP_NUM_THREADS": threads}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health", process)
    return process, base


def report(results: list[LevelResult], out: Path) -> None:
    by_key = {(r.server, r.concurrency): r for r in results}
    levels = sorted({r.concurrency for r in results})
    header = (f"{'server':<10}{'conc':>5}{'reqs':>6}{'err':>5}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p95':>10}"
              f"{'ITL p50':>9}{'ITL p95':>9}   (latencies in ms)")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.server:<10}{r.concurrency:>5}{r.requests:>6}{r.errors:>5}{r.output_tokens_per_s:>11.1f}"
              f"{r.ttft_p50_ms:>10.1f}{r.ttft_p95_ms:>10.1f}{r.itl_p50_ms:>9.1f}{r.itl_p95_ms:>9.1f}")
    ratios = []
    print("\nours/bare: tokens/s ratio, TTFT p50 added (ms)")
    for level in levels:
        ours, bare = by_key.get(("rayroute", level)), by_key.get(("vllm", level))
        if ours and bare:
            ratio = {"concurrency": level, "tokens_per_s_ratio": ours.output_tokens_per_s / bare.output_tokens_per_s,
                     "ttft_p50_added_ms": ours.ttft_p50_ms - bare.ttft_p50_ms,
                     "itl_p50_added_ms": ours.itl_p50_ms - bare.itl_p50_ms}
            ratios.append(ratio)
            print(f"  concurrency {level:>3}: {ratio['tokens_per_s_ratio']:.3f}  {ratio['ttft_p50_added_ms']:+.1f} ms")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({
        "prompt_chars": len(PROMPT), "output_tokens": OUTPUT_TOKENS,
        "results": [{k: v for k, v in asdict(r).items() if k != "ttfts"} for r in results], "ratios": ratios,
    }, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for server in ("rayroute", "vllm"):
        rows = [by_key[(server, c)] for c in levels if (server, c) in by_key]
        left.plot([r.concurrency for r in rows], [r.output_tokens_per_s for r in rows], marker="o", label=server)
        right.plot([r.concurrency for r in rows], [r.ttft_p50_ms for r in rows], marker="o", label=server)
    left.set(xlabel="concurrent streams", ylabel="output tokens/s", xscale="log", title="Throughput")
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", title="Time to first token")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    opts = parser.parse_args(argv)
    document = yaml.safe_load(opts.config.read_text())
    model = document["applications"][0]["args"]["models"][0]
    results: list[LevelResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for server in ("rayroute", "vllm"):
            log = opts.out / f"{server}.log"
            opts.out.mkdir(parents=True, exist_ok=True)
            if server == "rayroute":
                process, base = start_rayroute(document, model, workdir, log)
            else:
                process, base = start_bare_vllm(model, log)
            try:
                for level in opts.concurrency:
                    result = asyncio.run(run_level(server, base, model["id"], None, level))
                    print(f"{server} c={level}: {result.output_tokens_per_s:.1f} tok/s, "
                          f"TTFT p50 {result.ttft_p50_ms:.1f} ms", flush=True)
                    results.append(result)
            finally:
                stop(process)
    report(results, opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
