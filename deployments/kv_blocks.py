"""Which prompt blocks a replica's KV cache holds, from its vLLM engine's own KV-cache events.

Why: a request costs a full prefill on a replica that lacks its prompt's start and almost nothing on one that holds
it, and only the engine knows what it holds: what it stored and what it evicted to make room. vLLM publishes that
(``kv_events_config``): ``BlockStored`` with each full block's tokens and its parent block, ``BlockRemoved``,
``AllBlocksCleared``. This module turns those events into a set of *block keys* a router can compute for a new
request from its prompt's tokens alone (:func:`block_keys`), without vLLM's own hashes, which depend on its hash
function and seed.

A key names a block by everything before and in it: the key of its parent block, its tokens, and for the first
block the adapter (an adapter's blocks are not its base's). So a prompt's keys, in order, match a replica's set up
to the first block it does not hold; that count is the prompt's cached prefix there (:func:`cached_blocks`).

    >>> keys = block_keys(list(range(300)), block_size=128)
    >>> len(keys)           # full blocks only: vLLM caches no partial block
    2
    >>> cached_blocks(keys, {keys[0]})
    1

Bounded: a replica's set holds at most the blocks its engine has (``max_blocks``), whatever the traffic; when events
were lost and it would hold more, the oldest go first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

# The medium vLLM names for blocks in the engine's own cache (offloaded copies name another, or none).
ENGINE_MEDIUMS = (None, "GPU")


def block_key(parent: int | None, tokens: Sequence[int], adapter: str | None = None) -> int:
    """The key of one full block: its parent's key (None for the first), its tokens and the adapter."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"-" if parent is None else parent.to_bytes(8, "big"))
    if parent is None and adapter:
        digest.update(adapter.encode())
    digest.update(b"|")
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "big")


def block_keys(token_ids: Sequence[int], block_size: int, adapter: str | None = None) -> list[int]:
    """The keys of a prompt's full blocks, first to last."""
    keys: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start:start + block_size], adapter)
        keys.append(parent)
    return keys


def cached_blocks(keys: Sequence[int], held: set[int] | frozenset[int]) -> int:
    """How many of the prompt's leading blocks are in ``held``: the part of its prefill already done there."""
    count = 0
    for key in keys:
        if key not in held:
            break
        count += 1
    return count


class ReplicaBlocks:
    """The blocks one engine holds, as :func:`block_key` keys, kept from its KV-cache events."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.block_size: int | None = None
        # vLLM's hash of each held block -> its key; the order is the order stored (the oldest first).
        self._keys: OrderedDict[Any, int] = OrderedDict()
        self.events = 0

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[int]:
        return list(self._keys.values())

    def apply(self, events: Iterable[Any]) -> None:
        """Apply vLLM's events (``vllm.distributed.kv_events``: ``BlockStored``, ``BlockRemoved``,
        ``AllBlocksCleared``), in the order the engine made them."""
        for event in events:
            self.events += 1
            kind = type(event).__name__
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                if getattr(event, "medium", None) in ENGINE_MEDIUMS:
                    for block_hash in event.block_hashes:
                        self._keys.pop(block_hash, None)
            elif kind == "AllBlocksCleared":
                self.clear()

    def clear(self) -> None:
        self._keys.clear()

    def _stored(self, event: Any) -> None:
        if getattr(event, "medium", None) not in ENGINE_MEDIUMS or getattr(event, "group_idx", None) not in (None, 0):
            return
        size = event.block_size
        self.block_size = size
        adapter = getattr(event, "lora_name", None)
        extras = getattr(event, "extra_keys", None) or [None] * len(event.block_hashes)
        if event.parent_block_hash is None:
            parent = None
        elif (parent := self._keys.get(event.parent_block_hash)) is None:
            return  # its parent's event was lost or evicted: no prompt can reach these blocks through it
        for index, block_hash in enumerate(event.block_hashes):
            extra = extras[index] if index < len(extras) else None
            if extra and any(part != adapter for part in extra):
                return  # media or a cache salt in the block: no request is routed by those, so nothing matches
            tokens = event.token_ids[index * size:(index + 1) * size]
            if len(tokens) < size:
                return
            parent = block_key(parent, tokens, adapter)
            self._keys[block_hash] = parent
            self._keys.move_to_end(block_hash)
        while len(self._keys) > self.max_blocks:
            self._keys.popitem(last=False)
