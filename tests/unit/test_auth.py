"""API keys without a cluster (router/auth.py): read from the environment or a keys file that is followed while the
app runs, their minimum length, hashed keys, and that no log line ever holds a key or its hash. The failed-key
throttle is ``test_auth_throttle.py``."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deployments.constants import AUTH_FAILURE_BURST, MIN_API_KEY_LENGTH
from deployments.replies import ErrorReply
from router.auth import ApiKeyAuth, ApiKeyConfigError, follow_keys_file, load_api_keys, parse_api_keys
from router.ingress import OpenAIRouter
from tests.unit.fakes import KEYED_CONFIG as CONFIG
from tests.unit.fakes import KEYED_HASHED as HASHED
from tests.unit.fakes import KEYED_KEY as KEY
from tests.unit.fakes import KEYED_WRONG as WRONG
from tests.unit.fakes import FakeHandle, chat, from_address, keys_yaml, sha256
from tests.unit.fakes import answer_with_model as ok

# --- reading and following keys -------------------------------------------------------------------------------------

def test_api_keys_from_env() -> None:
    a, b, c = ("sk-" + letter * 20 for letter in "abc")
    keys = load_api_keys({"RAYROUTE_API_KEYS": f" {a}, {b} ,,{c} "})
    assert [(k.name, k.key.get_secret_value(), k.models, k.limited) for k in keys] == [
        ("key-1", a, None, False), ("key-2", b, None, False), ("key-3", c, None, False)]
    assert load_api_keys({}) == ()


def test_a_rewritten_keys_file_takes_effect_and_a_bad_one_changes_nothing(tmp_path, caplog) -> None:
    """The router follows its keys file: a new key works and the one it replaced is refused after the next read; a
    file that does not parse, or holds no key, leaves the keys as they were and says why without showing a key."""
    import asyncio
    import logging

    from router.auth import ApiKeyAuth, follow_keys_file

    old, ops, new, bad = (f"sk-{which}-key-0123456789" for which in ("old", "ops", "new", "bad"))
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{name: team, key: {old}}}\n- {{name: ops, key: {ops}}}\n")
    auth = ApiKeyAuth(load_api_keys({"RAYROUTE_API_KEYS_FILE": str(path)}))

    def allowed(key: str) -> bool:
        return not isinstance(auth.check(f"Bearer {key}"), ErrorReply)

    async def rotate() -> None:
        follower = asyncio.create_task(follow_keys_file(auth, path, every=0.01))
        await asyncio.sleep(0.05)
        assert allowed(old)
        path.write_text(f"- {{name: team, key: {new}}}\n- {{name: ops, key: {ops}}}\n")
        await asyncio.sleep(0.05)
        assert allowed(new) and allowed(ops) and not allowed(old)
        for broken in (f"- {{name: team, key: {bad}, models: nope}}\n", "- [not a key\n", "", "[]"):
            path.write_text(broken)
            await asyncio.sleep(0.05)
            assert allowed(new) and auth.names == ["team", "ops"], broken
        path.unlink()  # unreadable: said once, however many reads fail
        await asyncio.sleep(0.05)
        assert allowed(new)
        follower.cancel()

    with caplog.at_level(logging.INFO, logger="rayroute.router"):
        asyncio.run(rotate())
    messages = [record.getMessage() for record in caplog.records]
    assert any("reloaded" in m and "kept 2" in m for m in messages)
    assert sum("not reloaded, the 2 in use stay" in m for m in messages) == 5
    assert not any("sk-" in m for m in messages)  # neither old, new nor broken keys are logged


def test_the_router_follows_its_keys_file_while_its_app_runs(router: OpenAIRouter, app, keys_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Built, the router starts nothing; its app's lifespan (Serve runs it when the replica starts) follows the
    keys file, and stops following it when the app stops."""
    import functools
    import time

    from router import ingress

    monkeypatch.setattr(ingress, "follow_keys_file", functools.partial(follow_keys_file, every=0.01))
    rotated = "sk-rotated-" + "0123456789abcdef"
    assert router.keys_follower is None
    with TestClient(app) as client:
        follower = router.keys_follower
        assert follower is not None and not follower.done()
        keys_path.write_text(keys_yaml(f"{{name: plain, key: {rotated}}}"))
        statuses = []
        for _ in range(100):
            statuses = [chat(client, key=key).status_code for key in (rotated, KEY)]
            if statuses == [200, 401]:
                break
            time.sleep(0.02)
        assert statuses == [200, 401]
    assert router.keys_follower is None and follower.cancelled()


# --- minimum length -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("keys", "named"), [
    (f"{KEY}, sk-short", "key 2 of 2 (key-2)"),
    (json.dumps([{"name": "team", "key": KEY}, {"name": "ops", "key": "sk-short"}]), "[1 (ops).key]"),
])
def test_a_short_key_in_the_environment_is_a_config_error_naming_it(keys: str, named: str) -> None:
    with pytest.raises(ApiKeyConfigError) as caught:
        load_api_keys({"RAYROUTE_API_KEYS": keys})
    message = str(caught.value)
    assert "sk-short" not in message and KEY not in message
    assert named in message and f"shorter than {MIN_API_KEY_LENGTH} characters" in message


def test_a_short_key_in_a_keys_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(f"{{name: team, key: {KEY}}}", "{name: ops, key: sk-1234}"))
    with pytest.raises(ApiKeyConfigError, match=r"\[1 \(ops\)\.key\] shorter than 20 characters") as caught:
        load_api_keys({"RAYROUTE_API_KEYS_FILE": str(path)})
    assert "sk-1234" not in str(caught.value)


