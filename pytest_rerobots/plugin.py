"""The pytest plugin: options, the ``rerobots`` marker, fixtures and hooks.

It only wires the engine: settings come from :mod:`.settings`, instances
from :class:`.instance.Instance`, the simulator from :mod:`.sim`, reports
from :mod:`.report`. Its state lives in one :class:`RerobotsPlugin` object
registered with the plugin manager.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from . import guard, report
from .client import RerobotsClient
from .errors import ConfigurationError, is_infrastructure
from .instance import Instance
from .settings import OPTIONS, Settings, resolve
from .share import SharedPool

PLUGIN_NAME = "rerobots-plugin"

NO_TYPE = (
    "no workspace type for this test: pass --rerobots-wtype TYPE (or set REROBOTS_WTYPE or "
    "the ini option rerobots_wtype), or mark the test @pytest.mark.rerobots('TYPE')"
)
NO_CREDENTIALS = (
    "no rerobots API token: set REROBOTS_API_TOKEN or pass --rerobots-token-file, "
    "or run on the simulator with --rerobots-sim"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rerobots", "hardware-in-the-loop tests on rerobots instances")
    for opt in OPTIONS:
        if opt.name in ("sim", "require"):
            env_hint = f" [env {opt.env}=1]" if opt.env else ""
            group.addoption(opt.flag, action="store_true", default=None,
                            dest=f"rerobots_{opt.name}", help=opt.help + env_hint)
        elif opt.name == "allow":
            group.addoption(opt.flag, action="append", default=None, dest="rerobots_allow",
                            metavar="CIDR", help=opt.help)
        else:
            extra = f" [env {opt.env}]" if opt.env else ""
            group.addoption(opt.flag, default=None, dest=f"rerobots_{opt.name}",
                            metavar=opt.name.upper().replace("_", "-"), help=opt.help + extra)
        if opt.ini:
            parser.addini(opt.ini, help=opt.help,
                          type="linelist" if opt.name == "allow" else "string", default=None)
    group.addoption("--rerobots-token-file", default=None, dest="rerobots_token_file",
                    metavar="PATH",
                    help="read the API token from this file (default: env REROBOTS_API_TOKEN)")
    group.addoption("--rerobots-sweep", action="store_true", default=False,
                    dest="rerobots_sweep",
                    help="terminate every live instance in the ledger, print what it did, exit")


def _ini(config: pytest.Config, name: str) -> Any:
    try:
        return config.getini(name)
    except ValueError:
        return None


def load_settings(config: pytest.Config) -> Settings:
    """Resolve the plugin's settings; a bad value is a ``pytest.UsageError``."""
    cli = {opt.name: config.getoption(f"rerobots_{opt.name}") for opt in OPTIONS}
    ini = {opt.ini: _ini(config, opt.ini) for opt in OPTIONS if opt.ini}
    try:
        settings = resolve(cli, os.environ, ini,
                           token_file=config.getoption("rerobots_token_file"),
                           sweep=bool(config.getoption("rerobots_sweep")))
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None
    if settings.ledger is None:
        settings = _with_default_ledger(config, settings)
    return settings


