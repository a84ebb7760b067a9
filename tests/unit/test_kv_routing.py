"""KV-cache replica choice: the block index kept from vLLM's own events, and the ranking Serve's router uses."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, ReplicaID
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.test_utils import FAKE_REPLICA_DEPLOYMENT_ID, FakeRunningReplica
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from deployments.config import ModelConfig
from deployments.constants import KV_CACHE_LOAD_SLACK, RECENT_ROUTES_TTL_S, ROUTED_REQUESTS_KEPT
from deployments.kv_blocks import ReplicaBlocks, block_keys, cached_blocks
from deployments.kv_events import STATS_BLOCK_SIZE, STATS_BLOCKS, STATS_CAPACITY, STATS_LOAD, KvEventsFeed
from deployments.kv_routing import KvCacheRouter
from deployments.prompt_tokens import PromptTokens
from deployments.replica_choice import SESSION_ROUTER, request_router_options

SIZE = 4  # tokens per block in these tests


def stored(hashes: list[int], parent: int | None, tokens: list[int], lora: str | None = None,
           extra: list | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=SIZE,
                       lora_id=None, medium="GPU", lora_name=lora, extra_keys=extra)


# --- the index ------------------------------------------------------------------------------------------------------

def test_stored_blocks_match_the_keys_a_router_makes_from_the_same_tokens() -> None:
    blocks = ReplicaBlocks(max_blocks=100)
    prompt = list(range(10))  # two full blocks and a partial one, which vLLM never caches
    blocks.apply([stored([11], None, prompt[:4]), stored([12], 11, prompt[4:8])])  # a chain, event by event
    keys = block_keys(prompt, SIZE)
    assert len(keys) == 2 and set(blocks.keys()) == set(keys)
    assert cached_blocks(keys, set(blocks.keys())) == 2
    assert cached_blocks(block_keys([0, 1, 2, 3, 9, 9, 9, 9], SIZE), set(blocks.keys())) == 1  # the start only
    assert cached_blocks(block_keys([7] + prompt[1:], SIZE), set(blocks.keys())) == 0


def test_a_block_is_known_by_what_precedes_it_and_by_its_adapter() -> None:
    base = block_keys([1, 2, 3, 4, 5, 6, 7, 8], SIZE)
    assert block_keys([9, 9, 9, 9, 5, 6, 7, 8], SIZE)[1] != base[1]  # same tokens after another start
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], SIZE, adapter="pirate") != base  # an adapter's are not the base's
    blocks = ReplicaBlocks(max_blocks=100)
    blocks.apply([stored([21, 22], None, [1, 2, 3, 4, 5, 6, 7, 8], lora="pirate", extra=[("pirate",), ("pirate",)])])
    assert set(blocks.keys()) == set(block_keys([1, 2, 3, 4, 5, 6, 7, 8], SIZE, adapter="pirate"))


def test_evicted_and_cleared_blocks_leave_the_index() -> None:
    blocks = ReplicaBlocks(max_blocks=100)
    blocks.apply([stored([1, 2], None, list(range(8))), stored([3], None, [50, 51, 52, 53])])
    blocks.apply([BlockRemoved(block_hashes=[2], medium="GPU")])
    assert cached_blocks(block_keys(list(range(8)), SIZE), set(blocks.keys())) == 1
    blocks.apply([BlockRemoved(block_hashes=[3], medium="CPU")])  # an offloaded copy, not the engine's block
    assert len(blocks) == 2
    blocks.apply([AllBlocksCleared()])
    assert len(blocks) == 0


def test_blocks_that_no_request_can_reach_are_not_indexed() -> None:
    blocks = ReplicaBlocks(max_blocks=100)
    blocks.apply([stored([5], 999, [1, 2, 3, 4])])  # its parent's event was never seen
    blocks.apply([stored([6], None, [1, 2, 3, 4], extra=[("salt-of-a-user",)])])  # salted: never routed by
    blocks.apply([stored([7], None, [1, 2, 3, 4], extra=[(("image-hash", 0),)])])  # holds an image's tokens
    assert len(blocks) == 0


def test_the_index_never_holds_more_than_the_engine_has() -> None:
    blocks = ReplicaBlocks(max_blocks=8)
    for i in range(100):  # as if every removal event were lost
        blocks.apply([stored([i], None, [i, i, i, i])])
    assert len(blocks) == 8
    assert set(blocks.keys()) == {block_keys([i] * 4, SIZE)[0] for i in range(92, 100)}  # the newest kept


def test_the_feed_decodes_vllms_wire_format_and_reports_its_blocks() -> None:
    import msgspec

    feed = KvEventsFeed()
    try:
        assert feed.endpoint.startswith("ipc://")  # vLLM binds it: no TCP port, on any interface
        assert feed.engine_args()["kv_events_config"]["endpoint"] == feed.endpoint
        payload = msgspec.msgpack.Encoder().encode(KVEventBatch(ts=0.0, events=[stored([1], None, [1, 2, 3, 4])]))
        feed.blocks.max_blocks = 10
        feed.blocks.apply(msgspec.msgpack.Decoder(type=KVEventBatch).decode(payload).events)
        stats = feed.routing_stats()
        assert stats[STATS_BLOCKS] == block_keys([1, 2, 3, 4], SIZE) and stats[STATS_BLOCK_SIZE] == SIZE
        assert stats[STATS_CAPACITY] == 10
    finally:
        feed.close()


def in_a_loop(test: Callable[..., Coroutine]) -> Callable[..., None]:
    """The test run in an event loop of its own: Serve's router makes its asyncio primitives in one."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))
    return run


