"""A ledger or kept directory that another local user can write (issue 19, item 3).

Each test plays one attack that worked before the ledger and the kept directory were
checked: files planted by another user (made here by chown to uid 65534, ``nobody``: real
files with real owners and modes), in a shared directory like ``/tmp``. The sweep, the
claim of a reuse run and the keep of an instance are the project's own, against a
simulator; what each test asserts first is the harm (a file created or overwritten, an
instance ended, a process signalled, a hang), then the one error that refuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from pytest_rerobots import ConfigurationError, RerobotsClient, keep
from pytest_rerobots.ledger import Ledger
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sweep import sweep as sweep_all

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants files of another uid (root)")

OTHER = 65534  # nobody
LIVE = ("INIT", "READY")


def as_other(*paths: Path) -> None:
    for path in paths:
        os.lchown(path, OTHER, OTHER)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ssh_backend="none", ready_delay=0.05, terminate_delay=0.05,
                   not_found_window=0.0) as sim:
        yield sim


@pytest.fixture
def api(sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as client:
        yield client
    for snapshot in sim.live_instances():  # whatever an attack left (before the fix)
        client_end(sim, snapshot.id)


def client_end(sim: Simulator, ident: str) -> None:
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as client:
        client.terminate(ident)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A directory every local user may write, like /tmp (sticky)."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def rent(api: RerobotsClient) -> str:
    """An instance that "another process" rented and uses: no ledger of ours lists it."""
    ident = api.new_instance("basic_kobuki").id
    assert wait_until(lambda: status(api, ident) == "READY", 10)
    return ident


def status(api: RerobotsClient, ident: str) -> str:
    return str(api.instance(ident)["status"])


def victim_ledger(shared: Path, sim: Simulator) -> Ledger:
    """The victim's ledger in the shared directory, with one finished rental in it."""
    ledger = Ledger(shared / "ledger.jsonl", run_id="victim", api_url=sim.url)
    ledger.record_rented("finished", "basic_kobuki")
    ledger.record_ended("finished", "terminated")
    return ledger


def planted_store(ledger: Ledger) -> Path:
    """The kept directory beside ``ledger``, made first by the other user (mode 0777)."""
    kept = keep.kept_dir(ledger.path)
    kept.mkdir()
    kept.chmod(0o777)
    as_other(kept)
    return kept


def plant_record(kept: Path, ident: str, **fields: object) -> Path:
    directory = kept / ident
    directory.mkdir()
    (directory / "key").write_text("not a key\n")
    (directory / "record.json").write_text(json.dumps({"id": ident, **fields}))
    as_other(directory, directory / "key", directory / "record.json")
    return directory


def sweep(api: RerobotsClient, ledger: Ledger) -> tuple[str | None, list[str]]:
    """The sweep's error (None if it ran) and its lines."""
    lines: list[str] = []
    try:
        sweep_all(api, ledger, lines.append)
    except ConfigurationError as exc:
        return str(exc), lines
    return None, lines


@pytest.fixture
def lookalike() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names the keeper module, as another checkout's
    keeper's does (it keeps some other instance: its command line has no id of ours)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             "pytest_rerobots.keep", "keeper"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


# -- the kept directory -------------------------------------------------------------------


def test_a_symlinked_lock_makes_the_sweep_create_nothing(sim: Simulator, api: RerobotsClient,
                                                         shared: Path, tmp_path: Path):
    ledger = victim_ledger(shared, sim)
    kept = planted_store(ledger)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    target = private / "chosen-by-the-attacker"
    (kept / ".lock").symlink_to(target)
    as_other(kept / ".lock")
    plant_record(kept, str(uuid.uuid4()), api_url=sim.url)  # so that the sweep takes the lock

    error, lines = sweep(api, ledger)
    assert not os.path.lexists(target), (
        f"the sweep created {target}, owned by uid {target.stat().st_uid}")
    assert error is not None and f"the kept directory {kept} is owned by uid {OTHER}" in error
    assert lines == []  # refused before anything was done


def test_a_planted_record_ends_nothing_and_signals_no_process(
        sim: Simulator, api: RerobotsClient, shared: Path,
        lookalike: subprocess.Popen[bytes]):
    ledger = victim_ledger(shared, sim)
    theirs = rent(api)
    kept = planted_store(ledger)
    plant_record(kept, theirs, api_url=sim.url, wtype="basic_kobuki", kind="failure",
                 keeper=lookalike.pid)

    error, _ = sweep(api, ledger)
    time.sleep(0.2)
    assert lookalike.poll() is None, f"the sweep signalled process {lookalike.pid}"
    assert status(api, theirs) == "READY", f"the sweep ended {theirs}"
    assert error is not None and f"the kept directory {kept} is owned by uid {OTHER}" in error