def _with_default_ledger(config: pytest.Config, settings: Settings) -> Settings:
    """The ledger's stable default: ``d/rerobots/ledger.jsonl`` in pytest's cache dir
    (the ``cache_dir`` ini option, ``.pytest_cache`` under the rootdir by default)."""
    from dataclasses import replace

    cache_dir = Path(str(_ini(config, "cache_dir") or ".pytest_cache"))
    if not cache_dir.is_absolute():
        cache_dir = config.rootpath / cache_dir
    return replace(settings, ledger=cache_dir / "d" / "rerobots" / "ledger.jsonl")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``pytest --rerobots-sweep``: end every live instance in the ledger, then exit."""
    if not config.getoption("rerobots_sweep"):
        return None
    settings = load_settings(config)
    assert settings.ledger is not None
    ledger = guard.Ledger(settings.ledger)
    with RerobotsClient(token=settings.token, api_url=settings.api_url, ignore_env=True) as api:
        failed = guard.sweep(api, ledger, print)
    return 1 if failed else 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rerobots(*wtypes, deployment=None): run this test on an instance of one of these "
        "rerobots workspace types (the first, unless --rerobots-wtype picks another)",
    )
    settings = load_settings(config)
    plugin = RerobotsPlugin(config, settings)
    config.pluginmanager.register(plugin, PLUGIN_NAME)
    if config.pluginmanager.hasplugin("xdist"):
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
            output["rerobots_rows"] = report.rows(self.plugin.records)
            output["rerobots_skipped_for_token"] = self.plugin.skipped_for_token

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """Controller: collect what a worker sent (nothing if it crashed)."""
        output = getattr(node, "workeroutput", None) or {}
        self.plugin.records.remote_rows.extend(
            tuple(row) for row in output.get("rerobots_rows", []))
        self.plugin.skipped_for_token += int(output.get("rerobots_skipped_for_token", 0))

    def pytest_configure_node(self, node: Any) -> None:
        """Hand the run id and the controller's simulator to each worker (through
        execnet, not argv)."""
        plugin = self.plugin
        node.workerinput["rerobots_run_id"] = plugin.run_id
        if plugin.settings.xdist == "shared":
            if plugin.share_dir is None:
                plugin.share_dir = Path(tempfile.mkdtemp(prefix="rerobots-share-"))
            node.workerinput["rerobots_share_dir"] = str(plugin.share_dir)
        sim = plugin.simulator
        if sim is not None:
            node.workerinput["rerobots_sim_url"] = sim.url
            node.workerinput["rerobots_sim_token"] = sim.token


class RerobotsPlugin:
    """The plugin's state for one pytest process: settings, client, simulator, instances."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.worker_input: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.simulator: Any = None
        self.client: RerobotsClient | None = None
        self.records = report.Records()
        self.skipped_for_token = 0
        self._pool: dict[tuple[str, str | None, str], Instance] = {}
        self.signals = guard.SignalGuard()
        self.ledger: guard.Ledger | None = None
        self.watchdog: guard.Watchdog | None = None
        self.run_id = str((self.worker_input or {}).get("rerobots_run_id") or uuid.uuid4())
        # Under xdist with --rerobots-xdist shared: the controller's directory for the
        # workers to share instances through (see share.py).
        self.share_dir: Path | None = None
        self.shared: SharedPool | None = None
        share_dir = (self.worker_input or {}).get("rerobots_share_dir")
        if share_dir and settings.xdist == "shared":
            self.shared = SharedPool(share_dir)
        self._failed: dict[tuple[str, str | None, str], BaseException] = {}

    # -- start and stop -------------------------------------------------------

    @property
    def is_worker(self) -> bool:
        return self.worker_input is not None

    def start(self) -> None:
        s = self.settings
        url, token = s.api_url, s.token
        if self.is_worker and "rerobots_sim_url" in (self.worker_input or {}):
            url = self.worker_input["rerobots_sim_url"]  # type: ignore[index]
            token = self.worker_input["rerobots_sim_token"]  # type: ignore[index]
        elif s.sim and not s.sweep:
            self.simulator = self._start_simulator()
            url, token = self.simulator.url, self.simulator.token
        self.client = RerobotsClient(token=token, api_url=url, ignore_env=True)
        if not self.is_worker and getattr(self.config.option, "dist", "no") != "no":
            # The xdist controller rents nothing itself, but on SIGTERM it must still
            # get to end what its workers hold.
            self.signals.install()
        if self.simulator is None and s.ledger is not None and not s.sweep:
            # An embedded simulator dies with this process, and its instances with it;
            # anything else (the real API, a simulator of its own) gets layers 3 and 5.
            self.ledger = guard.Ledger(s.ledger, run_id=self.run_id, api_url=url)
            cache = getattr(self.config, "cache", None)
            if cache is not None:
                # Let pytest make its cache dir first, with its .gitignore, before the
                # ledger is written there (pytest adds those files only to a new dir).
                cache.set("rerobots/ledger", str(s.ledger))
            # REROBOTS_NO_WATCHDOG=1 is undocumented: it leaves layer 3 out so that the
            # project's own tests can show layer 4 (keepalive) working alone.
            if os.environ.get("REROBOTS_NO_WATCHDOG") != "1":
                # Long enough to wait out an INIT that may last until the ready timeout.
                self.watchdog = guard.Watchdog(url, token, ledger=self.ledger,
                                               deadline=max(180.0, s.ready_timeout + 60.0))

    def _start_simulator(self) -> Any:
        try:
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

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        try:
            self.release_all()
        finally:
            if self.watchdog is not None:
                self.watchdog.close()
            if self.client is not None:
                self.client.close()
            if self.simulator is not None:
                self.simulator.stop()
                self.simulator = None
            if self.share_dir is not None:
                shutil.rmtree(self.share_dir, ignore_errors=True)
            self.signals.uninstall()

    def _end_run_leftovers(self) -> None:
        """Controller: end every instance of this run the ledger still holds as live
        (a worker that was killed or crashed before its teardown)."""
        if self.ledger is None or self.client is None:
            return
        leftovers = [r["id"] for r in self.ledger.live(run_id=self.run_id)]
        if leftovers:
            results = guard.end_all(self.client, leftovers, ledger=self.ledger, by="controller")
            for ident, outcome in results.items():
                self.records.note_leftover(ident, outcome)

    # -- instances ------------------------------------------------------------

    def can_rent(self) -> bool:
        return bool(self.client and self.client.has_token)

    def need_client(self) -> RerobotsClient:
        """The client, or skip (or fail with --rerobots-require) when there is no token."""
        if not self.can_rent():
            if self.settings.require:
                pytest.fail(f"{NO_CREDENTIALS} (--rerobots-require)", pytrace=False)
            self.skipped_for_token += 1
            pytest.skip(NO_CREDENTIALS)
        assert self.client is not None
        return self.client

    def new_instance(self, target: str, **overrides: Any) -> Instance:
        """An unstarted Instance with the run's settings (``overrides`` win)."""
        s = self.settings
        options: dict[str, Any] = dict(
            ready_timeout=s.ready_timeout, queue_timeout=s.queue_timeout, lease=s.lease,
            allow=s.allow, fast_polling=self.mode == "embedded simulator",
            keepalive_interval=s.keepalive_interval,
            # Everything this checkout holds (other workers, other runs) is not ours to
            # adopt when a POST /new answer is lost.
            known_ids=(lambda: [r["id"] for r in self.ledger.live()]) if self.ledger else None,
            # The watchdog hears of a new instance before the ledger records it.
            listeners=[self.records, report.Progress(self.config),
                       *(x for x in (self.watchdog, self.ledger) if x is not None)],
        )
        options.update(overrides)
        client = self.need_client()
        # Only a run that rents anything changes how signals behave.
        self.signals.install()
        return Instance(client, target, **options)

    def pooled(self, request: pytest.FixtureRequest) -> Instance:
        """The instance for this test's (type, deployment) within ``--rerobots-scope``."""
        wtype, deployment = self.target_for(request.node)
        self.need_client()
        scope_node = self._scope_node(request)
        key = (wtype, deployment, scope_node.nodeid)
        if key in self._failed:
            raise self._failed[key]
        inst = self._pool.get(key)
        if inst is None:
            # The finalizer comes first, so the scope's teardown ends the instance even
            # if its start is interrupted half way (Instance.__enter__ also cleans up).
            scope_node.addfinalizer(lambda: self._release(key))
            try:
                inst = self._start_pooled(key)
            except BaseException as exc:
                # Not left in the pool: Instance.__enter__ has ended it (on any exception,
                # pytest's own outcomes such as a pytest-timeout failure included).
                self._pool.pop(key, None)
                if isinstance(exc, Exception):
                    self._failed[key] = exc
                raise
        else:
            inst.ensure_connected()
        report.record_properties(request.node, inst)
        return inst

    def _start_pooled(self, key: tuple[str, str | None, str]) -> Instance:
        wtype, deployment, _ = key

        def make(existing: str | None = None) -> Instance:
            inst = self.new_instance(deployment or wtype, existing=existing)
            inst.wtype = wtype
            return inst

        if self.shared is not None and self.settings.scope == "session":
            inst = self.shared.acquire(f"{wtype}/{deployment}", make)
            self._pool[key] = inst
            return inst
        inst = self._pool[key] = make()
        inst.__enter__()
        return inst

    def _scope_node(self, request: pytest.FixtureRequest) -> pytest.Item | pytest.Collector:
        scope = self.settings.scope
        if scope == "function":
            return request.node
        if scope == "module":
            return request.node.getparent(pytest.Module) or request.node
        return request.session

    def _release(self, key: tuple[str, str | None, str]) -> None:
        self._failed.pop(key, None)
        inst = self._pool.pop(key, None)
        if inst is None:
            return
        if self.shared is not None and self.settings.scope == "session":
            self.shared.release(f"{key[0]}/{key[1]}", inst)
        else:
            inst.terminate()

    def release_all(self) -> None:
        """Terminate every pooled instance still held (the end of the session)."""
        errors = []
        for key in list(self._pool):
            try:
                self._release(key)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def target_for(self, item: pytest.Item) -> tuple[str, str | None]:
        """The (workspace type, deployment) a test runs on, or an error saying how to choose."""
        marker = item.get_closest_marker("rerobots")
        wtypes, marked_deployment = marker_args(marker)
        wtype = self.settings.wtype or (wtypes[0] if wtypes else None)
        if wtype is None:
            pytest.fail(NO_TYPE, pytrace=False)
        return wtype, self.settings.deployment or marked_deployment

    # -- hooks ----------------------------------------------------------------

    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        for item in items:
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
            self._end_run_leftovers()
        yield  # (an old-style wrapper: the other impls' errors do not surface here)
        # After the session's fixtures are torn down: what is still live leaked.
        self._end_run_leftovers()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Iterator[None]:
        outcome: Any = yield
        rep = outcome.get_result()
        if rep.when == "call" and rep.failed and call.excinfo is not None \
                and is_infrastructure(call.excinfo.value):
            # Marked on the report (it travels to the xdist controller), shown as an error.
            rep.rerobots_infrastructure = True  # type: ignore[attr-defined]
            rep.sections.append(("rerobots", "infrastructure trouble, not a test failure: "
                                 f"{type(call.excinfo.value).__name__}"))

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config
                                 ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        if report.when == "call" and getattr(report, "rerobots_infrastructure", False):
            return "error", "E", ("ERROR", {"red": True})
        return None

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        client = self.client
        url = client.api_url if client else self.settings.api_url
        token = "set" if client and client.has_token else "not set"
        wtype = self.settings.wtype or "from markers"
        return [f"rerobots: {url} ({self.mode}), token {token}, wtype {wtype}, "
                f"scope {self.settings.scope}"]

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_worker:
            return
        report.terminal_summary(terminalreporter, self.records, self.skipped_for_token)
        report.github_step_summary(self.records)


