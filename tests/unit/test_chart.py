"""The Helm chart, rendered by a real helm and checked the way a cluster and the operators would check it.

Every values file under ``helm/examples/`` and ``helm/ci/`` is a scenario: ``helm lint --strict``, ``helm template``,
then each rendered object against its schema (built-in kinds with kubernetes-validate, RayService, PodMonitor and
ServiceMonitor with the CRDs in ``../shared/crds``), and the RayService's ``serveConfigV2`` through rayroute's own
config model, Ray's ``ServeDeploySchema`` and ``AutoscalingConfig``, and ``build_app``.

helm comes from ``make helm`` (``tests/helm_binary.py``); ``RAYROUTE_HELM`` and ``RAYROUTE_CRDS`` override where.
"""

from __future__ import annotations

import ast
import base64
import copy
import dataclasses
import functools
import hashlib
import inspect
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.autoscaling import serve_autoscaling_config
from deployments.config import (
    IN_PLACE_FIELDS,
    ModelConfig,
    RoutedModel,
    RouterArgs,
    ServeArgs,
    expanded_model_entry,
    parse_args,
)
from deployments.constants import MIN_API_KEY_LENGTH
from deployments.kubernetes.chart_values import (
    ROUTER_GROUP,
    ROUTER_RESOURCE,
    ROUTER_START_SECONDS,
    ChartValues,
    WorkerGroup,
    WorkerSettings,
    values_json_schema,
)
from deployments.kubernetes.security_values import RESERVED_ENV, HAProxy
from router.auth import API_KEYS_FILE_ENV, load_api_keys
from router.haproxy import PAGES_HOST_ENV, REQUEST_TIMEOUT_ENV, REQUEST_TIMEOUT_S
from router.launch import SERVE_ENV
from tests.helm_binary import HELM_SHA256, HELM_VERSION

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
HELM = Path(os.environ.get("RAYROUTE_HELM", ROOT / ".venv" / "bin" / "helm"))
CRDS = Path(os.environ.get("RAYROUTE_CRDS", ROOT.parent / "shared" / "crds"))
SCENARIOS = sorted(CHART.glob("examples/*.yaml")) + sorted(CHART.glob("ci/*-values.yaml"))
NAMESPACE = "llm"
RELEASE = "rr"
FULLNAME = "rr-rayroute"
# The chart's kubeVersion floor, and the newest Kubernetes that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}
# No schema for it is at hand (not built in, not in ../shared/crds): test_routes_reach_the_serve_service checks it.
UNCHECKED_KINDS = {("gateway.networking.k8s.io/v1", "HTTPRoute")}


def helm(*args: str | Path) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"no helm at {HELM}: run `make helm` (or set RAYROUTE_HELM)")
    return subprocess.run([str(HELM), *map(str, args)], capture_output=True, text=True, timeout=120)


# What a cluster with Prometheus Operator offers: the chart renders its monitors only where their kinds exist.
MONITORING_APIS = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor",
                   "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")


def template(*values_files: Path, extra: dict | None = None, tmp: Path | None = None,
             chart: Path = CHART, apis: tuple[str, ...] = MONITORING_APIS,
             show: str | None = None) -> subprocess.CompletedProcess:
    args: list[str | Path] = ["template", RELEASE, chart, "--namespace", NAMESPACE, *apis]
    if show:
        args += ["--show-only", show]
    for path in values_files:
        args += ["-f", path]
    if extra is not None:
        assert tmp is not None
        override = tmp / "override.yaml"
        override.write_text(yaml.safe_dump(extra))
        args += ["-f", override]
    return helm(*args)


@functools.cache
def rendered_text(scenario: Path) -> str:
    result = template(scenario)
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def rendered(scenario: Path) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered_text(scenario)) if doc)