def test_a_record_of_another_token_in_ones_own_store_is_left_alone(
        sim: Simulator, api: RerobotsClient, tmp_path: Path,
        lookalike: subprocess.Popen[bytes]):
    """Even where nobody else can write: only this token's records are acted on, and a
    keeper is signalled only if it is this user's keeper of that very instance."""
    ledger = victim_ledger(tmp_path, sim)
    theirs = rent(api)
    kept = keep.kept_dir(ledger.path)
    kept.mkdir(mode=0o700)
    (kept / theirs).mkdir(mode=0o700)
    (kept / theirs / "record.json").write_text(json.dumps(
        {"id": theirs, "api_url": sim.url, "token_sha256": "0" * 64, "kind": "failure",
         "keeper": lookalike.pid}))

    error, lines = sweep(api, ledger)
    time.sleep(0.2)
    assert lookalike.poll() is None, f"the sweep signalled process {lookalike.pid}"
    assert status(api, theirs) == "READY", f"the sweep ended {theirs}: {lines}"
    assert error is None
    assert (kept / theirs / "record.json").exists()


@pytest.mark.parametrize("lease", ["long", "nearly over"])
def test_a_planted_reuse_record_is_neither_attached_to_nor_ended(
        sim: Simulator, api: RerobotsClient, shared: Path, lease: str):
    ledger = victim_ledger(shared, sim)
    theirs = rent(api)
    kept = planted_store(ledger)
    # What a reuse run of the victim's would take as its own (the token's hash leaks from a
    # record, the checkout is a path).
    plant_record(kept, theirs, api_url=sim.url, token_sha256=api.token_sha256(),
                 checkout="/victim/checkout", kind="reuse", wtype="basic_kobuki",
                 kept_at=time.time(), host="127.0.0.1", port=22, hostkeys=[],
                 lease_end=time.time() + (60 if lease == "nearly over" else 3600))
    store = keep.KeptStore(kept, api_url=sim.url, token_sha256=api.token_sha256(),
                           checkout="/victim/checkout")
    try:
        claimed = store.claim("basic_kobuki", client=api)
    except ConfigurationError as exc:
        claimed, error = None, str(exc)
    else:
        error = ""
    assert claimed is None, f"the run attached to {claimed[0]['id']}"
    assert status(api, theirs) == "READY", f"the run ended {theirs}"
    assert f"the kept directory {kept} is owned by uid {OTHER}" in error


SWEEP = textwrap.dedent("""
    import sys
    from pytest_rerobots import ConfigurationError, RerobotsClient
    from pytest_rerobots.ledger import Ledger
    from pytest_rerobots.sweep import sweep
    with RerobotsClient(None, "http://127.0.0.1:9", ignore_env=True) as api:
        try:
            sweep(api, Ledger(sys.argv[1]), print)
        except ConfigurationError as exc:
            print("refused:", exc)
""")


