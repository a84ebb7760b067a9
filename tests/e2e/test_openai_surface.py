"""End to end: every chat-completions feature as OpenAI documents it, against the real local cluster.

Nothing here depends on what the model's words mean (the Paris check in test_e2e is the one exception): texts are
compared with each other, and shapes, counts and schemas are checked.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.harness import (
    ALIAS,
    API_KEY,
    DEFAULT_MODEL,
    EMBEDDING_MODEL,
    MAX_REQUEST_BYTES,
    ROOT,
    SECOND_MODEL,
    Cluster,
    clients_python,
)

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Tell me about the city of Lyon."}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                        "required": ["tz"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What will the weather be in Paris over the next 3 days?"}]


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return cluster.client()


def post(cluster: Cluster, path: str, body: dict) -> httpx.Response:
    return httpx.post(cluster.base_url + path, json=body, headers=AUTH, timeout=120)


def sse_chunks(cluster: Cluster, path: str, body: dict) -> list[dict]:
    """The stream's JSON chunks, after checking it is well-formed SSE ending in [DONE]."""
    with httpx.stream("POST", cluster.base_url + path, json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# --- 1. sampling and limits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_ends_with_length(client: openai.OpenAI, limit: str) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, **{limit: 5})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_stop_sequences_end_the_content_before_them(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=30)
    words = full.choices[0].message.content.split()
    assert len(words) > 4
    stop_word = words[3]
    expected = full.choices[0].message.content[:full.choices[0].message.content.index(stop_word)]
    for stop in (stop_word, ["zzzz-never", stop_word], ["qq", "ww", "ee", stop_word]):
        cut = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=30,
                                             stop=stop)
        assert cut.choices[0].message.content == expected
        assert cut.choices[0].finish_reason == "stop"


def test_n_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, n=3, temperature=1, max_tokens=8)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    assert 3 <= reply.usage.completion_tokens <= 24


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=1.0, top_p=0.95,
                                              seed=seed, max_tokens=24).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(1234), sample(1), sample(2), sample(3)}) > 1  # the seed, not greediness, fixed the text


def test_penalties_and_user_are_accepted(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=40)
    penalised = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=40,
                                               presence_penalty=2.0, frequency_penalty=2.0, user="user-1234")
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def test_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # Greedy decoding picks the most likely token.
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs))


# --- 2. streaming ------------------------------------------------------------------------------------------------

def test_stream_shape_and_usage(cluster: Cluster) -> None:
    chunks = sse_chunks(cluster, "/v1/chat/completions", {
        "model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 12, "temperature": 0,
        "stream_options": {"include_usage": True}})
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
    assert finishes == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert all(c.get("usage") is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(cluster: Cluster) -> None:
    chunks = sse_chunks(cluster, "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": ASK, "max_tokens": 4})
    assert all(c["choices"] for c in chunks)


# --- 3. tools ----------------------------------------------------------------------------------------------------

def check_calls(calls, tools=(WEATHER,)) -> None:
    assert calls, "no tool calls"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls(client: openai.OpenAI, tool_choice) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=WEATHER_QUESTION, tools=[WEATHER],
                                           tool_choice=tool_choice, temperature=0, max_tokens=80)
    choice = reply.choices[0]
    check_calls(choice.message.tool_calls)
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None


def test_named_tool_choice_picks_that_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=WEATHER_QUESTION, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    check_calls(calls, tools=(WEATHER, TIME))
    assert [c.function.name for c in calls] == ["get_time"]


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_optional_tool_choice(client: openai.OpenAI, tool_choice: str) -> None:
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=WEATHER_QUESTION, tools=[WEATHER],
                                           tool_choice=tool_choice, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    if tool_choice == "none":
        assert not choice.message.tool_calls
    else:
        # Whether this small model calls the tool is its choice; that it was offered one is not: the tool's
        # definition is in the prompt the chat template made.
        plain = client.chat.completions.create(model=DEFAULT_MODEL, messages=WEATHER_QUESTION, temperature=0,
                                               max_tokens=1)
        assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_streamed_tool_calls_reassemble(cluster: Cluster, client: openai.OpenAI, tool_choice) -> None:
    body = {"model": DEFAULT_MODEL, "messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": tool_choice,
            "temperature": 0, "max_tokens": 80}
    whole = client.chat.completions.create(**body).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in sse_chunks(cluster, "/v1/chat/completions", body):
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], {"name": "", "arguments": "", "id": None})
                call["id"] = call["id"] or delta.get("id")
                call["name"] += delta.get("function", {}).get("name") or ""
                call["arguments"] += delta.get("function", {}).get("arguments") or ""
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    assert finishes == ["tool_calls"]
    assert [c["name"] for c in calls.values()] == [c.function.name for c in whole]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [json.loads(c.function.arguments) for c in whole]
    assert all(c["id"] for c in calls.values())


