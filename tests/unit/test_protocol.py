"""What the router checks in a request body before an engine is asked (router/protocol.py): each OpenAI constraint
refused with the parameter named, media parts refused for text-only models, the Responses API's stored-response
parts refused, every other field passed on as sent; and a prompt's token estimate.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.constants import MEDIA_PART_TOKENS
from router.protocol import ChatCompletionBody, prompt_tokens_estimate
from tests.unit.fakes import EDGE_AUTH as AUTH
from tests.unit.fakes import MESSAGES, error_of, post


def test_body_is_forwarded_as_sent(client: TestClient, engines) -> None:
    body = {"model": "chat-a", "messages": MESSAGES, "temperature": 0, "top_k": 5, "stop": ["x"]}
    post(client, "/v1/chat/completions", body)
    assert engines["chat-a"].calls == [("chat", body)]


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


# --- the Responses API stores nothing -------------------------------------------------------------------------------

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


# --- what a request may cost ----------------------------------------------------------------------------------------

def test_a_media_part_reserves_a_fixed_estimate_not_its_base64_size() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    body = ChatCompletionBody.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]})
    # The text part: its keys and values, "type", "text", "text", "what is it?": 23 bytes, 6 tokens.
    assert prompt_tokens_estimate(body) == MEDIA_PART_TOKENS + 6
