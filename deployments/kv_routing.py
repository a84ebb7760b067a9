"""Replica choice by what each engine's KV cache holds (``replica_choice: kv_cache``), against its load.

Why: many tenants, each with a long system prompt or conversation, share a few replicas whose caches hold only part
of all prefixes. A request sent where its prefix is cached skips most of its prefill; sent elsewhere it pays all of
it and evicts someone else's prefix to make room. Serve's default choice (the less busy of two random replicas)
ignores that, and guessing from the text each replica was sent (``prefix_cache``) is wrong as soon as the cache
evicts. Here each engine reports the blocks its cache really holds, from vLLM's own KV-cache events
(:mod:`deployments.kv_events`), as its Serve routing stats, which Serve's controller sends to every handle.

For each request this router tokenizes the prompt as vLLM will (the model's chat template, then its tokenizer: the
same tokens the engine caches), turns the tokens into block keys (:mod:`deployments.kv_blocks`) and ranks the
replicas. Among those whose load (requests running and queued) is within :data:`KV_CACHE_LOAD_SLACK` of the least
loaded (so a hot replica is not piled on), the best has the highest score: the share of the prompt's leading blocks
its cache holds, plus :data:`KV_CACHE_FREE_WEIGHT` times the share of its cache still free; then the rest by load.
The free room matters twice. A new tenant (held nowhere) goes to the emptiest cache, so new prefixes spread over the
caches instead of meeting by chance on one, where they would evict each other. And a tenant whose blocks are being
evicted where it was placed (a cache given more tenants than it holds, as several routers deciding at once can do)
moves to a cache with room instead of staying for the part still held; once every cache is full, the score is what
each holds. Ties go to the cache holding fewer blocks, then the less loaded, then the replica this router has sent
the fewest blocks: once every cache is full, prompts held nowhere (a new tenant, a document read once) go round the
replicas, so each evicts its share of others' blocks, instead of meeting by chance on one that then evicts a
tenant's whole prefix. Serve sends the request to the first that accepts it. A request without a prompt to match
(token ids, media, a cache salt, a call that is not a completion) is ranked by load, then by chance, as is every
request until the replicas have reported.

The reports are a second or so old, so the router also remembers where it just sent each prompt's blocks (for
:data:`RECENT_ROUTES_TTL_S`): a tenant's second request, sent before its first was reported, goes to the same place.

    models:
      - id: llama-3.1-8b-instruct
        replica_choice: kv_cache
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import LocalityMixin, MultiplexMixin, RequestRouter

from deployments.constants import (
    KV_CACHE_FREE_WEIGHT,
    KV_CACHE_LOAD_SLACK,
    KV_CHOICE_TIMES_KEPT,
    KV_TOKENIZER_WAIT_S,
    RECENT_ROUTES_MAX_BLOCKS,
    RECENT_ROUTES_TTL_S,
    ROUTED_REQUESTS_KEPT,
)
from deployments.kv_blocks import block_keys, cached_blocks
from deployments.kv_events import STATS_BLOCK_SIZE, STATS_BLOCKS, STATS_CAPACITY, STATS_LOAD
from deployments.prompt_tokens import PromptTokens

logger = logging.getLogger("rayroute.router")


class KvCacheRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's request router for ``replica_choice: kv_cache``; see the module docstring.

    Not first-in-first-out (no ``FIFOMixin``): each ranking is for one request, so each routing task fulfils the
    request it ranked, not the oldest one waiting."""

    def initialize_state(self, source: str, adapters: list[str], chat_template: str | None = None) -> None:
        self._prompts = PromptTokens(source, chat_template)
        self._adapters = frozenset(adapters)
        self._held: dict[ReplicaID, tuple[int, frozenset[int]]] = {}  # replica -> (id of its stats' list, keys)
        # Where this router sent blocks lately: replica -> key -> when; newest last.
        self._recent: dict[ReplicaID, OrderedDict[int, float]] = {}
        self._keys_of: OrderedDict[str, list[int]] = OrderedDict()  # a request's keys, by its internal id
        self._sent: dict[ReplicaID, int] = {}  # this router's requests at each replica now
        self._blocks_sent: dict[ReplicaID, int] = {}  # the prompt blocks this router sent each replica, all told
        self.choice_times: deque[float] = deque(maxlen=KV_CHOICE_TIMES_KEPT)  # seconds, for the benchmark
        self.tokenize_times: deque[float] = deque(maxlen=KV_CHOICE_TIMES_KEPT)
        # Loaded once there is a choice to make (a model of one replica never needs it), before the first request
        # that needs it: see _ask_for_tokenizer.
        self._tokenizer_asked = False
        self._tokenizer_done = threading.Event()

    def _ask_for_tokenizer(self) -> None:
        """Start loading the tokenizer in the background as soon as the model has two replicas. A router that
        waited for its first such request would place that request, and every one until the tokenizer loads (seconds
        on a busy machine), by load alone: a tenant whose first request went to one router would find its next ones
        spread by the other."""
        if self._tokenizer_asked or self._prompts.loaded:
            return
        self._tokenizer_asked = True
        threading.Thread(target=self._load_tokenizer, daemon=True, name="kv-cache-tokenizer").start()

    def _load_tokenizer(self) -> None:
        try:
            self._prompts.load()
        except Exception:  # the router still works: every request is ranked by load
            logger.exception("the tokenizer of %s could not be loaded; its replicas are chosen by load only",
                             self._prompts.source)
        finally:
            self._tokenizer_done.set()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            # An adapter's request goes where the adapter is loaded first (Serve's multiplexing); among those, by
            # cache.
            allowed = self.apply_multiplex_routing(pending_request=pending_request)
            candidate_replicas = [replica for replica in candidate_replicas if replica.replica_id in allowed]
        if len(candidate_replicas) <= 1:  # nothing to choose: no prompt is tokenized for it
            return [candidate_replicas] if candidate_replicas else []
        self._ask_for_tokenizer()
        if not self._prompts.loaded and not self._tokenizer_done.is_set():
            # A request that comes while the tokenizer loads waits for it (a bounded while), rather than be placed
            # blind; one that fails to load leaves every request ranked by load.
            await asyncio.to_thread(self._tokenizer_done.wait, KV_TOKENIZER_WAIT_S)
        keys = await self._request_keys(pending_request) if pending_request is not None else []
        started = time.perf_counter()
        ranked = self.rank(candidate_replicas, keys)
        self.choice_times.append(time.perf_counter() - started)
        return [[replica] for replica in ranked]

    def rank(self, replicas: list[RunningReplica], keys: list[int]) -> list[RunningReplica]:
        """The replicas, best first: see the module docstring."""
        loads = {replica.replica_id: self._load(replica) for replica in replicas}
        cached = {replica.replica_id: self.cached(replica, keys) for replica in replicas} if keys else {}
        least = min(loads.values())
        tiebreak = {replica.replica_id: random.random() for replica in replicas}

        def order(replica: RunningReplica) -> tuple:
            rid = replica.replica_id
            if loads[rid] > least + KV_CACHE_LOAD_SLACK:
                return (True, 0, 0, loads[rid], tiebreak[rid])
            if not keys:  # nothing to place (a control call, token ids): spread by load and chance
                return (False, 0, 0, loads[rid], tiebreak[rid])
            occupancy = self.occupancy(replica)
            score = cached[rid] / len(keys) + KV_CACHE_FREE_WEIGHT * self.free_share(replica, occupancy)
            return (False, -score, occupancy, loads[rid], self._blocks_sent.get(rid, 0), tiebreak[rid])

        return sorted(replicas, key=order)

    def cached(self, replica: RunningReplica, keys: list[int]) -> int:
        """How many of the prompt's leading blocks the replica holds, by its report or this router's recent
        routes."""
        held = self._held_keys(replica)
        count = cached_blocks(keys, held)
        recent = self._recent.get(replica.replica_id)
        if recent and count < len(keys):
            horizon = time.monotonic() - RECENT_ROUTES_TTL_S
            for key in keys[count:]:
                when = recent.get(key)
                if when is None or when < horizon:
                    break
                count += 1
        return count

    def occupancy(self, replica: RunningReplica) -> int:
        """Blocks the replica's cache holds by its report, plus those this router sent it since (an estimate: a
        block in both counts twice for a few seconds)."""
        recent = self._recent.get(replica.replica_id)
        if recent:  # oldest first: what expired is dropped from the front, so what is left is recent
            horizon = time.monotonic() - RECENT_ROUTES_TTL_S
            while recent and next(iter(recent.values())) < horizon:
                recent.popitem(last=False)
        return len(self._held_keys(replica)) + (len(recent) if recent else 0)

    @staticmethod
    def free_share(replica: RunningReplica, occupancy: int) -> float:
        """The share of the replica's cache not holding blocks (0 until it has said how many it has room for)."""
        capacity = int(replica.routing_stats.get(STATS_CAPACITY) or 0)
        return max(0.0, 1 - occupancy / capacity) if capacity else 0.0

    def _held_keys(self, replica: RunningReplica) -> frozenset[int]:
        listed = replica.routing_stats.get(STATS_BLOCKS) or []
        known = self._held.get(replica.replica_id)
        if known is None or known[0] != id(listed):
            known = (id(listed), frozenset(listed))
            self._held[replica.replica_id] = known
        return known[1]

    def _load(self, replica: RunningReplica) -> int:
        """Requests running and queued at the replica: the largest of the engine's own report (every router's
        requests, but a second or so old), this router's requests there now, and Serve's count from its probes
        (kept only when Serve enforces ``max_ongoing_requests`` strictly)."""
        rid = replica.replica_id
        return max(int(replica.routing_stats.get(STATS_LOAD, 0)), self._sent.get(rid, 0),
                   self._replica_queue_len_cache.get(rid) or 0)

    async def _request_keys(self, pending_request: PendingRequest) -> list[int]:
        request_id = pending_request.metadata.internal_request_id
        keys = self._keys_of.get(request_id)
        if keys is not None:
            return keys
        body = pending_request.args[0] if pending_request.args and isinstance(pending_request.args[0], dict) else {}
        block_size = next((replica.routing_stats.get(STATS_BLOCK_SIZE) for replica in self._replicas.values()
                           if replica.routing_stats.get(STATS_BLOCK_SIZE)), None)
        keys = []
        if body and block_size:
            started = time.perf_counter()
            try:
                # Off the routing loop: rendering and tokenizing a long prompt takes milliseconds.
                tokens = await asyncio.to_thread(self._prompts.of, body)
            except Exception:  # a template that fails here fails in the engine too, with the client's error
                tokens = None
            self.tokenize_times.append(time.perf_counter() - started)
            if tokens:
                adapter = body.get("model") if body.get("model") in self._adapters else None
                keys = block_keys(tokens, int(block_size), adapter)
        self._keys_of[request_id] = keys
        while len(self._keys_of) > ROUTED_REQUESTS_KEPT:
            self._keys_of.popitem(last=False)
        return keys

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._sent[replica_id] = self._sent.get(replica_id, 0) + 1
        keys = self._keys_of.pop(pending_request.metadata.internal_request_id, None)
        if not keys:
            return
        self._blocks_sent[replica_id] = self._blocks_sent.get(replica_id, 0) + len(keys)
        recent = self._recent.setdefault(replica_id, OrderedDict())
        now = time.monotonic()
        for key in keys:
            recent[key] = now
            recent.move_to_end(key)
        while len(recent) > RECENT_ROUTES_MAX_BLOCKS:
            recent.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._sent.get(replica_id):
            self._sent[replica_id] -= 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if len(self._replica_id_set) > 1:
            self._ask_for_tokenizer()
        # A replica that is gone (stopped, dead, replaced) leaves the index with its report and recent routes.
        for table in (self._held, self._recent, self._sent, self._blocks_sent):
            for replica_id in [rid for rid in table if rid not in self._replica_id_set]:
                del table[replica_id]
        # A new replica starts level with the least sent, not behind all the others' history (it would take every
        # prompt held nowhere until it caught up).
        level = min(self._blocks_sent.values(), default=0)
        for replica_id in self._replica_id_set:
            self._blocks_sent.setdefault(replica_id, level)


def router_kwargs(source: str, adapters: list[str], chat_template: str | None) -> dict[str, Any]:
    """The arguments Serve passes to :meth:`KvCacheRouter.initialize_state`."""
    if chat_template and "{" not in chat_template:  # vLLM takes a file's path or the template itself
        chat_template = Path(chat_template).expanduser().read_text()
    return {"source": source, "adapters": adapters, "chat_template": chat_template}
