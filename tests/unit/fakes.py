"""The router without Ray, for unit tests: stand-ins for Serve handles, the key-limits deployment and the stream
channels, engine scripts, and real :class:`router.ingress.OpenAIRouter` instances built on them: three kinds, each
with its keys and models, and the helpers that send them requests.

- :func:`router_client`: model ``chat-a`` (and any others) on scripted handles, keys with per-key limits
  (:data:`ROUTER_KEYS`) kept in this process; requests with :func:`chat`.
- :func:`edge_client`: two models on echoing engines (:func:`echo_answer`), plain keys, a 4 KiB body limit
  (:data:`EDGE_CONFIG`); requests with :func:`post`, errors read with :func:`error_of`.
- :func:`make_router`: routers with a given key-limits handle (two routers given one ``KeyLimits`` are two router
  replicas) and a key for each kind of limit (:data:`KEYS`).

Every client :func:`router_client` makes runs the app's lifespan (as Serve does) and is closed after its test by
``conftest.py``: the lifespan's end closes the router's channel client, so no aiohttp session outlives a test.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from deployments.replies import Admitted, Chunk, ErrorReply, FullReply

# --- the router without Ray: stand-ins for Serve handles, for unit tests --------------------------------------

class Hang:
    """A step that never completes (a replica that never answers)."""


class FakeStream:
    """A Serve streaming call's response: yields its steps; a :class:`Hang` waits forever, an exception is raised.

    As the engine's streams do (:mod:`deployments.stream_channel`), a stream's first chunk names a channel and the
    steps after it come on that channel: a :class:`FakeChannel` that :class:`FakeChannels` opens. So a script is
    written as the events in order, and the router relays them the one way it relays a real engine's."""

    def __init__(self, steps: list[Any]):
        self.steps = list(steps)
        self.cancelled = False
        self.failed: BaseException | None = None
        self.read = 0  # items the router took, its end included

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        self.read += 1
        if not self.steps:
            raise StopAsyncIteration
        step = self.steps.pop(0)
        if isinstance(step, Hang):
            await asyncio.sleep(3600)
        if isinstance(step, BaseException):
            self.failed = step
            raise step
        if isinstance(step, Chunk) and step.channel is None:
            url = f"{FAKE_CHANNEL_SCHEME}{next(_channel_ids)}"
            # An error after the chunks is the call's end (an engine that stopped under the stream says so there).
            _offered[url] = FakeChannel([s for s in self.steps if not isinstance(s, ErrorReply)])
            self.steps = [s for s in self.steps if isinstance(s, ErrorReply)]
            return replace(step, channel=url)
        return step

    def cancel(self) -> None:
        self.cancelled = True
        if self.failed is not None:  # as Ray's handle does: cancelling a failed call raises its error again
            raise self.failed


FAKE_CHANNEL_SCHEME = "fake-channel://"
_channel_ids = itertools.count()
_offered: dict[str, FakeChannel] = {}  # by URL, until the router opens it


class FakeChannel:
    """A stream's channel (:class:`router.channel_client.Channel`) playing a script's steps after its first chunk:
    each chunk's text with its counts; a :class:`Hang` waits until the stream runs out of time (:meth:`expire`);
    an exception is raised as a broken channel's error is."""

    def __init__(self, steps: list[Any]):
        self.steps = list(steps)
        self.prompt_tokens = self.completion_tokens = self.text_chars = 0
        self.token_ids: list[int] = []
        self.expired = asyncio.Event()
        self.closed = False

    async def read(self) -> bytes:
        while self.steps:
            step = self.steps.pop(0)
            if isinstance(step, Hang):
                await self.expired.wait()
            if self.expired.is_set():
                raise TimeoutError
            if isinstance(step, BaseException):
                raise step
            self.prompt_tokens, self.completion_tokens = step.prompt_tokens, step.completion_tokens
            self.token_ids.extend(step.token_ids)
            self.text_chars = max(self.text_chars, step.text_chars)
            if step.data:
                return step.data.encode()
        return b""

    def expire(self) -> None:
        self.expired.set()

    def close(self) -> None:
        self.closed = True


