"""Per-key limits, shared by every router replica: requests and tokens per minute, and requests at once.

Each limited key has two token buckets, as OpenAI's limits behave: one of requests, one of tokens, each holding a
minute's allowance and refilling continuously, so a key may burst up to its limit and then gets its allowance
back at the per-minute rate. A key may also have a number of requests it can have in flight at once.

A request's cost is taken before any engine works on it, so no key gets ahead of its limits by sending many
requests at once before the first of them is charged. Admission (:meth:`KeyLimits.admit`) takes one request, a
concurrency slot, and a reservation of tokens: the router's estimate of the prompt plus the most the request may
generate (``n`` × ``max_tokens``). A request is admitted only if its key's bucket holds that whole reservation; one
whose reservation exceeds the key's whole minute can never be, and is refused as too large rather than left to
wait. When the request ends, however it ends, its router releases the reservation (:meth:`KeyLimits.release`) with
the tokens it actually used: the slot is freed and the difference goes back to the bucket (or, when the estimate
fell short, the rest is taken, so the bucket can go below zero and the next requests wait until it refills).

The buckets live in one :class:`KeyLimits` replica that every router replica asks, so a limit holds however many
ingress replicas there are. Only keys with a limit cost that call; unlimited keys never leave the router. A router
replica that dies cannot release what it holds, so every reservation carries an expiry, past the longest its
request can live: an expired one is dropped, its slot freed and its tokens counted as used.

Every answer to a limited key carries OpenAI's headers, the remaining tokens net of what is reserved::

    x-ratelimit-limit-requests: 60        x-ratelimit-limit-tokens: 10000
    x-ratelimit-remaining-requests: 59    x-ratelimit-remaining-tokens: 9871
    x-ratelimit-reset-requests: 1s        x-ratelimit-reset-tokens: 774ms
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from deployments.constants import CONCURRENCY_RETRY_AFTER_S, RESERVATION_MARGIN_S, RESERVATION_SWEEP_S

LimitKind = Literal["requests", "tokens", "concurrent"]


@dataclass
class TokenBucket:
    """``capacity`` per minute, refilled continuously; ``level`` may go negative when a request used more than it
    reserved."""

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
    limited_by: LimitKind | None = None  # when refused
    retry_after_s: float = 0.0
    # Admitted: what the router passes to :meth:`KeyLimits.release` when the request ends (None: nothing to
    # release, the key has only a requests limit).
    reservation: str | None = None
    # Refused because the request reserves more tokens than the key's whole minute holds: no wait would admit it.
    oversize: bool = False


@dataclass
class _Reservation:
    name: str
    tokens: int
    slot: bool
    expires_at: float


class KeyLimits:
    """The buckets, slots and reservations of every limited key; a Serve deployment with one replica (see
    ``router.app``).

    Limits are passed with each call rather than configured here, so this replica holds no key material: a key
    is known to it only by its configured name.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._in_flight: dict[str, int] = {}  # key name → slots its reservations hold
        # Reservations released before they were made: the router stopped waiting for the admission (this replica
        # answered too slowly) and released it at once; the admission, if it still comes, must then hold nothing.
        self._abandoned: dict[str, float] = {}  # reservation → until when it is remembered
        self._next_sweep = -math.inf

    def admit(self, name: str, requests_per_minute: int | None, tokens_per_minute: int | None, tokens: int = 0,
              max_concurrent: int | None = None, hold_s: float = 3600.0, now: float | None = None,
              reservation: str | None = None) -> Admission:
        """Admit a request of key ``name`` that reserves ``tokens``, or say which limit refuses it and for how long.

        ``hold_s`` is how long the reservation may stay unreleased before it is taken for leaked. ``reservation``
        is the router's id for it, so the router can release an admission it stopped waiting for."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if reservation is not None and self._abandoned.pop(reservation, None) is not None:
            return Admission(False, {})  # its router gave up on it and has answered its client already
        requests = self._bucket(name, "requests", requests_per_minute, now)
        bucket = self._bucket(name, "tokens", tokens_per_minute, now)
        need = max(1, tokens)  # a key in overdraft waits even for a request that reserves nothing
        if bucket is not None and need > bucket.capacity:
            return Admission(False, rate_limit_headers(requests, bucket), "tokens", 0.0, oversize=True)
        if max_concurrent and self._in_flight.get(name, 0) >= max_concurrent:
            return Admission(False, rate_limit_headers(requests, bucket), "concurrent", CONCURRENCY_RETRY_AFTER_S)
        if requests is not None and requests.level < 1:
            return Admission(False, rate_limit_headers(requests, bucket), "requests", requests.seconds_until(1))
        if bucket is not None and bucket.level < need:
            return Admission(False, rate_limit_headers(requests, bucket), "tokens", bucket.seconds_until(need))
        if requests is not None:
            requests.level -= 1
        reserved = tokens if bucket is not None else 0
        if bucket is not None:
            bucket.level -= reserved
        if bucket is None and not max_concurrent:
            reservation = None  # nothing to give back
        else:
            reservation = reservation or uuid.uuid4().hex  # never reused, even by a restarted replica
            self._reservations[reservation] = _Reservation(name, reserved, bool(max_concurrent), now + hold_s)
            if max_concurrent:
                self._in_flight[name] = self._in_flight.get(name, 0) + 1
        return Admission(True, rate_limit_headers(requests, bucket), reservation=reservation)

    def release(self, reservation: str, tokens: int, now: float | None = None) -> None:
        """The request holding ``reservation`` ended having used ``tokens``: free its slot and settle its tokens.
        Releasing twice, or after the reservation expired, does nothing; releasing one not made yet abandons it."""
        now = time.monotonic() if now is None else now
        held = self._reservations.pop(reservation, None)
        if held is None:
            self._abandoned[reservation] = now + RESERVATION_MARGIN_S
            return
        self._free_slot(held)
        bucket = self._buckets.get((held.name, "tokens"))
        if bucket is not None:
            bucket.refill(now)
            bucket.level = min(bucket.capacity, bucket.level + held.tokens - tokens)

    def in_flight(self, name: str) -> int:
        """Requests of key ``name`` holding a concurrency slot."""
        return self._in_flight.get(name, 0)

    def _expire(self, now: float) -> None:
        """Drop reservations whose router never released them (it died): their slots come back, their tokens stay
        spent, as the request may well have used them. A scan every few seconds, of the reservations in flight."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + RESERVATION_SWEEP_S
        for reservation, held in list(self._reservations.items()):
            if held.expires_at <= now:
                del self._reservations[reservation]
                self._free_slot(held)
        for reservation, until in list(self._abandoned.items()):
            if until <= now:
                del self._abandoned[reservation]

    def _free_slot(self, held: _Reservation) -> None:
        if held.slot:
            left = self._in_flight.get(held.name, 0) - 1
            if left > 0:
                self._in_flight[held.name] = left
            else:
                self._in_flight.pop(held.name, None)

    def _bucket(self, name: str, kind: str, per_minute: int | None, now: float) -> TokenBucket | None:
        if not per_minute:
            return None
        bucket = self._buckets.get((name, kind))
        if bucket is None or bucket.capacity != per_minute:  # new key, or its limit changed with a redeploy
            bucket = self._buckets[(name, kind)] = TokenBucket(per_minute, updated=now)
        bucket.refill(now)
        return bucket


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
