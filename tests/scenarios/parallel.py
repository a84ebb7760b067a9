"""Replicas of several workers (tensor and pipeline parallel) on one ``ray.cluster_utils`` cluster: what they answer,
where their workers run, scaling by whole groups, and losing one worker.

Run by tests/e2e/test_parallel.py in its own process (a process joins one Ray cluster, and the test session's is
another); prints one JSON report on its last line:

    python -m tests.scenarios.parallel

The model is ``smollm2-tiny`` (2 attention heads, 2 layers: it splits in two either way), served three times:
``tiny-one`` with one worker, the reference; ``tiny-tp2`` with tensor parallel 2; ``tiny-pp2`` with pipeline parallel
2. Each multi-worker replica is the placement group a GPU replica is (a CPU bundle for the replica, one bundle per
worker) with vLLM's Ray executor in it. The cluster: a head holding the routers and the first two models' replicas
(``tensor_parallel_size`` groups are packed on one node), and two stage nodes that alone declare
``accelerator_type:stage``, which ``tiny-pp2`` asks for, one worker place each: its two stages must span them.

The phases, in this order (each needs the state the one before left):

1. ``answers``: greedy requests, streamed and not, to all three; what the test compares (tokens and log-probs).
2. ``placement``: each replica's ``engine_info`` (its workers, their processes and nodes).
3. ``scale``: ``tiny-tp2`` redeployed at two replicas; Ray's placement group table then holds two of its groups.
4. ``worker_loss``: one worker process of a ``tiny-tp2`` replica SIGKILLed, then requests at once; all must be
   answered, and the replica is replaced (new workers, the old group gone).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.harness import (
    ROOT,
    free_port,
    http_status,
    infos_by_replica,
    model_entry,
    run_phases,
    serve_document,
    start_serve_in_process,
    stop_serve_in_process,
    wait_for,
)

MODELS = {"tiny-one": {}, "tiny-tp2": {"tensor_parallel_size": 2},
          "tiny-pp2": {"pipeline_parallel_size": 2, "accelerator_type": "stage"}}
STAGE_NODES = 2
PROMPTS = ["Name three colours.", "Count from one to five."]
TOKENS = 12
# The random-weight model's greedy choice is a newline at every step; banning the two newline tokens makes its answers
# a walk through other tokens, so that equal answers say more.
NO_NEWLINES = {"198": -100, "1116": -100}
HANDLE_LOOP = asyncio.new_event_loop()
threading.Thread(target=HANDLE_LOOP.run_forever, daemon=True, name="serve-handles").start()


def app_args() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    base = model_entry(document, "smollm2-tiny")
    models = []
    for model_id, resources in MODELS.items():
        model = {**copy.deepcopy(base), "id": model_id, "resources": {"accelerator": "cpu", "cpus": 1, **resources}}
        if resources.get("pipeline_parallel_size", 1) > 1:
            # vLLM's CPU build sets up a later pipeline stage only while warming up compiled code (see
            # Resources.check_engine_args).
            model["engine_args"] = {k: v for k, v in model["engine_args"].items() if k != "enforce_eager"}
        if model_id == "tiny-tp2":
            # A replica that failed its health checks keeps its group until it has stopped, and the head has room
            # for two groups only: the replacement of the lost worker's replica waits for it.
            model["drain_timeout_s"] = 5
        models.append(model)
    return {"models": models, "routers": {"replicas": 1}}


def main() -> int:
    from router.launch import ray_process_env, ray_runtime_env

    # Before any Ray process starts: they inherit Ray's token and Serve's settings, as `make serve`'s do.
    os.environ.update({**ray_process_env("127.0.0.1"), "PYTHONPATH": ray_runtime_env()["env_vars"]["PYTHONPATH"]})
    from ray.cluster_utils import Cluster

    report: dict[str, Any] = {}
    cluster = None
    try:
        started = time.monotonic()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 10, "num_gpus": 4})
        for _ in range(STAGE_NODES):
            cluster.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:stage": 1})
        port = free_port()
        # HTTP on the head only: every node is this machine, and two proxies cannot share the port.
        start_serve_in_process(cluster.address, port, {"proxy_location": "HeadOnly"})
        from router.launch import deploy

        args = app_args()
        deploy(serve_document(args))
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_status(base + "/ready") == 200, 300, "the router's /ready")
        report["started_seconds"] = round(time.monotonic() - started, 1)
        run_phases(report, [("answers", lambda: answers(base)), ("placement", placement),
                            ("scale", lambda: scale(args)), ("worker_loss", lambda: lose_a_worker(base))], log)
    except Exception:
        report["error"] = traceback.format_exc()[-4000:]
    finally:
        stop_serve_in_process(reap=False)
        if cluster is not None:
            cluster.shutdown()
    print(json.dumps(report))
    return 0


def answers(base: str) -> dict[str, Any]:
    """Each model's greedy answer to each prompt, streamed and not: tokens and their log-probs (top 5)."""
    out: dict[str, Any] = {}
    with httpx.Client(timeout=300) as client:
        for model in MODELS:
            out[model] = [ask(client, base, model, prompt, stream) for prompt in PROMPTS for stream in (False, True)]
    return out


