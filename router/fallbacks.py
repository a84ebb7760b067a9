"""Asking a model's fallbacks when the model itself cannot take a request at all.

A model may name fallbacks (``fallbacks:`` in its entry), tried in order when it answers that it cannot take the
request: full (429 ``model_at_capacity``), no replica in time (503 ``model_unavailable``), or a prompt longer than
its context (400 ``context_length_exceeded``). Any other error would be the same from another model, so it is the
answer. Nothing has gone to the client when a fallback is asked, so trying another model changes nothing it could
have seen; the answer comes under the fallback's name, with headers saying which model was asked and why it did
not answer.

From the moment a fallback is asked the request is that model's: its own timeouts start, and the request's record
(what its access-log line, token counts and metrics labels go by) names it, keeping the model asked for in
``fallback_from``. That rewrite happens here, in :func:`fall_back`, and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.api_keys import ApiKey
from deployments.config import RoutedModel
from deployments.interface import Endpoint
from deployments.replies import EngineItem, ErrorReply
from router.dispatch import call_engine, cancel
from router.errors import OpenAIError
from router.media import media_urls_allowed
from router.protocol import ChatCompletionBody, RequestBody, reject_media
from router.routes import Route
from router.telemetry import GatewayMetrics, RequestRecord

# The answers that mean a model could not take a request at all (full, no replica, a prompt it cannot hold), so a
# model's fallback may answer instead; any other error would be the same from another model.
FALLBACK_CODES = frozenset({"model_at_capacity", "model_unavailable", "context_length_exceeded"})
# On an answer from a fallback: the name the client asked for, and why that model did not answer.
FALLBACK_FROM_HEADER, FALLBACK_REASON_HEADER = "X-Rayroute-Fallback-From", "X-Rayroute-Fallback-Reason"


@dataclass(frozen=True)
class Answer:
    """The engine's first item and the call it came on; the model that gave it (the one asked for, or the
    fallback that answered instead), when that model was asked, which its timeouts run from, and the handle and
    payload it was asked with (a stream whose replica fails goes on through them)."""

    first: EngineItem
    call: DeploymentResponseGenerator
    model: RoutedModel
    asked_at: float
    handle: DeploymentHandle
    payload: dict[str, Any]


async def call_with_fallbacks(routes: dict[str, Route], route: Route, endpoint: Endpoint, body: RequestBody,
                              record: RequestRecord, key: ApiKey | None, streaming: bool,
                              metrics: GatewayMetrics, session: str | None = None) -> Answer:
    """The engine's first answer from ``route``'s model, or, when that one cannot take the request at all, from its
    first fallback that can (:data:`FALLBACK_CODES`). The last one's error, raised or replied, is the answer when
    none can. ``session`` is the client's session, which ``replica_choice: session`` places requests by."""
    fallbacks = [name for name in route.model.fallbacks if may_take(routes[name], key, body)]
    payload: dict[str, Any] = body.model_dump(exclude_unset=True)
    asked_at = record.arrived_at
    while True:
        try:
            by_session = session and route.model.replica_choice == "session"
            handle = route.handle.options(session_id=session) if by_session else route.handle
            first, call = await call_engine(handle, endpoint, route.model, payload, record, streaming, asked_at)
        except OpenAIError as exc:
            if not fallbacks or exc.reply.code not in FALLBACK_CODES:
                raise
            reason = exc.reply.code
        else:
            if not (fallbacks and isinstance(first, ErrorReply) and first.code in FALLBACK_CODES):
                return Answer(first, call, route.model, asked_at, handle, payload)
            cancel(call)
            reason = first.code
        route = routes[fallbacks.pop(0)]
        payload = {**payload, "model": route.name}  # answered under the fallback's name: the client sees who did
        fall_back(record, route, reason, metrics)
        asked_at = time.perf_counter()  # the fallback gets its own timeouts


def may_take(route: Route, key: ApiKey | None, body: RequestBody) -> bool:
    """Whether a fallback may answer this request: the key may use it (no reaching a model through another),
    and it takes the request's media, if any."""
    model = route.model
    if key is not None and not key.may_use(route.name, model.id):
        return False
    if isinstance(body, ChatCompletionBody) and not model.multimodal:
        try:
            reject_media(body)
        except OpenAIError:
            return False
    return media_urls_allowed(body, model)  # the request's hosts, already resolved by check_media_urls


def fall_back(record: RequestRecord, route: Route, reason: str, metrics: GatewayMetrics) -> None:
    """From now on the request is ``route``'s: counted as a fallback under the model asked for, then recorded
    under the fallback's name, keeping the first model asked for and the latest reason."""
    metrics.fell_back(record, route.name, route.model.id, reason)
    if record.fallback_from is None:
        record.fallback_from = record.model
    record.fallback_reason = reason
    record.model, record.served_model = route.name, route.model.id


def fallback_headers(record: RequestRecord) -> dict[str, str]:
    """The headers of an answer a fallback gave (none when the model asked for answered)."""
    if record.fallback_from is None:
        return {}
    return {FALLBACK_FROM_HEADER: record.fallback_from, FALLBACK_REASON_HEADER: record.fallback_reason or ""}


def lifetime_s(routes: dict[str, Route], route: Route) -> float:
    """The longest a request for ``route`` can live: its model's time, then each of its fallbacks' in turn."""
    return route.model.timeouts.total_s + sum(routes[name].model.timeouts.total_s for name in route.model.fallbacks)
