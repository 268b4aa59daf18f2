"""The pytest plugin: options, the ``rerobots`` marker, fixtures and hooks.

It only wires the engine: settings and their options come from the table in
:mod:`.settings`, instances from a :class:`.run.Run`, the simulator from :mod:`.sim`,
what the user is told from :mod:`.plugin_report`. Its state lives in one
:class:`RerobotsPlugin` object registered with the plugin manager. Features of their
own stand beside it: the fixtures (:mod:`.plugin_fixtures`), failure kinds and reruns
(:mod:`.plugin_reruns`), what a run cost (:mod:`.plugin_costs`) and the commands that
run instead of tests (:mod:`.plugin_commands`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

# Only what every run needs here: a pytest run that rents nothing (collection only, or
# tests that use no robot) must pay next to nothing for the plugin, neither requests,
# paramiko nor tenacity, nor the camera, the costs, the ledger or the reports. The client,
# instances and the Run load with the first rental, the rest where first needed (the
# imports inside functions below).
from .errors import ConfigurationError, RerobotsError, is_infrastructure
from .plugin_costs import EACH_PARAM, RunCosts, each_of
from .plugin_fixtures import (
    PLUGIN_NAME,
    rerobots_acquire,
    rerobots_client,
    rerobots_each_deployment,
    rerobots_host,
    rerobots_instance,
    rerobots_run,
    rerobots_sftp,
    rerobots_sim,
    rerobots_ssh,
)
from .plugin_reruns import RerunHooks, label_failure, on_robot
from .records import Records
from .settings import (
    COMMAND_LINE_ONLY,
    DEFAULT_ARTIFACTS,
    OPTIONS,
    Option,
    Secret,
    Settings,
    allow_warnings,
    resolve,
)
from .textsafe import fence_block, in_github_actions, one_line

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

    from .camera import Camera
    from .instance import Instance
    from .plugin_report import BoardWatcher
    from .run import Run
    from .signals import SignalGuard
    from .sim import Simulator

NO_TYPE = (
    "no workspace type for this test: pass --rerobots-wtype TYPE (or set REROBOTS_WTYPE or "
    "the ini option rerobots_wtype), or mark the test @pytest.mark.rerobots('TYPE')"
)
NO_CREDENTIALS = (
    "no rerobots API token: set REROBOTS_API_TOKEN or pass --rerobots-token-file, "
    "or run on the simulator with --rerobots-sim"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Every option of the settings table: a ``--rerobots-*`` option (not given: None, so
    that the environment and the ini file may set it) and its ini name; then the options
    of the command line only."""
    group = parser.getgroup("rerobots", "hardware-in-the-loop tests on rerobots instances")
    for opt in OPTIONS:
        _add_option(group, opt, default=None)
        if opt.ini:
            ini_type: Literal["linelist", "string"] = "linelist" if opt.kind == "list" else "string"
            parser.addini(opt.ini, help=opt.help, type=ini_type, default=None)
    for opt in COMMAND_LINE_ONLY:
        _add_option(group, opt, default=opt.default)


def _add_option(group: pytest.OptionGroup, opt: Option, default: Any) -> None:
    if opt.kind == "switch":
        env_hint = f" [env {opt.env}=1]" if opt.env else ""
        group.addoption(opt.flag, action="store_true", default=default, dest=opt.dest,
                        help=opt.help + env_hint)
    else:
        env_hint = f" [env {opt.env}]" if opt.env else ""
        action = "append" if opt.kind == "list" else "store"
        group.addoption(opt.flag, action=action, default=default, dest=opt.dest,
                        metavar=opt.metavar, help=opt.help + env_hint)


def _ini(config: pytest.Config, name: str) -> Any:
    try:
        return config.getini(name)
    except ValueError:
        return None


def load_settings(config: pytest.Config) -> Settings:
    """Resolve the plugin's settings; a bad value is a ``pytest.UsageError``."""
    cli = {opt.name: config.getoption(opt.dest) for opt in OPTIONS}
    ini = {opt.ini: _ini(config, opt.ini) for opt in OPTIONS if opt.ini}
    try:
        settings = resolve(cli, os.environ, ini,
                           token_file=config.getoption("rerobots_token_file"),
                           sweep=bool(config.getoption("rerobots_sweep")))
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None
    for warning in allow_warnings(settings.allow):
        config.issue_config_time_warning(pytest.PytestConfigWarning(warning), stacklevel=2)
    if settings.ledger is None:
        settings = _with_default_ledger(config, settings)
    if settings.artifacts is None:
        settings = replace(settings, artifacts=config.rootpath / DEFAULT_ARTIFACTS)
    return settings


