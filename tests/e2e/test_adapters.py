"""LoRA adapters as models, end to end: the default model's adapter answers exactly as ``transformers`` + ``peft``
do with the same weights, and Serve's multiplexing sends each adapter's requests to the replica that holds it."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml

from tests.e2e.harness import DEFAULT_MODEL, PAIR_ADAPTERS, PAIR_MODEL, PIRATE_ADAPTER, ROOT, Cluster
from tests.e2e.lora_reference import greedy_tokens

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Not in the adapter's training set, and both models answer it at length: all 16 tokens are compared, none of them
# the end token (a stream's last event carries no logprob for it).
SUM = [{"role": "user", "content": "What is 7 times 8?"}]
TOKENS = 16


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """The first tokens ``transformers`` + ``peft`` generate greedily, with and without the adapter, for the prompt
    the served chat template makes."""
    from deployments.config import ModelConfig

    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    model = ModelConfig.model_validate(document["applications"][0]["args"]["models"][0])
    template = model.engine_args["chat_template"]
    base = Path(model.resolved_source)
    adapter = Path(model.adapter_source(PIRATE_ADAPTER))
    return {PIRATE_ADAPTER: greedy_tokens(base, adapter, SUM, template, TOKENS),
            DEFAULT_MODEL: greedy_tokens(base, None, SUM, template, TOKENS)}


def served_tokens(client: openai.OpenAI, model: str, stream: bool) -> tuple[list[int], str]:
    """The token ids and text a greedy chat completion of :data:`TOKENS` tokens made (vLLM's logprobs name ids)."""
    request = {"model": model, "messages": SUM, "temperature": 0, "max_tokens": TOKENS, "logprobs": True,
               "extra_body": {"return_tokens_as_token_ids": True}}
    if not stream:
        reply = client.chat.completions.create(**request)
        assert reply.model == model
        choice = reply.choices[0]
        return [int(t.token.removeprefix("token_id:")) for t in choice.logprobs.content], choice.message.content
    ids, text = [], ""
    for chunk in client.chat.completions.create(**request, stream=True):
        assert chunk.model == model
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += [int(t.token.removeprefix("token_id:")) for t in (choice.logprobs.content if choice.logprobs
                                                                     else None) or ()]
    return ids, text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_adapter_answers_as_transformers_and_peft_do(cluster: Cluster, reference, stream: bool) -> None:
    client = cluster.client()
    ids, text = served_tokens(client, PIRATE_ADAPTER, stream)
    assert len(ids) == TOKENS and ids == reference[PIRATE_ADAPTER]
    assert text.startswith("Ahoy!"), text  # what the adapter was trained to say (deployments/dev/local_models.py)
    base_ids, base_text = served_tokens(client, DEFAULT_MODEL, stream)
    assert base_ids == reference[DEFAULT_MODEL] != ids
    assert not base_text.startswith("Ahoy"), base_text


def test_adapters_are_listed_with_their_base_and_unknown_ones_are_404(cluster: Cluster) -> None:
    client = cluster.client()
    card = client.models.retrieve(PIRATE_ADAPTER)
    assert card.id == PIRATE_ADAPTER and card.parent == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="smollm2-parrot", messages=QUESTION, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


def completion_tokens_counted(cluster: Cluster, model: str) -> float:
    import httpx

    scrape = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=30).text
    series = r'^ray_rayroute_completion_tokens_total\{[^}]*\bmodel="' + re.escape(model) + r'"[^}]*\} (\S+)$'
    pattern = re.compile(series, re.MULTILINE)
    return sum(float(value) for value in pattern.findall(scrape))


def test_adapters_land_on_the_replica_holding_them(cluster: Cluster) -> None:
    """Two replicas with room for one adapter each: once each holds one, requests for both at once all go to the
    replica holding theirs, which the replicas' load counts show (a request on the other replica would have made it
    load the adapter, evicting its own)."""
    client = cluster.client()
    first, second = PAIR_ADAPTERS

    def ask(name: str) -> tuple[str, str, int]:
        reply = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=8)
        return reply.model, reply.choices[0].message.content, reply.usage.completion_tokens

    ask(first)
    time.sleep(2)  # the replica reports what it holds (every 0.1 s) and the routers hear of it from Serve
    ask(second)
    placed = cluster.replica_infos(PAIR_MODEL, 2)
    assert sorted(tuple(info["adapters"]) for info in placed.values()) == [(first,), (second,)]
    assert [info["adapter_loads"] for info in placed.values()] == [1, 1]
    counted_before = completion_tokens_counted(cluster, second)

    names = [first, second] * 6
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(ask, names))
    assert [model for model, _, _ in replies] == names
    assert all(text.startswith("Ahoy!") for _, text, _ in replies), replies
    after = cluster.replica_infos(PAIR_MODEL, 2)
    assert {pid: (info["adapters"], info["adapter_loads"]) for pid, info in after.items()} == {
        pid: (info["adapters"], 1) for pid, info in placed.items()}

    # Counted in the token metrics under the adapter's own name.
    sent = sum(tokens for model, _, tokens in replies if model == second)
    deadline = time.monotonic() + 20
    while completion_tokens_counted(cluster, second) < counted_before + sent:
        assert time.monotonic() < deadline, "the adapter's tokens were not counted under its name"
        time.sleep(1)
