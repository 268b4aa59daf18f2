"""One instance per (type, deployment) for a whole pytest-xdist run (``--rerobots-xdist shared``).

The workers coordinate through a directory the controller made for the run: per
key, a JSON state file guarded by an exclusive ``flock``. The first worker to
ask rents the instance while holding the lock (the others wait on it, as they
would wait for READY anyway); later ones attach to it with the key the server
generated for it. Each user runs its own keepalive. The last user to release
it terminates it; a user that leaves earlier detaches. A worker that dies
holding the lock releases it with its file descriptors; one that dies while
using the instance leaves it to the controller, which ends every live
instance of the run that the ledger holds.

The watchdog of a worker that died asks the pool whether others still use an instance
(:meth:`SharedPool.abandon`), so this module loads neither the client nor the instances.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RerobotsError
from .procs import pid_alive  # (a crashed worker is no user any more)

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["SharedPool"]


class SharedPool:
    """Shared instances of one xdist run, keyed by an arbitrary string."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _paths(self, key: str) -> tuple[Path, Path]:
        slug = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.directory / f"{slug}.lock", self.directory / f"{slug}.json"

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[dict[str, Any]]:
        """The key's state, under the key's lock; written back when the block ends."""
        lock_path, state_path = self._paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(state_path.read_text())
            except (FileNotFoundError, ValueError):
                state = {}
            try:
                yield state
            finally:
                # Also when the block raised: a failure recorded in the state must stick.
                tmp = state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(state_path)
        finally:
            os.close(fd)

    def acquire(self, key: str, make: Callable[[str | None], Instance]) -> Instance:
        """The run's instance for ``key``: ``make(None)`` makes an unstarted Instance to
        rent, ``make(id)`` one that attaches to ``id``."""
        me = os.getpid()
        with self._locked(key) as state:
            if state.get("error"):
                raise RerobotsError(f"the shared instance failed in another worker: "
                                    f"{state['error']}")
            # A renter that crashed is no user: its watchdog or the controller ends it.
            state["users"] = [u for u in state.get("users", []) if pid_alive(u)]
            live = state.get("id") and state["users"]
            inst = make(state["id"] if live else None)
            inst.shared_key = (str(self.directory), key)
            try:
                inst.start()
            except Exception as exc:
                if not live:
                    state["error"] = f"{type(exc).__name__}: {exc}"
                raise
            state["id"] = inst.id
            state["users"] = [*state.get("users", []), me]
        return inst

    def abandon(self, key: str, pid: int, instance_id: str) -> bool:
        """User ``pid`` died without releasing ``key``'s instance ``instance_id``: drop it.
        True if other live users of that same instance remain, in which case it must be
        left running (the watchdog of a crashed worker asks this before ending anything)."""
        with self._locked(key) as state:
            if state.get("id") != instance_id:
                return False  # the key holds another instance now (or none): ours is free
            users = [u for u in state.get("users", []) if u != pid and pid_alive(u)]
            state["users"] = users
            if not users:
                state.pop("id", None)
        return bool(users)

    def release(self, key: str, inst: Instance) -> None:
        """Leave the instance: terminate it if this is its last user, else detach."""
        me = os.getpid()
        with self._locked(key) as state:
            users = [u for u in state.get("users", []) if u != me and pid_alive(u)]
            state["users"] = users
            if users:
                inst.detach()
                return
            state.pop("id", None)
        inst.terminate()
