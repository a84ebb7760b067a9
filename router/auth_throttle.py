"""Failed keys throttled per client address: a client that keeps sending a missing or wrong key is told to stop.

Each client address has a token bucket of failures (:data:`~deployments.constants.AUTH_FAILURE_BURST`, one more
every :data:`~deployments.constants.AUTH_FAILURE_REFILL_S`). A 401 takes one; when none is left, a missing or wrong
key gets 429 ``rate_limit_error``, code :data:`THROTTLED_CODE`, with ``Retry-After`` instead, so a client stuck on a
revoked key backs off (the OpenAI SDK honours it), and the router logs once which address that is.

Only failures are counted and only failures are answered 429: the key is still checked, and a correct one passes,
so a client behind the same NAT or proxy as a guesser is never locked out. That also means the throttle cannot slow
a guesser who waits for a 200; what keeps guessing hopeless is the keys' length
(:data:`~deployments.constants.MIN_API_KEY_LENGTH`).

The table is bounded: at most :data:`~deployments.constants.AUTH_FAILURE_MAX_ADDRESSES` addresses, the least
recently failed dropped first (a dropped address starts again with a full bucket). Each router replica keeps its
own: a client spread over N replicas gets N bursts, which bounds it as well and costs no remote call per failure.

The client address is the one HAProxy accepted the connection from (:class:`ClientAddresses`), not the socket
peer, which is HAProxy itself.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from deployments.constants import (
    AUTH_FAILURE_BURST,
    AUTH_FAILURE_IPV6_PREFIX,
    AUTH_FAILURE_MAX_ADDRESSES,
    AUTH_FAILURE_REFILL_S,
    TRUSTED_PROXY_NETWORKS,
)
from deployments.replies import ErrorReply

THROTTLED_CODE = "too_many_failed_auth_attempts"
# A peer that is not an IP address (a test client's name, a Unix socket) is kept as at most this much of its text.
_MAX_ADDRESS_TEXT = 64
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger("rayroute.router")


def _ip(text: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:10.0.0.1 is 10.0.0.1
        return ip.ipv4_mapped
    return ip


class ClientAddresses:
    """Which address a request came from: ``X-Forwarded-For`` as the trusted proxies wrote it, else the peer."""

    def __init__(self, trusted: Iterable[str] = TRUSTED_PROXY_NETWORKS, hops: int = 0):
        self.trusted = [ipaddress.ip_network(network) for network in trusted]
        self.hops = hops

    def __call__(self, peer: str | None, forwarded_for: list[str]) -> str:
        """The client's address, as text: the peer's, unless the peer is a trusted proxy (HAProxy), in which case
        the ``X-Forwarded-For`` entry it appended, or ``hops`` further from the end for the proxies in front of it.
        ``forwarded_for`` is every ``X-Forwarded-For`` header, in order (HAProxy adds a header of its own after what
        the client sent). An IPv6 address stands for its /64 (see AUTH_FAILURE_IPV6_PREFIX)."""
        peer_ip = _ip(peer) if peer else None
        if peer_ip is None:
            return (peer or "unknown")[:_MAX_ADDRESS_TEXT]
        client = peer_ip
        if any(peer_ip in network for network in self.trusted):
            entries = [entry for header in forwarded_for for entry in header.split(",") if entry.strip()]
            if entries:
                # Fewer entries than expected: the request skipped a proxy in front, and wrote none of them itself.
                chosen = _ip(entries[-min(self.hops + 1, len(entries))])
                # An entry that is no address: a proxy's wrong count took one the client wrote. The peer, then.
                client = chosen if chosen is not None else peer_ip
        if isinstance(client, ipaddress.IPv6Address):
            return str(ipaddress.ip_network((client, AUTH_FAILURE_IPV6_PREFIX), strict=False))
        return str(client)


class FailedAuthThrottle:
    """Token buckets of authentication failures, by client address."""

    def __init__(self, burst: int = AUTH_FAILURE_BURST, refill_s: float = AUTH_FAILURE_REFILL_S,
                 max_addresses: int = AUTH_FAILURE_MAX_ADDRESSES, clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.refill_s = refill_s
        self.max_addresses = max_addresses
        self.clock = clock
        # address → (failures left, when counted, whether its throttling was logged); least recent first
        self._buckets: OrderedDict[str, tuple[float, float, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def failed(self, address: str) -> float | None:
        """Count a failed authentication from ``address``: ``None`` when it may still be told 401, else the seconds
        until it may fail again, and it is told 429 (such a failure takes nothing: the bucket is empty, and the wait
        stays the true one)."""
        now = self.clock()
        left, since, warned = self._buckets.pop(address, (float(self.burst), now, False))
        left = min(float(self.burst), left + (now - since) / self.refill_s)
        warned = warned and left < self.burst  # said once until it stops failing for a whole burst's refill
        if left >= 1:
            left, wait = left - 1, None
        else:
            wait = (1 - left) * self.refill_s
            if not warned:
                logger.warning("%s: over %d requests with a missing or wrong API key; such requests get 429 until "
                               "they slow to one every %gs", address, self.burst, self.refill_s)
                warned = True
        self._buckets[address] = (left, now, warned)  # last: the most recently failed
        if len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def reply(wait_s: float) -> ErrorReply:
        return ErrorReply.rate_limit("Too many requests with a missing or wrong API key from this address. Retry "
                                     f"in {math.ceil(wait_s)}s.", code=THROTTLED_CODE, retry_after_s=wait_s)
