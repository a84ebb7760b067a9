"""A replica's feed of its own engine's KV-cache events, for replica choice by cache contents (``kv_cache``).

vLLM's engine core publishes its events on a ZeroMQ socket (``kv_events_config``). The socket here is an ``ipc://``
path in a directory only this replica's user can enter, which vLLM binds (it binds ipc endpoints and ``*``
addresses; it connects to any other): no TCP port is opened, on any interface, and nobody else on the node can read
the events (they carry the tokens of every prompt). The replica subscribes, keeps
:class:`deployments.kv_blocks.ReplicaBlocks`, and hands the keys to Serve as its routing stats
(``VLLMEngine.record_routing_stats``); Serve's controller gathers every replica's and sends them to every router's
handle, where :mod:`deployments.kv_routing` reads them. A replica that stops takes its feed with it; its
replacement starts with an empty one, as its engine starts with an empty cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deployments.kv_blocks import ReplicaBlocks

logger = logging.getLogger("rayroute.engine")

KV_EVENTS_SOCKET = "kv-events"
# The replica's routing stats (VLLMEngine.record_routing_stats), as routers read them: the keys of the blocks its
# cache holds, how many blocks it has room for, the block size a prompt's keys are made with, and the requests its
# engine holds.
STATS_BLOCKS = "kv_blocks"
STATS_CAPACITY = "kv_capacity"
STATS_BLOCK_SIZE = "kv_block_size"
STATS_LOAD = "load"


class KvEventsFeed:
    """The engine's events, read as they come into :attr:`blocks`."""

    def __init__(self) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="rayroute-kv-"))  # mode 0700
        self.endpoint = f"ipc://{self._directory / KV_EVENTS_SOCKET}"
        self.blocks = ReplicaBlocks(max_blocks=0)  # sized by start(), once the engine has counted its blocks
        self.block_size = 0
        self._task: asyncio.Task | None = None

    def engine_args(self) -> dict[str, Any]:
        """vLLM's ``kv_events_config`` that publishes to this feed."""
        return {"kv_events_config": {"enable_kv_cache_events": True, "publisher": "zmq",
                                     "endpoint": self.endpoint, "topic": ""}}

    def start(self, max_blocks: int, block_size: int) -> None:
        self.blocks.max_blocks = max_blocks
        self.block_size = block_size
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self.endpoint)
        try:
            while True:
                _topic, _sequence, payload = await socket.recv_multipart()
                try:
                    self.blocks.apply(decoder.decode(payload).events)
                except msgspec.DecodeError:
                    logger.warning("an undecodable KV-cache event batch was skipped")
        finally:
            socket.close(linger=0)

    def cleared(self) -> None:
        """The engine's cache was emptied (its own reset said so), before its event arrives."""
        self.blocks.clear()

    def routing_stats(self) -> dict[str, Any]:
        """What routers rank this replica by: the keys of the blocks held, the blocks the cache has room for, and
        the block size to make a prompt's."""
        return {STATS_BLOCKS: self.blocks.keys(), STATS_CAPACITY: self.blocks.max_blocks,
                STATS_BLOCK_SIZE: self.blocks.block_size or self.block_size}

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._directory)
