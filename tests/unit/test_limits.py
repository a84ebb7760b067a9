"""The key-limits replica's rules (router/limits.py), asked directly: token buckets that refill at the per-minute
rate, releases that settle a reservation both ways, reservations that expire with their router, admissions released
before they are made, and reset durations in OpenAI's form. Through a router: ``test_admission.py``.
"""

from __future__ import annotations

import pytest

from deployments.constants import RESERVATION_MARGIN_S, RESERVATION_SWEEP_S
from router.limits import KeyLimits, duration


def test_token_bucket_refills_at_the_per_minute_rate() -> None:
    limits = KeyLimits()
    assert limits.admit("k", 60, None, now=0).allowed
    for _ in range(59):
        limits.admit("k", 60, None, now=0)
    refused = limits.admit("k", 60, None, now=0)
    assert not refused.allowed and refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    assert limits.admit("k", 60, None, now=1.0).allowed  # one a second comes back
    held = limits.admit("k", None, 100, 10, now=1.0)
    limits.release(held.reservation, 150, now=1.0)  # 150 used of the 10 reserved
    tokens = limits.admit("k", None, 100, now=1.0)
    assert not tokens.allowed and tokens.limited_by == "tokens"
    assert tokens.retry_after_s == pytest.approx(51 * 0.6)  # from -50 to 1 at 100/min
    assert limits.admit("k", None, 100, now=1.0 + 31).allowed


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"),
                                               (360, "6m0s"), (3723, "1h2m3s")])
def test_reset_durations_read_like_openai(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_releases_settle_tokens_both_ways() -> None:
    limits = KeyLimits()
    admitted = limits.admit("k", None, 600, 100, now=0)
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "500"
    limits.release(admitted.reservation, 30, now=0)  # 70 come back
    assert limits.admit("k", None, 600, 0, now=0).headers["x-ratelimit-remaining-tokens"] == "570"
    over = limits.admit("k", None, 600, 10, now=0)
    limits.release(over.reservation, 580, now=0)  # 570 more than reserved: the bucket goes below zero
    refused = limits.admit("k", None, 600, 10, now=0)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(20 * 0.1)  # from -10 to 10 at 10 a second


def test_a_reservation_never_released_expires() -> None:
    """A router that dies holding a request cannot release it: past its expiry the slot comes back and its tokens
    stay spent; its late release, if any, touches nothing of the request admitted since."""
    limits = KeyLimits()
    leaked = limits.admit("k", None, 100, 40, 1, hold_s=10, now=0)
    assert leaked.allowed and limits.in_flight("k") == 1
    waiting = limits.admit("k", None, 100, 1, 1, hold_s=10, now=5)
    assert not waiting.allowed and waiting.limited_by == "concurrent"
    later = limits.admit("k", None, 100, 1, 1, hold_s=10, now=11)
    assert later.allowed and limits.in_flight("k") == 1
    # 40 reserved and never settled: spent. 11 s refilled 18.3 of them, capped at the 100 a minute.
    assert later.headers["x-ratelimit-remaining-tokens"] == str(int(min(100, 60 + 11 * 100 / 60) - 1))
    limits.release(leaked.reservation, 0, now=12)
    assert limits.in_flight("k") == 1  # the expired reservation's release is ignored: not the live one's slot
    limits.release(later.reservation, 1, now=12)
    limits.release(later.reservation, 1, now=12)  # twice: nothing more
    assert limits.in_flight("k") == 0


def test_an_admission_released_before_it_is_made_holds_nothing() -> None:
    """A router gave up waiting for a slow replica and released its reservation; the admission, arriving after
    that, takes neither a slot nor tokens (else a key limited to one request at a time would be locked out until
    the reservation expired)."""
    limits = KeyLimits()
    limits.release("given-up", 0, now=0)
    late = limits.admit("k", 10, 100, 40, 1, now=1, reservation="given-up")
    assert not late.allowed and limits.in_flight("k") == 0 and not limits._reservations
    fresh = limits.admit("k", 10, 100, 40, 1, now=2, reservation="next")
    assert fresh.allowed and fresh.reservation == "next"
    assert fresh.headers["x-ratelimit-remaining-tokens"] == "60"
    assert fresh.headers["x-ratelimit-remaining-requests"] == "9"
    limits.release("forgotten", 0, now=3)
    limits.admit("other", None, None, 0, 1, now=3 + RESERVATION_MARGIN_S + RESERVATION_SWEEP_S)
    assert "forgotten" not in limits._abandoned  # remembered for a while only: no unbounded growth
