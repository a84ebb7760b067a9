"""Calling a model's engine deployment until it answers, within the model's timeouts.

The engine's first item says a replica took the request (:class:`deployments.replies.Admitted`); that splits the
wait into two, each with its own answer when it runs out. Before it the request waits for a replica, queued or
while one starts from zero: ``queue_s``, then 503 with ``Retry-After``. After it the wait is the engine's: for a
stream ``first_token_s``, then 408; for anything, ``total_s`` from arrival, then 504.

Failures are retried by where they happened. A call that fails before a replica took it (the replica is gone, or
its engine died and it said so) never ran, so it is sent again after a short pause, for as long as the queue
timeout allows; meanwhile Serve routes to another replica or starts a replacement. One that fails after admission
is a migration, at most the model's ``migration_limit`` per request (a stream's after its first token included,
:mod:`router.relay`): a request that itself kills engines must not take down one replica after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.config import RoutedModel
from deployments.constants import RETRY_PAUSE_MAX_S, RETRY_PAUSE_S, UNAVAILABLE_RETRY_AFTER_S
from deployments.interface import Endpoint
from deployments.replies import ENGINE_UNAVAILABLE, Admitted, EngineItem, ErrorReply
from deployments.resume import Resume
from router.errors import OpenAIError
from router.telemetry import RequestRecord

logger = logging.getLogger("rayroute.router")

async def call_engine(handle: DeploymentHandle, endpoint: Endpoint, model: RoutedModel, payload: dict[str, Any],
                      record: RequestRecord, streaming: bool, since: float, resume: Resume | None = None,
                      ) -> tuple[EngineItem, DeploymentResponseGenerator]:
    """The engine's first answer (an error, a whole reply, or a stream's first chunk) and the stream it came on;
    raises :class:`OpenAIError` for a timeout, a full queue or an engine that failed more often than the model's
    ``migration_limit``. The model's timeouts run from ``since`` (the request's arrival, the moment a fallback is
    asked, or a stream's replica failed). With ``resume``, the rest of a started stream (:mod:`deployments.resume`)."""
    timeouts = model.timeouts
    queue_deadline = since + timeouts.queue_s
    total_deadline = since + timeouts.total_s
    args = (payload,) if resume is None else (payload, resume)
    pause = RETRY_PAUSE_S
    while True:
        record.attempts += 1
        stream: DeploymentResponseGenerator | None = None
        admitted = False
        first_token_deadline = total_deadline
        try:
            stream = getattr(handle, endpoint).remote(*args)
            async with asyncio.timeout(queue_deadline - time.perf_counter()):
                item = await stream.__anext__()
            if isinstance(item, Admitted):
                admitted = True
                if streaming:
                    first_token_deadline = min(total_deadline, time.perf_counter() + timeouts.first_token_s)
                async with asyncio.timeout(first_token_deadline - time.perf_counter()):
                    item = await stream.__anext__()
        except TimeoutError:
            cancel(stream)
            raise timeout_error(model, admitted, first_token_deadline < total_deadline) from None
        except BackPressureError as exc:
            cancel(stream)
            raise OpenAIError(ErrorReply.rate_limit(
                f"The model `{payload['model']}` is at capacity: too many requests are queued for it. Retry "
                "shortly.", code="model_at_capacity", retry_after_s=exc.retry_after_s or 1.0)) from None
        except RayActorError:
            cancel(stream)
            item = None  # the replica died or cannot be reached
        except StopAsyncIteration:
            raise OpenAIError(ErrorReply.server("The engine ended the response without output.",
                                                status=502)) from None
        except BaseException:
            cancel(stream)
            raise
        if item is not None and not (isinstance(item, ErrorReply) and item.code == ENGINE_UNAVAILABLE):
            return item, stream
        cancel(stream)
        if admitted:
            if record.migrations >= model.migration_limit:
                raise OpenAIError(ErrorReply.server(
                    f"The engine failed while answering this request ({record.migrations + 1} replicas in all). It "
                    "was not sent to another.", status=502, code="engine_error"))
            record.migrations += 1
        if time.perf_counter() + pause > queue_deadline:
            raise timeout_error(model, False, False)
        logger.warning("retrying a %s request for %s after a replica failure (attempt %d)", endpoint,
                       model.id, record.attempts)
        await asyncio.sleep(pause)
        pause = min(pause * 2, RETRY_PAUSE_MAX_S)


def timeout_error(model: RoutedModel, admitted: bool, first_token: bool) -> OpenAIError:
    timeouts = model.timeouts
    if not admitted:
        return OpenAIError(ErrorReply.server(
            f"No replica of `{model.id}` could take the request within {timeouts.queue_s:g}s (starting up or "
            "busy). Retry later.", status=503, code="model_unavailable", retry_after_s=UNAVAILABLE_RETRY_AFTER_S))
    if first_token:
        return OpenAIError(ErrorReply.timeout(
            f"The model `{model.id}` produced no token within {timeouts.first_token_s:g}s.", status=408,
            code="first_token_timeout"))
    return OpenAIError(ErrorReply.timeout(
        f"The request to `{model.id}` did not finish within {timeouts.total_s:g}s.", status=504,
        code="request_timeout"))


def cancel(stream: DeploymentResponseGenerator | None) -> None:
    if stream is not None:
        # Cancelling a call that already failed raises its error again (Ray 2.60); it is handled where it came.
        with contextlib.suppress(Exception):
            stream.cancel()
