"""The one exception tree of pytest-rerobots.

Every error this package raises derives from :class:`RerobotsError`. Foreign
exceptions (requests, paramiko, socket ``OSError``) are translated at one
boundary each and chained with ``raise ... from exc``::

    RerobotsError
    ├── ConfigurationError            bad option or catalog value
    ├── BudgetReached                 --rerobots-budget spent: nothing more is rented
    ├── APIError                      the API answered, and the answer is an error
    │   ├── WrongAuthToken            400 "wrong authorization token" / "authentication failed"
    │   ├── NotFound                  404
    │   │   ├── InstanceNotFound
    │   │   ├── DeploymentNotFound    also an unknown workspace type
    │   │   ├── ReservationNotFound
    │   │   └── AddonNotActive        404 "add-on `cam` not active on this instance"
    │   ├── AddonUnavailable          503: the deployment has no such add-on, or it is not
    │   │                             streaming yet; a snapshot with no image
    │   ├── BusyWorkspaceDeployment   every deployment that could serve is in use
    │   ├── BusyWorkspaceInstance     the instance cannot do that now (e.g. terminate in INIT)
    │   ├── RateLimited               403 with an empty body, or 429
    │   └── ServerError               5xx
    ├── TransportError                no answer: connection refused, reset, timed out
    ├── MalformedResponse             an answer that is not the JSON the API documents
    │   └── UnreadableNewAnswer       ... to POST /new: reconciled; ``made`` is what it made
    ├── InstanceError                 an instance did not become usable
    │   ├── InstanceFailed            it reached INIT_FAIL, TERMINATING or TERMINATED
    │   ├── InstanceLost              it was lost while held: ended by the service, its host
    │   │                             unreachable (``pytest_rerobots.leasewatch``)
    │   └── InstanceTimeout           the deadline passed; carries the last status seen
    └── SSHError                      the robot's host
        ├── HostKeyMismatch           the host key is not the one the API reported
        ├── SSHConnectError           could not connect or log in
        ├── CommandTimeout            a command outran its timeout
        │   └── ExpectTimeout         a live process did not print what expect() waited for
        │       └── ExpectEOF         ... and ended first
        ├── CommandFailed             ``run(..., check=True)`` saw a non-zero exit status
        ├── RemoteFileError           ``put``/``get``: no such remote path, or no permission
        └── LocalFileError            ``put``/``get``: no such local path, or no permission

Whether a retry is safe is a property of the request, not the error: see
:mod:`pytest_rerobots.retry`. The messages never contain the API token.

Every error here except ``CommandFailed``, ``CommandTimeout`` (with its kinds),
``RemoteFileError`` and ``LocalFileError`` is trouble with the infrastructure, not a
verdict on the code under test; the pytest plugin reports it as a test *error*
(:func:`is_infrastructure`). The first three are what the product did (a firmware
whose boot log is missing is a product bug), and a local file that is not there is the
test's own mistake, so they are test *failures*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .textsafe import block_lines, fence_prefixed

if TYPE_CHECKING:
    from .channel import CommandResult

__all__ = [
    "APIError",
    "AddonNotActive",
    "AddonUnavailable",
    "BudgetReached",
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
    "InstanceLost",
    "InstanceNotFound",
    "InstanceTimeout",
    "LocalFileError",
    "MalformedResponse",
    "NotFound",
    "RateLimited",
    "RemoteFileError",
    "RerobotsError",
    "ReservationNotFound",
    "SSHConnectError",
    "SSHError",
    "ServerError",
    "TransportError",
    "UnreadableNewAnswer",
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


class AddonNotActive(NotFound):
    """The add-on (e.g. the camera, ``cam``) is not applied to that instance: apply it
    first, or it was removed, or the instance ended."""


class AddonUnavailable(APIError):
    """The add-on cannot serve now: the deployment does not support it, it is still
    starting (the camera is "not streaming yet"), or the camera had no image to give."""


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


class InstanceLost(InstanceError):
    """A robot held READY is no longer usable: the service ended it (its lease, an admin,
    another client), or its host stopped answering. ``at`` is when this run noticed (epoch
    seconds); ``reason`` says what happened, for the health record."""

    def __init__(self, message: str, *, instance_id: str | None = None,
                 status: str | None = None, at: float = 0.0, reason: str = "") -> None:
        super().__init__(message, instance_id=instance_id, status=status)
        self.at = at
        self.reason = reason

    def again(self) -> InstanceLost:
        """The same error, new (to raise once more, from the use that met it)."""
        return InstanceLost(str(self), instance_id=self.instance_id, status=self.status,
                            at=self.at, reason=self.reason)


class InstanceTimeout(InstanceError):
    """The instance was not READY by the deadline; ``status`` is the last one seen."""


class SSHError(RerobotsError):
    """Trouble with the SSH connection to the robot's host."""


class HostKeyMismatch(SSHError):
    """The host presented a key that is not among those the API reported."""


class SSHConnectError(SSHError):
    """Could not connect or authenticate to the robot's host."""


