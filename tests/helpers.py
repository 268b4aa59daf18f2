"""Small helpers several test modules share (imported as ``helpers``: pytest puts this
directory on ``sys.path``, as it has no ``__init__.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pytest_rerobots import keep
from pytest_rerobots.sim.launch import SimProcess, start_process


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds (asked once more at
    the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@contextmanager
def sim_process(*args: str, **kwargs: Any) -> Iterator[SimProcess]:
    """``python -m pytest_rerobots.sim --port 0 *args`` serving (see
    :func:`pytest_rerobots.sim.launch.start_process`, which takes ``kwargs``); stopped by
    its process id afterwards."""
    sim = start_process(*args, **kwargs)
    try:
        yield sim
    finally:
        sim.stop()


def store(pytester: pytest.Pytester) -> Path:
    """The kept-instance store of ``pytester``'s project (beside its default ledger)."""
    return pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl.kept"


def records(pytester: pytest.Pytester) -> list[dict]:
    """The records of that store: kept, reused and rented-ahead instances."""
    return keep.KeptStore(store(pytester)).records()
