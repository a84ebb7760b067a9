"""Media URLs only from a model's allowed domains: refused by the router before any engine is asked (and never
fetched), and vLLM told the same list with redirects off. No network: the resolver is replaced."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from deployments.config import ConfigError, ModelConfig, parse_args
from deployments.model_config import MEDIA_ENV
from deployments.replies import Admitted, FullReply
from router import media
from router.ingress import OpenAIRouter, build_http_app
from tests.unit.fakes import FakeHandle, LocalLimits

KEY = "sk-media-0000-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = ["images.example.com", "cdn.example.org"]
PUBLIC = "93.184.215.14"
CONFIG = {"models": [
    {"id": "vision", "aliases": ["gpt-4o"], "multimodal": True, "allowed_media_domains": ALLOWED,
     "fallbacks": ["vision-small"]},
    {"id": "vision-small", "multimodal": True, "allowed_media_domains": ["images.example.com"]},
    {"id": "text"},
]}
PARAM = "messages[0].content[1].image_url.url"


def ok(endpoint: str, body: dict) -> list[Any]:
    return [Admitted(), FullReply(json.dumps({"model": body["model"]}), 3, 2)]


class Resolver:
    """Stands in for DNS: host → addresses (an exception to raise, or None to hang); records each lookup."""

    def __init__(self, answers: dict[str, Any] | None = None):
        self.answers = answers or {}
        self.asked: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        answer = self.answers.get(host, [PUBLIC])
        if answer is None:
            await asyncio.sleep(3600)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    resolver = Resolver()
    monkeypatch.setattr(media, "resolve_host", resolver)
    return resolver


@pytest.fixture
def engines() -> dict[str, FakeHandle]:
    return {"vision": FakeHandle(ok), "vision-small": FakeHandle(ok), "text": FakeHandle(ok)}


@pytest.fixture
def client(engines: dict[str, FakeHandle], resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("RAYROUTE_API_KEYS", KEY)
    return TestClient(build_http_app(OpenAIRouter(CONFIG, engines, LocalLimits())), raise_server_exceptions=False)


def image_chat(url: str, model: str = "vision") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def refused(response, param: str, code: str = "media_url_not_allowed") -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    return error["message"]


# --- the router refuses, before any engine is asked ---------------------------------------------------------------

@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1/a.png", "IP address `127.0.0.1`"),
    ("http://[::1]/a.png", "IP address `[::1]`"),
    ("http://169.254.169.254/latest/meta-data/", "IP address `169.254.169.254`"),
    ("http://10.1.2.3/a.png", "IP address `10.1.2.3`"),
    ("http://2130706433/a.png", "IP address"),  # 127.0.0.1 as one number
    ("http://images.example.com@127.0.0.1/a.png", "IP address `127.0.0.1`"),  # userinfo, not the host
    ("https://evil.example.net/a.png", "host `evil.example.net`, which is not one of the domains"),
    ("https://sub.images.example.com/a.png", "not one of the domains"),  # no subdomains, as in vLLM
    ("https://images.example.com./a.png", "not one of the domains"),  # vLLM compares `images.example.com.`
    ("file:///etc/passwd", "`file:`"),
    ("ftp://images.example.com/a.png", "`ftp:`"),
    ("images.example.com/a.png", "no scheme"),
    ("http:///a.png", "names no host"),
    ("https://images.example.com:99999/", "not a valid URL"),
])
def test_a_media_url_outside_the_allowed_domains_is_refused(client, engines, resolver, url: str, why: str) -> None:
    message = refused(client.post("/v1/chat/completions", json=image_chat(url), headers=AUTH), PARAM)
    assert why in message and PARAM in message
    assert engines["vision"].calls == [] and engines["vision-small"].calls == []
    assert resolver.asked == []  # refused on its face: nothing looked up, nothing fetched


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["10.0.0.7"], ["169.254.169.254"], ["::1"], ["fd00::1"],
                                       ["::ffff:169.254.169.254"], ["64:ff9b::a00:1"], ["0.0.0.0"],
                                       ["224.0.1.1"], ["100.64.0.1"], [PUBLIC, "192.168.1.1"]])
def test_an_allowed_host_that_resolves_to_a_non_public_address_is_refused(client, engines, resolver,
                                                                          addresses: list[str]) -> None:
    resolver.answers["images.example.com"] = addresses
    response = client.post("/v1/chat/completions", json=image_chat("https://images.example.com/cat.png"),
                           headers=AUTH)
    assert "`images.example.com`, which resolves to a non-public address" in refused(response, PARAM)
    assert resolver.asked == ["images.example.com"] and engines["vision"].calls == []
    assert addresses[-1] not in response.text  # what the cluster's DNS says stays in the cluster


@pytest.mark.parametrize(("answer", "why"), [(socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                                              "does not resolve"), ([], "does not resolve"),
                                             (None, "did not resolve within 0.05s")])
def test_a_host_that_does_not_resolve_is_refused(client, engines, resolver, monkeypatch, answer, why) -> None:
    monkeypatch.setattr(media, "MEDIA_RESOLVE_TIMEOUT_S", 0.05)
    resolver.answers["images.example.com"] = answer
    response = client.post("/v1/chat/completions", json=image_chat("https://images.example.com/cat.png"),
                           headers=AUTH)
    assert why in refused(response, PARAM) and engines["vision"].calls == []


@pytest.mark.parametrize("url", ["data:image/png;base64,iVBORw0KGgo=", "DATA:image/png;base64,iVBORw0KGgo="])
def test_a_data_url_is_never_looked_up_and_passes(client, engines, resolver, url: str) -> None:
    response = client.post("/v1/chat/completions", json=image_chat(url), headers=AUTH)
    assert response.status_code == 200 and len(engines["vision"].calls) == 1 and resolver.asked == []


def test_an_allowed_public_host_passes_each_host_resolved_once(client, engines, resolver) -> None:
    body = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"https://IMAGES.Example.com/{i}.png"}}
                                     for i in range(5)]},
        {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "https://cdn.example.org/a.mp4"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert sorted(resolver.asked) == ["cdn.example.org", "images.example.com"]
    assert engines["vision"].calls[0][1]["messages"] == body["messages"]  # passed on untouched


@pytest.mark.parametrize(("content", "param"), [
    ([{"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}}], "messages[0].content[0].audio_url.url"),
    ([{"type": "video_url", "video_url": {"url": "http://10.0.0.1/a.mp4"}}], "messages[0].content[0].video_url.url"),
    ([{"image_url": "http://10.0.0.1/a.png"}], "messages[0].content[0].image_url"),  # vLLM reads typeless parts
    ([{"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}, "uuid": "x"}],
     "messages[0].content[0].image_url.url"),
    ([{"type": "input_image", "image_url": "http://10.0.0.1/a.png"}], "messages[0].content[0].image_url"),
])
def test_every_kind_of_media_part_is_checked(client, engines, content: list, param: str) -> None:
    body = {"model": "vision", "messages": [{"role": "user", "content": content}]}
    refused(client.post("/v1/chat/completions", json=body, headers=AUTH), param)
    assert engines["vision"].calls == []


def test_a_tool_messages_media_is_checked(client, engines) -> None:
    body = {"model": "vision", "messages": [
        {"role": "user", "content": "Take a screenshot."},
        {"role": "tool", "tool_call_id": "c1", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/"}}]}]}
    refused(client.post("/v1/chat/completions", json=body, headers=AUTH), "messages[1].content[0].image_url.url")


@pytest.mark.parametrize(("items", "param"), [
    ([{"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                   {"type": "input_image", "image_url": "http://169.254.169.254/latest"}]}],
     "input[0].content[1].image_url"),
    ([{"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
      {"type": "function_call_output", "call_id": "c1", "output": [
          {"type": "input_image", "image_url": "https://evil.example.net/x.png"}]}], "input[1].output[0].image_url"),
])
def test_responses_input_images_are_checked(client, engines, items: list, param: str) -> None:
    response = client.post("/v1/responses", json={"model": "vision", "input": items, "store": False}, headers=AUTH)
    refused(response, param)
    assert engines["vision"].calls == []


def test_responses_with_an_allowed_image_pass(client, engines) -> None:
    items = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://cdn.example.org/a.png"}]}]
    response = client.post("/v1/responses", json={"model": "vision", "input": items}, headers=AUTH)
    assert response.status_code == 200 and len(engines["vision"].calls) == 1


def test_embeddings_chat_messages_are_checked(client, engines) -> None:
    """vLLM embeds a chat conversation sent as `messages` (the router's body needs `input` too)."""
    body = {"model": "vision", "input": "", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:8080/metrics"}}]}]}
    refused(client.post("/v1/embeddings", json=body, headers=AUTH), "messages[0].content[0].image_url.url")
    assert engines["vision"].calls == []


def test_a_text_model_fetches_no_media_url(client, engines) -> None:
    """Typed chat parts are refused as before (model_not_multimodal); anything else that names a URL is refused
    here, where vLLM's own domain check would admit any host (a text model has no list)."""
    typed = client.post("/v1/chat/completions", json=image_chat("https://images.example.com/a.png", "text"),
                        headers=AUTH)
    assert typed.json()["error"]["code"] == "model_not_multimodal"
    items = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://images.example.com/a"}]}]
    response = client.post("/v1/responses", json={"model": "text", "input": items}, headers=AUTH)
    assert "not multimodal" in refused(response, "input[0].content[0].image_url")
    assert engines["text"].calls == []


def test_media_urls_are_capped(client, engines, resolver, monkeypatch) -> None:
    monkeypatch.setattr(media, "MAX_MEDIA_URLS", 3)
    parts = [{"type": "image_url", "image_url": {"url": f"https://images.example.com/{i}.png"}} for i in range(4)]
    inline = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}] * 10  # never counted
    body = {"model": "vision", "messages": [{"role": "user", "content": inline + parts}]}
    message = refused(client.post("/v1/chat/completions", json=body, headers=AUTH),
                      "messages[0].content[13].image_url.url", code="too_many_media_urls")
    assert "more than 3 media URLs" in message and resolver.asked == [] and engines["vision"].calls == []
    body["messages"][0]["content"] = inline + parts[:3]
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200