def _with_default_ledger(config: pytest.Config, settings: Settings) -> Settings:
    """The ledger's stable default: ``d/rerobots/ledger.jsonl`` in pytest's cache dir
    (the ``cache_dir`` ini option, ``.pytest_cache`` under the rootdir by default)."""
    return replace(settings, ledger=_cache_dir(config) / "d" / "rerobots" / "ledger.jsonl")


def _cache_dir(config: pytest.Config) -> Path:
    """pytest's cache dir (the ``cache_dir`` ini option, ``.pytest_cache`` under the
    rootdir by default)."""
    cache_dir = Path(str(_ini(config, "cache_dir") or ".pytest_cache"))
    if not cache_dir.is_absolute():
        cache_dir = config.rootpath / cache_dir
    return cache_dir


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """``pytest --rerobots-rent-ahead`` and ``--rerobots-sweep`` load no ``conftest.py``:
    they run before the project's own dependencies, which those may import, are installed
    (or after their install failed)."""
    namespace = early_config.known_args_namespace
    if getattr(namespace, "rerobots_rent_ahead", False) or getattr(
            namespace, "rerobots_sweep", False):
        namespace.noconftest = True


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``pytest --rerobots-sweep``: end every live instance in the ledger, then exit.
    ``pytest --rerobots-list``: print what can be rented, then exit.
    ``pytest --rerobots-rent-ahead``: rent for the next run, then exit."""
    if not (config.getoption("rerobots_rent_ahead") or config.getoption("rerobots_list")
            or config.getoption("rerobots_sweep")):
        return None
    from . import plugin_commands  # lazily: only these commands need it (and the ledger)

    if config.getoption("rerobots_rent_ahead"):
        return plugin_commands.rent_ahead(config, load_settings(config), _cache_dir(config))
    if config.getoption("rerobots_list") and not config.getoption("rerobots_sweep"):
        return plugin_commands.listing(load_settings(config))
    if not config.getoption("rerobots_sweep"):
        return None
    return plugin_commands.sweep(load_settings(config))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rerobots(*wtypes, deployment=None, each_deployment=False): run this test on an "
        "instance of one of these rerobots workspace types (the first, unless "
        "--rerobots-wtype picks another); each_deployment: once on every deployment of it",
    )
    settings = load_settings(config)
    if settings.camera != "off" and settings.artifacts is not None \
            and "artifacts" in settings.sources:
        from .camera import check_directory  # lazily: only a run that names the directory

        try:  # a directory named on purpose: checked before anything is rented
            check_directory(settings.artifacts)
        except ConfigurationError as exc:
            raise pytest.UsageError(str(exc)) from None
    plugin = RerobotsPlugin(config, settings)
    # Only a run that may rent (a token, not the embedded simulator, which keeps no ledger)
    # checks the ledger and the kept directory, before its first rental.
    if settings.ledger is not None and not settings.sim and settings.secret is not None:
        from .keep import check_ledger  # lazily: a run that rents nothing never loads it

        try:
            plugin.notes.extend(filter(None, [check_ledger(settings.ledger)]))
        except ConfigurationError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.pluginmanager.register(plugin, PLUGIN_NAME)
    config.pluginmanager.register(RerunHooks(plugin), f"{PLUGIN_NAME}-reruns")
    if plugin.is_worker or plugin.is_controller:
        # Only where xdist distributes (its controller) or runs tests (its workers): an
        # installed xdist that this run does not use adds nothing.
        config.pluginmanager.register(XdistHooks(plugin), f"{PLUGIN_NAME}-xdist")
    plugin.start()


class XdistHooks:
    """Hooks that exist only when pytest-xdist is active (registered conditionally)."""

    def __init__(self, plugin: RerobotsPlugin) -> None:
        self.plugin = plugin

    @pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Worker: send its instances and skips to the controller, for the summary."""
        output = getattr(session.config, "workeroutput", None)
        if output is not None:
            from . import costs, plugin_report  # lazily: only xdist workers send these

            output["rerobots_rows"] = plugin_report.rows(self.plugin.records)
            output["rerobots_kept_lines"] = self.plugin.kept_summary()
            output["rerobots_spans"] = [costs.span(i) for i in self.plugin.records.instances]

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """Controller: collect what a worker sent (nothing if it crashed)."""
        output = getattr(node, "workeroutput", None) or {}
        self.plugin.records.remote_rows.extend(
            tuple(row) for row in output.get("rerobots_rows", []))
        self.plugin.kept_lines.extend(output.get("rerobots_kept_lines", []))
        self.plugin.tally.remote_spans.extend(output.get("rerobots_spans", []))

    def pytest_configure_node(self, node: Any) -> None:
        """Hand the run id and the controller's simulator to each worker (through
        execnet, not argv)."""
        plugin = self.plugin
        node.workerinput["rerobots_run_id"] = plugin.run_id
        node.workerinput["rerobots_board_dir"] = str(plugin.board_dir())
        if plugin.settings.xdist == "shared":
            if plugin.share_dir is None:
                plugin.share_dir = Path(tempfile.mkdtemp(prefix="rerobots-share-"))
            node.workerinput["rerobots_share_dir"] = str(plugin.share_dir)
        sim = plugin.simulator
        if sim is not None:
            node.workerinput["rerobots_sim_url"] = sim.url
            node.workerinput["rerobots_sim_token"] = sim.token


