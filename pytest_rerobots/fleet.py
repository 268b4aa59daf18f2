"""Starting and ending several instances at once, each in a thread of its own.

:func:`start_all` starts them concurrently and calls the others off (:class:`Aborted`)
when one fails; :func:`end_all` ends them concurrently; :func:`wait_all` waits for
threads from the waiting thread without ``Thread.join()``. Nothing here knows how an
instance is rented or ended: it calls ``start`` and ``end`` of each, so the instance
module builds on this one, not the other way round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import InstanceError

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["Aborted", "end_all", "start_all", "wait_all"]


class Aborted(BaseException):
    """A start called off from another thread (a sibling's failure, or Ctrl-C in the
    thread that started them). A BaseException, like KeyboardInterrupt, so that nothing
    on the way mistakes it for an error to retry; :meth:`Instance.start` ends what was
    rented before it propagates."""


def start_all(instances: Sequence[Instance]) -> list[Instance]:
    """Start several instances concurrently (rent, READY, firewall, SSH), in order.

    If one fails, the others are called off and everything rented is ended before
    an :class:`~.errors.InstanceError` naming the one that failed propagates (the
    failure itself is its ``__cause__``). Ctrl-C (in the calling thread) calls them
    all off and ends what they rented, then propagates.
    """
    if len(instances) == 1:
        return [instances[0].start()]
    abort = threading.Event()
    failures: dict[int, BaseException] = {}

    done = [threading.Event() for _ in instances]

    def start(k: int, inst: Instance) -> None:
        try:
            inst.start()
        except BaseException as exc:  # recorded; the calling thread decides
            failures[k] = exc
            abort.set()
        finally:
            done[k].set()

    for k, inst in enumerate(instances):
        inst._abort = abort  # (before the thread starts: a Ctrl-C may come at once)
        threading.Thread(target=start, args=(k, inst), daemon=True,
                         name=f"rerobots-start-{k}").start()
    def shown() -> None:
        for inst in instances:
            inst.show_progress()

    try:
        wait_all(done, shown)
    except BaseException:
        abort.set()  # Ctrl-C: each start ends what it rented
        wait_all(done)
        end_all(instances)
        raise
    finally:
        for inst in instances:
            inst._abort = None
    real = {k: e for k, e in failures.items() if not isinstance(e, Aborted)}
    if real:
        end_all(instances)
        k, exc = min(real.items())
        others = len(instances) - 1
        raise InstanceError(
            f"{instances[k].label} (robot {k + 1} of {len(instances)}) failed: "
            f"{type(exc).__name__}: {exc}; the other {others} "
            f"{'was' if others == 1 else 'were'} ended", instance_id=instances[k].id,
        ) from exc
    return list(instances)


def end_all(instances: Iterable[Instance]) -> None:
    """End several instances concurrently (:meth:`Instance.end`); raises the first error
    after trying them all."""
    pending = [i for i in instances if i.outcome is None]
    if len(pending) <= 1:
        for inst in pending:
            inst.end()
        return
    errors: list[Exception] = []

    def end_one(inst: Instance) -> None:
        try:
            inst.end()
        except Exception as exc:
            errors.append(exc)

    done = [threading.Event() for _ in pending]

    def run_one(k: int, inst: Instance) -> None:
        try:
            end_one(inst)
        finally:
            done[k].set()

    for k, inst in enumerate(pending):
        threading.Thread(target=run_one, args=(k, inst), name="rerobots-end",
                         daemon=True).start()
    wait_all(done)
    if errors:
        raise errors[0]


def wait_all(events: Iterable[threading.Event],
             tick: Callable[[], None] | None = None) -> None:
    """Wait until every event is set, calling ``tick`` about every half second (the
    progress of what is awaited is shown from the waiting thread). (Not
    ``Thread.join()``: on CPython before 3.13 a join interrupted by Ctrl-C marks the
    thread as stopped, and every later join of it returns at once, while it still runs.)"""
    for event in events:
        while not event.wait(0.5):
            if tick is not None:
                tick()
    if tick is not None:
        tick()
