"""What CPU taken from beside the engine costs bare vLLM itself: the yardstick for rayroute's ratio on a CPU machine.

    python -m tests.bench.cpu_contention [--concurrency 32] [--shares 0.1 0.25] [--rounds 4]

Why: on vLLM-CPU the forward pass runs on one spinning compute thread per core, and the threads wait for each other
at every step, so whatever else runs on the machine slows every step, however little it takes. rayroute's path (the
router, HAProxy, the engine replica, Ray's own processes) takes more CPU than bare vLLM's API server does, so on a
small CPU machine its throughput ratio measures this contention as much as the path's speed. This script measures
the contention alone: on ``tiny`` (see :mod:`tests.bench.against_vllm`) bare vLLM is driven alone, beside a burner
process taking a fixed share of the cores, and rayroute is driven too, in blocks A B C D D C B A. Per block it
prints tokens/s and the CPU each part used (engine core, bare's API server or rayroute's path, the burner), then
per setting the mean and the ratio to bare vLLM alone. If bare beside a burner taking a tenth of a core falls to
where rayroute is, the gap is the machine's, not the path's.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from tests.bench.against_vllm import MODELS, ROOT, Server, run_block, start_bare_vllm, start_rayroute
from tests.e2e.harness import model_entry
from tests.stream_timing import cpu_seconds, percentile

BURN_PERIOD_S = 0.005  # the burner's slice: short, as the path's own bursts of work are


def burn(share: float, stop: multiprocessing.synchronize.Event) -> None:
    """Use ``share`` of one core: in every period, that much of this thread's own CPU time, then sleep."""
    due = time.monotonic()
    while not stop.is_set():
        start = time.thread_time()
        while time.thread_time() - start < share * BURN_PERIOD_S:
            pass
        due += BURN_PERIOD_S
        time.sleep(max(0.0, due - time.monotonic()))
        due = max(due, time.monotonic())


def engine_processes(server: Server) -> list[psutil.Process]:
    """vLLM's engine core and its workers: bare vLLM's children, or rayroute's ``EngineCore`` processes."""
    if server.name != "rayroute":
        return psutil.Process(server.process.pid).children(recursive=True)
    found = []
    for core in server.session_processes(("EngineCore",)):
        with contextlib.suppress(psutil.Error):
            found += [core, *core.children(recursive=True)]
    return found


def block(server: Server, model: str, tokens: int, share: float, concurrency: int, requests: int) -> dict:
    """One block, beside two burner processes (one per core) sharing ``share`` cores when ``share`` is not 0."""
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(share / 2, stop)) for _ in range(2 if share else 0)]
    for burner in burners:
        burner.start()
    try:
        burner_processes = [psutil.Process(burner.pid) for burner in burners]
        engine = engine_processes(server)
        before = cpu_seconds(engine), cpu_seconds(burner_processes)
        result = run_block(server, model, tokens, concurrency, requests)
        after = cpu_seconds(engine), cpu_seconds(burner_processes)
    finally:
        stop.set()
        for burner in burners:
            burner.join()
    elapsed = result.elapsed_s
    return {"server": server.name, "share": share, "tokens_per_s": result.tokens / elapsed,
            "ttft_p50_ms": percentile(result.ttfts, 0.5) * 1000, "errors": result.errors,
            "engine_cores": (after[0] - before[0]) / elapsed, "burner_cores": (after[1] - before[1]) / elapsed,
            "path_cores": result.path_cpu_s / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.25], help="cores the burner takes")
    parser.add_argument("--rounds", type=int, default=4, help="requests per stream slot in one block")
    opts = parser.parse_args(argv)
    folder, tokens = MODELS["tiny"]
    document = yaml.safe_load(opts.config.read_text())
    model = model_entry(document, folder)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        rayroute = start_rayroute(document, model, logs, logs / "rayroute.log")
        try:
            bare = start_bare_vllm(model, logs / "vllm.log")
            try:
                for server in (rayroute, bare):  # warm-up, not counted
                    run_block(server, model["id"], tokens, 2, 2)
                plan = [(bare, 0.0), *((bare, share) for share in opts.shares), (rayroute, 0.0)]
                rows = []
                for server, share in plan + plan[::-1]:
                    row = block(server, model["id"], tokens, share, opts.concurrency,
                                opts.concurrency * opts.rounds)
                    rows.append(row)
                    print(f"{row['server']:<9} burner {share:.2f}: {row['tokens_per_s']:7.1f} tok/s, engine "
                          f"{row['engine_cores']:.2f} cores, path {row['path_cores']:.2f}, burner "
                          f"{row['burner_cores']:.2f}, errors {row['errors']}", flush=True)
            finally:
                bare.stop()
        finally:
            rayroute.stop()
    alone = [r["tokens_per_s"] for r in rows if r["server"] == "vllm" and r["share"] == 0]
    print(f"\n{'server':<9}{'burner':>8}{'tok/s':>9}{'ratio':>7}{'TTFT p50':>10}{'path':>7}{'burner':>8}")
    for server, share in plan:
        mine = [r for r in rows if r["server"] == server.name and r["share"] == share]
        mean = {key: sum(r[key] for r in mine) / len(mine) for key in mine[0] if key not in ("server", "share")}
        print(f"{server.name:<9}{share:>8.2f}{mean['tokens_per_s']:>9.1f}"
              f"{mean['tokens_per_s'] / (sum(alone) / len(alone)):>7.2f}{mean['ttft_p50_ms']:>10.0f}"
              f"{mean['path_cores']:>7.2f}{mean['burner_cores']:>8.2f}")
    print("(path: rayroute's proxy, routers and engine replica, or bare vLLM's API server, in cores; ratio: to bare "
          "vLLM alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