# --- the ranking ----------------------------------------------------------------------------------------------------

class Replica(FakeRunningReplica):
    """Serve's own stand-in for a replica (no actor), with the routing stats an engine reports."""

    def __init__(self, name: str, keys: list[int], load: int, capacity: int) -> None:
        super().__init__(name)
        self._stats = {STATS_BLOCKS: list(keys), STATS_CAPACITY: capacity, STATS_BLOCK_SIZE: SIZE, STATS_LOAD: load}
        self.set_queue_len_response(load)  # what Serve's probe of its queue answers

    @property
    def routing_stats(self) -> dict[str, Any]:
        return self._stats


def replica(name: str, keys: list[int] = (), load: int = 0, capacity: int = 0) -> Replica:
    return Replica(name, keys, load, capacity)


def rid(name: str) -> ReplicaID:
    return ReplicaID(unique_id=name, deployment_id=FAKE_REPLICA_DEPLOYMENT_ID)


class Words:
    """A tokenizer of whitespace-separated integers, chat templates included: what the ranking needs of one."""

    def apply_chat_template(self, messages: list[dict], **_: Any) -> str:
        return " ".join(message["content"] for message in messages)

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[int(word) for word in text.split()])


async def kv_router(replicas: list[RunningReplica]) -> KvCacheRouter:
    router = KvCacheRouter(deployment_id=FAKE_REPLICA_DEPLOYMENT_ID, handle_source=DeploymentHandleSource.REPLICA,
                           use_replica_queue_len_cache=True)
    router.initialize_state(source="/nonexistent", adapters=["pirate"])
    router._prompts._tokenizer = Words()
    router.update_replicas(replicas)
    await asyncio.sleep(0)  # Serve probes each new replica's queue once
    await asyncio.sleep(0)
    return router


def request(body: dict[str, Any], request_id: str = "r1", adapter: str = "") -> Any:
    metadata = SimpleNamespace(internal_request_id=request_id, multiplexed_model_id=adapter)
    return SimpleNamespace(args=[body], kwargs={}, metadata=metadata,
                           routing_context=SimpleNamespace(multiplexed_start_matching_time=None,
                                                           tried_first_multiplexed_models=False,
                                                           tried_fewest_multiplexed_models=False,
                                                           should_backoff=False))


def chat(text: str, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


TENANT = "1 2 3 4 5 6 7 8 9 10 11 12"
TENANT_KEYS = block_keys([int(word) for word in TENANT.split()], SIZE)


def names(ranks: list[list[RunningReplica]]) -> list[str]:
    return [group[0].replica_id.unique_id for group in ranks]


@in_a_loop
async def test_a_tenant_goes_to_the_replica_whose_events_say_it_holds_its_prefix() -> None:
    router = await kv_router([replica("a"), replica("b", TENANT_KEYS[:2]), replica("c", TENANT_KEYS)])
    for i in range(20):  # every time, not by chance
        ranks = await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT + " 99"), f"r{i}"))
        assert names(ranks)[:2] == ["c", "b"]
    assert len(router.choice_times) == 20 and len(router.tokenize_times) == 20


@in_a_loop
async def test_once_its_blocks_are_evicted_the_tenant_is_free_to_go_elsewhere() -> None:
    holder = replica("a", TENANT_KEYS)
    router = await kv_router([holder, replica("b")])
    assert names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT))))[0] == "a"
    router._recent.clear()  # as after RECENT_ROUTES_TTL_S
    router.update_replicas([replica("a", []), replica("b")])  # the next report: evicted
    chosen = {names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT), f"r{i}")))[0]
              for i in range(40)}
    assert chosen == {"a", "b"}


