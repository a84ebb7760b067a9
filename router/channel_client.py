"""The router's end of the engines' stream channels (:mod:`deployments.stream_channel`): a stream's events after
the first, read from the replica that makes them.

One aiohttp session per router replica, its connections kept alive per engine replica, so a stream's channel
costs one request on an open connection. A read returns whatever has arrived: when the router is busy, the events
that queued meanwhile come as one piece and go to the client in one write, which is all the coalescing the path
does (no timer). Each event comes framed with the stream's token counts (:data:`~deployments.stream_channel.FRAME`).
"""

from __future__ import annotations

import struct

import aiohttp

from deployments.constants import CHANNEL_CONNECT_TIMEOUT_S
from deployments.stream_channel import FRAME, TOKEN_ID


class ChannelError(Exception):
    """A stream's channel could not be opened or broke off before its end."""


class ChannelClient:
    """Opens stream channels; created in a router replica, used on its event loop only."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def open(self, url: str) -> Channel:
        if self._session is None:  # here, on the loop that will use it
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),  # bounded by the streams themselves
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CHANNEL_CONNECT_TIMEOUT_S),
                auto_decompress=False)
        try:
            response = await self._session.get(url)
        except (aiohttp.ClientError, OSError) as exc:
            raise ChannelError(f"cannot open {url}: {exc}") from exc
        if response.status != 200:
            response.close()
            raise ChannelError(f"{url} answered {response.status}")
        return Channel(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Channel:
    """One stream's open channel: :meth:`read` until it returns ``b""``; ``prompt_tokens`` and ``completion_tokens``
    count every token in the text read so far. A resumable stream's frames also carry its tokens' ids, added to
    ``token_ids`` as they are read, and ``text_chars``, how much of their text has been read."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self._pending = b""  # a frame not yet whole
        self._expired = False
        self.prompt_tokens = self.completion_tokens = self.text_chars = 0
        self.token_ids: list[int] = []

    async def read(self) -> bytes:
        """The SSE text of the events that have arrived (at least one), or ``b""`` at the stream's clean end;
        raises :class:`TimeoutError` once :meth:`expire` was called."""
        while True:
            try:
                piece = await self._response.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                if self._expired:
                    raise TimeoutError from exc
                raise ChannelError(str(exc)) from exc
            if self._expired:
                raise TimeoutError
            if not piece:
                if self._pending:
                    raise ChannelError("the channel ended inside an event")
                return b""
            if text := self._unframe(self._pending + piece if self._pending else piece):
                return text

    def _unframe(self, data: bytes) -> bytes:
        texts = []
        position, header = 0, FRAME.size
        while len(data) - position >= header:
            size, prompt, completion, chars, count = FRAME.unpack_from(data, position)
            start = position + header + count * TOKEN_ID.size
            end = start + size
            if end > len(data):
                break
            if count:
                self.token_ids.extend(struct.unpack_from(f"!{count}I", data, position + header))
            texts.append(data[start:end])
            self.prompt_tokens, self.completion_tokens, self.text_chars = prompt, completion, chars
            position = end
        self._pending = data[position:]
        return texts[0] if len(texts) == 1 else b"".join(texts)

    def expire(self) -> None:
        """The stream ran out of time: a read waiting now, or the next one, raises :class:`TimeoutError`.

        One timer per stream (the router schedules this at the stream's deadline) rather than a timeout around
        every read, which cost the router as much as the read itself."""
        self._expired = True
        self._response.close()

    def close(self) -> None:
        """Drop the connection (before the end, this is what makes the replica abort the request)."""
        self._response.close()
