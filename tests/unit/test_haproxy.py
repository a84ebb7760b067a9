"""Ray's HAProxy template as rayroute patches it (router/haproxy.py), on the installed Ray's own template."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from router import haproxy


def _template() -> str:
    from ray.serve._private import haproxy_templates

    return haproxy_templates.HAPROXY_CONFIG_TEMPLATE


def _section(config: str, header: str) -> str:
    """The lines of one section (``defaults``, ``listen stats``) up to the next unindented line."""
    lines = config.splitlines()
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end])


def test_pages_bind_the_loopback_and_the_front_stays_as_ray_has_it() -> None:
    patched = haproxy.patch_template(_template(), "127.0.0.1", None, 7)
    assert "bind 127.0.0.1:{{ config.metrics_port }}" in patched
    assert "bind 127.0.0.1:{{ config.stats_port }}" in _section(patched, "listen stats")
    assert "bind {{ config.frontend_host }}:{{ config.frontend_port }}" in patched
    assert "bind *:" not in patched and "bind :" not in patched


def test_the_front_binds_the_serving_host_when_given() -> None:
    patched = haproxy.patch_template(_template(), "127.0.0.2", "127.0.0.2")
    assert "bind 127.0.0.2:{{ config.frontend_port }}" in patched


def test_every_request_has_a_deadline_for_its_headers_and_carries_the_peer_address() -> None:
    defaults = _section(haproxy.patch_template(_template(), None, None, 7), "defaults")
    assert "    timeout http-request 7s" in defaults.splitlines()
    assert "    option forwardfor" in defaults.splitlines()


def test_the_admin_socket_is_its_owners_only() -> None:
    patched = haproxy.patch_template(_template(), None, None)
    assert "mode 600 level admin" in patched and "mode 666" not in patched


def test_a_template_without_a_patched_line_is_an_error_not_a_silent_miss() -> None:
    with pytest.raises(haproxy.TemplateChanged):
        haproxy.patch_template(_template().replace("bind *:{{ config.stats_port }}", "bind *:8404"), "127.0.0.1", None)


def test_the_import_hook_patches_ray_when_serve_imports_it() -> None:
    """As in the chart's image, where a .pth file installs the hook before anything imports Ray."""
    code = ("import router.haproxy as h; h.install_import_hook(); "
            "from ray.serve._private import haproxy as manager; "
            "print('bind 127.0.0.1:{{ config.stats_port }}' in manager.HAPROXY_CONFIG_TEMPLATE, "
            "'timeout http-request 9s' in manager.HAPROXY_CONFIG_TEMPLATE)")
    env = {**os.environ, haproxy.PAGES_HOST_ENV: "127.0.0.1", haproxy.REQUEST_TIMEOUT_ENV: "9"}
    env.pop(haproxy.HOST_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


def test_without_settings_the_hook_changes_nothing() -> None:
    code = ("import sys, router.haproxy as h; h.install_import_hook(); "
            "print(any(type(f).__name__ == '_PatchOnImport' for f in sys.meta_path))")
    env = {k: v for k, v in os.environ.items()
           if k not in (haproxy.PAGES_HOST_ENV, haproxy.HOST_ENV, haproxy.REQUEST_TIMEOUT_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