def only(docs, kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def of_kind(docs, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def merged_values(scenario: Path) -> dict[str, Any]:
    """The values helm renders with: the chart's defaults coalesced with the scenario (maps merge, lists replace,
    null deletes), as helm's own coalescing does."""
    return _coalesce(yaml.safe_load((CHART / "values.yaml").read_text()), yaml.safe_load(scenario.read_text()))


def _coalesce(base: Any, override: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _coalesce(out.get(key), value)
    return out


def serve_config(docs) -> dict[str, Any]:
    return yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])


def serve_args(docs) -> ServeArgs:
    """The config the serveConfigV2 was expanded from: the engine applications' models and the router's settings."""
    *engines, router = serve_config(docs)["applications"]
    return parse_args({**router["args"], "models": [expanded_model_entry(app) for app in engines]})


def cluster_spec(docs) -> dict[str, Any]:
    return only(docs, "RayService")["spec"]["rayClusterConfig"]


def pod_templates(docs) -> dict[str, dict[str, Any]]:
    spec = cluster_spec(docs)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({group["groupName"]: group["template"] for group in spec.get("workerGroupSpecs", [])})
    return pods


# --- CRD schemas as strict JSON Schema -------------------------------------------------------------------------------

def crd_json_schema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema that rejects fields the CRD does not declare.

    Kubernetes prunes (drops) unknown fields unless ``x-kubernetes-preserve-unknown-fields`` is set, so a misspelt
    field would vanish silently on a real cluster; here it is an error instead.
    """
    if isinstance(node, list):
        return [crd_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: crd_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = crd_json_schema(value)
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = CRDS / CRD_FILES[(api_version, kind)]
    if not path.exists():
        pytest.skip(f"no CRD schemas at {CRDS} (set RAYROUTE_CRDS to the folder holding {path.name})")
    crd = yaml.safe_load(path.read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(crd_json_schema(served["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


# --- the tools and the schema ----------------------------------------------------------------------------------------

def test_helm_is_the_pinned_release() -> None:
    assert helm("version", "--short").stdout.startswith(HELM_VERSION)
    assert hashlib.sha256(HELM.read_bytes()).hexdigest() == HELM_SHA256


def test_values_schema_is_generated_from_the_config_models() -> None:
    committed = json.loads((CHART / "values.schema.json").read_text())
    assert committed == values_json_schema(), "run: make chart-schema"


def test_values_yaml_states_the_models_defaults() -> None:
    """values.yaml shows every default the pydantic models have, with the same value (one source of truth)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    parsed = ChartValues.model_validate(values)
    assert values["workerDefaults"] == WorkerSettings().model_dump()
    defaults = ChartValues(serve=parsed.serve).model_dump(exclude={"serve", "workerGroups"})
    assert parsed.model_dump(exclude={"serve", "workerGroups"}) == defaults
    for key in ChartValues.model_fields:
        assert key in values, f"values.yaml does not show `{key}`"


def test_versions_agree() -> None:
    """The Ray in the image, in pyproject.toml and in the RayService; rayroute's version and the chart's appVersion."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [dep for dep in project["dependencies"] if dep.startswith("ray[")]
    ray_version = ray_pin.split("==")[1]
    dockerfile = (CHART / "image" / "Dockerfile").read_text()
    assert re.search(rf"ARG RAY_IMAGE=rayproject/ray:{re.escape(ray_version)}-py311-", dockerfile)
    assert cluster_spec(rendered(SCENARIOS[0]))["rayVersion"] == ray_version
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]
    vllm_pin = next(dep for dep in project["optional-dependencies"]["gpu"] if dep.startswith("vllm"))
    assert '".[gpu]"' in dockerfile, f"the image must install rayroute's own {vllm_pin}"
    # What the image copies exists, and its .dockerignore lets it through.
    copied = [src for line in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, re.M) for src in line.split()]
    assert set(copied) == {"pyproject.toml", "README.md", "router", "deployments"}
    ignore = (CHART / "image" / "Dockerfile.dockerignore").read_text().split()
    for source in copied:
        assert (ROOT / source).exists() and (f"!{source}" in ignore or f"!{source}/" in ignore), source


def test_package_holds_the_chart_and_nothing_else(tmp_path: Path) -> None:
    import tarfile

    result = helm("package", CHART, "-d", tmp_path)
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("rayroute-*.tgz")
    with tarfile.open(package) as tgz:
        names = {name.removeprefix("rayroute/") for name in tgz.getnames()}
    assert {"Chart.yaml", "values.yaml", "values.schema.json", "templates/NOTES.txt", "README.md",
            "dashboards/rayroute.json"} <= names
    assert not [name for name in names if name.startswith(("ci/", "examples/", "image/"))], names


# --- every scenario --------------------------------------------------------------------------------------------------

def _ids(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_lint_strict(scenario: Path) -> None:
    result = helm("lint", "--strict", CHART, "-f", scenario, "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout
    assert not [n for n, line in enumerate(rendered_text(scenario).splitlines(), 1) if line.strip() == "" and line], \
        "whitespace-only lines in the rendered output (a template is missing a trim)"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_objects_match_their_schemas(scenario: Path) -> None:
    docs = rendered(scenario)
    checked = set()
    for doc in docs:
        kind = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if kind in CRD_FILES:
            errors = crd_errors(doc)
            assert not errors, f"{where} does not match its CRD:\n" + "\n".join(errors)
        elif kind not in UNCHECKED_KINDS:
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{where} is not valid Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked.add(doc["kind"])
    assert "RayService" in checked


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_serve_config_is_what_values_say_and_deploys(scenario: Path) -> None:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_engine_app
    from router.app import IMPORT_PATH, build_router_app, serve_applications

    document = serve_config(rendered(scenario))
    ServeDeploySchema.model_validate(document)
    *engines, router = document["applications"]

    # One source of truth: each model in values reaches its engine application untouched, and the router
    # application gets its routed fields; only the routers' pin is added.
    expected = copy.deepcopy(merged_values(scenario)["serve"])
    expected.setdefault("routers", {})["ray_resources"] = {ROUTER_RESOURCE: 1}
    assert [app["args"] for app in engines] == [  # less what Serve changes in place, in the deployment's overrides
        {"model": {k: v for k, v in model.items() if k not in IN_PLACE_FIELDS}} for model in expected["models"]]
    routed = set(RoutedModel.model_fields)
    # replica_choice `auto` reaches the routers resolved, as ModelConfig resolves it.
    assert router["args"] == {**expected, "models": [
        {**{k: v for k, v in model.items() if k in routed},
         "replica_choice": ModelConfig.model_validate(model).replica_choice} for model in expected["models"]]}
    # The chart's expansion is router/app.py's (each application's args compared once validated: Python's hold
    # every default, the template only what values set).
    entry = {"name": "rayroute", "route_prefix": "/", "import_path": IMPORT_PATH, "args": expected}
    if packages := merged_values(scenario)["python"].get("packages"):
        entry["runtime_env"] = {"pip": packages}
    python = serve_applications(entry)
    assert [{k: v for k, v in app.items() if k != "args"} for app in document["applications"]] == \
        [{k: v for k, v in app.items() if k != "args"} for app in python]
    for chart_app, python_app in zip(engines, python[:-1], strict=True):
        assert ModelConfig.model_validate(chart_app["args"]["model"]) == \
            ModelConfig.model_validate(python_app["args"]["model"])
    assert RouterArgs.model_validate(router["args"]) == RouterArgs.model_validate(python[-1]["args"])

    args = serve_args(rendered(scenario))
    assert args.routers.ray_resources == {ROUTER_RESOURCE: 1}
    for model in args.models:
        AutoscalingConfig(**serve_autoscaling_config(model.autoscaling))
    for app in engines:
        build_engine_app(app["args"])  # also checks every engine argument name against vLLM's own
    build_router_app(router["args"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_values_validate_with_the_config_models(scenario: Path) -> None:
    values = merged_values(scenario)
    ChartValues.model_validate(values)
    for entry in values["workerGroups"]:
        WorkerGroup.from_values(entry, values["workerDefaults"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_every_gpu_model_fits_a_worker_group(scenario: Path) -> None:
    """Each GPU replica (one placement group) fits some group: a pipeline stage's GPUs on one pod, every stage on
    the group's pods; and the routers fit only the router pods (never the head, never a GPU pod), so Ray's
    autoscaler can always place them and GPU pods can always scale down."""
    docs = rendered(scenario)
    spec = cluster_spec(docs)
    args = serve_args(docs)
    head = spec["headGroupSpec"]["rayStartParams"]
    assert (head["num-cpus"], head["num-gpus"]) == ("0", "0") and "resources" not in head
    routers, *gpu_groups = spec["workerGroupSpecs"]
    assert routers["groupName"] == ROUTER_GROUP and routers["rayStartParams"]["num-gpus"] == "0"
    router_resources = json.loads(json.loads(routers["rayStartParams"]["resources"]))
    assert all(router_resources.get(name, 0) >= amount for name, amount in args.routers.ray_resources.items())
    groups = []
    for group in gpu_groups:
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)
        declared = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
        assert ROUTER_RESOURCE not in declared
        groups.append((gpus, declared, group["maxReplicas"]))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True
    for model in args.models:
        resources = model.resources
        if resources.accelerator != "gpu":
            assert resources.workers == 1, model.id  # CPU workers need a logical GPU no pod here declares
            continue
        bundles = resources.placement_group_bundles()
        stages = resources.pipeline_parallel_size
        stage = sum(bundle.get("GPU", 0) for bundle in bundles) / stages
        custom = {k for bundle in bundles for k in bundle if k not in ("CPU", "GPU")}
        assert any(gpus >= stage and (gpus // stage) * pods >= stages and custom <= set(declared)
                   for gpus, declared, pods in groups), model.id


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_pods_are_hardened_and_probed(scenario: Path) -> None:
    docs = rendered(scenario)
    values = merged_values(scenario)
    for name, pod in pod_templates(docs).items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        # A label that changes with every chart release would make KubeRay build a new cluster on each upgrade.
        assert set(pod["metadata"]["labels"]) >= {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
        assert not {"helm.sh/chart", "app.kubernetes.io/version"} & set(pod["metadata"]["labels"]), name
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert {"requests", "limits"} <= set(container["resources"]), name
            assert container["livenessProbe"] and container["readinessProbe"], name
            assert {"serve", "metrics"} <= {port["name"] for port in container["ports"]}, name
            env = {item["name"]: item for item in container.get("env", [])}
            # Serve runs on every pod as `make serve` runs it: HAProxy front, throughput mode.
            assert {k: env[k]["value"] for k in SERVE_ENV} == SERVE_ENV, name
            if values["modelCache"]["enabled"] and name not in ("head", ROUTER_GROUP):
                assert env["HF_HOME"]["value"] == values["modelCache"]["mountPath"]
                assert values["modelCache"]["mountPath"] in {m["mountPath"] for m in container["volumeMounts"]}
        if name != "head":
            assert spec["automountServiceAccountToken"] is False
            # Stopping, the pod drains its node first, for as long as a replacement's start and the longest drain
            # take; Kubernetes waits for that and a margin.
            longest_drain = max(m.drain_timeout_s for m in parse_args(values["serve"]).models)
            if name == ROUTER_GROUP:  # a router starts in seconds
                drain = ROUTER_START_SECONDS + longest_drain
            else:
                assert "/dev/shm" in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
                group = WorkerGroup.from_values(next(g for g in values["workerGroups"] if g["name"] == name),
                                                values["workerDefaults"])
                drain = group.replicaStartSeconds + longest_drain
            hook = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
            assert hook == ["python", "-m", "deployments.kubernetes.node_drain", "--deadline-s", str(int(drain))], name
            assert spec["terminationGracePeriodSeconds"] == int(drain) + 30, name
    pdbs = {pdb["metadata"]["name"].rsplit("-", 1)[1]: pdb["spec"] for pdb in of_kind(docs, "PodDisruptionBudget")}
    if values["podDisruptionBudget"]["enabled"]:
        # Router pods leave one at a time; GPU pods as many at once as the value says; no pod under two budgets
        # (the eviction API refuses a pod that has two).
        assert pdbs["routers"]["selector"]["matchLabels"]["ray.io/group"] == ROUTER_GROUP
        assert pdbs["routers"]["maxUnavailable"] == 1
        if values["workerGroups"]:
            assert pdbs["workers"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
            assert pdbs["workers"]["selector"]["matchExpressions"] == [
                {"key": "ray.io/group", "operator": "NotIn", "values": [ROUTER_GROUP]}]
        assert set(pdbs) == {"routers", "workers"} if values["workerGroups"] else {"routers"}
    else:
        assert not pdbs
    claims = of_kind(docs, "PersistentVolumeClaim")
    assert len(claims) == int(values["modelCache"]["enabled"] and not values["modelCache"]["existingClaim"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_keys_stay_in_secrets_and_on_the_router_pods(scenario: Path, tmp_path: Path) -> None:
    docs = rendered(scenario)
    values = merged_values(scenario)
    pods = pod_templates(docs)
    routers = pods[ROUTER_GROUP]["spec"]["containers"][0]
    router_env = {item["name"]: item for item in routers.get("env", [])}
    secrets = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "Secret")}
    plain = [key["key"] for key in values["apiKeys"]["keys"]] + [values["huggingface"]["token"]]
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not [secret for secret in plain if secret and secret in text], f"a secret is in {doc['kind']}"

    if values["apiKeys"]["existingSecret"] or values["apiKeys"]["keys"]:
        volume = next(v for v in pods[ROUTER_GROUP]["spec"]["volumes"] if v["name"] == "api-keys")
        mount = next(m for m in routers["volumeMounts"] if m["name"] == "api-keys")
        (item,) = volume["secret"]["items"]
        assert router_env[API_KEYS_FILE_ENV]["value"] == f"{mount['mountPath']}/{item['path']}"
        assert "subPath" not in mount  # the kubelet never updates a subPath mount: rotated keys would not arrive
        if values["apiKeys"]["keys"]:
            # The Secret the chart makes is a keys file the router reads.
            data = secrets[volume["secret"]["secretName"]]["data"][item["key"]]
            keys_file = tmp_path / "api-keys.yaml"
            keys_file.write_bytes(base64.b64decode(data))
            keys = load_api_keys({API_KEYS_FILE_ENV: str(keys_file)})
            assert [key.name for key in keys] == [key["name"] for key in values["apiKeys"]["keys"]]
            assert [k.key.get_secret_value() for k in keys] == [k["key"] for k in values["apiKeys"]["keys"]]
        else:
            assert volume["secret"]["secretName"] == values["apiKeys"]["existingSecret"]
    else:
        assert values["apiKeys"]["allowUnauthenticated"] and API_KEYS_FILE_ENV not in router_env
    for name, pod in pods.items():
        if name != ROUTER_GROUP:  # neither the head nor a GPU pod ever holds the keys
            (container,) = pod["spec"]["containers"]
            assert API_KEYS_FILE_ENV not in {item["name"] for item in container.get("env", [])}
            assert "api-keys" not in {v["name"] for v in pod["spec"].get("volumes", [])}

    # The Hugging Face token reaches the GPU pods alone, where engines download weights: never the head (Ray's
    # control plane) nor the router pods, which parse every client's request.
    hf_token = values["huggingface"]["existingSecret"] or values["huggingface"]["token"]
    for name, pod in pods.items():
        env = {item["name"]: item for item in pod["spec"]["containers"][0]["env"]}
        if name in ("head", ROUTER_GROUP) or not hf_token:
            assert "HF_TOKEN" not in env, name
        else:
            reference = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert reference["name"] in secrets or reference["name"] == values["huggingface"]["existingSecret"]
            assert reference["key"] == values["huggingface"]["secretKey"]


# --- security: Ray's token, HAProxy's pages, network policies ------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_ray_token_authentication_is_always_on(scenario: Path) -> None:
    """KubeRay's authOptions: it sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on every Ray container (and the autoscaler),
    from the given Secret or one it makes, unless the container already sets them, which none may."""
    docs = rendered(scenario)
    values = merged_values(scenario)
    spec = cluster_spec(docs)
    expected = {"mode": "token"}
    if values["rayAuth"]["existingSecret"]:
        expected["secretName"] = values["rayAuth"]["existingSecret"]
    assert spec["authOptions"] == expected
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)  # Ray's first with token authentication
    for name, pod in pod_templates(docs).items():
        for container in pod["spec"]["containers"]:
            assert not {item["name"] for item in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, name
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= set(RESERVED_ENV)  # and `env` cannot add them


def _dashboard_public_paths() -> set[str]:
    """The paths Ray's dashboard (the head's 8265) serves without the token: a set literal inside
    HttpServerDashboardHead.run, read from the installed Ray's source."""
    from ray.dashboard.http_server_head import HttpServerDashboardHead

    tree = ast.parse(textwrap.dedent(inspect.getsource(HttpServerDashboardHead.run)))
    (paths,) = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "public_exact_paths" for target in node.targets)]
    return set(paths)


