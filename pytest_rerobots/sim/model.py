"""The simulator's model objects: statuses, deployments, instances, reservations.

The world (:mod:`.world`) keeps and changes them under its lock; the HTTP layer (:mod:`.api`)
reads them to shape its answers. :class:`Refusal` is how the world declines a request: a
status code and the error message the real server gives, which :mod:`.api` turns into a body.
The classes that share a name with one of the client's (its instance, deployment and
options) carry a ``Sim`` prefix here, so that a name always says which side it is on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .catalog import DeploymentSpec, WorkspaceTypeSpec
from .hostproto import HostInfo

__all__ = [
    "ACTIVE",
    "ENDED_STATUSES",
    "HOLDING",
    "INIT",
    "INIT_FAIL",
    "READY",
    "TERMINATED",
    "TERMINATING",
    "InstanceSnapshot",
    "NewResult",
    "QueueState",
    "Refusal",
    "Reservation",
    "SimDeployment",
    "SimInstance",
    "SimInstanceOptions",
    "format_iso_z",
    "format_time",
    "utc",
]

INIT = "INIT"
READY = "READY"
TERMINATING = "TERMINATING"
TERMINATED = "TERMINATED"
INIT_FAIL = "INIT_FAIL"
#: Statuses in which an instance occupies its deployment (TERMINATING included, as on the server).
HOLDING = frozenset({INIT, READY, TERMINATING})
#: Statuses in which an instance can be used or configured.
ACTIVE = frozenset({INIT, READY})
#: Statuses without ``fwd``/``hostkeys`` in GET /instance.
ENDED_STATUSES = frozenset({TERMINATING, TERMINATED, INIT_FAIL})


def utc(t: float) -> dt.datetime:
    """Epoch seconds as a naive UTC datetime (the server's convention)."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)


def format_time(t: float) -> str:
    """``str(datetime)`` in naive UTC, the server's format for GET /instance and deployments."""
    return str(utc(t))


def format_iso_z(t: float) -> str:
    """ISO 8601 with a ``Z`` suffix, the format of ``/instances?details``."""
    return utc(t).isoformat() + "Z"


class Refusal(Exception):
    """The world declines a request: ``status``, and ``message`` under ``key`` in the body.

    ``message`` ``None`` means an empty body. ``key`` is the one the server uses for that
    answer: ``error_message`` mostly, ``error`` or ``result_message`` for some of POST /new.
    """

    def __init__(self, status: int, message: str | None = None, *,
                 key: str = "error_message") -> None:
        super().__init__(f"{status} {message!r}")
        self.status = status
        self.message = message
        self.key = key


@dataclass
class SimDeployment:
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
    #: This deployment's own shares of failing and stuck instances (``None``: the global ones).
    init_fail_rate: float | None = None
    stuck_init: float | None = None

    @classmethod
    def from_spec(cls, spec: DeploymentSpec, wtype: WorkspaceTypeSpec) -> SimDeployment:
        """A deployment as the catalog describes it."""
        return cls(
            id=spec.id,
            type=spec.type,
            region=spec.region,
            created=spec.created,
            icounter=spec.icounter,
            lockout=spec.lockout,
            offline=spec.offline,
            dissolved=spec.dissolved,
            spec=wtype,
            init_fail_rate=spec.init_fail_rate,
            stuck_init=spec.stuck_init,
        )

    @property
    def usable(self) -> bool:
        """Whether a new instance could start here at all (busy or not)."""
        return self.dissolved is None and not self.lockout and not self.offline


@dataclass(frozen=True)
class SimInstanceOptions:
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
class SimInstance:
    """A workspace instance; ``created`` is when it started (left the queue).

    ``visible_at`` ends the 404 window after POST /new. ``ready_draw`` and
    ``terminate_draw`` (in [0, 1)) pick this instance's ready and terminate delays from the
    ranges in force when they are due, so that run-time changes still apply.
    """

    id: str
    user: str
    deployment: SimDeployment
    options: SimInstanceOptions
    created: float
    visible_at: float
    private_key: str
    public_key: str
    ready_draw: float = 0.0
    terminate_draw: float = 0.0
    status: str = INIT
    stuck: bool = False
    will_fail: bool = False
    last_ka: float = 0.0
    terminating_at: float | None = None
    ended_at: float | None = None
    #: When it became READY (the ``lose_held`` fault counts from there).
    ready_at: float | None = None
    #: Whether the ``lose_held`` fault has struck it (once per instance).
    lost: bool = False
    firewall: list[list[str]] = field(default_factory=list)
    vpn_clients: list[str] = field(default_factory=list)
    host: HostInfo | None = None
    # none -> starting -> up -> stopping -> stopped, or starting -> failed
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
    deployment: SimDeployment
    created: float
    options: SimInstanceOptions
    private_key: str
    public_key: str


@dataclass(frozen=True)
class NewResult:
    """What POST /new did: made an instance (``success``) or a reservation (not), or found
    the caller's existing instance (``allow_noop``; ``private_key`` then ``None``)."""

    success: bool
    id: str
    private_key: str | None = None


@dataclass(frozen=True)
class QueueState:
    """One deployment's entry of ``GET /qlen``: queue length and the holder's remaining
    lease in seconds (``None`` without a lease or a holder)."""

    deployment: str
    qlen: int
    rem: int | None


@dataclass(frozen=True)
class InstanceSnapshot:
    """A copy of an instance's state, safe to read without the world's lock."""

    id: str
    user: str
    deployment: str
    type: str
    region: str
    status: str

    @classmethod
    def of(cls, inst: SimInstance) -> InstanceSnapshot:
        """A snapshot of ``inst`` (call it under the world's lock)."""
        return cls(id=inst.id, user=inst.user, deployment=inst.deployment.id,
                   type=inst.wtype, region=inst.region, status=inst.status)
