"""Attaching an :class:`~pytest_rerobots.instance.Instance` to one it did not rent itself.

Three kinds, each instead of a ``POST /new``: an instance another process rented
(``existing``: logged in to with the key the server generated for it), one an earlier run
kept (``kept_record``: it must be READY and answer ``true``), and one rented ahead of this
run (``pytest --rerobots-rent-ahead``: perhaps still in INIT). What they learn is written
on the instance, as :mod:`.renting` writes what a rental learns; a failure raises, and the
instance's start ends what is ours.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import paramiko

from . import ssh
from .errors import InstanceError, InstanceFailed, InstanceNotFound, MalformedResponse
from .renting import Renter, take_details

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["KEPT_CHECK_TIMEOUT", "attach_existing", "attach_kept", "private_key"]

#: Seconds to log in to a kept instance and run ``true`` on it before it counts as
#: unusable (a run then rents another).
KEPT_CHECK_TIMEOUT = 10.0


def private_key(text: str) -> paramiko.PKey:
    """A private key from its text (PEM or OpenSSH format), read in memory."""
    for cls in (paramiko.RSAKey, paramiko.Ed25519Key, paramiko.ECDSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise MalformedResponse("GET /instance/:id/sshkey: not a private key paramiko can read")


def attach_existing(inst: Instance, ident: str) -> None:
    """Use an instance another process rented (``existing``): log in with the key
    the server generated for it (``GET /instance/:id/sshkey``, kept in memory)."""
    inst.id = ident
    inst.status = "INIT"
    # Listeners learn of it as of a rented one (this process now helps hold it).
    inst._emit("rented")
    inst._keepalive.start()
    Renter(inst).wait_ready()
    if inst.options.connect:
        if inst.pkey is None:
            inst.pkey = private_key(inst.client.instance_sshkey(ident))
        inst._connect()
    inst._start_watch()


def attach_kept(inst: Instance, record: Mapping[str, Any]) -> None:
    """Use an instance an earlier run kept: one ``GET /instance`` (it must be READY),
    then log in with the key it was kept with and run ``true``. No ``POST /new`` and
    no READY wait; anything wrong raises, and start() ends it (it is ours)."""
    if record.get("kind") == "ahead":
        attach_ahead(inst, record)
        return
    ident = str(record["id"])
    inst.id = ident
    inst._rented_mono = time.monotonic()
    inst.timings.rented_at = time.time()  # (this run's share of its instance-minutes)
    if inst.private_key_text:
        inst.pkey = private_key(inst.private_key_text)
    info = inst.client.instance(ident)
    inst.details = info
    inst.status = str(info.get("status"))
    inst._emit("rented")  # the ledger and the watchdog hold it for this run now
    inst._keepalive.start()
    if inst.status != "READY":
        raise InstanceFailed(f"kept instance {ident} of {inst.label} is {inst.status}, "
                             "not READY", instance_id=ident, status=inst.status)
    take_details(inst, info)
    inst.timings.ready_at = time.time()
    if not inst.options.connect:
        return
    if inst.pkey is None:
        raise InstanceError(f"kept instance {ident}: no login key", instance_id=ident)
    assert inst.host is not None and inst.port is not None
    client = ssh.connect(inst.host, inst.port, hostkeys=inst.hostkeys, pkey=inst.pkey,
                         deadline=min(inst.options.connect_timeout, KEPT_CHECK_TIMEOUT),
                         sleep=inst._nap)
    conn = inst._connection = inst._wrap(client)
    conn.transcript = None  # (the check is no test's doing)
    result = conn.run("true", timeout=KEPT_CHECK_TIMEOUT)
    conn.transcript = inst.transcript
    if result.exit_status != 0:
        raise InstanceFailed(f"kept instance {ident}: `true` exited {result.exit_status}",
                             instance_id=ident, status=inst.status)
    inst.reused = True
    inst._start_watch()


def attach_ahead(inst: Instance, record: Mapping[str, Any]) -> None:
    """Use an instance rented ahead of this run (``pytest --rerobots-rent-ahead``),
    perhaps still in INIT: wait for READY only if it is not READY yet, then open the
    firewall and connect as after a rental of our own. A failed start raises, and
    start() ends it (it is ours); the run rents another."""
    ident = str(record["id"])
    inst.id = ident
    inst.status = "INIT"
    inst._rented_mono = time.monotonic() - max(0.0, time.time()
                                               - float(record.get("kept_at") or 0))
    if inst.private_key_text:
        inst.pkey = private_key(inst.private_key_text)
    inst._emit("rented")  # the ledger and the watchdog hold it for this run now
    inst._keepalive.start()
    try:
        info = inst.client.instance(ident)
    except InstanceNotFound:
        info = {}  # not listed yet: the READY wait allows for that
    if info.get("status") == "READY":
        inst.details, inst.status = dict(info), "READY"
        take_details(inst, info)
        inst.timings.ready_at = time.time()
    else:
        Renter(inst).wait_ready()
    inst.rented_ahead = True
    inst._open_firewall()
    if inst.options.connect:
        if inst.pkey is None:
            raise InstanceError(f"instance {ident} rented ahead: no login key",
                                instance_id=ident)
        inst._connect()
