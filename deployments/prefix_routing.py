"""Prefix-aware replica choice: a request goes to the replica whose vLLM prefix cache already holds its prompt's
start, as long as the replicas' loads are close.

Why: a long shared prefix (a system prompt, a conversation's growing history) costs a full prefill on a replica
that has not seen it and almost nothing on one that has, so with several replicas Serve's default choice (the less
busy of two random replicas) throws most of vLLM's prefix cache away. Ray Serve LLM's ``PrefixCacheAffinityRouter``
keeps a tree of the text each replica was sent and picks the best match while the replicas' queues are within
``imbalanced_threshold`` of each other; beyond that it balances load. It reads the prompt from a request object's
``messages`` or ``prompt`` attribute; rayroute's engine methods take the OpenAI body as a dict (and the Responses
API names it ``input``), so reading the dict is all this module adds.

    models:
      - id: llama-3.1-8b-instruct
        replica_choice: prefix_cache     # default: least_loaded (Serve's power of two choices)
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve._private.request_router.common import PendingRequest

# The body fields that hold the prompt, by endpoint: chat, text completions (and embeddings' input), Responses.
PROMPT_FIELDS = ("messages", "prompt", "input")
# Replicas count as balanced while their queues differ by fewer requests than this; beyond it, load decides.
IMBALANCED_THRESHOLD = 8


class PrefixCacheRouter(PrefixCacheAffinityRouter):
    """Ray's prefix-affinity router, reading the prompt from rayroute's dict bodies."""

    def _extract_text_from_request(self, pending_request: PendingRequest) -> str:
        for arg in pending_request.args:
            if isinstance(arg, dict):
                for field in PROMPT_FIELDS:
                    if field in arg:
                        return self._normalize_prompt_to_string(arg[field])
        return super()._extract_text_from_request(pending_request)


def request_router_config() -> dict[str, Any]:
    """The deployment option that selects this router (``serve.deployment(...).options(request_router_config=)``)."""
    from ray.serve.config import RequestRouterConfig

    return {"request_router_config": RequestRouterConfig(
        request_router_class=f"{__name__}.{PrefixCacheRouter.__name__}",
        request_router_kwargs={"imbalanced_threshold": IMBALANCED_THRESHOLD})}
