"""pytest-rerobots: run pytest suites on real robots rented from the rerobots cloud."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AddonNotActive,
    AddonUnavailable,
    APIError,
    BudgetReached,
    BusyWorkspaceDeployment,
    BusyWorkspaceInstance,
    CommandFailed,
    CommandTimeout,
    ConfigurationError,
    DeploymentNotFound,
    ExpectEOF,
    ExpectTimeout,
    HostKeyMismatch,
    InstanceError,
    InstanceFailed,
    InstanceLost,
    InstanceNotFound,
    InstanceTimeout,
    LocalFileError,
    MalformedResponse,
    NotFound,
    RateLimited,
    RemoteFileError,
    RerobotsError,
    ReservationNotFound,
    ServerError,
    SSHConnectError,
    SSHError,
    TransportError,
    WrongAuthToken,
)

if TYPE_CHECKING:
    from .channel import CommandResult
    from .client import RerobotsClient
    from .instance import Instance, InstanceOptions, acquire
    from .live import Forward, Process
    from .outcome import Outcome
    from .run import Run

# The rest loads on first use: requests, paramiko and tenacity are not imported by
# every pytest run that merely has the plugin installed (see docs/architecture.md).
_LAZY = {
    "CommandResult": "channel",
    "Forward": "live",
    "Instance": "instance",
    "InstanceOptions": "options",
    "Outcome": "outcome",
    "Process": "live",
    "RerobotsClient": "client",
    "Run": "run",
    "acquire": "instance",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AddonNotActive",
    "AddonUnavailable",
    "BudgetReached",
    "BusyWorkspaceDeployment",
    "BusyWorkspaceInstance",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "ConfigurationError",
    "DeploymentNotFound",
    "ExpectEOF",
    "ExpectTimeout",
    "Forward",
    "HostKeyMismatch",
    "Instance",
    "InstanceError",
    "InstanceFailed",
    "InstanceLost",
    "InstanceNotFound",
    "InstanceOptions",
    "InstanceTimeout",
    "LocalFileError",
    "MalformedResponse",
    "NotFound",
    "Outcome",
    "Process",
    "RateLimited",
    "RemoteFileError",
    "RerobotsClient",
    "RerobotsError",
    "ReservationNotFound",
    "Run",
    "SSHConnectError",
    "SSHError",
    "ServerError",
    "TransportError",
    "WrongAuthToken",
    "__version__",
    "acquire",
]