@pytest.mark.parametrize("value", ["[Paris]", "a [b", "x]y", "{[", "]"])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_string_argument_with_brackets(cluster: Cluster, value: str, stream: bool) -> None:
    """Seen once with vLLM 0.32: a valid call whose string argument held `[` came back without `tool_calls`."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "enum": [value]}}, "required": ["q"]}}}
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Look it up."}], "tools": [tool],
            "tool_choice": "required", "temperature": 0, "max_tokens": 40}
    if stream:
        arguments = "".join(d.get("function", {}).get("arguments") or ""
                            for c in sse_chunks(cluster, "/v1/chat/completions", body)
                            for ch in c["choices"] for d in ch["delta"].get("tool_calls") or [])
    else:
        reply = post(cluster, "/v1/chat/completions", body).json()
        arguments = reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"q": value}


def test_strict_tool_arguments_follow_the_schema(client: openai.OpenAI) -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=WEATHER_QUESTION, tools=[strict],
                                           tool_choice="required", temperature=0.7, seed=7, max_tokens=80)
    check_calls(reply.choices[0].message.tool_calls)


def test_tool_result_follow_up_turn(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=DEFAULT_MODEL, messages=WEATHER_QUESTION, tools=[WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": ["sun", "rain", "sun"]})},
    ]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=[WEATHER],
                                           temperature=0, max_tokens=30)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens  # the tool result reached the prompt


# --- 4. structured output ----------------------------------------------------------------------------------------

def test_json_object(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON object describing a cat, with keys name and age."}])
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_strict(client: openai.OpenAI, seed: int) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
              "properties": {"city": {"type": "string", "maxLength": 20},
                             "population": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"enum": ["old", "big", "coastal"]}, "maxItems": 3}}}
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, temperature=0.8, seed=seed, max_tokens=120,
        messages=[{"role": "user", "content": "Describe the largest city in France."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


# --- 5. content parts --------------------------------------------------------------------------------------------

def test_text_parts_for_every_role(client: openai.OpenAI) -> None:
    def parts(text: str) -> list[dict]:
        return [{"type": "text", "text": text}]

    as_strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one."}]
    as_parts = [{**m, "content": parts(m["content"])} for m in as_strings]
    string_reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=as_strings, temperature=0,
                                                  max_tokens=12)
    parts_reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=as_parts, temperature=0,
                                                 max_tokens=12)
    assert parts_reply.choices[0].message.content == string_reply.choices[0].message.content
    developer = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=4, messages=[
        {"role": "developer", "content": parts("Be brief.")}, {"role": "user", "content": parts("Hi")}])
    assert developer.choices[0].message.content


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_image_to_a_text_model_is_400(cluster: Cluster) -> None:
    response = post(cluster, "/v1/chat/completions", {"model": DEFAULT_MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "model_not_multimodal" and "does not accept images" in error["message"]
    assert error["param"] == "messages[0].content[1]"


def test_multimodal_model_gets_images_through(cluster: Cluster) -> None:
    """The second copy is marked multimodal in the test config, so the router passes the image on; the engine
    (SmolLM2 is not really multimodal) answers for itself."""
    response = post(cluster, "/v1/chat/completions", {"model": SECOND_MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] != "model_not_multimodal"
    assert "multimodal" in response.json()["error"]["message"]


# --- 6. completions and embeddings -------------------------------------------------------------------------------

def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6,
                                      temperature=0)
    assert reply.object == "text_completion" and reply.model == DEFAULT_MODEL
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    streamed = client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text


def test_completions_with_several_prompts(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=DEFAULT_MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in reply.choices) == [0, 1]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=EMBEDDING_MODEL, input=["cat", "dog", "quantum physics"])
    cat, dog, physics = (d.embedding for d in sorted(reply.data, key=lambda d: d.index))
    assert len(cat) == 384 and reply.model == EMBEDDING_MODEL
    assert cosine(cat, dog) > cosine(cat, physics)
    assert reply.usage.prompt_tokens > 0
    single = client.embeddings.create(model=EMBEDDING_MODEL, input="cat").data[0].embedding
    assert cosine(single, cat) == pytest.approx(1.0, abs=1e-4)


def test_embedding_reply_larger_than_grpc_default_arrives(cluster: Cluster) -> None:
    """An engine's reply reaches the router as one message over Serve's gRPC channel, whose default limit is 4 MiB;
    a reply is as large as the client asked for (here about 5 MiB of JSON) and must arrive whole."""
    inputs = [f"item number {i}" for i in range(700)]
    response = post(cluster, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": inputs})
    assert response.status_code == 200, response.text[:500]
    assert len(response.content) > 4 * 1024 * 1024
    assert sorted(d["index"] for d in response.json()["data"]) == list(range(700))


def test_embeddings_base64(cluster: Cluster) -> None:
    import base64
    import struct

    body = post(cluster, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "cat", "encoding_format": "base64"})
    raw = base64.b64decode(body.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(raw) // 4}f", raw)) == 384


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": EMBEDDING_MODEL, "messages": ASK}),
    ("/v1/embeddings", {"model": DEFAULT_MODEL, "input": "cat"}),
])
def test_wrong_kind_of_model_is_400(cluster: Cluster, path: str, body: dict) -> None:
    response = post(cluster, path, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


# --- 6b. the Responses API ---------------------------------------------------------------------------------------

def test_responses_whole_and_streamed(client: openai.OpenAI) -> None:
    """``client.responses.create`` as the Agents SDK calls it: the same greedy answer whole and as typed events."""
    ask = {"model": DEFAULT_MODEL, "input": "Tell me about the city of Lyon.", "max_output_tokens": 16,
           "temperature": 0, "instructions": "Answer in one sentence."}
    reply = client.responses.create(**ask)
    assert reply.object == "response" and reply.model == DEFAULT_MODEL and reply.output_text
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 16
    events = list(client.responses.create(**ask, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert types.count("response.output_text.delta") > 3  # streamed, not one event at the end
    assert deltas == events[-1].response.output_text == reply.output_text
    assert events[-1].response.usage.output_tokens == reply.usage.output_tokens


def test_responses_under_an_alias_and_with_instructions(client: openai.OpenAI) -> None:
    reply = client.responses.create(model=ALIAS, input="Say hello.", max_output_tokens=4)
    assert reply.model == ALIAS
    plain = client.responses.create(model=DEFAULT_MODEL, input="Say hello.", max_output_tokens=1)
    # The instructions become the system message, in place of the template's default one (about 14 tokens).
    briefed = client.responses.create(model=DEFAULT_MODEL, input="Say hello.", max_output_tokens=1,
                                      instructions="You are a pirate captain of the seven seas. " * 6)
    assert briefed.usage.input_tokens > plain.usage.input_tokens + 30


def test_responses_errors(cluster: Cluster, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no-such-model", input="hi")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=DEFAULT_MODEL, input="hi", previous_response_id="resp_123")
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.retrieve("resp_123")
    assert caught.value.body["code"] == "unsupported_endpoint"
    too_long = post(cluster, "/v1/responses", {"model": DEFAULT_MODEL, "input": "hello " * 5000})
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    embedding = post(cluster, "/v1/responses", {"model": EMBEDDING_MODEL, "input": "cat"})
    assert embedding.status_code == 400 and embedding.json()["error"]["code"] == "model_not_supported"


# --- 7. model names ----------------------------------------------------------------------------------------------

def test_alias_is_answered_under_the_alias(cluster: Cluster, client: openai.OpenAI) -> None:
    assert client.chat.completions.create(model=ALIAS, messages=ASK, max_tokens=2).model == ALIAS
    chunks = sse_chunks(cluster, "/v1/chat/completions", {"model": ALIAS, "messages": ASK, "max_tokens": 2})
    assert {c["model"] for c in chunks} == {ALIAS}
    assert client.completions.create(model=ALIAS, prompt="Hi", max_tokens=2).model == ALIAS
    # ... and the canonical name still answers under its own name afterwards.
    assert client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=2).model == DEFAULT_MODEL


def test_alias_card(client: openai.OpenAI) -> None:
    assert ALIAS in {m.id for m in client.models.list()}
    assert client.models.retrieve(ALIAS).id == ALIAS


# --- 8. errors ---------------------------------------------------------------------------------------------------

def test_prompt_longer_than_the_context(cluster: Cluster) -> None:
    response = post(cluster, "/v1/chat/completions",
                    {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "hello " * 5000}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error", "context_length_exceeded", "messages")
    completion = post(cluster, "/v1/completions", {"model": DEFAULT_MODEL, "prompt": "hello " * 5000})
    assert completion.json()["error"]["code"] == "context_length_exceeded"
    assert completion.json()["error"]["param"] == "prompt"


def test_oversized_body_is_413(cluster: Cluster) -> None:
    response = post(cluster, "/v1/chat/completions",
                    {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_sdk_exception_types(cluster: Cluster, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        cluster.client(api_key="sk-nope").chat.completions.create(model=DEFAULT_MODEL, messages=ASK)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ASK)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=5)
    assert caught.value.param == "temperature" and caught.value.type == "invalid_request_error"


# --- 9. real clients ---------------------------------------------------------------------------------------------

def test_async_openai_client(cluster: Cluster) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=cluster.base_url + "/v1", api_key=API_KEY, max_retries=0)
        replies = await asyncio.gather(*[
            client.chat.completions.create(model=name, messages=ASK, temperature=0, max_tokens=8)
            for name in (DEFAULT_MODEL, SECOND_MODEL, ALIAS)])
        stream = await client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0,
                                                      max_tokens=8, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return [r.choices[0].message.content for r in replies] + [streamed]

    texts = asyncio.run(run())
    assert len(set(texts)) == 1  # the same greedy answer from both copies, via the alias, and streamed


def run_client(script: str, *args: str) -> dict:
    """Run a client script from tests/e2e/clients in the clients' own environment and return its JSON output."""
    result = subprocess.run([str(clients_python()), str(ROOT / "tests" / "e2e" / "clients" / script), *args],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_langchain(cluster: Cluster, client: openai.OpenAI) -> None:
    out = run_client("langchain_check.py", cluster.base_url + "/v1", API_KEY, DEFAULT_MODEL)
    expected = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=40, messages=[
        {"role": "user", "content": "Tell me about the city of Lyon."}]).choices[0].message.content
    assert out["invoke"] == out["stream"] == expected
    assert [c["name"] for c in out["tool_calls"]] == ["get_weather"]
    args = out["tool_calls"][0]["args"]
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    assert isinstance(out["structured"]["name"], str) and out["structured"]["population"] >= 0


