"""The names ``engine_args`` may use: the fields of vLLM's engine and OpenAI front-end argument classes.

Why read from vLLM's source rather than imported: importing those classes loads torch and most of vLLM (about 8
CPU-seconds), and the check runs where Serve builds each engine application, a task of its own per model, all of
them at once when a cluster starts or a config is deployed. Parsing the two files takes milliseconds and imports
nothing; a unit test holds the result equal to the imported dataclasses' fields, so a vLLM that moves them fails
there rather than here.

    >>> "max_model_len" in vllm_argument_names()
    True
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# Each file under the vllm package, and the dataclasses in it whose fields are arguments (a subclass's own fields
# and those of its base in the same file).
ARGUMENT_CLASSES = {
    "engine/arg_utils.py": ("EngineArgs", "AsyncEngineArgs"),
    "entrypoints/launchers/cli_args.py": ("BaseFrontendArgs", "FrontendArgs"),
}
_NOT_FIELDS = ("ClassVar", "InitVar")  # annotations dataclasses leave out of fields()


@functools.cache
def vllm_argument_names() -> frozenset[str]:
    spec = importlib.util.find_spec("vllm")  # finds the package without running its __init__
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("vllm is not installed")
    package = Path(spec.origin).parent
    names: set[str] = set()
    for relative, classes in ARGUMENT_CLASSES.items():
        tree = ast.parse((package / relative).read_text(encoding="utf-8"))
        found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in classes]
        if len(found) != len(classes):
            raise LookupError(f"vllm/{relative} no longer defines {', '.join(classes)}")
        for node in found:
            names.update(_fields(node))
    return frozenset(names)


def _fields(node: ast.ClassDef) -> list[str]:
    return [statement.target.id for statement in node.body
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            and ast.unparse(statement.annotation).split("[")[0].split(".")[-1] not in _NOT_FIELDS]
