"""The simulator's world: deployments, instances, reservations and time.

One :class:`World` holds the model (:mod:`.model`) behind one lock. Time comes from an
injectable clock (epoch seconds), so tests can drive the lifecycle with :class:`ManualClock`
instead of sleeping. :meth:`World.tick` applies every time-driven transition; the HTTP layer
calls it before each request and a background ticker calls it every few tens of milliseconds.

Lifecycle of an instance (``created`` is when it left the queue)::

    INIT --ready_delay, host listening--> READY --terminate/expire_d/keepalive--> TERMINATING
      |                                                                             |
      +--init_fail_rate, host failure, init_timeout--> INIT_FAIL    terminate_delay-+-> TERMINATED
                                                     (and its host stopped, after the answer)

As on the real server (``docs/simulator-differences.md`` lists where the simulator differs):
a new instance is not found for ``not_found_window`` after POST /new; an instance in INIT,
READY or TERMINATING holds its deployment, so a deployment stays busy for the whole
``terminate_delay``; reservations wait, first in first out, and are served only when an
instance of their deployment reaches TERMINATED (the server's post-termination cleanup); a
served reservation's id becomes the instance's id, and that instance has no keep-alive. The
deployment's ``icounter`` grows when an instance reaches TERMINATED. With the ``busy_race``
switch, an instance inside its 404 window does not yet hold its deployment (its row does not
exist yet), so a second POST /new there succeeds too, and the later instance ends INIT_FAIL.

The world holds the other parts of the service as objects of their own: the users, tokens
and rate windows (:class:`~.accounts.Accounts`), the injected faults
(:class:`~.faults.FaultInjector`), the eurl notifications (:class:`~.eurl.EventSender`), the
SSH hosts (a :class:`~.hostproto.HostBackend`, started and stopped by
:class:`~.hostwork.HostWork`), the held-robot losses (:class:`~.losses.HeldLosses`), the CI
projects (:class:`~.ci.CIProjects`) and the work done off the lock
(:class:`~.background.Background`).

Operations that the API exposes return model objects or plain data, and raise
:class:`~.model.Refusal` with the status and error message the real server answers with;
:mod:`.api` shapes every body. What POST /new does is decided by :mod:`.renting`; the world
carries the decision out. Work that must not run under the lock (starting and stopping
SSH hosts, eurl POSTs) is queued as an effect and run when the outermost
:meth:`World.transaction` ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import ConfigurationError
from . import renting
from .accounts import Accounts
from .background import Background
from .catalog import OVERRIDE_KEYS, Catalog, Faults, check_setting, duration_at
from .ci import CIProjects
from .eurl import EventSender, event_payload
from .faults import FaultInjector
from .hostproto import HostBackend, NullHostManager
from .hostwork import HostWork
from .losses import HeldLosses
from .model import (
    ACTIVE,
    HOLDING,
    INIT,
    INIT_FAIL,
    READY,
    TERMINATED,
    TERMINATING,
    InstanceSnapshot,
    NewResult,
    QueueState,
    Refusal,
    Reservation,
    SimDeployment,
    SimInstance,
    SimInstanceOptions,
    utc,
)

__all__ = ["ManualClock", "World", "firewall_decision", "generate_keypair"]

log = logging.getLogger(__name__)

BUSY_INSTANCE = "This instance is busy. Try again later."


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


class World:
    """Everything the simulated service knows, behind one lock.

    ``clock`` returns epoch seconds (default :func:`time.time`). ``hosts`` starts and stops
    the instances' SSH servers (default: :class:`~.hostproto.NullHostManager`, no servers).
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
        # The tunable sections are copied so that run-time changes never touch the catalog.
        self.timings = dataclasses.replace(catalog.timings)
        self.switches = dataclasses.replace(catalog.switches)
        self.accounts = Accounts(catalog.tokens, catalog.rate_limits, self.clock)
        self.injector = FaultInjector(catalog.faults)
        # Durations drawn per instance come from a generator of their own, so that the
        # draws of faults (which a seed makes repeatable) stay the same with or without.
        self._durations = random.Random(catalog.faults.seed)
        self.events = EventSender()
        self.lock = threading.RLock()
        self.background = Background(self.lock, self.tick, tick_interval)
        #: Unexpected exceptions from background work; :meth:`check` re-raises the first.
        self.errors = self.background.errors
        self.ci = CIProjects(self.clock)
        self.deployments: dict[str, SimDeployment] = {
            spec.id: SimDeployment.from_spec(spec, catalog.types[spec.type])
            for spec in catalog.deployments
        }
        self.instances: dict[str, SimInstance] = {}
        self.reservations: list[Reservation] = []
        #: ``POST /terminate`` of an INIT instance ends it instead of refusing (set by
        #: :meth:`.Simulator.terminate_init_at_once` when the run that embeds it ends).
        self.terminate_init = False
        self._losses = HeldLosses(self)
        self._hostwork = HostWork(self)

    @property
    def losses(self) -> int:
        """How many instances the ``lose_held`` fault has struck."""
        return self._losses.count

    @losses.setter
    def losses(self, count: int) -> None:
        self._losses.count = count

    @property
    def faults(self) -> Faults:
        """The ``[faults]`` settings in force (change them with :meth:`configure`)."""
        return self.injector.settings

    @property
    def eurl_token(self) -> str:
        """The bearer token sent with eurl notifications."""
        return self.events.token

    # ------------------------------------------------------------------ threads and effects

    def start(self) -> None:
        """Start the ticker and the workers that start hosts and send eurl POSTs."""
        self.events.start()
        self.background.start()

    def close(self) -> None:
        """Stop the background threads and every host. Idempotent."""
        self.background.stop()
        self.events.close()
        try:
            self.hosts.close()
        except Exception as exc:  # a failing backend must not keep the rest from stopping
            log.exception("closing the SSH hosts failed")
            self.errors.append(exc)

    def check(self) -> None:
        """Re-raise the first unexpected error of a background thread, if any."""
        if self.errors:
            raise self.errors[0]

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Hold the lock; when the outermost transaction ends, run the queued effects."""
        return self.background.transaction()

    # ------------------------------------------------------------------ time

    def tick(self) -> None:
        """Apply every transition that is due at the current time."""
        with self.transaction():
            self._advance(self.clock())

    def _advance(self, now: float) -> None:
        timings = self.timings
        for inst in list(self.instances.values()):
            if inst.status == INIT:
                age = now - inst.created
                ready_delay = duration_at(timings.ready_delay, inst.ready_draw)
                if inst.host_state == "failed":
                    self._end(inst, INIT_FAIL, now)
                elif inst.will_fail and age >= ready_delay:
                    self._end(inst, INIT_FAIL, now)
                elif timings.init_timeout > 0 and age >= timings.init_timeout:
                    # The server gives up on a workspace that never acknowledged.
                    self._end(inst, INIT_FAIL, now)
                elif not inst.stuck and age >= ready_delay and inst.host_state == "up":
                    inst.status = READY
                    inst.ready_at = now
                    if self.switches.eurl_on_ready:
                        self._notify(inst, READY)
            if inst.status == READY and not inst.lost:
                self._losses.maybe_lose(inst, now)
            if inst.status in ACTIVE:
                expire_d = inst.options.expire_d
                if expire_d is not None and now >= inst.created + expire_d:
                    self._begin_termination(inst, now)
                elif inst.options.keepalive and now >= inst.last_ka + timings.keepalive_timeout:
                    self._begin_termination(inst, now)
            if (inst.status == TERMINATING and inst.terminating_at is not None
                    and inst.host_state != "stopping"
                    and now >= inst.terminating_at + duration_at(timings.terminate_delay,
                                                                 inst.terminate_draw)):
                self._end(inst, TERMINATED, now)

    def lose_held(self, instance_id: str, kind: str) -> None:
        """Lose a READY instance now, as ``[faults] lose_held`` would (see
        :data:`~.catalog.LOSS_KINDS`): the service ends it, its host stops answering with
        its connections left open, or its SSH connections are dropped."""
        self._losses.lose_held(instance_id, kind)

    def _serve_reservation(self, deployment: SimDeployment, now: float) -> None:
        """The server's post-termination cleanup: the deployment's first reservation becomes
        an instance, under its id, without keep-alive (the server drops it, and ``repo``)."""
        if not deployment.usable or self._holder(deployment) is not None:
            return
        for reservation in self.reservations:
            if reservation.deployment is deployment:
                self.reservations.remove(reservation)
                options = dataclasses.replace(reservation.options, keepalive=False, repo=None)
                self._create_instance(
                    reservation.user, deployment, options,
                    (reservation.private_key, reservation.public_key),
                    instance_id=reservation.id, now=now,
                )
                return

    def _begin_termination(self, inst: SimInstance, now: float) -> None:
        inst.status = TERMINATING
        inst.terminating_at = now
        self._hostwork.stop(inst)

    def _end(self, inst: SimInstance, status: str, now: float) -> None:
        inst.status = status
        inst.ended_at = now
        self._hostwork.stop(inst)
        self._notify(inst, status)
        if status == TERMINATED:
            inst.deployment.icounter += 1
            self._serve_reservation(inst.deployment, now)

    # ------------------------------------------------------------------ hosts

    def firewall_action(self, instance_id: str, src_ip: str) -> str:
        """What the instance's firewall does with a connection from ``src_ip`` right now."""
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.status not in ACTIVE:
                return "REJECT"
            return firewall_decision(inst.firewall, src_ip)

    # ------------------------------------------------------------------ eurl

    def _notify(self, inst: SimInstance, status: str) -> None:
        url = inst.options.eurl
        if not url:
            return
        private_key = inst.private_key if status == INIT and not inst.options.sshkey else None
        payload = event_payload(inst.id, inst.deployment.id, inst.user, status, private_key)
        self.background.defer(partial(self.events.send, url, payload))

    # ------------------------------------------------------------------ users and settings

    def add_user(self, name: str, token: str | None = None) -> str:
        """Register a user (if new) with a token (generated unless given); returns the token."""
        return self.accounts.add_token(name, token)

    def add_token(self, user: str, token: str | None = None) -> str:
        """Give ``user`` (new or known) one more valid token; returns it."""
        return self.accounts.add_token(user, token)

    def authenticate(self, token: str | None) -> str | None:
        """The user of a valid, unrevoked token; ``None`` otherwise."""
        return self.accounts.authenticate(token)

    def configure(self, **settings: Any) -> None:
        """Change settings at run time, by the flat names of ``Simulator(**overrides)``.

        The names are the keys of the catalog's ``[timings]``, ``[rate_limits]``,
        ``[switches]`` and ``[faults]`` sections, e.g. ``configure(ready_delay=0.1,
        stuck_init=True, vpn_nil_shape=True)``.
        """
        checked = {name: check_setting(name, value) for name, value in settings.items()}
        sections: dict[str, object] = {
            "timings": self.timings,
            "rate_limits": self.accounts.limits,
            "switches": self.switches,
            "faults": self.injector.settings,
        }
        with self.lock:
            for name, value in checked.items():
                setattr(sections[OVERRIDE_KEYS[name]], name, value)
                if name == "seed":
                    self.injector.reseed(value)
                    self._durations.seed(value)

    def set_endpoint_fault(self, endpoint: str, *, error_rate: float = 0.0,
                           error_status: int = 500, latency: float = 0.0) -> None:
        """Make an endpoint fail or lag (see :meth:`.faults.FaultInjector.set_endpoint_fault`)."""
        self.injector.set_endpoint_fault(endpoint, error_rate=error_rate,
                                         error_status=error_status, latency=latency)

    def fail_next(self, endpoint: str, count: int = 1, status: int = 503) -> None:
        """The next ``count`` calls of ``endpoint`` answer ``status`` without acting."""
        self.injector.fail_next(endpoint, count, status)

    def clear_faults(self) -> None:
        """Turn every fault off (endpoint errors and latency, pending failures, 404 window,
        stuck INIT, INIT_FAIL rate, lost responses)."""
        with self.lock:
            self.injector.clear()
            self.timings.init_fail_rate = 0.0

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
                deployment.dissolved = utc(self.clock()) if dissolved else None

    def force_terminate(self, instance_id: str) -> None:
        """End an INIT or READY instance from the server side (as an elapsed lease would)."""
        with self.transaction():
            inst = self.instances.get(instance_id)
            if inst is not None and inst.status in ACTIVE:
                self._begin_termination(inst, self.clock())

    def snapshots(self, *, live_only: bool = False) -> list[InstanceSnapshot]:
        """Copies of every instance (``live_only``: INIT and READY only), oldest first."""
        with self.lock:
            return [InstanceSnapshot.of(i) for i in self.instances.values()
                    if not live_only or i.status in ACTIVE]

    # ------------------------------------------------------------------ deployments

    def _visible(self, inst: SimInstance) -> bool:
        """Whether the instance is past its 404 window (its row exists on the server)."""
        return self.clock() >= inst.visible_at

    def _holder(self, deployment: SimDeployment) -> SimInstance | None:
        """The instance that holds ``deployment``; with ``busy_race``, one inside its 404
        window does not count yet (the server counts rows, which do not exist yet)."""
        race = self.switches.busy_race
        for inst in self.instances.values():
            if inst.deployment is deployment and inst.status in HOLDING:
                if race and not self._visible(inst):
                    continue
                return inst
        return None

    def _queue(self, deployment: SimDeployment) -> list[Reservation]:
        return [r for r in self.reservations if r.deployment is deployment]

    def queuelen(self, deployment: SimDeployment) -> int:
        """Reservations waiting for the deployment, plus one if an instance holds it."""
        with self.lock:
            return len(self._queue(deployment)) + (1 if self._holder(deployment) else 0)

    def deployment(self, deployment_id: str) -> SimDeployment:
        """The deployment of ``GET /deployment/:id``; 404 for an unknown id."""
        with self.lock:
            deployment = self.deployments.get(deployment_id)
            if deployment is None:
                raise Refusal(404, "no workspace deployment found with given ID")
            return deployment

    def users_instance(self, deployment: SimDeployment, user: str | None) -> str | None:
        """The id of ``user``'s instance on ``deployment`` that is INIT, READY or
        TERMINATING (and past its 404 window), if any."""
        if user is None:
            return None
        with self.lock:
            for inst in self.instances.values():
                if (inst.deployment is deployment and inst.user == user
                        and inst.status in HOLDING and self._visible(inst)):
                    return inst.id
            return None

    def queue_length(self, deployment_id: str) -> int | None:
        """``GET /queuelen``'s number, or ``None`` for an unknown deployment."""
        with self.lock:
            deployment = self.deployments.get(deployment_id)
            return None if deployment is None else self.queuelen(deployment)

    def qlen(self, *, wtype: str | None = None, wds: list[str] | None = None
             ) -> list[QueueState]:
        """``GET /qlen/:wtype`` or ``GET /qlen?wds=...``: queue length and remaining lease of
        each deployment that could take an instance (locked-out and offline ones skipped).

        Unknown ids in ``wds`` are a 404, dissolved ones a 400, as on the server.
        """
        with self.lock:
            now = self.clock()
            if wds is not None:
                chosen = renting.lookup(self.deployments, wds)
            else:
                chosen = [d for d in self.deployments.values()
                          if d.type == wtype and d.dissolved is None]
            result: list[QueueState] = []
            for deployment in chosen:
                if deployment.lockout or deployment.offline:
                    continue
                holder = self._holder(deployment)
                rem = None
                if holder is not None and holder.options.expire_d is not None:
                    rem = max(0, math.ceil(holder.created + holder.options.expire_d - now))
                result.append(QueueState(deployment.id, self.queuelen(deployment), rem))
            return result

    # ------------------------------------------------------------------ POST /new

    def request_instance(
        self,
        user: str,
        *,
        wtype: str | None = None,
        deployment: str | None = None,
        wds: list[str] | None = None,
        options: SimInstanceOptions | None = None,
    ) -> NewResult:
        """Rent an instance by workspace type, deployment id, or a list of deployment ids
        (the ``wds`` of the body).

        Raises :class:`~.model.Refusal` with the server's answer when nothing can be rented.
        """
        request = renting.RentRequest(
            user, wtype, wds if wds is not None else [deployment] if deployment else None,
            options or SimInstanceOptions())
        with self.transaction():
            first = renting.plan(self, request)
            if first.action == renting.NOOP:
                return NewResult(True, first.target)
        # Making an RSA key takes tens of milliseconds: never hold the lock for it.
        keys = generate_keypair()
        with self.transaction():
            now = self.clock()
            decided = renting.plan(self, request)
            if decided.action == renting.NOOP:
                return NewResult(True, decided.target)
            chosen = self.deployments[decided.target]
            if decided.action == renting.RESERVE:
                reservation = Reservation(str(uuid.uuid4()), user, chosen, now, request.options,
                                          *keys)
                self.reservations.append(reservation)
                return NewResult(False, reservation.id)
            inst = self._create_instance(user, chosen, request.options, keys, now=now)
            return NewResult(True, inst.id, inst.private_key)

    def active_instance(self, user: str, deployments: Sequence[SimDeployment]) -> str | None:
        """The id of ``user``'s INIT or READY instance on one of ``deployments``, if any."""
        for inst in self.instances.values():
            if inst.user == user and inst.status in ACTIVE and inst.deployment in deployments:
                return inst.id
        return None

    def _create_instance(
        self,
        user: str,
        deployment: SimDeployment,
        options: SimInstanceOptions,
        keys: tuple[str, str],
        *,
        now: float,
        instance_id: str | None = None,
    ) -> SimInstance:
        injector = self.injector
        stuck_share = deployment.stuck_init
        fail_share = deployment.init_fail_rate
        stuck = injector.draw(injector.settings.stuck_init if stuck_share is None else stuck_share)
        will_fail = not stuck and injector.draw(
            self.timings.init_fail_rate if fail_share is None else fail_share)
        if self.switches.busy_race and any(
                i.deployment is deployment and i.status in HOLDING
                for i in self.instances.values()):
            # The race's loser: the launch task finds the deployment taken after all.
            will_fail = True
        window = duration_at(injector.settings.not_found_window, self._durations.random())
        inst = SimInstance(
            id=instance_id or str(uuid.uuid4()),
            user=user,
            deployment=deployment,
            options=options,
            created=now,
            visible_at=now + window,
            private_key=keys[0],
            public_key=keys[1],
            ready_draw=self._durations.random(),
            terminate_draw=self._durations.random(),
            stuck=stuck,
            will_fail=will_fail,
            last_ka=now,
        )
        self.instances[inst.id] = inst
        self._notify(inst, INIT)
        if not stuck and not will_fail:
            self._hostwork.queue_start(inst)
        return inst

    # ------------------------------------------------------------------ instances

    def find(self, user: str, instance_id: str) -> SimInstance:
        """The caller's instance; 404 "instance not found" for unknown, foreign or not yet
        visible (inside the 404 window after POST /new) instances."""
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.user != user or self.clock() < inst.visible_at:
                raise Refusal(404, "instance not found")
            return inst

    def list_instances(
        self,
        user: str,
        *,
        wtype: str | None,
        statuses: frozenset[str],
        newest_first: bool,
    ) -> list[SimInstance]:
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
            if inst.status == INIT and self.terminate_init:
                self._begin_termination(inst, self.clock())
                return
            if inst.status in (INIT, INIT_FAIL):
                raise Refusal(400, f"cannot terminate instance that is {inst.status.lower()}")
            if inst.status in (TERMINATING, TERMINATED):
                raise Refusal(400, f"instance already {inst.status.lower()}")
            self._begin_termination(inst, self.clock())

    def private_key(self, user: str, instance_id: str) -> str:
        """``GET /instance/:id/sshkey``: the generated private key, until the instance ends
        (an INIT_FAIL instance still has its key, as on the server)."""
        with self.lock:
            inst = self.find(user, instance_id)
            if inst.status in (TERMINATING, TERMINATED):
                raise Refusal(400, f"instance already {inst.status.lower()}")
            return inst.private_key

    def keepalive(self, user: str, instance_id: str) -> None:
        """``POST /instance/:id/ka``: restart the keep-alive countdown.

        An unknown, foreign or not yet visible instance is a 404 with an empty body."""
        with self.lock:
            inst = self.instances.get(instance_id)
            if inst is None or inst.user != user or not self._visible(inst):
                raise Refusal(404)
            if not inst.options.keepalive or inst.status not in ACTIVE:
                raise Refusal(404, "no keep-alive monitor for this instance")
            inst.last_ka = self.clock()

    def _active(self, user: str, instance_id: str) -> SimInstance:
        """The caller's instance for the firewall and VPN commands: the server refuses
        only a TERMINATED one (INIT_FAIL and TERMINATING still answer)."""
        inst = self.find(user, instance_id)
        if inst.status == TERMINATED:
            raise Refusal(400, "instance not active")
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

    def vpn_clients(self, user: str, instance_id: str) -> list[str] | None:
        """``GET /vpn/:id``: the instance's VPN clients, ``None`` if it has no VPN."""
        with self.lock:
            inst = self._active(user, instance_id)
            return list(inst.vpn_clients) if inst.options.vpn else None

    def vpn_new_client(self, user: str, instance_id: str) -> tuple[str, str]:
        """``POST /vpn/:id``: (client id, OpenVPN configuration) of a new fictitious client."""
        with self.lock:
            inst = self._active(user, instance_id)
            if not inst.options.vpn:
                # The server asks the workspace anyway, which never answers.
                raise Refusal(503, BUSY_INSTANCE, key="result_message")
            client_id = uuid.uuid4().hex[:12]
            inst.vpn_clients.append(client_id)
        ovpn = (f"# rerobots simulator: OpenVPN client {client_id} of instance {instance_id}\n"
                "client\ndev tun\nproto udp\nremote 127.0.0.1 1194\nnobind\n")
        return client_id, ovpn

    # ------------------------------------------------------------------ reservations

    def list_reservations(self, user: str) -> list[Reservation]:
        """``GET /reservations``: the caller's waiting reservations, oldest first."""
        with self.lock:
            return [r for r in self.reservations if r.user == user]

    def cancel_reservation(self, user: str, reservation_id: str) -> None:
        """``DELETE /reservation/:id``."""
        with self.lock:
            for reservation in self.reservations:
                if reservation.id == reservation_id and reservation.user == user:
                    self.reservations.remove(reservation)
                    return
        raise Refusal(404, "reservation not found")
