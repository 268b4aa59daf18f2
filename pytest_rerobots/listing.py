"""``pytest --rerobots-list``: what can be rented, and what this account holds now.

No pytest here: the plugin calls :func:`main` from ``pytest_cmdline_main`` and
exits with its return value. The workspace types (``GET /workspaces``) and the
deployments with their regions and queue lengths (``GET /deployments?info``)
are public, so the listing works without a token. With one, the queue lengths
come from ``GET /qlen`` instead (the real service most likely caches
``/deployments`` for minutes; docs/contract.md, "Deployments and queues") and
the user's live instances from ``GET /instances``. Under ``--rerobots-sim`` it
lists an embedded simulator's catalog, started for the listing and stopped after.

Every line fits an 80-column terminal (an API origin longer than that aside).
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import RerobotsClient
from .errors import ConfigurationError, RerobotsError
from .health import AVOID_FOR, Health
from .settings import Settings
from .textsafe import commands_stopped, one_line
from .wire import epoch

__all__ = ["Deployment", "Listing", "gather", "kept_here", "main", "render"]

WIDTH = 80

UNLISTED = "your instances: not listed without an API token (REROBOTS_API_TOKEN)"
QUEUE_LEGEND = "queue: 0 free; 1 in use or still being released; 2 or more: reservations wait"


@dataclass(frozen=True)
class Deployment:
    """One row of the deployments table. ``queue`` is None when the API gave none."""

    id: str
    wtype: str
    region: str
    queue: int | None


@dataclass
class Listing:
    """What :func:`gather` found. ``instances`` is None without a token; ``errors``
    holds what could not be listed (the rest still is)."""

    api_url: str
    mode: str
    wtypes: list[str] = field(default_factory=list)
    deployments: list[Deployment] = field(default_factory=list)
    live_queues: bool = False
    instances: list[Mapping[str, Any]] | None = None
    errors: list[str] = field(default_factory=list)


def gather(client: RerobotsClient, mode: str = "remote API") -> Listing:
    """Ask the API what it offers, and (with a token) what the user holds.

    Four calls at most, so that it fits the anonymous budget (60 an hour) many times
    over. An error in one part is recorded in ``errors``; the others are still asked.
    """
    found = Listing(api_url=client.api_url, mode=mode)
    try:
        found.wtypes = sorted(client.workspace_types())
        found.deployments = _deployments(client.deployments(info=True))
    except RerobotsError as exc:
        found.errors.append(f"cannot list the workspace deployments: {exc}")
    if not client.has_token:
        return found
    if found.deployments:
        try:
            live = client.queue_lengths(deployments=[d.id for d in found.deployments])
        except RerobotsError:
            pass  # the public numbers stand: a 404 here only means "skipped" (locked out)
        else:
            found.deployments = [_with_queue(d, live.get(d.id)) for d in found.deployments]
            found.live_queues = True
    try:
        listing = client.instances(details=True)
    except RerobotsError as exc:
        found.errors.append(f"cannot list your instances: {exc}")
    else:
        found.instances = [item for item in listing["workspace_instances"]
                           if isinstance(item, Mapping)]
    return found


def _deployments(payload: Mapping[str, Any]) -> list[Deployment]:
    info = payload.get("info") or {}
    rows = []
    for ident in payload.get("workspace_deployments", []):
        details = info.get(ident) or {}
        queue = details.get("queuelen")
        rows.append(Deployment(str(ident), str(details.get("type") or "?"),
                               str(details.get("region") or "-"),
                               queue if isinstance(queue, int) else None))
    return sorted(rows, key=lambda d: (d.wtype, d.region, d.id))


def _with_queue(deployment: Deployment, live: Any) -> Deployment:
    # /qlen leaves out locked-out and offline deployments: keep the public number for those.
    if isinstance(live, Mapping) and isinstance(live.get("qlen"), int):
        return Deployment(deployment.id, deployment.wtype, deployment.region, live["qlen"])
    return deployment


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, flexible: int,
           right: Sequence[int] = (), width: int = WIDTH) -> list[str]:
    """Columns two spaces apart; column ``flexible`` is cut (ending in ``~``) so that a
    line fits in ``width``. The others (ids) are never cut: they are meant to be copied.
    Cells are the API's strings: each shown on one line, its controls as escapes."""
    table = [list(headers), *[[one_line(cell) for cell in r] for r in rows]]
    widths = [max(len(r[c]) for r in table) for c in range(len(headers))]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    if excess > 0:
        widths[flexible] = max(len(headers[flexible]), widths[flexible] - excess)
    lines = []
    for row in table:
        cells = []
        for c, cell in enumerate(row):
            if len(cell) > widths[c]:
                cell = cell[:widths[c] - 1] + "~"
            cells.append(cell.rjust(widths[c]) if c in right else cell.ljust(widths[c]))
        lines.append("  ".join(cells).rstrip())
    return lines


