"""The engine replica's own plumbing that needs no vLLM engine running."""

from __future__ import annotations

import logging
import logging.config
import logging.handlers
from pathlib import Path

from deployments.engine import serve_log_handlers_kept


def test_serve_log_handlers_survive_vllm_configuring_logging(tmp_path: Path) -> None:
    """vLLM's dictConfig closes every handler of the process; Serve's replica logger must keep its file (a
    restarted Serve controller reads its path, and replaces the replica when it cannot)."""
    serve_logger = logging.getLogger("ray.serve")
    file_handler = logging.FileHandler(tmp_path / "replica.log")
    memory = logging.handlers.MemoryHandler(capacity=1, target=file_handler)
    serve_logger.addHandler(memory)
    try:
        with serve_log_handlers_kept():
            logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM does
            assert memory.target is None  # what it did to Serve's handler
        assert memory.target is file_handler
        serve_logger.warning("after vLLM started")
        memory.flush()
        assert "after vLLM started" in (tmp_path / "replica.log").read_text()
    finally:
        serve_logger.removeHandler(memory)
        file_handler.close()
