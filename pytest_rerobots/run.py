"""``Run``: one API client and every termination layer, with or without pytest.

::

    from pytest_rerobots import Run

    with Run(ready_timeout=900) as run:               # token from REROBOTS_API_TOKEN
        with run.acquire("basic_kobuki") as robot:    # started: READY, firewall open, SSH
            robot.run("uname -a", check=True)

A :class:`Run` owns what :func:`.instance.acquire` leaves out: the ledger
(layer 5), the watchdog process that ends what a killed run held (layer 3), the
signal guard that turns SIGTERM and SIGHUP into ``KeyboardInterrupt`` (layer 2),
the pool of instances held for a scope, the pool shared by xdist workers, and
the listeners that feed reports. Every instance it gives out is registered with
all of them; leaving the ``with`` block ends whatever it still holds. The pytest
plugin builds one ``Run`` per process and gives it to fixtures as ``rerobots_run``.

Without pytest the ledger is ``.rerobots/ledger.jsonl`` under the current
directory (``ledger=`` sets another path, ``ledger=None`` keeps none), and the
watchdog starts with the first rental, as in a pytest run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, overload

from . import keep
from .board import Board, Holder, current_test, wait_line, waiting_entry
from .budget import Budget
from .client import RerobotsClient
from .ending import end_ids
from .errors import BudgetReached, ConfigurationError, RerobotsError
from .fleet import end_all, start_all, wait_all
from .health import Health
from .instance import ENDED_OUTCOMES, Instance, InstanceListener, InstanceOptions, Outcome
from .ledger import Ledger
from .records import Records
from .settings import Secret
from .signals import SignalGuard
from .targets import Deployments
from .transcript import Transcript
from .watchdog import Watchdog
from .wire import is_uuid
from .xdist_pool import SharedPool

__all__ = ["DEFAULT_LEDGER", "Run"]

log = logging.getLogger("pytest_rerobots.run")

#: How long after a terminate the service may still hold the robot (it waits up to
#: 60 s for the workspace's acknowledgement, then up to 60 s more), in seconds.
RELEASE_WINDOW = 150.0

#: pytest scopes that outlast the test a robot was rented in.
WIDE_SCOPES = ("session", "package", "module", "class")

#: What to change when every robot a test needs is held by its own run.
SELF_HELD_ADVICE = (
    "hold the robot for a narrower scope (a function-scoped fixture, or --rerobots-scope "
    "function), run fewer xdist workers (-n), or give this test a robot the others do not "
    "hold (@pytest.mark.rerobots(deployment=...) or --rerobots-deployment)")

#: The ledger of a ``Run`` made without pytest, relative to the current directory.
DEFAULT_LEDGER = Path(".rerobots") / "ledger.jsonl"

#: Why a ``Run`` without a token rents nothing (said before any call).
NO_TOKEN = ("no API token: set REROBOTS_API_TOKEN (a token of your rerobots account), or "  # noqa: S105
            "pass Run(token=...); or point the Run at a simulator (rerobots-sim prints "
            "REROBOTS_API_URL and REROBOTS_API_TOKEN)")

_DEFAULT: Any = object()  # "not given", where None has a meaning of its own


class Run:
    """One run: an API client, the termination layers, and the instances held.

    ``api_url`` and ``token`` default to ``REROBOTS_API_URL`` and
    ``REROBOTS_API_TOKEN`` (unless ``ignore_env``). ``ledger`` is a path, or None
    for no ledger (then nothing is recorded for ``--rerobots-sweep``). ``watchdog``
    False leaves layer 3 out (an embedded simulator dies with the process anyway).
    ``signals`` False leaves SIGTERM and SIGHUP alone. ``share_dir`` is the
    directory of an xdist run's shared pool. ``listeners`` see every instance's
    life (the plugin's live progress line); ``records`` keeps them for the summary.
    ``signals`` may also be a :class:`.signals.SignalGuard` to use (the plugin's).
    ``keep_on_failure`` and ``reuse`` (minutes) let instances outlive the run (see
    :mod:`.keep`): in a store beside the ledger, or in ``kept_dir``, for ``checkout``
    (default: the current directory); they need a ledger and a token.
    ``budget`` is the instance-minutes the run may spend (:mod:`.budget`): once spent, a
    rental raises :class:`.BudgetReached`; shared through ``board_dir`` when given.
    Other keywords are the defaults of every instance (:class:`.InstanceOptions`
    fields, e.g. ``ready_timeout``).
    """

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        ledger: str | os.PathLike[str] | None = _DEFAULT,
        run_id: str | None = None,
        watchdog: bool = True,
        signals: bool | SignalGuard = True,
        share_dir: str | os.PathLike[str] | None = None,
        listeners: Iterable[InstanceListener] = (),
        records: Records | None = None,
        ignore_env: bool = False,
        keep_on_failure: bool = False,
        reuse: float | None = None,
        kept_dir: str | os.PathLike[str] | None = None,
        checkout: str | None = None,
        board_dir: str | os.PathLike[str] | None = None,
        token_source: str | None = None,
        budget: float | None = None,
        health_dir: str | os.PathLike[str] | object | None = _DEFAULT,
        health_origin: str | None = None,
        **defaults: Any,
    ) -> None:
        self.defaults = InstanceOptions().updated(**defaults)
        if token is None and not ignore_env:
            token = os.environ.get("REROBOTS_API_TOKEN") or None
            token_source = token_source or "environment variable REROBOTS_API_TOKEN"
        self.client = RerobotsClient(token=token, api_url=api_url, ignore_env=ignore_env,
                                     token_source=token_source or "the token passed to Run")
        self.run_id = run_id or str(uuid.uuid4())
        #: The API's deployments, listed once (on first need) to resolve short ids.
        self.deployments = Deployments(self.client)
        self.records = records if records is not None else Records()
        #: What tests did on this run's robots (every instance's connection records here).
        self.transcript = Transcript()
        self.listeners: list[InstanceListener] = [self.records, *listeners]
        #: The run's budget of instance-minutes, if it has one.
        self.budget = Budget(budget, board_dir) if budget is not None else None
        if self.budget is not None:
            self.listeners.append(self.budget)
        if ledger is _DEFAULT:
            ledger = DEFAULT_LEDGER
            self._unprepared: Path | None = DEFAULT_LEDGER.parent
        else:
            self._unprepared = None
        self.ledger = (Ledger(ledger, run_id=self.run_id, api_url=self.client.api_url)
                       if ledger is not None else None)
        #: The checkout's health record of deployments (:mod:`.health`): beside the ledger
        #: unless ``health_dir`` says where (None: none), for ``health_origin`` (default:
        #: the API origin).
        if health_dir is _DEFAULT:
            health_dir = self.ledger.path.parent if self.ledger is not None else None
        self.health = (Health(health_dir, health_origin or self.client.api_url)  # type: ignore[arg-type]
                       if health_dir is not None else None)
        # REROBOTS_NO_WATCHDOG=1 is undocumented: it leaves layer 3 out so that the
        # project's own tests can show layer 4 (keepalive) working alone.
        self.watchdog: Watchdog | None = None
        if watchdog and os.environ.get("REROBOTS_NO_WATCHDOG") != "1":
            # Spawned with the first rental. Long enough to wait out an INIT that may
            # last until the ready timeout.
            self.watchdog = Watchdog(
                self.client.api_url, token, ledger=self.ledger,
                deadline=max(180.0, self.defaults.ready_timeout + 60.0))
        # Held as a Secret (vars(run) never shows it), for the keepers' pipes only.
        self._secret = Secret(token) if token else None
        self.keep_on_failure = keep_on_failure
        self.reuse = reuse
        self.kept: keep.KeptStore | None = None
        # (Also without keeping: a run attaches to what ``--rerobots-rent-ahead`` rented.)
        if self.ledger is not None and token:
            self.kept = keep.KeptStore(
                kept_dir if kept_dir is not None else keep.kept_dir(self.ledger.path),
                api_url=self.client.api_url, token_sha256=self.client.token_sha256(),
                checkout=checkout)
        self.signals = signals if isinstance(signals, SignalGuard) else SignalGuard()
        self._signals = signals is not False
        self.shared = SharedPool(share_dir) if share_dir is not None else None
        self._pool: dict[Hashable, Instance] = {}
        self._failed: dict[Hashable, Exception] = {}
        self._acquired: list[Instance] = []
        #: key -> (set when its background start is over, set to call it off)
        self._pending: dict[Hashable, tuple[threading.Event, threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.checkout = checkout if checkout is not None else os.getcwd()
        #: The board the processes of an xdist run share (see :mod:`.board`), if any.
        self.board = (Board(board_dir, worker=os.environ.get("PYTEST_XDIST_WORKER"))
                      if board_dir is not None else None)
        self._testing: str | None = None
        self._waiting: dict[int, dict[str, Any]] = {}
        self._posted = 0.0

    def __repr__(self) -> str:
        return (f"Run(api_url={self.client.api_url!r}, run_id={self.run_id!r}, "
                f"ledger={self.ledger!r})")

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- instances ------------------------------------------------------------

    def instance(self, target: str, *, deployment: str | None = None,
                 scope: str | None = None, **settings: Any) -> Instance:
        """An unstarted :class:`.Instance` of ``target`` (a workspace type; or rent
        ``deployment`` of it) with this run's defaults and every layer as listener.
        ``settings`` as for :meth:`.Instance.build`."""
        if not self.client.has_token:  # before any call: POST /new would only be refused
            raise ConfigurationError(NO_TOKEN)
        if self._signals:
            # Only a run that rents anything changes how signals behave.
            self.signals.install()
        if self._unprepared is not None:  # the default ledger's directory, on first use
            _ignored_by_git(self._unprepared)
            self._unprepared = None
        settings.setdefault("listeners", [*self.listeners, *self._layers()])
        settings.setdefault("known_ids", self.known_ids if self.ledger is not None else None)
        settings.setdefault("hint_busy", self.why_busy)
        settings.setdefault("held_here", self.held_here)
        settings.setdefault("holder", Holder(
            worker=self.board.worker if self.board else None, thread=threading.get_ident(),
            test=current_test(), scope=scope))
        settings.setdefault("transcript", self.transcript)
        if self.health is not None:
            settings.setdefault("unhealthy", self.health.unhealthy)
        if self.kept is not None:
            settings.setdefault("keep_hook", self._keep)
        if (self.budget is not None and settings.get("existing") is None
                and settings.get("kept_record") is None):
            self.budget.check(target)  # (only a rental spends)
        # A short deployment id (as the summary table prints it) is that deployment.
        if deployment is not None:
            settings.setdefault("wtype", target)
            target = self.deployments.resolve(deployment)
        else:
            target = self.deployments.target(target)
        return Instance.build(self.client, target, self.defaults, **settings)

    @overload
    def acquire(self, target: str, *, deployment: str | None = None,
                scope: str | None = None, **settings: Any) -> Instance: ...

    @overload
    def acquire(self, target: str, second: str, *more: str, scope: str | None = None,
                **settings: Any) -> list[Instance]: ...

    def acquire(self, target: str, *more: str, deployment: str | None = None,
                scope: str | None = None, **settings: Any) -> Instance | list[Instance]:
        """A started instance (READY, firewall open, SSH connected), a context manager
        whose exit ends it; if the run ends first, the run ends it. A failed start
        ends what was rented before the error propagates.

        With several targets, they are rented, readied, firewalled and connected
        concurrently and returned in order; if one fails, the others are ended and
        the error names the one that failed (:func:`.fleet.start_all`).

        ``scope`` says how long the caller holds them, if it knows: "test" (ended with
        the test, as ``rerobots_acquire`` does) or a wider pytest scope. A robot this
        run holds beyond a test is one another test of the run cannot wait for.
        """
        if more and deployment is not None:
            raise TypeError("deployment= pins one target: with several, name deployment ids")
        insts = [self.instance(t, deployment=deployment, scope=scope, **dict(settings))
                 for t in (target, *more)]
        with self._lock:
            self._acquired.extend(insts)
        started = start_all(insts)
        return started if more else started[0]

    def known_ids(self) -> list[str]:
        """Every instance this checkout's ledger holds as live (other workers' and other
        runs' included): none of them may be adopted as the answer to a lost POST /new."""
        return [r["id"] for r in self.ledger.live()] if self.ledger is not None else []

    def why_busy(self, inst: Instance) -> str | None:
        """If the robot ``inst`` waits for is busy because this run, or an earlier run of
        this checkout, ended an instance of it moments ago, say so."""
        now = time.time()

        def same(wtype: str | None, deployment: str | None) -> bool:
            if inst.deployment is not None:
                return deployment == inst.deployment
            return wtype == inst.wtype

        for other in reversed(self.records.instances):
            ended = other.timings.ended_at
            if (other is not inst and other.id and ended and now - ended < RELEASE_WINDOW
                    and other.outcome in ENDED_OUTCOMES and same(other.wtype, other.deployment)):
                return (f"this run just ended {other.id[:8]} on {(other.deployment or '?')[:8]}; "
                        "the service keeps a robot busy while it terminates")
        if self.ledger is not None:
            for record in reversed(self.ledger.records()):
                ended = float(record.get("time") or 0)
                if now - ended > RELEASE_WINDOW:
                    break
                if record.get("event") == "ended" and same(record.get("wtype"),
                                                            record.get("deployment")):
                    return (f"a run of this checkout ended {record['id'][:8]} on "
                            f"{str(record.get('deployment') or '?')[:8]} {now - ended:.0f} s "
                            "before; the service keeps a robot busy while it terminates")
        return None

    # -- robots held by this very run (board.py) ---------------------------------

    def testing(self, nodeid: str | None) -> None:
        """The test this process runs now (the plugin says so as each begins): another
        worker reads from it whether a robot rented in an earlier test is held beyond it."""
        self._testing = nodeid
        if self.board is not None and self._holding():
            self._post()

    def _holding(self) -> list[Instance]:
        return [i for i in self.records.instances
                if i.id and i.outcome is None and not i._ending]

    def _post(self) -> None:
        if self.board is None:
            return
        held = [{"id": i.id, "wtype": i.wtype, "deployment": i.deployment,
                 "test": i.holder.test if i.holder else None,
                 "scope": i.holder.scope if i.holder else None} for i in self._holding()]
        waiting = next(iter(self._waiting.values()), None)
        self.board.post(test=self._testing or current_test(), held=held, waiting=waiting)

    def _board_event(self, inst: Instance, event: str) -> None:
        """An instance listener's event: post what this process holds and waits for."""
        if self.board is None:
            return
        key = id(inst)
        now = time.monotonic()
        if event == "progress" and inst.status not in (None, "READY") and inst._started:
            waited = now - inst._started
            if waited >= 1.0:
                since = (self._waiting.get(key) or {}).get("since") or time.time() - waited
                self._waiting[key] = waiting_entry(wait_line(inst, waited), inst.wtype, since)
            if now - self._posted < 0.5:
                return  # (a wait's progress comes up to 20 times a second)
        else:
            self._waiting.pop(key, None)
        self._posted = now
        self._post()

    def held_here(self, inst: Instance, candidates: Sequence[str]) -> tuple[str, bool] | None:
        """Whether the robots ``inst`` could be served by (``candidates``, every one busy)
        are held by this run itself: by this process, or another xdist worker of the run
        (the board), or kept by an earlier run of this checkout.

        Hopeless (True) when every one is held for longer than a wait can last: in this
        process, by the thread that waits or for a scope wider than a test (neither is
        released while this test runs); in another worker, by one that itself waits for a
        robot of the type (each would wait for the other). A robot another worker holds
        while it runs other tests is released at the latest when that worker finishes, so
        it is waited for, and the progress line names the holder. Otherwise, what to say
        in the progress line, or None."""
        me = inst.holder or Holder()
        found: dict[str, tuple[str, bool]] = {}
        for other in self._holding():
            if other is inst or other.deployment not in candidates:
                continue
            h = other.holder or Holder()
            hopeless = (h.thread == me.thread or h.scope in WIDE_SCOPES)
            found[other.deployment or ""] = (h.describe(here=True), hopeless)
        if self.board is not None:
            for entry, held in self.board.holders():
                dep = held.get("deployment")
                if dep not in candidates or dep in found:
                    continue
                waiting = entry.get("waiting") or {}
                scope = held.get("scope")
                hopeless = waiting.get("wtype") == inst.wtype
                h = Holder(worker=entry.get("worker"), pid=int(entry.get("pid") or 0),
                           test=held.get("test"), scope=scope)
                found[str(dep)] = (h.describe(), hopeless)
        kept = self._kept_on(candidates)
        if set(candidates) <= set(found) and all(hopeless for _, hopeless in found.values()):
            holders = "; ".join(f"{dep[:8]} by {who}" for dep, (who, _) in found.items())
            return (f"every robot that could serve it is held by this run itself ({holders}), "
                    "which does not release them while this waits: waiting would only end "
                    f"at the queue timeout. Change one of: {SELF_HELD_ADVICE}", True)
        if set(candidates) <= set(found) | set(kept):
            parts = [f"{dep[:8]} held by this run: {who}" for dep, (who, _) in found.items()]
            parts += [f"{dep[:8]} held by {ident[:8]}, which this checkout kept for {why}"
                      for dep, (ident, why) in kept.items() if dep not in found]
            text = "; ".join(parts)
            if kept:
                # (A run attaches only to what was kept for reuse, and only when it reuses.)
                reusable = any(why == keep.REUSE for _, why in kept.values())
                text += ("; end what this checkout kept with pytest --rerobots-sweep"
                         + (", or attach to it with --rerobots-reuse MINUTES"
                            if reusable and not self.reusing else ""))
            return text, False
        return None

    def _kept_on(self, candidates: Sequence[str]) -> dict[str, tuple[str, str]]:
        """{deployment: (instance id, what for)} of the instances kept by runs of this
        checkout (and this API and token) that hold one of ``candidates``."""
        if self.ledger is None or not self.client.has_token:
            return {}
        store = self.kept or keep.KeptStore(
            keep.kept_dir(self.ledger.path), api_url=self.client.api_url,
            token_sha256=self.client.token_sha256(), checkout=self.checkout)
        try:
            records = store.records()
        except (OSError, RerobotsError):
            return {}
        return {str(r["deployment"]): (str(r["id"]), keep.purpose(r.get("kind")))
                for r in records if store.mine(r) and r.get("deployment") in candidates}

    # -- keeping instances after the run (keep.py) ------------------------------

    @property
    def reusing(self) -> bool:
        """Whether session instances are kept for the next run, and attached to."""
        return self.kept is not None and self.reuse is not None

    def _claim_kept(self, target: str, deployment: str | None,
                    reuse: bool = True) -> tuple[dict[str, Any], str] | None:
        """A kept instance for ``target`` to attach to: one rented ahead of this run, or
        (``reuse``, when the run reuses) one an earlier run kept for reuse."""
        if self.kept is None:
            return None
        kinds = (keep.AHEAD, keep.REUSE) if reuse and self.reusing else (keep.AHEAD,)
        wtype = None if is_uuid(target) else target
        if wtype is None and deployment is None:
            deployment = target
        try:
            return self.kept.claim(wtype, deployment, client=self.client, kinds=kinds)
        except OSError as exc:  # an unreadable store: rent, as without reuse
            log.warning("rerobots: kept instances in %s: %s", self.kept.directory, exc)
            return None

    def _held_instance(self, target: str, deployment: str | None,
                       kept: tuple[dict[str, Any], str] | None,
                       scope: str | None = None) -> Instance:
        if kept is None:
            return self.instance(target, deployment=deployment, scope=scope)
        record, key = kept
        return self.instance(target, deployment=deployment, kept_record=record,
                             private_key_text=key, scope=scope)

    def _start_held(self, key: Hashable, target: str, deployment: str | None, reuse: bool,
                    *, abort: threading.Event | None = None,
                    first: Instance | None = None, scope: str | None = None) -> Instance:
        """Start the instance for ``key``: attach to a kept one (``reuse``) or rent; a kept
        one that is not usable is ended (by its start) and another is rented."""
        claim_reuse = reuse
        reuse = reuse and self.reusing
        inst = first
        if inst is None:
            inst = self._held_instance(target, deployment,
                                       self._claim_kept(target, deployment, claim_reuse),
                                       scope)
        while True:
            self._pool[key] = inst
            if reuse:
                inst.keep_for = "reuse"
            try:
                inst.start(abort=abort)
                return inst
            except Exception as exc:
                if inst.kept_record is None or (abort is not None and abort.is_set()):
                    raise
                log.warning("rerobots: kept instance %s not usable (%s); renting another",
                            inst.kept_record.get("id"), exc)
            inst = self._held_instance(target, deployment,
                                       self._claim_kept(target, deployment, claim_reuse), scope)

    def mark_kept_on_failure(self, instances: Iterable[Instance]) -> list[Instance]:
        """Keep these instances (used by a failing test) at their end instead of
        terminating them, if ``keep_on_failure``; those marked."""
        if not self.keep_on_failure or self.kept is None:
            return []
        marked = []
        for inst in instances:
            # (A lost robot is not kept: there is nothing left to log in to.)
            if inst.outcome is None and inst.id and inst.existing is None \
                    and inst.lost is None:
                inst.keep_for = "failure"
                marked.append(inst)
        return marked

    def _keep(self, inst: Instance) -> bool:
        """The instances' keep hook: hand ``inst`` to a keeper process; False to end it."""
        if self.kept is None or inst.keep_for is None:
            return False
        minutes = self.reuse if inst.keep_for == "reuse" else None
        if inst.keep_for == "reuse" and minutes is None:
            return False
        inst.kept = self.kept.keep(inst, inst.keep_for, secret=self._secret,
                                   interval=inst.options.keepalive_interval,
                                   idle=minutes * 60.0 if minutes is not None else None,
                                   ledger=self.ledger)
        inst.detach(Outcome.KEPT)
        return True

    def kept_instances(self) -> list[Instance]:
        """The instances this run kept (in the order they were rented)."""
        return [i for i in self.records.instances if i.outcome == Outcome.KEPT and i.kept]

    def _layers(self) -> list[InstanceListener]:
        # The watchdog hears of a new instance before the ledger records it.
        board = [_BoardListener(self)] if self.board is not None else []
        health = [_HealthListener(self.health)] if self.health is not None else []
        return [x for x in (self.watchdog, self.ledger, *board, *health) if x is not None]

    # -- the pool: one instance per key, held until released ------------------

    def hold(self, key: Hashable, target: str, *, deployment: str | None = None,
             shared: bool = False, reuse: bool = False, scope: str | None = None) -> Instance:
        """The instance held under ``key``, started on first use (or by
        :meth:`prefetch`). ``shared`` takes it from the xdist run's shared pool (if
        there is one). ``reuse`` (with the run's ``reuse`` minutes) attaches to an
        instance an earlier run kept, if there is one, and keeps this one at its end.
        A start that failed fails again at once for the same key, until :meth:`release`.
        ``scope`` says for how long it is held, as for :meth:`acquire`."""
        pending = self._pending.get(key)
        if pending is not None:
            # Started in the background: wait for it, showing its progress from here
            # (Ctrl-C may stop the wait).
            waited_for = self._pool.get(key)
            wait_all([pending[0]], waited_for.show_progress if waited_for else None)
            self._pending.pop(key, None)
        if key in self._failed:
            raise self._failed[key]
        inst = self._pool.get(key)
        if inst is not None and inst.lost is not None:
            # Lost while held (the lease watch): dropped from the pool and ended (a
            # partitioned host's instance still lives on the service); a fresh one follows.
            log.warning("rerobots: %s was lost (%s); renting a fresh one", inst.where,
                        inst.lost.reason)
            try:
                self.release_many([key])
            except Exception as exc:  # the records show how its end went
                log.warning("rerobots: ending lost instance %s failed: %s", inst.id, exc)
            inst = None
        if inst is not None:
            inst.ensure_connected()
            return inst
        try:
            if shared and self.shared is not None:
                inst = self.shared.acquire(
                    f"{target}/{deployment}",
                    lambda existing: self.instance(target, deployment=deployment,
                                                   existing=existing, scope=scope))
            else:
                inst = self._start_held(key, target, deployment, reuse, scope=scope)
        except BaseException as exc:
            # Not kept: start() has ended it (on any exception, pytest's own outcomes
            # such as a pytest-timeout failure included).
            self._pool.pop(key, None)
            if isinstance(exc, Exception):
                self._failed[key] = exc
            raise
        self._pool[key] = inst
        return inst

    def prefetch(self, key: Hashable, target: str, *, deployment: str | None = None,
                 reuse: bool = False, scope: str | None = None) -> None:
        """Start renting the instance for ``key`` in the background, so that several
        keys wait for READY at the same time; :meth:`hold` then waits for it, and
        :meth:`release` calls it off. Does nothing for a key already held. ``reuse``
        as for :meth:`hold`."""
        if self.holds(key) or key in self._pending:
            return
        kept = self._claim_kept(target, deployment, reuse)
        try:
            first = self._pool[key] = self._held_instance(target, deployment, kept, scope)
        except BudgetReached as exc:  # raised for the test that holds it (hold())
            self._failed[key] = exc
            return
        abort = threading.Event()

        done = threading.Event()

        def bring_up() -> None:
            try:
                self._start_held(key, target, deployment, reuse, abort=abort, first=first,
                                 scope=scope)
            except BaseException as exc:  # kept for hold() to raise in the test's thread
                self._pool.pop(key, None)
                if isinstance(exc, Exception):
                    self._failed[key] = exc
            finally:
                done.set()

        self._pending[key] = (done, abort)
        threading.Thread(target=bring_up, name=f"rerobots-prefetch-{target}",
                         daemon=True).start()

    def forget_failures(self) -> None:
        """Forget the failed starts on record, so that the next :meth:`hold` of their
        keys rents again (a rerun of a test after infrastructure trouble)."""
        self._failed.clear()

    def holds(self, key: Hashable) -> bool:
        """Whether ``key`` has an instance held (or on its way), or a failed start on
        record."""
        return key in self._pool or key in self._failed or key in self._pending

    def release(self, key: Hashable) -> None:
        """End the instance held under ``key`` (or leave it to the other users of a
        shared one) and forget a failure recorded for it."""
        self.release_many([key])

    def release_many(self, keys: Iterable[Hashable], *, also: Iterable[Instance] = ()) -> None:
        """:meth:`release` several keys (and end the instances ``also`` names), ending
        the instances concurrently; raises the first error after trying them all."""
        keys = list(keys)
        # Call off what is still starting in the background, all at once, then wait.
        pending = [p for p in (self._pending.pop(key, None) for key in keys) if p is not None]
        for _, abort in pending:
            abort.set()
        wait_all(done for done, _ in pending)
        ending = list(also)
        errors: list[Exception] = []
        for key in keys:
            self._failed.pop(key, None)
            inst = self._pool.pop(key, None)
            if inst is None:
                continue
            if inst.shared_key is not None and self.shared is not None:
                try:
                    self.shared.release(inst.shared_key[1], inst)
                except Exception as exc:
                    errors.append(exc)
            else:
                ending.append(inst)
        try:
            end_all(ending)
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def release_all(self) -> None:
        """End everything the run still holds, pooled and acquired, concurrently; raises
        the first error after trying them all."""
        with self._lock:
            acquired, self._acquired = self._acquired, []
        self.release_many([*self._pool, *self._pending], also=acquired)

    def end_leftovers(self, by: str = "controller") -> dict[str, str]:
        """End every instance of this run that the ledger still holds as live (say, a
        worker's that was killed before its teardown); ``{id: outcome}``."""
        if self.ledger is None:
            return {}
        # (Not what this run kept on purpose: keepers hold those.)
        leftovers = [r["id"] for r in self.ledger.live(run_id=self.run_id, include_kept=False)]
        if not leftovers:
            return {}
        results = end_ids(self.client, leftovers, ledger=self.ledger, by=by)
        for ident, outcome in results.items():
            self.records.note_leftover(ident, outcome)
        return results

    def close(self) -> None:
        """End what is still held, let the watchdog go, close the client; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.release_all()
        finally:
            if self.board is not None:
                self.board.clear()
            if self.watchdog is not None:
                self.watchdog.close()
            self.client.close()
            self.signals.uninstall()


class _HealthListener:
    """Writes each deployment's troubles to the checkout's health record."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def _record(self, deployment: str | None, kind: str, instance: str | None,
                detail: str = "") -> None:
        try:
            self.health.record(deployment, kind, instance, detail=detail)
        except Exception as exc:  # a record is a favour: never fail a test for it
            log.warning("rerobots: cannot write the health record: %s", exc)

    def replaced(self, instance: Instance, failed: Any) -> None:
        self._record(failed.deployment, "failed start", failed.id, failed.status)

    def rented(self, instance: Instance) -> None:
        pass

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        pass

    def reserved(self, instance: Instance, reservation: str) -> None:
        pass

    def unreserved(self, instance: Instance, reservation: str) -> None:
        pass

    def lost(self, instance: Instance, error: Any) -> None:
        self._record(instance.deployment, "lost", instance.id, getattr(error, "reason", ""))

    def unreachable(self, instance: Instance) -> None:
        self._record(instance.deployment, "ssh never answered", instance.id)


class _BoardListener:
    """Posts on the run's board what this process holds and waits for."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def rented(self, instance: Instance) -> None:
        self.run._board_event(instance, "rented")

    def progress(self, instance: Instance) -> None:
        self.run._board_event(instance, "progress")

    def ended(self, instance: Instance) -> None:
        self.run._board_event(instance, "ended")

    def replaced(self, instance: Instance, failed: Any) -> None:
        pass

    def reserved(self, instance: Instance, reservation: str) -> None:
        pass

    def unreserved(self, instance: Instance, reservation: str) -> None:
        pass


def _ignored_by_git(directory: Path) -> None:
    """Make ``directory`` with a ``.gitignore`` of ``*`` in it (as pytest does for its
    cache), so that a ledger under a checkout is never committed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        ignore = directory / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# made by pytest-rerobots: the ledger of this checkout\n*\n")
    except OSError as exc:  # the ledger's own write reports a real problem
        log.debug("cannot prepare %s: %s", directory, exc)
