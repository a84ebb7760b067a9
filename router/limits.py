"""Per-key request and token limits, shared by every router replica.

Each limited key has two token buckets, as OpenAI's limits behave: one of requests, one of tokens, each holding a
minute's allowance and refilling continuously, so a key may burst up to its limit and then gets its allowance
back at the per-minute rate. A request is admitted while both buckets hold something; it takes one request
when admitted and is charged its actual tokens (prompt + completion) when it ends, so the token bucket can go
below zero by what the last requests used, and the next ones wait until it refills.

The buckets live in one :class:`KeyLimits` replica that every router replica asks, so a limit holds however many
ingress replicas there are. Only keys with a limit cost that call; unlimited keys never leave the router.

Every answer to a limited key carries OpenAI's headers::

    x-ratelimit-limit-requests: 60        x-ratelimit-limit-tokens: 10000
    x-ratelimit-remaining-requests: 59    x-ratelimit-remaining-tokens: 9871
    x-ratelimit-reset-requests: 1s        x-ratelimit-reset-tokens: 774ms
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``capacity`` per minute, refilled continuously; ``level`` may go negative after a charge."""

    capacity: float
    level: float = field(default=-1.0)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds ``level`` (0 when it does already)."""
        return max(0.0, (min(level, self.capacity) - self.level) * 60.0 / self.capacity)


@dataclass(frozen=True)
class Admission:
    allowed: bool
    headers: dict[str, str]
    limited_by: str | None = None  # "requests" or "tokens" when refused
    retry_after_s: float = 0.0


class KeyLimits:
    """The buckets of every limited key; a Serve deployment with one replica (see ``router.app``).

    Limits are passed with each call rather than configured here, so this replica holds no key material: a key
    is known to it only by its configured name.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def admit(self, name: str, requests_per_minute: int | None, tokens_per_minute: int | None,
              now: float | None = None) -> Admission:
        now = time.monotonic() if now is None else now
        requests = self._bucket(name, "requests", requests_per_minute, now)
        tokens = self._bucket(name, "tokens", tokens_per_minute, now)
        if requests is not None and requests.level < 1:
            return self._refusal("requests", requests.seconds_until(1), requests, tokens)
        if tokens is not None and tokens.level <= 0:
            return self._refusal("tokens", tokens.seconds_until(1), requests, tokens)
        if requests is not None:
            requests.level -= 1
        return Admission(True, rate_limit_headers(requests, tokens))

    def charge(self, name: str, tokens_per_minute: int | None, tokens: int, now: float | None = None) -> None:
        bucket = self._bucket(name, "tokens", tokens_per_minute, time.monotonic() if now is None else now)
        if bucket is not None:
            bucket.level -= tokens

    def _bucket(self, name: str, kind: str, per_minute: int | None, now: float) -> TokenBucket | None:
        if not per_minute:
            return None
        bucket = self._buckets.get((name, kind))
        if bucket is None or bucket.capacity != per_minute:  # new key, or its limit changed with a redeploy
            bucket = self._buckets[(name, kind)] = TokenBucket(per_minute, updated=now)
        bucket.refill(now)
        return bucket

    @staticmethod
    def _refusal(kind: str, wait_s: float, requests: TokenBucket | None, tokens: TokenBucket | None) -> Admission:
        return Admission(False, rate_limit_headers(requests, tokens), kind, wait_s)


def rate_limit_headers(requests: TokenBucket | None, tokens: TokenBucket | None) -> dict[str, str]:
    headers = {}
    for kind, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.seconds_until(bucket.capacity))
    return headers


def duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations): ``0s``, ``250ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text
