"""Picking a port for a server that starts later: HAProxy's pages on a local cluster (:mod:`router.haproxy`), and the
tests' and scripts' API, metrics and dashboard ports (``tests/e2e/harness.py``)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's workers bind ports 10002-19999 (its min/max_worker_port); everything else a cluster starts binds ports the
# OS assigns from its ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range, 32768 up by default).
_FREE_PORTS_FROM = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a server that starts later: chosen between Ray's worker ports and the ephemeral range.
    A port the OS picked from the ephemeral range can be handed to another of the cluster's processes before the
    server binds it (HAProxy then dies with "address already in use"); one below that range is never handed out."""
    bind_host = host if host not in ("0.0.0.0", "::") else ""
    ephemeral_from = _ephemeral_ports_from()
    for _ in range(200 if ephemeral_from > _FREE_PORTS_FROM else 0):
        port = random.randrange(_FREE_PORTS_FROM, ephemeral_from)
        with socket.socket() as sock:
            try:
                sock.bind((bind_host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # an unusual ephemeral range: let the OS choose
        sock.bind((bind_host, 0))
        return sock.getsockname()[1]


def _ephemeral_ports_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
