"""deployments/vllm_arguments.py against the installed vLLM."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from deployments.vllm_arguments import vllm_argument_names


def test_argument_names_read_from_source_are_the_imported_classes_fields() -> None:
    """The names come from vLLM's source files without importing it; they must be exactly the fields of the
    classes vLLM builds its engine and front end from."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    imported = {f.name for cls in (AsyncEngineArgs, FrontendArgs) for f in dataclasses.fields(cls)}
    assert vllm_argument_names() == imported
    # ... and reading them imports neither vLLM nor torch (which is why they are read, not imported).
    probe = ("import sys; from deployments.vllm_arguments import vllm_argument_names; vllm_argument_names(); "
             "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2]).stdout.strip() == "[]"