def marker_args(marker: pytest.Mark | None) -> tuple[list[str], str | None]:
    """The workspace types and deployment a ``rerobots`` marker names (validated)."""
    if marker is None:
        return [], None
    unknown = set(marker.kwargs) - {"deployment"}
    if unknown:
        raise pytest.UsageError(
            f"@pytest.mark.rerobots: unknown keyword {sorted(unknown)[0]!r} (only deployment=)"
        )
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


def _plugin(config: pytest.Config) -> RerobotsPlugin:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    assert isinstance(plugin, RerobotsPlugin)
    return plugin


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def rerobots_client(pytestconfig: pytest.Config) -> RerobotsClient:
    """The configured ``RerobotsClient`` (API origin and token from the rerobots options);
    under ``--rerobots-sim``, pointed at the embedded simulator."""
    return _plugin(pytestconfig).need_client()


@pytest.fixture
def rerobots_instance(request: pytest.FixtureRequest) -> Instance:
    """A READY ``Instance`` of this test's workspace type: firewall open, SSH connected.

    One instance per (type, deployment) within ``--rerobots-scope`` (session by
    default); terminated when that scope ends, whatever happens.
    """
    return _plugin(request.config).pooled(request)


@pytest.fixture
def rerobots_ssh(rerobots_instance: Instance) -> Any:
    """The instance's ``paramiko.SSHClient``, logged in as ``root``."""
    return rerobots_instance.ssh