def test_probes_ask_only_what_rays_token_leaves_open() -> None:
    """With token authentication on, a probe of an authenticated path would fail (401) and restart every pod.
    The probes ask the dashboard agent (52365) and the dashboard (8265) for paths both leave public, and Serve's
    proxy (8000), which checks no Ray token: so they send none."""
    import ray
    from ray.dashboard.http_server_agent import PUBLIC_EXACT_PATHS

    asked = set()
    for scenario in SCENARIOS:
        for pod in pod_templates(rendered(scenario)).values():
            (container,) = pod["spec"]["containers"]
            for probe in ("livenessProbe", "readinessProbe"):
                command = " ".join(container[probe]["exec"]["command"])
                asked |= {(int(port), path) for port, path in re.findall(r"http://localhost:(\d+)(/\S*)", command)}
    assert asked == {(52365, "/api/local_raylet_healthz"), (8265, "/api/gcs_healthz"), (8000, "/-/healthz")}
    assert "/api/local_raylet_healthz" in PUBLIC_EXACT_PATHS
    assert "/api/gcs_healthz" in _dashboard_public_paths()
    serve = Path(ray.__file__).parent / "serve"
    checks_tokens = [path for path in serve.rglob("*.py")
                     if re.search(r"token_auth_middleware|validate_request_token", path.read_text())]
    assert not checks_tokens, f"Serve's HTTP path now checks Ray's token: {checks_tokens}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_haproxy_pages_stay_on_the_pods_loopback(scenario: Path) -> None:
    """The contract with router/haproxy.py: every Ray container tells the image's hook where HAProxy's stats page
    (admin level) and metrics page listen, and how long a client has to send its request headers."""
    values = merged_values(scenario)
    for name, pod in pod_templates(rendered(scenario)).items():
        for container in pod["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert env[PAGES_HOST_ENV] == "127.0.0.1", name
            assert env[REQUEST_TIMEOUT_ENV] == str(values["haproxy"]["requestTimeoutSeconds"]), name
    assert HAProxy().requestTimeoutSeconds == REQUEST_TIMEOUT_S  # the chart's default is the hook's own


HAPROXY_PTH_LINE = "import router.haproxy; router.haproxy.install_import_hook()"


def test_image_runs_the_haproxy_hook_in_every_python_process(tmp_path: Path) -> None:
    """KubeRay starts Serve's proxy without a runtime environment of ours: a .pth file in the image's site-packages
    runs the hook in every Python process. The line, read as Python reads a .pth file, patches Ray's template."""
    dockerfile = (CHART / "image" / "Dockerfile").read_text()
    runs = re.findall(r"^RUN ((?:.*\\\n)*.*)$", dockerfile, re.M)
    (install,) = [i for i, run in enumerate(runs) if "pip install" in run]
    (hook,) = [i for i, run in enumerate(runs) if "rayroute-haproxy.pth" in run]
    assert hook > install, "the hook's module comes with the pip install"
    assert f"echo '{HAPROXY_PTH_LINE}'" in runs[hook]
    assert re.search(r"""sysconfig\.get_paths\(\)\["purelib"\]\)'\)/rayroute-haproxy\.pth"$""", runs[hook])

    (tmp_path / "rayroute-haproxy.pth").write_text(HAPROXY_PTH_LINE + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYROUTE_HAPROXY_")}
    env.update({PAGES_HOST_ENV: "127.0.0.1", REQUEST_TIMEOUT_ENV: "7"})
    code = ("import site, sys; site.addsitedir(sys.argv[1]); "
            "from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE; print(HAPROXY_CONFIG_TEMPLATE)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pages = [line.strip() for line in result.stdout.splitlines()
             if line.strip().startswith("bind") and re.search(r"config\.(stats|metrics)_port", line)]
    assert len(pages) == 2 and all(line.startswith("bind 127.0.0.1:") for line in pages), pages
    assert "timeout http-request 7s" in result.stdout


# A small NetworkPolicy evaluator, with Kubernetes' semantics: a pod selected by some policy of a direction
# (policyTypes) is isolated in it, and then allowed only what a rule of one of those policies allows; a rule matches
# when one of its peers does (none listed: any) on one of its ports (none listed: any). A peer's podSelector alone
# means the policy's namespace; with a namespaceSelector, both must match. A connection needs the source's egress
# and the destination's ingress. ipBlock is matched against addresses outside the cluster only: how it applies to
# pod IPs is up to the network plugin, and the chart's rules do not rely on it.

@dataclasses.dataclass
class Pod:
    namespace: str
    labels: dict[str, str]


Endpoint = Pod | str  # a pod, or an address outside the cluster's pods


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        holds = {"In": key in labels and labels[key] in values,
                 "NotIn": key not in labels or labels[key] not in values,
                 "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not holds:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_namespace: str, endpoint: Endpoint) -> bool:
    if "ipBlock" in peer:
        if isinstance(endpoint, Pod):
            return False
        address = ipaddress.ip_address(endpoint)
        block = peer["ipBlock"]
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])))
    if not isinstance(endpoint, Pod):
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": endpoint.namespace}):
            return False
    elif endpoint.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), endpoint.labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        assert isinstance(entry["port"], int), "a named port: the evaluator (and the chart) use numbers"
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _direction_allows(policies, pod: Pod, direction: str, other: Endpoint, port: int, protocol: str) -> bool:
    peers_key, rules_key = ("from", "ingress") if direction == "Ingress" else ("to", "egress")
    selecting = []
    for policy in policies:
        spec = policy["spec"]
        types = spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])
        namespace = policy["metadata"].get("namespace", NAMESPACE)
        if direction in types and namespace == pod.namespace and selects(spec["podSelector"], pod.labels):
            selecting.append((namespace, spec.get(rules_key) or []))
    if not selecting:
        return True
    return any(_port_matches(rule.get("ports"), port, protocol)
               and (not rule.get(peers_key) or any(_peer_matches(peer, namespace, other) for peer in rule[peers_key]))
               for namespace, rules in selecting for rule in rules)


