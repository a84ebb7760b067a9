"""A node leaving gracefully under load: a head and three worker raylets on this machine
(``ray.cluster_utils.Cluster``), the default model's two replicas on two of the workers, steady streaming and
non-streaming traffic, and one engine's worker drained the way the chart's ``preStop`` hook drains a pod
(``python -m deployments.kubernetes.node_drain``), then removed.

Run by tests/e2e/test_node_failure.py in its own process, like tests/scenarios/node_failure.py; prints one JSON
report on its last line:

    python -m tests.scenarios.node_drain [--model-source PATH]

What a client must see: nothing. Serve starts a replacement on the spare worker and stops the drained replica only
after its requests ended, so no request fails and no stream breaks; the hook returns once no replica is left on the
node, which is then removed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import httpx

from tests.e2e.harness import ROOT, free_port, serve_document, start_serve_in_process, stop_serve_in_process
from tests.scenarios.node_failure import ASK, MODEL, app_args, load, replica_nodes

DRAIN_DEADLINE_S = 400
# Clients streaming and not: enough for requests in flight at the drain's start and throughout, few enough that the
# replacement's start (on two cores shared with the engines) does not wait on them.
LOAD_THREADS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-source", default="~/.cache/rayroute/models/smollm2-135m-instruct")
    options = parser.parse_args(argv)

    from ray.cluster_utils import Cluster

    from router.launch import deploy, ray_process_env

    port = free_port()
    os.environ.update(ray_process_env("127.0.0.1"))  # as `make serve` and the chart run Serve (see node_failure)
    # One CPU each: the router on the head, the two engine replicas on two workers, the third worker free for the
    # replacement.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = {node.node_id: node for node in (cluster.add_node(num_cpus=1) for _ in range(3))}
    report: dict = {"port": port}
    stop = threading.Event()
    try:
        start_serve_in_process(cluster.address, port, serve_options={"proxy_location": "HeadOnly"})
        deploy(serve_document(app_args(options.model_source)))
        base = f"http://127.0.0.1:{port}"
        before = replica_nodes("engine-")
        report["engine_nodes_before"] = sorted(before)
        victim = next(node for node in before if node in workers)

        results: list[dict] = []
        threads = [threading.Thread(target=load, args=(base, i, stop, results)) for i in range(LOAD_THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(8)  # traffic on both replicas
        report["drain_started"] = drain_started = time.monotonic()
        hook = subprocess.run([sys.executable, "-m", "deployments.kubernetes.node_drain", "--address", cluster.address,
                               "--node-id", victim, "--deadline-s", str(DRAIN_DEADLINE_S)],
                              cwd=ROOT, capture_output=True, text=True, timeout=DRAIN_DEADLINE_S + 60)
        report["drain_seconds"] = time.monotonic() - drain_started
        report["hook_exit"], report["hook_output"] = hook.returncode, (hook.stdout + hook.stderr)[-3000:]
        after = replica_nodes("engine-")
        report["engine_nodes_after"] = sorted(after)
        report["victim_replicas_after"] = after.count(victim)
        cluster.remove_node(workers[victim])  # what Kubernetes does once the hook returned
        time.sleep(10)  # traffic on the replacement
        stop.set()
        for thread in threads:
            thread.join(timeout=200)
        report["hung_threads"] = sum(thread.is_alive() for thread in threads)
        report["in_flight_at_drain"] = sum(1 for r in results
                                           if r["started_at"] < drain_started < r.get("ended_at", 0))
        report["during_drain"] = sum(1 for r in results
                                     if drain_started <= r["started_at"] < drain_started + report["drain_seconds"])
        report["results"] = results
        final = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4},
                           timeout=120)
        report["after_status"] = final.status_code
    finally:
        stop.set()
        stop_serve_in_process(reap=False)
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
