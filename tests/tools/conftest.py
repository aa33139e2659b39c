"""Fixtures of the harness tests: the fuzz bases (tools/fuzz/bases.py), made once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fuzz_bases(tmp_path_factory):
    """The base artifacts every fuzz case breaks a copy of; the forked runner's imports preloaded."""
    from tools.fuzz.bases import make_bases
    from tools.fuzz.runner import preload

    b = make_bases(tmp_path_factory.mktemp("fuzz_bases"))
    preload()
    return b
