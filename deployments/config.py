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

Here is the file as a whole: the routers' settings and request limits, and reading a config file, including one
already expanded into applications. One model's entry is :mod:`deployments.model_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from deployments.autoscaling import config_autoscaling
from deployments.model_config import IN_PLACE_FIELDS, ModelConfig, RoutedModel, Strict
from deployments.replies import field_path
from deployments.vllm_arguments import vllm_argument_names


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the offending field."""


class RequestLimits(Strict):
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


class Routers(Strict):
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
    session_header: str = Field(
        "X-Session-Id", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$",
        description="The request header that names a client's session, for models with `replica_choice: session` "
        "(a request without it is placed by the body's `user` field, if any).")
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


class RouterArgs(Strict):
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
    """Reject engine argument names that neither vLLM's engine nor its OpenAI front end knows (read from vLLM's
    installed source, so it runs where engines are built rather than in :func:`parse_args`), and parallel sizes that
    do not split a local model evenly."""
    unknown = sorted(set(model.engine_args) - vllm_argument_names())
    if unknown:
        raise ConfigError(
            f"models[{model.id}].engine_args: unknown vLLM argument(s) {', '.join(unknown)}"
            " (use the `vllm serve` flag names with underscores, e.g. max_model_len)"
        )
    local = model.local_source()
    try:
        model.resources.check_engine_args(model.engine_args)
        if local is not None and (local / "config.json").is_file():  # a hub model's is checked by vLLM as it starts
            model.resources.check_fits(json.loads((local / "config.json").read_text()))
    except ValueError as exc:
        raise ConfigError(f"models[{model.id}].resources: {exc}") from None


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
