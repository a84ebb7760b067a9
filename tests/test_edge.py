"""The HTTP edge without a cluster: body checks, the error envelope, and API-key auth."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from router.auth import ApiKeyAuth, load_api_keys
from router.errors import OpenAIError, install_error_handlers
from router.protocol import check_chat_body, parse_json_object

MESSAGES = [{"role": "user", "content": "hi"}]


def reply_of(body: dict):
    with pytest.raises(OpenAIError) as caught:
        check_chat_body(body)
    return caught.value.reply


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "m", "messages": []}, "messages", "invalid_value"),
    ({"messages": MESSAGES}, "model", "missing_required_parameter"),
    ({"model": "m", "messages": MESSAGES, "temperature": 2.01}, "temperature", "invalid_value"),
    ({"model": "m", "messages": MESSAGES, "temperature": "0.5"}, "temperature", "invalid_type"),
    ({"model": "m", "messages": MESSAGES, "top_p": 1.5}, "top_p", "invalid_value"),
    ({"model": "m", "messages": MESSAGES, "n": 0}, "n", "invalid_value"),
    ({"model": "m", "messages": MESSAGES, "stop": ["1", "2", "3", "4", "5"]}, "stop", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
    ({"model": "m", "messages": [MESSAGES[0], {"content": "x"}]}, "messages[1].role", "missing_required_parameter"),
    ({"model": "m", "messages": MESSAGES, "stream": 1}, "stream", "invalid_type"),
])
def test_body_errors_name_the_parameter(body: dict, param: str, code: str) -> None:
    reply = reply_of(body)
    assert (reply.status, reply.type, reply.param, reply.code) == (400, "invalid_request_error", param, code)
    assert reply.message.startswith(f"{param}: ")


def test_valid_body_keeps_vendor_fields() -> None:
    checked = check_chat_body({"model": "m", "messages": MESSAGES, "temperature": 0, "top_k": 5, "stop": "x"})
    assert checked.model == "m" and checked.model_extra == {"top_k": 5}


@pytest.mark.parametrize("raw", [b"{", b"[]", b"1", b"\xff", b""])
def test_json_object_required(raw: bytes) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_json_object(raw)
    assert caught.value.reply.code == "invalid_json" and caught.value.reply.status == 400


def test_api_keys_from_env() -> None:
    assert load_api_keys({"RAYROUTE_API_KEYS": " a, b ,,c "}) == (b"a", b"b", b"c")
    assert load_api_keys({}) == ()


def make_app(keys: tuple[bytes, ...]) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    auth = ApiKeyAuth(keys)

    @app.get("/v1/thing")
    async def thing(request: Request) -> dict:
        auth(request)
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals")

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic a2V5", "Bearer ", "key1"])
def test_bad_credentials_are_401(header: str | None) -> None:
    client = make_app((b"key1", b"key2"))
    response = client.get("/v1/thing", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert "key1" not in response.text


@pytest.mark.parametrize("key", ["key1", "key2"])
def test_any_configured_key_passes(key: str) -> None:
    assert make_app((b"key1", b"key2")).get("/v1/thing", headers={"Authorization": f"Bearer {key}"}).json() == {
        "ok": True}


def test_no_keys_means_open() -> None:
    assert make_app(()).get("/v1/thing").status_code == 200


def test_framework_errors_use_the_envelope() -> None:
    client = make_app(())
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "Not Found", "type": "not_found_error", "param": None,
                                        "code": "unknown_url"}}
    assert client.post("/v1/thing").status_code == 405
    boom = client.get("/boom")
    assert boom.status_code == 500
    assert boom.json()["error"]["type"] == "server_error" and "secret" not in boom.text


def test_nested_part_errors_are_named_after_their_parameter() -> None:
    """vLLM validates content parts while rendering; their error locations start inside `messages`."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    from deployments.engine import validation_error

    class TextPart(BaseModel):
        type: str
        text: str

    with pytest.raises(ValidationError) as caught:
        TypeAdapter(list[TextPart | int]).validate_python([{"type": "nonsense"}])
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "nonsense"}]}]}
    reply = validation_error(caught.value, body, root="messages")
    assert reply.param == "messages"
    assert reply.message == "messages: 0.text: Field required"