@pytest.mark.parametrize("whose", ["another user's store", "one's own store"])
def test_a_fifo_as_record_never_hangs_the_sweep(tmp_path: Path, shared: Path, whose: str):
    base = shared if whose == "another user's store" else tmp_path
    ledger = Ledger(base / "ledger.jsonl")
    ledger.record_rented("finished", "basic_kobuki")
    ledger.record_ended("finished", "terminated")
    kept = keep.kept_dir(ledger.path)
    kept.mkdir(mode=0o700)
    (kept / "abc").mkdir(mode=0o700)
    os.mkfifo(kept / "abc" / "record.json", 0o600)
    if whose == "another user's store":
        kept.chmod(0o777)
        as_other(kept, kept / "abc", kept / "abc" / "record.json")
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(ledger.path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the sweep hung on a FIFO for 20 s")
    assert proc.returncode == 0
    if whose == "another user's store":
        assert f"refused: rerobots: refused: the kept directory {kept} is owned" in out
    else:
        assert "rerobots sweep: no live instances" in out


def test_renaming_the_kept_directory_mid_keep_overwrites_nothing(
        fast_sim: Simulator, tmp_path: Path):
    """The victim's kept directory is its own, but it lies in a directory others can
    write without the sticky bit: between the two writes of a record (before and after
    its keeper starts) the other user swaps in a directory of theirs with a link."""
    from pytest_rerobots.run import Run
    from pytest_rerobots.settings import Secret

    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    precious = private / "precious"
    precious.write_text("precious\n")
    run = Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=shared / "ledger.jsonl",
              reuse=5, watchdog=False, signals=False, checkout="/co")
    assert run.kept is not None
    kept = run.kept.directory
    swapped = threading.Event()
    stop = threading.Event()

    def attacker() -> None:
        while not stop.is_set():
            found = [p for p in kept.glob("*/record.json")] if kept.is_dir() else []
            if found:
                ident = found[0].parent.name
                os.rename(kept, shared / "moved-away")
                kept.mkdir()
                kept.chmod(0o777)
                (kept / ident).mkdir()
                (kept / ident).chmod(0o777)
                (kept / ident / "record.json").write_text("{}")
                (kept / ident / ".record.json").symlink_to(precious)
                as_other(kept, kept / ident, kept / ident / "record.json",
                         kept / ident / ".record.json")
                swapped.set()
                return
            time.sleep(0.001)

    thread = threading.Thread(target=attacker)
    thread.start()
    record: dict = {}
    error = ""
    try:
        inst = run.acquire("basic_kobuki")
        try:
            record = run.kept.keep(inst, "reuse", secret=Secret(fast_sim.token),
                                   interval=0.2, idle=300, ledger=run.ledger)
        except ConfigurationError as exc:
            error = str(exc)
    finally:
        stop.set()
        thread.join()
        if isinstance(record.get("keeper"), int):
            keep.stop_keeper(record["keeper"])
        run.close()  # ends the instance
    assert swapped.is_set()
    text = precious.read_text()
    assert text == "precious\n", f"{precious} (root's) overwritten with: {text[:90]}..."
    assert f"the kept directory {kept} is owned by uid {OTHER}" in error
    # The keeper it started found no record it could trust, and exited.
    assert wait_until(lambda: not keepers_of(inst.id), 10)


def keepers_of(ident: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pytest_rerobots.keep" in argv and ident.encode() in argv:
                found.append(int(entry.name))
    return found


# -- the ledger ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["owned by another user", "writable by others",
                                 "a symbolic link to another user's file"])
def test_a_ledger_another_user_wrote_ends_nothing(sim: Simulator, api: RerobotsClient,
                                                 shared: Path, how: str):
    theirs = rent(api)
    line = json.dumps({"event": "rented", "id": theirs, "target": "basic_kobuki",
                       "api_url": sim.url, "run": "planted"}) + "\n"
    path = shared / "ledger.jsonl"
    if how == "owned by another user":
        path.write_text(line)
        as_other(path)
    elif how == "writable by others":
        Ledger(path, api_url=sim.url).record_rented("finished", "basic_kobuki")
        path.chmod(0o666)
        with path.open("a") as fh:  # (what the other user appends)
            fh.write(line)
    else:
        theirs_file = shared / "their-ledger"
        theirs_file.write_text(line)
        path.symlink_to(theirs_file)
        as_other(theirs_file, path)
    error, lines = sweep(api, Ledger(path))
    assert status(api, theirs) == "READY", f"the sweep ended {theirs}: {lines}"
    assert error is not None and f"the ledger {path} " in error
    assert lines == []


def test_a_sweep_leaves_what_another_token_rented(sim: Simulator, api: RerobotsClient,
                                                  tmp_path: Path):
    theirs, mine = rent(api), rent(api)
    ledger = Ledger(tmp_path / "ledger.jsonl", api_url=sim.url)
    ledger._append({"event": "rented", "id": theirs, "target": "basic_kobuki",
                    "api_url": sim.url, "run": "r", "token_sha256": "0" * 64})
    ledger._append({"event": "rented", "id": mine, "target": "basic_kobuki",
                    "api_url": sim.url, "run": "r", "token_sha256": api.token_sha256()})
    error, lines = sweep(api, ledger)
    assert error is None
    assert status(api, theirs) == "READY", f"the sweep ended {theirs}: {lines}"
    assert status(api, mine) not in LIVE
    assert (f"rerobots sweep: {theirs} (basic_kobuki) skipped: rented with another API token "
            "(sweep with that token)") in lines
