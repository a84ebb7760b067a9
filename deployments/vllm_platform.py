"""vLLM's CPU platform, able to run its workers as Ray actors: so a CPU replica of several workers takes the path a
GPU replica takes (a placement group, vLLM's Ray executor), and the tests on a machine without GPUs prove it.

vLLM's own CPU platform names no Ray device (``ray_device_key`` is empty), and its Ray executor then refuses to
start ("current platform cpu does not support ray"). The executor places one worker per bundle that holds the
device key and asks Ray which devices each worker got (``get_accelerator_ids()[key]``), which knows only Ray's
accelerator names. So this platform names ``GPU``: a CPU replica's worker bundles hold one CPU, for the worker's
compute, and one logical ``GPU``, the worker's place, which CPU nodes declare as many as they hold workers (see
:class:`deployments.replica_resources.Resources`). Nothing reads the ``CUDA_VISIBLE_DEVICES`` Ray then sets.

A platform plugin, not a general one, because the platform is fixed the first time a process asks for it: a
worker asks (for its device ids) before vLLM loads general plugins there. vLLM resolves the platform in every
process it runs (the replica, its engine core, every worker) and finds this plugin through the package's entry
point (``vllm.platform_plugins`` in ``pyproject.toml``); it takes part only where :data:`PLATFORM_ENV` says ``cpu``,
which a CPU model's replica sets in its ``runtime_env`` and vLLM hands on to the engine core and the workers.
Importing this module imports nothing of vLLM (the config reads its names); the class is built when vLLM asks for it.
"""

from __future__ import annotations

import os

# Set in a CPU model's replicas (deployments/replica_resources.py); vLLM's own VLLM_TARGET_DEVICE=cpu must not be set
# with it, since vLLM then takes its CPU platform without asking any plugin.
PLATFORM_ENV = "RAYROUTE_VLLM_PLATFORM"
# The Ray resource a worker takes as its place, on the CPU as on GPUs.
RAY_DEVICE_KEY = "GPU"


def cpu_platform() -> str | None:
    """The entry point vLLM calls: this platform's class where the replica asked for it, otherwise None."""
    return f"{__name__}.RayCpuPlatform" if os.environ.get(PLATFORM_ENV) == "cpu" else None


def __getattr__(name: str) -> type:
    # vLLM imports the class by name once it chose it; defined on demand so that loading the entry point (which
    # vLLM does in every process, GPU ones included) imports no platform code.
    if name != "RayCpuPlatform":
        raise AttributeError(name)
    from vllm.platforms.cpu import CpuPlatform

    class RayCpuPlatform(CpuPlatform):
        ray_device_key = RAY_DEVICE_KEY

    RayCpuPlatform.__qualname__ = name  # as if defined at the top level, which is how vLLM names it
    globals()[name] = RayCpuPlatform
    return RayCpuPlatform
