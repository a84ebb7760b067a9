"""The one contract between the router and an engine replica: the methods the router calls and what they yield.

The router holds a Serve handle to each model's engine deployment and calls one of its :data:`Endpoint` methods as
a stream (``handle.options(stream=True).chat.remote(body)``, :mod:`router.dispatch`); the call yields the items of
:mod:`deployments.replies`: :class:`~deployments.replies.Admitted` first, then an error, a whole reply or a stream's
first chunk (whose further events come on its stream channel, :mod:`deployments.stream_channel`). Serve calls the
other methods itself (health, autoscaling); tests and operators ask :meth:`EngineReplica.engine_info`.

:class:`deployments.engine.VLLMEngine` implements it, and so does the load test's engine; ``tests/test_interface.py``
checks both against this class, so a method renamed on one side fails there, not in a running cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol, get_args

from deployments.replies import EngineItem
from deployments.resume import Resume

# The OpenAI endpoints, as the names of the engine methods that answer them.
Endpoint = Literal["chat", "completions", "embeddings", "responses"]
ENDPOINT_NAMES: tuple[str, ...] = get_args(Endpoint)


class EngineReplica(Protocol):
    def chat(self, body: dict[str, Any], resume: Resume | None = None) -> AsyncIterator[EngineItem]:
        """A chat completion for a body the router checked (``/v1/chat/completions``); with ``resume``, the rest of
        a stream whose replica failed (:mod:`deployments.resume`)."""
        ...

    def completions(self, body: dict[str, Any], resume: Resume | None = None) -> AsyncIterator[EngineItem]:
        """A text completion (``/v1/completions``); ``resume`` as for :meth:`chat`."""
        ...

    def embeddings(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        """Embeddings (``/v1/embeddings``): one whole reply."""
        ...

    def responses(self, body: dict[str, Any]) -> AsyncIterator[EngineItem]:
        """A response of OpenAI's Responses API (``/v1/responses``); a stream is its typed events."""
        ...

    async def engine_info(self) -> dict[str, Any]:
        """The replica's platform and the number of requests its engine is running."""
        ...

    async def check_health(self) -> None:
        """Serve's health check: raises when the engine is gone or stuck."""
        ...

    def record_routing_stats(self) -> dict[str, Any]:
        """The engine's load and, for ``replica_choice: kv_cache``, the blocks its cache holds
        (:mod:`deployments.kv_routing`)."""
        ...

    async def reset_prefix_cache(self, pid: int | None = None) -> dict[str, Any]:
        """Drop the cached prefixes no request uses, on the replica whose process is ``pid`` (any, when None)."""
        ...

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine's load, for the ``engine_load`` autoscaling policy (:mod:`deployments.autoscaling`)."""
        ...
