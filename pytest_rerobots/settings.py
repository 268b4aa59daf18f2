"""The plugin's settings: one table of them, resolved command line > environment > ini > default.

:data:`OPTIONS` is the one table: each setting's parser, default, help and names. The
plugin's ``--rerobots-*`` options, ini names and ``--help``, the :class:`Settings`
defaults, the defaults of ``InstanceOptions`` and the documentation's configuration
reference all come from it. Pure Python (no pytest): :func:`resolve` takes the three
sources as plain mappings and returns :class:`Settings`, or raises
:class:`~pytest_rerobots.errors.ConfigurationError` naming the option and where the bad
value came from. The plugin turns that into ``pytest.UsageError``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

#: The rerobots API's origin.
DEFAULT_API_URL = "https://api.rerobots.net"

__all__ = ["COMMAND_LINE_ONLY", "DEFAULTS", "OPTIONS", "Option", "Secret", "Settings", "resolve",
           "shown"]

SCOPES = ("session", "module", "function")
XDIST_MODES = ("per-worker", "shared")
#: --rerobots-camera: when the camera add-on's pictures are taken (camera.py).
CAMERA_MODES = ("on-failure", "always", "off")
#: --rerobots-artifacts: the directory under the rootdir when none is named. Not hidden, so
#: that an upload step (actions/upload-artifact leaves hidden files out) takes it as it is.
DEFAULT_ARTIFACTS = "rerobots-artifacts"


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
    if parts.path or parts.query or parts.fragment:
        # The API (and the simulator) answers at its origin's root, and the version is in
        # the Accept header: "/v1" would only be answered "unrecognized command".
        origin = f"{parts.scheme}://{parts.netloc}"
        raise ValueError(f"{text!r} has a path; the API is served at the root of its origin "
                         f"(the version goes in a header, not the URL): use {origin!r}")
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


#: Seconds after the last keepalive ping at which the service ends an instance.
KEEPALIVE_WINDOW = 60.0


def _keepalive(value: Any) -> float:
    number = _seconds(0.05)(value)
    if number >= KEEPALIVE_WINDOW:
        raise ValueError(
            f"{value!r} is not below the service's {KEEPALIVE_WINDOW:g} s keepalive window: "
            f"the service ends an instance {KEEPALIVE_WINDOW:g} s after its last ping, so "
            "with pings this far apart it would end the robot during the test (the default, "
            f"{DEFAULTS_KEEPALIVE:g} s, leaves a margin)")
    return number


DEFAULTS_KEEPALIVE = 40.0


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


def _budget(value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number of instance-minutes") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"{value!r} must be a number of instance-minutes, 0 or more "
                         "(fractions allowed)")
    return number


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


def shown(value: Any) -> str:
    """A default as ``--help`` and the reference name it: ``600``, ``on``, ``session``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Option:
    """One setting: how its text is read, its default, its help, and its name in each source.

    The names follow from ``name``: ``--rerobots-ready-timeout``, ``REROBOTS_READY_TIMEOUT``
    (if ``in_env``), ``rerobots_ready_timeout`` (if ``in_ini``). ``help`` may name the
    default as ``{default}``. ``kind`` is what the command line takes: ``"value"``,
    ``"switch"`` (nothing; ``1``/``0``, ``on``/``off``... in the environment and the ini
    file) or ``"list"`` (one value, repeatable). ``instance``: the setting is also an
    :class:`~pytest_rerobots.instance.InstanceOptions` field, the default of every
    instance of a run, which takes its default from here too. ``metavar``: what
    ``--help`` calls the value; by default the name (``READY-TIMEOUT``).

    Read-only. A plain class, not a dataclass: every pytest run that has the plugin
    installed builds the table, and a dataclass's generated methods took a third of this
    module's import time.
    """

    __slots__ = ("default", "help", "in_env", "in_ini", "instance", "kind", "metavar", "name",
                 "parse")

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    kind: str
    in_env: bool
    in_ini: bool
    instance: bool
    metavar: str | None

    def __init__(self, name: str, parse: Callable[[Any], Any], default: Any, help: str, *,
                 kind: str = "value", in_env: bool = False, in_ini: bool = True,
                 instance: bool = False, metavar: str | None = None) -> None:
        if metavar is None and kind != "switch":
            metavar = name.upper().replace("_", "-")
        values = {"name": name, "parse": parse, "default": default,
                  "help": help.format(default=shown(default)), "kind": kind,
                  "in_env": in_env, "in_ini": in_ini, "instance": instance,
                  "metavar": metavar}
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Option is read-only: cannot set {key!r}")

    def __repr__(self) -> str:
        return f"Option({self.name!r}, default={self.default!r}, kind={self.kind!r})"

    @property
    def flag(self) -> str:
        return "--rerobots-" + self.name.replace("_", "-")

    @property
    def env(self) -> str | None:
        return f"REROBOTS_{self.name.upper()}" if self.in_env else None

    @property
    def ini(self) -> str | None:
        return f"rerobots_{self.name}" if self.in_ini else None

    @property
    def dest(self) -> str:
        """Its attribute in pytest's parsed options."""
        return f"rerobots_{self.name}"


