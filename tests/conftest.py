"""Hooks for every test: Ray's token auth is set before any test module imports Ray.

Fixtures live beside their users: ``unit/conftest.py`` (the router without Ray) and ``e2e/conftest.py`` (the one
shared local cluster).
"""

from __future__ import annotations

import os

import pytest

from router.ray_auth import RAY_AUTH_ENV


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(RAY_AUTH_ENV)  # before any test module imports Ray (see RAY_AUTH_ENV)
