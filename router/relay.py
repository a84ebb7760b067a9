"""A streamed answer, relayed to its client as the engine makes it, and taken on by another replica when its own
fails.

A stream's first event comes on its Serve call, the rest on the stream's channel (:mod:`router.channel_client`,
:mod:`deployments.stream_channel`): one path for every event after the first, so the token counts and the gaps
between events (``rayroute_inter_token_latency_seconds``) are kept in one place. Then the Serve call's end is
read: until then Serve counts the request as ongoing, which autoscaling and replica choice go by.

When the replica under a stream dies, its channel breaks or its engine stops, the stream goes on: the relay holds
the ids of every token it has relayed and how much of their text, and asks the model for the rest
(:mod:`deployments.resume`), at most the model's ``migration_limit`` times per request; the new replica's events
follow in the same response, so the client sees one stream, one ``[DONE]`` and one usage. A stream that cannot go
on (not resumable, out of migrations, no replica in time, out of time) ends with an error event and ``[DONE]``:
its status line is long gone, and a client must not be left waiting. A client that leaves stops the relay
(Starlette cancels it): dropping the channel makes the engine replica abort the vLLM request at its next write,
and cancelling the Serve call aborts it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentResponseGenerator
from starlette.types import Receive, Scope, Send

from deployments.interface import Endpoint
from deployments.replies import Chunk, ErrorReply
from deployments.resume import Resume, first_event_identity
from router.admission import Hold
from router.channel_client import Channel, ChannelClient
from router.dispatch import call_engine, cancel
from router.errors import OpenAIError
from router.fallbacks import Answer
from router.telemetry import GatewayMetrics, RequestRecord

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

T = TypeVar("T")

logger = logging.getLogger("rayroute.router")


class HeldStreamingResponse(StreamingResponse):
    """A stream that, when the response is over, releases its request's :class:`Hold` and cancels its engine call,
    even if its body never started (the connection was gone when the response began), which its generator's own
    ``finally`` cannot: a generator never started never runs it."""

    def __init__(self, stream: RelayedStream, **kwargs: Any):
        super().__init__(stream.events(), **kwargs)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.stream.call)  # nothing when the relay has ended it already
            self.stream.hold.release()


def streamed_response(answer: Answer, endpoint: Endpoint, record: RequestRecord, hold: Hold,
                      channels: ChannelClient, metrics: GatewayMetrics,
                      headers: dict[str, str]) -> HeldStreamingResponse:
    """The response of a stream whose first chunk is ``answer.first``, ending by its model's total time."""
    return HeldStreamingResponse(RelayedStream(answer, endpoint, record, hold, channels, metrics),
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


class RelayedStream:
    """One stream on its way to the client: the call it reads now (another after a migration), the tokens relayed
    so far (their ids and the characters of their text), and when it must end."""

    def __init__(self, answer: Answer, endpoint: Endpoint, record: RequestRecord, hold: Hold,
                 channels: ChannelClient, metrics: GatewayMetrics):
        self.answer, self.endpoint, self.record, self.hold = answer, endpoint, record, hold
        self.channels, self.metrics = channels, metrics
        self.call = answer.call
        self.deadline = answer.asked_at + answer.model.timeouts.total_s
        self.token_ids: list[int] = []
        self.text_chars = 0

    async def events(self) -> AsyncIterator[str | bytes]:
        """Pass SSE events through as they arrive, keeping the record's token counts and the gaps between events;
        on a failure, go on elsewhere (:meth:`_go_on`) or end with an error event."""
        record, first = self.record, self.answer.first
        assert isinstance(first, Chunk)
        last = 0.0
        try:
            while True:
                channel: Channel | None = None
                expiry: asyncio.TimerHandle | None = None
                try:
                    if last:
                        self.metrics.token_gap(record, time.perf_counter() - last)
                    yield first.data
                    last = time.perf_counter()
                    self._took(first)
                    if first.channel is not None:
                        channel = await within(self.deadline, self.channels.open(first.channel))
                        expiry = asyncio.get_running_loop().call_later(self.deadline - time.perf_counter(),
                                                                       channel.expire)
                        try:
                            while text := await channel.read():
                                now = time.perf_counter()
                                self.metrics.token_gap(record, now - last)
                                last = now
                                record.prompt_tokens = channel.prompt_tokens
                                record.completion_tokens = channel.completion_tokens
                                yield text
                        finally:
                            self.token_ids.extend(channel.token_ids)
                            self.text_chars = max(self.text_chars, channel.text_chars)
                    ended = await within(self.deadline, _end_of(self.call))
                    if ended is None:
                        return
                    failure: object = ended.message  # the engine stopped under the stream
                except TimeoutError:
                    record.status = 504
                    yield _ran_out(record, self.deadline).sse()
                    return
                except (GeneratorExit, asyncio.CancelledError):
                    record.client_disconnected = True
                    raise
                except Exception as exc:
                    failure = exc
                finally:
                    if expiry is not None:
                        expiry.cancel()
                    if channel is not None:
                        channel.close()
                    cancel(self.call)
                went_on = await self._go_on(first, failure)
                if isinstance(went_on, ErrorReply):
                    record.status = went_on.status
                    yield went_on.sse()
                    return
                first, self.call = went_on
        finally:
            cancel(self.call)
            self.hold.release()

    def _took(self, first: Chunk) -> None:
        """A (first or going-on) call's first chunk was relayed: its counts and tokens are the client's now."""
        self.record.prompt_tokens, self.record.completion_tokens = first.prompt_tokens, first.completion_tokens
        self.token_ids.extend(first.token_ids)
        self.text_chars = max(self.text_chars, first.text_chars)

    async def _go_on(self, first: Chunk, failure: object) -> tuple[Chunk, DeploymentResponseGenerator] | ErrorReply:
        """The first chunk and call of the stream's rest from another replica, or the error that ends it."""
        record, model = self.record, self.answer.model
        broke = ErrorReply.server("The engine serving this stream failed. The output so far is incomplete.",
                                  status=502, code="engine_error")
        if not first.resumable or record.migrations >= model.migration_limit:
            logger.warning("stream for %s broke off after %d tokens (%s); not resumed: %s", model.id,
                           record.completion_tokens, failure,
                           "not resumable" if not first.resumable else "migration_limit reached")
            return broke
        record.migrations += 1
        logger.warning("stream for %s broke off after %d tokens (%s); going on on another replica", model.id,
                       len(self.token_ids), failure)
        resume = Resume(tuple(self.token_ids), self.text_chars, *first_event_identity(self.answer.first.data))
        try:
            item, call = await within(self.deadline, call_engine(
                self.answer.handle, self.endpoint, model, self.answer.payload, record, True, time.perf_counter(),
                resume))
        except TimeoutError:
            return _ran_out(record, self.deadline)
        except OpenAIError as exc:
            return exc.reply
        if isinstance(item, Chunk):
            return item, call
        cancel(call)
        logger.error("stream for %s could not go on: %s", model.id, item)
        return item if isinstance(item, ErrorReply) else broke


def _ran_out(record: RequestRecord, deadline: float) -> ErrorReply:
    return ErrorReply.timeout(f"The stream did not finish within {deadline - record.arrived_at:g}s.", status=504,
                              code="request_timeout")


async def _end_of(call: DeploymentResponseGenerator) -> ErrorReply | None:
    """Read the Serve call to its end: it carries nothing after the first chunk (every later event, with the counts
    so far, came on the channel) but, when the engine stopped under the stream, the error saying so; until it ends
    Serve counts the request as ongoing on its replica."""
    ended = None
    async for item in call:
        if isinstance(item, ErrorReply):
            ended = item
    return ended


async def within(deadline: float, step: Awaitable[T]) -> T:
    async with asyncio.timeout(deadline - time.perf_counter()):
        return await step
