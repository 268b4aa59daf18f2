"""The simulator's world: deployments, instances, reservations, users, rate windows and time.

One :class:`World` holds everything behind one lock. Time comes from an injectable clock
(epoch seconds), so tests can drive the lifecycle with :class:`ManualClock` instead of
sleeping. :meth:`World.tick` applies every time-driven transition; the HTTP layer calls it
before each request and a background ticker calls it every few tens of milliseconds.

Lifecycle of an instance (``created`` is when it left the queue)::

    INIT --ready_delay, host listening--> READY --terminate/expire_d/keepalive--> TERMINATING
      |                                                                             |
      +--init_fail_rate, host failure, init_timeout--> INIT_FAIL    terminate_delay-+-> TERMINATED

An instance in INIT, READY or TERMINATING holds its deployment; reservations wait, first in
first out, and a served reservation's id becomes the instance's id.

Operations that the API exposes live here too and raise :class:`Refusal` carrying the
status code and body the real server answers with, so the HTTP layer stays a thin mapping.
Work that must not run under the lock (starting and stopping SSH hosts, eurl POSTs) is
queued as an effect and run when the outermost :meth:`World.transaction` ends.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import logging
import math
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..errors import ConfigurationError
from .catalog import OVERRIDE_KEYS as _OVERRIDE_KEYS
from .catalog import (
    Catalog,
    DeploymentSpec,
    EndpointFault,
    WorkspaceTypeSpec,
    check_endpoint,
    check_setting,
)

__all__ = [
    "ACTIVE",
    "ENDED",
    "HOLDING",
    "INIT",
    "INIT_FAIL",
    "READY",
    "STATUSES",
    "TERMINATED",
    "TERMINATING",
    "Deployment",
    "HostBackend",
    "HostInfoLike",
    "Instance",
    "InstanceOptions",
    "InstanceSnapshot",
    "ManualClock",
    "NullHostManager",
    "PlaceholderHost",
    "RateState",
    "Refusal",
    "Reservation",
    "World",
    "firewall_decision",
    "format_iso_z",
    "format_time",
    "generate_keypair",
]

log = logging.getLogger(__name__)

INIT = "INIT"
READY = "READY"
TERMINATING = "TERMINATING"
TERMINATED = "TERMINATED"
INIT_FAIL = "INIT_FAIL"
STATUSES = (INIT, READY, TERMINATING, TERMINATED, INIT_FAIL)
#: Statuses in which an instance occupies its deployment (TERMINATING included, as on the server).
HOLDING = frozenset({INIT, READY, TERMINATING})
#: Statuses in which an instance can be used or configured.
ACTIVE = frozenset({INIT, READY})
#: Statuses without ``fwd``/``hostkeys`` in GET /instance.
ENDED = frozenset({TERMINATING, TERMINATED, INIT_FAIL})

BUSY_BY_DEPLOYMENT = "All matching workspace deployments are busy. Try again later."
BUSY_BY_WTYPE = "All feasible workspace deployments are busy"


class ManualClock:
    """A clock for tests: time stands still until :meth:`advance` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds``; returns the new time."""
        with self._lock:
            self._now += seconds
            return self._now


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)


def format_time(t: float) -> str:
    """``str(datetime)`` in naive UTC, the server's format for GET /instance and deployments."""
    return str(_utc(t))


def format_iso_z(t: float) -> str:
    """ISO 8601 with a ``Z`` suffix, the format of ``/instances?details``."""
    return _utc(t).isoformat() + "Z"


def firewall_decision(rules: list[list[str]] | list[tuple[str, str]], src_ip: str) -> str:
    """The action for a packet from ``src_ip``: the first matching rule's, else ``"DROP"``.

    A rule is ``[src, action]`` where ``src`` is an IPv4 address (meaning ``/32``) or a CIDR
    subnet. An empty chain drops everything, as the API documents for a new or flushed
    instance. A source that is not IPv4 matches no rule.
    """
    try:
        address = ipaddress.IPv4Address(src_ip)
    except ValueError:
        return "DROP"
    for src, action in rules:
        try:
            network = ipaddress.IPv4Network(src, strict=False)
        except ValueError:
            continue
        if address in network:
            return action
    return "DROP"