def _age(stamp: Any, now: float) -> str:
    started = epoch(stamp)
    if started == float("-inf"):  # no start time, or one that cannot be read
        return "?"
    seconds = max(0, int(now - started))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def kept_here(ledger: Path | None) -> dict[str, str]:
    """The instances this checkout's runs kept (``--rerobots-keep-on-failure``,
    ``--rerobots-reuse``), by id: what each is kept for ("debug", "reuse"). Empty when
    there is no store, or it cannot be read (the listing goes on without the marks)."""
    if ledger is None:
        return {}
    from . import keep  # lazily: only a listing with a ledger reads the store

    try:
        records = keep.KeptStore(keep.kept_dir(ledger)).records()
    except (OSError, ConfigurationError):
        return {}
    # Short words, so that the table still fits 80 columns with the type uncut.
    return {str(r["id"]): "debug" if r.get("kind") == keep.FAILURE else str(r.get("kind"))
            for r in records if r.get("id")}


def render(found: Listing, *, has_token: bool, wtype: str | None = None,
           wtype_source: str = "", now: float | None = None,
           kept: Mapping[str, str] | None = None) -> list[str]:
    """The listing as lines of at most 80 characters. ``wtype`` is the run's workspace
    type, if it has one: a type the API does not offer is pointed out. ``kept``: the
    instances this checkout kept, by id, marked in the table (:func:`kept_here`)."""
    now = time.time() if now is None else now
    token = "token set" if has_token else "no token"
    lines = [one_line(f"rerobots: {found.api_url} ({found.mode}), {token}")]
    if found.wtypes:
        lines += textwrap.wrap(", ".join(one_line(w) for w in found.wtypes), WIDTH,
                               initial_indent="workspace types: ", subsequent_indent="  ")
    if wtype is not None and found.wtypes and wtype not in found.wtypes:
        source = f" (from {wtype_source})" if wtype_source else ""
        lines += textwrap.wrap(one_line(f"this run's workspace type {wtype}{source} is not "
                                        "offered here"), WIDTH)
    if found.deployments:
        lines.append("")
        lines += _table(("type", "deployment", "region", "queue"),
                        [(d.wtype, d.id, d.region, "?" if d.queue is None else str(d.queue))
                         for d in found.deployments], flexible=0, right=(3,))
        lines.append(QUEUE_LEGEND)
        if not found.live_queues:
            lines.append("(read without a token: the service may give them minutes late)")
    elif not found.errors:
        lines.append("no workspace deployments")
    lines.append("")
    if found.instances is None:
        if not has_token:
            lines.append(UNLISTED)
    elif not found.instances:
        lines.append("your live instances: none")
    else:
        kept = kept or {}
        marked = [str(i.get("id")) in kept for i in found.instances]
        headers: tuple[str, ...] = ("instance", "type", "region", "status", "age")
        rows: list[tuple[str, ...]] = [(str(i.get("id", "?")), str(i.get("type") or "?"),
                 str(i.get("region") or "-"), str(i.get("status") or "?"),
                 _age(i.get("starttime"), now)) for i in found.instances]
        if any(marked):
            headers += ("kept",)
            rows = [(*row, kept.get(row[0], "")) for row in rows]
        lines.append(f"your live instances ({len(found.instances)}):")
        lines += _table(headers, rows, flexible=1, right=(4,))
        if any(marked):
            lines += textwrap.wrap(
                "kept: kept by a run of this checkout (debug: after a failing test; reuse: "
                "for the next run); pytest --rerobots-sweep ends them", WIDTH,
                break_on_hyphens=False)
    for error in found.errors:
        lines += textwrap.wrap(one_line(f"rerobots list: {error}"), WIDTH,
                               subsequent_indent="  ")
    return lines


