"""A local simulator of the rerobots HTTP API whose instances are real SSH servers.

::

    from pytest_rerobots.sim import Simulator

    with Simulator(ready_delay=0.1) as sim:       # built-in catalog, faster READY
        api = RerobotsClient(token=sim.token, api_url=sim.url)
        sim.lose_new_responses(1)                 # inject a fault at run time
        ...
        assert sim.request_count("new") == 1      # requests answered, per endpoint
        assert sim.live_instances() == []

The parts: :mod:`.catalog` (the TOML catalog), :mod:`.endpoints` (the one table of
endpoints), :mod:`.model` (statuses, deployments, instances), :mod:`.world` (the world and
its clock), :mod:`.renting` (what POST /new decides), :mod:`.background` (the world's work off
its lock), :mod:`.accounts` (tokens and rate limits), :mod:`.faults` (fault injection),
:mod:`.eurl` (status events), :mod:`.ci` (CI projects), :mod:`.api` (the WSGI routes and
every body), :mod:`.server` (the limited HTTP server), :mod:`.hostproto` (the protocol
between the world and its hosts), :mod:`.hosts` (SSH servers per instance), :mod:`.__main__`
(the ``rerobots-sim`` command) and :mod:`.launch` (that command in a process of its own).
Nothing here imports pytest.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigurationError
from .api import RequestHandler, SimApp
from .catalog import (
    PROFILES,
    Catalog,
    apply_overrides,
    default_catalog,
    load_catalog,
    profile_catalog,
)
from .hostproto import HostBackend, NullHostManager
from .model import InstanceSnapshot
from .server import LimitedServer, ServerLimits
from .world import ManualClock, World

__all__ = ["SSH_BACKENDS", "Catalog", "ManualClock", "ServerLimits", "Simulator", "World"]

log = logging.getLogger(__name__)

#: Values of ``ssh_backend``: in-process asyncssh, OpenSSH's sshd, or no SSH at all.
SSH_BACKENDS = ("asyncssh", "openssh", "none")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolve_catalog(config: str | Path | Catalog | None) -> Catalog:
    if config is None:
        return default_catalog()
    if isinstance(config, Catalog):
        return config
    if isinstance(config, (str, Path)):
        # A bare profile name is the profile, never a file of that name (the plugin hands
        # over its option as a Path).
        if str(config) in PROFILES:
            return profile_catalog(str(config))
        return load_catalog(config)
    raise ConfigurationError(f"simulator config: expected a path, a profile name or a "
                             f"Catalog, got {config!r}")


class Simulator:
    """The simulated rerobots API, served on loopback in a background thread.

    ``config`` is a catalog file (which adds to the built-in catalog unless it says
    ``replace_builtin = true``), the name of a built-in profile (:data:`~.catalog.PROFILES`:
    ``"realistic"``), a :class:`~.catalog.Catalog` or ``None`` (the built-in catalog, fast
    and shaped like the real service); the format is in ``docs/simulator-catalog.md``.
    ``port=0`` picks a free port. ``token`` is the default user's token (made
    with :mod:`secrets` unless given). ``ssh_backend`` is one of :data:`SSH_BACKENDS`.
    ``clock`` replaces :func:`time.time` (see :class:`~.world.ManualClock`). ``overrides``
    replace catalog settings by their flat names (``ready_delay=0.05``, ``token_budget=5``,
    ``stuck_init=True``, ...; see :data:`~.catalog.OVERRIDE_KEYS`). ``limits`` bounds what a