class FakeChannels:
    """The router's channel client (:class:`router.channel_client.ChannelClient`) for :class:`FakeStream`'s
    channels; any other URL (a real channel server's) is opened by a real client."""

    def __init__(self) -> None:
        self.real: Any = None

    async def open(self, url: str) -> Any:
        if url.startswith(FAKE_CHANNEL_SCHEME):
            return _offered.pop(url)
        if self.real is None:
            from router.channel_client import ChannelClient

            self.real = ChannelClient()
        return await self.real.open(url)

    async def close(self) -> None:
        if self.real is not None:
            await self.real.close()


class FakeHandle:
    """Stands in for a model's ``DeploymentHandle``: ``handle.options(stream=True).<endpoint>.remote(body)`` returns
    a :class:`FakeStream` of what ``answer(endpoint, body)`` gives; every call and stream is kept, with the handle
    options each call was made with (``multiplexed_model_id``) and the :class:`~deployments.resume.Resume` it
    carried (None for a request's first call)."""

    def __init__(self, answer: Callable[[str, dict], list[Any]]):
        self.answer = answer
        self.calls: list[tuple[str, dict]] = []
        self.streams: list[FakeStream] = []
        self.call_options: list[dict[str, Any]] = []
        self.resumes: list[Any] = []
        self.chosen: dict[str, Any] = {}

    @classmethod
    def scripted(cls, *scripts: list[Any]) -> FakeHandle:
        """The n-th call plays the n-th script (the last one repeats)."""
        handle = cls(lambda endpoint, body: list(scripts[min(len(handle.calls), len(scripts)) - 1]))
        return handle

    def options(self, **options: Any) -> FakeHandle:
        optioned = copy.copy(self)  # shares the lists of calls and streams, as Serve's handles share a router
        optioned.chosen = {**self.chosen, **options}
        return optioned

    def __getattr__(self, endpoint: str) -> SimpleNamespace:
        if endpoint.startswith("_"):  # not an endpoint: what copy and pickle look for
            raise AttributeError(endpoint)

        def remote(body: dict, resume: Any = None) -> FakeStream:
            self.calls.append((endpoint, body))
            self.resumes.append(resume)
            self.call_options.append(self.chosen)
            self.streams.append(FakeStream(self.answer(endpoint, body)))
            return self.streams[-1]

        return SimpleNamespace(remote=remote)


class LocalLimits:
    """:class:`router.limits.KeyLimits` behind the same ``.method.remote()`` calls a Serve handle takes."""

    def __init__(self) -> None:
        from router.limits import KeyLimits

        self.limits = KeyLimits()

    def __getattr__(self, method: str) -> SimpleNamespace:
        async def result(*args: Any, **kwargs: Any) -> Any:
            return getattr(self.limits, method)(*args, **kwargs)

        def remote(*args: Any, **kwargs: Any) -> Any:
            return result(*args, **kwargs) if method == "admit" else getattr(self.limits, method)(*args, **kwargs)

        return SimpleNamespace(remote=remote)


MESSAGES = [{"role": "user", "content": "hi"}]
ROUTER_KEYS = [
    {"name": "free", "key": "sk-free-0000-0123456789", "models": ["gpt-4o-mini"], "requests_per_minute": 2},
    {"name": "tokens", "key": "sk-tokens-00-0123456789", "tokens_per_minute": 10},
    {"name": "admin", "key": "sk-admin-000-0123456789"},
]


def router_config(others: tuple[str, ...] = (), **model: Any) -> dict[str, Any]:
    """One model, ``chat-a`` (alias ``gpt-4o-mini``), with ``model``'s settings; and plain ones named ``others``."""
    return {"models": [{"id": "chat-a", "aliases": ["gpt-4o-mini"], **model},
                       *({"id": name} for name in others)]}


