"""The routing table: every name a client may send, and where a request under that name goes.

A model answers to its id, its aliases and each of its LoRA adapters' names. One :class:`Route` per name holds all
the router needs to send a request under it, so nothing downstream looks a name up in more than one place: the
handle of the deployment that serves it, the entry it is routed by (timeouts, fallbacks, media), and for an
adapter the base model it runs on. ``/v1/models`` lists the same table, so what is listed is what is routed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.config import RoutedModel, RouterArgs
from router.errors import OpenAIError


@dataclass(frozen=True)
class Route:
    """Where requests for ``name`` go.

    ``model`` is the entry the request is routed by: the configured one for an id or an alias; for an adapter, its
    base's under the adapter's name (:meth:`RoutedModel.as_adapter`), so keys, metrics and errors name the adapter.
    ``parent`` is an adapter's base model id, and None for every other name.
    """

    name: str
    handle: DeploymentHandle
    model: RoutedModel
    parent: str | None = None

    def card(self, created: int) -> dict[str, Any]:
        """The name's entry in ``/v1/models``: an adapter with its ``parent``, as vLLM lists one; an alias with the
        id it stands for as ``root``."""
        card: dict[str, Any] = {"id": self.name, "object": "model", "created": created, "owned_by": "rayroute"}
        if self.parent is not None:
            card["parent"] = self.parent
        elif self.model.id != self.name:
            card["root"] = self.model.id
        return card


def build_routes(config: RouterArgs, engines: dict[str, DeploymentHandle]) -> dict[str, Route]:
    """Every configured name → its :class:`Route`, in the config's order (the order ``/v1/models`` lists)."""
    routes: dict[str, Route] = {}
    for model in config.models:
        for name in model.names:
            routes[name] = Route(name, engines[model.id].options(stream=True), model)
        for name in model.adapters:
            # Serve's multiplexing sends it to a replica that holds the adapter (deployments/adapters.py).
            handle = engines[model.id].options(stream=True, multiplexed_model_id=name)
            routes[name] = Route(name, handle, model.as_adapter(name), parent=model.id)
    return routes


def route_of(routes: dict[str, Route], name: str) -> Route:
    """The route of ``name``, or the 404 OpenAI answers for a model it does not know."""
    route = routes.get(name)
    if route is None:
        raise OpenAIError.model_not_found(name)
    return route
