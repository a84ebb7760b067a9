"""A limited key's turn: admitted against its limits before any engine is asked, and released when it ends.

The limits themselves (buckets, slots, reservations) live in the one :class:`router.limits.KeyLimits` replica every
router replica asks; this is the router's side of that call. :class:`Admitter` asks it, within a bounded wait, and
turns a refusal into the 429 saying which limit refused; a :class:`Hold` is what an admitted request carries until
its end, so its slot and unused tokens go back exactly once, however it ends. A key without limits never leaves the
router: its hold is empty.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.api_keys import ApiKey
from deployments.config import Routers
from deployments.constants import (
    KEY_LIMITS_RETRY_AFTER_S,
    KEY_LIMITS_TIMEOUT_S,
    KEY_LIMITS_WARN_EVERY_S,
    RESERVATION_MARGIN_S,
)
from deployments.replies import ErrorReply
from router.dispatch import cancel
from router.errors import OpenAIError
from router.limits import Admission
from router.protocol import RequestBody, completion_tokens_limit, output_count, prompt_tokens_estimate
from router.telemetry import RequestRecord

logger = logging.getLogger("rayroute.router")


class Hold:
    """A request's admission against its key's limits: the rate-limit headers its answers carry, and the
    reservation to release when it ends.

    Every way a request ends reaches :meth:`release` (a whole answer, an error reply or raised error, a stream's
    end, a client that left, a stream never started), and only the first call does anything, so the key's slot and
    unused tokens come back exactly once. The tokens charged are the request's own count at that moment. Not
    awaited: no answer waits for the bookkeeping, and a key-limits replica that is gone must not fail a request
    that is done (its reservation then expires there)."""

    def __init__(self, limits: DeploymentHandle | None = None, reservation: str | None = None,
                 record: RequestRecord | None = None, headers: dict[str, str] | None = None):
        self.limits = limits
        self.reservation = reservation
        self.record = record
        self.headers = headers or {}

    def release(self) -> None:
        if self.reservation is None or self.limits is None or self.record is None:
            return
        reservation, self.reservation = self.reservation, None
        try:
            self.limits.release.remote(reservation, self.record.prompt_tokens + self.record.completion_tokens)
        except Exception:
            logger.warning("could not release a key-limits reservation; it expires on its own", exc_info=True)


class Admitter:
    """Admits requests of limited keys through ``limits``, the handle of the shared :class:`KeyLimits` replica
    (None: no limits are kept, every request is admitted), as the routers' settings say."""

    def __init__(self, limits: DeploymentHandle | None, settings: Routers):
        self.limits = limits
        self.refuse_unchecked = settings.key_limits_unavailable == "refuse"
        self.default_completion_tokens = settings.default_completion_tokens
        self.warned_at = -float("inf")  # when unreachable key limits were last logged

    async def admit(self, key: ApiKey | None, body: RequestBody, record: RequestRecord, lifetime_s: float) -> Hold:
        """A limited key's turn: its slot and the request's token reservation taken (:mod:`router.limits`), or a
        429 saying which limit refused it. ``lifetime_s`` is the longest the request can live: a reservation left
        unreleased past it (and a margin) was held by a router that died. The key-limits replica gets a bounded
        wait; past it, or when the call fails, ``routers.key_limits_unavailable`` decides (:meth:`_unavailable`)."""
        if key is None or not key.limited or self.limits is None:
            return Hold()
        tokens = self.reservation(key, body)
        call = None
        reservation = uuid.uuid4().hex  # ours, so that an admission we stop waiting for can be released
        try:
            call = self.limits.admit.remote(key.name, key.requests_per_minute, key.tokens_per_minute, tokens,
                                            key.max_concurrent_requests, lifetime_s + RESERVATION_MARGIN_S,
                                            reservation=reservation)
            async with asyncio.timeout(KEY_LIMITS_TIMEOUT_S):
                admission: Admission = await call
        except (TimeoutError, RayError, RayServeException) as exc:  # the replica is slow, gone or unreachable
            cancel(call)
            # A slow replica may still admit it: released now, it will hold nothing of the key's when it does.
            Hold(self.limits, reservation, record).release()
            return self._unavailable(exc)
        headers = dict(admission.headers)
        if admission.allowed:
            return Hold(self.limits, admission.reservation, record, headers)
        raise OpenAIError(refusal(key, admission, tokens), headers=headers)

    def reservation(self, key: ApiKey, body: RequestBody) -> int:
        """The tokens the request may cost, reserved against the key's tokens per minute at admission: its
        prompt's estimate, and for each output its ``max_tokens``, or when unset the configured default, but no
        more of that than the key's minute leaves after the prompt (the client asked for no particular length, so
        it is not refused as too large)."""
        if not key.tokens_per_minute:
            return 0
        prompt = prompt_tokens_estimate(body)
        outputs = output_count(body)
        asked = completion_tokens_limit(body)
        if asked is not None:
            return prompt + outputs * asked
        default = outputs * self.default_completion_tokens
        return prompt + min(default, max(0, key.tokens_per_minute - prompt))

    def _unavailable(self, exc: Exception) -> Hold:
        """The key-limits replica did not answer: refuse (503, so no key exceeds its limits) or admit without
        limits, as ``routers.key_limits_unavailable`` says; logged once a period, not once per request."""
        now = time.monotonic()
        if now - self.warned_at >= KEY_LIMITS_WARN_EVERY_S:
            self.warned_at = now
            logger.warning("key limits unavailable (%s); %s limited keys' requests until they answer again",
                           type(exc).__name__ if not isinstance(exc, TimeoutError)
                           else f"no answer within {KEY_LIMITS_TIMEOUT_S:g}s",
                           "refusing" if self.refuse_unchecked else "admitting without limits")
        if self.refuse_unchecked:
            raise OpenAIError(ErrorReply.server("Rate limits cannot be checked right now. Retry shortly.",
                                                status=503, code="limits_unavailable",
                                                retry_after_s=KEY_LIMITS_RETRY_AFTER_S))
        return Hold()


def refusal(key: ApiKey, admission: Admission, tokens: int) -> ErrorReply:
    """The 429 for a refused admission, naming the limit that refused it."""
    if admission.oversize:
        return ErrorReply.rate_limit(
            f"Request too large for `{key.name}` on tokens per minute: limit {key.tokens_per_minute}, requested "
            f"{tokens} (the prompt's estimate and the completion tokens it may generate, `n` × `max_tokens`). "
            "Reduce the prompt, `max_tokens` or `n`.", code="rate_limit_exceeded")
    if admission.limited_by == "concurrent":
        return ErrorReply.rate_limit(
            f"Too many concurrent requests for `{key.name}`: at most {key.max_concurrent_requests} at once. Retry "
            "when one has finished.", code="concurrency_limit_exceeded", retry_after_s=admission.retry_after_s)
    return ErrorReply.rate_limit(
        f"Rate limit reached for `{key.name}` on {admission.limited_by} per minute. Retry in "
        f"{admission.retry_after_s:.1f}s.", code="rate_limit_exceeded", retry_after_s=admission.retry_after_s)