def router_client(handle: FakeHandle, monkeypatch: Any, others: dict[str, FakeHandle] | None = None,
                  **model: Any) -> Any:
    """A TestClient on a real router whose model ``chat-a`` (:func:`router_config`) is ``handle`` and whose
    ``others`` models are theirs, with :data:`ROUTER_KEYS` and per-key limits kept in this process."""
    from fastapi.testclient import TestClient

    from router.ingress import OpenAIRouter, build_http_app

    monkeypatch.setenv("RAYROUTE_API_KEYS", json.dumps(ROUTER_KEYS))
    others = others or {}
    router = OpenAIRouter(router_config(tuple(others), **model), {"chat-a": handle, **others}, LocalLimits(),
                          channels=FakeChannels())
    client = TestClient(build_http_app(router), raise_server_exceptions=False)
    client.__enter__()  # runs the app's lifespan, as Serve does; ended by close_router_clients
    _open_clients.append(client)
    return client


_open_clients: list[Any] = []


def close_router_clients() -> None:
    """End every client :func:`router_client` made (``unit/conftest.py`` calls this after each test)."""
    while _open_clients:
        _open_clients.pop().__exit__(None, None, None)


def chat(client: Any, key: str = "sk-admin-000-0123456789", **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "chat-a", "messages": MESSAGES, **body},
                       headers={"Authorization": f"Bearer {key}"})


def sse_events(text: str) -> list[Any]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def from_address(app: Any, host: str = "203.0.113.7") -> Any:
    """A TestClient on ``app`` whose connections come from ``host``."""
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False, client=(host, 40000))


# --- engine scripts ------------------------------------------------------------------------------------------------

def event(text: str) -> str:
    """One SSE event carrying ``text``."""
    return f"data: {json.dumps({'t': text})}\n\n"


def ok(body: str = "{}", prompt: int = 3, completion: int = 2) -> list[Any]:
    """A whole answer: ``body`` with its token counts."""
    return [Admitted(), FullReply(body, prompt, completion)]


def stream_of(*texts: str) -> list[Any]:
    """A stream of one :func:`event` per text (3 prompt tokens, one more completion token each)."""
    return [Admitted(), *(Chunk(event(t), 3, i + 1) for i, t in enumerate(texts))]


def resumable_stream_of(*texts: str, made: int = 0) -> list[Any]:
    """:func:`stream_of` as an engine sends a stream that can go on elsewhere: each text one token, whose id is
    100 + its position in the whole stream, after the ``made`` tokens of an earlier replica."""
    return [Admitted(), *(Chunk(event(t), 3, made + i + 1, resumable=True, token_ids=(100 + made + i,),
                                text_chars=made + i + 1) for i, t in enumerate(texts))]


# --- the edge: two models on echoing engines, plain keys, a 4 KiB body limit ---------------------------------------

EDGE_KEY = "sk-unit-" + "0123456789abcdef"
EDGE_OTHER_KEY = "sk-other-" + "0123456789abcdef"
EDGE_AUTH = {"Authorization": f"Bearer {EDGE_KEY}"}
EDGE_CONFIG = {
    "models": [
        {"id": "chat-a", "aliases": ["gpt-4o-mini"]},
        {"id": "org/chat-b:v1", "multimodal": True, "allowed_media_domains": ["images.example.com"]},
    ],
    "max_request_bytes": 4096,
}


def echo_answer(model_id: str) -> Callable[[str, dict], list[Any]]:
    """An engine that answers with the endpoint and model it was asked, and its own id (a stream: two events)."""
    def answer(endpoint: str, body: dict) -> list[Any]:
        if body.get("stream"):
            chunk = {"object": "chat.completion.chunk", "model": body["model"], "served_by": model_id}
            return [Admitted(), Chunk(f"data: {json.dumps(chunk)}\n\n", 7, 1),
                    Chunk(f"data: {json.dumps(chunk)}\n\n", 7, 2), Chunk("data: [DONE]\n\n", 7, 2)]
        return [Admitted(),
                FullReply(json.dumps({"endpoint": endpoint, "model": body["model"], "served_by": model_id}), 5, 3)]

    return answer


def edge_engines() -> dict[str, FakeHandle]:
    """The edge's engines, by model id: each an echoing :class:`FakeHandle`."""
    return {mid: FakeHandle(echo_answer(mid)) for mid in ("chat-a", "org/chat-b:v1")}


