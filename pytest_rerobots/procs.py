"""The helper processes that outlive a run's own code: starting one detached, telling
whether a process lives or runs a given helper, and stopping one.

Two helpers use this: the watchdog (:mod:`.watchdog`), one per pytest process, and the
keepers (:mod:`.keep`), one per kept instance. Each is ``python -m <its module> ...``,
started in a session of its own (signals to the run's process group do not reach it), in
this package's directory (nothing in the user's working directory shadows an import), with
no file descriptor of ours but its pipes, and without the secrets of our environment: the
token reaches it on its stdin. Nothing here imports pytest or anything of this package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SECRET_VARIABLES", "exited", "ignore_terminal_signals", "pid_alive",
           "runs_helper", "spawn", "stop_helper"]

#: Variables a helper process never inherits: the token reaches it on its pipe.
SECRET_VARIABLES = ("REROBOTS_API_TOKEN",)

#: The directory that holds this package: a helper's working directory.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict[str, str]:
    """This process's environment without the secrets."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}


def spawn(module: str, *args: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start helper ``python -m module args...``, detached as the module docstring says,
    with a pipe to its stdin (and to its stdout if ``stdout`` is ``subprocess.PIPE``);
    its stderr goes nowhere."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.DEVNULL,
        cwd=PACKAGE_ROOT, start_new_session=True, close_fds=True, env=_child_env(),
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exited(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet has exited too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return not pid_alive(pid)
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited; its parent (init) reaps it


def runs_helper(pid: int, module: str, arg: str | None = None) -> bool:
    """Whether ``pid`` runs helper ``module`` as this user (with ``arg`` on its command
    line, if given), not some other process that got its number since; without ``/proc``,
    assumed if it lives."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists() and pid_alive(pid)
    except OSError:
        return False
    return (owner == os.geteuid() and module.encode() in argv
            and (arg is None or arg.encode() in argv))


def stop_helper(pid: int, module: str, arg: str | None = None, wait: float = 5.0) -> bool:
    """Stop helper ``pid`` (SIGTERM) if it runs ``module`` (:func:`runs_helper`), and wait
    up to ``wait`` s for it to exit; whether one was stopped."""
    if not runs_helper(pid, module, arg):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while not exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def ignore_terminal_signals() -> None:
    """For a helper process that must outlive its run: the dying run's terminal or process
    group may still send SIGINT and SIGHUP. (SIGTERM still stops it, for an operator who
    means it.)"""
    for name in ("SIGINT", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
