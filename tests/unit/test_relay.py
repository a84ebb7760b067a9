"""A streamed answer relayed to its client (router/relay.py): passed through unchanged with headers that keep proxies
from buffering it, the events after the first read from the stream's channel, and a stream that cannot go on (its
replica died, its channel cannot be opened or broke off, it ran out of time) ended with an error event and
``[DONE]``.

No cluster: scripted engine handles, and for the channel tests a replica's channel server on a loop in a thread
(the router's TestClient runs the app on a loop of its own); the end-to-end tests stream through real replicas.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError

from deployments.replies import ENGINE_UNAVAILABLE, Admitted, Chunk, ErrorReply
from deployments.resume import Resume
from deployments.stream_channel import ChannelClosed, StreamChannel, write_event
from router.ports import free_port
from tests.unit.fakes import EDGE_AUTH as AUTH
from tests.unit.fakes import (
    MESSAGES,
    FakeHandle,
    Hang,
    chat,
    event,
    resumable_stream_of,
    router_client,
    sse_events,
    stream_of,
)


def test_stream_passes_through_unchanged(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                       json={"model": "chat-a", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 3


def test_stream_past_its_total_time_ends_with_an_error_event(monkeypatch) -> None:
    engine = FakeHandle.scripted([*stream_of("a"), Hang()])
    client = router_client(engine, monkeypatch, timeouts={"total_s": 0.5})
    response = chat(client, stream=True)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0] == '{"t": "a"}'
    assert json.loads(events[1])["error"]["code"] == "request_timeout"
    assert events[2] == "[DONE]"


def test_stream_whose_replica_dies_midway_goes_on_on_another_in_the_same_response(monkeypatch,
                                                                                  access_log_lines) -> None:
    first = [*resumable_stream_of("a", "b"), ActorDiedError()]
    rest = [*resumable_stream_of("c", made=2), Chunk("data: [DONE]\n\n", 3, 3, resumable=True, text_chars=3)]
    engine = FakeHandle.scripted(first, rest)
    response = chat(router_client(engine, monkeypatch), stream=True)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [json.loads(e)["t"] for e in events[:-1]] == ["a", "b", "c"] and events[-1] == "[DONE]"
    # The second replica was told every token relayed and how much of their text, and the response it goes on.
    assert engine.resumes[0] is None
    assert engine.resumes[1] == Resume((100, 101), 2, "", 0)
    (line,) = [json.loads(text) for text in access_log_lines]
    assert (line["status"], line["prompt_tokens"], line["completion_tokens"], line["migrations"]) == (200, 3, 3, 1)


def test_a_stream_whose_engine_stopped_under_it_goes_on_elsewhere(monkeypatch) -> None:
    """The replica lives but its engine died: it ends the channel and says so on the call."""
    stopped = [*resumable_stream_of("a"), ErrorReply.server("stopped", status=503, code=ENGINE_UNAVAILABLE)]
    engine = FakeHandle.scripted(stopped, [*resumable_stream_of("b", made=1), Chunk("data: [DONE]\n\n", 3, 2)])
    events = sse_events(chat(router_client(engine, monkeypatch), stream=True).text)
    assert [json.loads(e)["t"] for e in events[:-1]] == ["a", "b"] and events[-1] == "[DONE]"
    assert engine.resumes[1].token_ids == (100,)


@pytest.mark.parametrize("limit", [0, 1])
def test_a_stream_goes_on_at_most_migration_limit_times(monkeypatch, limit: int, access_log_lines) -> None:
    engine = FakeHandle.scripted([*resumable_stream_of("a"), ActorDiedError()])  # every replica dies
    events = sse_events(chat(router_client(engine, monkeypatch, migration_limit=limit), stream=True).text)
    assert json.loads(events[-2])["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
    assert len(engine.streams) == 1 + limit
    (line,) = [json.loads(text) for text in access_log_lines]
    assert (line["status"], line["migrations"]) == (502, limit)


def test_stream_whose_replica_dies_midway_ends_with_an_error_event(monkeypatch) -> None:
    """A stream that is not resumable (its engine said so: several choices, tool calls...)."""
    engine = FakeHandle.scripted([*stream_of("a", "b"), ActorDiedError()])
    response = chat(router_client(engine, monkeypatch), stream=True)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [json.loads(e) for e in events[:2]] == [{"t": "a"}, {"t": "b"}]
    assert json.loads(events[2])["error"] == {
        "message": "The engine serving this stream failed. The output so far is incomplete.",
        "type": "server_error", "param": None, "code": "engine_error"}
    assert events[3] == "[DONE]"
    assert len(engine.streams) == 1  # tokens were sent: a retry would repeat them


# --- over a stream's channel ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def replica_channel() -> Iterator[tuple[StreamChannel, asyncio.AbstractEventLoop]]:
    """A replica's channel on a loop in a thread, as in a replica (the router's TestClient has a loop of its own)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    channel = StreamChannel()
    asyncio.run_coroutine_threadsafe(channel.start("127.0.0.1"), loop).result(10)
    yield channel, loop
    asyncio.run_coroutine_threadsafe(channel.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def serve_on_channel(replica_channel, texts: list[str], cut_after: int | None = None,
                     stall_after: int | None = None) -> str:
    """Offer a stream that writes ``texts`` once opened (or breaks the connection after ``cut_after`` of them, or
    stops writing for 3 s after ``stall_after``)."""
    channel, loop = replica_channel

    async def offer() -> str:
        link = channel.offer()

        async def write_all() -> None:
            response = await link.writer()
            for i, text in enumerate(texts):
                if i == cut_after:
                    response._req.transport.abort()  # the replica's process died: no end of the chunked body
                    link.close()
                    return
                if i == stall_after:
                    await asyncio.sleep(3)
                try:
                    await write_event(response, event(text), 3, i + 2)
                except ChannelClosed:  # the router gave up on the stream meanwhile
                    break
            link.close()

        asyncio.ensure_future(write_all())
        return link.url

    return asyncio.run_coroutine_threadsafe(offer(), loop).result(10)


def test_events_after_the_first_come_from_the_channel(replica_channel, monkeypatch, access_log_lines) -> None:
    url = serve_on_channel(replica_channel, ["b", "c"])
    engine = FakeHandle.scripted([Admitted(), Chunk(event("a"), 3, 1, channel=url)])
    client = router_client(engine, monkeypatch)
    response = chat(client, stream=True)
    assert response.status_code == 200
    assert [json.loads(e)["t"] for e in sse_events(response.text)] == ["a", "b", "c"]
    (line,) = [json.loads(text) for text in access_log_lines]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 3)
    # Three Serve items per stream and no more: Admitted, the first event, the call's end (read, so Serve's counts
    # and the next request's replica choice see it at once; leaving it unread cost the next stream's TTFT).
    (call,) = engine.streams
    assert call.read == 3


