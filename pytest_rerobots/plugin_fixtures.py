"""The plugin's fixtures: the run, its client and simulator, and the robots a test gets
(``rerobots_instance`` and what stands on it, ``rerobots_acquire``). Each reads the
plugin's state object, registered with the plugin manager as :data:`PLUGIN_NAME`;
:mod:`.plugin` imports them, so that pytest finds them on the plugin itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import paramiko

    from .client import RerobotsClient
    from .instance import Instance
    from .plugin import RerobotsPlugin
    from .run import Run
    from .sim import Simulator

#: The name the plugin's state object is registered under.
PLUGIN_NAME = "rerobots-plugin"


def _plugin(config: pytest.Config) -> RerobotsPlugin:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    assert plugin is not None and type(plugin).__name__ == "RerobotsPlugin"
    return plugin  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def rerobots_client(pytestconfig: pytest.Config) -> RerobotsClient:
    """The configured ``RerobotsClient`` (API origin and token from the rerobots options);
    under ``--rerobots-sim``, pointed at the embedded simulator."""
    return _plugin(pytestconfig).need_run().client


@pytest.fixture(scope="session")
def rerobots_run(pytestconfig: pytest.Config) -> Run:
    """The run's ``Run``: ``with rerobots_run.acquire("basic_kobuki") as robot: yield robot``
    in a fixture of any scope gets the ledger, watchdog, signal guard, queue and ready
    settings, summary row and live progress, like ``rerobots_instance``. Skips (or fails
    with ``--rerobots-require``) without a token."""
    return _plugin(pytestconfig).need_run()


@pytest.fixture
def rerobots_each_deployment(request: pytest.FixtureRequest) -> str | None:
    """The deployment ``each_deployment`` runs this test on (its parameter), else None."""
    return getattr(request, "param", None)


@pytest.fixture
def rerobots_instance(request: pytest.FixtureRequest,
                      rerobots_each_deployment: str | None) -> Iterator[Instance]:
    """A READY ``Instance`` of this test's workspace type: firewall open, SSH connected.

    One instance per (type, deployment) within ``--rerobots-scope`` (session by
    default); terminated when that scope ends, whatever happens. What the test spawned
    or forwarded on it ends at the test's teardown, whatever the scope.
    """
    inst = _plugin(request.config).pooled(request)
    mark = inst.live_mark()
    yield inst
    inst.end_live(mark)


@pytest.fixture
def rerobots_ssh(rerobots_instance: Instance) -> paramiko.SSHClient:
    """The instance's ``paramiko.SSHClient``, logged in as ``root``."""
    return rerobots_instance.ssh


@pytest.fixture
def rerobots_sftp(rerobots_instance: Instance) -> paramiko.SFTPClient:
    """A ``paramiko.SFTPClient`` on the instance's SSH connection."""
    return rerobots_instance.sftp


@pytest.fixture
def rerobots_acquire(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """A factory: ``rerobots_acquire("basic_kobuki")`` rents another READY instance
    (keywords as for ``Instance``, e.g. ``deployment=...``);
    ``a, b = rerobots_acquire("basic_kobuki", "fixed_misty2")`` rents several at once
    and returns them in order. Every instance it made is terminated at this test's
    teardown."""
    from .instance import end_all  # lazily: paramiko loads only when a test rents

    plugin = _plugin(request.config)
    run = plugin.need_run()
    made: list[Instance] = []

    def acquire(wtype: str, *more: str, deployment: str | None = None,
                **options: Any) -> Instance | list[Instance]:
        begun = time.monotonic()
        try:
            insts = run.acquire(wtype, *more, deployment=deployment, scope="test", **options)
        finally:
            plugin.waiting(time.monotonic() - begun)
        for inst in insts if isinstance(insts, list) else [insts]:
            made.append(inst)
            plugin.given(inst)
            from . import plugin_report  # lazily: a run that rents nothing never loads it

            plugin_report.record_properties(request.node, inst)
        return insts

    try:
        yield acquire
    finally:
        try:
            for inst in made:
                inst.end_live()
        finally:
            end_all(made)


@pytest.fixture
def rerobots_host(rerobots_instance: Instance) -> Any:
    """A testinfra ``Host`` on the instance's SSH connection (host key pinned):
    ``rerobots_host.file("/etc/os-release").contains("Debian")``, ``.service("ssh")``,
    ``.run("uname -a")``. Needs ``pip install 'pytest-rerobots[testinfra]'``."""
    try:  # lazily: testinfra is an optional extra, missing in most installs
        from .testinfra_host import host_for
    except ImportError as exc:
        missing = str(exc)
    else:
        return host_for(rerobots_instance)
    pytest.fail(missing, pytrace=False)


@pytest.fixture(scope="session")
def rerobots_sim(pytestconfig: pytest.Config) -> Simulator:
    """The running ``Simulator`` under ``--rerobots-sim`` (to inject faults); skips otherwise."""
    sim = _plugin(pytestconfig).simulator
    if sim is None:
        pytest.skip("rerobots_sim needs --rerobots-sim (in this process)")
    return sim