def generate_keypair() -> tuple[str, str]:
    """A fresh RSA-2048 key pair: (PEM ``BEGIN RSA PRIVATE KEY`` text, OpenSSH public line).

    RSA in the traditional PEM encoding because the official client loads the key with
    ``paramiko.RSAKey``.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")
    return private, f"{public} rerobots-sim"


class HostInfoLike(Protocol):
    """What a started host reports (``pytest_rerobots.sim.hosts.HostInfo`` has this shape)."""

    @property
    def port(self) -> int: ...

    @property
    def hostkey(self) -> str: ...

    @property
    def directory(self) -> Path: ...


class HostBackend(Protocol):
    """The SSH hosts interface (``pytest_rerobots.sim.hosts.HostManager``)."""

    def start_host(
        self,
        instance_id: str,
        *,
        authorized_keys: list[str],
        firewall: Callable[[str], str],
        files: dict[str, str],
        commands: list[str],
    ) -> HostInfoLike: ...

    def stop_host(self, instance_id: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PlaceholderHost:
    """The host of ``ssh_backend="none"``: a port number and a key line, nothing listening."""

    port: int
    hostkey: str
    directory: Path


class NullHostManager:
    """A host backend without hosts, for pure-API tests that never connect."""

    #: Starting is instantaneous, so the world runs it inline rather than on a worker.
    instant = True

    def __init__(self, root: Path | None = None, first_port: int = 30000) -> None:
        self._root = root or Path("/nonexistent")
        self._next_port = first_port
        self._lock = threading.Lock()

    def start_host(
        self,
        instance_id: str,
        *,
        authorized_keys: list[str],
        firewall: Callable[[str], str],
        files: dict[str, str],
        commands: list[str],
    ) -> PlaceholderHost:
        """Hand out the next port number and a real-looking (unused) ed25519 host key."""
        with self._lock:
            port = self._next_port
            self._next_port += 1
        public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
        return PlaceholderHost(port, f"{public} root@sim-{instance_id[:8]}",
                               self._root / instance_id)

    def stop_host(self, instance_id: str) -> None:
        """Nothing to stop."""

    def close(self) -> None:
        """Nothing to close."""


class Refusal(Exception):
    """The world declines a request; ``status`` and ``body`` are the API's answer.

    ``body`` is the JSON object to send, or ``None`` for an empty body.
    """

    def __init__(self, status: int, body: dict[str, Any] | None) -> None:
        super().__init__(f"{status} {body!r}")
        self.status = status
        self.body = body


@dataclass
class Deployment:
    """A workspace deployment of the world (mutable: counters, lockout, dissolution)."""

    id: str
    type: str
    region: str
    created: dt.datetime
    icounter: int
    lockout: bool
    offline: bool
    dissolved: dt.datetime | None
    spec: WorkspaceTypeSpec

    @property
    def usable(self) -> bool:
        """Whether a new instance could start here at all (busy or not)."""
        return self.dissolved is None and not self.lockout and not self.offline


@dataclass(frozen=True)
class InstanceOptions:
    """The type-checked options of a POST /new body."""

    sshkey: str | None = None
    vpn: bool = False
    reserve: bool = False
    eurl: str | None = None
    expire_d: int | None = None
    keepalive: bool = False
    allow_noop: bool = False
    repo: Mapping[str, Any] | None = None


@dataclass
class Instance:
    """A workspace instance; ``created`` is when it started (left the queue)."""

    id: str
    user: str
    deployment: Deployment
    options: InstanceOptions
    created: float
    visible_at: float
    private_key: str
    public_key: str
    status: str = INIT
    stuck: bool = False
    will_fail: bool = False
    last_ka: float = 0.0
    terminating_at: float | None = None
    ended_at: float | None = None
    firewall: list[list[str]] = field(default_factory=list)
    vpn_clients: list[str] = field(default_factory=list)
    host: HostInfoLike | None = None
    # none -> starting -> up -> stopped, or starting -> failed
    host_state: str = "none"

    @property
    def wtype(self) -> str:
        """The workspace type."""
        return self.deployment.type

    @property
    def region(self) -> str:
        """The deployment's region."""
        return self.deployment.region


@dataclass
class Reservation:
    """A queued request for a busy deployment; its id becomes the instance's id."""

    id: str
    user: str
    deployment: Deployment
    created: float
    options: InstanceOptions
    private_key: str
    public_key: str


@dataclass(frozen=True)
class InstanceSnapshot:
    """A copy of an instance's state, safe to read without the world's lock."""

    id: str
    user: str
    deployment: str
    type: str
    region: str
    status: str
    port: int | None
    hostkey: str | None
    directory: Path | None
    firewall: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RateState:
    """One rate-limit window as the ``X-RateLimit-*`` headers show it."""

    limit: int
    remaining: int
    reset: int
    allowed: bool


@dataclass
class _RateWindow:
    start: float
    count: int = 0


@dataclass
class _CIProject:
    pid: str
    user: str
    repo_url: str
    created: float
    jobs: list[dict[str, str]] = field(default_factory=list)


def _deployment_from_spec(spec: DeploymentSpec, wtype: WorkspaceTypeSpec) -> Deployment:
    return Deployment(
        id=spec.id,
        type=spec.type,
        region=spec.region,
        created=spec.created,
        icounter=spec.icounter,
        lockout=spec.lockout,
        offline=spec.offline,
        dissolved=spec.dissolved,
        spec=wtype,
    )