@in_a_loop
async def test_a_hot_replica_is_not_piled_on() -> None:
    router = await kv_router([replica("a", TENANT_KEYS, load=KV_CACHE_LOAD_SLACK + 1), replica("b")])
    assert names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT))))[0] == "b"
    # Its next report, and Serve's next probe of its queue: within the slack now.
    router.update_replicas([replica("a", TENANT_KEYS, load=KV_CACHE_LOAD_SLACK), replica("b")])
    router._replica_queue_len_cache.update(rid("a"), KV_CACHE_LOAD_SLACK)
    assert names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT), "r2")))[0] == "a"


@in_a_loop
async def test_new_tenants_spread_over_the_caches_instead_of_meeting_by_chance() -> None:
    others = block_keys(list(range(1000, 1000 + 6 * SIZE)), SIZE)  # blocks of other prompts
    router = await kv_router([replica("a", others), replica("b", others[:2]), replica("c", others[:4])])
    for i in range(20):  # every time, not by chance: the emptiest cache
        assert names(await router.choose_replicas(list(router._replicas.values()),
                                                  request(chat(f"{i} {TENANT}"), f"r{i}")))[0] == "b"
    router = await kv_router([replica("a"), replica("b")])
    placed = []
    for tenant in range(6):  # before any report: by where this router just sent prompts
        pending = request(chat(f"{500 + tenant} {TENANT}"), f"t{tenant}")
        chosen = names(await router.choose_replicas(list(router._replicas.values()), pending))[0]
        router.on_request_routed(pending, rid(chosen), None)
        router.on_request_completed(rid(chosen), f"t{tenant}")
        placed.append(chosen)
    assert placed.count("a") == placed.count("b") == 3


@in_a_loop
async def test_a_tenant_losing_its_blocks_to_others_moves_to_a_cache_with_room_and_one_that_hits_stays() -> None:
    prompt = " ".join(str(i) for i in range(500, 500 + 8 * SIZE))
    keys = block_keys([int(word) for word in prompt.split()], SIZE)
    others = block_keys(list(range(1000, 1000 + 40 * SIZE)), SIZE)
    crowded = keys[:2] + others[:18]  # full: its other tenants evicted all but 2 of this one's 8 blocks
    half_empty = others[20:30]
    router = await kv_router([replica("a", crowded, capacity=20), replica("b", half_empty, capacity=20)])
    for i in range(10):
        assert names(await router.choose_replicas(list(router._replicas.values()),
                                                  request(chat(prompt), f"r{i}")))[0] == "b"
    mostly = keys[:6] + others[:14]  # full, holding 6 of its 8 blocks: it hits there
    router = await kv_router([replica("a", mostly, capacity=20), replica("b", half_empty, capacity=20)])
    for i in range(10):
        assert names(await router.choose_replicas(list(router._replicas.values()),
                                                  request(chat(prompt), f"r{i}")))[0] == "a"


@in_a_loop
async def test_a_replica_that_is_gone_leaves_the_index_and_is_never_chosen() -> None:
    router = await kv_router([replica("a", TENANT_KEYS), replica("b")])
    await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT)))
    router.on_request_routed(request(chat(TENANT)), rid("a"), None)
    router.update_replicas([replica("b")])  # "a" died
    assert rid("a") not in router._held and rid("a") not in router._recent
    assert names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT), "r2"))) == ["b"]


@in_a_loop
async def test_a_prompt_just_sent_counts_as_held_until_its_replica_reports() -> None:
    router = await kv_router([replica("a"), replica("b")])
    first = request(chat(TENANT))
    sent_to = names(await router.choose_replicas(list(router._replicas.values()), first))[0]
    router.on_request_routed(first, rid(sent_to), None)
    for i in range(10):
        again = request(chat(TENANT + " 7"), f"r{i}")
        assert names(await router.choose_replicas(list(router._replicas.values()), again))[0] == sent_to
    for recent in router._recent.values():  # past the TTL it no longer counts
        for key in recent:
            recent[key] = time.monotonic() - RECENT_ROUTES_TTL_S - 1
    assert router.cached(router._replicas[rid(sent_to)], TENANT_KEYS) == 0