def test_llamaindex(cluster: Cluster, client: openai.OpenAI) -> None:
    out = run_client("llamaindex_check.py", cluster.base_url + "/v1", API_KEY, DEFAULT_MODEL)
    expected = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=20, messages=[
        {"role": "user", "content": "Tell me about the city of Lyon."}]).choices[0].message.content
    assert out["chat"] == out["stream_chat"] == expected


# --- 10. bad input cannot hurt it --------------------------------------------------------------------------------

def test_property_based_requests_find_no_server_error(cluster: Cluster, client: openai.OpenAI,
                                                     tmp_path: Path) -> None:
    """Schemathesis generates requests, valid and not, from the app's own OpenAPI document. It runs in a temporary
    folder: it writes its example cache (``.schemathesis/``) where it runs."""
    command = [str(clients_python().parent / "st"), "run", cluster.base_url + "/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "20261126",
               "--request-timeout", "120", "-H", f"Authorization: Bearer {API_KEY}", "--url", cluster.base_url]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200, check=False,
                            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks",
                                 "RAYROUTE_FUZZ_CHAT_MODELS": f"{DEFAULT_MODEL},{SECOND_MODEL},{ALIAS}",
                                 "RAYROUTE_FUZZ_EMBEDDING_MODELS": EMBEDDING_MODEL, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = int(re.search(r"(\d+) generated", result.stdout).group(1))
    assert generated >= 300, result.stdout[-3000:]
    # ... and the cluster still serves.
    assert client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=2).choices
