"""What the router tells operators about each request: Prometheus metrics and one JSON access-log line.

Metrics are Ray metrics, so every node exports them, with vLLM's and Ray Serve's own, on one port (Ray's metrics
export port; ``make serve`` fixes it at 8080). Ray's exporter prefixes custom metrics with ``ray_`` and suffixes
counters with ``_total``: the counter made as ``rayroute_requests`` is scraped as ``ray_rayroute_requests_total``.

Labels: ``model`` is the name the client sent (an alias stays an alias), ``served_model`` the configured id behind
it. Token counters move by exactly the ``usage`` clients received; a stream whose client left counts the tokens
generated until then.

Every label value comes from a fixed set, so no client can make new series: ``model`` and ``served_model`` are
configured names (empty before a request is routed; :data:`OTHER` for a pair the router was not built with, which
would be a bug), ``endpoint`` a route's template or ``other`` (:mod:`router.middleware`), ``status_code`` a status
the router answered with, ``fallback`` a configured name and ``reason`` one of the fallback error codes.

The access log never holds a prompt, an output or a key: ids, model, status, token counts and timings only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ray.util.metrics import Counter, Gauge, Histogram

from deployments.constants import GAUGE_PUBLISH_S

access_log = logging.getLogger("rayroute.access")


def enable_access_log() -> None:
    """Write access lines, bare JSON, to the replica's stderr (Ray keeps it in the worker's log files and shows it
    on the driver). Not through the root logger: Ray's own handlers there would wrap each line in a prefix."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False

# Latency buckets (seconds): from a cached short answer to a long generation on a busy CPU engine.
_LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_TOKEN_GAP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
# One Ray histogram observation costs about as much CPU as relaying the chunk it times (py-spy: a sixth of the
# router's CPU at 100 streams when every gap was observed). A stream's gaps are observed one in this many (its
# first always): the quantiles stay right, only the histogram's count is that much smaller than the chunks'.
GAP_SAMPLE_EVERY = 8
_ROUTER_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
_MODEL = ("model", "served_model")
OTHER = "other"  # the model labels of a pair the metrics were not built with


