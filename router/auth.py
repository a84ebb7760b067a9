"""API keys: ``Authorization: Bearer <key>``, and what each key may do.

Keys come from the environment (on Kubernetes, a Secret), never from the Serve config, which Ray shows in its
dashboard and the chart renders into a ConfigMap-visible resource. ``RAYROUTE_API_KEYS`` holds either plain keys,
comma-separated (each may do everything), or a JSON list of keys (:class:`deployments.api_keys.ApiKey`);
``RAYROUTE_API_KEYS_FILE`` names a YAML or JSON file holding such a list (a mounted Secret):

    - name: team-search                 # shown in logs and metrics instead of the key
      key: sk-...                       # at least MIN_API_KEY_LENGTH characters; or instead, key_sha256:
      # key_sha256: 3f0a...               the key's SHA-256 (64 lowercase hex), so the file holds no key
      models: [smollm2-135m-instruct]   # names it may send; others get 403. Omitted: every model
      requests_per_minute: 600          # omitted: no limit
      tokens_per_minute: 200000         # prompt + completion tokens

A presented key is hashed (SHA-256) and its digest compared in constant time with every configured key's, all of
them, so neither timing nor position tells an attacker how close a guess was, and a plain key and a hashed one are
checked alike. A key shorter than :data:`~deployments.constants.MIN_API_KEY_LENGTH` is a config error: a
placeholder such as ``sk-1234`` would be found by guessing whatever else is done (failed keys are throttled per
client address too: :mod:`router.auth_throttle`).

Keys rotate without a restart: each router replica re-reads ``RAYROUTE_API_KEYS_FILE`` every
:data:`~deployments.constants.API_KEYS_RELOAD_S` (:func:`follow_keys_file`), as Kubernetes rewrites a mounted
Secret in place when the Secret changes. A file that does not parse, or that holds no key, leaves the keys in use
as they were and says why in the log (never a key). Per-key limits are kept by key name, so a rotated key keeps its
allowance in progress.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

import yaml
from pydantic import SecretStr, TypeAdapter, ValidationError

from deployments.api_keys import ApiKey
from deployments.constants import API_KEYS_RELOAD_S, MIN_API_KEY_LENGTH
from deployments.replies import ErrorReply

API_KEYS_ENV = "RAYROUTE_API_KEYS"
API_KEYS_FILE_ENV = "RAYROUTE_API_KEYS_FILE"
CHALLENGE = {"WWW-Authenticate": "Bearer"}

logger = logging.getLogger("rayroute.router")


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be read; the message says where (never what a key is)."""


def load_api_keys(environ: dict[str, str] | None = None) -> tuple[ApiKey, ...]:
    environ = os.environ if environ is None else environ
    if environ.get(API_KEYS_FILE_ENV):
        path = Path(environ[API_KEYS_FILE_ENV])
        return parse_api_keys(read_keys_file(path), str(path))
    return parse_api_keys(environ.get(API_KEYS_ENV, "").strip(), API_KEYS_ENV)


def read_keys_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV}: cannot read {path}: {exc.strerror}") from None


def parse_api_keys(raw: str, origin: str) -> tuple[ApiKey, ...]:
    """The keys in ``raw``, read from ``origin`` (the environment variable, or the file's path)."""
    if not raw.strip():
        return ()
    if origin == API_KEYS_ENV and not raw.startswith("["):
        plain = [key.strip() for key in raw.split(",") if key.strip()]
        for i, key in enumerate(plain):
            if len(key) < MIN_API_KEY_LENGTH:
                raise ApiKeyConfigError(f"{origin}: key {i + 1} of {len(plain)} (key-{i + 1}) is shorter than "
                                        f"{MIN_API_KEY_LENGTH} characters")
        # Built, not validated: each is a bare key, checked above, and a list of them has nothing else to check.
        return tuple(ApiKey.model_construct(name=f"key-{i + 1}", key=SecretStr(key)) for i, key in enumerate(plain))
    entries = None
    try:
        entries = json.loads(raw) if origin == API_KEYS_ENV else yaml.safe_load(raw)
        keys = TypeAdapter(list[ApiKey]).validate_python(entries)
    except (ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, ValidationError):  # its messages can echo input, and the input holds keys
            details = "; ".join(_describe(e, entries) for e in exc.errors(include_input=False))
        else:
            details = type(exc).__name__
        raise ApiKeyConfigError(f"{origin}: not a valid list of API keys: {details}") from None
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise ApiKeyConfigError(f"{origin}: API key names must be unique")
    return tuple(keys)


