"""The simulated robot hosts' manager: real SSH servers on loopback, one per instance.

A :class:`HostManager` owns every host of one simulator. Each host has

* its own directory ``root/<instance_id>``, the instance's ``HOME`` and the
  working directory of every command, populated from the catalog's files and
  set up by running its commands once;
* its own freshly generated ``ecdsa-sha2-nistp256`` host key (the type real
  rerobots hosts report in ``hostkeys``);
* a listening socket on ``127.0.0.1`` with an ephemeral port, behind the
  instance's firewall (:mod:`.host`);
* where the machine can make one, a sandbox of its own (:mod:`.sandbox`) in which its
  setup commands, its sessions and its serial devices' emulators run; the sandbox's
  ``/etc`` comes from one filtered copy of the runner's, made at the first host's start.

One asyncio event loop in one daemon thread per manager serves all of its hosts, whichever
backend serves the SSH protocol: ``asyncssh`` in-process (:mod:`.asyncssh_backend`, the
default) or OpenSSH's sshd (:mod:`.openssh_backend`). Everything a host starts carries a
per-host marker in its environment (:mod:`.processes`), so that :meth:`HostManager.stop_host`
finds and kills it by pid; in a sandbox, the end of its PID namespace ends everything else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ...errors import ConfigurationError, RerobotsError
from ..hostproto import HostInfo
from ._asyncssh import asyncssh
from .asyncssh_backend import AsyncsshHost
from .host import Host, HostContext
from .openssh_backend import OpensshHost, OpensshSetup
from .processes import Leftovers
from .sandbox import Sandbox, SandboxSetup, make_etc_template

__all__ = ["BACKENDS", "SANDBOX_MODES", "HostManager"]

log = logging.getLogger(__name__)

#: The SSH server implementations a :class:`HostManager` can run.
BACKENDS = ("asyncssh", "openssh")
#: Whether hosts run sandboxed: when the machine can ("auto"), always (else a
#: ConfigurationError), or never.
SANDBOX_MODES = ("auto", "require", "off")

_SETUP_TIMEOUT = 300.0  # seconds for one catalog command at start_host
_START_TIMEOUT = 15.0  # seconds for a host to start listening
_STOP_TIMEOUT = 10.0  # seconds for a host to close down

T = TypeVar("T")


class HostManager:
    """Start and stop simulated robot hosts; thread-safe; a context manager.

    A :class:`~pytest_rerobots.sim.hostproto.HostBackend`.

    ``root`` holds one directory per host (left in place after the host stops,
    for inspection; the caller owns ``root``). ``backend`` is ``"asyncssh"`` or
    ``"openssh"``; anything else is a :class:`ConfigurationError`, and so is
    ``"openssh"`` without ``/usr/sbin/sshd``. ``sandbox`` is one of :data:`SANDBOX_MODES`:
    each host's commands run in a sandbox of their own (:mod:`.sandbox`) where the machine
    can make one; where it cannot, ``"auto"`` logs one warning and runs them unsandboxed,
    ``"require"`` is a :class:`ConfigurationError`.
    """

    #: Starting a host takes time: the world runs it on a worker thread.
    instant = False

    def __init__(self, root: pathlib.Path, backend: str = "asyncssh",
                 sandbox: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ConfigurationError(
                f"unknown SSH host backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        if sandbox not in SANDBOX_MODES:
            raise ConfigurationError(
                f"unknown sandbox mode {sandbox!r}; choose one of {', '.join(SANDBOX_MODES)}")
        self._sandbox: SandboxSetup | None = None
        #: Why the hosts run unsandboxed, or None when they are sandboxed.
        self.sandbox_problem: str | None = "the sandbox is switched off"
        if sandbox != "off":
            probed = SandboxSetup.probe()
            if not isinstance(probed, str) and probed.userns and backend == "openssh":
                # sshd's privilege separation needs users that a user namespace of our
                # own cannot map.
                probed = ("the openssh backend is sandboxed only when the simulator runs "
                          "as root; the asyncssh backend is sandboxed as any user")
            if isinstance(probed, str):
                self.sandbox_problem = probed
                if sandbox == "require":
                    raise ConfigurationError(
                        f"the simulator cannot sandbox its robots: {probed}")
                log.warning(
                    "simulated robots run UNSANDBOXED, as this user on this machine: their "
                    "commands can change this machine's files and processes (%s)", probed)
            else:
                self._sandbox, self.sandbox_problem = probed, None
        self.root = pathlib.Path(root)
        self.backend = backend
        self._openssh = OpensshSetup.probe() if backend == "openssh" else None
        #: The user that can log in: ``root``, except for the openssh backend
        #: run by another user (a non-root sshd can only log in its own user).
        self.login_user = self._openssh.login_user if self._openssh is not None else "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._template_lock = threading.Lock()
        self._template: pathlib.Path | None = None
        self._hosts: dict[str, Host | None] = {}  # None: starting
        self._closed = False
        self._errors: list[BaseException] = []
        # Firewall callables run here, not on the loop: the simulator may call
        # stop_host while holding the very lock its firewall callable needs.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="rerobots-sim-firewall"
        )
        self._loop = _LoopThread(self._record_error)
        # Should this manager be dropped without close() (a crashed test,
        # interpreter exit), whatever its hosts started is still killed by pid.
        self._leftovers = Leftovers()
        self._finalizer = weakref.finalize(self, self._leftovers.clean)
        self._context = HostContext(self._executor, self._leftovers, self._record_error)

    # -- public API --------------------------------------------------------

    def start_host(
        self,
        instance_id: str,
        *,
        authorized_keys: list[str],
        firewall: Callable[[str], str],
        files: dict[str, str],
        commands: list[str],
        devices: dict[str, str] | None = None,
    ) -> HostInfo:
        """Create, set up and start the host of ``instance_id``; return once it listens.

        ``authorized_keys`` are OpenSSH public key lines; ``firewall(src_ip)``
        is called for each new TCP connection and returns ``"ACCEPT"``,
        ``"DROP"`` or ``"REJECT"``; ``files`` maps paths relative to the host's
        directory to their text (executable when it starts with ``#!``);
        ``commands`` run once, in order, through ``/bin/sh`` in that directory;
        ``devices`` maps device paths on the robot (``/dev/ttyUSB0``) to the command that
        serves each, a pseudo-terminal whose other end is the command's stdin and stdout
        (sandboxed hosts only: unsandboxed, the devices are left out). A failing
        command, a bad path or a bad key is a :class:`ConfigurationError`.
        """
        if not re.fullmatch(r"[A-Za-z0-9._-]+", instance_id) or instance_id in {".", ".."}:
            raise ConfigurationError(f"instance id {instance_id!r} cannot name a host directory")
        with self._lock:
            self._check_open()
            if instance_id in self._hosts:
                raise ConfigurationError(f"a host for instance {instance_id} is already running")
            self._hosts[instance_id] = None  # reserve the id while we set up outside the lock
        sandbox: Sandbox | None = None
        try:
            directory = self.root / instance_id
            directory.mkdir(parents=True, exist_ok=True)
            keys = _parse_authorized_keys(authorized_keys)
            _populate(directory, files)
            host = self._new_host(instance_id, directory, keys, firewall)
            if self._sandbox is not None:
                sandbox = Sandbox(self._sandbox, f"sim-{instance_id[:8]}", host.directory,
                                  self._etc_template(), devices=dict(devices or {}))
                sandbox.start()
                self._leftovers.pids.update((sandbox.pid, sandbox.bwrap_pid))
                host.sandbox = sandbox
            for command in commands:
                _run_setup_command(host, command)
            if sandbox is not None:
                sandbox.start_serials(host.env())
            self._loop.run(host.start(), timeout=_START_TIMEOUT + 5)
        except BaseException:
            with self._lock:
                self._hosts.pop(instance_id, None)
            if sandbox is not None:
                sandbox.stop()
            raise
        with self._lock:
            if self._closed:  # close() ran meanwhile: do not leak this host
                self._hosts.pop(instance_id, None)
                closed = True
            else:
                self._hosts[instance_id] = host
                closed = False
        if closed:
            with contextlib.suppress(RerobotsError):
                self._loop.run(host.stop(), timeout=_STOP_TIMEOUT + 5)
            raise RerobotsError("HostManager was closed while the host was starting")
        return HostInfo(port=host.port, hostkey=host.hostkey, directory=directory)

    def stop_host(self, instance_id: str) -> None:
        """Close the host's listener and every live connection; kill what it started.

        Idempotent: an unknown or already stopped id is not an error. A host
        whose ``start_host`` has not returned yet is not stopped: its caller
        stops it once it is up.
        """
        with self._lock:
            host = self._hosts.get(instance_id)
            if host is None:  # unknown, stopped, or still starting (start_host cleans up)
                return
            del self._hosts[instance_id]
        self._loop.run(host.stop(), timeout=_STOP_TIMEOUT + 5)

    def partition_host(self, instance_id: str) -> None:
        """Make the host stop answering, its connections left open (see
        :meth:`.hostproto.HostBackend.partition_host`); unknown ids are ignored."""
        with self._lock:
            host = self._hosts.get(instance_id)
        if host is not None:
            self._loop.run(host.partition(), timeout=_STOP_TIMEOUT + 5)

    def drop_connections(self, instance_id: str) -> None:
        """Drop the host's SSH connections; it keeps listening. Unknown ids are ignored."""
        with self._lock:
            host = self._hosts.get(instance_id)
        if host is not None:
            self._loop.run(host.drop_connections(), timeout=_STOP_TIMEOUT + 5)

    def close(self) -> None:
        """Stop every host, then the event loop thread and the firewall workers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hosts = [h for h in self._hosts.values() if h is not None]
            self._hosts.clear()
        try:
            if hosts:
                self._loop.run(_gather(*(h.stop() for h in hosts)), timeout=_STOP_TIMEOUT + 5)
        finally:
            self._loop.close()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._finalizer()  # anything a host failed to stop

    def check(self) -> None:
        """Raise the first unexpected error seen in the hosts' thread since the last check.

        Errors of the calls themselves (``start_host`` and so on) reach their
        caller directly; this is for what happened in the background, such as a
        firewall callable that raised. Raising forgets them.
        """
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise RerobotsError(f"simulated host failed: {errors[0]!r}") from errors[0]

    def __enter__(self) -> HostManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RerobotsError("HostManager is closed")

    def _etc_template(self) -> pathlib.Path:
        """The /etc every sandboxed host starts from, copied at the first one's start."""
        with self._template_lock:
            if self._template is None:
                # In memory where the machine has a tmpfs for it: a tenth of a disk copy's
                # time (mkdtemp makes a private directory there, mode 0700).
                shm = pathlib.Path("/dev/shm")  # noqa: S108
                parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.root
                _remove_stale_templates(parent)
                holder = pathlib.Path(
                    tempfile.mkdtemp(prefix=f"rerobots-etc-{os.getpid()}-", dir=parent))
                self._leftovers.dirs.add(holder)  # removed at close, or by the finalizer
                make_etc_template(holder / "etc")
                self._template = holder / "etc"
            return self._template

    def _new_host(self, instance_id: str, directory: pathlib.Path, keys: list[str],
                  firewall: Callable[[str], str]) -> Host:
        if self._openssh is not None:
            return OpensshHost(self._context, self._openssh, instance_id, directory, keys,
                               firewall)
        return AsyncsshHost(self._context, instance_id, directory, keys, firewall)

    def _record_error(self, exc: BaseException) -> None:
        log.error("simulated host error", exc_info=exc)
        with self._lock:
            self._errors.append(exc)


def _remove_stale_templates(parent: pathlib.Path) -> None:
    """Remove the /etc copies of simulators that were killed before they could clean up."""
    for entry in parent.glob("rerobots-etc-*-*"):
        pid = entry.name.split("-")[2]
        if not pid.isdigit() or entry.stat().st_uid != os.geteuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


# -- the event loop thread ---------------------------------------------------


class _LoopThread:
    """One asyncio event loop running in one daemon thread."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self.loop = asyncio.new_event_loop()
        self._on_error = on_error
        self.loop.set_exception_handler(self._handle_exception)
        self._thread = threading.Thread(
            target=self._main, name="rerobots-sim-hosts", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _handle_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # A peer that vanishes mid-write is routine for a test server.
        if isinstance(exc, (ConnectionError, asyncssh.Error)):
            return
        self._on_error(exc or RuntimeError(context.get("message", "event loop error")))

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float) -> T:
        """Run ``coro`` on the loop and return its result here, or raise its error here."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise RerobotsError(f"simulated host did not answer within {timeout:g} s") from exc

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def _shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(_STOP_TIMEOUT)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


async def _gather(*aws: Awaitable[Any]) -> None:
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- setting a host up ---------------------------------------------------------


def _parse_authorized_keys(lines: list[str]) -> list[str]:
    keys = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigurationError(f"not an OpenSSH public key: {line[:60]!r}") from exc
        keys.append(line)
    return keys


def _populate(directory: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = pathlib.PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ConfigurationError(f"host file {rel!r} must be a relative path inside the host")
        target = directory.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        if text.startswith("#!"):
            target.chmod(0o755)


def _run_setup_command(host: Host, command: str) -> None:
    instance_id, directory = host.instance_id, host.directory
    env = host.env()
    try:
        done = subprocess.run(
            host.argv("/bin/sh", "-c", command),
            cwd=directory,
            env=env,
            pass_fds=host.pass_fds,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_SETUP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(
            f"setup command of instance {instance_id} ran over {_SETUP_TIMEOUT:g} s: {command!r}"
        ) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise ConfigurationError(
            f"setup command of instance {instance_id} exited with status {done.returncode}: "
            f"{command!r}" + (f"\n{tail}" if tail else "")
        )
