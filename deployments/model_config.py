"""One served model's entry in a config file (an item of ``models:``): what clients call it, what it accepts, and
what its engine deployment is built from.

An entry is read in two places, so it is two classes: the routers read :class:`RoutedModel` (names, timeouts,
fallbacks, media), the model's own engine deployment the whole :class:`ModelConfig`. The file around the entries
(the routers' settings, request limits, parsing a config file) is :mod:`deployments.config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from deployments.autoscaling import serve_autoscaling_config
from deployments.lora_settings import lora_engine_args
from deployments.names import MODEL_NAME, MediaDomain, check_model_name, engine_deployment_name
from deployments.replica_resources import Resources, Strict


class Autoscaling(Strict):
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


class Timeouts(Strict):
    """How long a request may wait at each stage; the status a client gets when it waited too long."""

    queue_s: float = Field(300, gt=0, description="For a replica to take the request: queued, or while one "
                           "starts from zero. Then 503 with Retry-After.")
    first_token_s: float = Field(120, gt=0, description="Streams: from a replica taking the request to its "
                                 "first token. Then 408.")
    total_s: float = Field(900, gt=0, description="The whole request. Then 504, or an error event in a stream.")


class RoutedModel(Strict):
    """What the routers read of a model entry: its names, limits in time, fallbacks and what content it accepts.

    The rest of :class:`ModelConfig` (engine arguments, resources, scaling) only the model's own engine deployment
    reads. The router application's ``args`` hold only these fields
    (:meth:`deployments.config.ServeArgs.router_args`), so a change to the rest gives only that model's application
    a new code version in Serve: only its replicas are replaced.
    """

    id: str = Field(description="The model name clients send in the request's `model` field.",
                    json_schema_extra={"pattern": MODEL_NAME.pattern})
    aliases: list[str] = Field(default_factory=list, description="Other names that route to this model.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    drain_timeout_s: float = Field(300, ge=0, description="How long a stopping replica (scale-down, redeploy) "
                                   "lets its requests finish.")
    migration_limit: int = Field(1, ge=0, le=8, description="How many times a request whose replica fails after "
                                 "taking it goes on elsewhere: a stream from the tokens it already sent, in the same "
                                 "response; a whole answer from the start. 0: the client gets the error. Bounds what "
                                 "one request that kills engines can take down.")
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
    replica_choice: Literal["auto", "least_loaded", "kv_cache", "prefix_cache", "session"] = Field(
        "auto", description="How a request picks one of the model's replicas: `kv_cache` (the replica whose KV "
        "cache holds most of the prompt's start, from the engines' own cache events, while loads are close), "
        "`least_loaded` (Serve's power of two choices), `prefix_cache` (the replica that was sent the longest "
        "matching text) or `session` (one replica per session: the `X-Session-Id` header, else the body's `user`). "
        "`auto`: `kv_cache`, except `least_loaded` for a pooling model (`runner: pooling` or a `convert` in "
        "engine_args) or with `enable_prefix_caching: false`, which cache no prefixes. "
        "See deployments/replica_choice.py.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters this model's replicas serve, each a model clients can "
        "send: name → a local folder (`~` and $VARS are expanded) or a hub id. Sets vLLM's `enable_lora`, "
        "`max_loras` (at most one per adapter) and `max_lora_rank` (the widest local adapter's); with a hub "
        "adapter of rank above 16, set `max_lora_rank` in engine_args.")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("aliases")
    @classmethod
    def _alias_shape(cls, values: list[str]) -> list[str]:
        return [check_model_name(v) for v in values]

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            check_model_name(name)
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


def caches_prefixes(engine_args: dict[str, Any]) -> bool:
    """Whether the engine keeps a prefix cache: not a pooling model (embeddings, scores, classes), not with
    prefix caching turned off."""
    pooling = engine_args.get("runner") == "pooling" or engine_args.get("convert") not in (None, "auto", "none")
    return not pooling and engine_args.get("enable_prefix_caching") is not False


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
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters one replica holds at once (vLLM's `max_loras`); the least recently used "
        "makes room. Requests for an adapter go to a replica that holds it.")

    @field_validator("engine_args")
    @classmethod
    def _no_owned_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        # These are derived from other fields; two places for one value is how configs drift apart.
        owned = {"model": "source", "served_model_name": "id/aliases", "tensor_parallel_size": "resources",
                 "pipeline_parallel_size": "resources", "distributed_executor_backend": "resources",
                 "enable_lora": "adapters", "max_loras": "max_adapters_per_replica", "lora_modules": "adapters",
                 "allowed_media_domains": "allowed_media_domains", "kv_events_config": "replica_choice"}
        for key, field in owned.items():
            if key in args:
                raise ValueError(f"`{key}` is set by the model's `{field}` field, not in engine_args")
        return args

    @model_validator(mode="before")
    @classmethod
    def _resolve_replica_choice(cls, data: Any) -> Any:
        # Resolved here, from the entry alone, so that the routers and the engine (which publishes its cache's
        # events only under kv_cache) read the same choice; not from the replica count, which autoscaling changes
        # in place.
        if isinstance(data, dict) and data.get("replica_choice", "auto") == "auto":
            args = data.get("engine_args") if isinstance(data.get("engine_args"), dict) else {}
            data = {**data, "replica_choice": "kv_cache" if caches_prefixes(args) else "least_loaded"}
        return data

    @model_validator(mode="after")
    def _kv_cache_choice_needs_the_cache(self) -> ModelConfig:
        if self.replica_choice == "kv_cache" and not caches_prefixes(self.engine_args):
            raise ValueError("`replica_choice: kv_cache` goes by what the engine's prefix cache holds; a pooling "
                             "model (`runner: pooling`, a `convert`) or `enable_prefix_caching: false` leaves it "
                             "nothing to go by")
        return self

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
        """Engine arguments that follow from this entry: the placement's, and LoRA's sized to the adapters listed
        (:mod:`deployments.lora_settings`); ``engine_args`` may still set any of them but these it owns."""
        overrides = self.resources.engine_overrides()
        overrides.update(lora_engine_args({name: local_path(source) for name, source in self.adapters.items()},
                                          self.max_adapters_per_replica))
        if self.allowed_media_domains:  # vLLM's own check of the router's (router/media.py), before any fetch
            overrides["allowed_media_domains"] = list(self.allowed_media_domains)
        return overrides

    def media_env(self) -> dict[str, str]:
        """Environment variables of the engine process that govern media fetching (:data:`MEDIA_ENV`)."""
        return dict(MEDIA_ENV)


def local_path(source: str) -> Path | None:
    """A model or adapter source as a local folder, or None when it is a hub id."""
    expanded = os.path.expanduser(os.path.expandvars(source))
    if expanded.startswith(("/", ".")) or source.startswith("~"):
        return Path(expanded)
    return None


def resolve_source(source: str) -> str:
    local = local_path(source)
    return str(local) if local is not None else source

