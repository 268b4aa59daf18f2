"""The one exception tree of pytest-rerobots.

Every error this package raises derives from :class:`RerobotsError`. Foreign
exceptions (requests, paramiko, socket ``OSError``) are translated at one
boundary each and chained with ``raise ... from exc``::

    RerobotsError
    ├── ConfigurationError            bad option or catalog value
    ├── APIError                      the API answered, and the answer is an error
    │   ├── WrongAuthToken            400 "wrong authorization token" / "authentication failed"
    │   ├── NotFound                  404
    │   │   ├── InstanceNotFound
    │   │   ├── DeploymentNotFound    also an unknown workspace type
    │   │   └── ReservationNotFound
    │   ├── BusyWorkspaceDeployment   every deployment that could serve is in use
    │   ├── BusyWorkspaceInstance     the instance cannot do that now (e.g. terminate in INIT)
    │   ├── RateLimited               403 with an empty body, or 429
    │   └── ServerError               5xx
    ├── TransportError                no answer: connection refused, reset, timed out
    ├── MalformedResponse             an answer that is not the JSON the API documents
    ├── InstanceError                 an instance did not become usable
    │   ├── InstanceFailed            it reached INIT_FAIL, TERMINATING or TERMINATED
    │   └── InstanceTimeout           the deadline passed; carries the last status seen
    └── SSHError                      the robot's host
        ├── HostKeyMismatch           the host key is not the one the API reported
        ├── SSHConnectError           could not connect or log in
        ├── CommandTimeout            a command outran its timeout
        │   └── ExpectTimeout         a live process did not print what expect() waited for
        │       └── ExpectEOF         ... and ended first
        └── CommandFailed             ``run(..., check=True)`` saw a non-zero exit status

Whether a retry is safe is a property of the request, not the error: see
:mod:`pytest_rerobots.retry`. The messages never contain the API token.

Every error here except ``CommandFailed`` and ``CommandTimeout`` (with its kinds) is trouble with
the infrastructure, not a verdict on the code under test; the pytest plugin
reports it as a test *error* (:func:`is_infrastructure`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ssh import CommandResult

__all__ = [
    "APIError",
    "BusyWorkspaceDeployment",
    "BusyWorkspaceInstance",
    "CommandFailed",
    "CommandTimeout",
    "ConfigurationError",
    "DeploymentNotFound",
    "ExpectEOF",
    "ExpectTimeout",
    "HostKeyMismatch",
    "InstanceError",
    "InstanceFailed",
    "InstanceNotFound",
    "InstanceTimeout",
    "MalformedResponse",
    "NotFound",
    "RateLimited",
    "RerobotsError",
    "ReservationNotFound",
    "SSHConnectError",
    "SSHError",
    "ServerError",
    "TransportError",
    "WrongAuthToken",
    "is_infrastructure",
]


class RerobotsError(Exception):
    """Base of every error raised by pytest-rerobots."""


class ConfigurationError(RerobotsError, ValueError):
    """A setting or catalog entry has a value that cannot be used."""


class APIError(RerobotsError):
    """The API answered with an error.

    ``status`` is the HTTP status code, ``message`` the error string of the
    body (``error_message``, ``error`` or ``result_message``; empty when the
    body had none), ``payload`` the decoded body or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        payload: Any = None,
        method: str = "",
        path: str = "",
    ) -> None:
        self.message = message
        self.status = status
        self.payload = payload
        self.method = method
        self.path = path
        where = f"{method} {path}".strip()
        text = message or "(no message)"
        detail = f"{where}: {text}" if where else text
        if status is not None:
            detail = f"{detail} [HTTP {status}]"
        super().__init__(detail)


class WrongAuthToken(APIError):
    """The token is missing, malformed, expired or revoked. Not retryable."""


class NotFound(APIError):
    """The API has nothing at that identifier (HTTP 404)."""


class InstanceNotFound(NotFound):
    """No instance with that id is visible to this token."""


class DeploymentNotFound(NotFound):
    """No workspace deployment (or workspace type) matches the request."""


class ReservationNotFound(NotFound):
    """No reservation with that id belongs to this token."""


class BusyWorkspaceDeployment(APIError):
    """Every deployment that could serve the request is in use.

    Retrying later is safe; so is asking for a reservation.
    """


class BusyWorkspaceInstance(APIError):
    """The instance cannot do that in its present status (for example,
    terminate while it is still INIT). Retry after its status changes."""


class RateLimited(APIError):
    """The token's (or address's) request budget is spent.

    ``reset`` is the epoch second at which the budget refills, when known.
    """

    def __init__(self, message: str, *, reset: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reset = reset


class ServerError(APIError):
    """The API failed (HTTP 5xx). Safe to retry for idempotent calls."""


class TransportError(RerobotsError):
    """No answer came back: connection refused or reset, DNS, timeout.

    For ``POST /new`` the request may still have taken effect; the client
    reconciles that through ``GET /instances`` instead of retrying. ``not_sent``
    is true when no connection was made at all, so sending again is safe.
    """

    def __init__(self, message: str, *, not_sent: bool = False) -> None:
        super().__init__(message)
        self.not_sent = not_sent


class MalformedResponse(RerobotsError):
    """The API answered with something that is not the documented JSON."""


class InstanceError(RerobotsError):
    """An instance did not become usable."""

    def __init__(self, message: str, *, instance_id: str | None = None,
                 status: str | None = None) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.status = status


class InstanceFailed(InstanceError):
    """The instance reached INIT_FAIL, TERMINATING or TERMINATED while we waited."""


class InstanceTimeout(InstanceError):
    """The instance was not READY by the deadline; ``status`` is the last one seen."""


class SSHError(RerobotsError):
    """Trouble with the SSH connection to the robot's host."""


class HostKeyMismatch(SSHError):
    """The host presented a key that is not among those the API reported."""


class SSHConnectError(SSHError):
    """Could not connect or authenticate to the robot's host."""


class CommandTimeout(SSHError):
    """A command did not finish within its timeout. The connection stays usable."""

    def __init__(self, message: str, *, command: str = "", timeout: float | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.timeout = timeout


class ExpectTimeout(CommandTimeout):
    """``Process.expect()`` waited ``timeout`` seconds and the process never printed the
    pattern: a verdict on the code under test, not infrastructure trouble. ``output`` is
    the tail of what it printed, also shown in the message."""

    def __init__(self, message: str, *, command: str = "", timeout: float | None = None,
                 output: str = "") -> None:
        super().__init__(message, command=command, timeout=timeout)
        self.output = output


class ExpectEOF(ExpectTimeout):
    """The process ended (or its channel closed) before printing what ``expect()`` waited
    for; ``except ExpectTimeout`` catches it too."""


class CommandFailed(SSHError):
    """``run(..., check=True)`` saw a non-zero exit status; ``result`` holds the output."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        tail = (result.stderr or result.stdout or "").strip()[-2000:]
        msg = f"command {result.command!r} exited with status {result.exit_status}"
        if tail:
            msg = f"{msg}:\n{tail}"
        super().__init__(msg)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` is infrastructure trouble (the API, the network, the robot's host)
    rather than the outcome of a command under test."""
    return isinstance(exc, RerobotsError) and not isinstance(exc, (CommandFailed, CommandTimeout))
