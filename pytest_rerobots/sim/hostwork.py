"""The world's side of its SSH hosts: starting an instance's host when the instance is
created, stopping it when the instance ends, and the instance's ``host_state`` through it.

:class:`HostWork` belongs to one :class:`~.world.World`. It calls the world's host backend
(:class:`~.hostproto.HostBackend`) only off the world's lock, as background work
(:class:`~.background.Background`), and takes the lock to record what became of a host.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from .model import INIT, SimInstance

if TYPE_CHECKING:
    from .world import World

__all__ = ["HostWork"]

# The world's log: these records were the world's before they moved here.
log = logging.getLogger("pytest_rerobots.sim.world")

#: Longest wait, in seconds, of a host's stop for the API's answers in flight to end.
STOP_YIELD = 0.1


class HostWork:
    """Starts and stops the hosts of one world's instances."""

    def __init__(self, world: World) -> None:
        self.world = world

    def stop(self, inst: SimInstance) -> None:
        # A host still starting is stopped by start() once it is up. A running one is
        # stopped by a host worker, after the request that ended it has been answered (the
        # server answers POST /terminate at once and finishes in the background). A real
        # host (not the "none" backend's) waits first until no answer is in flight (up to
        # STOP_YIELD s): the service's hosts are other machines, and of several robots
        # ended at once each waits for its answer, not for the others' hosts. The instance
        # reaches TERMINATED only once its host is down.
        if inst.host_state == "up":
            inst.host_state = "stopping"
            self.world.background.offload(partial(self._stop_now, inst.id))

    def _stop_now(self, instance_id: str) -> None:
        world = self.world
        if not world.hosts.instant and not world.background.stopping:
            world.background.wait_quiet(STOP_YIELD)
        try:
            world.hosts.stop_host(instance_id)
        finally:
            with world.transaction():
                inst = world.instances.get(instance_id)
                if inst is not None and inst.host_state == "stopping":
                    inst.host_state = "stopped"
                world._advance(world.clock())  # TERMINATED may be due now

    def queue_start(self, inst: SimInstance) -> None:
        inst.host_state = "starting"
        work = partial(self.start, inst.id)
        if self.world.hosts.instant:
            self.world.background.defer(work)
        else:
            self.world.background.offload(work)

    def start(self, instance_id: str) -> None:
        world = self.world
        with world.lock:
            inst = world.instances.get(instance_id)
            if inst is None or inst.host_state != "starting":
                return
            keys = [inst.public_key]
            if inst.options.sshkey:
                keys.append(inst.options.sshkey)
            spec = inst.deployment.spec
        try:
            info = world.hosts.start_host(
                instance_id,
                authorized_keys=keys,
                firewall=partial(world.firewall_action, instance_id),
                files=dict(spec.files),
                commands=list(spec.commands),
                devices=dict(spec.devices),
            )
        except Exception as exc:
            log.warning("host of instance %s failed to start: %r", instance_id, exc)
            with world.lock:
                inst.host_state = "failed"
            world.tick()
            return
        with world.lock:
            inst.host = info
            still_wanted = inst.status == INIT and not world.background.stopping
            inst.host_state = "up" if still_wanted else "stopped"
        if not still_wanted:
            world.hosts.stop_host(instance_id)
        # READY may be due already (the usual case for a short ready_delay).
        world.tick()
