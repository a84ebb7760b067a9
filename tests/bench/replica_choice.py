"""Benchmark: each ``replica_choice`` on a workload where the replica matters, and on one where it does not.

    python -m tests.bench.replica_choice [--requests 64] [--choices least_loaded kv_cache ...] [--routers 2]
                                         [--out bench-results]

Why: a request whose prompt starts like earlier ones (a tenant's long system prompt, a conversation's history) costs
almost no prefill on a replica whose KV cache still holds that start, and a full one elsewhere; when the caches hold
only part of all prefixes, where a request goes decides what gets evicted. Whether each policy keeps more of the
cache (and so a shorter time to first token) than Serve's default is measured here, not assumed.

The workload with shared prefixes: 8 tenants, each with its own system prompt of about 1,300 tokens (with the chat
template), two conversations each; a request is a conversation's next turn (its system prompt, its history, a new
question), asking for 32 tokens. Requests arrive as a Poisson process at :data:`LOAD` of the replicas' capacity,
which is measured first (cold requests, every replica busy). :data:`REPLICAS` SmolLM2 replicas of one logical CPU
each (sharing the machine's cores), each with a KV cache of :data:`KV_CACHE_BYTES` (about 3,600 tokens: 2.8 system
prompts, a third of all tenants' prefixes; all four together hold every tenant's prefix and its conversations once).
Why four: a replica that sees every tenant (``least_loaded``) keeps about its share C/N of N tenants' prefixes, one
that sees only its own tenants keeps min(1, C·R/N) of them, so a policy can gain at most R times the hit rate over
Serve's default with R replicas, and with two only by a cache too small to hold even its own tenants. Before it is
measured, each tenant sends one request at the same rate (a warm-up, for every policy alike): an endpoint's steady
state, not its first minute, in which every tenant's first request misses on any replica. The workload without
shared prefixes sends half as many requests of the same length, each with a prompt of its own, at the same rate.
Two router replicas by default, as the chart runs them: ``kv_cache``'s each keeps its own memory of where it sent
what, which only the engines' reports make agree; ``prefix_cache``'s share one prefix tree, a Ray actor per model.

Reported per policy: vLLM's prefix-cache hit rate (prompt tokens found in the cache / looked up, from vLLM's own
counters over every replica), the share of requests sent to a replica that already held their system prompt (their
``cached_tokens`` cover it), TTFT p50/p90/p99, output tokens/s; and for the other workload, output tokens/s. Then the
cost of the choice itself (:func:`choice_cost`): 64 requests arriving at once over 4 replicas, for ``kv_cache`` (its
ranking, its block keys with the model's own tokenizer and chat template, and a request's whole wait) and for
``prefix_cache`` (a request's whole wait, its tree a real Ray actor). One pass per policy:
the hit rate and the share do not depend on the machine's speed; TTFT and tokens/s do (read them as a direction).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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
CHOICES = ("least_loaded", "prefix_cache", "session", "kv_cache")
FOLDER = "smollm2-135m-instruct"
TENANTS = 8
CONVERSATIONS_PER_TENANT = 2
ANSWER_TOKENS = 32
LOAD = 0.7
REPLICAS = 4
KV_CACHE_BYTES = 160 * 1024 * 1024  # SmolLM2 in float32: 45 KiB a token
BLOCK_TOKENS = 128  # the CPU build's block: a system prompt of 1,300 tokens fills 10
HELD_PREFIX_TOKENS = 10 * BLOCK_TOKENS
TOPICS = ("maps", "coins", "letters", "clocks", "stamps", "seeds", "shells", "tools")


def system_prompt(tenant: int) -> str:
    """About 1,100 tokens, the tenant's own from the first one."""
    topic = TOPICS[tenant]
    return f"Tenant {tenant}: you are the curator of the {topic} collection. " + " ".join(
        f"Rule {i} of the {topic} room: item {i} of the {topic} is kept on shelf {(i * (tenant + 3)) % 11}, "
        f"lent for {i % 5 + 1} days, and only to members." for i in range(38))


