"""The HTTP edge without a cluster: the router's FastAPI app in front of fake engine handles.

The fake engine answers the way the real deployment does (error replies, finished bodies, SSE lines), so these
tests pin down everything the router itself decides: authentication, body checks and their error envelope,
routing by name, the body-size limit, and streaming pass-through.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deployments.replies import Admitted, Chunk, ErrorReply, FullReply, validation_error
from router.auth import load_api_keys
from router.ingress import OpenAIRouter, build_http_app
from tests.harness import FakeChannels, FakeHandle, router_client
from tests.harness import chat as chat_with_key

MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-unit-" + "0123456789abcdef"
OTHER_KEY = "sk-other-" + "0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = {
    "models": [
        {"id": "chat-a", "aliases": ["gpt-4o-mini"]},
        {"id": "org/chat-b:v1", "multimodal": True, "allowed_media_domains": ["images.example.com"]},
    ],
    "max_request_bytes": 4096,
}


def echo_answer(model_id: str) -> Callable[[str, dict], list[Any]]:
    def answer(endpoint: str, body: dict) -> list[Any]:
        if body.get("stream"):
            chunk = {"object": "chat.completion.chunk", "model": body["model"], "served_by": model_id}
            return [Admitted(), Chunk(f"data: {json.dumps(chunk)}\n\n", 7, 1),
                    Chunk(f"data: {json.dumps(chunk)}\n\n", 7, 2), Chunk("data: [DONE]\n\n", 7, 2)]
        return [Admitted(),
                FullReply(json.dumps({"endpoint": endpoint, "model": body["model"], "served_by": model_id}), 5, 3)]

    return answer


@pytest.fixture
def engines() -> dict[str, FakeHandle]:
    return {mid: FakeHandle(echo_answer(mid)) for mid in ("chat-a", "org/chat-b:v1")}


@pytest.fixture
def client(engines: dict[str, FakeHandle], monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("RAYROUTE_API_KEYS", f"{OTHER_KEY},{KEY}")
    return TestClient(build_http_app(OpenAIRouter(CONFIG, engines, channels=FakeChannels())),
                      raise_server_exceptions=False)


def post(client: TestClient, path: str, body: Any, **kwargs: Any):
    return client.post(path, json=body, headers=AUTH, **kwargs)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- routing -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "served_by"), [("chat-a", "chat-a"), ("gpt-4o-mini", "chat-a"),
                                                 ("org/chat-b:v1", "org/chat-b:v1")])
def test_routes_by_model_name_and_alias(client: TestClient, name: str, served_by: str) -> None:
    response = post(client, "/v1/chat/completions", {"model": name, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.json() == {"endpoint": "chat", "model": name, "served_by": served_by}


@pytest.mark.parametrize(("path", "body", "endpoint"), [
    ("/v1/completions", {"model": "chat-a", "prompt": "Once"}, "completions"),
    ("/v1/embeddings", {"model": "chat-a", "input": ["a", "b"]}, "embeddings"),
    ("/v1/responses", {"model": "chat-a", "input": "hi", "store": True, "tools": []}, "responses"),
])
def test_other_endpoints_reach_their_engine_method(client: TestClient, engines, path, body, endpoint) -> None:
    assert post(client, path, body).json()["endpoint"] == endpoint
    assert engines["chat-a"].calls == [(endpoint, body)]


def test_body_is_forwarded_as_sent(client: TestClient, engines) -> None:
    body = {"model": "chat-a", "messages": MESSAGES, "temperature": 0, "top_k": 5, "stop": ["x"]}
    post(client, "/v1/chat/completions", body)
    assert engines["chat-a"].calls == [("chat", body)]


def test_unknown_model_is_404(client: TestClient) -> None:
    response = post(client, "/v1/chat/completions", {"model": "gemma3:27b", "messages": MESSAGES})
    assert response.status_code == 404
    assert error_of(response) == {"message": "The model `gemma3:27b` does not exist or you do not have access to it.",
                                  "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_models_list_and_cards(client: TestClient) -> None:
    listed = client.get("/v1/models", headers=AUTH).json()
    assert [m["id"] for m in listed["data"]] == ["chat-a", "gpt-4o-mini", "org/chat-b:v1"]
    card = client.get("/v1/models/org/chat-b:v1", headers=AUTH).json()
    assert card["id"] == "org/chat-b:v1" and card["object"] == "model"
    assert client.get("/v1/models/gpt-4o-mini", headers=AUTH).json()["root"] == "chat-a"
    missing = client.get("/v1/models/Qwen/Qwen2.5-7B-Instruct", headers=AUTH)
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"


# --- streaming and engine replies --------------------------------------------------------------------------------

def test_stream_passes_through_unchanged(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions", headers=AUTH,
                       json={"model": "chat-a", "messages": MESSAGES, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 3


def test_engine_error_reply_becomes_the_envelope(engines, monkeypatch: pytest.MonkeyPatch) -> None:
    engines["chat-a"].answer = lambda *_: [ErrorReply.invalid_request("too long", param="messages",
                                                                      code="context_length_exceeded")]
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    client = TestClient(build_http_app(OpenAIRouter(CONFIG, engines)))
    response = client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES})
    assert response.status_code == 400
    assert error_of(response) == {"message": "too long", "type": "invalid_request_error", "param": "messages",
                                  "code": "context_length_exceeded"}


def test_media_parts_rejected_for_text_models_only(client: TestClient, engines) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    response = post(client, "/v1/chat/completions", {"model": "chat-a", "messages": image})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "messages[0].content[1]" and error["code"] == "model_not_multimodal"
    assert "does not accept images" in error["message"]
    assert engines["chat-a"].calls == []
    assert post(client, "/v1/chat/completions", {"model": "org/chat-b:v1", "messages": image}).status_code == 200


# --- body checks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "chat-a", "messages": []}, "messages", "invalid_value"),
    ({"messages": MESSAGES}, "model", "missing_required_parameter"),
    ({"model": "chat-a"}, "messages", "missing_required_parameter"),
    ({"model": 42, "messages": MESSAGES}, "model", "invalid_type"),
    ({"model": "chat-a", "messages": MESSAGES, "temperature": 2.01}, "temperature", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "temperature": -1}, "temperature", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "temperature": "0.5"}, "temperature", "invalid_type"),
    ({"model": "chat-a", "messages": MESSAGES, "top_p": 1.5}, "top_p", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "n": 0}, "n", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "stop": ["1", "2", "3", "4", "5"]}, "stop", "invalid_value"),
    ({"model": "chat-a", "messages": MESSAGES, "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "chat-a", "messages": "hello"}, "messages", "invalid_type"),
    ({"model": "chat-a", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"model": "chat-a", "messages": [{"role": "user", "content": 7}]}, "messages[0].content", "invalid_type"),
    ({"model": "chat-a", "messages": [MESSAGES[0], {"content": "x"}]}, "messages[1].role",
     "missing_required_parameter"),
])
def test_chat_body_errors_name_the_parameter(client: TestClient, engines, body: dict, param: str, code: str) -> None:
    response = post(client, "/v1/chat/completions", body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"].startswith(f"{param}: ")
    assert all(not calls for calls in (e.calls for e in engines.values()))


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": "chat-a"}, "prompt"),
    ("/v1/completions", {"model": "chat-a", "prompt": "x", "logprobs": 9}, "logprobs"),
    ("/v1/embeddings", {"model": "chat-a", "input": 3.5}, "input"),
    ("/v1/embeddings", {"model": "chat-a", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/responses", {"model": "chat-a"}, "input"),
    ("/v1/responses", {"model": "chat-a", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("/v1/responses", {"model": "chat-a", "input": "x", "temperature": 3}, "temperature"),
])
def test_other_body_errors(client: TestClient, path: str, body: dict, param: str) -> None:
    response = post(client, path, body)
    assert response.status_code == 400 and error_of(response)["param"] == param


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"background": True}, "background"),
])
def test_responses_that_need_a_stored_response_are_400(client: TestClient, engines, extra: dict, param: str) -> None:
    """Nothing is stored (a response lives on the replica that made it): a clear 400 before any engine is asked,
    never vLLM's 404 for an id it has not seen or a 500."""
    response = post(client, "/v1/responses", {"model": "chat-a", "input": "hi", **extra})
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert "does not store responses" in error["message"]
    assert not engines["chat-a"].calls


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/responses/resp_123"), ("DELETE", "/v1/responses/resp_123"),
    ("POST", "/v1/responses/resp_123/cancel"), ("GET", "/v1/responses/resp_123/input_items"),
])
def test_stored_response_routes_are_400(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, headers=AUTH)
    assert response.status_code == 400 and error_of(response)["code"] == "unsupported_endpoint"
    assert client.request(method, path).status_code == 401  # behind the key like every /v1 route


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"null", b'"text"', b"{} {}"])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/chat/completions", content=raw,
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


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


