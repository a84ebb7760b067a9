"""HAProxy, Serve's HTTP front, made safe to face clients: Ray's config template, patched before Serve renders it.

Why: Ray's template (``ray.serve._private.haproxy_templates``) binds HAProxy's stats page (``level admin``: it can
disable servers) and its Prometheus page on every interface, makes the admin socket writable by every local user,
sets no ``timeout http-request`` (a few thousand connections that never finish their headers would hold every
``maxconn`` slot without sending a key) and adds no ``X-Forwarded-For`` (the routers would see every client as
HAProxy, and could throttle failed keys per address only for all clients at once). Ray offers no setting for any of
these, so :func:`patch_template` edits the template text, and raises if Ray's template no longer has a line it
edits: a silently unpatched front is worse than one that fails to start.

It runs in whichever process renders the config (Serve's proxy actor), set by environment variables:

- ``RAYROUTE_HAPROXY_PAGES_HOST``: where the stats and metrics pages listen (the chart: the pod's loopback);
- ``RAYROUTE_HAPROXY_HOST``: the serving host; the HTTP front and both pages bind it (``make serve``; a local
  multi-node cluster gives each node a loopback address of its own);
- ``RAYROUTE_HAPROXY_REQUEST_TIMEOUT_S``: ``timeout http-request`` (default :data:`REQUEST_TIMEOUT_S`).

Locally every Ray worker runs :func:`install_import_hook` as its setup hook (:data:`WORKER_SETUP_HOOK`, in
``router.launch``'s runtime env), with the settings of :func:`local_env`; in the chart's image a ``.pth`` file runs
it in every Python process (``helm/image/Dockerfile``), since KubeRay starts Serve without a runtime environment of
ours. Importing this module costs nothing: the hook patches Ray's template module only when
something imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

PAGES_HOST_ENV = "RAYROUTE_HAPROXY_PAGES_HOST"
HOST_ENV = "RAYROUTE_HAPROXY_HOST"
REQUEST_TIMEOUT_ENV = "RAYROUTE_HAPROXY_REQUEST_TIMEOUT_S"
# A client has this long to send a request's headers (and the first request on a new connection): a real client
# sends them in one packet; a connection that trickles or stalls is let go instead of holding a slot.
REQUEST_TIMEOUT_S = 10

# Ray's own settings of HAProxy's two pages.
STATS_PORT_ENV = "RAY_SERVE_HAPROXY_STATS_PORT"
METRICS_PORT_ENV = "RAY_SERVE_HAPROXY_METRICS_PORT"
# Every worker of a local cluster runs this first (Ray's worker_process_setup_hook).
WORKER_SETUP_HOOK = "router.haproxy.install_import_hook"

TEMPLATES_MODULE = "ray.serve._private.haproxy_templates"
MANAGER_MODULE = "ray.serve._private.haproxy"
_WILDCARD = ("", "0.0.0.0", "::", "*")


class TemplateChanged(RuntimeError):
    """Ray's HAProxy template no longer has a line this module edits."""


def patch_template(template: str, pages_host: str | None, front_host: str | None,
                   request_timeout_s: int = REQUEST_TIMEOUT_S) -> str:
    """Ray's HAProxy config template with rayroute's binds, admin socket mode, request timeout and
    ``X-Forwarded-For``; ``None`` or a wildcard host leaves that bind as Ray has it."""
    edits: list[tuple[str, str]] = [
        ("stats socket {{ config.socket_path }} mode 666 ", "stats socket {{ config.socket_path }} mode 600 "),
        ("{% if config.timeout_http_request_s is not none %}timeout http-request "
         "{{ config.timeout_http_request_s }}s{% endif %}", f"timeout http-request {int(request_timeout_s)}s"),
        # In `defaults`, so every HTTP frontend appends the peer's address; what a client sent stays before it.
        ("defaults\n    mode http\n", "defaults\n    mode http\n    option forwardfor\n"),
    ]
    if pages_host and pages_host not in _WILDCARD:
        edits += [("bind :{{ config.metrics_port }}", f"bind {pages_host}:{{{{ config.metrics_port }}}}"),
                  ("bind *:{{ config.stats_port }}", f"bind {pages_host}:{{{{ config.stats_port }}}}")]
    if front_host and front_host not in _WILDCARD:
        edits.append(("bind {{ config.frontend_host }}:", f"bind {front_host}:"))
    for old, new in edits:
        if template.count(old) != 1:
            raise TemplateChanged(f"Ray's HAProxy template has {template.count(old)} of {old.strip()!r}, not one: "
                                  "update router/haproxy.py")
        template = template.replace(old, new)
    return template


def _settings() -> tuple[str | None, str | None, int] | None:
    host = os.environ.get(HOST_ENV)
    pages = os.environ.get(PAGES_HOST_ENV) or host
    timeout = os.environ.get(REQUEST_TIMEOUT_ENV)
    if not (host or pages or timeout):
        return None
    return pages, host, int(timeout) if timeout else REQUEST_TIMEOUT_S


def _patch_loaded(module: ModuleType) -> None:
    settings = _settings()
    if settings is None or getattr(module, "_rayroute_patched", False):
        return
    module.HAPROXY_CONFIG_TEMPLATE = patch_template(module.HAPROXY_CONFIG_TEMPLATE, *settings)
    module._rayroute_patched = True
    manager = sys.modules.get(MANAGER_MODULE)  # it copies the name at import: patch its copy too
    if manager is not None and hasattr(manager, "HAPROXY_CONFIG_TEMPLATE"):
        manager.HAPROXY_CONFIG_TEMPLATE = module.HAPROXY_CONFIG_TEMPLATE


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds Ray's template module through the other finders and patches it right after it runs."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001 (the finder protocol)
        if name != TEMPLATES_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _patch_loaded(module)


def install_import_hook() -> None:
    """Patch Ray's template now if it is loaded, else when it is imported; nothing when no setting is given."""
    if _settings() is None:
        return
    loaded = sys.modules.get(TEMPLATES_MODULE)
    if loaded is not None:
        _patch_loaded(loaded)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def local_env(host: str) -> dict[str, str]:
    """HAProxy's settings on a local cluster serving on ``host`` (part of every Ray process's environment): the HTTP
    front and both pages bind the serving host, the pages on free ports, so two clusters on one machine do not
    collide. The pages never face the network, even when the API does (``HOST=0.0.0.0``)."""
    from router.ports import free_port  # not at the top: importing this module stays free (the image's .pth)

    pages_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return {HOST_ENV: host, PAGES_HOST_ENV: pages_host,
            STATS_PORT_ENV: str(free_port(pages_host)), METRICS_PORT_ENV: str(free_port(pages_host))}