#: The table of settings: each resolved from the command line, the environment and the ini
#: file (:func:`resolve`). The plugin's options and ``--help``, the defaults of
#: :class:`Settings` and of ``InstanceOptions``, and the documentation's configuration
#: reference (``docs/gen_ref.py``) all come from here, in this order.
OPTIONS: tuple[Option, ...] = (
    Option("wtype", _wtype, None, "workspace type to run on, e.g. basic_kobuki", in_env=True),
    Option("deployment", _text, None, "pin one workspace deployment (its id)", in_env=True),
    Option("api_url", _url, DEFAULT_API_URL, "API origin (default {default})", in_env=True),
    Option("sim", _bool, False,
           "start an embedded rerobots simulator for the session (no token needed)",
           kind="switch", in_env=True),
    Option("sim_config", _path, None,
           "the simulator's catalog (TOML); default: the built-in catalog"),
    Option("ready_timeout", _seconds(0.001), 600.0,
           "seconds to wait for an instance to become READY (default {default})",
           instance=True),
    Option("queue_timeout", _seconds(0), 600.0,
           "seconds to wait for a busy robot: in a deployment's queue, or while the service "
           "still releases it after a terminate (default {default}; 0 fails at once)",
           instance=True),
    Option("init_retries", _count, 2,
           "times an instance that failed to start (INIT_FAIL, or INIT past the ready "
           "timeout) is ended and rented again (default {default})", instance=True),
    Option("prefetch", _bool, True,
           "on (default) or off: when the first test needs a session-scoped instance, "
           "start renting every workspace type the selected tests need, at once"),
    Option("lease", _lease, 3600,
           "expire_d sent with every instance request: the server ends it after this many "
           "seconds whatever happens (default {default})", instance=True),
    Option("keepalive_interval", _keepalive, DEFAULTS_KEEPALIVE,
           "seconds between keepalive pings (default {default}; the server ends an instance "
           "60 s after the last one)", instance=True),
    Option("command_timeout", _seconds(0.001), 300.0,
           "seconds a command run on a robot may take when the test names no timeout "
           "(default {default}; run(..., timeout=None) waits for ever)", instance=True),
    Option("allow", _cidrs, (),
           "firewall source (CIDR) to accept; repeatable (default: this runner's address)",
           kind="list", instance=True, metavar="CIDR"),
    Option("scope", _choice(SCOPES), "session",
           "lifetime of rerobots_instance: session, module or function (default {default})"),
    Option("xdist", _choice(XDIST_MODES), "per-worker",
           "under pytest-xdist: per-worker (default) or shared instances"),
    Option("require", _bool, False, "with no token and no simulator, error instead of skipping",
           kind="switch"),
    Option("ledger", _path, None,
           "record of every instance this checkout rented (default: in pytest's cache dir)",
           in_env=True),
    Option("keep_on_failure", _bool, False,
           "do not terminate an instance used by a failing test: print an ssh command to log "
           "in to it, and how to end it (pytest --rerobots-sweep)", kind="switch"),
    Option("reuse", _minutes, None,
           "keep session instances for the next run of this checkout, which attaches to them "
           "instead of renting; one no run attaches to ends after this many minutes "
           "(fractions allowed; ignored under CI=true)"),
    Option("camera", _choice(CAMERA_MODES), "on-failure",
           "pictures from the camera add-on of each robot a test used, where its deployment "
           "has one: on-failure (default: after a failed or errored test), always, or off",
           in_env=True),
    Option("artifacts", _path, None,
           "directory for the camera's pictures (JPEG, named after the test; default: "
           "rerobots-artifacts under the rootdir)", in_env=True, metavar="DIR"),
    Option("budget", _budget, None,
           "instance-minutes this run may spend (fractions allowed): once spent, counting the "
           "robots still held, nothing more is rented and the tests that need a new robot "
           "are errors", in_env=True, metavar="MINUTES"),
    Option("each_deployment", _bool, False,
           "run each test on every deployment of its workspace type, one robot each (as "
           "@pytest.mark.rerobots(..., each_deployment=True) does)", kind="switch",
           in_env=True),
    Option("rent_ahead_idle", _minutes, 15.0,
           "a robot rented ahead (--rerobots-rent-ahead) that no run of this checkout "
           "attaches to is ended after this many minutes (default {default})", in_env=True,
           metavar="MINUTES"),
    Option("watch_interval", _seconds(0), 5.0,
           "seconds between checks that a held robot is still usable: its status on the "
           "service and an SSH probe of its host (default {default}; a robot lost is noticed "
           "within this, a host that stopped answering within this plus 5 s; 0: no checks)",
           instance=True),
    Option("reruns", _count, 0,
           "run a test that ended in infrastructure trouble (a lost robot, SSH, the API) again "
           "on a fresh robot, up to this many times; a product failure is never rerun "
           "(default {default})", in_env=True),
)

