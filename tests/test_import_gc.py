"""Imports with the garbage collector paused (common/import_gc.py): what they build is frozen,
and the collector is left as the caller had it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from common.import_gc import imports_without_gc


@pytest.fixture(autouse=True)
def nothing_left_frozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()


def _collected(obj: object) -> bool:
    """Whether the collector still walks `obj` (frozen objects are in none of its generations)."""
    return any(tracked is obj for tracked in gc.get_objects())


def test_the_block_runs_without_the_collector_and_what_it_built_is_frozen() -> None:
    with imports_without_gc():
        assert not gc.isenabled()
        built = [[index] for index in range(1_000)]  # lists: objects the collector tracks
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(built)
    assert not _collected(built[0]) and not _collected(built[-1])
    after = [0]
    assert _collected(after)  # what is built afterwards is collected as usual


def test_a_collector_the_caller_paused_stays_paused() -> None:
    gc.disable()
    with imports_without_gc():
        pass
    assert not gc.isenabled()


def test_a_failed_import_still_restores_the_collector() -> None:
    with pytest.raises(ModuleNotFoundError), imports_without_gc():
        import vidflow_no_such_module  # noqa: F401
    assert gc.isenabled()
