"""A short deployment id, as the summary table prints it, is that deployment.

``--rerobots-deployment=b34d1ee4``, ``@pytest.mark.rerobots(deployment="b34d1ee4")``,
``run.acquire("basic_kobuki", deployment="b34d1ee4")`` and ``run.acquire("b34d1ee4")``
name a deployment by a prefix of its id, as git takes a short hash. :class:`Deployments`
resolves such a prefix through the API's deployment listing (``GET /deployments?info``,
public), asked once per run and only when a prefix needs it: a full id, or a workspace
type, costs no call.

A prefix that no deployment id starts with is :class:`.DeploymentNotFound`; one that
several ids start with is a :class:`.ConfigurationError`. Both name the deployments (with
their type and region) it could have meant.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigurationError, DeploymentNotFound
from .wire import is_uuid

if TYPE_CHECKING:
    from .client import RerobotsClient

__all__ = ["Deployments", "looks_like_prefix"]

#: The shortest prefix taken for a deployment (git's own minimum for a short hash).
MIN_PREFIX = 4
#: How many candidates an error names at most.
SHOWN = 8

_HEX_PREFIX = re.compile(r"^[0-9a-fA-F][0-9a-fA-F-]*$")


def looks_like_prefix(text: str) -> bool:
    """Whether ``text`` can be the start of a deployment id: at least :data:`MIN_PREFIX`
    hex digits (and dashes), shorter than a whole id. Workspace types such as
    ``basic_kobuki`` never look so."""
    return (len(text) < 36 and len(text.replace("-", "")) >= MIN_PREFIX
            and bool(_HEX_PREFIX.match(text)))


@dataclass(frozen=True)
class _Known:
    id: str
    wtype: str
    region: str

    def __str__(self) -> str:
        return f"{self.id} ({self.wtype}, {self.region})"


class Deployments:
    """The API's deployments, listed on first need and then kept for the run."""

    def __init__(self, client: RerobotsClient) -> None:
        self._client = client
        self._known: list[_Known] | None = None
        self._types: list[str] | None = None
        self._lock = threading.Lock()

    def _listing(self) -> list[_Known]:
        with self._lock:
            if self._known is None:
                payload = self._client.deployments(info=True)
                info = payload.get("info") or {}
                known = []
                for ident in payload.get("workspace_deployments", []):
                    details = info.get(ident) if isinstance(info, Mapping) else None
                    details = details if isinstance(details, Mapping) else {}
                    known.append(_Known(str(ident), str(details.get("type") or "?"),
                                        str(details.get("region") or "-")))
                self._known = known
            return self._known

    def _candidates(self, prefix: str) -> list[_Known]:
        low = prefix.lower()
        return [d for d in self._listing() if d.id.lower().startswith(low)]

    def _named(self, found: list[_Known]) -> str:
        shown = ", ".join(str(d) for d in found[:SHOWN])
        more = f", and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        return shown + more

    def resolve(self, deployment: str) -> str:
        """The whole id of the deployment ``deployment`` names: itself if it is a whole id,
        else the one deployment whose id starts with it (an error otherwise)."""
        text = deployment.strip()
        if is_uuid(text):
            return text
        if not looks_like_prefix(text):
            raise DeploymentNotFound(
                f"deployment {text!r}: not a deployment id, nor the start of one (ids look "
                "like b34d1ee4-2a7b-445a-824a-ba4a30759f7f; pytest --rerobots-list shows them)")
        found = self._candidates(text)
        if len(found) == 1:
            return found[0].id
        if not found:
            every = self._listing()
            known = f"deployments: {self._named(every)}" if every else "no deployments listed"
            raise DeploymentNotFound(
                f"deployment {text!r}: no deployment id starts with it; {known} "
                "(pytest --rerobots-list shows them)")
        raise ConfigurationError(
            f"deployment {text!r} is ambiguous: {len(found)} deployment ids start with it: "
            f"{self._named(found)}; give more of the id")

    def target(self, target: str) -> str:
        """A target of ``acquire`` (a workspace type or a deployment id) with a short
        deployment id made whole. A workspace type, or a whole id, is returned as it is,
        with no call; so is anything that is not the start of a deployment id (the API
        then says the type is unknown). A hex-looking prefix that is a workspace type
        stays one."""
        text = target.strip()
        if is_uuid(text) or not looks_like_prefix(text):
            return target
        if self._candidates(text):
            return self.resolve(text)
        with self._lock:
            if self._types is None:
                self._types = list(self._client.workspace_types())
            types = self._types
        if text in types:
            return target
        return self.resolve(text)  # raises, naming the deployments