@pytest.fixture
def rerobots_sftp(rerobots_instance: Instance) -> Any:
    """A ``paramiko.SFTPClient`` on the instance's SSH connection."""
    return rerobots_instance.sftp


@pytest.fixture
def rerobots_acquire(request: pytest.FixtureRequest) -> Iterator[Callable[..., Instance]]:
    """A factory: ``rerobots_acquire("basic_kobuki")`` rents another READY instance
    (keywords as for ``Instance``, e.g. ``deployment=...``); every instance it made
    is terminated at this test's teardown."""
    plugin = _plugin(request.config)
    with ExitStack() as stack:

        def acquire(wtype: str, deployment: str | None = None, **options: Any) -> Instance:
            inst = plugin.new_instance(deployment or wtype, **options)
            inst.wtype = wtype
            stack.enter_context(inst)
            report.record_properties(request.node, inst)
            return inst

        yield acquire


@pytest.fixture(scope="session")
def rerobots_sim(pytestconfig: pytest.Config) -> Any:
    """The running ``Simulator`` under ``--rerobots-sim`` (to inject faults); skips otherwise."""
    sim = _plugin(pytestconfig).simulator
    if sim is None:
        pytest.skip("rerobots_sim needs --rerobots-sim (in this process)")
    return sim


__all__ = [
    "RerobotsPlugin",
    "load_settings",
    "marker_args",
    "rerobots_acquire",
    "rerobots_client",
    "rerobots_instance",
    "rerobots_sftp",
    "rerobots_sim",
    "rerobots_ssh",
    "skip_reason",
]