def edge_client(engines: dict[str, FakeHandle], monkeypatch: Any) -> Any:
    """A TestClient on a router of :data:`EDGE_CONFIG` in front of ``engines``, taking either edge key."""
    from fastapi.testclient import TestClient

    from router.ingress import OpenAIRouter, build_http_app

    monkeypatch.setenv("RAYROUTE_API_KEYS", f"{EDGE_OTHER_KEY},{EDGE_KEY}")
    return TestClient(build_http_app(OpenAIRouter(EDGE_CONFIG, engines, channels=FakeChannels())),
                      raise_server_exceptions=False)


def post(client: Any, path: str, body: Any, **kwargs: Any) -> Any:
    """``body`` sent to ``path`` with the edge's key."""
    return client.post(path, json=body, headers=EDGE_AUTH, **kwargs)


def error_of(response: Any) -> dict:
    """The error of an answer, checked to be OpenAI's envelope and nothing else."""
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- routers with a given key-limits handle -------------------------------------------------------------------------

KEYS = {
    "plain": {"name": "plain", "key": "sk-plain-000000000000000"},
    "one-at-a-time": {"name": "one-at-a-time", "key": "sk-single-00000000000000", "max_concurrent_requests": 1},
    "tokens": {"name": "tokens", "key": "sk-tokens-00000000000000", "tokens_per_minute": 100},
    "roomy": {"name": "roomy", "key": "sk-roomy-000000000000000", "tokens_per_minute": 10_000,
              "max_concurrent_requests": 8},
}


def make_router(monkeypatch: Any, engine: FakeHandle, limits: Any = None, others: dict[str, FakeHandle] | None = None,
                config: dict[str, Any] | None = None, **model: Any) -> Any:
    """A router on model ``chat-a`` (``model``'s settings) and plain ``others``, taking :data:`KEYS`, whose key
    limits are ``limits`` (a handle; None keeps none)."""
    from router.ingress import OpenAIRouter

    monkeypatch.setenv("RAYROUTE_API_KEYS", json.dumps(list(KEYS.values())))
    others = others or {}
    args = {"models": [{"id": "chat-a", **model}, *({"id": name} for name in others)], **(config or {})}
    return OpenAIRouter(args, {"chat-a": engine, **others}, limits, channels=FakeChannels())


def client_of(router_: Any) -> Any:
    from fastapi.testclient import TestClient

    from router.ingress import build_http_app

    return TestClient(build_http_app(router_), raise_server_exceptions=False)


# --- keys files ------------------------------------------------------------------------------------------------------

def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def keys_yaml(*entries: str) -> str:
    """A keys file (YAML) listing ``entries``."""
    return "".join(f"- {entry}\n" for entry in entries)


# --- a router whose keys come from a keys file (its fixtures are in conftest.py) --------------------------------

KEYED_KEY = "sk-auth-" + "0123456789abcdef"
KEYED_HASHED = "sk-hashed-" + "fedcba9876543210"  # in the keys file only as its sha256
KEYED_WRONG = "sk-wrong-" + "0123456789abcdef"
KEYED_CONFIG = {"models": [{"id": "chat-a", "aliases": ["gpt-4o-mini"]}]}


def answer_with_model(endpoint: str, body: dict) -> list:
    """An engine script: a whole answer naming the model it was asked for."""
    from deployments.replies import Admitted, FullReply

    return [Admitted(), FullReply(json.dumps({"model": body["model"]}), 1, 1)]


HI = [{"role": "user", "content": "hi"}]  # a prompt estimated at 1 token (2 bytes / 4, rounded up)


def post_as(client: Any, key: str, path: str = "/v1/chat/completions", **body: Any) -> Any:
    """A request to the admission router (:func:`make_router`) with one of :data:`KEYS`' keys."""
    body = {"model": "chat-a", **({"messages": HI} if path == "/v1/chat/completions" else {}), **body}
    return client.post(path, json=body, headers={"Authorization": f"Bearer {KEYS[key]['key']}"})
