"""What the replica hands vLLM per request (deployments/vllm_hooks.py): the counting engine and the model-name view,
each the request's own, and the token counts they keep; the engine's progress, as autoscaling and the health check
read it; and the media settings set before vLLM starts.

Driven with stand-ins for vLLM's engine and serving objects, plus checks on the installed vLLM that the stand-ins
behave as its serving layer does (it reaches the engine and the model names only through the attributes the
per-request copy replaces, and keeps no per-request state on itself).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.autoscaling import KV_CACHE, RUNNING, WAITING
from deployments.config import ModelConfig
from deployments.constants import STALL_TIMEOUT_S
from deployments.vllm_hooks import (
    CountingEngine,
    EngineProgress,
    RequestModels,
    TokenCount,
    for_request,
    ray_metrics,
    ray_workers,
)


def output(prompt: int, *deltas: int, encoder: int | None = None) -> SimpleNamespace:
    """A vLLM RequestOutput as a stream sees it: per choice, the tokens made since the last output."""
    return SimpleNamespace(prompt_token_ids=list(range(prompt)),
                           encoder_prompt_token_ids=None if encoder is None else list(range(encoder)),
                           outputs=[SimpleNamespace(token_ids=list(range(n))) for n in deltas])


class Engine:
    """vLLM's AsyncLLM as the serving layer uses it: ``generate`` yields deltas, with a pause between them."""

    errored = False

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def generate(self, prompt: Any, params: Any, request_id: str, **_: Any):
        try:
            for tokens in (1, 2, 3):
                await asyncio.sleep(0)  # another request's stream runs here
                yield output(5, tokens)
        finally:
            self.closed.append(request_id)


class Models:
    """vLLM's OpenAIServingModels: responses are named after the first served name, an adapter after itself."""

    lora_requests: dict[str, Any] = {}

    def model_name(self, lora_request: Any = None) -> str:
        return lora_request.lora_name if lora_request is not None else "canonical"


class Serving:
    """One of vLLM's serving objects, reduced to how it reaches the engine and names its response."""

    def __init__(self, engine: Engine, models: Models) -> None:
        self.engine_client = engine
        self.models = models
        self.store: dict[str, str] = {}  # per-request results kept on shared state, as the Responses API does

    async def create(self, request_id: str, lora_request: Any = None) -> tuple[str, list[Any]]:
        name = self.models.model_name(lora_request)
        self.store[request_id] = name
        return name, [out async for out in self.engine_client.generate("prompt", None, request_id)]


def test_a_stream_counts_its_own_tokens_while_others_run() -> None:
    engine, models = Engine(), Models()
    serving = Serving(engine, models)
    first, second = TokenCount(), TokenCount()

    async def both() -> list[tuple[str, list[Any]]]:
        return await asyncio.gather(for_request(serving, "alias-a", first).create("a"),
                                    for_request(serving, "alias-b", second).create("b"))

    (name_a, _), (name_b, _) = asyncio.run(both())
    assert (name_a, name_b) == ("alias-a", "alias-b")
    assert (first.prompt, first.completion) == (5, 6) and (second.prompt, second.completion) == (5, 6)
    assert len(first.sources) == len(second.sources) == 1  # vLLM's generators, for the stream to close
    assert serving.store == {"a": "alias-a", "b": "alias-b"}  # the copies share the serving object's state
    # The shared objects are untouched: the next request without hooks gets vLLM's own answer.
    assert serving.engine_client is engine and serving.models is models
    assert asyncio.run(serving.create("c"))[0] == "canonical"


def test_without_a_count_nothing_is_counted_or_wrapped() -> None:
    engine = Engine()
    view = for_request(Serving(engine, Models()), "alias", None)
    assert view.engine_client is engine
    assert asyncio.run(view.create("x"))[0] == "alias"


def test_an_adapter_keeps_its_name_and_no_name_means_vllms() -> None:
    models = Models()
    adapter = SimpleNamespace(lora_name="pirate")
    assert RequestModels(models, "alias").model_name(adapter) == "pirate"
    assert RequestModels(models, None).model_name() == "canonical"
    assert RequestModels(models, "alias").lora_requests is models.lora_requests  # the rest is vLLM's object


