"""Prefix-cache replica choice, bounded: eviction on, and only the prompt's start matched and inserted."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from ray.llm._internal.serve.routing_policies.prefix_aware import prefix_aware_router
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter

from deployments.config import ModelConfig
from deployments.constants import (
    PREFIX_MATCH_CHARS,
    PREFIX_TREE_EVICTION_INTERVAL_S,
    PREFIX_TREE_EVICTION_TARGET_CHARS,
    PREFIX_TREE_EVICTION_THRESHOLD_CHARS,
)
from deployments.prefix_routing import IMBALANCED_THRESHOLD, PrefixCacheRouter, request_router_config, router_kwargs

HUGE = "You are a careful assistant. " * 100_000  # 2.9 million characters


def router() -> PrefixCacheRouter:
    return PrefixCacheRouter.__new__(PrefixCacheRouter)  # no Serve controller here: reading needs no state


def pending(*args: Any) -> SimpleNamespace:
    return SimpleNamespace(args=list(args), kwargs={})


def test_the_router_config_turns_eviction_on_with_bounds() -> None:
    config = request_router_config()["request_router_config"]
    assert config.request_router_class == "deployments.prefix_routing.PrefixCacheRouter"
    assert config.request_router_kwargs == {
        "imbalanced_threshold": IMBALANCED_THRESHOLD, "do_eviction": True,
        "eviction_threshold_chars": PREFIX_TREE_EVICTION_THRESHOLD_CHARS,
        "eviction_target_chars": PREFIX_TREE_EVICTION_TARGET_CHARS,
        "eviction_interval_secs": PREFIX_TREE_EVICTION_INTERVAL_S}
    assert 0 < PREFIX_TREE_EVICTION_TARGET_CHARS < PREFIX_TREE_EVICTION_THRESHOLD_CHARS
    assert PREFIX_MATCH_CHARS < PREFIX_TREE_EVICTION_TARGET_CHARS  # a replica's tree holds many prompts' starts
    # Serve calls initialize_state(**kwargs): every name must be one Ray 2.60's router takes.
    inspect.signature(PrefixCacheAffinityRouter.initialize_state).bind(None, **router_kwargs())


def test_a_prefix_cache_models_deployment_carries_the_bounded_router() -> None:
    from deployments.app import engine_deployment

    model = ModelConfig.model_validate({"id": "m", "source": "org/m", "replica_choice": "prefix_cache"})
    config = engine_deployment(model)._deployment_config.request_router_config
    assert config.request_router_class == "deployments.prefix_routing.PrefixCacheRouter"
    assert config.request_router_kwargs == router_kwargs()


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": "system", "content": HUGE}, {"role": "user", "content": "Hi"}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": HUGE}]}]},
    {"model": "m", "prompt": HUGE},
    {"model": "m", "input": HUGE},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": HUGE}]}]},
], ids=["chat", "chat-parts", "completions", "responses", "responses-items"])
def test_only_the_prompts_start_is_matched(body: dict) -> None:
    text = router()._extract_text_from_request(pending(body))
    assert len(text) == PREFIX_MATCH_CHARS and text == HUGE[:PREFIX_MATCH_CHARS]


def test_a_short_prompt_is_read_whole() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert router()._extract_text_from_request(pending(body)) == "Be brief.Hi"


@pytest.mark.parametrize("args", [
    ({"model": "m", "prompt": [1, 2, 3]},),  # token ids
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]},),
    ({"model": "m", "messages": [{"role": "user", "content": ""}]},),
    (object(),),  # a call that is not a request (no `messages` or `prompt` anywhere)
], ids=["token-ids", "media-only", "empty", "no-prompt"])
def test_a_request_without_prompt_text_is_routed_by_load(args: tuple) -> None:
    """None, never "" (Ray's router divides by the text's length) nor an exception (either ends its routing task,
    and the request would wait for its queue timeout): on None it skips matching and chooses by load."""
    assert router()._extract_text_from_request(pending(*args)) is None


def test_the_tree_is_sent_only_the_prompts_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the prefix tree's actor gets after a request is routed: the bounded start, not the whole prompt."""
    inserted: list[str] = []
    tree = SimpleNamespace(insert=SimpleNamespace(remote=lambda text, tenant, time_s: inserted.append(text)))
    monkeypatch.setattr(prefix_aware_router.ray, "get", lambda ref: ref)
    chooser = router()
    chooser._tree_actor = tree
    replica = SimpleNamespace(to_full_id_str=lambda: "replica-1")
    chooser.on_request_routed(pending({"model": "m", "prompt": HUGE}), replica, None)
    chooser.on_request_routed(pending({"model": "m", "prompt": [1, 2, 3]}), replica, None)  # nothing to insert
    assert inserted == [HUGE[:PREFIX_MATCH_CHARS]]


@pytest.mark.parametrize(("body", "text"), [
    ({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, "Be brief.Hi"),
    ({"model": "m", "prompt": "Once upon"}, "Once upon"),
    ({"model": "m", "input": "Name three rivers."}, "Name three rivers."),
])
def test_prefix_router_reads_the_prompt_from_rayroute_bodies(body: dict, text: str) -> None:
    """Ray's prefix-affinity router looks for a ``messages`` or ``prompt`` attribute; the engine methods take the
    OpenAI body as a dict (Responses names it ``input``). Without the override it raises for every request."""
    from deployments.prefix_routing import PrefixCacheRouter

    router = PrefixCacheRouter.__new__(PrefixCacheRouter)  # no Serve controller here: the reading needs no state
    assert router._extract_text_from_request(SimpleNamespace(args=[body], kwargs={})) == text


def test_replica_choice_selects_the_deployments_request_router() -> None:
    from deployments.app import engine_deployment
    from deployments.prefix_routing import router_kwargs

    model = {"id": "m", "source": "org/m"}
    least = engine_deployment(ModelConfig.model_validate({**model, "replica_choice": "least_loaded"}))
    prefix = engine_deployment(ModelConfig.model_validate({**model, "replica_choice": "prefix_cache"}))
    assert "PowerOfTwo" in str(least._deployment_config.request_router_config.request_router_class)
    assert prefix._deployment_config.request_router_config.request_router_class == (
        "deployments.prefix_routing.PrefixCacheRouter")
    assert prefix._deployment_config.request_router_config.request_router_kwargs == router_kwargs()
