"""The plugin's settings, resolved in one place: command line > environment > ini > default.

Pure Python (no pytest): :func:`resolve` takes the three sources as plain
mappings and returns :class:`Settings`, or raises
:class:`~pytest_rerobots.errors.ConfigurationError` naming the option and
where the bad value came from. The plugin turns that into ``pytest.UsageError``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

#: The rerobots API's origin.
DEFAULT_API_URL = "https://api.rerobots.net"

__all__ = ["OPTIONS", "Option", "Secret", "Settings", "resolve"]

SCOPES = ("session", "module", "function")
XDIST_MODES = ("per-worker", "shared")


class Secret:
    """A secret string (the API token) that no ``repr``, ``str`` or ``vars`` shows: pytest's
    ``-l`` prints the locals of failing frames, and objects holding one among them."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # never pickled along with an object that holds it
        raise TypeError("a Secret is not pickled")


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, after resolution. ``token`` is never printed, and not a
    field either (``vars(settings)`` shows only the :class:`Secret` that holds it)."""

    wtype: str | None = None
    deployment: str | None = None
    api_url: str = DEFAULT_API_URL
    secret: Secret | None = field(default=None, repr=False)
    sim: bool = False
    sim_config: Path | None = None
    ready_timeout: float = 600.0
    queue_timeout: float = 600.0
    init_retries: int = 2
    prefetch: bool = True
    lease: int = 3600
    keepalive_interval: float = 40.0
    command_timeout: float = 300.0
    allow: tuple[str, ...] = ()
    scope: str = "session"
    xdist: str = "per-worker"
    require: bool = False
    ledger: Path | None = None
    sweep: bool = False
    #: Keep an instance used by a failing test for debugging (docs/contract.md).
    keep_on_failure: bool = False
    #: Keep session instances between runs; idle ones end after this many minutes.
    reuse: float | None = None
    sources: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def token(self) -> str | None:
        """The API token, if one is set."""
        return self.secret.reveal() if self.secret else None


def _text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _wtype(value: Any) -> str:
    text = _text(value)
    if not text.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{text!r} is not a workspace type (letters, digits, _ and -)")
    return text


def _url(value: Any) -> str:
    text = _text(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{text!r} is not an http(s) URL")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def _seconds(minimum: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if not number >= minimum or number == float("inf"):
            raise ValueError(f"{value!r} must be a finite number >= {minimum:g}")
        return number
    return parse


def _lease(value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number of seconds") from None
    if number < 1:
        raise ValueError(f"{value!r} must be at least 1 second")
    return number


def _count(value: Any) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if not 0 <= number <= 10:
        raise ValueError(f"expected 0 to 10, got {number}")
    return number


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _cidrs(value: Any) -> tuple[str, ...]:
    items = value.split() if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.IPv4Network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IPv4 address or CIDR block") from None
    return tuple(out)


#: A firewall source broader than this prefix (a /8 is 16 million addresses) is warned about.
BROADEST_PREFIX = 8


def allow_warnings(allow: Sequence[str]) -> list[str]:
    """One warning for each ``--rerobots-allow`` block shorter than /8: it opens the robot's
    SSH port to much of the internet (``0.0.0.0/0``: to all of it)."""
    return [
        f"--rerobots-allow {block} admits {ipaddress.IPv4Network(block).num_addresses:,} "
        f"addresses to the robot's SSH port (a prefix shorter than /{BROADEST_PREFIX}); "
        "name this runner's own address or network instead"
        for block in allow
        if ipaddress.IPv4Network(block).prefixlen < BROADEST_PREFIX
    ]


def _minutes(value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number of minutes") from None
    if not 0 < number < float("inf"):
        raise ValueError(f"{value!r} must be a number of minutes above 0 (fractions allowed)")
    return number


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


@dataclass(frozen=True)
class Option:
    """One setting and its names in each source."""

    name: str
    flag: str
    env: str | None
    ini: str | None
    parse: Callable[[Any], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("wtype", "--rerobots-wtype", "REROBOTS_WTYPE", "rerobots_wtype", _wtype,
           "workspace type to run on, e.g. basic_kobuki"),
    Option("deployment", "--rerobots-deployment", "REROBOTS_DEPLOYMENT", "rerobots_deployment",
           _text, "pin one workspace deployment (its id)"),
    Option("api_url", "--rerobots-api-url", "REROBOTS_API_URL", "rerobots_api_url", _url,
           f"API origin (default {DEFAULT_API_URL})"),
    Option("sim", "--rerobots-sim", "REROBOTS_SIM", "rerobots_sim", _bool,
           "start an embedded rerobots simulator for the session (no token needed)"),
    Option("sim_config", "--rerobots-sim-config", None, "rerobots_sim_config", _path,
           "the simulator's catalog (TOML); default: the built-in catalog"),
    Option("ready_timeout", "--rerobots-ready-timeout", None, "rerobots_ready_timeout",
           _seconds(0.001), "seconds to wait for an instance to become READY (default 600)"),
    Option("queue_timeout", "--rerobots-queue-timeout", None, "rerobots_queue_timeout",
           _seconds(0), "seconds to wait for a busy robot: in a deployment's queue, or "
           "while the service still releases it after a terminate (default 600; 0 fails "
           "at once)"),
    Option("init_retries", "--rerobots-init-retries", None, "rerobots_init_retries",
           _count, "times an instance that failed to start (INIT_FAIL, or INIT past the "
           "ready timeout) is ended and rented again (default 2)"),
    Option("prefetch", "--rerobots-prefetch", None, "rerobots_prefetch", _bool,
           "on (default) or off: when the first test needs a session-scoped instance, "
           "start renting every workspace type the selected tests need, at once"),
    Option("lease", "--rerobots-lease", None, "rerobots_lease", _lease,
           "expire_d sent with every instance request: the server ends it after this many "
           "seconds whatever happens (default 3600)"),
    Option("keepalive_interval", "--rerobots-keepalive-interval", None,
           "rerobots_keepalive_interval", _seconds(0.05),
           "seconds between keepalive pings (default 40; the server ends an instance "
           "60 s after the last one)"),
    Option("command_timeout", "--rerobots-command-timeout", None, "rerobots_command_timeout",
           _seconds(0.001), "seconds a command run on a robot may take when the test names "
           "no timeout (default 300; run(..., timeout=None) waits for ever)"),
    Option("allow", "--rerobots-allow", None, "rerobots_allow", _cidrs,
           "firewall source (CIDR) to accept; repeatable (default: this runner's address)"),
    Option("scope", "--rerobots-scope", None, "rerobots_scope", _choice(SCOPES),
           "lifetime of rerobots_instance: session, module or function (default session)"),
    Option("xdist", "--rerobots-xdist", None, "rerobots_xdist", _choice(XDIST_MODES),
           "under pytest-xdist: per-worker (default) or shared instances"),
    Option("require", "--rerobots-require", None, "rerobots_require", _bool,
           "with no token and no simulator, error instead of skipping"),
    Option("ledger", "--rerobots-ledger", "REROBOTS_LEDGER", "rerobots_ledger", _path,
           "record of every instance this checkout rented (default: in pytest's cache dir)"),
    Option("keep_on_failure", "--rerobots-keep-on-failure", None, "rerobots_keep_on_failure",
           _bool, "do not terminate an instance used by a failing test: print an ssh command "
           "to log in to it, and how to end it (pytest --rerobots-sweep)"),
    Option("reuse", "--rerobots-reuse", None, "rerobots_reuse", _minutes,
           "keep session instances for the next run of this checkout, which attaches to "
           "them instead of renting; one no run attaches to ends after this many minutes "
           "(fractions allowed; ignored under CI=true)"),
)


def resolve(
    cli: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    ini: Mapping[str, Any] | None = None,
    *,
    token_file: str | os.PathLike[str] | None = None,
    sweep: bool = False,
) -> Settings:
    """Resolve every option: ``cli`` (None = not given) > ``env`` > ``ini`` > default.

    ``ini`` values that are empty (not set) count as not given. The token comes
    from ``token_file`` when given, else ``REROBOTS_API_TOKEN``.
    """
    env = os.environ if env is None else env
    ini = ini or {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        candidates = [
            (cli.get(opt.name), f"command line {opt.flag}"),
            (env.get(opt.env) if opt.env else None, f"environment variable {opt.env}"),
            (ini.get(opt.ini) if opt.ini else None, f"ini option {opt.ini}"),
        ]
        for raw, source in candidates:
            if raw is None or raw == "" or raw == []:
                continue
            try:
                values[opt.name] = opt.parse(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{opt.flag} (from {source}): {exc}") from None
            sources[opt.name] = source
            break
    token = _token(token_file, env)
    values["secret"] = Secret(token) if token else None
    return Settings(**values, sweep=sweep, sources=sources)


def _token(token_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> str | None:
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"--rerobots-token-file (from command line): cannot read {str(path)!r}: "
                f"{exc.strerror or exc}"
            ) from None
        if not token:
            raise ConfigurationError(
                f"--rerobots-token-file (from command line): {str(path)!r} is empty"
            )
        return token
    return (env.get("REROBOTS_API_TOKEN") or "").strip() or None
