"""OpenAI's error envelope as the only error shape (router/errors.py): an engine's error reply, a body that is not
JSON, an unknown route or a wrong method."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.replies import ErrorReply
from router.ingress import OpenAIRouter, build_http_app
from tests.unit.fakes import EDGE_AUTH as AUTH
from tests.unit.fakes import EDGE_CONFIG as CONFIG
from tests.unit.fakes import MESSAGES, error_of


def test_engine_error_reply_becomes_the_envelope(engines, monkeypatch: pytest.MonkeyPatch) -> None:
    engines["chat-a"].answer = lambda *_: [ErrorReply.invalid_request("too long", param="messages",
                                                                      code="context_length_exceeded")]
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    client = TestClient(build_http_app(OpenAIRouter(CONFIG, engines)))
    response = client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES})
    assert response.status_code == 400
    assert error_of(response) == {"message": "too long", "type": "invalid_request_error", "param": "messages",
                                  "code": "context_length_exceeded"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"null", b'"text"', b"{} {}"])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/chat/completions", content=raw,
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


def test_framework_errors_use_the_envelope(client: TestClient) -> None:
    missing = client.get("/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and error_of(missing)["code"] == "unknown_url"
    wrong_method = client.get("/v1/chat/completions", headers=AUTH)
    assert wrong_method.status_code == 405 and error_of(wrong_method)