def test_counting_engine_is_the_engine_but_for_generate() -> None:
    engine = Engine()
    count = TokenCount()
    counting = CountingEngine(engine, count)
    assert counting.errored is False and counting.closed is engine.closed

    async def read_one_and_close() -> None:
        stream = counting.generate("prompt", None, "r1")
        await anext(stream)
        for source in count.sources:  # as the replica closes a stream's sources when it ends
            await source.aclose()
        await stream.aclose()

    asyncio.run(read_one_and_close())
    assert (count.prompt, count.completion) == (5, 1)
    assert engine.closed == ["r1"]  # closing vLLM's generator is what aborts the engine request


def test_a_serving_object_without_models_names_its_own_responses() -> None:
    """The load test's serving objects (tests/fake_engine.py) name responses after the request themselves."""
    serving = SimpleNamespace(engine_client=Engine())
    view = for_request(serving, "alias", TokenCount())
    assert not hasattr(view, "models") and isinstance(view.engine_client, CountingEngine)


def test_ray_metrics_is_the_engines_ray_stat_logger() -> None:
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    ray_logger = RayPrometheusStatLogger.__new__(RayPrometheusStatLogger)
    engine = SimpleNamespace(logger_manager=SimpleNamespace(stat_loggers=[object(), ray_logger]))
    assert ray_metrics(engine) is ray_logger
    assert ray_metrics(SimpleNamespace(logger_manager=None)) is None  # vLLM keeps no stats
    assert ray_metrics(SimpleNamespace()) is None  # not vLLM's engine


def test_token_count_sums_every_choices_deltas() -> None:
    count = TokenCount()
    for out in (output(12, 1), output(12, 3), output(12, 0)):  # a merged output carries three tokens
        count.add(out)
    assert (count.prompt, count.completion) == (12, 4)
    several = TokenCount()
    several.add(output(5, 1, 1, 2))
    assert (several.prompt, several.completion) == (5, 4)


def test_token_count_includes_an_encoders_prompt() -> None:
    count = TokenCount()
    count.add(output(4, 1, encoder=6))
    assert count.prompt == 10


# --- the engine's progress: its load for autoscaling, a stall for its health check ----------------------------------

def test_engine_progress_reports_load_only_while_busy_and_notices_a_stall() -> None:
    progress = EngineProgress()
    progress.record(SimpleNamespace(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.4), None)
    assert progress.load(unfinished_requests=4) == {RUNNING: 3.0, WAITING: 1.0, KV_CACHE: 0.4}
    assert progress.load(unfinished_requests=0) == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}
    start = progress.last_progress
    assert not progress.stalled(unfinished_requests=2, now=start + STALL_TIMEOUT_S - 1)
    assert progress.stalled(unfinished_requests=2, now=start + STALL_TIMEOUT_S + 1)
    progress.record(None, SimpleNamespace())  # a step made output
    assert not progress.stalled(unfinished_requests=2)
    # A long idle spell is not a stall: the clock starts when work arrives after it.
    idle_seen = start + 10 * STALL_TIMEOUT_S
    assert not progress.stalled(unfinished_requests=0, now=idle_seen)
    assert not progress.stalled(unfinished_requests=3, now=idle_seen + 5)
    assert progress.stalled(unfinished_requests=3, now=idle_seen + STALL_TIMEOUT_S + 1)


# --- what vLLM is started with --------------------------------------------------------------------------------------

VISION = {"id": "m1", "source": "org/model", "multimodal": True,
          "allowed_media_domains": ["images.example.com", "cdn.example.org"]}


def test_the_engine_sets_the_media_environment_before_vllm_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """deployments/engine.py applies media_env() first thing in _start_vllm, before vLLM builds anything (stopped
    here at the engine arguments), whatever the process had."""
    import os

    from deployments.engine import VLLMEngine

    class Stop(Exception):
        pass

    def stop(self: ModelConfig) -> dict:
        raise Stop

    monkeypatch.setenv("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1")  # and restored after the test
    monkeypatch.setattr(ModelConfig, "engine_overrides", stop)
    replica = VLLMEngine.__new__(VLLMEngine)
    replica.kv_feed = None
    with pytest.raises(Stop):
        asyncio.run(replica._start_vllm(ModelConfig.model_validate(VISION)))
    assert os.environ["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"


# --- the installed vLLM is what the stand-ins above assume --------------------------------------------------------

# The serving objects of the four endpoints (deployments.endpoints), imported by the tests: vLLM loads torch.
SERVING_CLASSES = ["vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat",
                   "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion",
                   "vllm.entrypoints.openai.responses.serving:OpenAIServingResponses",
                   "vllm.entrypoints.pooling.embed.serving:ServingEmbedding"]


def _vllm_classes(dotted: str) -> list[type]:
    """The class and the bases of it that are vLLM's."""
    import importlib

    module, _, name = dotted.partition(":")
    return [cls for cls in getattr(importlib.import_module(module), name).__mro__ if cls.__module__.startswith("vllm")]


def _self_assignments(cls: type) -> list[str]:
    """``self.x = ...`` in any method of ``cls`` but ``__init__``."""
    found = []
    for function in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(cls)))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or function.name == "__init__":
            continue
        for node in ast.walk(function):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            found += [f"{cls.__qualname__}.{function.name}: self.{target.attr}" for target in targets
                      if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                      and target.value.id == "self"]
    return found