def allowed(policies, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether the policies let a connection from source to destination's port through."""
    if isinstance(source, Pod) and not _direction_allows(policies, source, "Egress", destination, port, protocol):
        return False
    return not isinstance(destination, Pod) or _direction_allows(policies, destination, "Ingress", source, port,
                                                                 protocol)


def release_pods(docs) -> dict[str, Pod]:
    """The pods KubeRay makes from the RayService's templates: the template's labels over KubeRay's defaults, and
    the node type, group and cluster labels, which KubeRay sets itself."""
    pods = {}
    for group, template in pod_templates(docs).items():
        head = group == "head"
        pods[group] = Pod(NAMESPACE, {
            "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator",
            **template["metadata"]["labels"],
            "ray.io/is-ray-node": "yes", "ray.io/cluster": f"{FULLNAME}-raycluster-x7k2p",
            "ray.io/node-type": "head" if head else "worker", "ray.io/group": "headgroup" if head else group})
    return pods


OPERATOR = Pod("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
INGRESS_CONTROLLER = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
OUTSIDERS = {
    "a pod beside the release": Pod(NAMESPACE, {"app": "web"}),
    "another release of the chart": Pod(NAMESPACE, {"app.kubernetes.io/name": "rayroute", "app.kubernetes.io/instance":
                                                    "other", "ray.io/node-type": "worker", "ray.io/group": "routers"}),
    "an operator look-alike elsewhere": Pod("default", {"app.kubernetes.io/name": "kuberay-operator"}),
    "a pod in another namespace": Pod("team-b", {"app": "batch"}),
}
# GCS, dashboard, Ray client, dashboard agent, a worker port, an ephemeral port (Serve's replica gRPC, the engines'
# stream channels), HAProxy's stats and metrics pages.
RAY_PORTS = (6379, 8265, 10001, 52365, 10002, 40123, 8404, 9101)
PUBLIC_ADDRESS, PUBLIC_ADDRESS_V6 = "8.8.8.8", "2606:4700:4700::1111"
CLUSTER_DNS = "10.96.0.10"


def policies_for(scenario: Path | None = None, tmp_path: Path | None = None, **override: Any):
    """The rendered NetworkPolicies and pods of a scenario (default: the minimal one), with an override."""
    if not override:
        docs = rendered(scenario or MINIMAL)
    else:
        result = template(scenario or MINIMAL, extra=override, tmp=tmp_path)
        assert result.returncode == 0, result.stderr
        docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    return of_kind(docs, "NetworkPolicy"), release_pods(docs)


def test_policy_evaluator_follows_kubernetes_semantics() -> None:
    web, db = Pod("a", {"app": "web"}), Pod("a", {"app": "db"})
    elsewhere = Pod("b", {"app": "web"})
    assert allowed([], web, db, 5432)  # nothing selects db: not isolated
    deny_all = {"metadata": {"namespace": "a"}, "spec": {"podSelector": {"matchLabels": {"app": "db"}}}}
    assert not allowed([deny_all], web, db, 5432) and allowed([deny_all], db, web, 80)  # Ingress only, by default
    from_web = {"metadata": {"namespace": "a"}, "spec": {
        "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]}]}}
    assert allowed([deny_all, from_web], web, db, 5432)  # policies add up
    assert not allowed([from_web], web, db, 5433) and not allowed([from_web], web, db, 5432, "UDP")
    assert not allowed([from_web], elsewhere, db, 5432)  # a podSelector alone: the policy's namespace
    both = copy.deepcopy(from_web)
    both["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "b"}},
                                           "podSelector": {"matchLabels": {"app": "web"}}}]
    assert allowed([both], elsewhere, db, 5432) and not allowed([both], web, db, 5432)  # both must match
    assert not allowed([both], Pod("b", {"app": "db"}), db, 5432)
    egress = {"metadata": {"namespace": "a"}, "spec": {
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                    "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8999}]}]}}
    assert allowed([egress], web, "1.2.3.4", 8443) and not allowed([egress], web, "10.1.2.3", 8443)
    assert not allowed([egress], web, "1.2.3.4", 443) and not allowed([egress], web, db, 8443)
    assert allowed([egress], db, "10.1.2.3", 22)  # NotIn: db is not selected


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_ray_ports_are_closed_to_pods_outside_the_release(scenario: Path) -> None:
    policies, pods = policies_for(scenario)
    assert policies, "network policies are on by default"
    for name, pod in pods.items():
        for other in pods.values():  # Ray needs every port between its pods
            assert all(allowed(policies, other, pod, port) for port in (*RAY_PORTS, 8000, 8080)), name
        for who, outsider in OUTSIDERS.items():
            reachable = [port for port in RAY_PORTS if allowed(policies, outsider, pod, port)]
            assert not reachable, f"{who} reaches {name} on {reachable}"
        assert not allowed(policies, OPERATOR, pod, 6379) and not allowed(policies, PROMETHEUS, pod, 8265)


def test_the_operator_reaches_the_dashboard(tmp_path: Path) -> None:
    """KubeRay's operator deploys serveConfigV2 and reads Serve's status through the head's dashboard."""
    policies, pods = policies_for()
    assert allowed(policies, OPERATOR, pods["head"], 8265) and allowed(policies, OPERATOR, pods["head"], 8000)
    assert not any(allowed(policies, OPERATOR, pods["head"], port) for port in (6379, 10001, 52365))
    assert not allowed(policies, OUTSIDERS["an operator look-alike elsewhere"], pods["head"], 8265)
    # An operator in a namespace of its own choosing.
    moved = Pod("ray-system", OPERATOR.labels)
    assert not allowed(policies, moved, pods["head"], 8265)
    policies, pods = policies_for(tmp_path=tmp_path, networkPolicy={"operatorFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
         "podSelector": {"matchLabels": OPERATOR.labels}}]})
    assert allowed(policies, moved, pods["head"], 8265) and not allowed(policies, OPERATOR, pods["head"], 8265)


def test_the_api_port_is_open_to_api_from(tmp_path: Path) -> None:
    """Port 8000 of the pods that serve HTTP (router and GPU pods): from anywhere by default, from apiFrom when set;
    never the head's, which serves none."""
    policies, pods = policies_for()
    serving = [pods[ROUTER_GROUP], pods["gpu"]]
    for source in (*OUTSIDERS.values(), INGRESS_CONTROLLER, "203.0.113.7"):
        assert all(allowed(policies, source, pod, 8000) for pod in serving), source
        assert not allowed(policies, source, pods["head"], 8000), source
    policies, pods = policies_for(tmp_path=tmp_path, networkPolicy={"apiFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
         "podSelector": {"matchLabels": INGRESS_CONTROLLER.labels}}]})
    serving = [pods[ROUTER_GROUP], pods["gpu"]]
    assert all(allowed(policies, INGRESS_CONTROLLER, pod, 8000) for pod in serving)
    assert not any(allowed(policies, INGRESS_CONTROLLER, pod, 8265) for pod in serving)
    for source in (*OUTSIDERS.values(), "203.0.113.7"):
        assert not any(allowed(policies, source, pod, 8000) for pod in serving), source


def test_metrics_are_open_to_the_monitoring_namespace_only() -> None:
    policies, pods = policies_for()
    for name, pod in pods.items():
        assert allowed(policies, PROMETHEUS, pod, 8080), name
        assert not allowed(policies, PROMETHEUS, pod, 8265), name
        assert not any(allowed(policies, outsider, pod, 8080) for outsider in OUTSIDERS.values()), name
        assert not allowed(policies, Pod("monitoring-2", PROMETHEUS.labels), pod, 8080), name


def test_engine_pods_reach_dns_the_release_and_public_https_only() -> None:
    """Engines download weights and fetch clients' media URLs: HTTPS to public addresses, never the cloud's
    metadata endpoint or the cluster's own addresses (nodes, Services, pods outside the release)."""
    policies, pods = policies_for()
    engine = pods["gpu"]
    assert allowed(policies, engine, PUBLIC_ADDRESS, 443) and allowed(policies, engine, PUBLIC_ADDRESS_V6, 443)
    for address, port in [("169.254.169.254", 80), ("169.254.169.254", 443), ("10.0.0.5", 443), ("172.20.0.1", 443),
                          ("192.168.1.10", 443), ("100.64.0.1", 443), ("127.0.0.1", 443), (PUBLIC_ADDRESS, 80),
                          (PUBLIC_ADDRESS, 22), ("fd00:ec2::254", 80), ("fe80::1", 443)]:
        assert not allowed(policies, engine, address, port), (address, port)
    for protocol in ("UDP", "TCP"):
        assert allowed(policies, engine, CLUSTER_DNS, 53, protocol)
        assert allowed(policies, engine, "169.254.20.10", 53, protocol)  # a node-local DNS cache
    assert allowed(policies, engine, pods["head"], 6379) and allowed(policies, engine, pods[ROUTER_GROUP], 40123)
    assert not any(allowed(policies, engine, outsider, 443) for outsider in OUTSIDERS.values())


def test_router_pods_download_only_when_they_may_run_an_engine(tmp_path: Path) -> None:
    # GPU models only, placed by load: the routers need DNS and the release's pods.
    gpu_model = {"id": "qwen", "source": "Qwen/Qwen2.5-1.5B-Instruct", "replica_choice": "least_loaded",
                 "resources": {"accelerator": "gpu", "cpus": 4}}
    policies, pods = policies_for(tmp_path=tmp_path, serve={"models": [gpu_model]})
    routers = pods[ROUTER_GROUP]
    assert allowed(policies, routers, CLUSTER_DNS, 53, "UDP") and allowed(policies, routers, pods["gpu"], 40123)
    assert allowed(policies, routers, pods["head"], 6379)
    assert not allowed(policies, routers, PUBLIC_ADDRESS, 443)
    assert not any(allowed(policies, routers, outsider, 80) for outsider in OUTSIDERS.values())
    # A CPU model may run on a router pod (open-endpoint-values has no GPU group), as may pip packages; and the
    # routers load the tokenizer of a model placed by kv_cache (the default, as the chart's own model is).
    for docs in (policies_for(CHART / "ci" / "open-endpoint-values.yaml"),
                 policies_for(tmp_path=tmp_path, serve={"models": [gpu_model]},
                              python={"packages": ["sentencepiece==0.2.0"]}),
                 policies_for()):
        policies, pods = docs
        assert allowed(policies, pods[ROUTER_GROUP], PUBLIC_ADDRESS, 443)
        assert not allowed(policies, pods[ROUTER_GROUP], "169.254.169.254", 80)


def test_the_heads_egress_is_not_restricted() -> None:
    """Its autoscaler calls the Kubernetes API and its GCS an external Redis: addresses the chart cannot know."""
    policies, pods = policies_for()
    assert allowed(policies, pods["head"], "10.96.0.1", 443) and allowed(policies, pods["head"], "10.20.30.40", 6379)


def test_network_policies_can_be_turned_off(tmp_path: Path) -> None:
    policies, pods = policies_for(tmp_path=tmp_path, networkPolicy={"enabled": False})
    assert not policies


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_monitoring_scrapes_every_ray_pod(scenario: Path) -> None:
    docs = rendered(scenario)
    values = merged_values(scenario)["monitoring"]
    pods = pod_templates(docs)
    spec = cluster_spec(docs)
    params = [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in spec.get("workerGroupSpecs", [])]
    assert all(p["metrics-export-port"] == "8080" for p in params)
    for pod in pods.values():
        assert {"name": "metrics", "containerPort": 8080} in pod["spec"]["containers"][0]["ports"]

    def selects_every_pod(selector: dict[str, str]) -> bool:
        return all(selector.items() <= pod["metadata"]["labels"].items() for pod in pods.values())

    monitors = of_kind(docs, "PodMonitor")
    assert len(monitors) == int(values["podMonitor"]["enabled"])
    for monitor in monitors:
        assert selects_every_pod(monitor["spec"]["selector"]["matchLabels"])
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
        assert values["podMonitor"]["labels"].items() <= monitor["metadata"]["labels"].items()
    service_monitors = of_kind(docs, "ServiceMonitor")
    assert len(service_monitors) == int(values["serviceMonitor"]["enabled"])
    for monitor in service_monitors:
        (service,) = [s for s in of_kind(docs, "Service")
                      if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert service["spec"]["clusterIP"] == "None" and selects_every_pod(service["spec"]["selector"])
        assert {p["name"] for p in service["spec"]["ports"]} >= {monitor["spec"]["endpoints"][0]["port"]}

    dashboards = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == int(values["dashboard"]["enabled"])
    for configmap in dashboards:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        shipped = json.loads((CHART / "dashboards" / "rayroute.json").read_text())
        assert json.loads(configmap["data"]["rayroute.json"]) == shipped


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_gcs_fault_tolerance_is_kuberays_own_with_the_password_from_a_secret(scenario: Path) -> None:
    values = merged_values(scenario)["gcsFaultTolerance"]
    spec = cluster_spec(rendered(scenario))
    if not values["redisAddress"]:
        assert "gcsFaultToleranceOptions" not in spec
        return
    options = spec["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == values["redisAddress"]
    assert options["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": values["existingSecret"],
                                                                        "key": values["secretKey"]}}}
    assert options.get("externalStorageNamespace", "") == values["externalStorageNamespace"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
def test_routes_reach_the_serve_service(scenario: Path) -> None:
    docs = rendered(scenario)
    values = merged_values(scenario)
    serve_service = only(docs, "RayService")["spec"]["serveService"]
    assert serve_service["metadata"]["name"] == FULLNAME
    (port,) = serve_service["spec"]["ports"]
    assert port == {"name": "serve", "port": 8000}  # KubeRay sets it from the head's serve port anyway
    assert {"name": "serve", "containerPort": 8000} in pod_templates(docs)["head"]["spec"]["containers"][0]["ports"]
    assert serve_service["spec"]["type"] == values["service"]["type"]
    assert serve_config(docs)["http_options"]["port"] == 8000
    # Clients reach the pods that serve HTTP, never the head (Ray's control plane only: no replica, no CPUs).
    assert only(docs, "RayService")["spec"]["excludeHeadPodFromServeSvc"] is True
    assert serve_config(docs)["proxy_location"] == "EveryNode"

    ingresses = of_kind(docs, "Ingress")
    assert len(ingresses) == int(values["ingress"]["enabled"])
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            backend = rule["http"]["paths"][0]["backend"]["service"]
            assert backend == {"name": FULLNAME, "port": {"number": port["port"]}}
        # Long streams: no 60 s read timeout, no buffering.
        assert int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
        assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"

    routes = of_kind(docs, "HTTPRoute")
    assert len(routes) == int(values["httpRoute"]["enabled"])
    for route in routes:  # no CRD here for Gateway API: its shape is checked by hand
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert set(route["spec"]) <= {"parentRefs", "hostnames", "rules"}
        assert route["spec"]["parentRefs"] == values["httpRoute"]["parentRefs"]
        (rule,) = route["spec"]["rules"]
        assert set(rule) == {"matches", "backendRefs", "timeouts"}
        assert rule["backendRefs"] == [{"name": FULLNAME, "port": port["port"]}]
        assert rule["timeouts"] == {"request": "0s"}


def notes(tmp_path: Path, *values_files: Path, apis: tuple[str, ...] = MONITORING_APIS) -> str:
    # helm shows NOTES.txt only from `install`, which needs a cluster; a copy of the chart renders it into a
    # ConfigMap instead, with the same values and helpers.
    chart = tmp_path / "chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        (chart / "templates" / "NOTES.txt").rename(chart / "NOTES.txt")
        (chart / "templates" / "notes.yaml").write_text(
            'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n'
            'data: {notes: {{ tpl (.Files.Get "NOTES.txt") . | quote }}}\n')
    result = template(*values_files, chart=chart, apis=apis, show="templates/notes.yaml")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["data"]["notes"]


def test_notes_say_how_to_call_the_endpoint(tmp_path: Path) -> None:
    scenario = CHART / "ci" / "minimal-values.yaml"
    text = notes(tmp_path, scenario)
    model = merged_values(scenario)["serve"]["models"][0]["id"]
    assert f"port-forward svc/{FULLNAME} 8000:8000" in text
    assert f'"model": "{model}"' in text and "Authorization: Bearer" in text
    assert "grafana_dashboard=1" in text and "WARNING" not in text and "No PodMonitor" not in text

    open_endpoint = notes(tmp_path, CHART / "ci" / "open-endpoint-values.yaml")
    assert "WARNING: no API keys are configured" in open_endpoint and "Authorization" not in open_endpoint


def test_monitors_wait_for_prometheus_operator(tmp_path: Path) -> None:
    """Monitoring is on by default; on a cluster without Prometheus Operator the install must still work."""
    scenario = CHART / "ci" / "minimal-values.yaml"
    result = template(scenario, apis=())
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert "PodMonitor" not in kinds and {"RayService", "ConfigMap"} <= kinds
    assert "No PodMonitor was made: this cluster has no Prometheus Operator" in notes(tmp_path, scenario, apis=())


# --- the checks themselves can fail ---------------------------------------------------------------------------------

def test_crd_check_rejects_unknown_fields() -> None:
    rayservice = copy.deepcopy(only(rendered(SCENARIOS[0]), "RayService"))
    assert not crd_errors(rayservice)
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"
    errors = crd_errors(rayservice)
    assert any("maxReplica" in e for e in errors) and any("imagePolicy" in e for e in errors), errors
    rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] = "yes"
    assert any("'yes' is not of type 'boolean'" in e for e in crd_errors(rayservice))


def test_kubernetes_check_rejects_unknown_fields() -> None:
    pdb = copy.deepcopy(of_kind(rendered(SCENARIOS[0]), "PodDisruptionBudget")[0])
    pdb["spec"]["maxUnavailabe"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, KUBERNETES_VERSIONS[0], strict=True)


MINIMAL = CHART / "ci" / "minimal-values.yaml"

BAD_VALUES = {
    "gpu count as a string": (
        {"workerGroups": [{"name": "gpu", "gpus": "two"}]},
        "at '/workerGroups/0/gpus': got string, want integer"),
    "model without a source": (
        {"serve": {"models": [{"id": "m1"}]}},
        "at '/serve/models/0': missing property 'source'"),
    "misspelt resource field": (
        {"serve": {"models": [{"id": "m1", "source": "org/m", "resources": {"num_gpus": 1}}]}},
        "at '/serve/models/0/resources': additional properties 'num_gpus' not allowed"),
    "model id with a space": (
        {"serve": {"models": [{"id": "my model", "source": "org/m"}]}},
        "at '/serve/models/0/id': 'my model' does not match pattern"),
    "unknown autoscaling policy": (
        {"serve": {"models": [{"id": "m1", "source": "org/m", "autoscaling": {"policy": "gpu"}}]}},
        "at '/serve/models/0/autoscaling/policy': value must be one of 'requests', 'engine_load'"),
    "no models": (
        {"serve": {"models": []}},
        "at '/serve/models': minItems: got 0, want 1"),
    "tensor parallel wider than any pod": (
        {"serve": {"models": [{"id": "big", "source": "org/big", "resources": {"tensor_parallel_size": 2}}]}},
        "serve.models[0] (big) needs 2 GPU(s) on one pod, but no workerGroups entry has them: add a group with "
        "gpus: 2"),
    "accelerator type no group has": (
        {"serve": {"models": [{"id": "m1", "source": "org/m", "resources": {"accelerator_type": "H100"}}]}},
        "serve.models[0] (m1) needs 1 GPU(s) of type H100 on one pod, but no workerGroups entry has them: add a "
        "group with gpus: 1 and acceleratorType: H100"),
    "tensor parallel wider than a group's pods, however many": (  # a stage never spans pods
        {"serve": {"models": [{"id": "big", "source": "org/big", "resources": {"tensor_parallel_size": 8}}]},
         "workerGroups": [{"name": "gpu4", "gpus": 4, "maxReplicas": 4}]},
        "serve.models[0] (big) needs 8 GPU(s) on one pod, but no workerGroups entry has them: add a group with "
        "gpus: 8"),
    "pipeline stages on more pods than the group may have": (
        {"serve": {"models": [{"id": "big", "source": "org/big",
                               "resources": {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}}]},
         "workerGroups": [{"name": "gpu4", "gpus": 4, "maxReplicas": 1}]},
        "serve.models[0] (big) needs 2 pipeline stages of 4 GPU(s), each on one pod, but no workerGroups entry "
        "holds them all: workerGroups gpu4 holds 1 of them (1 per pod x maxReplicas 1); raise its maxReplicas to 2"),
    "a pipeline stage wider than any pod": (
        {"serve": {"models": [{"id": "big", "source": "org/big", "resources": {
            "tensor_parallel_size": 8, "pipeline_parallel_size": 2, "accelerator_type": "H100"}}]},
         "workerGroups": [{"name": "h100", "gpus": 4, "acceleratorType": "H100", "maxReplicas": 8}]},
        "serve.models[0] (big) needs 8 GPU(s) of type H100 on one pod for each of its 2 pipeline stages, but no "
        "workerGroups entry has them: add a group with gpus: 8 (or a multiple) and acceleratorType: H100 and "
        "maxReplicas: 2"),
    "a CPU model with several workers": (
        {"serve": {"models": [{"id": "small", "source": "org/small",
                               "resources": {"accelerator": "cpu", "tensor_parallel_size": 2}}]}},
        "serve.models[0] (small) has 2 workers (tensor_parallel_size x pipeline_parallel_size) on accelerator: cpu, "
        "which the chart's pods cannot run"),
    "a GPU model and no GPU groups": (
        {"workerGroups": []},
        "serve.models[0] (qwen2.5-1.5b-instruct) needs 1 GPU(s) on one pod"),
    "more routers than router pods' CPUs": (
        {"serve": {"routers": {"replicas": 5}},
         "routerPods": {"replicas": 2, "resources": {"limits": {"cpu": "2500m"}}}},
        "serve.routers.replicas: 5 routers need a CPU each on the router pods, but 2 pods of 2500m CPUs (routerPods) "
        "hold 4"),
    "a GPU group named as the router pods' group": (
        {"workerGroups": [{"name": "routers"}]},
        "routers"),
    "group min above max": (
        {"workerGroups": [{"name": "gpu", "minReplicas": 3, "maxReplicas": 2}]},
        "workerGroups gpu: minReplicas (3) exceeds maxReplicas (2)"),
    "no keys, not allowed open": (
        {"apiKeys": {"existingSecret": ""}},
        "no API keys: set apiKeys.existingSecret (or apiKeys.keys), or apiKeys.allowUnauthenticated: true"),
    "short API key": (
        {"apiKeys": {"keys": [{"name": "a", "key": "short"}]}},
        f"at '/apiKeys/keys/0/key': minLength: got 5, want {MIN_API_KEY_LENGTH}"),
    "route without a gateway": (
        {"httpRoute": {"enabled": True}},
        "httpRoute.parentRefs: name the Gateway the route attaches to"),
    "no image": (
        {"image": {"repository": ""}},
        "image.repository is required: build helm/image/Dockerfile"),
    "unknown top-level value": (
        {"replicas": 3},
        "additional properties 'replicas' not allowed"),
    "Ray's token authentication turned off": (
        {"rayAuth": {"enabled": False}},
        "at '/rayAuth': additional properties 'enabled' not allowed"),
    "env turning Ray's token authentication off": (  # KubeRay would leave the container's own value
        {"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]},
        "env: RAY_AUTH_MODE is the chart's to set"),
    "env putting the Hugging Face token in every pod": (
        {"env": [{"name": "HF_TOKEN", "value": "hf_not_a_real_token"}]},
        "env: HF_TOKEN is the chart's to set"),
    "env moving HAProxy's admin page off the loopback": (
        {"env": [{"name": "RAYROUTE_HAPROXY_PAGES_HOST", "value": "0.0.0.0"}]},
        "env: RAYROUTE_HAPROXY_PAGES_HOST is the chart's to set"),
    "no time limit on request headers": (
        {"haproxy": {"requestTimeoutSeconds": 0}},
        "at '/haproxy/requestTimeoutSeconds': minimum: got 0, want 1"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=str)
def test_bad_values_fail_with_a_clear_message(case: str, tmp_path: Path) -> None:
    override, message = BAD_VALUES[case]
    result = template(MINIMAL, extra=override, tmp=tmp_path)
    assert result.returncode != 0, f"rendered despite {case}"
    assert message in result.stderr, result.stderr


# A model's replica and the groups that hold it: pipeline stages spread over a group's pods, several to a pod where
# the pod has the GPUs.
GOOD_PLACEMENTS = {
    "one stage per pod, a pod per stage": (
        {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}, [{"name": "gpu4", "gpus": 4, "maxReplicas": 2}]),
    "two stages on one pod": (
        {"tensor_parallel_size": 4, "pipeline_parallel_size": 2}, [{"name": "gpu8", "gpus": 8, "maxReplicas": 1}]),
    "three stages on two pods of two": (
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 3}, [{"name": "gpu4", "gpus": 4, "maxReplicas": 2}]),
    "the group that holds them, beside one that does not": (
        {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "gpus_per_worker": 0.5},
        [{"name": "small", "gpus": 1, "maxReplicas": 1}, {"name": "gpu2", "gpus": 2, "maxReplicas": 1}]),
    "a CPU model with one worker": ({"accelerator": "cpu"}, []),
}


@pytest.mark.parametrize("case", GOOD_PLACEMENTS, ids=str)
def test_replicas_that_fit_render(case: str, tmp_path: Path) -> None:
    resources, groups = GOOD_PLACEMENTS[case]
    override = {"serve": {"models": [{"id": "m1", "source": "org/m", "resources": resources}]},
                "workerGroups": groups}
    result = template(MINIMAL, extra=override, tmp=tmp_path)
    assert result.returncode == 0, result.stderr


def test_examples_show_models_larger_than_one_gpu() -> None:
    """A 70B model tensor-parallel within one pod, and the same model in pipeline stages across two pods."""
    shapes = {}
    for name in ("seventy-b-one-pod", "seventy-b-two-pods"):
        scenario = CHART / "examples" / f"{name}.yaml"
        assert scenario in SCENARIOS, name
        (model,) = serve_args(rendered(scenario)).models
        shapes[name] = (model.resources.tensor_parallel_size, model.resources.pipeline_parallel_size)
        values = merged_values(scenario)
        (group,) = [WorkerGroup.from_values(g, values["workerDefaults"]) for g in values["workerGroups"]]
        pods_per_replica = -(-model.resources.workers * model.resources.gpus_per_worker // group.gpus)
        assert group.maxReplicas >= pods_per_replica * model.autoscaling.max_replicas, name
    assert shapes == {"seventy-b-one-pod": (8, 1), "seventy-b-two-pods": (4, 2)}
    # Across pods, NCCL and Gloo are told the pods' interface, on every Ray container.
    for pod in pod_templates(rendered(CHART / "examples" / "seventy-b-two-pods.yaml")).values():
        env = {item["name"]: item.get("value") for item in pod["spec"]["containers"][0]["env"]}
        assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
