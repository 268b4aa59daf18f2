"""The protocol between the world and the SSH hosts of its instances (calls, not HTTP), and
a backend without hosts.

:class:`HostBackend` names every call the world and the :class:`~pytest_rerobots.sim.Simulator`
make; :class:`pytest_rerobots.sim.hosts.HostManager` is the real implementation (it needs
the 'sim' extra), :class:`NullHostManager` the one for pure-API use that never connects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = ["HostBackend", "HostInfo", "NullHostManager"]


@dataclass(frozen=True)
class HostInfo:
    """Where a started host listens and how it identifies itself."""

    port: int
    #: ``"<keytype> <base64>"``: the instance's ``hostkeys`` entry.
    hostkey: str
    #: The host's directory: ``HOME`` and working directory of its commands.
    directory: Path


class HostBackend(Protocol):
    """Starts and stops the SSH hosts of instances."""

    @property
    def instant(self) -> bool:
        """Whether :meth:`start_host` returns at once, so the world may run it inline
        instead of on a worker thread."""
        ...

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
        """Start the host of ``instance_id``; return once it listens."""
        ...

    def stop_host(self, instance_id: str) -> None:
        """Stop the host of ``instance_id`` (idempotent)."""
        ...

    def partition_host(self, instance_id: str) -> None:
        """Make the host of ``instance_id`` stop answering, its connections left open (a
        network partition): nothing it receives is read, nothing is sent, and a new
        connection is held silent. Until the host stops."""
        ...

    def drop_connections(self, instance_id: str) -> None:
        """Drop every SSH connection of the host of ``instance_id`` (it keeps listening)."""
        ...

    def check(self) -> None:
        """Raise the first unexpected error of the hosts' background work, if any."""
        ...

    def close(self) -> None:
        """Stop every host (idempotent)."""
        ...


class NullHostManager:
    """A host backend without hosts, for pure-API tests that never connect."""

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
        devices: dict[str, str] | None = None,
    ) -> HostInfo:
        """Hand out the next port number and a real-looking (unused) ed25519 host key."""
        with self._lock:
            port = self._next_port
            self._next_port += 1
        public = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
        return HostInfo(port, f"{public} root@sim-{instance_id[:8]}", self._root / instance_id)

    def stop_host(self, instance_id: str) -> None:
        """Nothing to stop."""

    def partition_host(self, instance_id: str) -> None:
        """Nothing answers anyway."""

    def drop_connections(self, instance_id: str) -> None:
        """No connections to drop."""

    def check(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to close."""