class World:
    """Everything the simulated service knows, behind one lock.

    ``clock`` returns epoch seconds (default :func:`time.time`). ``hosts`` starts and stops
    the instances' SSH servers (default: :class:`NullHostManager`, no servers).
    :meth:`start` launches the background ticker and workers; :meth:`close` stops them and
    every host. Without :meth:`start` the world still works, driven by explicit ticks.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Callable[[], float] | None = None,
        hosts: HostBackend | None = None,
        tick_interval: float = 0.025,
    ) -> None:
        self.catalog = catalog
        self.clock: Callable[[], float] = clock or time.time
        self.hosts: HostBackend = hosts or NullHostManager()
        self.tick_interval = tick_interval
        # The tunable sections are copied so that run-time changes never touch the catalog.
        self.timings = dataclasses.replace(catalog.timings)
        self.rate_limits = dataclasses.replace(catalog.rate_limits)
        self.switches = dataclasses.replace(catalog.switches)
        self.faults = dataclasses.replace(
            catalog.faults,
            endpoints={k: dataclasses.replace(v) for k, v in catalog.faults.endpoints.items()},
        )
        self.lock = threading.RLock()
        self.rng = random.Random(self.faults.seed)
        self.deployments: dict[str, Deployment] = {
            spec.id: _deployment_from_spec(spec, catalog.types[spec.type])
            for spec in catalog.deployments
        }
        self.instances: dict[str, Instance] = {}
        self.reservations: list[Reservation] = []
        self.tokens: dict[str, str] = dict(catalog.tokens)
        self.revoked: set[str] = set()
        #: Bearer token sent with eurl notifications, so a receiver can tell them apart.
        self.eurl_token = secrets.token_urlsafe(24)
        #: Exceptions from host start-up, by instance id (such instances end INIT_FAIL).
        self.host_failures: dict[str, BaseException] = {}
        #: Unexpected exceptions from background work; :meth:`check` re-raises the first.
        self.errors: list[BaseException] = []
        self._lost_new_responses = 0
        self._forced_failures: dict[str, list[int]] = {}
        self._windows: dict[str, _RateWindow] = {}
        self._ci: dict[str, _CIProject] = {}
        self._effects: list[Callable[[], None]] = []
        self._depth = threading.local()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._host_pool: ThreadPoolExecutor | None = None
        self._eurl_pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ threads and effects

    def start(self) -> None:
        """Start the ticker and the workers that start hosts and send eurl POSTs."""
        if self._ticker is not None:
            return
        self._host_pool = ThreadPoolExecutor(4, thread_name_prefix="rerobots-sim-host")
        self._eurl_pool = ThreadPoolExecutor(1, thread_name_prefix="rerobots-sim-eurl")
        self._ticker = threading.Thread(target=self._tick_loop, name="rerobots-sim-ticker",
                                        daemon=True)
        self._ticker.start()

    def close(self) -> None:
        """Stop the background threads and every host. Idempotent."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._host_pool is not None:
            self._host_pool.shutdown(wait=True, cancel_futures=True)
        if self._eurl_pool is not None:
            # An eurl POST in flight is bounded by its own short timeout; do not wait for it.
            self._eurl_pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.hosts.close()
        except Exception as exc:  # a failing backend must not keep the rest from stopping
            log.exception("closing the SSH hosts failed")
            self.errors.append(exc)

    def check(self) -> None:
        """Re-raise the first unexpected error of a background thread, if any."""
        if self.errors:
            raise self.errors[0]

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_interval):
            try:
                self.tick()
            except Exception as exc:
                log.exception("simulator tick failed")
                self.errors.append(exc)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock; when the outermost transaction ends, run the queued effects."""
        with self.lock:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
        if depth == 0:
            self._run_effects()

    def _run_effects(self) -> None:
        while True:
            with self.lock:
                effects, self._effects = self._effects, []
            if not effects:
                return
            for effect in effects:
                try:
                    effect()
                except Exception as exc:
                    log.exception("simulator effect failed")
                    self.errors.append(exc)

    # ------------------------------------------------------------------ time

    def now(self) -> float:
        """The world's current time (epoch seconds)."""
        return self.clock()

    def tick(self) -> None:
        """Apply every transition that is due at the current time."""
        with self.transaction():
            self._advance(self.clock())

    def _advance(self, now: float) -> None:
        timings = self.timings
        for inst in list(self.instances.values()):
            if inst.status == INIT:
                age = now - inst.created
                if inst.host_state == "failed":
                    self._end(inst, INIT_FAIL, now)
                elif inst.will_fail and age >= timings.ready_delay:
                    self._end(inst, INIT_FAIL, now)
                elif timings.init_timeout > 0 and age >= timings.init_timeout:
                    # The server gives up on a workspace that never acknowledged.
                    self._end(inst, INIT_FAIL, now)
                elif not inst.stuck and age >= timings.ready_delay and inst.host_state == "up":
                    inst.status = READY
                    if self.switches.eurl_on_ready:
                        self._notify(inst, READY)
            if inst.status in ACTIVE:
                expire_d = inst.options.expire_d
                if expire_d is not None and now >= inst.created + expire_d:
                    self._begin_termination(inst, now)
                elif inst.options.keepalive and now >= inst.last_ka + timings.keepalive_timeout:
                    self._begin_termination(inst, now)
            if (inst.status == TERMINATING and inst.terminating_at is not None
                    and now >= inst.terminating_at + timings.terminate_delay):
                self._end(inst, TERMINATED, now)
        self._serve_reservations(now)

    def _serve_reservations(self, now: float) -> None:
        served: set[str] = set()
        for reservation in list(self.reservations):
            deployment = reservation.deployment
            if deployment.id in served or not deployment.usable or self._holder(deployment):
                continue
            self.reservations.remove(reservation)
            served.add(deployment.id)
            self._create_instance(
                reservation.user, deployment, reservation.options,
                (reservation.private_key, reservation.public_key),
                instance_id=reservation.id, now=now,
            )

    def _begin_termination(self, inst: Instance, now: float) -> None:
        inst.status = TERMINATING
        inst.terminating_at = now
        self._stop_host(inst)

    def _end(self, inst: Instance, status: str, now: float) -> None:
        inst.status = status
        inst.ended_at = now
        self._stop_host(inst)
        self._notify(inst, status)

    # ------------------------------------------------------------------ hosts

    def _stop_host(self, inst: Instance) -> None:
        # A host still starting is stopped by _start_host once it is up.
        if inst.host_state == "up":
            inst.host_state = "stopped"
            self._effects.append(partial(self.hosts.stop_host, inst.id))

    def _queue_host_start(self, inst: Instance) -> None:
        inst.host_state = "starting"
        if getattr(self.hosts, "instant", False) or self._host_pool is None:
            self._effects.append(partial(self._start_host, inst.id))
        else:
            pool = self._host_pool
            self._effects.append(lambda: self._submit(pool, partial(self._start_host, inst.id)))

    def _submit(self, pool: ThreadPoolExecutor, work: Callable[[], None]) -> None:
        try:
            pool.submit(work)
        except RuntimeError:
            # The world is closing; nothing more is started.
            log.debug("not starting work: the simulator is closing")

    def _start_host(self, instance_id: str) -> None:
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.host_state != "starting":
                return
            keys = [inst.public_key]
            if inst.options.sshkey:
                keys.append(inst.options.sshkey)
            spec = inst.deployment.spec
        try:
            info = self.hosts.start_host(
                instance_id,
                authorized_keys=keys,
                firewall=partial(self.firewall_action, instance_id),
                files=dict(spec.files),
                commands=list(spec.commands),
            )
        except Exception as exc:
            log.warning("host of instance %s failed to start: %r", instance_id, exc)
            with self.lock:
                inst.host_state = "failed"
                self.host_failures[instance_id] = exc
            self.tick()
            return
        with self.lock:
            inst.host = info
            still_wanted = inst.status == INIT and not self._stop.is_set()
            inst.host_state = "up" if still_wanted else "stopped"
        if not still_wanted:
            self.hosts.stop_host(instance_id)
        # READY may be due already (the usual case for a short ready_delay).
        self.tick()

    def firewall_action(self, instance_id: str, src_ip: str) -> str:
        """What the instance's firewall does with a connection from ``src_ip`` right now."""
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.status not in ACTIVE:
                return "REJECT"
            return firewall_decision(inst.firewall, src_ip)

    # ------------------------------------------------------------------ eurl

    def _notify(self, inst: Instance, status: str) -> None:
        url = inst.options.eurl
        if not url:
            return
        payload: dict[str, Any] = {
            "id": inst.id,
            "wd": inst.deployment.id,
            "kind": "instance status",
            "val": status,
            "user": inst.user,
        }
        if status == INIT and not inst.options.sshkey:
            payload["sshkey"] = inst.private_key
        pool = self._eurl_pool
        if pool is None:
            self._effects.append(partial(self._post_event, url, payload))
        else:
            self._effects.append(lambda: self._submit(pool, partial(self._post_event, url,
                                                                     payload)))

    def _post_event(self, url: str, payload: dict[str, Any]) -> None:
        if not url.startswith(("http://", "https://")):
            # The server also mails (mailto://); the simulator only records that it would.
            log.info("eurl %s: not an http(s) URL, event %s not sent", url, payload["val"])
            return
        import requests  # imported here: only needed when an eurl is used

        try:
            requests.post(url, json=payload, timeout=1.0,
                          headers={"Authorization": f"Bearer {self.eurl_token}"})
        except requests.RequestException as exc:
            log.warning("eurl %s: could not deliver event %s: %s", url, payload["val"], exc)

    # ------------------------------------------------------------------ users and limits

    def add_user(self, name: str, token: str | None = None) -> str:
        """Register a user (if new) with a token (generated unless given); returns the token."""
        return self.add_token(name, token)

    def add_token(self, user: str, token: str | None = None) -> str:
        """Give ``user`` (new or known) one more valid token; returns it.

        Users exist through their tokens, so this is also how a user is created.
        """
        if not user or not isinstance(user, str):
            raise ConfigurationError(f"add_token: a user name is a non-empty string, got {user!r}")
        if token is not None and (not token or any(ch.isspace() for ch in token)):
            raise ConfigurationError("add_token: a token must be non-empty, without whitespace")
        token = token or secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = user
        return token

    def authenticate(self, token: str | None) -> str | None:
        """The user of a valid, unrevoked token; ``None`` otherwise (the caller is anonymous)."""
        if not token:
            return None
        with self.lock:
            user = self.tokens.get(token)
            if user is None or _sha256(token) in self.revoked:
                return None
            return user

    def revoke(self, user: str, digest: str) -> None:
        """Revoke the caller's token whose SHA-256 is ``digest``; an unknown digest is recorded.

        A digest of another user's token is ignored, as on the server.
        """
        digest = digest.lower()
        with self.lock:
            owners = {u for t, u in self.tokens.items() if _sha256(t) == digest}
            if not owners or user in owners:
                self.revoked.add(digest)

    def purge(self, user: str) -> None:
        """Revoke every token of ``user``."""
        with self.lock:
            self.revoked.update(_sha256(t) for t, u in self.tokens.items() if u == user)

    def charge(self, key: str, budget: int, *, count: bool = True) -> RateState:
        """Count one request against ``key``'s window (``count=False`` only looks)."""
        with self.lock:
            now = self.clock()
            window = self._windows.get(key)
            if window is None or now >= window.start + self.rate_limits.rate_window:
                window = self._windows[key] = _RateWindow(start=now)
            if count:
                window.count += 1
            remaining = budget - window.count
            return RateState(
                limit=budget,
                remaining=max(remaining, -1),
                reset=math.ceil(window.start + self.rate_limits.rate_window),
                allowed=remaining >= 0,
            )

    # ------------------------------------------------------------------ faults and settings

    def configure(self, **settings: Any) -> None:
        """Change settings at run time, by the flat names of ``Simulator(**overrides)``.

        The names are the keys of the catalog's ``[timings]``, ``[rate_limits]``,
        ``[switches]`` and ``[faults]`` sections, e.g. ``configure(ready_delay=0.1,
        stuck_init=True, vpn_nil_shape=True)``.
        """
        checked = {name: check_setting(name, value) for name, value in settings.items()}
        with self.lock:
            for name, value in checked.items():
                setattr(getattr(self, _OVERRIDE_KEYS[name]), name, value)
                if name == "seed":
                    self.rng.seed(value)

    def set_endpoint_fault(
        self,
        endpoint: str,
        *,
        error_rate: float = 0.0,
        error_status: int = 500,
        latency: float = 0.0,
    ) -> None:
        """Make ``endpoint`` (a name of :data:`~.catalog.ENDPOINT_NAMES`, or ``"*"``) fail
        with ``error_status`` at ``error_rate`` and answer ``latency`` seconds late."""
        check_endpoint(endpoint, "set_endpoint_fault")
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigurationError(f"set_endpoint_fault: error_rate must be in [0, 1], "
                                     f"got {error_rate!r}")
        if not 500 <= error_status <= 599:
            raise ConfigurationError(f"set_endpoint_fault: error_status must be 5xx, "
                                     f"got {error_status!r}")
        if latency < 0:
            raise ConfigurationError(f"set_endpoint_fault: latency must be >= 0, got {latency!r}")
        with self.lock:
            self.faults.endpoints[endpoint] = EndpointFault(error_rate, error_status, latency)

    def set_not_found_window(self, seconds: float) -> None:
        """GET /instance/:id (and every other lookup of it) answers 404 for this long after
        the instance is created."""
        self.configure(not_found_window=seconds)

    def set_stuck_init(self, share: bool | float = True) -> None:
        """New instances (all, or this share of them) stay in INIT and never become READY."""
        self.configure(stuck_init=share)

    def set_init_fail_rate(self, rate: float) -> None:
        """This share of new instances goes INIT -> INIT_FAIL instead of READY."""
        self.configure(init_fail_rate=rate)

    def fail_next(self, endpoint: str, count: int = 1, status: int = 503) -> None:
        """The next ``count`` calls of ``endpoint`` (or of any endpoint, for ``"*"``) answer
        ``status`` without acting: a deterministic alternative to an error rate."""
        check_endpoint(endpoint, "fail_next")
        if not 500 <= status <= 599:
            raise ConfigurationError(f"fail_next: status must be 5xx, got {status!r}")
        with self.lock:
            self._forced_failures.setdefault(endpoint, []).extend([status] * count)

    def take_forced_failure(self, endpoint: str) -> int | None:
        """The status of a pending :meth:`fail_next` failure for ``endpoint``, consumed."""
        with self.lock:
            for name in (endpoint, "*"):
                pending = self._forced_failures.get(name)
                if pending:
                    return pending.pop(0)
            return None

    def lose_new_responses(self, count: int = 1) -> None:
        """The next ``count`` successful POST /new act, then drop the connection unanswered."""
        with self.lock:
            self._lost_new_responses += count

    def clear_faults(self) -> None:
        """Turn every fault off (endpoint errors and latency, pending :meth:`fail_next`
        failures, 404 window, stuck INIT, INIT_FAIL rate, lost responses)."""
        with self.lock:
            self.faults.endpoints.clear()
            self.faults.not_found_window = 0.0
            self.faults.stuck_init = 0.0
            self.faults.lose_new_response = 0.0
            self.timings.init_fail_rate = 0.0
            self._lost_new_responses = 0
            self._forced_failures.clear()

    def endpoint_fault(self, endpoint: str) -> EndpointFault | None:
        """The fault set for ``endpoint``, or else the one for ``"*"``."""
        with self.lock:
            return self.faults.endpoints.get(endpoint) or self.faults.endpoints.get("*")

    def draw(self, probability: float) -> bool:
        """A biased coin from the world's (seedable) random generator."""
        if probability <= 0:
            return False
        with self.lock:
            return self.rng.random() < probability

    def take_lost_response(self) -> bool:
        """Whether the answer to the POST /new that just succeeded should be lost."""
        with self.lock:
            if self._lost_new_responses > 0:
                self._lost_new_responses -= 1
                return True
            return self.faults.lose_new_response > 0 and (
                self.rng.random() < self.faults.lose_new_response)

    def set_deployment_state(
        self,
        deployment_id: str,
        *,
        lockout: bool | None = None,
        offline: bool | None = None,
        dissolved: bool | None = None,
    ) -> None:
        """Lock out, take offline or dissolve a deployment (or undo it) at run time."""
        with self.transaction():
            deployment = self.deployments.get(deployment_id)
            if deployment is None:
                raise ConfigurationError(f"set_deployment_state: no deployment {deployment_id}")
            if lockout is not None:
                deployment.lockout = lockout
            if offline is not None:
                deployment.offline = offline
            if dissolved is not None:
                deployment.dissolved = _utc(self.clock()) if dissolved else None

    def force_terminate(self, instance_id: str) -> None:
        """End an INIT or READY instance from the server side (as an elapsed lease would)."""
        with self.transaction():
            inst = self.instances.get(instance_id)
            if inst is not None and inst.status in ACTIVE:
                self._begin_termination(inst, self.clock())

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, instance_id: str) -> InstanceSnapshot | None:
        """A copy of one instance's state, or ``None``."""
        with self.lock:
            inst = self.instances.get(instance_id)
            return None if inst is None else _snapshot(inst)

    def snapshots(self, *, live_only: bool = False) -> list[InstanceSnapshot]:
        """Copies of every instance (``live_only``: INIT and READY only), oldest first."""
        with self.lock:
            return [_snapshot(i) for i in self.instances.values()
                    if not live_only or i.status in ACTIVE]

    # ------------------------------------------------------------------ deployments

    def _holder(self, deployment: Deployment) -> Instance | None:
        for inst in self.instances.values():
            if inst.deployment is deployment and inst.status in HOLDING:
                return inst
        return None

    def _queue(self, deployment: Deployment) -> list[Reservation]:
        return [r for r in self.reservations if r.deployment is deployment]

    def queuelen(self, deployment: Deployment) -> int:
        """Reservations waiting for the deployment, plus one if an instance holds it."""
        with self.lock:
            return len(self._queue(deployment)) + (1 if self._holder(deployment) else 0)

    def deployment_summary(self, deployment: Deployment) -> dict[str, Any]:
        """The per-deployment object of ``GET /deployments?info``."""
        with self.lock:
            return {
                "type": deployment.type,
                "type_version": deployment.spec.type_version,
                "supported_addons": list(deployment.spec.supported_addons),
                "desc": deployment.spec.desc,
                "region": deployment.region,
                "icounter": deployment.icounter,
                "created": str(deployment.created),
                "queuelen": self.queuelen(deployment),
            }

    def deployment_info(self, deployment_id: str, user: str | None) -> dict[str, Any]:
        """The body of ``GET /deployment/:id``."""
        with self.lock:
            deployment = self.deployments.get(deployment_id)
            if deployment is None:
                raise Refusal(404, {"error_message": "no workspace deployment found with given ID"})
            return self._deployment_info(deployment, user)

    def _deployment_info(self, deployment: Deployment, user: str | None) -> dict[str, Any]:
        info = {"id": deployment.id, **self.deployment_summary(deployment)}
        info["online"] = deployment.dissolved is None and not deployment.offline
        if deployment.lockout:
            info["lockout"] = True
        if deployment.dissolved is not None:
            info["dissolved"] = str(deployment.dissolved)
        if user is not None:
            holder = self._holder(deployment)
            if holder is not None and holder.user == user and holder.status in ACTIVE:
                info["instance"] = holder.id
        return info

    def queue_length(self, deployment_id: str) -> int | None:
        """``GET /queuelen``'s number, or ``None`` for an unknown deployment."""
        with self.lock:
            deployment = self.deployments.get(deployment_id)
            return None if deployment is None else self.queuelen(deployment)

    def qlen(self, wtype: str | None, wds: list[str] | None) -> dict[str, Any]:
        """The body of ``GET /qlen[/:wtype]``: queue length and remaining lease per deployment."""
        with self.lock:
            now = self.clock()
            result: dict[str, Any] = {}
            for deployment in self.deployments.values():
                if deployment.dissolved is not None:
                    continue
                if wtype is not None and deployment.type != wtype:
                    continue
                if wds is not None and deployment.id not in wds:
                    continue
                holder = self._holder(deployment)
                rem = None
                if holder is not None and holder.options.expire_d is not None:
                    rem = max(0, math.ceil(holder.created + holder.options.expire_d - now))
                result[deployment.id] = {"qlen": self.queuelen(deployment), "rem": rem}
            return result

    # ------------------------------------------------------------------ POST /new

    def request_instance(
        self,
        user: str,
        *,
        wtype: str | None = None,
        deployment: str | None = None,
        wds: list[str] | None = None,
        options: InstanceOptions | None = None,
    ) -> dict[str, Any]:
        """Rent an instance by workspace type, deployment id, or a list of deployment ids
        (the ``wds`` of the body); returns the /new body.

        Raises :class:`Refusal` with the server's answer when nothing can be rented.
        """
        options = options or InstanceOptions()
        if wds is not None:
            listed, deployment_ids = True, wds
        else:
            listed, deployment_ids = False, [deployment] if deployment else None
        with self.transaction():
            plan, target = self._plan_new(user, wtype, deployment_ids, listed, options)
            if plan == "noop":
                return {"success": True, "id": target}
        # Making an RSA key takes tens of milliseconds: never hold the lock for it.
        keys = generate_keypair()
        with self.transaction():
            now = self.clock()
            plan, target = self._plan_new(user, wtype, deployment_ids, listed, options)
            if plan == "noop":
                return {"success": True, "id": target}
            chosen = self.deployments[target]
            if plan == "reserve":
                reservation = Reservation(str(uuid.uuid4()), user, chosen, now, options, *keys)
                self.reservations.append(reservation)
                return {"success": False, "id": reservation.id}
            inst = self._create_instance(user, chosen, options, keys, now=now)
            body: dict[str, Any] = {"success": True, "id": inst.id}
            if not options.sshkey and self.switches.sshkey_in_new_response:
                body["sshkey"] = inst.private_key
            return body

    def _plan_new(
        self,
        user: str,
        wtype: str | None,
        deployment_ids: list[str] | None,
        listed: bool,
        options: InstanceOptions,
    ) -> tuple[str, str]:
        """Decide what POST /new does: ("noop"|"create"|"reserve", instance or deployment id)."""
        if wtype is not None:
            candidates = [d for d in self.deployments.values()
                          if d.type == wtype and d.dissolved is None]
            if not candidates:
                raise Refusal(404, {"error": "no matching wdeployment found"})
            noop = self._existing(user, candidates) if options.allow_noop else None
            if noop:
                return "noop", noop
            free = [d for d in candidates if d.usable and not self._holder(d)
                    and not self._queue(d)]
            if not free:
                # Requests by type never queue, whatever ``reserve`` says.
                raise Refusal(404, {"error": BUSY_BY_WTYPE})
            return "create", free[0].id
        assert deployment_ids is not None
        found = [self.deployments.get(i) for i in deployment_ids]
        if not listed and found[0] is None:
            raise Refusal(404, {"error": "no matching wdeployment found"})
        deployments = [d for d in found if d is not None]
        if len(deployments) != len(found) or not deployments:
            raise Refusal(404, None)
        if len({d.type for d in deployments}) > 1:
            raise Refusal(400, {"error": "multiple request for wdeployments of different wtype "
                                         "not supported"})
        noop = self._existing(user, deployments) if options.allow_noop else None
        if noop:
            return "noop", noop
        usable = [d for d in deployments if d.usable]
        if not usable:
            first = deployments[0]
            if first.dissolved is not None:
                raise Refusal(400, {"error": "workspace deployment is permanently unavailable"})
            if first.lockout:
                raise Refusal(400, {"error": "workspace deployment is locked out (unavailable), "
                                             "please contact us "})
            raise Refusal(503, {"error": "workspace deployment temporarily unavailable, "
                                         "try again later"})
        free = [d for d in usable if not self._holder(d) and not self._queue(d)]
        if free:
            return "create", free[0].id
        if options.reserve:
            shortest = min(usable, key=lambda d: len(self._queue(d)))
            return "reserve", shortest.id
        raise Refusal(503, {"result_message": BUSY_BY_DEPLOYMENT})

    def _existing(self, user: str, deployments: list[Deployment]) -> str | None:
        for inst in self.instances.values():
            if inst.user == user and inst.status in ACTIVE and inst.deployment in deployments:
                return inst.id
        return None

    def _create_instance(
        self,
        user: str,
        deployment: Deployment,
        options: InstanceOptions,
        keys: tuple[str, str],
        *,
        now: float,
        instance_id: str | None = None,
    ) -> Instance:
        stuck = self.faults.stuck_init > 0 and self.rng.random() < self.faults.stuck_init
        will_fail = (not stuck and self.timings.init_fail_rate > 0
                     and self.rng.random() < self.timings.init_fail_rate)
        inst = Instance(
            id=instance_id or str(uuid.uuid4()),
            user=user,
            deployment=deployment,
            options=options,
            created=now,
            visible_at=now + self.faults.not_found_window,
            private_key=keys[0],
            public_key=keys[1],
            stuck=stuck,
            will_fail=will_fail,
            last_ka=now,
        )
        self.instances[inst.id] = inst
        deployment.icounter += 1
        self._notify(inst, INIT)
        if not stuck and not will_fail:
            self._queue_host_start(inst)
        return inst

    # ------------------------------------------------------------------ instances

    def find(self, user: str, instance_id: str) -> Instance:
        """The caller's instance; 404 "instance not found" for unknown, foreign or not yet
        visible (inside the 404 window after POST /new) instances. Hold the lock."""
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.user != user or self.clock() < inst.visible_at:
                raise Refusal(404, {"error_message": "instance not found"})
            return inst

    def instance_view(self, user: str, instance_id: str) -> dict[str, Any]:
        """The body of ``GET /instance/:id``."""
        with self.lock:
            inst = self.find(user, instance_id)
            body: dict[str, Any] = {
                "id": inst.id,
                "deployment": inst.deployment.id,
                "type": inst.wtype,
                "region": inst.region,
                "starttime": format_time(inst.created),
                "rootuser": inst.user,
                "status": inst.status,
                "wdinfo": self._deployment_info(inst.deployment, user),
            }
            if inst.options.expire_d is not None:
                body["expires"] = format_time(inst.created + inst.options.expire_d)
            if inst.ended_at is not None:
                body["endtime"] = format_time(inst.ended_at)
            if inst.status not in ENDED:
                if inst.status == READY and inst.host is not None:
                    body["fwd"] = {"ipv4": "127.0.0.1", "port": inst.host.port}
                    body["hostkeys"] = [inst.host.hostkey]
                else:
                    body["fwd"] = {}
                    body["hostkeys"] = []
                if inst.options.vpn:
                    body["vpn"] = {"status": "ready", "clients": list(inst.vpn_clients)}
            return body

    def list_instances(
        self,
        user: str,
        *,
        wtype: str | None,
        statuses: frozenset[str],
        newest_first: bool,
    ) -> list[Instance]:
        """The caller's visible instances with those statuses, sorted by start time."""
        with self.lock:
            now = self.clock()
            found = [i for i in self.instances.values()
                     if i.user == user and i.status in statuses and now >= i.visible_at
                     and (wtype is None or i.wtype == wtype)]
        found.sort(key=lambda i: i.created, reverse=newest_first)
        return found

    def terminate(self, user: str, instance_id: str) -> None:
        """``POST /terminate/:id``: READY becomes TERMINATING at once."""
        with self.transaction():
            inst = self.find(user, instance_id)
            if inst.status == INIT:
                raise Refusal(400, {"error_message": "cannot terminate instance that is init"})
            if inst.status == INIT_FAIL:
                raise Refusal(400, {"error_message":
                                    "cannot terminate instance that is init_fail"})
            if inst.status in (TERMINATING, TERMINATED):
                raise Refusal(400, {"error_message":
                                    f"instance already {inst.status.lower()}"})
            self._begin_termination(inst, self.clock())

    def private_key(self, user: str, instance_id: str) -> str:
        """``GET /instance/:id/sshkey``: the generated private key while the instance lives."""
        with self.lock:
            inst = self.find(user, instance_id)
            if inst.status in (TERMINATING, TERMINATED):
                raise Refusal(400, {"error_message":
                                    f"instance already {inst.status.lower()}"})
            if inst.status == INIT_FAIL:
                raise Refusal(404, {"error_message": "no secret SSH key available"})
            return inst.private_key

    def keepalive(self, user: str, instance_id: str) -> None:
        """``POST /instance/:id/ka``: restart the keep-alive countdown."""
        with self.lock:
            inst = self.find(user, instance_id)
            if not inst.options.keepalive or inst.status not in ACTIVE:
                raise Refusal(404, {"error_message": "no keep-alive monitor for this instance"})
            inst.last_ka = self.clock()

    def _active(self, user: str, instance_id: str) -> Instance:
        inst = self.find(user, instance_id)
        if inst.status not in ACTIVE:
            raise Refusal(400, {"error_message": "instance not active"})
        return inst

    def firewall_rules(self, user: str, instance_id: str) -> list[list[str]]:
        """``GET /firewall/:id``: the chain, first rule first."""
        with self.lock:
            return [list(rule) for rule in self._active(user, instance_id).firewall]

    def add_firewall_rule(self, user: str, instance_id: str, src: str, action: str) -> None:
        """``POST /firewall/:id``: append a rule (arguments already validated)."""
        with self.lock:
            self._active(user, instance_id).firewall.append([src, action])

    def flush_firewall(self, user: str, instance_id: str) -> None:
        """``DELETE /firewall/:id``: empty the chain, which drops everything."""
        with self.lock:
            self._active(user, instance_id).firewall.clear()

    def vpn_info(self, user: str, instance_id: str) -> dict[str, Any]:
        """``GET /vpn/:id``."""
        with self.lock:
            inst = self._active(user, instance_id)
            if not inst.options.vpn:
                if self.switches.vpn_nil_shape:
                    return {"status": "nil"}
                raise Refusal(400, {"error_message": "instance does not have VPN"})
            return {"status": "ready", "clients": list(inst.vpn_clients)}

    def vpn_new_client(self, user: str, instance_id: str) -> dict[str, Any]:
        """``POST /vpn/:id``: credentials of a new (fictitious) OpenVPN client."""
        with self.lock:
            inst = self._active(user, instance_id)
            if not inst.options.vpn:
                raise Refusal(400, {"error_message": "instance does not have VPN"})
            client_id = uuid.uuid4().hex[:12]
            inst.vpn_clients.append(client_id)
        ovpn = (f"# rerobots simulator: OpenVPN client {client_id} of instance {instance_id}\n"
                "client\ndev tun\nproto udp\nremote 127.0.0.1 1194\nnobind\n")
        return {"client_id": client_id, "ovpn": ovpn}

    # ------------------------------------------------------------------ reservations and CI

    def list_reservations(self, user: str) -> list[dict[str, Any]]:
        """``GET /reservations``: the caller's waiting reservations, oldest first."""
        with self.lock:
            return [{"id": r.id,
                     "created": _utc(r.created).strftime("%Y-%m-%d %H:%M UTC"),
                     "desc": f"wd:{r.deployment.id}",
                     "user": r.user}
                    for r in self.reservations if r.user == user]

    def cancel_reservation(self, user: str, reservation_id: str) -> None:
        """``DELETE /reservation/:id``."""
        with self.lock:
            for reservation in self.reservations:
                if reservation.id == reservation_id and reservation.user == user:
                    self.reservations.remove(reservation)
                    return
        raise Refusal(404, {"error_message": "reservation not found"})

    def ci_new(self, user: str, repo_url: str) -> str:
        """``POST /ci/new``: register a CI project; returns its 22-character id."""
        pid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")
        with self.lock:
            self._ci[pid] = _CIProject(pid, user, repo_url, self.clock())
        return pid

    def ci_projects(self, user: str) -> dict[str, Any]:
        """``GET /ci/projects``."""
        with self.lock:
            return {p.pid: {"created": format_time(p.created), "repo_url": p.repo_url}
                    for p in self._ci.values() if p.user == user}

    def ci_job(self, user: str, pid: str, branch: str, commit: str) -> int:
        """``POST /ci/project/:pid/job``: record a job; returns its number."""
        with self.lock:
            project = self._ci.get(pid)
            if project is None or project.user != user:
                raise Refusal(404, None)
            project.jobs.append({"branch": branch, "commit": commit})
            return len(project.jobs)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _snapshot(inst: Instance) -> InstanceSnapshot:
    host = inst.host
    return InstanceSnapshot(
        id=inst.id,
        user=inst.user,
        deployment=inst.deployment.id,
        type=inst.wtype,
        region=inst.region,
        status=inst.status,
        port=host.port if host is not None else None,
        hostkey=host.hostkey if host is not None else None,
        directory=host.directory if host is not None else None,
        firewall=tuple((src, action) for src, action in inst.firewall),
    )
