"""A testinfra ``Host`` that runs over an instance's own SSH connection.

testinfra reaches a machine through a *backend*: a subclass of
``testinfra.backend.base.BaseBackend`` whose ``run(command, *args)`` returns
``self.result(rc, command, stdout, stderr)``; ``testinfra.host.Host(backend)`` builds
every module (``file``, ``service``, ``package``, ...) on top of that one method.
testinfra's own ``paramiko`` backend opens a new connection from a host spec and
``~/.ssh/config`` and accepts unknown host keys with a warning; this one reuses the
:class:`~pytest_rerobots.ssh.Connection` the instance already has, whose host key is
pinned to what the API reported. It is built directly (not through a ``rerobots://``
host spec), so testinfra's host cache never hands a test the connection of an instance
that has since ended.

Needs the ``testinfra`` extra: ``pip install 'pytest-rerobots[testinfra]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import testinfra.backend.base
    import testinfra.host
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "rerobots_host needs pytest-testinfra: pip install 'pytest-rerobots[testinfra]'"
    ) from exc

if TYPE_CHECKING:
    from .instance import Instance
    from .ssh import Connection

__all__ = ["RerobotsBackend", "host_for"]


class RerobotsBackend(testinfra.backend.base.BaseBackend):  # type: ignore[misc]
    """testinfra's backend interface over a pytest-rerobots SSH connection."""

    NAME = "rerobots"

    def __init__(self, connection: Connection, *args: Any, timeout: float | None = None,
                 **kwargs: Any) -> None:
        self.connection = connection
        self.timeout = timeout
        super().__init__(connection.label or "robot", *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> Any:
        command = self.get_command(command, *args)
        result = self.connection.run(command, timeout=self.timeout)
        return self.result(result.exit_status, self.encode(command), result.stdout,
                           result.stderr)


def host_for(instance: Instance, **kwargs: Any) -> Any:
    """A ``testinfra.host.Host`` on ``instance``'s connection (keywords for the backend:
    ``sudo``, ``sudo_user``, ``timeout``)."""
    backend = RerobotsBackend(instance.connection, **kwargs)
    host = testinfra.host.Host(backend)
    backend.set_host(host)
    return host
