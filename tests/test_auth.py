"""API keys without a cluster: their minimum length, hashed keys, the failed-key throttle per client address, and
that no log line ever holds a key or its hash."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deployments.constants import AUTH_FAILURE_BURST, AUTH_FAILURE_REFILL_S, MIN_API_KEY_LENGTH
from deployments.replies import ErrorReply
from router.auth import ApiKeyAuth, ApiKeyConfigError, follow_keys_file, load_api_keys, parse_api_keys
from router.auth_throttle import THROTTLED_CODE, ClientAddresses, FailedAuthThrottle
from router.ingress import OpenAIRouter, build_http_app
from tests.harness import FakeHandle, chat

KEY = "sk-auth-" + "0123456789abcdef"
HASHED = "sk-hashed-" + "fedcba9876543210"
WRONG = "sk-wrong-" + "0123456789abcdef"
CONFIG = {"models": [{"id": "chat-a", "aliases": ["gpt-4o-mini"]}]}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ok(endpoint: str, body: dict) -> list:
    from deployments.replies import Admitted, FullReply

    return [Admitted(), FullReply(json.dumps({"model": body["model"]}), 1, 1)]


def keys_yaml(*entries: str) -> str:
    return "".join(f"- {entry}\n" for entry in entries)


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(f"{{name: plain, key: {KEY}}}", f"{{name: hashed, key_sha256: {sha256(HASHED)}}}"))
    return path


@pytest.fixture
def router(keys_path: Path, monkeypatch: pytest.MonkeyPatch) -> OpenAIRouter:
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    monkeypatch.setenv("RAYROUTE_API_KEYS_FILE", str(keys_path))
    return OpenAIRouter(CONFIG, {"chat-a": FakeHandle(ok)})


@pytest.fixture
def app(router: OpenAIRouter):
    return build_http_app(router)


def from_address(app, host: str = "203.0.113.7") -> TestClient:
    return TestClient(app, raise_server_exceptions=False, client=(host, 40000))


# --- minimum length ------------------------------------------------------------------------------------------------

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


def test_keys_of_the_minimum_length_are_taken() -> None:
    (key,) = load_api_keys({"RAYROUTE_API_KEYS": "k" * MIN_API_KEY_LENGTH})
    assert key.key.get_secret_value() == "k" * MIN_API_KEY_LENGTH


# --- hashed keys ---------------------------------------------------------------------------------------------------

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


# --- throttling failed keys ----------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_is_a_bucket_of_failures_per_address() -> None:
    clock = Clock()
    throttle = FailedAuthThrottle(burst=10, refill_s=6.0, clock=clock)
    assert [throttle.failed("a") for _ in range(10)] == [None] * 10
    assert throttle.failed("a") == pytest.approx(6.0)
    assert throttle.failed("b") is None  # another address has its own
    clock.now += 3
    assert throttle.failed("a") == pytest.approx(3.0)  # a refused one takes nothing: the wait is the true one
    clock.now += 3
    assert throttle.failed("a") is None  # one refilled
    assert throttle.failed("a") == pytest.approx(6.0)
    clock.now += 60
    assert [throttle.failed("a") for _ in range(10)] == [None] * 10  # full again, not more than full
    assert throttle.failed("a") is not None


def test_the_throttle_remembers_a_bounded_number_of_addresses() -> None:
    throttle = FailedAuthThrottle(burst=2, refill_s=60.0, max_addresses=100, clock=Clock())
    throttle.failed("first")
    throttle.failed("first")
    assert throttle.failed("first") is not None
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100
    assert throttle.failed("first") is None  # dropped as least recently failed: a full bucket again


def test_failed_keys_from_one_address_get_429_while_a_correct_key_still_works(app) -> None:
    client, neighbour = from_address(app), from_address(app, "198.51.100.9")
    for _ in range(AUTH_FAILURE_BURST):
        refused = chat(client, key=WRONG)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    for headers in ({"Authorization": f"Bearer {WRONG}"}, {}):  # a wrong key, or none
        throttled = client.get("/v1/models", headers=headers)
        assert throttled.status_code == 429
        assert throttled.json()["error"] == {
            "message": "Too many requests with a missing or wrong API key from this address. Retry in 6s.",
            "type": "rate_limit_error", "param": None, "code": THROTTLED_CODE}
        assert throttled.headers["retry-after"] == str(int(AUTH_FAILURE_REFILL_S))
        assert "www-authenticate" not in throttled.headers
    assert chat(client, key=KEY).status_code == 200  # only failures are throttled: a NAT's other clients pass
    assert chat(client, key=HASHED).status_code == 200
    assert chat(client, key=WRONG).status_code == 429  # and a success forgives nothing
    assert chat(neighbour, key=WRONG).status_code == 401


def test_behind_haproxy_the_address_it_appended_is_the_client(app) -> None:
    """HAProxy connects from the loopback and appends the client's address to X-Forwarded-For, after whatever the
    client wrote there itself; a client that writes a new address each time is still one client."""
    haproxy = from_address(app, "127.0.0.1")
    for i in range(AUTH_FAILURE_BURST):
        forged = {"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.50", "Authorization": f"Bearer {WRONG}"}
        assert haproxy.get("/v1/models", headers=forged).status_code == 401
    forged = {"X-Forwarded-For": "192.0.2.99", "Authorization": f"Bearer {WRONG}"}
    assert haproxy.get("/v1/models", headers=[*forged.items(), ("X-Forwarded-For", "203.0.113.50")]).status_code == 429
    other = {"X-Forwarded-For": "203.0.113.51", "Authorization": f"Bearer {WRONG}"}
    assert haproxy.get("/v1/models", headers=other).status_code == 401  # another client behind the same HAProxy


def test_behind_an_ingress_the_routers_config_counts_it(keys_path, monkeypatch) -> None:
    """``routers.trusted_proxy_hops: 1``: an ingress appends the client's address, HAProxy the ingress's; clients
    behind the one ingress are told apart by the entry before HAProxy's."""
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    monkeypatch.setenv("RAYROUTE_API_KEYS_FILE", str(keys_path))
    router = OpenAIRouter({**CONFIG, "routers": {"trusted_proxy_hops": 1}}, {"chat-a": FakeHandle(ok)})
    haproxy = from_address(build_http_app(router), "127.0.0.1")

    def wrong_from(client: str) -> int:
        headers = {"X-Forwarded-For": f"{client}, 10.1.2.3", "Authorization": f"Bearer {WRONG}"}
        return haproxy.get("/v1/models", headers=headers).status_code

    assert [wrong_from("203.0.113.60") for _ in range(AUTH_FAILURE_BURST + 1)][-2:] == [401, 429]
    assert wrong_from("203.0.113.61") == 401  # another client through the same ingress pod (10.1.2.3)


