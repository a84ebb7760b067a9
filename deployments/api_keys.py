"""The schema of one API key, as a keys file or the chart's ``apiKeys.keys`` value lists it.

Its own module on the ``deployments`` side, because both sides need it: the router reads keys with it
(:mod:`router.auth`) and the chart's values schema is generated from it (:mod:`deployments.kubernetes`), and
imports run one way only, from ``router/`` to ``deployments/``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from deployments.constants import MIN_API_KEY_LENGTH


class ApiKey(BaseModel):
    # Exactly one of `key` and `key_sha256`, in the chart's values schema too.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "oneOf": [{"required": ["key"]}, {"required": ["key_sha256"]}]})

    name: str = Field(min_length=1, max_length=64)
    key: SecretStr | None = Field(None, min_length=MIN_API_KEY_LENGTH)
    # As LiteLLM stores keys: whoever reads the file (or the Secret) learns no key from it.
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", repr=False, description="Instead of `key`: "
                                   "the SHA-256 of the key's UTF-8, as 64 lowercase hex digits "
                                   "(`printf %s \"$KEY\" | sha256sum`).")
    models: list[str] | None = Field(None, description="Model names this key may use. A model's id also grants "
                                     "its aliases, not its adapters: an adapter is a model of its own.")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent_requests: int | None = Field(None, ge=1, description="Requests this key may have in flight at "
                                                "once, across every router replica; more get 429.")

    @model_validator(mode="after")
    def _one_key(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of `key` and `key_sha256`")
        return self

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_concurrent_requests)

    def may_use(self, requested: str, model_id: str) -> bool:
        """Allowed when the name sent, or the model it routes to, is listed (an adapter routes to itself)."""
        return self.models is None or requested in self.models or model_id in self.models