@in_a_loop
async def test_an_adapters_request_matches_only_the_adapters_blocks() -> None:
    adapter_keys = block_keys([int(word) for word in TENANT.split()], SIZE, adapter="pirate")
    router = await kv_router([replica("base", TENANT_KEYS), replica("adapter", adapter_keys)])
    for model, holder in (("m", "base"), ("pirate", "adapter")):
        ranks = await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT, model), model))
        assert names(ranks)[0] == holder


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": [1, 2, 3]},  # token ids
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"model": "m", "input": "text of the Responses API"},
    {**chat(TENANT), "cache_salt": "private"},
    {"model": "m", "messages": "not a list"},
])
@in_a_loop
async def test_a_request_without_a_prompt_to_match_is_ranked_by_load(body: dict[str, Any]) -> None:
    router = await kv_router([replica("a", TENANT_KEYS, load=3), replica("b", load=1)])
    assert names(await router.choose_replicas(list(router._replicas.values()), request(body)))[0] == "b"


@in_a_loop
async def test_prompts_held_nowhere_go_round_full_caches_not_by_chance() -> None:
    """Once every cache is full, a prompt no cache holds evicts someone's blocks wherever it goes: each replica takes
    its turn (the one this router sent the fewest blocks), so no cache loses a tenant to a run of chance."""
    full = [block_keys(list(range(1000 * n, 1000 * n + 20 * SIZE)), SIZE) for n in range(1, 5)]
    router = await kv_router([replica(name, keys, capacity=20) for name, keys in zip("abcd", full, strict=True)])
    placed = []
    for i in range(12):
        pending = request(chat(" ".join(str(100_000 + 50 * i + j) for j in range(3 * SIZE))), f"o{i}")
        chosen = names(await router.choose_replicas(list(router._replicas.values()), pending))[0]
        router.on_request_routed(pending, rid(chosen), None)
        router.on_request_completed(rid(chosen), f"o{i}")
        placed.append(chosen)
        for recent in router._recent.values():  # arriving further apart than the reports' lag
            for key in recent:
                recent[key] = time.monotonic() - RECENT_ROUTES_TTL_S - 1
    assert sorted(placed.count(name) for name in "abcd") == [3, 3, 3, 3]
    router.update_replicas([*router._replicas.values(), replica("e", capacity=20)])  # a replica joins
    assert router._blocks_sent[rid("e")] == min(router._blocks_sent[rid(name)] for name in "abcd")


@in_a_loop
async def test_calls_without_a_prompt_reach_every_replica_not_only_the_emptiest_cache() -> None:
    router = await kv_router([replica("a", TENANT_KEYS), replica("b")])
    first = set()
    for i in range(40):  # a control call (engine_info) has no body to place: load, then chance
        pending = SimpleNamespace(**{**vars(request({}, f"c{i}")), "args": []})
        first.add(names(await router.choose_replicas(list(router._replicas.values()), pending))[0])
    assert first == {"a", "b"}


@in_a_loop
async def test_what_the_router_remembers_is_bounded() -> None:
    router = await kv_router([replica("a"), replica("b")])
    for i in range(ROUTED_REQUESTS_KEPT + 50):  # ranked, never routed (their callers gave up)
        await router.choose_replicas(list(router._replicas.values()), request(chat(f"{i} 1 2 3 4"), f"r{i}"))
    assert len(router._keys_of) == ROUTED_REQUESTS_KEPT


def test_the_tokens_are_those_of_the_chat_template_without_added_special_tokens() -> None:
    prompts = PromptTokens("/nonexistent", None)
    prompts._tokenizer = Words()
    assert prompts.of(chat("1 2 3")) == [1, 2, 3]
    assert prompts.of({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "1 2"}, {"type": "text", "text": "3"}]}]}) == [1, 2, 3]
    assert prompts.of({"model": "m", "prompt": "4 5"}) == [4, 5]


@in_a_loop
async def test_choosing_among_replicas_holding_many_blocks_is_cheap() -> None:
    many = [list(range(i * 10_000, (i + 1) * 10_000)) for i in range(4)]
    router = await kv_router([replica(str(i), many[i] + TENANT_KEYS * (i == 3)) for i in range(4)])
    keys = TENANT_KEYS * 20
    router.rank(list(router._replicas.values()), keys)  # builds each replica's set once
    started = time.perf_counter()
    for _ in range(1000):
        router.rank(list(router._replicas.values()), keys)
    assert (time.perf_counter() - started) / 1000 < 0.005  # generous: a loaded CI machine; the bench reports it


# --- the configuration --------------------------------------------------------------------------------------------

