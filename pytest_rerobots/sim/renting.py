"""The renting decision: what ``POST /new`` does, with the server's checks in its order.

:func:`plan` only reads; the world asks it under its lock and carries the :class:`Plan` out
(it makes the instance or the reservation). It sees the world through :class:`Occupancy`:
the deployments, how many wait for each, and the caller's instance that runs already.
A request the server would decline raises :class:`~.model.Refusal` with the server's answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .model import Refusal, SimDeployment, SimInstanceOptions

__all__ = [
    "CREATE",
    "NOOP",
    "RESERVE",
    "Occupancy",
    "Plan",
    "RentRequest",
    "lookup",
    "plan",
]

BUSY_BY_DEPLOYMENT = "All matching workspace deployments are busy. Try again later."
BUSY_BY_WTYPE = "All feasible workspace deployments are busy"
NO_MATCH = "no matching wdeployment found"
SOME_NO_MATCH = "some given IDs have no matching wdeployment"
DISSOLVED = "workspace deployment is permanently unavailable"
SOME_DISSOLVED = "some of the given workspace deployments are permanently unavailable"
LOCKED_OUT = "workspace deployment is locked out (unavailable), please contact us "
OFFLINE = "workspace deployment temporarily unavailable, try again later"
MIXED_TYPES = "multiple request for wdeployments of different wtype not supported"

#: The caller's instance is the answer (``allow_noop``).
NOOP = "noop"
#: Start an instance on the deployment now.
CREATE = "create"
#: Queue a reservation for the busy deployment.
RESERVE = "reserve"


class Occupancy(Protocol):
    """What the decision reads of the world (under the world's lock)."""

    @property
    def deployments(self) -> Mapping[str, SimDeployment]:
        """Every deployment, by id."""
        ...

    def queuelen(self, deployment: SimDeployment) -> int:
        """Reservations waiting for ``deployment``, plus one if an instance holds it."""
        ...

    def active_instance(self, user: str, deployments: Sequence[SimDeployment]) -> str | None:
        """The id of ``user``'s INIT or READY instance on one of ``deployments``, if any."""
        ...


@dataclass(frozen=True)
class RentRequest:
    """A POST /new: by workspace type (``wtype``) or by deployment ids (one or the ``wds``)."""

    user: str
    wtype: str | None
    deployment_ids: Sequence[str] | None
    options: SimInstanceOptions


@dataclass(frozen=True)
class Plan:
    """:data:`NOOP` (``target`` is the caller's instance), or :data:`CREATE` or
    :data:`RESERVE` (``target`` is the chosen deployment)."""

    action: str
    target: str


def plan(world: Occupancy, request: RentRequest) -> Plan:
    """What POST /new does; raises :class:`~.model.Refusal` when nothing can be rented."""
    if request.wtype is not None:
        return _by_type(world, request)
    assert request.deployment_ids is not None
    return _by_ids(world, request, request.deployment_ids)


def lookup(deployments: Mapping[str, SimDeployment], ids: Sequence[str]) -> list[SimDeployment]:
    """The deployments of ``ids``: 404 if one is unknown, 400 if one is dissolved (the
    answers of both POST /new and GET /qlen)."""
    one = len(ids) == 1
    found = [deployments.get(i) for i in ids]
    if any(d is None for d in found):
        raise Refusal(404, NO_MATCH if one else SOME_NO_MATCH, key="error")
    chosen = [d for d in found if d is not None]
    if any(d.dissolved is not None for d in chosen):
        raise Refusal(400, DISSOLVED if one else SOME_DISSOLVED, key="error")
    return chosen


def _noop(world: Occupancy, request: RentRequest,
          deployments: Sequence[SimDeployment]) -> Plan | None:
    """With ``allow_noop``, the caller's running instance on one of ``deployments``."""
    if not request.options.allow_noop:
        return None
    found = world.active_instance(request.user, deployments)
    return Plan(NOOP, found) if found else None


def _by_type(world: Occupancy, request: RentRequest) -> Plan:
    """The first free usable deployment of the type. Requests by type never queue,
    whatever ``reserve`` says."""
    of_type = [d for d in world.deployments.values() if d.type == request.wtype]
    noop = _noop(world, request, of_type)
    if noop:
        return noop
    usable = [d for d in of_type if d.usable]
    if not usable:
        raise Refusal(404, NO_MATCH, key="error")
    free = [d for d in usable if world.queuelen(d) == 0]
    if not free:
        raise Refusal(404, BUSY_BY_WTYPE, key="error")
    return Plan(CREATE, free[0].id)


def _by_ids(world: Occupancy, request: RentRequest, ids: Sequence[str]) -> Plan:
    """The feasible deployment with the shortest queue: created if free, else reserved
    (with ``reserve``) or refused as busy."""
    deployments = lookup(world.deployments, ids)
    noop = _noop(world, request, deployments)
    if noop:
        return noop
    chosen = min(_feasible(deployments), key=world.queuelen)
    if world.queuelen(chosen) == 0:
        return Plan(CREATE, chosen.id)
    if request.options.reserve:
        return Plan(RESERVE, chosen.id)
    raise Refusal(503, BUSY_BY_DEPLOYMENT, key="result_message")


def _feasible(deployments: Sequence[SimDeployment]) -> list[SimDeployment]:
    """Those neither locked out nor offline, all of one type; with none, the refusal of the
    last one that was not feasible (404 when there was none)."""
    feasible: list[SimDeployment] = []
    refusal = Refusal(404, NO_MATCH, key="error")
    for deployment in deployments:
        if deployment.lockout:
            refusal = Refusal(400, LOCKED_OUT, key="error")
        elif deployment.offline:
            refusal = Refusal(503, OFFLINE, key="error")
        else:
            feasible.append(deployment)
    if len({d.type for d in feasible}) > 1:
        raise Refusal(400, MIXED_TYPES, key="error")
    if not feasible:
        raise refusal
    return feasible
