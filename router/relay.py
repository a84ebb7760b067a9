"""A streamed answer, relayed to its client as the engine makes it.

A stream's first event comes on its Serve call, the rest on the stream's channel (:mod:`router.channel_client`,
:mod:`deployments.stream_channel`): one path for every event after the first, so the token counts and the gaps
between events (``rayroute_inter_token_latency_seconds``) are kept in one place. Then the Serve call's end is
read: until then Serve counts the request as ongoing, which autoscaling and replica choice go by.

A stream that cannot go on (its replica died, its channel broke, it ran out of time) ends with an error event and
``[DONE]``: its status line is long gone, and a client must not be left waiting. A client that leaves stops the
relay (Starlette cancels it): dropping the channel makes the engine replica abort the vLLM request at its next
write, and cancelling the Serve call aborts it at once.
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

from deployments.replies import Chunk, ErrorReply
from router.admission import Hold
from router.channel_client import Channel, ChannelClient
from router.dispatch import cancel
from router.telemetry import GatewayMetrics, RequestRecord

# Proxies (nginx, cloud load balancers) buffer responses unless told not to; a buffered stream is a broken one.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

T = TypeVar("T")

logger = logging.getLogger("rayroute.router")


class HeldStreamingResponse(StreamingResponse):
    """A stream that, when the response is over, releases its request's :class:`Hold` and cancels its engine call,
    even if its body never started (the connection was gone when the response began), which its generator's own
    ``finally`` cannot: a generator never started never runs it."""

    def __init__(self, content: AsyncIterator[str | bytes], hold: Hold, call: DeploymentResponseGenerator,
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.hold = hold
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel(self.call)  # nothing when the relay has ended it already
            self.hold.release()


def streamed_response(first: Chunk, call: DeploymentResponseGenerator, record: RequestRecord, deadline: float,
                      hold: Hold, channels: ChannelClient, metrics: GatewayMetrics,
                      headers: dict[str, str]) -> HeldStreamingResponse:
    """The response of a stream whose first chunk is ``first``, ending by ``deadline`` (``time.perf_counter``)."""
    return HeldStreamingResponse(relay(first, call, record, deadline, hold, channels, metrics), hold, call,
                                 media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def relay(first: Chunk, call: DeploymentResponseGenerator, record: RequestRecord, deadline: float,
                hold: Hold, channels: ChannelClient, metrics: GatewayMetrics) -> AsyncIterator[str | bytes]:
    """Pass SSE events through as they arrive, keeping the record's token counts and the gaps between events."""
    channel: Channel | None = None
    expiry: asyncio.TimerHandle | None = None
    try:
        yield first.data
        last = time.perf_counter()
        if first.channel is not None:
            channel = await within(deadline, channels.open(first.channel))
            expiry = asyncio.get_running_loop().call_later(deadline - time.perf_counter(), channel.expire)
            while text := await channel.read():
                now = time.perf_counter()
                metrics.token_gap(record, now - last)
                last = now
                record.prompt_tokens, record.completion_tokens = channel.prompt_tokens, channel.completion_tokens
                yield text
        await within(deadline, _end_of(call))
    except TimeoutError:
        record.status = 504
        yield ErrorReply.timeout(f"The stream did not finish within {deadline - record.arrived_at:g}s.",
                                 status=504, code="request_timeout").sse()
    except (GeneratorExit, asyncio.CancelledError):
        record.client_disconnected = True
        raise
    except Exception:
        logger.exception("stream for %s broke off", record.served_model)
        record.status = 502
        yield ErrorReply.server("The engine serving this stream failed. The output so far is incomplete.",
                                status=502, code="engine_error").sse()
    finally:
        if expiry is not None:
            expiry.cancel()
        if channel is not None:
            channel.close()
        cancel(call)
        hold.release()


async def _end_of(call: DeploymentResponseGenerator) -> None:
    """Read the Serve call to its end: it carries nothing after the first chunk (every later event, with the counts
    so far, came on the channel), but until it ends Serve counts the request as ongoing on its replica."""
    async for _ in call:
        pass


async def within(deadline: float, step: Awaitable[T]) -> T:
    async with asyncio.timeout(deadline - time.perf_counter()):
        return await step
