"""The CPU platform rayroute's CPU replicas run vLLM on: vLLM's own, naming the Ray resource its Ray executor places
workers by, and chosen only where a replica asked for it."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from deployments import vllm_platform


def test_vllm_finds_the_plugin_through_the_package_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert plugins.get("rayroute_cpu") == "deployments.vllm_platform:cpu_platform"


def test_only_a_replica_that_asked_gets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_platform.PLATFORM_ENV, raising=False)
    assert vllm_platform.cpu_platform() is None  # a GPU replica, the router, bare vLLM: vLLM's own choice
    monkeypatch.setenv(vllm_platform.PLATFORM_ENV, "cpu")
    assert vllm_platform.cpu_platform() == "deployments.vllm_platform.RayCpuPlatform"


def test_it_is_vllms_cpu_platform_with_a_ray_device() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    platform = resolve_obj_by_qualname("deployments.vllm_platform.RayCpuPlatform")
    assert issubclass(platform, CpuPlatform) and platform().is_cpu()
    assert CpuPlatform.ray_device_key == ""  # why the plugin exists: vLLM's refuses its Ray executor
    assert platform.ray_device_key == "GPU"
