"""Drain this pod's Ray node before Kubernetes stops it; the chart's worker pods run it as their ``preStop`` hook:

    python -m deployments.kubernetes.node_drain --deadline-s 1200

Why: a worker pod asked to stop (a scale-down, an eviction, a node upgrade) would otherwise take its engine replicas
with it and cut their streams when Kubernetes' grace period ends. Asked first, Ray marks the node draining (``ray
drain-node``, with the time left before the pod is killed); Ray Serve then starts a replacement for each replica on
the node elsewhere and, once that one runs, stops the old one gracefully: after its requests end, within the model's
``drain_timeout_s``. This waits until no Serve replica is left on the node (or the deadline passed), and only then
lets the pod's containers stop. Nothing here moves a replica: Serve does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger("rayroute.drain")

# Serve's replica actors are named after their class: ServeReplica:<app>:<deployment>.
_REPLICA_CLASS_PREFIX = "ServeReplica:"


def serve_replicas_on(node_id: str) -> list[str]:
    """The live Serve replicas on the node (their actor class names), by Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000)
    return sorted(a.class_name for a in actors if a.class_name.startswith(_REPLICA_CLASS_PREFIX))


def request_drain(address: str, node_id: str, deadline_s: int, reason: str) -> None:
    """What ``ray drain-node`` does (its own code): GCS marks the node draining until the deadline; raises when the
    drain is refused."""
    from ray.scripts.scripts import drain_node

    drain_node.main(["--address", address, "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                     "--reason-message", reason, "--deadline-remaining-seconds", str(deadline_s)],
                    standalone_mode=False)


# A replica still serving at the drain's deadline is stopped by Serve then (its streams go on elsewhere); its actor
# takes a moment to go, which the hook waits for past the deadline (the chart's grace period leaves it room).
DEADLINE_SETTLE_S = 5.0


def drain(address: str, node_id: str, deadline_s: int, reason: str = "the pod is stopping",
          poll_s: float = 2.0) -> list[str]:
    """Drain the node and wait until Serve has moved every replica off it; returns the replicas still there a few
    seconds after the deadline (none, normally)."""
    deadline = time.monotonic() + deadline_s + DEADLINE_SETTLE_S
    request_drain(address, node_id, deadline_s, reason)
    while (left := serve_replicas_on(node_id)) and time.monotonic() < deadline:
        logger.info("waiting for %d Serve replica(s) to leave node %s: %s", len(left), node_id, ", ".join(left))
        time.sleep(poll_s)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline-s", type=int, required=True,
                        help="Seconds until the pod is killed (its terminationGracePeriodSeconds, less a margin).")
    parser.add_argument("--address", default="auto", help="The Ray cluster (default: the one this node is in).")
    parser.add_argument("--node-id", help="The node to drain (default: this pod's).")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node_drain %(message)s")

    import ray

    ray.init(address=options.address, log_to_driver=False, logging_level=logging.WARNING)
    node_id = options.node_id or ray.get_runtime_context().get_node_id()  # a driver joins its own node's raylet
    address = ray.get_runtime_context().gcs_address
    started = time.monotonic()
    left = drain(address, node_id, options.deadline_s)
    if left:
        logger.warning("deadline reached with %d Serve replica(s) still on node %s: %s", len(left), node_id,
                       ", ".join(left))
        return 1
    logger.info("node %s drained in %.0fs", node_id, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
