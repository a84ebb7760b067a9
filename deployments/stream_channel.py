"""A stream's SSE events from the engine replica straight to the router, as bytes on a plain HTTP connection.

Why not as Serve items: every Ray item costs about 0.3-0.6 ms of CPU at each end (serialization, futures, the
object or gRPC layer), whatever it carries, and a stream makes one per token. That per-item toll, not the engine, was
what capped rayroute on a fast engine (0.67 of bare vLLM at 32 streams of a tiny model). On a socket the same event
is one ``write``; and when the router is the busy hop, the events made meanwhile wait in the socket and arrive as
one read: they travel together only when something is behind, without a timer.

Serve still carries everything else: routing, admission and the queue limits, the first event (so a request that
fails before its first token is retried elsewhere, as before), cancellation, and the call's end. Only events after
the first take this way::

    engine replica                                   router replica
    _serve: yield Chunk(first event, channel=url) ─► relays it, opens GET url
            channel.connected(link) ◄─────────────── (the connection, kept alive for the next stream)
            writes each further event (a frame: ───► relays the events as they are read,
              the text and the counts so far)        keeping the counts
            returns                       ────────► (the call's end)

The URL holds a random token (128 bits) that is good for one connection, within
:data:`~deployments.constants.CHANNEL_OFFER_TIMEOUT_S`; the server listens on a free port of the replica's node
address, like Ray's own worker ports (on a one-machine cluster, which ``make serve`` starts, on 127.0.0.1). When the
router drops the connection (its client left), the next write fails and the replica stops vLLM's generator, which
aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from deployments.constants import CHANNEL_OFFER_TIMEOUT_S

logger = logging.getLogger("rayroute.engine")

# The path of a stream's URL; the token follows it.
STREAM_PATH = "/streams/"
# Each write is a frame: this header (the SSE text's length in bytes, the stream's prompt and completion tokens so
# far, the characters of completion text let out so far, and how many token ids follow), the ids of the tokens made
# since the last frame (:data:`TOKEN_ID`, each; only a stream that can be resumed carries them:
# :mod:`deployments.resume`), then the text. The counts ride with the text they include, so the router always knows
# exactly what it has relayed (a client that leaves is charged for that, a stream whose replica dies goes on from
# there), and reading them costs no JSON parse.
FRAME = struct.Struct("!IIIII")
TOKEN_ID = struct.Struct("!I")
# Where the channel listens when set (a one-machine cluster: 127.0.0.1); else the replica's node address.
CHANNEL_HOST_ENV = "RAYROUTE_CHANNEL_HOST"


class ChannelClosed(Exception):
    """The router's end of a stream's connection is gone (its client left, or the router did)."""


@dataclass
class Link:
    """One offered stream: its URL, and the open response once the router has connected."""

    url: str
    connected: asyncio.Future = field(repr=False)
    done: asyncio.Future = field(repr=False)

    async def writer(self) -> Any:
        """The connection's response (aiohttp ``StreamResponse``), once the router has opened it."""
        try:
            async with asyncio.timeout(CHANNEL_OFFER_TIMEOUT_S):
                return await asyncio.shield(self.connected)
        except TimeoutError:
            self.close()  # unclaimed, it must not pile up (a router that died between the first event and now)
            raise ChannelClosed(f"no router connected to {self.url} within {CHANNEL_OFFER_TIMEOUT_S:g}s") from None

    def close(self) -> None:
        """The stream is over (or abandoned): end the router's response."""
        if not self.done.done():
            self.done.set_result(None)


class StreamChannel:
    """The replica's HTTP server for streams: :meth:`offer` one, write to it, :meth:`Link.close` it."""

    def __init__(self) -> None:
        self._links: dict[str, Link] = {}
        self._tokens = _tokens()
        self._runner: Any = None
        self._base_url = ""

    async def start(self, host: str) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get(STREAM_PATH + "{token}", self._connect)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0, backlog=1024)
        await site.start()
        port = self._runner.addresses[0][1]
        self._base_url = f"http://{host}:{port}"
        logger.info("stream channel listening on %s", self._base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def offer(self) -> Link:
        """A new stream's link; it stays claimable until it is closed, which :meth:`Link.writer` does when no router
        has come within :data:`CHANNEL_OFFER_TIMEOUT_S`."""
        token = next(self._tokens)
        loop = asyncio.get_running_loop()
        link = Link(f"{self._base_url}{STREAM_PATH}{token}", loop.create_future(), loop.create_future())
        self._links[token] = link
        link.done.add_done_callback(lambda _: self._links.pop(token, None))
        return link

    async def _connect(self, request: Any) -> Any:
        from aiohttp import web

        link = self._links.pop(request.match_info["token"], None)
        if link is None or link.done.done():
            return web.Response(status=404, text="no such stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if not link.connected.done():
            link.connected.set_result(response)
        try:
            await asyncio.shield(link.done)
        except asyncio.CancelledError:  # aiohttp cancels the handler when the router drops the connection
            link.close()
            raise
        await response.write_eof()
        return response


def _tokens() -> Iterator[str]:
    """Unguessable stream tokens (128 bits each), drawn from the OS in blocks: one ``getrandom`` per stream cost
    more than the rest of opening its link."""
    while True:
        block = secrets.token_bytes(16 * 256)
        for start in range(0, len(block), 16):
            yield block[start:start + 16].hex()


async def write_event(response: Any, data: str, prompt_tokens: int, completion_tokens: int, text_chars: int = 0,
                      token_ids: list[int] | tuple[int, ...] = ()) -> None:
    """One frame: SSE text, the stream's token counts with it and the ids of the tokens made since the last frame;
    raises :class:`ChannelClosed` when the router's end is gone."""
    payload = data.encode()
    ids = struct.pack(f"!{len(token_ids)}I", *token_ids) if token_ids else b""
    try:
        await response.write(FRAME.pack(len(payload), prompt_tokens, completion_tokens, text_chars, len(token_ids))
                             + ids + payload)
    except (ConnectionError, RuntimeError) as exc:  # aiohttp: ClientConnectionResetError / "payload closed"
        raise ChannelClosed(str(exc)) from exc