class GatewayMetrics:
    """The router's metrics; one instance per router replica."""

    def __init__(self, models: Iterable[tuple[str, str]] = (), replica_choices: dict[str, str] | None = None) -> None:
        """``models``: the (model, served_model) label pairs the gauges show from the start, at 0;
        ``replica_choices``: each served model's ``replica_choice``."""
        self.requests = Counter("rayroute_requests", "Requests answered, by model, endpoint and HTTP status.",
                                tag_keys=(*_MODEL, "endpoint", "status_code"))
        self.prompt_tokens = Counter("rayroute_prompt_tokens", "Prompt tokens of answered requests.",
                                     tag_keys=_MODEL)
        self.completion_tokens = Counter("rayroute_completion_tokens", "Tokens generated for clients.",
                                         tag_keys=_MODEL)
        self.time_to_first_token = Histogram(
            "rayroute_time_to_first_token_seconds", "From the request reaching the router to its first token "
            "(or whole answer) leaving it.", boundaries=_LATENCY_BUCKETS, tag_keys=_MODEL)
        self.inter_token_latency = Histogram(
            "rayroute_inter_token_latency_seconds", "Gap between consecutive streamed chunks (one gap in "
            f"{GAP_SAMPLE_EVERY} of each stream, its first always).",
            boundaries=_TOKEN_GAP_BUCKETS, tag_keys=_MODEL)
        self.request_duration = Histogram(
            "rayroute_request_duration_seconds", "From the request reaching the router to its last byte.",
            boundaries=_LATENCY_BUCKETS, tag_keys=(*_MODEL, "endpoint"))
        self.router_overhead = Histogram(
            "rayroute_router_overhead_seconds", "Time the router spends on a request before handing it to the "
            "engine (authentication, parsing, checks, routing).", boundaries=_ROUTER_BUCKETS, tag_keys=_MODEL)
        self.fallbacks = Counter("rayroute_fallbacks", "Requests a model's fallback answered instead: by the model "
                                 "asked for, the fallback, and why (the error code the model gave).",
                                 tag_keys=(*_MODEL, "fallback", "reason"))
        self.migrations = Counter("rayroute_migrations", "Times a request went on on another replica after the one "
                                  "answering it failed (a stream from the tokens it had sent).",
                                  tag_keys=_MODEL)
        self.replica_choice = Gauge(
            "rayroute_replica_choice", "1 for each served model under its replica choice: what joins vLLM's "
            "per-model metrics (prefix-cache hits) to the policy.", tag_keys=("served_model", "replica_choice"))
        self._replica_choices = dict(replica_choices or {})
        self.in_flight = Gauge("rayroute_requests_in_flight", "Requests being answered now.", tag_keys=_MODEL)
        self.waiting = Gauge("rayroute_requests_waiting", "Requests sent to an engine that has not answered yet "
                             "(queued or prefilling).", tag_keys=_MODEL)
        # The router keeps the gauges' counts and publishes them every GAUGE_PUBLISH_S (see publish_gauges), every
        # configured model from the start: Ray exports a gauge only while it is being set, so a gauge set when
        # requests start and end would be "No data" on the dashboard whenever a model is idle.
        models = list(models)  # read more than once below: a generator would leave the rest empty
        self._labelled = {*models, ("", "")}  # the only model label pairs; "": not routed (yet)
        self._in_flight: dict[tuple[str, str], int] = dict.fromkeys(models, 0)
        self._waiting: dict[tuple[str, str], int] = dict.fromkeys(models, 0)
        self._publisher: asyncio.Task | None = None

    def publish_gauges(self) -> None:
        """Start publishing the gauges, if not yet: on the event loop that serves the requests, so from there (the
        router app's lifespan, :meth:`router.ingress.OpenAIRouter.running`), never from a constructor."""
        if self._publisher is None:
            self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

    async def stop_publishing(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.cancel()
            await asyncio.wait([publisher])

    async def _publish_forever(self) -> None:
        while True:
            for counts, gauge in ((self._in_flight, self.in_flight), (self._waiting, self.waiting)):
                for (model, served_model), count in counts.items():
                    gauge.set(count, tags={"model": model, "served_model": served_model})
            for served_model, choice in self._replica_choices.items():
                self.replica_choice.set(1, tags={"served_model": served_model, "replica_choice": choice})
            await asyncio.sleep(GAUGE_PUBLISH_S)

    def started(self, record: RequestRecord) -> None:
        self._move(self._in_flight, self._pair(record), +1)
        self._move(self._waiting, self._pair(record), +1)

    def first_reply(self, record: RequestRecord) -> None:
        self._move(self._waiting, self._pair(record), -1)
        if record.first_reply_at is not None:
            self.time_to_first_token.observe(record.first_reply_at - record.arrived_at, tags=self._tags(record))

    def fell_back(self, record: RequestRecord, model: str, served_model: str, reason: str) -> None:
        """The request goes to the fallback ``model`` (served by ``served_model``): counted under the model it was
        asked of, and its gauges move to the fallback's. Only counts: the record, still the asked model's here, is
        rewritten by :func:`router.fallbacks.fall_back`, which calls this first."""
        to = self._labels(model, served_model)
        self.fallbacks.inc(1, tags={**self._tags(record), "fallback": to[0], "reason": reason})
        for counts in (self._in_flight, self._waiting):
            self._move(counts, self._pair(record), -1)
            self._move(counts, to, +1)

    def token_gap(self, record: RequestRecord, seconds: float) -> None:
        record.gaps += 1
        if record.gaps % GAP_SAMPLE_EVERY == 1 % GAP_SAMPLE_EVERY:
            self.inter_token_latency.observe(seconds, tags=self._tags(record))

    def finished(self, record: RequestRecord) -> None:
        """Once per API request, whatever its end: answered, rejected, failed, or abandoned by its client.

        A request rejected before it was routed (bad key, bad body, unknown model) has empty model labels: a
        client's made-up model names must not become label values.
        """
        tags = self._tags(record)
        if record.dispatched_at is not None:
            if record.first_reply_at is None:
                self._move(self._waiting, self._pair(record), -1)
            self._move(self._in_flight, self._pair(record), -1)
            self.router_overhead.observe(record.dispatched_at - record.arrived_at, tags=tags)
        self.requests.inc(1, tags={**tags, "endpoint": record.endpoint, "status_code": str(record.status)})
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens, tags=tags)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens, tags=tags)
        if record.migrations:
            self.migrations.inc(record.migrations, tags=tags)
        self.request_duration.observe(record.duration, tags={**tags, "endpoint": record.endpoint})

    def _labels(self, model: str, served_model: str) -> tuple[str, str]:
        """A (model, served_model) pair as labels: configured names only."""
        return (model, served_model) if (model, served_model) in self._labelled else (OTHER, OTHER)

    def _pair(self, record: RequestRecord) -> tuple[str, str]:
        return self._labels(record.model, record.served_model)

    def _tags(self, record: RequestRecord) -> dict[str, str]:
        model, served_model = self._pair(record)
        return {"model": model, "served_model": served_model}

    @staticmethod
    def _move(counts: dict[tuple[str, str], int], pair: tuple[str, str], delta: int) -> None:
        counts[pair] = counts.get(pair, 0) + delta


@dataclass
class RequestRecord:
    """One request as the router saw it, filled in as it goes."""

    request_id: str
    endpoint: str  # the route's template, or "other" (a metric label)
    model: str
    served_model: str
    path: str = ""  # as the client sent it, cut short (the access log's, never a label)
    arrived_at: float = field(default_factory=time.perf_counter)
    dispatched_at: float | None = None
    first_reply_at: float | None = None
    finished_at: float | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gaps: int = 0  # chunk gaps seen (see GAP_SAMPLE_EVERY)
    client_disconnected: bool = False
    key_name: str | None = None  # the API key's configured name; never the key
    attempts: int = 0  # engine calls made (more than one when a failed replica's request was retried)
    migrations: int = 0  # times the request went on elsewhere after a replica that had taken it failed
    fallback_from: str | None = None  # the model asked for, when a fallback answered (model is the fallback)
    fallback_reason: str | None = None  # the error code that sent it to the fallback

    @property
    def duration(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.arrived_at

    def log_line(self) -> str:
        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) * 1000, 2)

        return json.dumps({
            "request_id": self.request_id, "endpoint": self.endpoint, "path": self.path, "model": self.model,
            "served_model": self.served_model, "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "ttft_ms": ms(self.arrived_at, self.first_reply_at),
            "duration_ms": ms(self.arrived_at, self.finished_at), "client_disconnected": self.client_disconnected,
            "key": self.key_name, "attempts": self.attempts, "migrations": self.migrations,
            "fallback_from": self.fallback_from,
            "fallback_reason": self.fallback_reason,
        })
