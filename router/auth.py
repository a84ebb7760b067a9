"""API-key authentication: ``Authorization: Bearer <key>`` against the keys in ``RAYROUTE_API_KEYS``.

Keys come from the environment (on Kubernetes, a Secret), never from the Serve config, which Ray shows in its
dashboard and the chart renders into a ConfigMap-visible resource. Every configured key is compared in constant
time, and all of them are compared, so neither timing nor position tells an attacker how close a guess was.
"""

from __future__ import annotations

import hmac
import os

from deployments.replies import ErrorReply

API_KEYS_ENV = "RAYROUTE_API_KEYS"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def load_api_keys(environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return tuple(key.strip().encode() for key in raw.split(",") if key.strip())


class ApiKeyAuth:
    """With no keys configured every request passes (local development)."""

    def __init__(self, keys: tuple[bytes, ...]):
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> ErrorReply | None:
        """None when the ``Authorization`` header carries a configured key, else the 401 to send."""
        if not self._keys:
            return None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return ErrorReply(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                              "invalid_request_error", None, "invalid_api_key")
        candidate = presented.strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if matched:
            return None
        return ErrorReply(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
