"""API keys: ``Authorization: Bearer <key>``, and what each key may do.

Keys come from the environment (on Kubernetes, a Secret), never from the Serve config, which Ray shows in its
dashboard and the chart renders into a ConfigMap-visible resource. ``RAYROUTE_API_KEYS`` holds either plain keys,
comma-separated (each may do everything), or a JSON list of keys (:class:`deployments.api_keys.ApiKey`);
``RAYROUTE_API_KEYS_FILE`` names a YAML or JSON file holding such a list (a mounted Secret):

    - name: team-search                 # shown in logs and metrics instead of the key
      key: sk-...
      models: [smollm2-135m-instruct]   # names it may send; others get 403. Omitted: every model
      requests_per_minute: 600          # omitted: no limit
      tokens_per_minute: 200000         # prompt + completion tokens

Every configured key is compared in constant time, and all of them are compared, so neither timing nor position
tells an attacker how close a guess was.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

import yaml
from pydantic import SecretStr, TypeAdapter, ValidationError

from deployments.api_keys import ApiKey
from deployments.replies import ErrorReply

API_KEYS_ENV = "RAYROUTE_API_KEYS"
API_KEYS_FILE_ENV = "RAYROUTE_API_KEYS_FILE"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be read; the message says where (never what a key is)."""


def load_api_keys(environ: dict[str, str] | None = None) -> tuple[ApiKey, ...]:
    environ = os.environ if environ is None else environ
    raw, origin = environ.get(API_KEYS_ENV, "").strip(), API_KEYS_ENV
    if environ.get(API_KEYS_FILE_ENV):
        path = Path(environ[API_KEYS_FILE_ENV])
        try:
            raw, origin = path.read_text(), str(path)
        except OSError as exc:
            raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV}: cannot read {path}: {exc.strerror}") from None
    if not raw.strip():
        return ()
    if origin == API_KEYS_ENV and not raw.startswith("["):
        plain = [key.strip() for key in raw.split(",") if key.strip()]
        return tuple(ApiKey.model_construct(name=f"key-{i + 1}", key=SecretStr(key), models=None,
                                            requests_per_minute=None, tokens_per_minute=None)
                     for i, key in enumerate(plain))
    try:
        entries = json.loads(raw) if origin == API_KEYS_ENV else yaml.safe_load(raw)
        keys = TypeAdapter(list[ApiKey]).validate_python(entries)
    except (ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, ValidationError):  # its messages can echo input, and the input holds keys
            details = "; ".join(f"[{'.'.join(map(str, e['loc']))}] {e['msg']}" for e in exc.errors(include_input=False))
        else:
            details = type(exc).__name__
        raise ApiKeyConfigError(f"{origin}: not a valid list of API keys: {details}") from None
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise ApiKeyConfigError(f"{origin}: API key names must be unique")
    return tuple(keys)


class ApiKeyAuth:
    """With no keys configured every request passes (local development)."""

    def __init__(self, keys: tuple[ApiKey, ...]):
        self._keys = [(key.key.get_secret_value().encode(), key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> ApiKey | ErrorReply:
        """The key the ``Authorization`` header carries, or the 401 to send."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return ErrorReply(401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                              "invalid_request_error", None, "invalid_api_key")
        candidate = presented.strip().encode()
        found = None
        for secret, key in self._keys:
            if hmac.compare_digest(candidate, secret) and found is None:
                found = key
        if found is not None:
            return found
        return ErrorReply(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
