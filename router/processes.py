"""Making sure a local cluster's processes are gone once it stops: the launcher's own stop (``router/launch.py``),
an in-process cluster's stop and the tests' check that Ctrl-C left nothing behind (``tests/e2e/harness.py``).

Ray stops the processes it knows; vLLM's engine-core processes are children of replicas, and one left behind by a
replica that died mid-shutdown would hold its memory forever. So whoever stops a cluster notes what it started
(:func:`descendants`, :func:`launched_by`) before stopping it, and afterwards ends what is still running
(:func:`reap`) or reports it (:func:`still_running`, :func:`describe`).

Waiting polls ``is_running()`` rather than use ``psutil.wait_procs``: its ``pidfd_open`` wait raised
``FileNotFoundError`` in CI for a process caught while exiting. The kernel answers ENOENT for a pid that is no
thread-group leader's; psutil 7.2 expects only ESRCH there. A zombie counts as gone: it holds no memory, and only its
parent can reap it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable

import psutil


def descendants(pid: int | None = None) -> list[psutil.Process]:
    """Every process ``pid`` (default: this one) started, directly or not and still its descendant; none if it is
    gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def launched_by(pid: int) -> set[psutil.Process]:
    """What a launcher started in a session of its own (``start_new_session``) has running: its descendants and,
    since Ray daemonizes its raylet and GCS away from the launcher's tree but they stay in its session, every process
    of that session."""
    return {*descendants(pid), *(p for p in psutil.process_iter() if _session_of(p) == pid)}


def still_running(processes: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes not gone within ``timeout`` seconds (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    return alive


def reap(processes: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Kill those of ``processes`` still running after ``timeout`` seconds; returns them."""
    alive = still_running(processes, timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return alive


def describe(proc: psutil.Process) -> str:
    """``pid:command line`` (its first 80 characters), for a report."""
    try:
        return f"{proc.pid}:{' '.join(proc.cmdline())[:80]}"
    except psutil.Error:
        return f"{proc.pid}:?"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _session_of(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