#: Options of the command line only, after the settings: the token's file (read by
#: :func:`resolve`, never kept) and two actions that run instead of the tests.
COMMAND_LINE_ONLY: tuple[Option, ...] = (
    Option("token_file", _path, None,
           "read the API token from this file (default: env REROBOTS_API_TOKEN)",
           in_ini=False, metavar="PATH"),
    Option("sweep", _bool, False,
           "terminate every live instance in the ledger, print what it did, exit",
           kind="switch", in_ini=False),
    Option("list", _bool, False,
           "print the workspace types, their deployments with region and queue length, and "
           "your live instances (with a token), then exit", kind="switch", in_ini=False),
    Option("rent_ahead", _bool, False,
           "rent the robots of --rerobots-wtype, --rerobots-deployment or the types named "
           "after it, and exit without waiting for READY: the next run of this checkout "
           "attaches to them (collects no tests; run it before installing the rest)",
           kind="switch", in_ini=False),
)

#: The table's default of each option, by name.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {opt.name: opt.default for opt in (*OPTIONS, *COMMAND_LINE_ONLY)})


@dataclass(frozen=True)
class Settings:
    """Every setting of a run, after resolution; the defaults are the table's
    (:data:`OPTIONS`). ``token`` is never printed, and not a field either
    (``vars(settings)`` shows only the :class:`Secret` that holds it)."""

    wtype: str | None = DEFAULTS["wtype"]
    deployment: str | None = DEFAULTS["deployment"]
    api_url: str = DEFAULTS["api_url"]
    secret: Secret | None = field(default=None, repr=False)
    sim: bool = DEFAULTS["sim"]
    sim_config: Path | None = DEFAULTS["sim_config"]
    ready_timeout: float = DEFAULTS["ready_timeout"]
    queue_timeout: float = DEFAULTS["queue_timeout"]
    init_retries: int = DEFAULTS["init_retries"]
    prefetch: bool = DEFAULTS["prefetch"]
    lease: int = DEFAULTS["lease"]
    keepalive_interval: float = DEFAULTS["keepalive_interval"]
    command_timeout: float = DEFAULTS["command_timeout"]
    allow: tuple[str, ...] = DEFAULTS["allow"]
    scope: str = DEFAULTS["scope"]
    xdist: str = DEFAULTS["xdist"]
    require: bool = DEFAULTS["require"]
    ledger: Path | None = DEFAULTS["ledger"]
    sweep: bool = DEFAULTS["sweep"]
    #: Keep an instance used by a failing test for debugging (docs/contract.md).
    keep_on_failure: bool = DEFAULTS["keep_on_failure"]
    #: Keep session instances between runs; idle ones end after this many minutes.
    reuse: float | None = DEFAULTS["reuse"]
    #: When to take the camera's pictures: on-failure, always or off (camera.py).
    camera: str = DEFAULTS["camera"]
    #: Where the pictures go; None: rerobots-artifacts under the rootdir.
    artifacts: Path | None = DEFAULTS["artifacts"]
    #: The instance-minutes the run may spend (``pytest_rerobots.budget``), if limited.
    budget: float | None = DEFAULTS["budget"]
    #: Run each test on every deployment of its type (``each_deployment``).
    each_deployment: bool = DEFAULTS["each_deployment"]
    #: Minutes a robot rented ahead waits for a run to attach to it before it is ended.
    rent_ahead_idle: float = DEFAULTS["rent_ahead_idle"]
    watch_interval: float = DEFAULTS["watch_interval"]
    #: Reruns of a test that ended in infrastructure trouble (never of a product failure).
    reruns: int = DEFAULTS["reruns"]
    sources: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def token(self) -> str | None:
        """The API token, if one is set."""
        return self.secret.reveal() if self.secret else None

    def instance_options(self) -> dict[str, Any]:
        """The settings that are the defaults of every instance (the table's ``instance``
        column), by name: keywords for ``Run`` and ``InstanceOptions.updated``."""
        return {opt.name: getattr(self, opt.name) for opt in OPTIONS if opt.instance}

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
                # "--rerobots-x (from command line)": the flag is named once, not twice.
                where = "command line" if source.startswith("command line") else source
                raise ConfigurationError(f"{opt.flag} (from {where}): {exc}") from None
            sources[opt.name] = source
            break
    token = _token(token_file, env)
    values["secret"] = Secret(token) if token else None
    if token:  # where it came from (never the token itself), for the wrong-token hint
        sources["token"] = (f"command line --rerobots-token-file {os.fspath(token_file)}"
                            if token_file is not None
                            else "environment variable REROBOTS_API_TOKEN")
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
