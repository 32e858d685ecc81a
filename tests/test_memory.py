"""A loading process asks glibc for few malloc arenas (its resident size then follows what it
holds, not how long it ran), unless the user chose."""

from __future__ import annotations

import sys

import pytest

from etl.memory import few_malloc_arenas


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_is_asked_for_two_arenas_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert few_malloc_arenas() is False  # the user's choice stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert few_malloc_arenas() is True
