"""The config schema: the shipped YAML validates, and every kind of mistake is named precisely."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from deployments.config import ConfigError, ServeArgs, check_engine_args, load_serve_config, parse_args
from deployments.dev.local_models import MODELS_DIR

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"models": [{"id": "m1", "source": "org/model"}]}


def with_model(**fields) -> dict:
    args = copy.deepcopy(GOOD)
    args["models"][0].update(fields)
    return args


def error_of(args: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_args(args)
    return str(caught.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    document, args = load_serve_config(path)
    assert document["applications"][0]["import_path"] == "router.app:build_app"
    for model in args.models:
        check_engine_args(model)


def test_local_default_is_smollm_on_cpu() -> None:
    document, args = load_serve_config(ROOT / "configs" / "local.yaml")
    model, embedder = args.models
    assert model.id == "smollm2-135m-instruct" and embedder.id == "all-minilm-l6-v2"
    assert embedder.local_source() == MODELS_DIR / embedder.id
    assert model.resources.accelerator == "cpu"
    assert document["http_options"]["host"] == "127.0.0.1"
    assert model.local_source() == MODELS_DIR / model.id  # where `make model` builds it


def test_defaults() -> None:
    model = parse_args(GOOD).models[0]
    assert model.names == ["m1"]
    assert model.local_source() is None and model.resolved_source == "org/model"
    assert model.autoscaling.min_replicas == 1


def test_scaling_limits_and_timeouts_defaults() -> None:
    config = parse_args(GOOD)
    model = config.models[0]
    assert (model.autoscaling.policy, model.autoscaling.target_ongoing_requests) == ("requests", 16)
    assert (model.max_ongoing_requests, model.max_queued_requests, model.drain_timeout_s) == (64, 256, 300)
    assert (model.timeouts.queue_s, model.timeouts.first_token_s, model.timeouts.total_s) == (300, 120, 900)
    assert (config.routers.replicas, config.routers.max_ongoing_requests) == (1, 4096)


@pytest.mark.parametrize(("fields", "message"), [
    ({"autoscaling": {"policy": "ttft"}}, "models[0 m1].autoscaling.policy: Input should be 'requests' or"),
    ({"autoscaling": {"target_kv_cache_usage": 1.5}}, "models[0 m1].autoscaling.target_kv_cache_usage: Input"),
    ({"timeouts": {"queue_s": 0}}, "models[0 m1].timeouts.queue_s: Input should be greater than 0"),
    ({"timeouts": {"ttft_s": 5}}, "models[0 m1].timeouts.ttft_s: unknown field"),
    ({"max_queued_requests": -1}, "models[0 m1].max_queued_requests: Input should be greater than or equal to 0"),
])
def test_bad_scaling_settings_are_named(fields: dict, message: str) -> None:
    assert message in error_of(with_model(**fields))


def test_router_replicas_must_be_positive() -> None:
    assert "routers.replicas: Input should be greater than or equal to 1" in error_of({**GOOD, "routers": {
        "replicas": 0}})


def test_unknown_key_is_named() -> None:
    message = error_of(with_model(resources={"accelerator": "cpu", "num_gpu": 1}))
    assert "models[0 m1].resources.num_gpu: unknown field" in message


def test_unknown_top_level_key() -> None:
    assert "modles: unknown field" in error_of({**GOOD, "modles": []})


def test_wrong_type_is_named() -> None:
    message = error_of(with_model(resources={"tensor_parallel_size": "two"}))
    assert "models[0 m1].resources.tensor_parallel_size" in message


def test_missing_source_is_named() -> None:
    assert "models[0 m1].source: Field required" in error_of({"models": [{"id": "m1"}]})


def test_no_models() -> None:
    assert "models" in error_of({"models": []})


@pytest.mark.parametrize("bad_id", ["has space", "", "-leading", "new\nline"])
def test_model_id_shape(bad_id: str) -> None:
    assert f"].id: {bad_id!r} is not a valid model name" in error_of(with_model(id=bad_id))


@pytest.mark.parametrize("good_id", ["Qwen/Qwen2.5-7B-Instruct", "gemma3:27b", "a", "org/m@v1+x"])
def test_model_ids_with_slashes_and_colons(good_id: str) -> None:
    assert parse_args(with_model(id=good_id)).models[0].id == good_id


def test_duplicate_names_across_models() -> None:
    args = {"models": [{"id": "a", "source": "x/y", "aliases": ["gpt-4o-mini"]},
                       {"id": "gpt-4o-mini", "source": "x/z"}]}
    assert "'gpt-4o-mini' is used by both 'a' and 'gpt-4o-mini'" in error_of(args)


def test_adapters_are_models_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS", "/data/adapters")
    args = with_model(adapters={"m1-pirate": "$ADAPTERS/pirate", "m1-sql": "org/sql-lora"},
                      max_adapters_per_replica=2, fallbacks=["m2"])
    args["models"].append({"id": "m2", "source": "org/m2"})
    model = parse_args(args).models[0]
    assert model.names == ["m1"]  # an adapter is not another name of its base
    assert (model.adapter_source("m1-pirate"), model.adapter_source("m1-sql")) == ("/data/adapters/pirate",
                                                                                 "org/sql-lora")
    single = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    assert model.engine_overrides() == {**single, "enable_lora": True, "max_loras": 2}
    assert parse_args(GOOD).models[0].engine_overrides() == single  # no LoRA, no LoRA layers
    adapter = model.as_adapter("m1-pirate")
    assert (adapter.id, adapter.aliases, adapter.adapters, adapter.timeouts) == ("m1-pirate", [], {}, model.timeouts)
    assert adapter.fallbacks == []  # another model would answer without the adapter


def test_adapter_names_are_checked_like_model_names() -> None:
    args = {"models": [{"id": "a", "source": "x/y", "adapters": {"b-lora": "x/l"}},
                       {"id": "b", "source": "x/z", "aliases": ["b-lora"]}]}
    assert "'b-lora' is used by both 'a' and 'b'" in error_of(args)
    assert "not a valid model name" in error_of(with_model(adapters={"has space": "x/l"}))
    assert "max_adapters_per_replica" in error_of(with_model(max_adapters_per_replica=0))
    # A fallback may be an adapter: it is a model name like any other.
    parse_args({"models": [{"id": "a", "source": "x/y", "adapters": {"a-lora": "x/l"}},
                           {"id": "b", "source": "x/z", "fallbacks": ["a-lora"]}]})


def test_min_above_max_replicas() -> None:
    assert "min_replicas (3) exceeds max_replicas (2)" in error_of(
        with_model(autoscaling={"min_replicas": 3, "max_replicas": 2}))


@pytest.mark.parametrize(("key", "field"), [("model", "source"), ("served_model_name", "id/aliases"),
                                            ("tensor_parallel_size", "resources"),
                                            ("pipeline_parallel_size", "resources"),
                                            ("distributed_executor_backend", "resources"), ("enable_lora", "adapters"),
                                            ("max_loras", "max_adapters_per_replica")])
def test_engine_args_owned_elsewhere(key: str, field: str) -> None:
    assert f"`{key}` is set by the model's `{field}` field" in error_of(with_model(engine_args={key: 1}))


def test_unknown_engine_arg() -> None:
    model = parse_args(with_model(engine_args={"max_model_length": 10, "dtype": "float32"})).models[0]
    with pytest.raises(ConfigError, match="unknown vLLM argument.*max_model_length"):
        check_engine_args(model)


def test_frontend_args_are_engine_args_too() -> None:
    check_engine_args(parse_args(with_model(engine_args={"tool_call_parser": "hermes",
                                                         "enable_auto_tool_choice": True})).models[0])


def test_cpu_placement() -> None:
    resources = parse_args(with_model(resources={"accelerator": "cpu", "cpus": 2})).models[0].resources
    assert resources.placement_group_bundles() == [{"CPU": 2.0}]
    assert resources.replica_actor_resources() == {"num_cpus": 2.0, "num_gpus": 0}
    assert resources.engine_env() == {"RAYROUTE_VLLM_PLATFORM": "cpu"}
    assert resources.engine_overrides() == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    assert resources.placement_strategy() == "STRICT_PACK"


def test_cpu_workers_take_a_cpu_and_a_logical_gpu_each() -> None:
    """On the CPU a worker's place is a logical GPU, the key vLLM's Ray executor places workers by."""
    resources = parse_args(with_model(resources={"accelerator": "cpu", "cpus": 1, "tensor_parallel_size": 2,
                                                 "accelerator_type": "stage"})).models[0].resources
    worker = {"CPU": 1.0, "GPU": 1.0, "accelerator_type:stage": 0.001}
    assert resources.placement_group_bundles() == [{"CPU": 1.0}, worker, worker]
    assert resources.replica_actor_resources() == {"num_cpus": 1.0, "num_gpus": 0}
    assert resources.engine_overrides() == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                                            "distributed_executor_backend": "ray"}


def test_pipeline_stages_may_span_nodes() -> None:
    resources = parse_args(with_model(resources={"accelerator": "gpu", "tensor_parallel_size": 4,
                                                 "pipeline_parallel_size": 2})).models[0].resources
    assert resources.workers == 8
    assert resources.placement_group_bundles() == [{"CPU": 1.0}] + [{"GPU": 1.0}] * 8
    assert resources.placement_strategy() == "PACK"
    assert resources.engine_overrides() == {"tensor_parallel_size": 4, "pipeline_parallel_size": 2,
                                            "distributed_executor_backend": "ray"}


@pytest.mark.parametrize(("resources", "message"), [
    ({"tensor_parallel_size": 3}, "tensor_parallel_size 3 does not divide the model's 2 attention heads"),
    ({"pipeline_parallel_size": 3}, "pipeline_parallel_size 3 does not divide the model's 4 layers"),
])
def test_parallel_sizes_must_split_a_local_model_evenly(tmp_path: Path, resources: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_hidden_layers": 4}))
    model = parse_args(with_model(source=str(tmp_path), resources={"accelerator": "gpu", **resources})).models[0]
    with pytest.raises(ConfigError, match=re.escape(f"models[m1].resources: {message}")):
        check_engine_args(model)
    fits = with_model(source=str(tmp_path), resources={"tensor_parallel_size": 2, "pipeline_parallel_size": 4})
    check_engine_args(parse_args(fits).models[0])
    # A multimodal model's text sizes are under text_config.
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_attention_heads": 3}}))
    with pytest.raises(ConfigError, match="does not divide the model's 3 attention heads"):
        check_engine_args(parse_args(fits).models[0])


def test_cpu_pipeline_stages_need_compiled_execution() -> None:
    model = parse_args(with_model(resources={"accelerator": "cpu", "pipeline_parallel_size": 2},
                                  engine_args={"enforce_eager": True})).models[0]
    with pytest.raises(ConfigError, match="remove enforce_eager"):
        check_engine_args(model)


def test_gpu_tensor_parallel_placement() -> None:
    resources = parse_args(with_model(resources={"accelerator": "gpu", "tensor_parallel_size": 2,
                                                 "accelerator_type": "L4"})).models[0].resources
    assert resources.placement_group_bundles() == [
        {"CPU": 1.0}, {"GPU": 1.0, "accelerator_type:L4": 0.001}, {"GPU": 1.0, "accelerator_type:L4": 0.001}]
    assert resources.replica_actor_resources() == {"num_cpus": 1.0, "num_gpus": 0}
    assert resources.engine_overrides() == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                                            "distributed_executor_backend": "ray"}
    assert resources.engine_env() == {}
    assert resources.placement_strategy() == "STRICT_PACK"


def test_single_gpu_replica_holds_its_gpu() -> None:
    resources = parse_args(with_model(resources={"accelerator": "gpu"})).models[0].resources
    assert resources.placement_group_bundles() == [{"CPU": 1.0, "GPU": 1.0}]
    assert resources.replica_actor_resources() == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_source_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELS", "/data/models")
    model = parse_args(with_model(source="$MODELS/llama")).models[0]
    assert model.local_source() == Path("/data/models/llama")


def test_load_serve_config_without_applications(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"http_options": {}}))
    with pytest.raises(ConfigError, match="applications"):
        load_serve_config(path)


def test_args_round_trip_through_json() -> None:
    """The router receives the args as JSON; they must validate to the same thing."""
    args = parse_args(with_model(aliases=["x"], engine_args={"dtype": "float32"}))
    assert ServeArgs.model_validate(args.model_dump(mode="json")) == args


def test_deployment_names_are_safe_and_distinct() -> None:
    args = parse_args({"models": [{"id": "Qwen/Qwen2.5-7B-Instruct", "source": "Qwen/Qwen2.5-7B-Instruct"},
                                  {"id": "gemma3:27b", "source": "google/gemma-3-27b-it"}]})
    assert [m.deployment_name for m in args.models] == ["engine-Qwen_Qwen2.5-7B-Instruct", "engine-gemma3_27b"]
    clash = {"models": [{"id": "a/b", "source": "x/y"}, {"id": "a:b", "source": "x/y"}]}
    assert "differ only in characters a deployment name cannot hold" in error_of(clash)


def run_launcher(tmp_path: Path, args: dict):
    import subprocess
    import sys

    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"import_path": "router.app:build_app", "args": args}]}))
    return subprocess.run([sys.executable, "-m", "router.launch", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_launcher_rejects_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    result = run_launcher(tmp_path, with_model(autoscaling={"max_replicas": "many"}))
    assert result.returncode == 2
    assert "models[0 m1].autoscaling.max_replicas" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout


def test_launcher_names_a_missing_model_folder(tmp_path: Path) -> None:
    result = run_launcher(tmp_path, with_model(source=str(tmp_path / "nowhere")))
    assert result.returncode == 2
    assert f"models[m1].source: no model folder at {tmp_path / 'nowhere'}" in result.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    result = run_launcher(tmp_path, with_model(source=str(tmp_path / "model"),
                                               adapters={"m1-x": str(tmp_path / "no-adapter")}))
    assert result.returncode == 2
    assert f"models[m1].adapters.m1-x: no adapter folder at {tmp_path / 'no-adapter'}" in result.stderr


def test_free_ports_are_never_ones_the_os_hands_out_meanwhile() -> None:
    """A port chosen for a server that starts later (HAProxy's pages, a scenario's HTTP port) lies below the OS's
    ephemeral range, from which a starting cluster's other processes take theirs (a clash failed a CI run)."""
    from router.ports import _ephemeral_ports_from, free_port

    assert all(20000 <= free_port() < _ephemeral_ports_from() for _ in range(50))