def test_a_fallback_answers_only_if_it_fetches_from_every_host(engines, resolver, monkeypatch) -> None:
    """`vision` (both domains) falls back to `vision-small` (one): a request naming the other domain is not
    passed to it, and gets the primary's own answer."""
    engines["vision"] = FakeHandle(lambda endpoint, body: [BackPressureError(num_queued_requests=1,
                                                                             max_queued_requests=1)])
    monkeypatch.setenv("RAYROUTE_API_KEYS", KEY)
    client = TestClient(build_http_app(OpenAIRouter(CONFIG, engines, LocalLimits())), raise_server_exceptions=False)
    fits = client.post("/v1/chat/completions", json=image_chat("https://images.example.com/a.png"), headers=AUTH)
    assert fits.status_code == 200 and fits.headers["x-rayroute-fallback-from"] == "vision"
    other = client.post("/v1/chat/completions", json=image_chat("https://cdn.example.org/a.png"), headers=AUTH)
    assert other.status_code == 429 and other.json()["error"]["code"] == "model_at_capacity"
    assert len(engines["vision-small"].calls) == 1


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.215.14", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.0.1", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("224.0.0.1", False), ("240.0.0.1", False), ("::1", False), ("::", False), ("fe80::1%eth0", False),
    ("fd00:ec2::254", False), ("ff0e::1", False), ("::ffff:127.0.0.1", False), ("2002:7f00:1::", False),
    ("64:ff9b::a9fe:a9fe", False), ("not-an-address", False),
])
def test_public_addresses(address: str, public: bool) -> None:
    assert media.public_address(address) is public


