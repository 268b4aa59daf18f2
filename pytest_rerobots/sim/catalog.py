"""The simulator's catalog: workspace types, deployments, timings, limits, tokens and faults.

A catalog is a TOML file; the format is documented for users in ``docs/simulator-catalog.md``.
The built-in catalog is ``default_catalog.toml`` next to this module, and the built-in
profiles (:data:`PROFILES`, e.g. ``realistic``) are files beside it that add to it. A file
adds to the built-in catalog too: its types and deployments join the built-in ones (a type
or deployment id it names again replaces the built-in one) and its sections override them
key by key; with a top-level ``profile = "realistic"`` it adds to that profile instead, and
with ``replace_builtin = true`` it starts from nothing.

Durations of the lifecycle (``ready_delay``, ``terminate_delay``, ``not_found_window``) are a
number of seconds or ``[low, high]``: each instance then draws its own, uniformly.

Every value is checked; a bad one raises :class:`~pytest_rerobots.errors.ConfigurationError`
naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import difflib
import re
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias

from ..errors import ConfigurationError
from .endpoints import ENDPOINT_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ENDPOINT_NAMES",
    "LOSS_KINDS",
    "OVERRIDE_KEYS",
    "PROFILES",
    "Catalog",
    "DeploymentSpec",
    "Duration",
    "EndpointFault",
    "Faults",
    "RateLimits",
    "SimTimings",
    "Switches",
    "WorkspaceTypeSpec",
    "apply_overrides",
    "default_catalog",
    "duration_at",
    "load_catalog",
    "parse_catalog",
    "profile_catalog",
]

#: A duration in seconds: a number, or ``(low, high)`` for one drawn uniformly per instance.
Duration: TypeAlias = "float | tuple[float, float]"

#: The built-in profiles, by name: each a file beside this module that adds to the built-in
#: catalog. ``Simulator("realistic")``, ``rerobots-sim --config realistic``.
PROFILES: dict[str, str] = {"realistic": "realistic.toml"}

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_WTYPE_RE = re.compile(r"[A-Za-z0-9_]+")
_DEVICE_RE = re.compile(r"/dev/[A-Za-z0-9_][A-Za-z0-9_.-]*")
# A fixed namespace so that a deployment without an explicit id gets the same id every run.
_DEPLOYMENT_NS = uuid.UUID("6f1d2c3a-8b0e-4e57-9d38-2f1f3c7a9e01")


@dataclass(frozen=True)
class WorkspaceTypeSpec:
    """A workspace type: what its deployments report and what its hosts start with."""

    name: str
    type_version: int = 1
    supported_addons: tuple[str, ...] = ()
    desc: str = ""
    files: Mapping[str, str] = field(default_factory=dict)
    commands: tuple[str, ...] = ()
    #: Serial devices: a path on the robot (``/dev/ttyUSB0``) -> the command serving it.
    devices: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentSpec:
    """One workspace deployment of the catalog (``created``/``dissolved`` are naive UTC)."""

    id: str
    type: str
    region: str
    created: dt.datetime
    icounter: int = 0
    lockout: bool = False
    offline: bool = False
    dissolved: dt.datetime | None = None
    #: This deployment's own share of instances ending INIT_FAIL (else the global one).
    init_fail_rate: float | None = None
    #: This deployment's own share of instances stuck in INIT (else the global one).
    stuck_init: float | None = None


def duration_at(value: Duration, fraction: float) -> float:
    """The seconds that a draw ``fraction`` in [0, 1) picks from ``value``."""
    if isinstance(value, tuple):
        low, high = value
        return low + (high - low) * fraction
    return value


@dataclass
class SimTimings:
    """Durations (seconds) and rates that drive the instance lifecycle.

    The defaults are the built-in catalog's: the real service's behaviour, much faster.
    """

    ready_delay: Duration = 1.0
    #: TERMINATING -> TERMINATED; the deployment stays busy all that time.
    terminate_delay: Duration = 0.3
    init_fail_rate: float = 0.0
    keepalive_timeout: float = 60.0
    init_timeout: float = 60.0
    #: Seconds a ``GET /deployments`` answer is served from cache (0: never cached).
    deployments_cache: float = 0.0
    #: The camera add-on: ``starting`` this long after the instance is READY, then
    #: ``active``; ``stopping`` this long after DELETE (sim/addons.py).
    cam_delay: float = 0.3


@dataclass
class RateLimits:
    """Request budgets per window: per token, and per address for anonymous calls."""

    token_budget: int = 3600
    ip_budget: int = 60
    rate_window: float = 3600.0


@dataclass
class Switches:
    """Choices between variants where the published API summary, its docs and the real
    server disagree, and the real server's races; the defaults are the real server's
    shapes, without the races."""

    sshkey_in_new_response: bool = False
    queuelen_404_unknown: bool = False
    vpn_nil_shape: bool = False
    eurl_on_ready: bool = False
    #: Two POST /new on one free deployment inside the 404 window both succeed; the later
    #: instance then ends INIT_FAIL.
    busy_race: bool = False
    #: A machine that cannot sandbox the simulated robots is an error, not a warning.
    require_sandbox: bool = False
    #: Applying the camera add-on again is the 503 "already applied" of the other add-ons
    #: (the API notes say so of every add-on); the server's camera answers 200.
    addon_repeat_error: bool = False


@dataclass
class EndpointFault:
    """Injected trouble for one endpoint: a share of error answers, and added latency."""

    error_rate: float = 0.0
    error_status: int = 500
    latency: float = 0.0


@dataclass
class Faults:
    """Fault injection settings (off by default, except the real server's 404 window)."""

    #: Lookups of a new instance answer 404 this long after POST /new.
    not_found_window: Duration = 0.2
    stuck_init: float = 0.0
    lose_new_response: float = 0.0
    seed: int | None = None
    #: A robot lost while held: ``"terminate"`` (the service ends it), ``"partition"``
    #: (its host stops answering, connections stay open) or ``"drop_ssh"`` (its SSH
    #: connections are dropped); ``""`` for none. It strikes ``lose_held_after`` seconds
    #: after READY, the first ``lose_held_count`` instances (0: every one).
    lose_held: str = ""
    lose_held_after: float = 1.0
    lose_held_count: int = 1
    endpoints: dict[str, EndpointFault] = field(default_factory=dict)


#: The values of ``[faults] lose_held``: how a held robot is lost.
LOSS_KINDS = ("terminate", "partition", "drop_ssh")


@dataclass(frozen=True)
class Catalog:
    """A parsed, validated catalog."""

    types: Mapping[str, WorkspaceTypeSpec]
    deployments: tuple[DeploymentSpec, ...]
    timings: SimTimings = field(default_factory=SimTimings)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    switches: Switches = field(default_factory=Switches)
    faults: Faults = field(default_factory=Faults)
    tokens: Mapping[str, str] = field(default_factory=dict)


# The flat names accepted by ``Simulator(**overrides)`` and ``World.configure``: every scalar
# setting of the four tunable sections, each name unique across them.
_SECTIONS: dict[str, type] = {
    "timings": SimTimings,
    "rate_limits": RateLimits,
    "switches": Switches,
    "faults": Faults,
}
OVERRIDE_KEYS: dict[str, str] = {
    f.name: section
    for section, cls in _SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f.name != "endpoints"
}


class _Checker:
    """Validates values, naming the source and the dotted key in every error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigurationError:
        return ConfigurationError(f"{self.source}: {key}: {problem}")

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {value!r}")
        return value

    def known(self, table: Mapping[str, Any], allowed: set[str] | frozenset[str], key: str) -> None:
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            where = f"{key}.{unknown[0]}" if key else unknown[0]
            raise self.fail(where, f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def number(self, value: Any, key: str, *, minimum: float = 0.0) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum:g}, got {value!r}")
        return float(value)

    def duration(self, value: Any, key: str) -> Duration:
        """Seconds, or ``[low, high]`` seconds (a tuple once checked)."""
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise self.fail(key, f"expected seconds or [low, high], got {value!r}")
            low = self.number(value[0], f"{key}[0]")
            high = self.number(value[1], f"{key}[1]")
            if high < low:
                raise self.fail(key, f"[low, high] needs low <= high, got {value!r}")
            return (low, high)
        return self.number(value, key)

    def rate(self, value: Any, key: str) -> float:
        number = self.number(value, key)
        if number > 1.0:
            raise self.fail(key, f"must be a probability between 0 and 1, got {value!r}")
        return number

    def integer(self, value: Any, key: str, *, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value!r}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def string(self, value: Any, key: str, *, nonempty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        if nonempty and not value.strip():
            raise self.fail(key, "must not be empty")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of strings, got {value!r}")
        return tuple(self.string(item, f"{key}[{i}]") for i, item in enumerate(value))

    def when(self, value: Any, key: str) -> dt.datetime:
        """A TOML date/datetime or an ISO string, as naive UTC (the API's convention)."""
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise self.fail(key, f"expected a date or datetime, got {value!r}") from None
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return value
        if isinstance(value, dt.date):
            return dt.datetime(value.year, value.month, value.day)
        raise self.fail(key, f"expected a date or datetime, got {value!r}")


_DURATIONS = frozenset({"ready_delay", "terminate_delay", "not_found_window"})


def _check_share(check: _Checker, value: Any, key: str) -> float:
    # true/false is the common case; a number makes only some instances stick.
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return check.rate(value, key)


def _check_setting(check: _Checker, name: str, value: Any, key: str) -> Any:
    """Validate one tunable setting by its flat name (see :data:`OVERRIDE_KEYS`)."""
    if name in ("init_fail_rate", "lose_new_response"):
        return check.rate(value, key)
    if name == "stuck_init":
        return _check_share(check, value, key)
    if name in _DURATIONS:
        return check.duration(value, key)
    if name in ("token_budget", "ip_budget"):
        return check.integer(value, key, minimum=1)
    if name == "seed":
        return check.integer(value, key)
    if name == "lose_held_count":
        return check.integer(value, key)
    if name == "lose_held":
        kind = check.string(value, key, nonempty=False)
        if kind not in ("", *LOSS_KINDS):
            raise check.fail(key, f"expected one of {', '.join(LOSS_KINDS)} (or \"\"), "
                                  f"got {value!r}")
        return kind
    if OVERRIDE_KEYS[name] == "switches":
        return check.boolean(value, key)
    if name == "rate_window":
        return check.number(value, key, minimum=0.001)
    return check.number(value, key)


def _section(check: _Checker, data: Mapping[str, Any], name: str, cls: type) -> dict[str, Any]:
    """The checked settings that one of the tunable sections' TOML table gives."""
    table = check.table(data.get(name, {}), name)
    allowed = {f.name for f in dataclasses.fields(cls)}
    check.known(table, allowed, name)
    return {
        key: _check_setting(check, key, value, f"{name}.{key}")
        for key, value in table.items()
        if key != "endpoints"
    }


def _endpoint_faults(check: _Checker, data: Mapping[str, Any]) -> dict[str, EndpointFault]:
    faults = check.table(data.get("faults", {}), "faults")
    table = check.table(faults.get("endpoints", {}), "faults.endpoints")
    result: dict[str, EndpointFault] = {}
    for name, spec in table.items():
        key = f"faults.endpoints.{name}"
        if name != "*" and name not in ENDPOINT_NAMES:
            raise check.fail(key, f"unknown endpoint (expected \"*\" or one of "
                                  f"{', '.join(sorted(ENDPOINT_NAMES))})")
        spec = check.table(spec, key)
        check.known(spec, {"error_rate", "error_status", "latency"}, key)
        status = check.integer(spec.get("error_status", 500), f"{key}.error_status")
        if not 500 <= status <= 599:
            raise check.fail(f"{key}.error_status", f"must be a 5xx status, got {status}")
        result[name] = EndpointFault(
            error_rate=check.rate(spec.get("error_rate", 0.0), f"{key}.error_rate"),
            error_status=status,
            latency=check.number(spec.get("latency", 0.0), f"{key}.latency"),
        )
    return result


def _types(check: _Checker, data: Mapping[str, Any]) -> dict[str, WorkspaceTypeSpec]:
    table = check.table(data.get("types", {}), "types")
    result: dict[str, WorkspaceTypeSpec] = {}
    for name, spec in table.items():
        key = f"types.{name}"
        if not _WTYPE_RE.fullmatch(name):
            raise check.fail(key, "a workspace type name is letters, digits and underscores")
        spec = check.table(spec, key)
        check.known(spec, {"type_version", "supported_addons", "desc", "files", "commands",
                           "devices"}, key)
        devices = check.table(spec.get("devices", {}), f"{key}.devices")
        for path, command in devices.items():
            dkey = f"{key}.devices.{path}"
            check.string(command, dkey)
            if not _DEVICE_RE.fullmatch(path):
                raise check.fail(dkey, "a device path is /dev/NAME (letters, digits, _ . -)")
        files = check.table(spec.get("files", {}), f"{key}.files")
        for path, text in files.items():
            fkey = f"{key}.files.{path}"
            check.string(text, fkey, nonempty=False)
            # Files land under the host's own directory; never let one escape it.
            parts = Path(path).parts
            if not path or Path(path).is_absolute() or ".." in parts:
                raise check.fail(fkey, "a file path must be relative and stay inside the host")
        result[name] = WorkspaceTypeSpec(
            name=name,
            type_version=check.integer(spec.get("type_version", 1), f"{key}.type_version"),
            supported_addons=check.strings(spec.get("supported_addons", []),
                                           f"{key}.supported_addons"),
            desc=check.string(spec.get("desc", ""), f"{key}.desc", nonempty=False),
            files=dict(files),
            commands=check.strings(spec.get("commands", []), f"{key}.commands"),
            devices=dict(devices),
        )
    return result


def _deployments(
    check: _Checker, data: Mapping[str, Any], types: Mapping[str, WorkspaceTypeSpec]
) -> tuple[DeploymentSpec, ...]:
    items = data.get("deployments", [])
    if not isinstance(items, list):
        raise check.fail("deployments", "expected an array of tables ([[deployments]])")
    result: list[DeploymentSpec] = []
    seen: set[str] = set()
    for index, spec in enumerate(items):
        key = f"deployments[{index}]"
        spec = check.table(spec, key)
        check.known(spec, {"id", "type", "region", "created", "icounter", "lockout", "offline",
                           "dissolved", "init_fail_rate", "stuck_init"}, key)
        if "type" not in spec:
            raise check.fail(f"{key}.type", "missing")
        wtype = check.string(spec["type"], f"{key}.type")
        if wtype not in types:
            raise check.fail(f"{key}.type", f"no workspace type {wtype!r} in [types] "
                                            "(nor in the built-in catalog)")
        # Empty, as a hardshare deployment's is on the real server.
        region = check.string(spec.get("region", "us:cali"), f"{key}.region", nonempty=False)
        if "id" in spec:
            ident = check.string(spec["id"], f"{key}.id")
            if not _UUID_RE.fullmatch(ident):
                raise check.fail(f"{key}.id", f"expected a UUID, got {ident!r}")
            ident = ident.lower()
        else:
            ident = str(uuid.uuid5(_DEPLOYMENT_NS, f"{wtype}/{region}/{index}"))
        if ident in seen:
            raise check.fail(f"{key}.id", f"duplicate deployment id {ident}")
        seen.add(ident)
        dissolved_value = spec.get("dissolved", False)
        dissolved: dt.datetime | None
        if isinstance(dissolved_value, bool):
            dissolved = dt.datetime(2020, 1, 1) if dissolved_value else None
        else:
            dissolved = check.when(dissolved_value, f"{key}.dissolved")
        result.append(
            DeploymentSpec(
                id=ident,
                type=wtype,
                region=region,
                created=check.when(spec.get("created", "2019-11-18 22:23:57"),
                                   f"{key}.created"),
                icounter=check.integer(spec.get("icounter", 0), f"{key}.icounter"),
                lockout=check.boolean(spec.get("lockout", False), f"{key}.lockout"),
                offline=check.boolean(spec.get("offline", False), f"{key}.offline"),
                dissolved=dissolved,
                init_fail_rate=(check.rate(spec["init_fail_rate"], f"{key}.init_fail_rate")
                                if "init_fail_rate" in spec else None),
                stuck_init=(_check_share(check, spec["stuck_init"], f"{key}.stuck_init")
                            if "stuck_init" in spec else None),
            )
        )
    return tuple(result)


def _tokens(check: _Checker, data: Mapping[str, Any]) -> dict[str, str]:
    table = check.table(data.get("tokens", {}), "tokens")
    result: dict[str, str] = {}
    for token, user in table.items():
        key = f"tokens.{token[:4]}..."  # never echo a whole token into a message
        if not token.strip() or any(ch.isspace() for ch in token):
            raise check.fail(key, "a token must be non-empty and contain no whitespace")
        result[token] = check.string(user, key)
    return result


def parse_catalog(data: Mapping[str, Any], source: str = "<catalog>",
                  base: Catalog | None = None) -> Catalog:
    """Validate decoded TOML (a mapping) and build a :class:`Catalog`.

    With a ``base``, the result adds to it (see the module docstring), unless ``data`` says
    ``replace_builtin = true``; without one, omitted settings keep their defaults.
    """
    check = _Checker(source)
    check.known(data, {"types", "deployments", "timings", "rate_limits", "switches", "faults",
                       "tokens", "replace_builtin", "profile"}, "")
    if check.boolean(data.get("replace_builtin", False), "replace_builtin"):
        base = None
    types = _types(check, data)
    known_types = {**(base.types if base else {}), **types}
    deployments = _deployments(check, data, known_types)
    endpoints = _endpoint_faults(check, data)
    if base is None:
        base = Catalog(types={}, deployments=())
    replaced = {d.id for d in deployments}
    faults = dataclasses.replace(base.faults, **_section(check, data, "faults", Faults))
    faults.endpoints = {**copy.deepcopy(base.faults.endpoints), **endpoints}
    return Catalog(
        types=known_types,
        deployments=tuple(d for d in base.deployments if d.id not in replaced) + deployments,
        timings=dataclasses.replace(base.timings, **_section(check, data, "timings", SimTimings)),
        rate_limits=dataclasses.replace(base.rate_limits,
                                        **_section(check, data, "rate_limits", RateLimits)),
        switches=dataclasses.replace(base.switches,
                                     **_section(check, data, "switches", Switches)),
        faults=faults,
        tokens={**base.tokens, **_tokens(check, data)},
    )


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{source}: not valid TOML: {exc}") from exc


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a TOML catalog file; it adds to the built-in catalog, or to the
    built-in profile its top-level ``profile`` names (``profile = "realistic"``), unless it
    says ``replace_builtin = true``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError) and path.suffix == "" and len(path.parts) == 1:
            # A bare name that is no file: most likely a mistyped profile name.
            close = difflib.get_close_matches(str(path), sorted(PROFILES), n=1, cutoff=0.6)
            hint = (f"; did you mean the built-in profile {close[0]!r}?" if close else
                    f"; the built-in profiles are: {', '.join(sorted(PROFILES))}")
        raise ConfigurationError(
            f"{path}: cannot read the catalog: {exc.strerror or exc}{hint}") from exc
    data = _read_toml(text, str(path))
    return parse_catalog(data, str(path), base=_base_of(data, str(path)))


def _base_of(data: Mapping[str, Any], source: str) -> Catalog:
    """What a catalog file adds to: the profile its ``profile`` key names, else the
    built-in catalog."""
    if "profile" not in data:
        return default_catalog()
    check = _Checker(source)
    name = check.string(data["profile"], "profile")
    if data.get("replace_builtin") is True:
        raise check.fail("profile", "a catalog that says replace_builtin = true starts from "
                                    "nothing, not from a profile: drop one of the two")
    try:
        return profile_catalog(name)
    except ConfigurationError as exc:
        raise check.fail("profile", str(exc)) from None


def _packaged(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text("utf-8")


def default_catalog() -> Catalog:
    """The built-in catalog shipped as ``default_catalog.toml``."""
    return parse_catalog(_read_toml(_packaged("default_catalog.toml"), "<built-in catalog>"),
                         "<built-in catalog>")


def profile_catalog(name: str) -> Catalog:
    """The built-in profile ``name`` (a key of :data:`PROFILES`) over the built-in catalog."""
    if name not in PROFILES:
        raise ConfigurationError(f"no built-in simulator profile {name!r} "
                                 f"(there are: {', '.join(sorted(PROFILES))})")
    source = f"<{name} profile>"
    return parse_catalog(_read_toml(_packaged(PROFILES[name]), source), source,
                         base=default_catalog())


def apply_overrides(catalog: Catalog, overrides: Mapping[str, Any],
                    source: str = "overrides") -> Catalog:
    """A copy of ``catalog`` with flat settings (names in :data:`OVERRIDE_KEYS`) replaced."""
    check = _Checker(source)
    check.known(overrides, frozenset(OVERRIDE_KEYS), "")
    sections = {name: copy.deepcopy(getattr(catalog, name)) for name in _SECTIONS}
    for name, value in overrides.items():
        setattr(sections[OVERRIDE_KEYS[name]], name, _check_setting(check, name, value, name))
    return dataclasses.replace(catalog, **sections)


def check_setting(name: str, value: Any, source: str = "configure") -> Any:
    """Validate one flat setting for run-time changes; returns the normalised value."""
    check = _Checker(source)
    check.known({name: value}, frozenset(OVERRIDE_KEYS), "")
    return _check_setting(check, name, value, name)


def check_endpoint(name: str, source: str = "faults") -> str:
    """Validate an endpoint name for fault injection ("*" means every endpoint)."""
    if name != "*" and name not in ENDPOINT_NAMES:
        raise ConfigurationError(
            f"{source}: unknown endpoint {name!r} (expected \"*\" or one of "
            f"{', '.join(sorted(ENDPOINT_NAMES))})"
        )
    return name
