"""Benchmark: prefix-aware replica choice against Serve's default, on two replicas of the default model.

    python -m tests.bench.prefix_routing [--conversations 16] [--turns 4] [--out bench-results]

Why: with several replicas, a request whose prompt starts like earlier ones (a long system prompt; a conversation's
growing history) is cheap on the replica that already holds that start in vLLM's prefix cache and a full prefill
anywhere else. Whether ``replica_choice: prefix_cache`` (deployments/prefix_routing.py) keeps more of the cache than
Serve's default (``least_loaded``: the less busy of two random replicas) is measured here, not assumed.

For each choice it starts rayroute as `make serve` does, with SmolLM2 at two fixed replicas of one CPU each (vLLM's
prefix caching is on by default), then runs ``--conversations`` chats at once, each ``--turns`` turns long: every
turn sends a shared system prompt of about 1,000 tokens, the conversation's earlier turns (with the answers it got)
and a new question, and asks for 16 tokens. Reported per choice: vLLM's prefix-cache hit rate (prompt tokens found
in the cache / prompt tokens looked up, from vLLM's own counters over both replicas), TTFT p50/p99 over all turns
and over the later turns only (the ones a conversation's history can serve), and the wall time. One run each: the
hit rate does not depend on the machine's speed; TTFT does, so read it as a direction, not a precise ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import model_entry, start_launcher, stop_and_check
from tests.stream_timing import percentile

ROOT = Path(__file__).resolve().parents[2]
CHOICES = ("least_loaded", "prefix_cache")
FOLDER = "smollm2-135m-instruct"
ANSWER_TOKENS = 16
# About 1,000 tokens of SmolLM2's tokenizer: a policy text every conversation starts with.
SYSTEM_PROMPT = "You are the assistant of the Lyon city library. " + " ".join(
    f"Rule {i}: when a reader asks about section {i} of the catalogue, answer politely, name the floor "
    f"({i % 5}), the opening hours of that floor, and suggest one related section ({(i * 7) % 40})."
    for i in range(30))


def turn_messages(conversation: int, history: list[dict], turn: int) -> list[dict]:
    question = f"Reader {conversation}, question {turn}: what can I find in section {(conversation * 3 + turn) % 40}?"
    return [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": question}]


async def conversation(client: httpx.AsyncClient, url: str, index: int, turns: int, ttfts: list[list[float]]) -> None:
    history: list[dict] = []
    for turn in range(turns):
        messages = turn_messages(index, history, turn)
        body = {"model": FOLDER, "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0,
                "stream": True}
        started = time.perf_counter()
        first = None
        text = []
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    if delta and first is None:
                        first = time.perf_counter() - started
                    text.append(delta)
        ttfts[turn].append(first if first is not None else time.perf_counter() - started)
        history += [messages[-1], {"role": "assistant", "content": "".join(text)}]


def prefix_cache_counts(metrics_port: int) -> tuple[float, float]:
    """vLLM's prefix-cache (hits, queries) in prompt tokens, summed over every replica."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    totals = {"ray_vllm_prefix_cache_hits_total": 0.0, "ray_vllm_prefix_cache_queries_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["ray_vllm_prefix_cache_hits_total"], totals["ray_vllm_prefix_cache_queries_total"]


def settled_counts(metrics_port: int, quiet_s: float = 5, timeout_s: float = 60) -> tuple[float, float]:
    """The counters once they stopped moving: Ray exports them every few seconds."""
    deadline = time.monotonic() + timeout_s
    counts, since = prefix_cache_counts(metrics_port), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(1)
        now = prefix_cache_counts(metrics_port)
        if now != counts:
            counts, since = now, time.monotonic()
    return counts


def run_choice(document: dict, choice: str, conversations: int, turns: int, workdir: Path, log: Path) -> dict:
    model = {**model_entry(document, FOLDER), "replica_choice": choice,
             "resources": {"accelerator": "cpu", "cpus": 1},
             "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    app = document["applications"][0]
    config = workdir / f"prefix-{choice}.yaml"
    config.write_text(yaml.safe_dump({**document, "applications": [{**app, "args": {**app["args"],
                                                                                         "models": [model]}}]}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAYROUTE_API_KEYS", "RAYROUTE_API_KEYS_FILE")}
    cluster = start_launcher(config, log, env)
    try:
        url = cluster.base_url + "/v1/chat/completions"

        async def warm_up() -> None:
            # One request per replica first, so neither pays its first request's one-off costs in the figures; the
            # warm-up prompt shares nothing with the conversations.
            async with httpx.AsyncClient(timeout=600) as client:
                await asyncio.gather(*(client.post(url, json={"model": FOLDER, "max_tokens": 2, "messages": [
                    {"role": "user", "content": f"warm-up {i}"}]}) for i in range(2)))

        async def converse() -> list[list[float]]:
            ttfts: list[list[float]] = [[] for _ in range(turns)]
            async with httpx.AsyncClient(timeout=600) as client:
                await asyncio.gather(*(conversation(client, url, i, turns, ttfts) for i in range(conversations)))
            return ttfts

        asyncio.run(warm_up())
        hits_before, queries_before = settled_counts(cluster.metrics_port)
        started = time.perf_counter()
        ttfts = asyncio.run(converse())
        wall = time.perf_counter() - started
        hits, queries = settled_counts(cluster.metrics_port)
    finally:
        stop_and_check(cluster.process, log)
    every = [t for turn in ttfts for t in turn]
    later = [t for turn in ttfts[1:] for t in turn]
    hits, queries = hits - hits_before, queries - queries_before
    return {"replica_choice": choice, "requests": len(every), "hit_rate": hits / queries if queries else 0.0,
            "hit_tokens": hits, "queried_tokens": queries, "wall_s": wall,
            "ttft_p50_ms": percentile(every, 0.5) * 1000, "ttft_p99_ms": percentile(every, 0.99) * 1000,
            "later_ttft_p50_ms": percentile(later, 0.5) * 1000, "later_ttft_p99_ms": percentile(later, 0.99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--choices", nargs="+", choices=CHOICES, default=list(CHOICES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    opts = parser.parse_args(argv)
    document = yaml.safe_load(opts.config.read_text())
    opts.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for choice in opts.choices:
            rows.append(run_choice(document, choice, opts.conversations, opts.turns, Path(tmp),
                                   opts.out / f"prefix-{choice}.log"))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{opts.conversations} conversations x {opts.turns} turns, 2 replicas, ~1,000-token shared system prompt")
    print(f"{'replica_choice':<14} {'hit rate':>8} {'TTFT p50':>9} {'p99':>7} {'later p50':>10} {'p99':>7} {'wall':>7}")
    for row in rows:
        print(f"{row['replica_choice']:<14} {row['hit_rate']:8.1%} {row['ttft_p50_ms']:7.0f}ms "
              f"{row['ttft_p99_ms']:5.0f}ms {row['later_ttft_p50_ms']:8.0f}ms {row['later_ttft_p99_ms']:5.0f}ms "
              f"{row['wall_s']:6.1f}s")
    (opts.out / "bench-prefix.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
