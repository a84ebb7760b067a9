"""Prefix-aware replica choice: a request goes to the replica whose vLLM prefix cache already holds its prompt's
start, as long as the replicas' loads are close.

Why: a long shared prefix (a system prompt, a conversation's growing history) costs a full prefill on a replica
that has not seen it and almost nothing on one that has, so with several replicas Serve's default choice (the less
busy of two random replicas) throws most of vLLM's prefix cache away. Ray Serve LLM's ``PrefixCacheAffinityRouter``
keeps a tree of the text each replica was sent and picks the best match while the replicas' queues are within
``imbalanced_threshold`` of each other; beyond that it balances load. It reads the prompt from a request object's
``messages`` or ``prompt`` attribute; rayroute's engine methods take the OpenAI body as a dict (and the Responses
API names it ``input``), so this module reads the dict.

Bounded: the tree lives in one detached actor per model and, as Ray ships it, keeps every prompt it is sent, whole.
Here only the prompt's first :data:`PREFIX_MATCH_CHARS` characters are matched and inserted (affinity is about the
start), and the actor's eviction is on: past :data:`PREFIX_TREE_EVICTION_THRESHOLD_CHARS` per replica it drops the
least recently used text down to :data:`PREFIX_TREE_EVICTION_TARGET_CHARS`.

    models:
      - id: llama-3.1-8b-instruct
        replica_choice: prefix_cache     # default: kv_cache (deployments/kv_routing.py)
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.request_router.common import PendingRequest

from deployments.constants import (
    PREFIX_MATCH_CHARS,
    PREFIX_TREE_EVICTION_INTERVAL_S,
    PREFIX_TREE_EVICTION_TARGET_CHARS,
    PREFIX_TREE_EVICTION_THRESHOLD_CHARS,
)

# The body fields that hold the prompt, by endpoint: chat, text completions (and embeddings' input), Responses.
PROMPT_FIELDS = ("messages", "prompt", "input")
# Replicas count as balanced while their queues differ by fewer requests than this; beyond it, load decides.
IMBALANCED_THRESHOLD = 8


class PrefixCacheRouter(PrefixCacheAffinityRouter):
    """Ray's prefix-affinity router, reading the start of the prompt from rayroute's dict bodies."""

    def _extract_text_from_request(self, pending_request: PendingRequest) -> str | None:
        """The first :data:`PREFIX_MATCH_CHARS` characters of the prompt's text, or None when the request has none
        (token ids, only media parts, or a call that is not a request). Ray's router skips prefix matching on None
        and chooses by load; it must never get ``""`` (it divides by the text's length) or an exception (either ends
        its routing task, and the request waits for its queue timeout)."""
        for arg in pending_request.args:
            if isinstance(arg, dict):
                for field in PROMPT_FIELDS:
                    if field in arg:
                        return _prefix(self._normalize_prompt_to_string(arg[field]))
        try:
            return _prefix(super()._extract_text_from_request(pending_request))
        except ValueError:  # no `messages` or `prompt` attribute either
            return None


def _prefix(text: str | None) -> str | None:
    return text[:PREFIX_MATCH_CHARS] if text else None


def router_kwargs() -> dict[str, Any]:
    """The arguments Serve passes to :class:`PrefixCacheRouter` (its ``initialize_state``)."""
    return {"imbalanced_threshold": IMBALANCED_THRESHOLD,
            "do_eviction": True,
            "eviction_threshold_chars": PREFIX_TREE_EVICTION_THRESHOLD_CHARS,
            "eviction_target_chars": PREFIX_TREE_EVICTION_TARGET_CHARS,
            "eviction_interval_secs": PREFIX_TREE_EVICTION_INTERVAL_S}


def request_router_config() -> dict[str, Any]:
    """The deployment option that selects this router (``serve.deployment(...).options(request_router_config=)``)."""
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class=f"{__name__}.{PrefixCacheRouter.__name__}", request_router_kwargs=router_kwargs())}