@pytest.mark.parametrize(("peer", "forwarded", "hops", "client"), [
    ("127.0.0.1", ["203.0.113.5"], 0, "203.0.113.5"),
    ("127.0.0.1", ["1.2.3.4, 203.0.113.5"], 0, "203.0.113.5"),        # what the client wrote comes first
    ("127.0.0.1", ["1.2.3.4", "203.0.113.5"], 0, "203.0.113.5"),      # HAProxy's own header line, last
    ("10.1.2.3", ["1.2.3.4, 203.0.113.5, 10.9.9.9"], 1, "203.0.113.5"),  # an ingress in front of HAProxy
    ("10.1.2.3", ["203.0.113.5"], 1, "203.0.113.5"),                  # one that skipped the ingress
    ("127.0.0.1", [], 0, "127.0.0.1"),                                # no proxy: the peer
    ("127.0.0.1", ["not-an-address"], 0, "127.0.0.1"),
    ("203.0.113.7", ["1.2.3.4"], 0, "203.0.113.7"),                   # an untrusted peer's header is ignored
    ("::ffff:127.0.0.1", ["::ffff:203.0.113.5"], 0, "203.0.113.5"),
    ("::1", ["2001:db8:1:2:aaaa::1"], 0, "2001:db8:1:2::/64"),      # an IPv6 client is its /64
    ("2001:db8:1:2::7", [], 0, "2001:db8:1:2::/64"),
    ("testclient", ["1.2.3.4"], 0, "testclient"),
    (None, [], 0, "unknown"),
])
def test_client_address(peer: str | None, forwarded: list[str], hops: int, client: str) -> None:
    assert ClientAddresses(hops=hops)(peer, forwarded) == client


# --- no secret in any log line -------------------------------------------------------------------------------------

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
