"""The stream timer the load scenario and the benchmarks share (:mod:`tests.stream_timing`)."""

from __future__ import annotations

import asyncio

import pytest

from tests.stream_timing import StreamTiming, read_stream


def test_one_reader_times_events_as_their_reads_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream timer the load script and the benchmark share: an event counts when the read that ends it comes,
    an end split across reads counts once, events in one read share a time, and the gap to [DONE] is left out."""
    clock = iter([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr("tests.stream_timing.time.perf_counter", lambda: next(clock))

    async def reads():
        for data in (b'data: {"a":1}\n', b'\ndata: {"a":2}\n\ndata: {"a":3}\n\n', b"data: {", b'"a":4}\n\n',
                     b"data: [DONE]\n\n"):
            yield data

    timing = StreamTiming(started=0.5, events=[])
    asyncio.run(read_stream(reads(), timing))
    assert timing.arrivals == [2.0, 2.0, 2.0, 4.0, 5.0]  # reads 1 and 3 end no event
    assert timing.events == [b'data: {"a":1}', b'data: {"a":2}', b'data: {"a":3}', b'data: {"a":4}',
                             b"data: [DONE]"]
    assert timing.ttft == 1.5 and timing.first_at == 2.0
    assert timing.gaps() == [0.0, 0.0, 2.0]
    assert timing.head == b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: {"a":3}\n\n'
    assert timing.tail.endswith(b'data: {"a":4}\n\ndata: [DONE]\n\n')
