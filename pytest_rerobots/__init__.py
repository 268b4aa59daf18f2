"""pytest-rerobots: run pytest suites on real robots rented from the rerobots cloud."""

from __future__ import annotations

from .client import RerobotsClient
from .errors import (
    APIError,
    BusyWorkspaceDeployment,
    BusyWorkspaceInstance,
    CommandFailed,
    CommandTimeout,
    ConfigurationError,
    DeploymentNotFound,
    HostKeyMismatch,
    InstanceError,
    InstanceFailed,
    InstanceNotFound,
    InstanceTimeout,
    MalformedResponse,
    NotFound,
    RateLimited,
    RerobotsError,
    ReservationNotFound,
    ServerError,
    SSHConnectError,
    SSHError,
    TransportError,
    WrongAuthToken,
)
from .instance import Instance, InstanceOptions, Outcome
from .run import Run
from .ssh import CommandResult

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "BusyWorkspaceDeployment",
    "BusyWorkspaceInstance",
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "ConfigurationError",
    "DeploymentNotFound",
    "HostKeyMismatch",
    "Instance",
    "InstanceError",
    "InstanceFailed",
    "InstanceNotFound",
    "InstanceOptions",
    "InstanceTimeout",
    "MalformedResponse",
    "NotFound",
    "Outcome",
    "RateLimited",
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
]