def test_each_policy_selects_its_router_and_kv_cache_gets_its_stats_every_second() -> None:
    from deployments.app import engine_deployment

    model = {"id": "m", "source": "org/m", "adapters": {"pirate": "org/pirate"},
             "engine_args": {"chat_template": "{{ messages }}"}}
    kv = engine_deployment(ModelConfig.model_validate({**model, "replica_choice": "kv_cache"}))
    config = kv._deployment_config.request_router_config
    assert config.request_router_class == "deployments.kv_routing.KvCacheRouter"
    assert config.request_router_kwargs == {"source": "org/m", "adapters": ["pirate"],
                                            "chat_template": "{{ messages }}"}
    assert config.request_routing_stats_period_s == 1.0
    session = request_router_options(ModelConfig.model_validate({**model, "replica_choice": "session"}))
    assert session["request_router_config"].request_router_class == SESSION_ROUTER
    assert request_router_options(ModelConfig.model_validate({**model, "replica_choice": "least_loaded"})) == {}


def test_kv_events_are_the_routers_to_configure() -> None:
    with pytest.raises(ValueError, match="replica_choice"):
        ModelConfig.model_validate({"id": "m", "source": "org/m", "engine_args": {"kv_events_config": {}}})


def test_the_event_loop_is_not_needed_to_rank() -> None:
    # rank() is plain code: it may run on Serve's routing loop, which must never wait on it.
    assert not asyncio.iscoroutinefunction(KvCacheRouter.rank)


@pytest.mark.parametrize("choice", ["kv_cache", "prefix_cache", "session"])
def test_an_engine_application_with_its_own_router_builds_under_haproxy(choice: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve refuses a custom request router on an application's ingress when HAProxy carries HTTP (as rayroute
    # runs it): the engine deployment sits behind a front that never runs.
    from ray.serve._private import build_app as serve_build

    from deployments.app import build_engine_app

    monkeypatch.setattr(serve_build, "RAY_SERVE_ENABLE_HA_PROXY", True)
    model = {"id": "m", "source": "org/m", "replica_choice": choice}
    built = serve_build.build_app(build_engine_app({"model": model}), name="engine-m")
    names = [deployment.name for deployment in built.deployments]
    assert names == ["engine-m", "EngineFront"] and built.ingress_deployment_name == "EngineFront"
    plain = serve_build.build_app(build_engine_app({"model": {**model, "replica_choice": "least_loaded"}}),
                                  name="engine-m")
    assert [deployment.name for deployment in plain.deployments] == ["engine-m"]


def test_the_feed_reads_what_vllms_own_publisher_sends_on_its_socket() -> None:
    """vLLM's publisher (as its engine core makes it from ``kv_events_config``) binds the feed's ipc path; the feed
    connects and keeps what it reads."""
    from vllm.config.kv_events import KVEventsConfig
    from vllm.distributed.kv_events import EventPublisherFactory

    async def run() -> list[int]:
        feed = KvEventsFeed()
        publisher = EventPublisherFactory.create(KVEventsConfig(**feed.engine_args()["kv_events_config"]))
        try:
            feed.start(max_blocks=10, block_size=SIZE)
            deadline = time.monotonic() + 20
            while len(feed.blocks) == 0:  # ZeroMQ drops what is sent before the subscription is in place
                assert time.monotonic() < deadline, "the feed never read the publisher's events"
                publisher.publish(KVEventBatch(ts=time.time(), events=[stored([1], None, [1, 2, 3, 4])]))
                await asyncio.sleep(0.1)
            return feed.routing_stats()[STATS_BLOCKS]
        finally:
            publisher.shutdown()
            feed.close()

    assert asyncio.run(run()) == block_keys([1, 2, 3, 4], SIZE)


@in_a_loop
async def test_a_burst_between_reports_is_spread_by_the_routers_own_count() -> None:
    """The replicas report their load once a second; meanwhile this router's own requests count."""
    router = await kv_router([replica("a", TENANT_KEYS), replica("b")])
    sent = []
    for i in range(KV_CACHE_LOAD_SLACK + 3):
        pending = request(chat(TENANT), f"r{i}")
        chosen = names(await router.choose_replicas(list(router._replicas.values()), pending))[0]
        router.on_request_routed(pending, rid(chosen), None)
        sent.append(chosen)
    assert sent[:KV_CACHE_LOAD_SLACK + 1] == ["a"] * (KV_CACHE_LOAD_SLACK + 1) and sent[-1] == "b"
    for i in range(KV_CACHE_LOAD_SLACK + 3):  # they end
        router.on_request_completed(rid(sent[i]), f"r{i}")
    assert router._sent == {rid("a"): 0, rid("b"): 0}


@in_a_loop
async def test_with_one_replica_nothing_is_tokenized() -> None:
    router = await kv_router([replica("a", TENANT_KEYS)])
    assert names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT)))) == ["a"]
    assert not router.tokenize_times and not router._keys_of
    assert not router._tokenizer_asked  # nor is the tokenizer loaded: a model of one replica never needs it