# --- authentication ----------------------------------------------------------------------------------------------

def test_api_keys_from_env() -> None:
    a, b, c = ("sk-" + letter * 20 for letter in "abc")
    keys = load_api_keys({"RAYROUTE_API_KEYS": f" {a}, {b} ,,{c} "})
    assert [(k.name, k.key.get_secret_value(), k.models, k.limited) for k in keys] == [
        ("key-1", a, None, False), ("key-2", b, None, False), ("key-3", c, None, False)]
    assert load_api_keys({}) == ()


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


def test_no_keys_means_open(engines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYROUTE_API_KEYS", raising=False)
    assert TestClient(build_http_app(OpenAIRouter(CONFIG, engines))).get("/v1/models").status_code == 200


def test_probes_need_no_key(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


# --- framework errors --------------------------------------------------------------------------------------------

def test_framework_errors_use_the_envelope(client: TestClient) -> None:
    missing = client.get("/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and error_of(missing)["code"] == "unknown_url"
    wrong_method = client.get("/v1/chat/completions", headers=AUTH)
    assert wrong_method.status_code == 405 and error_of(wrong_method)


def test_router_gauges_cover_every_configured_name_from_the_start() -> None:
    """Both gauges are published for every name from the first second, however the names are given (the router
    passes a generator: read once, it left the second gauge with no series until a request came)."""
    import asyncio

    from router.telemetry import GatewayMetrics

    metrics = GatewayMetrics((name, "chat-a") for name in ("chat-a", "gpt-4o-mini"))
    published: dict[str, set[str]] = {"in_flight": set(), "waiting": set()}
    for kind, names in published.items():
        setattr(metrics, kind, type("Recorder", (), {"set": lambda self, value, tags, names=names: names.add(
            tags["model"])})())

    async def one_round() -> None:
        metrics.publish_gauges()
        await asyncio.sleep(0.05)

    asyncio.run(one_round())
    assert published == {"in_flight": {"chat-a", "gpt-4o-mini"}, "waiting": {"chat-a", "gpt-4o-mini"}}


def test_openapi_document_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models"} <= set(paths)
    assert not any(path.startswith("/v1/responses/") for path in paths)  # refused routes are not offered
    assert "requestBody" in paths["/v1/chat/completions"]["post"]


def test_nested_part_errors_are_named_after_their_parameter() -> None:
    """vLLM validates content parts while rendering; their error locations start inside `messages`."""
    from pydantic import BaseModel, TypeAdapter, ValidationError

    class TextPart(BaseModel):
        type: str
        text: str

    with pytest.raises(ValidationError) as caught:
        TypeAdapter(list[TextPart | int]).validate_python([{"type": "nonsense"}])
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "nonsense"}]}]}
    reply = validation_error(caught.value.errors(), body, root="messages")
    assert reply.param == "messages"
    assert reply.message == "messages: 0.text: Field required"