def _tails(stdout: str, stderr: str) -> str:
    """The message lines that show both streams' tails (empty streams left out).

    The robot's output, not ours: its control characters are shown as escapes, so that
    the terminal that shows the failure acts on none, and under GitHub Actions the lines
    are fenced off from the runner's workflow commands (textsafe). Never the message's
    first line: pytest's one-line summaries show only that, and a fence cut in half
    there would stop the job's workflow commands for good."""
    from .transcript import tail  # lazily: every pytest run imports this module

    parts = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text.strip():
            body = "\n".join(f"  {line}" for line in block_lines(tail(text)))
            parts.append(f"{name} (last lines):\n{body}")
    return fence_prefixed("\n".join(parts)) if parts else "(no output on stdout or stderr)"


#: What to do when a background process held a command's output open (CommandTimeout).
BACKGROUND_FIX = (
    "(run() waits for the end of the command's output, and a background process holds it: "
    "redirect its output and stdin, run(\"cmd > /tmp/cmd.log 2>&1 < /dev/null &\"), "
    "or start it with spawn(\"cmd\"), which returns at once and ends it at teardown)")


class CommandTimeout(SSHError):
    """A command did not finish within its timeout. The connection stays usable.

    ``stdout`` and ``stderr`` hold what it printed before the timeout (whole; the
    message shows their tails). ``where`` names the instance, when known.
    """

    def __init__(self, message: str, *, command: str = "", timeout: float | None = None,
                 stdout: str = "", stderr: str = "", background: bool = False) -> None:
        self.command = command
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr
        #: A process the command started in the background held its output open.
        self.background = background
        fix = BACKGROUND_FIX if background else (
            "(a longer timeout: run(..., timeout=S), or --rerobots-command-timeout "
            "S for every command)")
        super().__init__(f"{message}\n{_tails(stdout, stderr)}\n{fix}")


class ExpectTimeout(CommandTimeout):
    """``Process.expect()`` waited ``timeout`` seconds and the process never printed the
    pattern: a verdict on the code under test, not infrastructure trouble. ``output`` is
    the tail of what it printed, also shown in the message."""

    def __init__(self, message: str, *, command: str = "", timeout: float | None = None,
                 output: str = "") -> None:
        # Not CommandTimeout's message: its hint names the command timeout, not expect's.
        SSHError.__init__(self, message)
        self.command = command
        self.timeout = timeout
        self.stdout = output
        self.stderr = ""
        self.output = output


class ExpectEOF(ExpectTimeout):
    """The process ended (or its channel closed) before printing what ``expect()`` waited
    for; ``except ExpectTimeout`` catches it too."""


class CommandFailed(SSHError):
    """``run(..., check=True)`` saw a non-zero exit status; ``result`` holds the output.

    The message shows the tails of both streams (a flasher that prints progress on
    stdout and the error on stderr is understood from both)."""

    def __init__(self, result: CommandResult, where: str = "") -> None:
        self.result = result
        on = f" on {where}" if where else ""
        super().__init__(
            f"command {result.command!r}{on} exited with status {result.exit_status} "
            f"after {result.duration:.2f} s\n{_tails(result.stdout, result.stderr)}")


class RemoteFileError(RerobotsError, OSError):
    """``put`` or ``get`` found no such remote path, or was not allowed to use it.

    A test failure, not infrastructure trouble: a missing boot log is what the
    product did. ``path`` is the remote path, ``reason`` what went wrong.
    """

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:  # OSError's own __str__ would want errno and strerror
        return str(self.args[0]) if self.args else ""


class LocalFileError(RerobotsError, OSError):
    """``put`` found no local file to send, or ``get`` no local place to write, or was not
    allowed to use it: the test's own mistake, so a test failure (one short line naming
    the local path, not the frames of the copy). An ``OSError`` with ``errno`` and
    ``filename`` as ``open`` set them; ``path`` is the local path, ``reason`` what went
    wrong."""

    def __init__(self, message: str, *, path: str = "", reason: str = "",
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.errno = errno
        self.filename = path

    def __str__(self) -> str:  # OSError's own __str__ would want errno and strerror
        return str(self.args[0]) if self.args else ""


def is_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` is infrastructure trouble (the API, the network, the robot's host)
    rather than the outcome of a command under test."""
    return isinstance(exc, RerobotsError) and not isinstance(
        exc, (CommandFailed, CommandTimeout, RemoteFileError, LocalFileError))


class UnreadableNewAnswer(MalformedResponse):
    """``POST /new`` answered 200 with something that cannot be read (not JSON, no ``id``,
    an id that is not a UUID). The answer was treated as lost and reconciled: ``made`` is
    the instance ``GET /instances`` showed it created (which the caller must end), or None."""

    def __init__(self, message: str, *, made: str | None = None) -> None:
        super().__init__(message)
        self.made = made


class BudgetReached(RerobotsError):
    """The run's budget of instance-minutes (``--rerobots-budget``) is spent: the robot a
    test needs is not rented. ``budget`` and ``spent`` are in instance-minutes."""

    def __init__(self, message: str, *, budget: float = 0.0, spent: float = 0.0) -> None:
        super().__init__(message)
        self.budget = budget
        self.spent = spent
