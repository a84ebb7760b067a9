"""The router's FastAPI app (router/ingress.py): request caps checked on the parsed JSON for each endpoint before the
body model is built, a key kept to its models, and the OpenAPI document of what is served.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.unit.fakes import (
    HI,
    MESSAGES,
    FakeHandle,
    LocalLimits,
    chat,
    client_of,
    error_of,
    make_router,
    ok,
    router_client,
)
from tests.unit.fakes import post_as as post


def test_openapi_document_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models"} <= set(paths)
    assert not any(path.startswith("/v1/responses/") for path in paths)  # refused routes are not offered
    assert "requestBody" in paths["/v1/chat/completions"]["post"]


def test_key_limited_to_some_models_gets_403_for_others(monkeypatch) -> None:
    client = router_client(FakeHandle.scripted(ok()), monkeypatch)
    response = chat(client, key="sk-free-0000-0123456789")
    assert response.status_code == 403
    assert response.json()["error"] == {"message": "This API key may not use the model `chat-a`.",
                                        "type": "permission_error", "param": "model", "code": "model_not_allowed"}
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES},
                           headers={"Authorization": "Bearer sk-free-0000-0123456789"})
    assert response.status_code == 200


# --- request caps ---------------------------------------------------------------------------------------------------

SMALL_CAPS = {"request_limits": {"max_n": 2, "max_messages": 3, "max_content_parts": 2, "max_prompt_items": 3}}
TEXT = {"type": "text", "text": "x"}


@pytest.mark.parametrize(("path", "body", "param", "code", "message"), [
    ("/v1/chat/completions", {"messages": HI * 4}, "messages", "array_above_max_length",
     "Invalid 'messages': array too long. Expected an array with maximum length 3, but got an array with length 4 "
     "instead."),
    ("/v1/chat/completions", {"messages": [*HI, {"role": "user", "content": [TEXT] * 3}]}, "messages[1].content",
     "array_above_max_length", "Invalid 'messages[1].content': array too long. Expected an array with maximum "
     "length 2, but got an array with length 3 instead."),
    ("/v1/chat/completions", {"n": 3}, "n", "integer_above_max_value",
     "Invalid 'n': integer above maximum value. Expected a value <= 2, but got 3 instead."),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt", "array_above_max_length", None),
    ("/v1/completions", {"prompt": [[1], [2], [3], [4]]}, "prompt", "array_above_max_length", None),
    ("/v1/completions", {"prompt": "a", "n": 5}, "n", "integer_above_max_value", None),
    ("/v1/embeddings", {"input": ["a", "b", "c", "d"]}, "input", "array_above_max_length", None),
    ("/v1/responses", {"input": [{"role": "user", "content": "hi"}] * 4}, "input", "array_above_max_length", None),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 3}]},
     "input[0].content", "array_above_max_length", None),
])
def test_each_request_cap_is_a_400_naming_the_parameter(monkeypatch, path: str, body: dict, param: str, code: str,
                                                       message: str | None) -> None:
    engine = FakeHandle.scripted(ok())
    client = client_of(make_router(monkeypatch, engine, LocalLimits(), config=SMALL_CAPS))
    response = post(client, "plain", path, **body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    if message is not None:
        assert error["message"] == message
    assert not engine.calls


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": HI * 3, "n": 2}),
    ("/v1/completions", {"prompt": list(range(5000))}),  # token ids: one prompt, however long
    ("/v1/embeddings", {"input": [1, 2, 3, 4, 5]}),
    ("/v1/responses", {"input": "a long text " * 100}),
])
def test_requests_within_the_caps_pass(monkeypatch, path: str, body: dict) -> None:
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), LocalLimits(), config=SMALL_CAPS))
    assert post(client, "plain", path, **body).status_code == 200


def test_caps_are_checked_before_the_body_is_validated(monkeypatch) -> None:
    """Counting comes before building objects: a list over the cap is refused for its length even when each of
    its items is invalid, so the router never spends time validating 200,000 messages to refuse them."""
    client = client_of(make_router(monkeypatch, FakeHandle.scripted(ok()), LocalLimits()))
    wizards = [{"role": "wizard"}] * 200_000  # 3.8 MiB: within the body limit
    response = post(client, "plain", messages=wizards)
    assert response.status_code == 400
    assert (error_of(response)["param"], error_of(response)["code"]) == ("messages", "array_above_max_length")
    assert "maximum length 2048, but got an array with length 200000" in error_of(response)["message"]
    assert error_of(post(client, "plain", messages=wizards[:3]))["param"] == "messages[0].role"
