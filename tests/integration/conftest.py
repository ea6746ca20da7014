"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cost_cache(tmp_path_factory):
    """One cost-table cache per module: a worker profiles at its first start, later ones reuse it."""
    return str(tmp_path_factory.mktemp("cost"))