class RerobotsPlugin:
    """The plugin's state for one pytest process: settings, the simulator, and the
    :class:`.Run` that owns the client, the termination layers and the instances."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.worker_input: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.simulator: Simulator | None = None
        self.skipped_for_token = 0
        self.records = Records()
        self.run_id = str((self.worker_input or {}).get("rerobots_run_id") or uuid.uuid4())
        # Under xdist with --rerobots-xdist shared: the controller's directory for the
        # workers to share instances through (see xdist_pool.py).
        self.share_dir: Path | None = None
        # A Secret, so that vars(plugin) and pytest's -l locals never show the token.
        self.api_url, self._token = settings.api_url, settings.secret
        # The guard of SIGINT and SIGTERM (signals.py), made on first need: the signals
        # property.
        self._signals: SignalGuard | None = None
        self._run: Run | None = None
        # The pool's keys of each scope node (by node id), ended together at its end.
        self._scope_keys: dict[str, list[tuple[str, str | None, str]]] = {}
        self._prefetched = False
        # Under xdist: the run's board (board.py) and the controller's thread showing it.
        self._board_dir: Path | None = None
        self._board_watcher: BoardWatcher | None = None
        # --rerobots-keep-on-failure: the instances the current test got from a fixture,
        # and how often each instance had been used when it began.
        self._given: list[Instance] = []
        self._uses_before: dict[int, int] = {}
        #: Lines about kept and reused instances sent by xdist workers.
        self.kept_lines: list[str] = []
        self.notes: list[str] = []
        # The camera add-on's pictures (camera.py, made on first use: the camera property),
        # and those of this run's tests.
        self._camera: Camera | None = None
        self.pictures: list[str] = []
        # What the run cost and where its time went, each_deployment's verdicts too.
        self.tally = RunCosts(self.records)
        # The current test: seconds waited for its robots, whether it asked for one, and
        # the instance its rerobots_instance fixture gave it.
        self._waited = 0.0
        self._wanted = False
        self._pooled: Instance | None = None
        self.reuse = settings.reuse
        if self.reuse is not None and os.environ.get("CI", "").strip().lower() == "true":
            self.reuse = None
            self.notes.append("rerobots: warning: --rerobots-reuse ignored under CI=true "
                              "(each CI run rents its own instances)")

    # Methods, not properties: pytest older than 8.3.3 reads every attribute of a
    # registered plugin object looking for fixtures (pytest issue 12446), which would make
    # the camera, the signal guard and the Run, and so load the engine, at every session's
    # start.

    def camera(self) -> Camera:
        """The camera add-on's pictures, made when a test first gets a robot."""
        if self._camera is None:
            from .camera import Camera  # lazily: a run that rents nothing never needs it

            s = self.settings
            self._camera = Camera(s.camera, s.artifacts or Path(DEFAULT_ARTIFACTS))
        return self._camera

    # -- start and stop -------------------------------------------------------

    def signals(self) -> SignalGuard:
        """The guard of SIGINT and SIGTERM, made for a rental, the simulator or an xdist
        controller."""
        if self._signals is None:
            from .signals import SignalGuard  # lazily: a run that rents nothing never needs it

            self._signals = SignalGuard(write=self._tell)
        return self._signals

    @property
    def is_worker(self) -> bool:
        return self.worker_input is not None

    @property
    def is_controller(self) -> bool:
        """Whether this process is xdist's controller: it distributes the tests (``-n``)
        and rents nothing itself."""
        return not self.is_worker and getattr(self.config.option, "dist", "no") != "no"

    def start(self) -> None:
        s = self.settings
        worker = self.worker_input or {}
        if "rerobots_sim_url" in worker:
            self.api_url = worker["rerobots_sim_url"]
            self._token = Secret(worker["rerobots_sim_token"])
        elif s.sim and not s.sweep:
            self.simulator = self._start_simulator()
            self.api_url, self._token = self.simulator.url, Secret(self.simulator.token)
            # Interrupted: the simulator stops with the run, so no end waits out INIT.
            sim = self.simulator
            self.signals().on_first.append(lambda _signal: sim.terminate_init_at_once())
        if self.is_controller:
            # The xdist controller rents nothing itself, but on SIGTERM it must still
            # get to end what its workers hold.
            self.signals().install()

    def _tell(self, text: str) -> None:
        """The signal guard's messages: on the terminal, outside pytest's output capture
        when the main thread is capturing (a Ctrl-C in a fixture's setup)."""
        from .signals import tell_the_terminal  # (loaded with the guard that calls this)

        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if capman is None or threading.current_thread() is not threading.main_thread():
            tell_the_terminal(text)
            return
        with capman.global_and_fixture_disabled():
            tell_the_terminal(text)

    @property
    def guarded(self) -> bool:
        """Whether this run gets layers 3 and 5 (watchdog, ledger). An embedded simulator
        dies with this process, and its instances with it; the real API, or a simulator of
        its own, does not."""
        s = self.settings
        return self.mode != "embedded simulator" and s.ledger is not None and not s.sweep

    def run(self) -> Run:
        """The run, made on first need (the first rental, not the plugin's loading; a
        method, as :meth:`camera`)."""
        if self._run is None:
            self._run = self._make_run()
        return self._run

    def _make_run(self) -> Run:
        from . import plugin_report  # lazily: with the first rental, as the engine
        from .run import Run  # lazily: the engine (requests, paramiko) loads with a rental

        s = self.settings
        if self.guarded:
            cache = getattr(self.config, "cache", None)
            if cache is not None:
                # Let pytest make its cache dir first, with its .gitignore, before the
                # ledger is written there (pytest adds those files only to a new dir).
                cache.set("rerobots/ledger", str(s.ledger))
        worker = self.worker_input or {}
        share_dir = worker.get("rerobots_share_dir") if s.xdist == "shared" else None
        keeping = self.guarded and s.xdist != "shared"
        return Run(
            self.api_url, self._token.reveal() if self._token else None, ignore_env=True,
            ledger=s.ledger if self.guarded else None, run_id=self.run_id,
            watchdog=self.guarded, share_dir=share_dir, records=self.records,
            signals=self.signals(), listeners=[plugin_report.Progress(self.config)],
            keep_on_failure=s.keep_on_failure and keeping,
            board_dir=worker.get("rerobots_board_dir"), budget=s.budget,
            reuse=self.reuse if keeping else None, checkout=str(self.config.rootpath),
            token_source=("the embedded simulator" if self.mode == "embedded simulator"
                          else s.sources.get("token")),
            # The health record of deployments (health.py), the embedded simulator's too.
            health_dir=s.ledger.parent if s.ledger is not None and not s.sweep else None,
            health_origin=self.mode if self.mode == "embedded simulator" else None,
            # The defaults of every instance: the settings the table marks so, and how
            # often to poll (every 50 ms on the embedded simulator).
            **s.instance_options(), fast_polling=self.mode == "embedded simulator",
        )

    def _start_simulator(self) -> Simulator:
        try:  # lazily: the simulator and its optional extras load only under --rerobots-sim
            from .sim import Simulator
        except ImportError as exc:
            raise pytest.UsageError(
                f"--rerobots-sim needs the simulator's extras: pip install 'pytest-rerobots[sim]' "
                f"({exc})"
            ) from None
        try:
            sim = Simulator(self.settings.sim_config)
            sim.start()
        except ConfigurationError as exc:
            raise pytest.UsageError(f"--rerobots-sim-config: {exc}") from None
        return sim

    @property
    def mode(self) -> str:
        if self.simulator is not None or (self.worker_input or {}).get("rerobots_sim_url"):
            return "embedded simulator"
        return "remote API"

    def board_dir(self) -> Path:
        """Controller: the directory of the run's board, made (and watched) on first use."""
        if self._board_dir is None:
            from . import plugin_report  # lazily: the board exists only under xdist
            from .board import Board

            self._board_dir = Path(tempfile.mkdtemp(prefix="rerobots-board-"))
            self._board_watcher = plugin_report.BoardWatcher(self.config,
                                                             Board(self._board_dir))
            self._board_watcher.start()
        return self._board_dir

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._board_watcher is not None:
            self._board_watcher.stop()
        if self._board_dir is not None:
            shutil.rmtree(self._board_dir, ignore_errors=True)
        try:
            if self._run is not None:
                self._run.close()
        finally:
            if self._signals is not None:
                self._signals.uninstall()
            if self.simulator is not None:
                self.simulator.stop()
                self.simulator = None
            if self.share_dir is not None:
                shutil.rmtree(self.share_dir, ignore_errors=True)

    # -- instances ------------------------------------------------------------

    def need_run(self) -> Run:
        """The run, or skip (or fail with --rerobots-require) when there is no token."""
        if not self._token:
            if self.settings.require:
                pytest.fail(f"{NO_CREDENTIALS} (--rerobots-require)", pytrace=False)
            # Counted from the test reports (pytest_runtest_logreport): a session-scoped
            # fixture skips once and pytest replays the skip for the other tests.
            pytest.skip(NO_CREDENTIALS)
        return self.run()

    def pooled(self, request: pytest.FixtureRequest) -> Instance:
        """The instance for this test's (type, deployment) within ``--rerobots-scope``."""
        wtype, deployment = self.target_for(request.node)
        run = self.need_run()
        scope_node = self._scope_node(request)
        key = (wtype, deployment, scope_node.nodeid)
        keys = self._scope_keys.get(scope_node.nodeid)
        if keys is None:
            keys = self._scope_keys[scope_node.nodeid] = []
            # The finalizer comes first, so the scope's teardown ends the instances even
            # if a start is interrupted half way (Instance.start also cleans up). One per
            # scope, so that its instances end concurrently.
            scope_node.addfinalizer(lambda: run.release_many(
                self._scope_keys.pop(scope_node.nodeid, [])))
        if key not in keys:
            keys.append(key)
        self._wanted = True
        begun = time.monotonic()
        try:
            if self._prefetching(scope_node):
                self._prefetch_scope(request.session, scope_node.nodeid)
            inst = run.hold(key, wtype, deployment=deployment, shared=self._shared,
                            reuse=isinstance(scope_node, pytest.Session),
                            scope="test" if scope_node is request.node else self.settings.scope)
        finally:
            self._waited += time.monotonic() - begun
        from . import plugin_report  # lazily: loaded by the rental already

        plugin_report.record_properties(request.node, inst)
        self.given(inst)
        self._pooled = inst
        return inst

    def waiting(self, seconds: float) -> None:
        """The current test waited ``seconds`` for robots (``rerobots_acquire``)."""
        self._wanted = True
        self._waited += seconds

    def given(self, inst: Instance) -> None:
        """``inst`` was handed to the current test by a fixture (keep-on-failure, the
        camera); a READY instance's camera add-on is applied in the background."""
        self._given.append(inst)
        if self._run is not None:
            self.camera().activate(self._run.client, inst)

    @property
    def _shared(self) -> bool:
        return self.settings.scope == "session" and self.settings.xdist == "shared"

    def _prefetching(self, scope_node: pytest.Item | pytest.Collector) -> bool:
        # Session scope only, once, and not under xdist, whose workers each run only
        # some of the tests.
        return (self.settings.prefetch and self.settings.scope == "session"
                and not self._prefetched and not self.is_worker
                and isinstance(scope_node, pytest.Session))

    def _prefetch_scope(self, session: pytest.Session, scope_id: str) -> None:
        """Start renting every (type, deployment) the selected tests will need, at once."""
        self._prefetched = True
        keys = self._scope_keys[scope_id]
        for item in session.items:
            if not _NEEDS_INSTANCE.intersection(getattr(item, "fixturenames", ())) \
                    or _never_runs(item):
                continue
            try:
                wtype, deployment = self.target_for(item)
            except pytest.fail.Exception:
                continue  # that test will say so itself
            key = (wtype, deployment, scope_id)
            if key not in keys:
                keys.append(key)
            self.run().prefetch(key, wtype, deployment=deployment, reuse=True, scope="session")

    def _scope_node(self, request: pytest.FixtureRequest) -> pytest.Item | pytest.Collector:
        scope = self.settings.scope
        if scope == "function":
            return request.node
        if scope == "module":
            return request.node.getparent(pytest.Module) or request.node
        return request.session

    def target_for(self, item: pytest.Item) -> tuple[str, str | None]:
        """The (workspace type, deployment) a test runs on, or an error saying how to choose."""
        marker = item.get_closest_marker("rerobots")
        wtypes, marked_deployment = marker_args(marker)
        wtype = self.settings.wtype or (wtypes[0] if wtypes else None)
        if wtype is None:
            pytest.fail(NO_TYPE, pytrace=False)
        each = each_of(item)
        if isinstance(each, str):
            return wtype, each
        deployment = self.settings.deployment or marked_deployment
        from .wire import is_uuid  # lazily: only a test that gets a robot

        if deployment is not None and not is_uuid(deployment):
            # A short id, as the summary table prints it: the one deployment it starts
            # (one listing per run; none for a whole id).
            problem = None
            try:
                deployment = self.need_run().deployments.resolve(deployment)
            except RerobotsError as exc:
                source = self.settings.sources.get("deployment") if self.settings.deployment \
                    else "@pytest.mark.rerobots(deployment=...)"
                problem = f"{exc} (from {source})" if source else str(exc)
            if problem is not None:
                pytest.fail(problem, pytrace=False)
        return wtype, deployment

    # -- each_deployment ----------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """``each_deployment``: parametrize a test that needs ``rerobots_instance`` once per
        deployment of its workspace type (test id: short id and region)."""
        if EACH_PARAM not in metafunc.fixturenames:
            return
        marker = metafunc.definition.get_closest_marker("rerobots")
        wtypes, _ = marker_args(marker)
        each = self.settings.each_deployment or bool(marker and marker.kwargs.get(
            "each_deployment"))
        wtype = self.settings.wtype or (wtypes[0] if wtypes else None)
        if not each or wtype is None or skip_reason(marker, self.settings.wtype):
            return
        found = self.tally.deployments_of(wtype, self.api_url, self._token)
        for ident, region in found:
            self.tally.each_regions[ident] = region
        from . import costs  # lazily: only each_deployment names its tests so

        metafunc.parametrize(EACH_PARAM, [ident for ident, _ in found],
                             ids=[costs.each_id(ident, region) for ident, region in found])

    # -- hooks ----------------------------------------------------------------

    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        # Most tests carry no rerobots marker: each module and class is looked at once,
        # not once for each of its tests (a bad marker is a usage error here all the same).
        seen: dict[int, bool] = {}
        for item in items:
            if not _marked(item, seen):
                continue
            reason = skip_reason(item.get_closest_marker("rerobots"), self.settings.wtype,
                                 self.settings.sources.get("wtype", ""))
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))

    # The innermost wrapper: before xdist's and pytest's own sessionfinish, and after
    # them but before the terminal summary (which reports the leftovers).
    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Iterator[None]:
        if self.is_worker:
            yield
            return
        if self.config.pluginmanager.has_plugin("dsession"):
            # xdist's controller: end what the workers hold *before* xdist shuts them
            # down, which can take 10 s when the run was interrupted.
            self._end_leftovers()
        properties = self.tally.run_properties()
        if properties:  # (none unless something was rented)
            from . import plugin_report  # lazily: a run that rents nothing never loads it

            plugin_report.junit_run_properties(self.config, properties)
        yield  # (an old-style wrapper: the other impls' errors do not surface here)
        # After the session's fixtures are torn down: what is still live leaked.
        self._end_leftovers()

    def _end_leftovers(self) -> None:
        """End what the ledger holds as live for this run (a worker killed before its
        teardown). Only this process and its xdist workers rent under this run's id: the
        ledger is read only when there were workers, the client loads only if it holds
        any."""
        ledger = self.settings.ledger
        if not self.guarded or ledger is None:
            return
        if self._run is None:
            if not self.config.pluginmanager.has_plugin("dsession"):
                return
            from .ledger import Ledger  # lazily: only an xdist controller reads it here

            if not Ledger(ledger).live(run_id=self.run_id):
                return
        self.run().end_leftovers()

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        """Note how often each instance was used before this test (keep-on-failure)."""
        self._given = []
        self._waited, self._wanted, self._pooled = 0.0, False, None
        if self._run is not None:
            self._run.testing(nodeid)  # (robots held beyond their test: board.py)
        if self._run is not None and (self.settings.keep_on_failure or self.camera().on):
            self._uses_before = {id(i): i.uses for i in self._run.records.instances}

    def _used_by_this_test(self) -> list[Instance]:
        """The instances the current test got from a fixture or used (its commands,
        transfers, ``ssh`` or ``sftp``), however it got them."""
        assert self._run is not None
        used = list(dict.fromkeys(self._given))
        for inst in self._run.records.instances:
            if inst not in used and inst.uses > self._uses_before.get(id(inst), 0):
                used.append(inst)
        return used

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Iterator[None]:
        self._add_transcript(item, call.when)
        if self._wanted and (call.when == "call" or call.excinfo is not None) and not any(
                name == "rerobots_wait_s" for name, _ in item.user_properties):
            # JUnit properties of the test case (in this phase's report and the next ones).
            item.user_properties.append(("rerobots_wait_s", f"{self._waited:.3f}"))
            if call.when == "call":
                item.user_properties.append(("rerobots_use_s", f"{call.duration:.3f}"))
        outcome: Any = yield
        rep = outcome.get_result()
        self.tally.note(item, call, rep, self._given, self._pooled, self.reuse)
        if rep.failed and self._run is not None and self.settings.keep_on_failure:
            # Kept at the end of its scope instead of terminated.
            self._run.mark_kept_on_failure(self._used_by_this_test())
        if self._run is not None and self.camera().wanted(rep.failed) \
                and (rep.when == "call" or rep.failed):
            from . import plugin_report  # lazily: loaded with the rental already

            pictures = self.camera().snapshot(self._run.client, self._used_by_this_test(),
                                            item.nodeid, rep.when)
            plugin_report.attach_pictures(self.config, rep, pictures)
        if rep.failed and call.excinfo is not None \
                and isinstance(call.excinfo.value, RerobotsError):
            from . import plugin_report  # lazily: only a test that met a rerobots error

            short = plugin_report.short_failure(call.excinfo, self.config)
            if short is not None:
                rep.longrepr = short
            if rep.when == "setup" and in_github_actions():
                # Annotated as pytest-github-actions-annotate-failures annotates a failed
                # call (it leaves setup errors out); printed by the controller (logreport).
                rep.rerobots_annotation = plugin_report.setup_error_annotation(  # type: ignore[attr-defined]
                    item, call.excinfo.value)
        if rep.when == "call" and rep.failed and call.excinfo is not None \
                and is_infrastructure(call.excinfo.value):
            # Marked on the report (it travels to the xdist controller), shown as an error.
            rep.rerobots_infrastructure = True  # type: ignore[attr-defined]
            rep.sections.append(("rerobots", "infrastructure trouble, not a test failure: "
                                 f"{type(call.excinfo.value).__name__}"))
        if rep.failed and rep.when in ("setup", "call") and on_robot(item, self._given):
            label_failure(item, rep, call)

    def _add_transcript(self, item: pytest.Item, when: str) -> None:
        """What this phase of the test did on robots, as a report section of its own
        ("Captured rerobots transcript call"), shown like captured output."""
        if self._run is None:
            return
        entries, dropped = self._run.transcript.take()
        if entries or dropped:
            from . import plugin_report  # lazily: loaded with the rental already
            from .transcript import Transcript

            text = plugin_report.redact(Transcript.render(entries, dropped),
                                 self._token.reveal() if self._token else None)
            # pytest prints a section as it is, each line from its start: under GitHub
            # Actions the runner would act on the workflow commands a robot printed.
            item.add_report_section(when, plugin_report.TRANSCRIPT_KEY, fence_block(text))

    @pytest.hookimpl(tryfirst=True)  # before junitxml closes the test case
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.is_worker and report.skipped and _skipped_for_token(report):
            self.skipped_for_token += 1
        annotation = getattr(report, "rerobots_annotation", None)
        if not self.is_worker and isinstance(annotation, str):
            from . import plugin_report  # lazily: only a report this plugin annotated

            plugin_report.annotate(self.config, annotation)
        if report.when == "teardown" and report.sections:
            from . import plugin_report  # lazily: only a test with captured sections

            plugin_report.junit_transcript(self.config, report)
        pictures = getattr(report, "rerobots_pictures", None)
        if isinstance(pictures, list) and pictures:
            from . import plugin_report  # lazily: only a test the camera pictured

            plugin_report.junit_attachments(self.config, report, pictures)
            if not self.is_worker:
                self.pictures.extend(str(p) for p in pictures)
        if not self.is_worker:
            self.tally.collect(report)

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        url = self.api_url
        token = "set" if self._token else "not set"
        wtype = self.settings.wtype or "from markers"
        lines = [f"rerobots: {url} ({self.mode}), token {token}, wtype {wtype}, "
                 f"scope {self.settings.scope}"]
        return lines + self.notices()

    def notices(self) -> list[str]:
        """The header's notices: options this run does not honour as asked, and the
        ledger's warnings. Shown under ``-q`` too (pytest_sessionstart), which hides the
        header."""
        s = self.settings
        lines = []
        if (s.keep_on_failure or self.reuse is not None) and not self.guarded:
            lines.append("rerobots: --rerobots-keep-on-failure and --rerobots-reuse do nothing "
                         "here: the embedded simulator ends with the run")
        return lines + self.notes

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Under ``-q`` pytest shows no header: the notices still show, as they change what
        the user asked for."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.is_worker or reporter is None or getattr(reporter, "showheader", True):
            return
        for line in self.notices():
            reporter.write_line(line, yellow=True)

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self.is_worker or not self._anything_to_report():
            return
        from . import costs, plugin_report  # lazily: a run that rents nothing needs neither

        plugin_report.terminal_summary(terminalreporter, self.records, self.skipped_for_token)
        for line in [*self.kept_lines, *self.kept_summary()]:
            terminalreporter.write_line(line, yellow=line.startswith("rerobots: kept"))
        cost_lines = self.tally.lines()
        for line in cost_lines:
            terminalreporter.write_line(one_line(line))
        plugin_report.github_step_summary(
            self.records, plugin_report.Tally.of(terminalreporter.stats),
            skipped_for_token=self.skipped_for_token, token=bool(self._token),
            extra=plugin_report.cost_markdown(cost_lines,
                                              costs.gantt(self.tally.spans(), self.tally.uses),
                                              self.tally.replays))
        plugin_report.pictures_summary(terminalreporter, self.pictures)

    def _anything_to_report(self) -> bool:
        """Whether the summary has a line to show (or to write to the GitHub step
        summary): not in a run that rented nothing, skipped nothing for want of a token
        and heard of no robot from a worker."""
        records, tally = self.records, self.tally
        return bool(self._run is not None or self.skipped_for_token or records.instances
                    or records.remote_rows or records.leftovers or self.kept_lines
                    or tally.remote_spans or tally.each or self.pictures)

    def kept_summary(self) -> list[str]:
        """What the terminal says of the instances this process kept or reused."""
        if self._run is None:
            return []
        lines = [f"rerobots: reused {i.id} ({i.label}) kept by an earlier run: no POST /new, "
                 "no READY wait" for i in self.records.instances if i.reused]
        lines += [f"rerobots: attached to {i.id} ({i.label}) rented ahead: no POST /new"
                  for i in self.records.instances if i.rented_ahead]
        for inst in self._run.kept_instances():
            assert inst.kept is not None
            from .keep import describe  # lazily: only a run that kept an instance needs it

            lines += describe(inst.kept)
        return lines


def _skipped_for_token(rep: pytest.TestReport) -> bool:
    longrepr = rep.longrepr
    return isinstance(longrepr, tuple) and NO_CREDENTIALS in str(longrepr[-1])


def _marked(node: pytest.Item | pytest.Collector, seen: dict[int, bool]) -> bool:
    """Whether ``node`` or one of its parents carries the ``rerobots`` marker (where
    ``get_closest_marker`` looks); ``seen``: the answer for each parent, by its id."""
    for mark in node.own_markers:
        if mark.name == "rerobots":
            return True
    parent = node.parent
    if parent is None:
        return False
    answer = seen.get(id(parent))
    if answer is None:
        answer = seen[id(parent)] = _marked(parent, seen)
    return answer


def _never_runs(item: pytest.Item) -> bool:
    """Whether ``item`` is skipped (``skip``, a true ``skipif``) or marked
    ``xfail(run=False)``: prefetch rents nothing for it. A condition that cannot be
    evaluated counts as running (pytest reports the error at the test)."""
    if item.get_closest_marker("skip"):
        return True
    try:  # pytest's own evaluation of the marks (as at setup)
        from _pytest.skipping import evaluate_skip_marks, evaluate_xfail_marks

        if evaluate_skip_marks(item) is not None:
            return True
        xfailed = evaluate_xfail_marks(item)
    except Exception:  # (an error in a condition, or a pytest that moved them)
        return False
    return xfailed is not None and not xfailed.run


#: The fixtures that hand a test the pooled instance.
_NEEDS_INSTANCE = frozenset({"rerobots_instance", "rerobots_ssh", "rerobots_sftp"})


def marker_args(marker: pytest.Mark | None) -> tuple[list[str], str | None]:
    """The workspace types and deployment a ``rerobots`` marker names (validated)."""
    if marker is None:
        return [], None
    unknown = set(marker.kwargs) - {"deployment", "each_deployment"}
    if unknown:
        raise pytest.UsageError(
            f"@pytest.mark.rerobots: unknown keyword {sorted(unknown)[0]!r} (only deployment= "
            "and each_deployment=)"
        )
    if not isinstance(marker.kwargs.get("each_deployment", False), bool):
        raise pytest.UsageError("@pytest.mark.rerobots: each_deployment must be True or False, "
                                f"got {marker.kwargs['each_deployment']!r}")
    wtypes = list(marker.args)
    for wtype in wtypes:
        if not isinstance(wtype, str) or not wtype.strip():
            raise pytest.UsageError(
                f"@pytest.mark.rerobots: workspace types must be non-empty strings, got {wtype!r}"
            )
    deployment = marker.kwargs.get("deployment")
    if deployment is not None and not isinstance(deployment, str):
        raise pytest.UsageError(
            f"@pytest.mark.rerobots: deployment must be a string, got {deployment!r}"
        )
    return wtypes, deployment


def skip_reason(marker: pytest.Mark | None, run_wtype: str | None,
                source: str = "--rerobots-wtype") -> str | None:
    """Why a marked test does not run on this run's workspace type, if it does not."""
    wtypes, _ = marker_args(marker)
    if run_wtype is None or not wtypes or run_wtype in wtypes:
        return None
    return (f"test is for rerobots workspace type {' or '.join(wtypes)}; "
            f"this run is for {run_wtype} ({source})")


__all__ = [
    "RerobotsPlugin",
    "load_settings",
    "marker_args",
    "rerobots_acquire",
    "rerobots_client",
    "rerobots_each_deployment",
    "rerobots_host",
    "rerobots_instance",
    "rerobots_run",
    "rerobots_sftp",
    "rerobots_sim",
    "rerobots_ssh",
    "skip_reason",
]