def test_a_router_does_not_start_with_a_short_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYROUTE_API_KEYS", "changeme")
    with pytest.raises(ApiKeyConfigError, match="key 1 of 1"):
        OpenAIRouter(CONFIG, {"chat-a": FakeHandle(ok)})


def test_keys_of_the_minimum_length_are_taken() -> None:
    (key,) = load_api_keys({"RAYROUTE_API_KEYS": "k" * MIN_API_KEY_LENGTH})
    assert key.key.get_secret_value() == "k" * MIN_API_KEY_LENGTH


# --- hashed keys ----------------------------------------------------------------------------------------------------

def test_a_hashed_key_matches_the_key_it_was_made_from(keys_path: Path) -> None:
    auth = ApiKeyAuth(load_api_keys({"RAYROUTE_API_KEYS_FILE": str(keys_path)}))
    assert auth.check(f"Bearer {HASHED}").name == "hashed"
    assert auth.check(f"Bearer {KEY}").name == "plain"
    assert isinstance(auth.check(f"Bearer {sha256(HASHED)}"), ErrorReply)  # the hash is not the key
    assert isinstance(auth.check(f"Bearer {WRONG}"), ErrorReply)


def test_a_hashed_key_works_over_http(app) -> None:
    client = from_address(app)
    assert chat(client, key=HASHED).status_code == 200
    assert chat(client, key=KEY).status_code == 200
    assert chat(client, key=WRONG).status_code == 401


@pytest.mark.parametrize(("entry", "error"), [
    (f"{{name: both, key: {KEY}, key_sha256: {sha256(KEY)}}}", "exactly one of `key` and `key_sha256`"),
    ("{name: neither}", "exactly one of `key` and `key_sha256`"),
    (f"{{name: upper, key_sha256: {sha256(KEY).upper()}}}", "[0 (upper).key_sha256] String should match pattern"),
    (f"{{name: short, key_sha256: {sha256(KEY)[:63]}}}", "[0 (short).key_sha256] String should match pattern"),
])
def test_a_key_entry_has_exactly_one_key_or_hash(entry: str, error: str) -> None:
    with pytest.raises(ApiKeyConfigError) as caught:
        parse_api_keys(keys_yaml(entry), "keys.yaml")
    assert error in str(caught.value)
    assert KEY not in str(caught.value) and sha256(KEY)[:40] not in str(caught.value).lower()


# --- no secret in any log line --------------------------------------------------------------------------------------

def test_no_key_nor_its_hash_is_ever_logged(router: OpenAIRouter, app, keys_path: Path,
                                            caplog: pytest.LogCaptureFixture, access_log_lines: list[str],
                                            capfd: pytest.CaptureFixture) -> None:
    """Requests with valid, wrong, hashed and missing keys, a throttled address, a keys-file reload that rotates a
    key, reloads that fail (a short key, a broken file) and a router that does not start: neither any key nor its
    SHA-256 is in anything logged, nor in an error a start-up failure would log."""
    rotated = "sk-rotated-" + "0123456789abcdef"
    short = "sk-tiny-1"
    secrets = [KEY, HASHED, WRONG, rotated, short]
    errors: list[str] = []
    with caplog.at_level(logging.DEBUG):
        client = from_address(app)
        for key in (KEY, HASHED, WRONG, None, f"{KEY}x", HASHED.upper()):
            chat(client, key=key) if key else client.get("/v1/models")
        for _ in range(AUTH_FAILURE_BURST + 2):
            chat(client, key=WRONG)
        files = [keys_yaml(f"{{name: plain, key: {rotated}}}", f"{{name: hashed, key_sha256: {sha256(HASHED)}}}"),
                 keys_yaml(f"{{name: plain, key: {short}}}"),  # each of these three is not taken, and says why
                 keys_yaml(f"{{name: plain, key: {KEY}"),
                 keys_yaml(f"{{name: plain, key: {rotated}, key_sha256: {sha256(rotated)}}}")]

        async def reload() -> None:
            follower = asyncio.create_task(follow_keys_file(router.auth, keys_path, every=0.01))
            await asyncio.sleep(0.05)
            for text in files:
                keys_path.write_text(text)
                await asyncio.sleep(0.05)
            follower.cancel()

        asyncio.run(reload())
        assert chat(client, key=rotated).status_code == 200 and chat(client, key=KEY).status_code == 429
        for environ in ({"RAYROUTE_API_KEYS": f"{KEY},{short}"},
                        {"RAYROUTE_API_KEYS": json.dumps([{"name": "a", "key": short}])},
                        {"RAYROUTE_API_KEYS": json.dumps([{"name": "a", "key": KEY, "key_sha256": sha256(KEY)}])}):
            try:
                load_api_keys(environ)
            except ApiKeyConfigError as exc:
                errors.append(str(exc))
    logged = [record.getMessage() for record in caplog.records] + access_log_lines + errors
    assert any("API keys reloaded" in line for line in logged)
    assert sum("not reloaded" in line for line in logged) == 3
    assert any("203.0.113.7: over 10 requests with a missing or wrong API key" in line for line in logged)
    assert len(errors) == 3
    captured = capfd.readouterr()
    text = "\n".join([*logged, captured.out, captured.err]).lower()
    for secret in secrets:
        assert secret.lower() not in text and sha256(secret) not in text, secret
