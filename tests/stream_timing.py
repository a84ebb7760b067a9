"""Timing streams as a client sees them, and the arithmetic of the reports: shared by the load test, the load
and big-body scenarios and the benchmarks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psutil

# --- timing a stream as a client sees it -----------------------------------------------------------------------

@dataclass
class StreamTiming:
    """One streamed response as its client saw it: when each server-sent event arrived, on the client's clock.
    The benchmark and the load script time streams with this one reader (:func:`read_stream`), so their TTFT and
    gap figures mean the same thing. Reading costs a count per socket read and no parsing, so a thousand streams in
    one client process measure the server, not the client; what is parsed is parsed after the stream ended."""

    started: float = 0.0  # request sent
    ended: float = 0.0  # response over (or failed)
    # One per event (its closing blank line), the time of the socket read that brought it: events that arrived
    # together share a time.
    arrivals: list[float] = field(default_factory=list)
    head: bytes = b""  # the start of the stream, through its first event (at most 8 kB)
    tail: bytes = b""  # its last 1 kB: the last chunk and ``data: [DONE]``
    events: list[bytes] | None = None  # every event's bytes, in order, if the caller asked for them ([] to ask)

    @property
    def first_at(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def ttft(self) -> float | None:
        """Request sent → first event in."""
        return self.arrivals[0] - self.started if self.arrivals else None

    def gaps(self) -> list[float]:
        """Between consecutive events, without the last (to ``[DONE]``, sent right after the last token, so it
        says nothing of the token cadence)."""
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:-1], strict=False)]


async def read_stream(chunks: AsyncIterator[bytes], timing: StreamTiming) -> None:
    """Read a response body to its end into ``timing``, stamping each event as the read that completes it comes."""
    pending = b""
    async for data in chunks:
        now = time.perf_counter()
        ends = (timing.tail[-1:] + data).count(b"\n\n")  # an event's end may straddle two reads
        if ends:
            timing.arrivals.extend([now] * ends)
        if len(timing.head) < 8192 and b"\n\n" not in timing.head:
            timing.head += data
        timing.tail = (timing.tail + data)[-1024:]
        if timing.events is not None:
            *complete, pending = (pending + data).split(b"\n\n")
            timing.events.extend(complete)


# --- reports ----------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU the processes have used so far (those that are gone count 0)."""
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy: beside ours, this shows any other work that shared the cores."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


