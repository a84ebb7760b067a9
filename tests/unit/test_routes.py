"""The routing table (router/routes.py): a request goes by the name it was sent under (an id, an alias, an adapter's
name), an unknown name is a 404, ``/v1/models`` lists exactly what is routed, and an adapter is a model of its own,
answered by its base's replicas.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.constants import MAX_SESSION_CHARS
from tests.unit.fakes import EDGE_AUTH as AUTH
from tests.unit.fakes import MESSAGES, FakeHandle, echo_answer, error_of, post, router_client
from tests.unit.fakes import chat as chat_with_key


@pytest.mark.parametrize(("name", "served_by"), [("chat-a", "chat-a"), ("gpt-4o-mini", "chat-a"),
                                                 ("org/chat-b:v1", "org/chat-b:v1")])
def test_routes_by_model_name_and_alias(client: TestClient, name: str, served_by: str) -> None:
    response = post(client, "/v1/chat/completions", {"model": name, "messages": MESSAGES})
    assert response.status_code == 200
    assert response.json() == {"endpoint": "chat", "model": name, "served_by": served_by}


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


# --- LoRA adapters --------------------------------------------------------------------------------------------------

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


def test_a_clients_session_travels_with_its_request_for_replica_choice_by_session(monkeypatch) -> None:
    """The session header (else the body's ``user``) is the Serve handle's ``session_id``, which ``replica_choice:
    session`` places requests by; a request without either carries none, and a long one is cut. Under another
    choice no session is passed (each would cost a handle copy)."""
    other = FakeHandle(echo_answer("chat-a"))
    assert chat_with_key(router_client(other, monkeypatch), user="u-0").status_code == 200
    assert other.call_options[0].get("session_id") is None
    base = FakeHandle(echo_answer("chat-a"))
    client = router_client(base, monkeypatch, replica_choice="session")
    key = "sk-admin-000-0123456789"
    assert client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES, "user": "u-1"},
                       headers={"Authorization": f"Bearer {key}", "X-Session-Id": "s-1"}).status_code == 200
    assert chat_with_key(client, user="u-2").status_code == 200
    assert chat_with_key(client).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES},
                       headers={"Authorization": f"Bearer {key}", "x-session-id": "s" * 10_000}).status_code == 200
    sessions = [options.get("session_id") for options in base.call_options]
    assert sessions == ["s-1", "u-2", None, "s" * MAX_SESSION_CHARS]
