"""The public surface: a sorted ``__all__`` whose names all exist, and a typed package."""

from __future__ import annotations

from pathlib import Path

import pytest_rerobots


def test_all_is_sorted_and_complete():
    names = pytest_rerobots.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(pytest_rerobots, name), name


def test_package_is_typed():
    assert (Path(pytest_rerobots.__file__).parent / "py.typed").exists()


def test_every_error_derives_from_the_one_base():
    from pytest_rerobots import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type):
            assert issubclass(cls, errors.RerobotsError), name


def test_the_errors_a_test_may_catch_are_exported_from_the_package():
    import pytest_rerobots
    from pytest_rerobots import errors

    # Only the internal refinement of MalformedResponse and the helper function stay out.
    assert set(errors.__all__) - set(pytest_rerobots.__all__) == {
        "UnreadableNewAnswer", "is_infrastructure"}