def unique_prompt(index: int) -> str:
    """As long as a system prompt, shared with no other request from its first token."""
    words = random.Random(index).choices(["amber", "brook", "cedar", "dune", "ember", "fjord", "grove", "heath"],
                                         k=700)
    return f"Request {index}. " + " ".join(words)


async def send(client: httpx.AsyncClient, url: str, messages: list[dict], session: str | None,
               results: list[dict], **labels: object) -> str:
    body = {"model": FOLDER, "messages": messages, "max_tokens": ANSWER_TOKENS, "min_tokens": ANSWER_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Session-Id": session} if session else {}
    started = time.perf_counter()
    first = None
    text: list[str] = []
    usage: dict = {}
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                delta = choice["delta"].get("content") or ""
                if delta and first is None:
                    first = time.perf_counter() - started
                text.append(delta)
    results.append({**labels, "ttft": first if first is not None else time.perf_counter() - started,
                    "prompt_tokens": usage.get("prompt_tokens", 0),
                    "completion_tokens": usage.get("completion_tokens", 0),
                    "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0})
    return "".join(text)


async def warm_up(url: str, rate: float, seed: int) -> None:
    """One request per tenant, arriving at ``rate`` a second: each tenant's prefix is somewhere before measuring."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=900) as client:
        tasks = []
        for tenant in range(TENANTS):
            await asyncio.sleep(rng.expovariate(rate))
            messages = [{"role": "system", "content": system_prompt(tenant)},
                        {"role": "user", "content": "Which rooms do you keep?"}]
            tasks.append(asyncio.create_task(send(client, url, messages, f"tenant-{tenant}-warm-up", [])))
        await asyncio.gather(*tasks)


async def shared_prefix_workload(url: str, requests: int, rate: float, seed: int,
                                 one_off_share: float = 0.0) -> tuple[list[dict], float]:
    """Conversation turns arriving at ``rate`` a second: each arrival is the next turn of a conversation that is
    not waiting for an answer (a random one), or with ``one_off_share`` chance a prompt as long as a system prompt
    that shares nothing (a document to summarize, say): traffic that evicts tenants' blocks wherever it lands."""
    rng = random.Random(seed)
    conversations = [{"tenant": t, "id": f"tenant-{t}-{c}", "history": [], "busy": False}
                     for t in range(TENANTS) for c in range(CONVERSATIONS_PER_TENANT)]
    results: list[dict] = []

    async def turn(client: httpx.AsyncClient, conversation: dict, index: int) -> None:
        question = {"role": "user", "content": f"Question {index}: where is item {index % 38} and for how long?"}
        messages = [{"role": "system", "content": system_prompt(conversation["tenant"])},
                    *conversation["history"], question]
        answer = await send(client, url, messages, conversation["id"], results, index=index,
                            tenant=conversation["tenant"], turn=len(conversation["history"]) // 2)
        conversation["history"] += [question, {"role": "assistant", "content": answer}]
        if len(conversation["history"]) >= 8:  # a conversation of four turns ends; the tenant starts another
            conversation["history"] = []
        conversation["busy"] = False

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as client:
        tasks = []
        for index in range(requests):
            await asyncio.sleep(rng.expovariate(rate))
            if rng.random() < one_off_share:
                messages = [{"role": "user", "content": unique_prompt(seed * 1_000_000 + index)}]
                tasks.append(asyncio.create_task(send(client, url, messages, None, results, index=index,
                                                      one_off=True)))
                continue
            idle = [c for c in conversations if not c["busy"]]
            conversation = rng.choice(idle) if idle else rng.choice(conversations)
            conversation["busy"] = True
            tasks.append(asyncio.create_task(turn(client, conversation, index)))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - started


async def unique_workload(url: str, requests: int, rate: float, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    results: list[dict] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as client:
        tasks = []
        for index in range(requests):
            await asyncio.sleep(rng.expovariate(rate))
            messages = [{"role": "user", "content": unique_prompt(seed * 100_000 + index)}]
            tasks.append(asyncio.create_task(send(client, url, messages, None, results)))
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - started


async def capacity(url: str, replicas: int) -> float:
    """Cold requests a second the replicas finish when each always has two."""
    results: list[dict] = []
    queue = list(range(6 * replicas))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop()
            await send(client, url, [{"role": "user", "content": unique_prompt(10_000_000 + index)}], None, results)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as client:
        await asyncio.gather(*(worker(client) for _ in range(2 * replicas)))
    return len(results) / (time.perf_counter() - started)


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


def summary(results: list[dict], wall: float) -> dict:
    ttfts = [r["ttft"] for r in results]
    return {"requests": len(results), "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
            "ttft_p90_ms": percentile(ttfts, 0.9) * 1000, "ttft_p99_ms": percentile(ttfts, 0.99) * 1000,
            "output_tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
            "held_share": sum(r["cached_tokens"] >= HELD_PREFIX_TOKENS for r in results) / len(results)}


def run_choice(document: dict, choice: str, requests: int, rate: float | None, routers: int, workdir: Path,
               log: Path, one_off_share: float = 0.0) -> dict:
    model = model_entry(document, FOLDER)
    model = {**model, "replica_choice": choice, "resources": {"accelerator": "cpu", "cpus": 1},
             "autoscaling": {"min_replicas": REPLICAS, "max_replicas": REPLICAS},
             "engine_args": {**model["engine_args"], "kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": 3072,
                             "enable_prompt_tokens_details": True}}
    app = document["applications"][0]
    config = workdir / f"choice-{choice}.yaml"
    config.write_text(yaml.safe_dump({**document, "applications": [
        {**app, "args": {**app["args"], "models": [model],
                         "routers": {**app["args"].get("routers", {}), "replicas": routers}}}]}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAYROUTE_API_KEYS", "RAYROUTE_API_KEYS_FILE")}
    cluster = start_launcher(config, log, env)
    row: dict = {"replica_choice": choice}
    try:
        url = cluster.base_url + "/v1/chat/completions"
        if rate is None:
            row["capacity_rps"] = asyncio.run(capacity(url, REPLICAS))
            rate = LOAD * row["capacity_rps"]
        row["rate_rps"] = rate
        asyncio.run(warm_up(url, rate, seed=3))
        hits_before, queries_before = settled_counts(cluster.metrics_port)
        results, wall = asyncio.run(shared_prefix_workload(url, requests, rate, seed=1, one_off_share=one_off_share))
        hits, queries = settled_counts(cluster.metrics_port)
        # Tenants' turns only: a one-off misses wherever it goes (its tokens/s counted all the same).
        row.update(summary([r for r in results if not r.get("one_off")], wall),
                   output_tokens_per_s=sum(r["completion_tokens"] for r in results) / wall)
        (log.parent / f"requests-{choice}.json").write_text(json.dumps(sorted(results, key=lambda r: r["index"])))
        row["hit_rate"] = (hits - hits_before) / max(queries - queries_before, 1)
        unique, unique_wall = asyncio.run(unique_workload(url, requests // 2, rate, seed=2))
        row["unique_output_tokens_per_s"] = summary(unique, unique_wall)["output_tokens_per_s"]
        row["unique_ttft_p90_ms"] = summary(unique, unique_wall)["ttft_p90_ms"]
    finally:
        stop_and_check(cluster.process, log)
    return row


def choice_cost(document: dict, in_flight: int = 64, rounds: int = 20) -> dict:
    """What choosing a replica costs each request, with ``in_flight`` requests of 1,300-token prompts arriving at
    once over 4 replicas: for ``kv_cache`` (its replicas holding 10,000 blocks each) :meth:`KvCacheRouter.rank`
    alone, making a request's block keys (template and tokenizer, in a thread), and the whole choice as a request
    waits for it (keys, ranking, the routed callback); for ``prefix_cache`` the same whole choice, whose tree lives
    in one Ray actor per model that every choice and every routed request calls and waits for (a real actor, in a
    local Ray started here)."""
    import ray
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor
    from ray.serve._private.common import DeploymentHandleSource, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest
    from ray.serve._private.test_utils import FAKE_REPLICA_DEPLOYMENT_ID, FakeRunningReplica

    from deployments.kv_blocks import block_keys
    from deployments.kv_events import STATS_BLOCK_SIZE, STATS_BLOCKS, STATS_CAPACITY, STATS_LOAD
    from deployments.kv_routing import KvCacheRouter, router_kwargs
    from deployments.prefix_routing import PrefixCacheRouter
    from deployments.prefix_routing import router_kwargs as prefix_router_kwargs

    model = model_entry(document, FOLDER)

    class Replica(FakeRunningReplica):
        def __init__(self, name: str, keys: list[int]) -> None:
            super().__init__(name)
            self._stats = {STATS_BLOCKS: keys, STATS_CAPACITY: 12_000, STATS_BLOCK_SIZE: BLOCK_TOKENS, STATS_LOAD: 0}
            self.set_queue_len_response(0)

        @property
        def routing_stats(self) -> dict:
            return self._stats

    def pending(round_: int, i: int) -> PendingRequest:
        return PendingRequest(args=[{"model": FOLDER, "messages": [
            {"role": "system", "content": system_prompt(i % TENANTS)},
            {"role": "user", "content": f"question {round_}-{i}"}]}], kwargs={},
            metadata=RequestMetadata(request_id=f"{round_}-{i}", internal_request_id=f"{round_}-{i}"))

    async def waits_for_choices(router: object, replicas: list) -> list[float]:
        """Each request's wait from its arrival (all of a round's at once) to its replica chosen and told."""
        waits: list[float] = []

        async def choose(request: PendingRequest, arrived: float) -> None:
            ranked = await router.choose_replicas(replicas, request)
            router.on_request_routed(request, ranked[0][0].replica_id, None)
            waits.append(time.perf_counter() - arrived)

        router.update_replicas(replicas)
        await asyncio.sleep(0.1)
        for round_ in range(rounds):
            arrived = time.perf_counter()
            await asyncio.gather(*(choose(pending(round_, i), arrived) for i in range(in_flight)))
        return waits

    async def measure_kv() -> dict:
        router = KvCacheRouter(deployment_id=FAKE_REPLICA_DEPLOYMENT_ID, handle_source=DeploymentHandleSource.REPLICA,
                               use_replica_queue_len_cache=True)
        router.initialize_state(**router_kwargs(model["source"], [], model["engine_args"].get("chat_template")))
        router._prompts.load()
        tenant_tokens = router._prompts.of({"messages": [{"role": "system", "content": system_prompt(0)}]})
        held = block_keys(tenant_tokens, BLOCK_TOKENS)
        replicas = [Replica(str(i), list(range(i * 10_000, (i + 1) * 10_000 - len(held))) + held * (i == 3))
                    for i in range(4)]
        waits = await waits_for_choices(router, replicas)
        choices, tokenizing = list(router.choice_times), list(router.tokenize_times)
        return {"choice_p50_us": percentile(choices, 0.5) * 1e6, "choice_p99_us": percentile(choices, 0.99) * 1e6,
                "keys_p50_ms": percentile(tokenizing, 0.5) * 1e3, "keys_p99_ms": percentile(tokenizing, 0.99) * 1e3,
                "kv_wait_p50_ms": percentile(waits, 0.5) * 1e3, "kv_wait_p99_ms": percentile(waits, 0.99) * 1e3}

    async def measure_prefix() -> dict:
        router = PrefixCacheRouter(deployment_id=FAKE_REPLICA_DEPLOYMENT_ID,
                                   handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True)
        router.initialize_state(**prefix_router_kwargs(), tree_actor=PrefixTreeActor.remote())
        waits = await waits_for_choices(router, [Replica(str(i), []) for i in range(4)])
        return {"prefix_wait_p50_ms": percentile(waits, 0.5) * 1e3, "prefix_wait_p99_ms": percentile(waits, 0.99) * 1e3}

    cost = {"in_flight": in_flight, "choices": in_flight * rounds, **asyncio.run(measure_kv())}
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own, never a running one
    try:
        cost.update(asyncio.run(measure_prefix()))
    finally:
        ray.shutdown()
    return cost


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["replica_choice"] for row in rows]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [row["hit_rate"] * 100 for row in rows])
    axes[0].set_title("prefix-cache hit rate (%)")
    axes[1].bar(names, [row["ttft_p90_ms"] / 1000 for row in rows])
    axes[1].set_title("TTFT p90 (s)")
    axes[2].bar(names, [row["output_tokens_per_s"] for row in rows], label="shared prefixes")
    axes[2].plot(names, [row["unique_output_tokens_per_s"] for row in rows], "ko", label="no shared prefix")
    axes[2].set_title("output tokens/s")
    axes[2].legend(fontsize=7)
    for axis in axes:
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "local.yaml")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, help="arrivals a second (default: measured, LOAD of capacity)")
    parser.add_argument("--choices", nargs="+", choices=CHOICES, default=list(CHOICES))
    parser.add_argument("--routers", type=int, default=2,
                        help="router replicas (the chart's default; kv_cache's each keep their own view of where they "
                             "sent what)")
    parser.add_argument("--one-offs", type=float, default=0.0,
                        help="share of arrivals that are long prompts sharing nothing, which evict tenants' blocks "
                             "(TTFT and the held share are then the tenants' requests' alone)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    opts = parser.parse_args(argv)
    document = yaml.safe_load(opts.config.read_text())
    opts.out.mkdir(parents=True, exist_ok=True)
    cost = choice_cost(document)
    print(json.dumps(cost), flush=True)
    rows = []
    rate = opts.rate
    with tempfile.TemporaryDirectory() as tmp:
        for choice in opts.choices:
            rows.append(run_choice(document, choice, opts.requests, rate, opts.routers, Path(tmp),
                                   opts.out / f"choice-{choice}.log", one_off_share=opts.one_offs))
            rate = rows[-1]["rate_rps"]  # every policy gets the first one's arrivals
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{TENANTS} tenants x {CONVERSATIONS_PER_TENANT} conversations, {opts.requests} requests at "
          f"{rate:.2f}/s after a warm-up request per tenant, {REPLICAS} replicas of {KV_CACHE_BYTES >> 20} MiB "
          f"KV cache each, {opts.routers} router replicas"
          + (f", {opts.one_offs:.0%} of arrivals one-off prompts sharing nothing" if opts.one_offs else ""))
    print(f"{'replica_choice':<14} {'hit rate':>8} {'held':>6} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
          f"{'tok/s':>7} {'no-shared tok/s':>16}")
    for row in rows:
        print(f"{row['replica_choice']:<14} {row['hit_rate']:8.1%} {row['held_share']:6.0%} "
              f"{row['ttft_p50_ms']:7.0f}ms {row['ttft_p90_ms']:5.0f}ms {row['ttft_p99_ms']:5.0f}ms "
              f"{row['output_tokens_per_s']:7.1f} {row['unique_output_tokens_per_s']:16.1f}")
    print(f"\nkv_cache choice, {cost['in_flight']} in flight, 4 replicas x 10,000 blocks: rank p50 "
          f"{cost['choice_p50_us']:.0f} us, p99 {cost['choice_p99_us']:.0f} us; a prompt's block keys (template + "
          f"tokenizer, off the routing loop) p50 {cost['keys_p50_ms']:.1f} ms, p99 {cost['keys_p99_ms']:.1f} ms; "
          f"a request's whole wait for its choice p50 {cost['kv_wait_p50_ms']:.1f} ms, p99 "
          f"{cost['kv_wait_p99_ms']:.1f} ms")
    print(f"prefix_cache choice, the same requests: a request's whole wait p50 {cost['prefix_wait_p50_ms']:.1f} ms, "
          f"p99 {cost['prefix_wait_p99_ms']:.1f} ms (its prefix tree is one Ray actor per model, called and waited "
          f"for on the routing loop)")
    (opts.out / "bench-replica-choice.json").write_text(json.dumps({"rows": rows, "choice_cost": cost}, indent=2))
    plot(rows, opts.out / "bench-replica-choice.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