# --- the config --------------------------------------------------------------------------------------------------

def config_error(**model: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_args({"models": [{"id": "m1", "source": "org/model", **model}]})
    return str(caught.value)


def test_a_multimodal_model_needs_allowed_media_domains() -> None:
    message = config_error(multimodal=True)
    assert "models[0 m1]" in message and "`allowed_media_domains` is required with `multimodal: true`" in message
    assert "`allowed_media_domains` is required" in config_error(multimodal=True, allowed_media_domains=[])


def test_allowed_media_domains_without_multimodal_is_an_error() -> None:
    assert "`multimodal` is false" in config_error(allowed_media_domains=["images.example.com"])


@pytest.mark.parametrize(("domain", "why"), [
    ("https://images.example.com", "not a hostname"), ("images.example.com:443", "not a hostname"),
    ("images.example.com/cats", "not a hostname"), ("images.example.com.", "not a hostname"),
    ("localhost", "not a hostname"), ("images_1.example.com", "not a hostname"), ("-a.example.com", "not a hostname"),
    ("bücher.example", "xn--"), ("images.example.com\n", "not a hostname"), ("", "not a hostname"),
    ("*.example.com", "wildcards"), ("10.0.0.1", "IP address"), ("[::1]", "IP address"), ("::1", "IP address"),
    ("127.1", "IP address"), ("0x7f.1", "IP address"),
])
def test_allowed_media_domains_are_hostnames(domain: str, why: str) -> None:
    message = config_error(multimodal=True, allowed_media_domains=["cdn.example.org", domain])
    assert "models[0 m1].allowed_media_domains[1]: " in message and why in message


def test_allowed_media_domains_are_lower_cased_as_vllm_compares_them() -> None:
    args = parse_args({"models": [{"id": "m1", "source": "org/model", "multimodal": True,
                                   "allowed_media_domains": ["Images.Example.COM", "xn--bcher-kva.example"]}]})
    assert args.models[0].allowed_media_domains == ["images.example.com", "xn--bcher-kva.example"]
    assert args.router_args()["models"][0]["allowed_media_domains"] == ["images.example.com", "xn--bcher-kva.example"]


def test_the_engine_settings_for_media_are_owned() -> None:
    assert "`allowed_media_domains` is set by the model's `allowed_media_domains` field" in config_error(
        multimodal=True, allowed_media_domains=["a.example.com"], engine_args={"allowed_media_domains": ["b.com"]})
    assert "`VLLM_MEDIA_URL_ALLOW_REDIRECTS` is set by rayroute" in config_error(
        env={"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "1"})


# --- what vLLM is told ---------------------------------------------------------------------------------------------

VISION = {"id": "m1", "source": "org/model", "multimodal": True, "allowed_media_domains": ALLOWED}


def test_vllm_gets_the_domains_and_redirects_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib3.util import parse_url
    from vllm import envs
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.multimodal.media.connector import MediaConnector

    model = ModelConfig.model_validate(VISION)
    overrides = model.engine_overrides()
    assert overrides["allowed_media_domains"] == ALLOWED
    engine_args = AsyncEngineArgs(model=model.resolved_source, **overrides)  # as deployments/engine.py builds it
    assert engine_args.allowed_media_domains == ALLOWED
    # vLLM's own check, with that list: the router's semantics (exact hostnames, case-insensitive, no subdomains).
    connector = MediaConnector(allowed_media_domains=engine_args.allowed_media_domains)
    connector._assert_url_in_allowed_media_domains(parse_url("https://IMAGES.example.com/a.png"))
    for url in ("https://sub.images.example.com/a.png", "https://evil.example.net/a.png", "http://127.0.0.1/"):
        with pytest.raises(ValueError, match="allowed domains"):
            connector._assert_url_in_allowed_media_domains(parse_url(url))
    # The engine process's environment: vLLM then fetches without following redirects.
    assert model.media_env() == MEDIA_ENV == {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}
    for name, value in model.media_env().items():
        monkeypatch.setenv(name, value)
    assert envs.VLLM_MEDIA_URL_ALLOW_REDIRECTS is False


def test_a_text_model_gets_no_domain_list() -> None:
    assert "allowed_media_domains" not in ModelConfig.model_validate({"id": "m1", "source": "org/m"}).engine_overrides()