# --- request ids and the access log ------------------------------------------------------------------------------


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


# --- LoRA adapters -------------------------------------------------------------------------------------------------

def test_an_adapter_is_a_model_answered_by_its_bases_replicas(monkeypatch, access_log_lines) -> None:
    """An adapter is sent to its base's deployment with Serve's ``multiplexed_model_id`` (so Serve picks a replica
    holding it), under its own name, and is listed with its base as ``parent``, as vLLM lists adapters."""
    base = FakeHandle(echo_answer("chat-a"))
    client = router_client(base, monkeypatch, adapters={"chat-a-pirate": "org/pirate-lora"})
    response = chat_with_key(client, model="chat-a-pirate")
    assert response.status_code == 200 and response.json()["model"] == "chat-a-pirate"
    assert chat_with_key(client).status_code == 200
    assert [body["model"] for _, body in base.calls] == ["chat-a-pirate", "chat-a"]
    assert [options.get("multiplexed_model_id") for options in base.call_options] == ["chat-a-pirate", None]
    line = json.loads(access_log_lines[0])
    assert (line["model"], line["served_model"]) == ("chat-a-pirate", "chat-a-pirate")  # counted under its name
    admin = {"Authorization": "Bearer sk-admin-000-0123456789"}
    cards = {card["id"]: card for card in client.get("/v1/models", headers=admin).json()["data"]}
    assert cards["chat-a-pirate"]["parent"] == "chat-a" and "parent" not in cards["chat-a"]
    assert client.get("/v1/models/chat-a-pirate", headers=admin).json()["parent"] == "chat-a"
    unknown = chat_with_key(client, model="chat-a-parrot")
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"


def test_a_key_that_may_use_a_base_model_may_not_use_its_adapters(monkeypatch) -> None:
    """Key ``free`` lists ``gpt-4o-mini``, chat-a's alias; an alias is the same model, an adapter is another."""
    base = FakeHandle(echo_answer("chat-a"))
    client = router_client(base, monkeypatch, adapters={"chat-a-pirate": "org/pirate-lora"})
    assert chat_with_key(client, key="sk-free-0000-0123456789", model="gpt-4o-mini").status_code == 200
    refused = chat_with_key(client, key="sk-free-0000-0123456789", model="chat-a-pirate")
    assert refused.status_code == 403 and error_of(refused)["code"] == "model_not_allowed"
    assert len(base.calls) == 1