def test_stopping_kills_what_outlives_the_wait_and_counts_zombies_as_gone() -> None:
    """router/processes.py, which the launcher's stop and the tests' check share."""
    import subprocess

    from router import processes

    exited = subprocess.Popen(["true"])
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = [p for p in processes.descendants() if p.pid in (exited.pid, sleeper.pid)]
        assert len(started) == 2
        # `true` ends as a zombie (not waited for yet): gone; `sleep` outlives the wait and is killed.
        assert processes.reap(started, timeout=1) == [p for p in started if p.pid == sleeper.pid]
        assert sleeper.wait(timeout=10) == -9
        assert processes.still_running(started, timeout=0) == []
    finally:
        sleeper.kill()
        exited.wait()
        sleeper.wait()


def test_routers_can_be_pinned_to_a_node_by_a_custom_resource() -> None:
    from router.app import router_deployment
    from router.launch import router_resources

    args = parse_args({**GOOD, "routers": {"replicas": 2, "ray_resources": {"rayroute_router": 1}}})
    assert router_deployment(args).ray_actor_options["resources"] == {"rayroute_router": 1}
    assert router_resources(args) == {"rayroute_router": 3}  # two routers and the key-limits replica
    assert "`GPU` is not a custom resource" in error_of({**GOOD, "routers": {"ray_resources": {"GPU": 1}}})
    assert "must be a positive amount" in error_of({**GOOD, "routers": {"ray_resources": {"x": 0}}})


