"""The schema of one API key, as a keys file or the chart's ``apiKeys.keys`` value lists it.

Its own module on the ``deployments`` side, because both sides need it: the router reads keys with it
(:mod:`router.auth`) and the chart's values schema is generated from it (:mod:`deployments.kubernetes`), and
imports run one way only, from ``router/`` to ``deployments/``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    key: SecretStr = Field(min_length=8)
    models: list[str] | None = Field(None, description="Model names this key may use. A model's id also grants "
                                     "its aliases, not its adapters: an adapter is a model of its own.")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)

    @property
    def limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def may_use(self, requested: str, model_id: str) -> bool:
        """Allowed when the name sent, or the model it routes to, is listed (an adapter routes to itself)."""
        return self.models is None or requested in self.models or model_id in self.models