def ask(client: httpx.Client, base: str, model: str, prompt: str, stream: bool) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "temperature": 0, "logprobs": True, "top_logprobs": 5, "logit_bias": NO_NEWLINES, "stream": stream}
    if not stream:
        response = client.post(base + "/v1/chat/completions", json=body)
        if response.status_code != 200:
            return {"status": response.status_code, "body": response.text[:500]}
        choice = response.json()["choices"][0]
        return {"status": 200, "text": choice["message"]["content"], "logprobs": _positions(choice["logprobs"])}
    text, positions, events = "", [], []
    with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
        status = response.status_code
    for event in (json.loads(e) for e in events if e.startswith("{")):
        if "error" in event:
            return {"status": status, "error_event": event["error"]}
        for choice in event.get("choices", []):
            text += choice["delta"].get("content") or ""
            positions += _positions(choice.get("logprobs"))
    return {"status": status, "text": text, "logprobs": positions, "done": bool(events) and events[-1] == "[DONE]"}


def _positions(logprobs: dict | None) -> list[dict[str, Any]]:
    return [{"token": p["token"], "logprob": p["logprob"],
             "top": [[t["token"], t["logprob"]] for t in p["top_logprobs"]]}
            for p in (logprobs or {}).get("content") or []]


def placement() -> dict[str, Any]:
    """Each model's replica: its node and its workers (name, process, node), from ``engine_info``."""
    import ray

    nodes = {n["NodeID"]: ("stage" if n["Resources"].get("accelerator_type:stage") else "head")
             for n in ray.nodes() if n["Alive"]}
    return {"node_kinds": nodes, **{model: engine_info(model) for model in MODELS}}


def engine_info(model: str) -> dict[str, Any]:
    """Ask one of the model's replicas, through a Serve handle. In an event loop of its own that keeps running: this
    process runs Serve's handles as the routers do, in the caller's loop (`router.launch.ray_process_env`), and a
    handle keeps its replicas up to date only while that loop runs."""
    from ray import serve

    async def ask() -> dict[str, Any]:
        handle = serve.get_deployment_handle(f"engine-{model}", f"engine-{model}")
        return await asyncio.wait_for(handle.engine_info.remote(), 60)

    return asyncio.run_coroutine_threadsafe(ask(), HANDLE_LOOP).result()


def replica_infos(model: str, count: int) -> dict[int, dict]:
    return infos_by_replica(lambda: engine_info(model), count, model)


def scale(args: dict[str, Any]) -> dict[str, Any]:
    """``tiny-tp2`` at two replicas through Serve's declarative deploy; then its groups in Ray's table."""
    from ray import serve

    from router.launch import deploy

    scaled = copy.deepcopy(args)
    entry = next(m for m in scaled["models"] if m["id"] == "tiny-tp2")
    entry["autoscaling"] = {"min_replicas": 2, "max_replicas": 2}
    began = time.monotonic()
    deploy(serve_document(scaled))
    name = "engine-tiny-tp2"
    wait_for(lambda: serve.status().applications[name].deployments[name].replica_states.get("RUNNING") == 2, 600,
             "two tiny-tp2 replicas")
    return {"scaled_seconds": round(time.monotonic() - began, 1), "groups": placement_groups(),
            "replicas": replica_infos("tiny-tp2", 2)}


def placement_groups() -> list[dict[str, Any]]:
    """Ray's placement groups that hold resources now: their strategy, bundles and the node of each bundle."""
    from ray.util import placement_group_table

    return [{"name": pg["name"], "strategy": pg["strategy"], "bundles": list(pg["bundles"].values()),
             "nodes": list(pg["bundles_to_node_id"].values())}
            for pg in placement_group_table().values() if pg["state"] == "CREATED"]


def lose_a_worker(base: str) -> dict[str, Any]:
    """One worker of a ``tiny-tp2`` replica killed; requests sent at once are all answered; the replica is replaced."""
    began = time.monotonic()
    before = replica_infos("tiny-tp2", 2)
    log(f"both replicas' workers known after {time.monotonic() - began:.1f} s")
    victim_replica = min(before)
    victim = before[victim_replica]["workers"][-1]
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool, httpx.Client(timeout=600) as client:
        results = list(pool.map(lambda i: ask(client, base, "tiny-tp2", PROMPTS[i % 2], stream=i % 2 == 1), range(6)))
    answered = time.monotonic() - killed

    def replaced() -> dict[int, dict] | None:
        infos = replica_infos("tiny-tp2", 2)
        return infos if victim_replica not in infos and len(infos) == 2 else None

    after = wait_for(replaced, 600, "a replacement tiny-tp2 replica")
    return {"victim": victim, "victim_replica": victim_replica, "answered_seconds": round(answered, 1),
            "replaced_seconds": round(time.monotonic() - killed, 1), "results": results, "replicas_after": after,
            "groups_after": placement_groups()}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} parallel: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
