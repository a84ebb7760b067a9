"""A stream's channel from an engine replica to a router (deployments/stream_channel.py), by its own rules: one router
opens a link, once; a router that drops it stops the replica's writes; a link nobody opens expires.

No cluster: the replica's side runs in the test's loop, the router's end is the real channel client. What the
router's relay makes of a channel is ``test_relay.py``; how its client reads frames, ``test_channel_client.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from deployments.stream_channel import ChannelClosed, StreamChannel, write_event
from router.channel_client import ChannelClient, ChannelError
from tests.unit.fakes import event


@contextlib.asynccontextmanager
async def replica_and_router(channel_class: type[StreamChannel] = StreamChannel,
                             ) -> AsyncIterator[tuple[StreamChannel, ChannelClient]]:
    channel = channel_class()
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


def test_streams_one_after_another_share_one_kept_alive_connection() -> None:
    """A finished stream's connection goes back to the router's pool: the next stream to the same replica costs
    no new connection at either end. The router reads the response to its end, then closes its channel as the relay
    does."""
    connections = set()  # the router's end of each connection the replica accepted: (address, port)

    class Counting(StreamChannel):
        async def _connect(self, request):
            connections.add(request.transport.get_extra_info("peername"))
            return await super()._connect(request)

    async def main() -> None:
        async with replica_and_router(Counting) as (channel, client):
            for _ in range(3):
                link = channel.offer()

                async def replica(link=link) -> None:
                    response = await link.writer()
                    await write_event(response, event("a"), 5, 1)
                    link.close()

                writing = asyncio.create_task(replica())
                router_end = await client.open(link.url)
                while await router_end.read():
                    pass
                router_end.close()
                await writing

    asyncio.run(main())
    assert len(connections) == 1


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