def _describe(error: dict, entries: object) -> str:
    """One validation error, located by the entry's position and, when it has one, its name; never its input (a
    key), nor a short key's length."""
    loc = [str(part) for part in error["loc"]]
    if error["loc"] and isinstance(error["loc"][0], int) and isinstance(entries, list):
        entry = entries[error["loc"][0]]
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and 0 < len(name) <= 64:
            loc[0] += f" ({name})"
    message = error["msg"]
    if error["type"] == "too_short" and loc[-1:] == ["key"]:
        message = f"shorter than {MIN_API_KEY_LENGTH} characters"
    return f"[{'.'.join(loc)}] {message}"


def key_digest(key: str) -> bytes:
    """What a key is compared by: the SHA-256 of its UTF-8, as a hashed key (``key_sha256``) holds it."""
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    """With no keys configured every request passes (local development)."""

    def __init__(self, keys: tuple[ApiKey, ...]):
        self.replace(keys)

    def replace(self, keys: tuple[ApiKey, ...]) -> None:
        # One assignment: a request is checked against the old keys or the new ones, never a mix.
        self._keys = [(key_digest(key.key.get_secret_value()) if key.key is not None
                       else bytes.fromhex(key.key_sha256), key) for key in keys]

    @property
    def names(self) -> list[str]:
        return [key.name for _, key in self._keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> ApiKey | ErrorReply:
        """The key the ``Authorization`` header carries, or the 401 to send."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return ErrorReply.authentication("You didn't provide an API key. Send it as "
                                             "`Authorization: Bearer <key>`.")
        # Digests are all 32 bytes: compare_digest takes the same time for every key, whatever its length.
        candidate = key_digest(presented.strip())
        found = None
        for digest, key in self._keys:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = key
        if found is not None:
            return found
        return ErrorReply.authentication("Incorrect API key provided.")


async def follow_keys_file(auth: ApiKeyAuth, path: Path, every: float = API_KEYS_RELOAD_S) -> None:
    """Re-read the keys file every ``every`` seconds and use its keys once it changed and parses. Runs for the life
    of the router replica; a file that is unreadable, does not parse or holds no key changes nothing (an empty
    Secret must not open a closed endpoint)."""
    try:
        last: str | None = read_keys_file(path)
    except ApiKeyConfigError:
        last = None  # None: unreadable
    while True:
        await asyncio.sleep(every)
        try:
            raw = read_keys_file(path)
        except ApiKeyConfigError as exc:
            if last is not None:  # said once, not every period
                logger.error("API keys not reloaded, the %d in use stay: %s", len(auth.names), exc)
            last = None
            continue
        if raw == last:
            continue
        last = raw
        try:
            keys = parse_api_keys(raw, str(path))
            if not keys:
                raise ApiKeyConfigError(f"{path}: holds no API key")
        except ApiKeyConfigError as exc:
            logger.error("API keys not reloaded, the %d in use stay: %s", len(auth.names), exc)
            continue
        before = set(auth.names)
        auth.replace(keys)
        now = set(auth.names)
        # WARNING, not INFO: a replica's log shows it without any logging set up, and a rotation is worth seeing.
        logger.warning("API keys reloaded from %s: %d keys; added %s, removed %s, kept %d (their keys may have "
                       "changed)", path, len(now), sorted(now - before) or "none", sorted(before - now) or "none",
                       len(now & before))
