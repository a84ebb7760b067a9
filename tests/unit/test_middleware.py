"""The middleware around every request (router/middleware.py): a request id on every answer and one access-log line
per request, a valid key before anything else on every ``/v1`` route (probes need none), and the body-size limit,
declared or chunked.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from router.ingress import OpenAIRouter, build_http_app
from tests.unit.fakes import EDGE_AUTH as AUTH
from tests.unit.fakes import EDGE_CONFIG as CONFIG
from tests.unit.fakes import EDGE_KEY as KEY
from tests.unit.fakes import EDGE_OTHER_KEY as OTHER_KEY
from tests.unit.fakes import MESSAGES, error_of, post

# --- request ids and the access log ---------------------------------------------------------------------------------

def test_request_id_is_kept_or_made(client: TestClient) -> None:
    body = {"model": "chat-a", "messages": MESSAGES}
    kept = client.post("/v1/chat/completions", json=body, headers={**AUTH, "X-Request-Id": "trace-42"})
    assert kept.headers["x-request-id"] == "trace-42"
    made = client.post("/v1/chat/completions", json=body, headers=AUTH)
    other = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert made.headers["x-request-id"].startswith("req-") and made.headers["x-request-id"] != other.headers[
        "x-request-id"]
    hostile = client.post("/v1/chat/completions", json=body, headers={**AUTH, "X-Request-Id": "a b;c" * 50})
    assert hostile.headers["x-request-id"].startswith("req-")
    assert client.get("/v1/models").headers["x-request-id"]  # a 401 carries one too


def test_access_log_line_per_request(client: TestClient, access_log_lines: list[str]) -> None:
    secret = "my secret prompt"
    post(client, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": secret}]})
    with client.stream("POST", "/v1/chat/completions", headers={**AUTH, "X-Request-Id": "s-1"},
                       json={"model": "chat-a", "messages": MESSAGES, "stream": True}) as response:
        list(response.iter_lines())
    client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}-wrong"})
    full, streamed, denied = (json.loads(line) for line in access_log_lines)
    assert (full["model"], full["served_model"], full["status"]) == ("gpt-4o-mini", "chat-a", 200)
    assert (full["prompt_tokens"], full["completion_tokens"]) == (5, 3)
    assert (streamed["request_id"], streamed["prompt_tokens"], streamed["completion_tokens"]) == ("s-1", 7, 2)
    assert streamed["ttft_ms"] is not None and streamed["duration_ms"] >= streamed["ttft_ms"]
    assert denied["status"] == 401 and denied["model"] == ""
    logged = "".join(access_log_lines)
    assert secret not in logged and KEY not in logged


# --- authentication -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic a2V5", "Bearer ", KEY, f"Bearer {KEY}x"])
def test_bad_credentials_are_401(client: TestClient, header: str | None) -> None:
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/chat-a"),
                         ("POST", "/v1/embeddings")]:
        response = client.request(method, path, headers={"Authorization": header} if header else {},
                                  content=b"{not even json")  # auth comes before the body is looked at
        assert response.status_code == 401, (method, path)
        assert error_of(response)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert KEY not in response.text


@pytest.mark.parametrize("key", [OTHER_KEY, KEY])
def test_any_configured_key_passes(client: TestClient, key: str) -> None:
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_no_keys_means_open(engines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    assert TestClient(build_http_app(OpenAIRouter(CONFIG, engines))).get("/v1/models").status_code == 200


def test_probes_need_no_key(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


# --- the body-size limit --------------------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(client: TestClient, engines) -> None:
    big = {"model": "chat-a", "messages": [{"role": "user", "content": "x" * 5000}]}
    response = post(client, "/v1/chat/completions", big)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds on what arrives
        yield json.dumps(big).encode()

    response = client.post("/v1/chat/completions", content=chunked(),
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert engines["chat-a"].calls == []
