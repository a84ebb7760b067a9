"""Ray's token authentication for the clusters ``make serve`` starts: on, and its token readable by its owner only.

Why: without it anyone who reaches Ray's ports (GCS, the dashboard's job API, a replica's gRPC server between
deployments) runs code in the cluster, API keys and limits bypassed. Ray turns token mode on for a new local cluster
when ``RAY_AUTH_MODE`` is unset, but writes its token to ``~/.ray/auth_token`` with the process's umask, commonly
readable by every local user; this sets the mode explicitly (so drivers that connect later send the token too) and
creates or tightens that file to mode 0600 before Ray would write it. The token is never printed: ``ray`` commands
and drivers of the same user read it from the file. On Kubernetes KubeRay does the same from a Secret (the chart's
``authOptions``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
# Every Ray process of a cluster, and every driver joining it, must agree on the mode; Ray reads it once per process.
RAY_AUTH_ENV = {AUTH_MODE_ENV: "token"}


def token_path(environ: dict[str, str] | None = None) -> Path | None:
    """Where Ray reads the token from: ``RAY_AUTH_TOKEN_PATH``, or its default file; None when the token is given
    in ``RAY_AUTH_TOKEN`` itself (Ray's precedence)."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV):
        return None
    return Path(environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")


def ensure_private_token(environ: dict[str, str] | None = None) -> Path | None:
    """Make sure the token file exists and only its owner can read it; returns its path (None: token in the env)."""
    path = token_path(environ)
    if path is None:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return path
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    with os.fdopen(fd, "w") as file:
        file.write(generate_new_authentication_token())
    return path


def read_token(environ: dict[str, str] | None = None) -> str:
    """The cluster's token, for a client that sends it itself (tests; never printed)."""
    environ = os.environ if environ is None else environ
    path = token_path(environ)
    return environ[TOKEN_ENV] if path is None else path.read_text().strip()
