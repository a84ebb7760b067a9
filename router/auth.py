"""API-key authentication: ``Authorization: Bearer <key>`` against the keys in ``RAYROUTE_API_KEYS``.

Keys come from the environment (on Kubernetes, a Secret), never from the Serve config, which Ray shows in its
dashboard and the chart renders into a ConfigMap-visible resource. Every configured key is compared in constant
time, and all of them are compared, so neither timing nor position tells an attacker how close a guess was.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Request

from router.errors import OpenAIError

API_KEYS_ENV = "RAYROUTE_API_KEYS"


def load_api_keys(environ: dict[str, str] | None = None) -> tuple[bytes, ...]:
    raw = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
    return tuple(key.strip().encode() for key in raw.split(",") if key.strip())


class ApiKeyAuth:
    """A FastAPI dependency; with no keys configured every request passes (local development)."""

    def __init__(self, keys: tuple[bytes, ...]):
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise OpenAIError(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        candidate = presented.strip().encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