def test_the_local_node_declares_a_place_for_every_cpu_worker() -> None:
    from router.launch import cpu_worker_places, logical_cpus

    args = parse_args({"models": [
        {"id": "one", "source": "x/y", "resources": {"accelerator": "cpu", "cpus": 2}},
        {"id": "tp2", "source": "x/y", "resources": {"accelerator": "cpu", "tensor_parallel_size": 2},
         "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
        {"id": "gpu", "source": "x/y", "resources": {"accelerator": "gpu", "tensor_parallel_size": 4}}]})
    assert cpu_worker_places(args) == 4  # tp2's two workers at its two replicas; GPU models use real GPUs
    assert logical_cpus(args) >= 1 + 2 + 3 * 2 + 1  # a router, one, tp2's replica and workers twice, gpu's replica
    assert cpu_worker_places(parse_args(GOOD)) == 0


# --- one Serve application per model (router/app.py) -------------------------------------------------------------

def _code_versions(document: dict) -> dict[str, str]:
    """Serve's code version of each application the document deploys: a new one replaces all its replicas."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    from router.app import serve_deploy_config

    return {app["name"]: get_app_code_version(ServeApplicationSchema.model_validate(app))
            for app in serve_deploy_config(document)["applications"]}


@pytest.mark.parametrize("change", ["engine_args", "resources", "source", "autoscaling policy"])
def test_changing_one_models_entry_gives_only_its_application_a_new_code_version(change: str) -> None:
    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    before = _code_versions(document)
    model = document["applications"][0]["args"]["models"][0]
    field, value = {"engine_args": ("engine_args", {**model["engine_args"], "max_num_seqs": 8}),
                    "resources": ("resources", {**model["resources"], "cpus": 1}),
                    "source": ("source", "/elsewhere/smollm2"),
                    # Serve hashes a deployment's autoscaling policy (its function and kwargs) into the version.
                    "autoscaling policy": ("autoscaling", {**model.get("autoscaling", {}), "policy": "engine_load"}),
                    }[change]
    model[field] = value
    after = _code_versions(document)
    assert set(before) == set(after) == {"engine-smollm2-135m-instruct", "engine-all-minilm-l6-v2", "rayroute"}
    assert [name for name in before if before[name] != after[name]] == ["engine-smollm2-135m-instruct"]


@pytest.mark.parametrize("change", [{"autoscaling": {"min_replicas": 0, "max_replicas": 3, "downscale_delay_s": 60}},
                                    {"max_ongoing_requests": 8, "max_queued_requests": 16}])
def test_scaling_and_request_limits_change_no_code_version_only_that_models_overrides(change: dict) -> None:
    """Serve applies these to the running replicas (deployments/app.py): no replica is replaced."""
    from router.app import serve_deploy_config

    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    before, apps_before = _code_versions(document), serve_deploy_config(document)["applications"]
    document["applications"][0]["args"]["models"][0].update(change)
    after, apps_after = _code_versions(document), serve_deploy_config(document)["applications"]
    assert before == after
    changed = [a["name"] for a, b in zip(apps_before, apps_after, strict=True) if a != b]
    assert changed == ["engine-smollm2-135m-instruct"]
    overrides = apps_after[0]["deployments"]
    assert [o["name"] for o in overrides] == ["engine-smollm2-135m-instruct"]
    if "autoscaling" in change:
        assert {k: overrides[0]["autoscaling_config"][k] for k in change["autoscaling"]} == change["autoscaling"]
    else:
        assert {k: overrides[0][k] for k in change} == change


def test_a_routed_field_changes_the_router_application_and_that_model_only() -> None:
    document = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    before = _code_versions(document)
    document["applications"][0]["args"]["models"][1]["aliases"] = ["text-embedding-3-small"]
    after = _code_versions(document)
    assert sorted(name for name in before if before[name] != after[name]) == ["engine-all-minilm-l6-v2", "rayroute"]


def test_the_expansion_holds_each_part_once_and_reads_back_as_the_same_config(tmp_path: Path) -> None:
    from router.app import main, serve_deploy_config

    document, args = load_serve_config(ROOT / "configs" / "local.yaml")
    expanded = serve_deploy_config(document)
    *engines, router = expanded["applications"]
    assert [app["name"] for app in engines] == [model.app_name for model in args.models]
    assert all(app["route_prefix"] is None and app["import_path"] == "deployments.app:build_engine_app"
               for app in engines)
    assert (router["name"], router["route_prefix"], router["import_path"]) == \
        ("rayroute", "/", "router.app:build_router_app")
    assert "engine_args" not in router["args"]["models"][0] and "source" not in router["args"]["models"][0]
    assert expanded["http_options"] == document["http_options"]
    # The expanded file (what `python -m router.app` prints) is a config of its own: the same one, and expanding
    # it again changes nothing.
    path = tmp_path / "expanded.yaml"
    path.write_text(yaml.safe_dump(expanded))
    assert load_serve_config(path)[1] == args
    assert serve_deploy_config(expanded) == expanded
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(ROOT / "configs" / "local.yaml")]) == 0
    assert yaml.safe_load(out.getvalue()) == expanded


def test_an_expanded_model_reads_back_with_its_scaling_policy_and_limits(tmp_path: Path) -> None:
    from router.app import serve_deploy_config

    args = with_model(max_ongoing_requests=7, max_queued_requests=0,
                      autoscaling={"policy": "engine_load", "min_replicas": 0, "max_replicas": 5,
                                   "target_kv_cache_usage": 0.5, "look_back_period_s": 12})
    document = {"applications": [{"name": "rayroute", "import_path": "router.app:build_app", "args": args}]}
    engine, router = serve_deploy_config(document)["applications"]
    assert "autoscaling" not in engine["args"]["model"] and "max_ongoing_requests" not in engine["args"]["model"]
    assert engine["deployments"][0]["autoscaling_config"]["policy"] == {
        "policy_function": "deployments.autoscaling:EngineLoadPolicy",
        "policy_kwargs": {"target_ongoing_requests": 16, "target_kv_cache_usage": 0.5}}
    path = tmp_path / "expanded.yaml"
    path.write_text(yaml.safe_dump({"applications": [engine, router]}))
    assert load_serve_config(path)[1] == parse_args(args)


def test_replica_options_belong_in_the_model_entries() -> None:
    from router.app import serve_applications

    app = {"name": "rayroute", "import_path": "router.app:build_app", "args": GOOD,
           "deployments": [{"name": "engine-m1", "num_replicas": 2}]}
    with pytest.raises(ConfigError, match="in the model entries"):
        serve_applications(app)
