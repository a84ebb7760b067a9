"""The stream channel between an engine replica and a router (deployments/stream_channel.py, router/channel_client.py):
its own rules, then what the router's relay makes of a channel that works, cannot be opened, or breaks off.

No cluster: the replica's side runs in the test's loop (or in a thread for the router's HTTP tests, whose
TestClient runs the app on a loop of its own); the end-to-end tests stream through real replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from deployments.replies import Admitted, Chunk
from deployments.stream_channel import ChannelClosed, StreamChannel, write_event
from router.channel_client import ChannelClient, ChannelError
from router.ports import free_port
from tests.harness import FakeHandle, chat, router_client, sse_events


def event(text: str) -> str:
    return f"data: {json.dumps({'t': text})}\n\n"


@contextlib.asynccontextmanager
async def replica_and_router() -> AsyncIterator[tuple[StreamChannel, ChannelClient]]:
    channel = StreamChannel()
    await channel.start("127.0.0.1")
    client = ChannelClient()
    try:
        yield channel, client
    finally:
        await client.close()
        await channel.stop()


async def _read_all(client: ChannelClient, url: str) -> tuple[str, tuple[int, int]]:
    channel = await client.open(url)
    texts = []
    while text := await channel.read():
        texts.append(text.decode())
    return "".join(texts), (channel.prompt_tokens, channel.completion_tokens)


def test_a_stream_is_written_to_the_one_router_that_opens_it() -> None:
    async def main() -> None:
        async with replica_and_router() as (channel, client):
            link = channel.offer()

            async def replica() -> None:
                response = await link.writer()
                for i, text in enumerate(("a", "b", "c")):
                    await write_event(response, event(text), 5, i + 1)
                link.close()

            writing = asyncio.create_task(replica())
            assert await _read_all(client, link.url) == (event("a") + event("b") + event("c"), (5, 3))
            await writing
            with pytest.raises(ChannelError, match="404"):  # a link is good for one connection
                await client.open(link.url)
            with pytest.raises(ChannelError, match="404"):  # and a made-up token for none
                await client.open(link.url.rsplit("/", 1)[0] + "/not-a-token")

    asyncio.run(main())


def test_a_router_that_drops_the_channel_stops_the_replicas_writes() -> None:
    """What aborts the engine request when a client leaves: the replica's next write fails."""

    async def main() -> None:
        async with replica_and_router() as (channel, client):
            link = channel.offer()
            opening = asyncio.create_task(client.open(link.url))
            response = await link.writer()
            await write_event(response, event("a"), 5, 1)
            router_end = await opening
            assert (await router_end.read()).decode() == event("a")
            router_end.close()
            with pytest.raises(ChannelClosed):
                for _ in range(200):  # the first writes may still land in the socket's buffer
                    await write_event(response, event("more"), 5, 2)
                    await asyncio.sleep(0.01)
            link.close()

    asyncio.run(main())


def test_frames_split_or_merged_by_the_network_come_out_whole() -> None:
    """A read returns whatever arrived: half a frame, or several. The router passes on whole events only, and the
    counts of exactly the events passed on."""
    from deployments.stream_channel import FRAME
    from router.channel_client import Channel

    frames = b"".join(FRAME.pack(len(event(t).encode()), 5, i + 1) + event(t).encode() for i, t in enumerate("abc"))

    class Arriving:  # aiohttp's response body as the network hands it over
        def __init__(self, pieces: list[bytes]):
            self.content = self
            self.pieces = pieces

        async def readany(self) -> bytes:
            return self.pieces.pop(0) if self.pieces else b""

    async def main() -> None:
        for cuts in ([3], [FRAME.size + 4, FRAME.size + 9], list(range(1, len(frames)))):
            bounds = [0, *cuts, len(frames)]
            channel = Channel(Arriving([frames[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]))
            seen = []
            while text := await channel.read():
                seen.append((text.decode(), channel.completion_tokens))
            assert "".join(t for t, _ in seen) == event("a") + event("b") + event("c")
            assert seen[-1][1] == 3
            for text, completion in seen:  # the count always covers the events it came with
                assert text.endswith(event("abc"[completion - 1]))
        torn = Channel(Arriving([frames[:-2]]))
        assert (await torn.read()).decode() == event("a") + event("b")
        with pytest.raises(ChannelError, match="inside an event"):
            await torn.read()

    asyncio.run(main())


def test_a_link_nobody_opens_expires(monkeypatch) -> None:
    import deployments.stream_channel as stream_channel

    monkeypatch.setattr(stream_channel, "CHANNEL_OFFER_TIMEOUT_S", 0.2)

    async def main() -> None:
        async with replica_and_router() as (channel, _):
            link = channel.offer()
            with pytest.raises(ChannelClosed, match="no router connected"):
                await link.writer()
            await asyncio.sleep(0.3)
            assert not channel._links  # nothing left behind for a router that never came

    asyncio.run(main())


# --- the router's relay over a channel -------------------------------------------------------------------------

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
