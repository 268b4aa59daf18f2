"""Held robots lost: the ``lose_held`` fault, which strikes a READY instance the way a
robot is lost on the real service (see :data:`~.catalog.LOSS_KINDS`).

:class:`HeldLosses` belongs to one :class:`~.world.World` and runs under its lock: the
world asks it, at each tick, whether a READY instance is due to be lost, and
:meth:`~.world.World.lose_held` strikes one at once.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .catalog import LOSS_KINDS
from .model import ACTIVE, SimInstance

if TYPE_CHECKING:
    from .world import World

__all__ = ["HeldLosses"]

# The world's log: these records were the world's before they moved here.
log = logging.getLogger("pytest_rerobots.sim.world")


class HeldLosses:
    """The losses of one world's held instances and how many the fault has struck."""

    def __init__(self, world: World) -> None:
        self.world = world
        #: How many instances the ``lose_held`` fault has struck.
        self.count = 0

    def maybe_lose(self, inst: SimInstance, now: float) -> None:
        """The ``lose_held`` fault: strike a READY instance once it is due."""
        faults = self.world.injector.settings
        if not faults.lose_held or inst.ready_at is None \
                or now < inst.ready_at + faults.lose_held_after:
            return
        if faults.lose_held_count and self.count >= faults.lose_held_count:
            return
        self.count += 1
        self.lose(inst, faults.lose_held, now)

    def lose(self, inst: SimInstance, kind: str, now: float) -> None:
        world = self.world
        inst.lost = True
        log.info("fault: instance %s lost while held (%s)", inst.id, kind)
        if kind == "terminate":
            world._begin_termination(inst, now)
        elif kind == "partition" and inst.host_state == "up":
            world.background.defer(partial(world.hosts.partition_host, inst.id))
        elif kind == "drop_ssh" and inst.host_state == "up":
            world.background.defer(partial(world.hosts.drop_connections, inst.id))

    def lose_held(self, instance_id: str, kind: str) -> None:
        """Lose a READY instance now (see :meth:`.World.lose_held`)."""
        if kind not in LOSS_KINDS:
            raise ConfigurationError(f"lose_held: kind must be one of {', '.join(LOSS_KINDS)}, "
                                     f"got {kind!r}")
        world = self.world
        with world.transaction():
            inst = world.instances.get(instance_id)
            if inst is None or inst.status not in ACTIVE:
                raise ConfigurationError(f"lose_held: no live instance {instance_id}")
            self.lose(inst, kind, world.clock())