@in_a_loop
async def test_the_tokenizer_loads_when_a_second_replica_comes_and_a_request_waits_for_it() -> None:
    """A router's first request for a model of two replicas is placed by cache, not by load: the tokenizer started
    loading when the second replica came, and a request meanwhile waits for it."""
    router = KvCacheRouter(deployment_id=FAKE_REPLICA_DEPLOYMENT_ID, handle_source=DeploymentHandleSource.REPLICA,
                           use_replica_queue_len_cache=True)
    router.initialize_state(source="/nonexistent", adapters=[])
    loads = []

    def slow_load() -> None:  # a busy machine's seconds
        loads.append(threading.current_thread().name)
        time.sleep(0.3)
        router._prompts._tokenizer = Words()

    router._prompts.load = slow_load
    router.update_replicas([replica("a", TENANT_KEYS)])
    assert not loads and not router._tokenizer_asked  # one replica: nothing to choose
    # The holder is busier, within the slack: placed by load it would come second.
    router.update_replicas([replica("a", TENANT_KEYS, load=1), replica("b")])
    assert router._tokenizer_asked
    chosen = names(await router.choose_replicas(list(router._replicas.values()), request(chat(TENANT))))
    assert chosen[0] == "a" and loads == ["kv-cache-tokenizer"]


def test_a_router_loads_several_models_tokenizers_at_once(tmp_path: Path) -> None:
    """A router with several kv_cache models loads their tokenizers in threads at once, in a process that has not
    used transformers yet (a fresh interpreter here): every one loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "unk_token": "[UNK]"}))
    script = f"""
import sys, threading
from deployments.prompt_tokens import PromptTokens
assert "transformers" not in sys.modules
prompts = [PromptTokens({str(tmp_path)!r}, None) for _ in range(6)]
threads = [threading.Thread(target=prompt.load) for prompt in prompts]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(sum(prompt._tokenizer is not None for prompt in prompts))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "6", done.stderr


def test_only_the_start_of_a_huge_prompt_is_tokenized() -> None:
    from deployments.constants import KV_MATCH_CHARS

    prompts = PromptTokens("/nonexistent", None)
    prompts._tokenizer = Words()
    huge = " ".join(["7"] * KV_MATCH_CHARS)  # twice the characters matched
    tokens = prompts.of({"model": "m", "prompt": huge})
    assert len(tokens) == KV_MATCH_CHARS // 2 - 1  # the cut's token left out


def test_kv_cache_choice_without_a_prefix_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        ModelConfig.model_validate({"id": "m", "source": "org/m", "replica_choice": "kv_cache",
                                    "engine_args": {"enable_prefix_caching": False}})


@pytest.mark.parametrize(("engine_args", "expected"), [
    ({}, "kv_cache"),
    ({"runner": "generate"}, "kv_cache"),
    ({"convert": "none"}, "kv_cache"),
    ({"runner": "pooling"}, "least_loaded"),  # an embedding model's engine caches no prefixes
    ({"convert": "embed"}, "least_loaded"),
    ({"enable_prefix_caching": False}, "least_loaded"),
])
def test_the_default_choice_is_kv_cache_where_the_engine_caches_prefixes(engine_args: dict, expected: str) -> None:
    model = ModelConfig.model_validate({"id": "m", "source": "org/m", "engine_args": engine_args})
    assert model.replica_choice == expected
    assert ModelConfig.model_validate(model.model_dump()) == model  # resolved once: a dump reads back the same
    # A choice the entry names is kept, whatever the engine.
    assert ModelConfig.model_validate({"id": "m", "source": "org/m", "engine_args": engine_args,
                                       "replica_choice": "session"}).replica_choice == "session"


def test_kv_cache_choice_for_a_pooling_model_is_refused() -> None:
    with pytest.raises(ValueError, match="pooling"):
        ModelConfig.model_validate({"id": "m", "source": "org/m", "replica_choice": "kv_cache",
                                    "engine_args": {"runner": "pooling"}})
