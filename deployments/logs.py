"""A replica's log lines, where an operator reads them: Ray Serve's log handlers for that replica.

Serve configures one logger in each replica, ``ray.serve``: it writes the replica's own file under the session's
``logs/serve/`` (what the dashboard and ``ray logs`` show per replica) and, by default, stderr; it does not
propagate. rayroute's loggers (``rayroute.engine``, ``rayroute.router``, ...) are not under it: their records go up
to the root logger, which in a Ray worker has no handler and Python's default WARNING level: left there, an INFO
line such as an engine's "ready" is dropped, and a warning reaches only the worker's stderr, through logging's
last-resort handler, never the replica's log file. :func:`send_our_logs_to_serve` sends them to Serve's handlers.

Serve's handlers also need protecting from vLLM, which reconfigures the process's logging when it loads
(:func:`serve_log_handlers_kept`).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
from collections.abc import Iterator

SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME, not imported: a private module
OUR_LOGGER = "rayroute"  # the parent of every logger of ours


class _ToServeHandlers(logging.Handler):
    """Hands each record to the ``ray.serve`` logger's handlers as they are when the record is made. Not copies of
    today's handlers: Serve replaces them whenever it (re)configures a replica's logging, and vLLM's start closes
    them (see :func:`serve_log_handlers_kept`)."""

    def emit(self, record: logging.LogRecord) -> None:
        # Logger.handle applies Serve's logger filters and then its handlers; the level was ours to check.
        logging.getLogger(SERVE_LOGGER).handle(record)


def send_our_logs_to_serve() -> None:
    """Make rayroute's loggers write, from INFO up, through the replica's Serve log handlers. Idempotent; call it in
    a replica's constructor (Serve has configured ``ray.serve`` by then).

    They stop propagating to the root logger: Serve's handlers are the replica's, and where something gives root a
    handler (a stderr one, as ``logging.basicConfig`` does) each line would be written twice. A logger of ours that
    already writes elsewhere and does not propagate (the router's access log) keeps doing so."""
    ours = logging.getLogger(OUR_LOGGER)
    if not any(isinstance(handler, _ToServeHandlers) for handler in ours.handlers):
        ours.addHandler(_ToServeHandlers())
    ours.setLevel(logging.INFO)
    ours.propagate = False


@contextlib.contextmanager
def serve_log_handlers_kept() -> Iterator[None]:
    """Serve's replica log handlers, put back after vLLM's start.

    vLLM sets up its logging with ``logging.config.dictConfig``, which closes every logging handler of the process,
    Serve's among them: the replica logger's ``MemoryHandler`` loses its file. Serve notices only when a restarted
    controller recovers the replica (after the head's loss) and reads the log file's path from that handler: it
    fails, and Serve replaces a healthy engine (measured by the head-failure scenario: every engine restarted,
    requests waited 45 s). A closed file handler reopens on its next line; the memory handler needs its file back.
    """
    serve_logger = logging.getLogger(SERVE_LOGGER)
    targets = [(handler, handler.target) for handler in serve_logger.handlers
               if isinstance(handler, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None:
                handler.setTarget(target)
