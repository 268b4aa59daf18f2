"""``InstanceOptions``: how an instance is rented and held, its defaults from the settings table.

The options that are also settings (``ready_timeout``, ``lease``, ``allow``...: the
table's ``instance`` column in :mod:`.settings`) take their defaults from that table, so
that a ``Run`` made without pytest and a pytest run without options rent alike. The
others (``connect_timeout``, ``fast_polling``...) are no setting of the plugin's and
are defined here only. Pure Python: no pytest, paramiko or requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, fields, replace
from typing import Any

from .settings import DEFAULTS

__all__ = ["ConstructorKeywords", "InstanceOptions"]


@dataclass(frozen=True)
class InstanceOptions:
    """How an :class:`Instance` is rented and held (seconds unless said otherwise).

    ``allow`` lists firewall sources (CIDR); empty means the address the API
    sees this runner at. ``fast_polling`` polls every 50 ms (a local simulator).
    """

    ready_timeout: float = DEFAULTS["ready_timeout"]
    #: How long to wait for a busy robot (in a queue, or still being released); 0 fails
    #: at once.
    queue_timeout: float = DEFAULTS["queue_timeout"]
    #: How many times an instance that failed to start (INIT_FAIL, or INIT past the
    #: ready timeout) is replaced by a new rental.
    init_retries: int = DEFAULTS["init_retries"]
    #: ``expire_d`` of ``POST /new``: the server ends the instance after this long.
    lease: int | None = DEFAULTS["lease"]
    allow: tuple[str, ...] = DEFAULTS["allow"]
    keepalive_interval: float = DEFAULTS["keepalive_interval"]
    notfound_grace: float = 30.0
    connect_timeout: float = 60.0
    terminate_timeout: float = 120.0
    #: The timeout of a ``run`` that names none; ``None`` waits for ever.
    command_timeout: float | None = DEFAULTS["command_timeout"]
    #: Seconds between the lease watch's checks of a held robot (0: no watch).
    watch_interval: float = DEFAULTS["watch_interval"]
    connect: bool = True
    fast_polling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))

    def updated(self, **changes: Any) -> InstanceOptions:
        """A copy with ``changes``; an unknown name is a ``TypeError`` that lists the known."""
        unknown = sorted(set(changes) - _OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown instance option {unknown[0]!r} "
                            f"(known: {', '.join(sorted(_OPTION_NAMES))})")
        return replace(self, **changes) if changes else self


_OPTION_NAMES = frozenset(f.name for f in fields(InstanceOptions))


class ConstructorKeywords(AbstractSet[str]):
    """The keywords of a dataclass's constructor that are not :class:`InstanceOptions`
    fields, less ``exclude`` (those its caller passes itself): read from the class's
    fields at first use, so that the class may be defined after this set (``Instance``,
    whose ``build`` sorts its keywords into options and its own)."""

    def __init__(self, owner: Callable[[], Any], exclude: Iterable[str] = ()) -> None:
        self._owner = owner
        self._exclude = frozenset(exclude)
        self._names: frozenset[str] | None = None

    @property
    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = frozenset(
                f.name for f in fields(self._owner()) if f.init
            ) - _OPTION_NAMES - self._exclude
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ConstructorKeywords({sorted(self.names)!r})"
