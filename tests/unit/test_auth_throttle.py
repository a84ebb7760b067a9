"""Failed keys throttled per client address (router/auth_throttle.py): a bucket of failures per address, a bounded
table of addresses, only failures answered 429 (a correct key from the same address passes), and the client's
address read behind HAProxy and an ingress."""

from __future__ import annotations

import pytest

from deployments.constants import AUTH_FAILURE_BURST, AUTH_FAILURE_REFILL_S
from router.auth_throttle import THROTTLED_CODE, ClientAddresses, FailedAuthThrottle
from router.ingress import OpenAIRouter, build_http_app
from tests.unit.fakes import KEYED_CONFIG as CONFIG
from tests.unit.fakes import KEYED_HASHED as HASHED
from tests.unit.fakes import KEYED_KEY as KEY
from tests.unit.fakes import KEYED_WRONG as WRONG
from tests.unit.fakes import FakeHandle, chat, from_address
from tests.unit.fakes import answer_with_model as ok


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


# --- the client's address -------------------------------------------------------------------------------------------

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
