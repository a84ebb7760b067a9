"""The router's end of a stream's channel (router/channel_client.py): whatever the network hands over, whole events
come out with the counts and token ids of exactly those events."""

from __future__ import annotations

import asyncio

import pytest

from router.channel_client import ChannelError
from tests.unit.fakes import event


def test_frames_split_or_merged_by_the_network_come_out_whole() -> None:
    """A read returns whatever arrived: half a frame, or several. The router passes on whole events only, and the
    counts and token ids of exactly the events passed on (each event here is the text of two tokens)."""
    import struct

    from deployments.stream_channel import FRAME
    from router.channel_client import Channel

    def frame(i: int, text: str) -> bytes:
        ids = struct.pack("!2I", 2 * i + 100, 2 * i + 101)
        return FRAME.pack(len(event(text).encode()), 5, i + 1, i + 1, 2) + ids + event(text).encode()

    frames = b"".join(frame(i, t) for i, t in enumerate("abc"))

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
                seen.append((text.decode(), channel.completion_tokens, list(channel.token_ids)))
            assert "".join(t for t, _, _ in seen) == event("a") + event("b") + event("c")
            assert seen[-1][1] == 3 and channel.text_chars == 3
            for text, completion, ids in seen:  # the count and the ids always cover the events they came with
                assert text.endswith(event("abc"[completion - 1]))
                assert ids == list(range(100, 100 + 2 * completion))
        torn = Channel(Arriving([frames[:-2]]))
        assert (await torn.read()).decode() == event("a") + event("b")
        with pytest.raises(ChannelError, match="inside an event"):
            await torn.read()

    asyncio.run(main())