caller may cost the HTTP server (:class:`~.server.ServerLimits`: body size, JSON depth,
connection timeouts and count, the rate table, and whether ``X-Forwarded-For`` is believed).

    A context manager: ``__enter__`` starts (and cleans up a half-finished start),
    ``__exit__`` stops. :meth:`stop` is idempotent.
    """

    def __init__(
        self,
        config: str | Path | Catalog | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        ssh_backend: str = "asyncssh",
        clock: Callable[[], float] | None = None,
        user: str = "tester",
        tick_interval: float = 0.025,
        limits: ServerLimits | None = None,
        **overrides: Any,
    ) -> None:
        if not _is_loopback(host):
            raise ConfigurationError(
                f"simulator host: {host!r} is not a loopback address; the simulator serves "
                "only this machine (use 127.0.0.1)")
        if ssh_backend not in SSH_BACKENDS:
            raise ConfigurationError(
                f"simulator ssh_backend: {ssh_backend!r} is not one of {', '.join(SSH_BACKENDS)}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"simulator port: expected 0..65535, got {port!r}")
        if limits is not None and not isinstance(limits, ServerLimits):
            raise ConfigurationError(f"simulator limits: expected ServerLimits, got {limits!r}")
        self.limits = limits if limits is not None else ServerLimits()
        catalog = _resolve_catalog(config)
        if overrides:
            catalog = apply_overrides(catalog, overrides, "Simulator()")
        self.catalog = catalog
        self.host = host
        self.port = port
        self.ssh_backend = ssh_backend
        self.user = user
        self.world = World(catalog, clock=clock, tick_interval=tick_interval)
        self.world.accounts.max_windows = self.limits.rate_table_max
        self.token = self.world.accounts.add_token(user, token or secrets.token_urlsafe(32))
        self._server: LimitedServer | None = None
        self._app: SimApp | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._root: Path | None = None
        self._errors: list[BaseException] = []
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The API origin, e.g. ``http://127.0.0.1:8666`` (valid once started)."""
        if self._server is None:
            raise RuntimeError("the simulator is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._server.server_port}"

    def start(self) -> Simulator:
        """Start the hosts, the world's threads and the HTTP server; returns ``self``. If
        that fails, what was started is stopped and the temporary directory removed."""
        if self._started:
            return self
        if self._stopped:
            raise RuntimeError("a stopped simulator cannot be started again")
        self._started = True
        self._root = Path(tempfile.mkdtemp(prefix="rerobots-sim-"))
        try:
            self._start_in(self._root)
        except BaseException:
            # A failed start leaves nothing behind: no hosts, no threads, no directory.
            self.stop()
            raise
        return self

    def _start_in(self, root: Path) -> None:
        self.world.hosts = self._make_hosts(root)
        self.world.start()
        app = self._app = SimApp(self.world, self.limits)
        try:
            self._server = LimitedServer(self.host, self.port, app, self.limits,
                                         handler=RequestHandler)
        except SystemExit as exc:
            # werkzeug reports a failed bind on stderr and exits; turn that into our error.
            raise ConfigurationError(
                f"simulator: cannot listen on {self.host}:{self.port}") from exc
        app.on_body_read = self._server.body_read
        app.on_body_refused = self._server.refused_body
        self.world.background.wait_quiet = self._server.wait_quiet
        self._thread = threading.Thread(target=self._serve, name="rerobots-sim-http",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the simulator's HTTP server did not start")
        self.check()

    def _make_hosts(self, root: Path) -> HostBackend:
        if self.ssh_backend == "none":
            return NullHostManager(root)
        try:
            from .hosts import HostManager  # imported late: asyncssh is the 'sim' extra
        except ImportError as exc:
            raise ConfigurationError(
                f"simulator ssh_backend {self.ssh_backend!r} needs the 'sim' extra "
                f"(pip install 'pytest-rerobots[sim]'): {exc}") from exc
        sandbox = "require" if self.catalog.switches.require_sandbox else "auto"
        return HostManager(root, backend=self.ssh_backend, sandbox=sandbox)

    def _serve(self) -> None:
        assert self._server is not None
        self._ready.set()
        try:
            self._server.serve_forever(poll_interval=0.05)
        except BaseException as exc:  # surfaced by check(); the thread must not die silently
            log.exception("the simulator's HTTP server failed")
            self._errors.append(exc)

    def stop(self) -> None:
        """Stop serving, stop every host and thread, remove the temporary directory.

        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.world.close()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def check(self) -> None:
        """Re-raise the first error of a background thread (HTTP server, ticker, hosts)."""
        if self._errors:
            raise self._errors[0]
        self.world.check()
        self.world.hosts.check()

    def __enter__(self) -> Simulator:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ conveniences

    def add_user(self, name: str) -> str:
        """Register another user; returns a fresh token of theirs."""
        return self.world.accounts.add_token(name)

    def request_count(self, endpoint: str) -> int:
        """How many requests of ``endpoint`` (a name of :data:`~.endpoints.ENDPOINTS`, e.g.
        ``"new"``) the API has answered since it started."""
        return 0 if self._app is None else self._app.request_count(endpoint)

    def live_instances(self) -> list[InstanceSnapshot]:
        """Instances not TERMINATING, TERMINATED or INIT_FAIL (i.e. INIT or READY)."""
        return self.world.snapshots(live_only=True)

    def configure(self, **settings: Any) -> None:
        """Change settings at run time (see :meth:`.world.World.configure`)."""
        self.world.configure(**settings)

    def terminate_init_at_once(self) -> None:
        """From now on ``POST /terminate`` of an instance in INIT ends it (TERMINATING, its
        host stopped) instead of refusing as the real API does. The plugin calls it when
        the run that embeds the simulator is interrupted: nobody needs to wait out INIT
        for a simulator that stops with the run. (A plain flag: safe from a signal handler.)"""
        self.world.terminate_init = True

    def set_endpoint_fault(self, endpoint: str, *, error_rate: float = 0.0,
                           error_status: int = 500, latency: float = 0.0) -> None:
        """Make an endpoint fail or lag (see :meth:`.faults.FaultInjector.set_endpoint_fault`)."""
        self.world.injector.set_endpoint_fault(endpoint, error_rate=error_rate,
                                               error_status=error_status, latency=latency)

    def fail_next(self, endpoint: str, count: int = 1, status: int = 503) -> None:
        """The next ``count`` calls of ``endpoint`` answer ``status`` without acting."""
        self.world.injector.fail_next(endpoint, count, status)

    def set_not_found_window(self, seconds: float) -> None:
        """GET /instance answers 404 this long after POST /new."""
        self.world.configure(not_found_window=seconds)

    def set_stuck_init(self, share: bool | float = True) -> None:
        """New instances (or this share of them) never leave INIT."""
        self.world.configure(stuck_init=share)

    def set_init_fail_rate(self, rate: float) -> None:
        """This share of new instances ends INIT_FAIL."""
        self.world.configure(init_fail_rate=rate)

    def lose_new_responses(self, count: int = 1) -> None:
        """The next ``count`` successful POST /new act but drop the connection unanswered."""
        self.world.injector.lose_new_responses(count)

    def lose_held(self, instance_id: str, kind: str = "terminate") -> None:
        """Lose a live instance now: ``"terminate"`` (the service ends it, as an ended lease
        or an admin would), ``"partition"`` (its host stops answering, connections left
        open) or ``"drop_ssh"`` (its SSH connections are dropped, the host keeps listening).
        ``[faults] lose_held`` does the same from a catalog, some seconds after READY."""
        self.world.lose_held(instance_id, kind)

    def clear_faults(self) -> None:
        """Turn every injected fault off."""
        self.world.clear_faults()