def test_a_channel_that_cannot_be_opened_ends_the_stream_with_an_error_event(monkeypatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/streams/gone"  # nothing listens there
    engine = FakeHandle.scripted([Admitted(), Chunk(event("a"), 3, 1, channel=url)])
    client = router_client(engine, monkeypatch)
    events = sse_events(chat(client, stream=True).text)
    assert json.loads(events[0]) == {"t": "a"}
    assert json.loads(events[1])["error"]["code"] == "engine_error"
    assert events[2:] == ["[DONE]"]


def test_a_channel_cut_mid_stream_ends_with_an_error_event(replica_channel, monkeypatch) -> None:
    url = serve_on_channel(replica_channel, ["b", "c", "d"], cut_after=1)
    engine = FakeHandle.scripted([Admitted(), Chunk(event("a"), 3, 1, channel=url)])
    client = router_client(engine, monkeypatch)
    events = sse_events(chat(client, stream=True).text)
    assert [json.loads(e)["t"] for e in events[:2]] == ["a", "b"]
    assert json.loads(events[2])["error"]["code"] == "engine_error"
    assert events[3:] == ["[DONE]"]


def test_a_channel_that_stalls_past_the_deadline_ends_with_a_timeout_event(replica_channel, monkeypatch) -> None:
    url = serve_on_channel(replica_channel, ["b", "c"], stall_after=1)
    engine = FakeHandle.scripted([Admitted(), Chunk(event("a"), 3, 1, channel=url)])
    client = router_client(engine, monkeypatch, timeouts={"total_s": 1.0})
    events = sse_events(chat(client, stream=True).text)
    assert [json.loads(e)["t"] for e in events[:2]] == ["a", "b"]
    assert json.loads(events[2])["error"]["code"] == "request_timeout"
    assert events[3:] == ["[DONE]"]
