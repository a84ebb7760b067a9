"""Losing a node under load: a head and two worker raylets on this machine (``ray.cluster_utils.Cluster``), the
default model's two replicas one per worker, steady streaming and non-streaming traffic, and one worker removed
without warning mid-way.

Run by tests/e2e/test_node_failure.py in its own process (a process joins one Ray cluster, and the test session's is
another); prints one JSON report on its last line:

    python -m tests.scenarios.node_failure [--model-source PATH]

What a client must see: every request that had not started streaming is answered (Serve routes it, or the router
retries it, on the surviving replica); a stream already running on the lost node ends with an error event and
``[DONE]``; nothing hangs; the model answers afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import httpx

from tests.e2e.harness import RAY_AUTH_ENV, free_port, serve_document, start_serve_in_process, stop_serve_in_process

os.environ.update(RAY_AUTH_ENV)  # before Ray is imported

MODEL = "smollm2-135m-instruct"
LOAD_THREADS = 6
ASK = [{"role": "user", "content": "Tell me about lighthouses."}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-source", default="~/.cache/rayroute/models/smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args(argv)

    from ray.cluster_utils import Cluster

    from router.launch import deploy, ray_process_env

    port = options.port or free_port()
    # Serve as `make serve` and the chart run it (HAProxy front, throughput mode): how a node's loss reaches a
    # router depends on the transport between replicas. Set before the raylets start, which pass it on.
    os.environ.update(ray_process_env("127.0.0.1"))
    # Three nodes of one CPU each: the router and the two engine replicas (one CPU each) fill them, one per node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    report: dict = {"port": port}
    try:
        start_serve_in_process(cluster.address, port, serve_options={"proxy_location": "HeadOnly"})
        deploy(serve_document(app_args(options.model_source)))
        base = f"http://127.0.0.1:{port}"
        engine_nodes = replica_nodes("engine-")
        router_nodes = replica_nodes("OpenAIRouter")
        report["engine_nodes"], report["router_nodes"] = sorted(engine_nodes), sorted(router_nodes)
        report["engines_spread"] = len(set(engine_nodes)) == 2
        # The node to lose: a worker holding an engine replica and not the router (the head cannot be removed,
        # and losing the only router is a different failure: Serve restarts it, but its streams are gone).
        worker_ids = {w.node_id: w for w in workers}
        victim_id = next(node for node in engine_nodes if node in worker_ids and node not in router_nodes)

        results: list[dict] = []
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(base, i, stop, results)) for i in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(8)  # traffic on both replicas
        removed_at = time.monotonic()
        cluster.remove_node(worker_ids[victim_id], allow_graceful=False)
        time.sleep(20)
        stop.set()
        for thread in threads:
            thread.join(timeout=200)
        report["hung_threads"] = sum(thread.is_alive() for thread in threads)
        report["removed_after_requests"] = sum(1 for r in results if r["started_at"] < removed_at)
        report["results"] = results
        after = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4},
                           timeout=120)
        report["after_status"] = after.status_code
    finally:
        stop_serve_in_process(reap=False)
        cluster.shutdown()
    print(json.dumps(report))
    return 0


def app_args(source: str) -> dict:
    engine_args = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024,
                   "kv_cache_memory_bytes": 256 * 1024 * 1024, "max_num_seqs": 8}
    return {"models": [{
        "id": MODEL, "source": source, "engine_args": engine_args,
        "resources": {"accelerator": "cpu", "cpus": 1},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1"},
    }]}


def replica_nodes(deployment_prefix: str) -> list[str]:
    """The node of each live replica of the deployments whose name starts with ``deployment_prefix``."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    # A replica's actor class is "ServeReplica:<application>:<deployment>"; each model is an application.
    return [a.node_id for a in actors
            if a.class_name.startswith("ServeReplica:") and a.class_name.split(":")[2].startswith(deployment_prefix)]


def load(base: str, index: int, stop: threading.Event, results: list[dict]) -> None:
    """Back-to-back requests, alternating streaming and not, each recorded with how it ended."""
    number = 0
    with httpx.Client(timeout=180) as client:
        while not stop.is_set():
            stream = (index + number) % 2 == 0
            number += 1
            body = {"model": MODEL, "messages": ASK, "max_tokens": 24, "ignore_eos": True, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            result = {"thread": index, "stream": stream, "started_at": time.monotonic()}
            try:
                if stream:
                    events = []
                    with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
                        result["status"] = response.status_code
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                events.append(line[len("data: "):])
                    chunks = [json.loads(e) for e in events if e.startswith("{")]
                    result["tokens"] = sum(1 for c in chunks for choice in c.get("choices", [])
                                           if choice["delta"].get("content"))
                    result["error_event"] = any("error" in c for c in chunks)
                    result["completion_tokens"] = next(
                        (c["usage"]["completion_tokens"] for c in chunks if c.get("usage")), None)
                    result["done"] = bool(events) and events[-1] == "[DONE]"
                else:
                    response = client.post(base + "/v1/chat/completions", json=body)
                    result["status"] = response.status_code
                    result["done"] = response.status_code == 200
            except httpx.HTTPError as exc:
                result["exception"] = repr(exc)
            result["ended_at"] = time.monotonic()
            results.append(result)


if __name__ == "__main__":
    sys.exit(main())