def health_lines(recent: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """This checkout's health record (:mod:`.health`): each deployment's recent troubles,
    and whether rentals of its type avoid it now."""
    if not recent:
        return ["", "deployment health (this checkout): no trouble recorded"]
    now = time.time()
    lines = ["", "deployment health (this checkout, last 24 h; rentals avoid a deployment "
                 f"for {AVOID_FOR / 3600:g} h after trouble):"]
    for deployment, entries in sorted(recent.items()):
        last = max(float(e.get("at", 0)) for e in entries)
        avoided = "avoided now" if now - last < AVOID_FOR else "not avoided"
        lines += textwrap.wrap(one_line(f"{deployment[:8]}: {Health.describe(entries)} "
                                        f"({avoided})"), WIDTH, subsequent_indent="  ")
    lines.append("(pytest --rerobots-sweep forgets it)")
    return lines


@contextmanager
def _client(settings: Settings) -> Iterator[tuple[RerobotsClient, str]]:
    """The API to list: the configured one, or an embedded simulator under ``sim``."""
    if not settings.sim:
        # One retry: a listing is for a person waiting at a terminal.
        with RerobotsClient(token=settings.token, api_url=settings.api_url,
                            ignore_env=True, retries=1) as api:
            yield api, "remote API"
        return
    with _simulator(settings.sim_config) as (url, token), \
            RerobotsClient(token=token, api_url=url, ignore_env=True) as api:
        yield api, "embedded simulator"


@contextmanager
def _simulator(config: Path | None) -> Iterator[tuple[str, str]]:
    try:
        # Lazy: only --rerobots-sim needs the simulator, and its extras may be absent.
        from .sim import Simulator
    except ImportError as exc:
        raise ConfigurationError(
            f"--rerobots-sim needs the simulator's extras: pip install 'pytest-rerobots[sim]' "
            f"({exc})"
        ) from None
    try:
        sim = Simulator(config)
        sim.start()
    except ConfigurationError as exc:
        raise ConfigurationError(f"--rerobots-sim-config: {exc}") from None
    try:
        yield sim.url, sim.token
    finally:
        sim.stop()


def main(settings: Settings, out: Callable[[str], Any] = print) -> int:
    """Print the listing with ``out``, one line a call; 0, or 1 if a part failed.

    ``ConfigurationError`` when the embedded simulator cannot start (the plugin
    makes it a usage error)."""
    with _client(settings) as (api, mode):
        found = gather(api, mode)
        lines = render(found, has_token=api.has_token, wtype=settings.wtype,
                       wtype_source=settings.sources.get("wtype", ""),
                       kept=kept_here(settings.ledger) if not settings.sim else None)
        if settings.ledger is not None:
            origin = mode if mode == "embedded simulator" else api.api_url
            lines += health_lines(Health(settings.ledger.parent, origin).recent())
        # The API's strings start lines here (a type, a wrapped list of types or error
        # text) or sit inside them: under GitHub Actions, the runner must act on none.
        with commands_stopped(out):
            for line in lines:
                out(line)
    return 1 if found.errors else 0
