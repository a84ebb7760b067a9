"""A replica's log lines reach Serve's log handlers for it, and survive vLLM configuring logging.

Serve's handlers are made by Ray's own ``configure_component_logger``, as Serve makes them in a replica (less the
stdout/stderr redirection, which only a replica gets and which would take pytest's output), into a temporary
logs directory: no cluster.
"""

from __future__ import annotations

import logging
import logging.config
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.serve._private.logging_utils import configure_component_logger
from ray.serve.schema import LoggingConfig

from deployments.logs import OUR_LOGGER, SERVE_LOGGER, send_our_logs_to_serve, serve_log_handlers_kept


@pytest.fixture
def loggers() -> Iterator[None]:
    """Serve's logger and ours put back as they were: other tests read our lines through the root logger."""
    saved = {name: (logger, logger.handlers[:], logger.level, logger.propagate)
             for name in (SERVE_LOGGER, OUR_LOGGER) for logger in [logging.getLogger(name)]}
    yield
    for logger, handlers, level, propagate in saved.values():
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def configure_serve(logs_dir: Path, replica: str) -> Path:
    """Serve's logger for a replica, as Serve configures it; the replica's log file."""
    configure_component_logger(component_name="engine-m", component_id=replica,
                               logging_config=LoggingConfig(logs_dir=str(logs_dir)), max_bytes=1 << 20,
                               backup_count=1)
    return logs_dir / f"engine-m_{replica}.log"


def flush_serve() -> None:
    for handler in logging.getLogger(SERVE_LOGGER).handlers:
        handler.flush()


def test_our_lines_reach_the_replicas_serve_log_file(tmp_path: Path, loggers: None) -> None:
    log_file = configure_serve(tmp_path, "r1")
    send_our_logs_to_serve()
    send_our_logs_to_serve()  # as a second replica class in the process would: still one way to Serve
    engine_log = logging.getLogger("rayroute.engine")
    engine_log.info("engine for m ready")
    engine_log.debug("not at INFO")
    logging.getLogger("rayroute.router").warning("a router warning")
    flush_serve()
    text = log_file.read_text()
    assert "engine-m r1" in text  # Serve's format: the replica is named on each line
    assert "engine for m ready" in text and "a router warning" in text
    assert "not at INFO" not in text
    assert len([line for line in text.splitlines() if "engine for m ready" in line]) == 1


def test_our_lines_follow_serve_when_it_reconfigures_and_when_vllm_loads(tmp_path: Path, loggers: None) -> None:
    configure_serve(tmp_path, "r1")
    send_our_logs_to_serve()
    with serve_log_handlers_kept():
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM does
    log_file = configure_serve(tmp_path, "r2")  # Serve replaces its handlers (a new logging config)
    logging.getLogger("rayroute.engine").info("after both")
    flush_serve()
    assert "after both" in log_file.read_text()


def test_our_lines_do_not_also_go_to_the_root_logger(tmp_path: Path, loggers: None,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Where something gives root a handler, a line written by Serve's handlers too would appear twice."""
    configure_serve(tmp_path, "r1")
    send_our_logs_to_serve()
    with caplog.at_level(logging.INFO):
        logging.getLogger("rayroute.engine").info("once")
    assert "once" not in caplog.text


def test_serve_log_handlers_survive_vllm_configuring_logging(tmp_path: Path, loggers: None) -> None:
    """vLLM's dictConfig closes every handler of the process; Serve's replica logger must keep its file (a
    restarted Serve controller reads its path, and replaces the replica when it cannot)."""
    serve_logger = logging.getLogger(SERVE_LOGGER)
    file_handler = logging.FileHandler(tmp_path / "replica.log")
    memory = logging.handlers.MemoryHandler(capacity=1, target=file_handler)
    serve_logger.addHandler(memory)
    with serve_log_handlers_kept():
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM does
        assert memory.target is None  # what it did to Serve's handler
    assert memory.target is file_handler
    serve_logger.warning("after vLLM started")
    memory.flush()
    assert "after vLLM started" in (tmp_path / "replica.log").read_text()
    file_handler.close()