@pytest.mark.parametrize("serving_class", SERVING_CLASSES, ids=lambda dotted: dotted.partition(":")[2])
def test_vllms_serving_objects_keep_no_per_request_state_on_themselves(serving_class: str) -> None:
    """A per-request copy (for_request) shares everything else with the serving object; an attribute set while
    serving would be set on the copy only, and lost."""
    assert not [found for cls in _vllm_classes(serving_class) for found in _self_assignments(cls)]


@pytest.mark.parametrize("serving_class", SERVING_CLASSES, ids=lambda dotted: dotted.partition(":")[2])
def test_vllm_names_responses_and_generates_through_the_replaced_attributes(serving_class: str) -> None:
    source = "".join(inspect.getsource(cls) for cls in _vllm_classes(serving_class))
    assert "self.models.model_name(lora_request)" in source
    if not serving_class.endswith(":ServingEmbedding"):  # embeddings do not stream, and are not counted
        assert "self.engine_client.generate(" in source


def test_ray_workers_are_the_live_actors_vllm_named_for_this_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray._private.state

    def engine(backend: str, instance: str) -> SimpleNamespace:
        parallel = SimpleNamespace(distributed_executor_backend=backend)
        return SimpleNamespace(vllm_config=SimpleNamespace(parallel_config=parallel, instance_id=instance))

    def actor(name: str, pid: int, node: str) -> dict[str, Any]:
        return {"Name": name, "Pid": pid, "Address": {"NodeID": node}}

    asked = []

    def actors(actor_state_name: str | None = None) -> dict[str, dict]:
        asked.append(actor_state_name)
        return {"a": actor("vllm_Worker_42_TP1", 11, "n1"), "b": actor("vllm_Worker_42_TP0", 10, "n1"),
                "c": actor("vllm_Worker_421_TP0", 12, "n2"),  # another engine whose instance starts alike
                "d": actor("ServeReplica:engine-x:engine-x", 9, "n1")}

    monkeypatch.setattr(ray._private.state, "actors", actors)
    assert ray_workers(engine("ray", "42")) == [{"name": "vllm_Worker_42_TP0", "pid": 10, "node_id": "n1"},
                                                {"name": "vllm_Worker_42_TP1", "pid": 11, "node_id": "n1"}]
    assert asked == ["ALIVE"]
    assert ray_workers(engine("uni", "42")) == [] and ray_workers(object()) == []  # one worker, in the engine core


def test_the_counting_engine_passes_any_call_through_and_keeps_a_resumable_streams_tokens() -> None:
    """Whatever the serving object calls ``generate`` with reaches the engine as it was (the load test's serving
    object passes a count alone); a stream that can be resumed keeps the ids of the tokens made since its last frame
    and the characters of their text (deployments/resume.py)."""
    from deployments.vllm_hooks import CountingEngine, TokenCount

    calls = []

    class Engine:
        async def generate(self, *args, **kwargs):
            calls.append((args, kwargs))
            for ids, text in (([7], "hi"), ([8, 9], " there")):
                yield SimpleNamespace(prompt_token_ids=[1, 2, 3], encoder_prompt_token_ids=None,
                                      outputs=[SimpleNamespace(token_ids=ids, text=text)])

    async def run(count: TokenCount) -> list:
        return [output async for output in CountingEngine(Engine(), count).generate(5, priority=1)]

    traced = TokenCount(traced=True)
    assert len(asyncio.run(run(traced))) == 2
    assert calls == [((5,), {"priority": 1})]
    assert (traced.prompt, traced.completion, traced.text_chars) == (3, 3, 8)
    assert traced.take_ids() == [7, 8, 9] and traced.take_ids() == []
    untraced = TokenCount()
    asyncio.run(run(untraced))
    assert untraced.completion == 3 and untraced.take_ids() == [] and untraced.text_chars == 0
