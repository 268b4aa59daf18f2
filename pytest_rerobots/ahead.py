"""Renting ahead, ``pytest --rerobots-rent-ahead``: rent the robots a later test run of this
checkout will need, and return at once, so that they start while the job installs.

::

    pytest --rerobots-rent-ahead --rerobots-wtype basic_kobuki
    pytest --rerobots-rent-ahead basic_kobuki fixed_misty2     # several types (or deployment ids)

Every type (or deployment) is checked first: a type the API does not offer, or no type at
all, is one error and nothing is rented. Then each is rented (``POST /new``, with a login
key made here) without waiting for READY, recorded in the ledger, and handed to a keeper
process (:mod:`.keep`, kind "ahead") that pings it while it starts and ends it when no run
claims it within ``--rerobots-rent-ahead-idle`` minutes. The next test run of the same
checkout (same API origin and token), CI or not, attaches to it instead of renting, and
waits only if it is not READY yet (:meth:`.Run.hold`); a robot that failed to start is
ended by that run, which rents another as it would have anyway. ``pytest
--rerobots-sweep`` ends what was rented ahead and not claimed.

A robot that cannot be rented now (busy, or an error) is left out with one line: the test
run rents it as usual. Nothing here imports pytest, and nothing loads paramiko: the
command runs before the project's own dependencies are installed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import keep
from .errors import ConfigurationError, NotFound, RerobotsError
from .ledger import Ledger
from .wire import is_uuid

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .settings import Settings

__all__ = ["Target", "rent_ahead", "targets"]

log = logging.getLogger("pytest_rerobots.ahead")

#: How long after ``POST /new`` a 404 means "not listed yet" to the keeper (s); the
#: server inserts the instance's row after it answers.
VISIBLE_WITHIN = 30.0

NO_TYPE = ("--rerobots-rent-ahead: no workspace type to rent: give --rerobots-wtype, "
           "--rerobots-deployment, or the types after it "
           "(pytest --rerobots-rent-ahead basic_kobuki fixed_misty2); nothing rented")


@dataclass(frozen=True)
class Target:
    """One robot to rent ahead: a workspace type, or one deployment (of ``wtype``)."""

    wtype: str | None
    deployment: str | None = None

    @property
    def name(self) -> str:
        """What ``POST /new`` is sent to."""
        return self.deployment or str(self.wtype)

    @property
    def label(self) -> str:
        if self.deployment:
            return f"{self.wtype or '?'} (deployment {self.deployment})"
        return str(self.wtype)


def targets(settings: Settings, names: Sequence[str]) -> list[Target]:
    """What to rent, before asking the API: ``names`` (types or deployment ids) if given,
    else ``--rerobots-wtype`` and ``--rerobots-deployment``. None is an error."""
    # Lazily, as the plugin loads this module only for the command itself.
    from .settings import _wtype

    found: list[Target] = []
    for name in names:
        if is_uuid(name):
            found.append(Target(None, name))
            continue
        try:
            found.append(Target(_wtype(name)))
        except ValueError as exc:
            raise ConfigurationError(f"--rerobots-rent-ahead: {exc}; nothing rented") from None
    if not found and (settings.wtype or settings.deployment):
        found.append(Target(settings.wtype, settings.deployment))
    if not found:
        raise ConfigurationError(NO_TYPE)
    return found


def check(api: RerobotsClient, wanted: Sequence[Target]) -> list[Target]:
    """``wanted`` with every type confirmed on offer and every deployment's type filled
    in; a :class:`.ConfigurationError` naming what does not exist (nothing is rented)."""
    checked: list[Target] = []
    offered: list[str] | None = None
    for target in wanted:
        if target.deployment is not None:
            try:
                info = api.deployment(target.deployment)
            except NotFound:
                raise ConfigurationError(f"--rerobots-rent-ahead: no deployment "
                                         f"{target.deployment}; nothing rented") from None
            wtype = str(info.get("type") or "") or None
            if target.wtype is not None and wtype is not None and wtype != target.wtype:
                raise ConfigurationError(
                    f"--rerobots-rent-ahead: deployment {target.deployment} is of type "
                    f"{wtype}, not {target.wtype}; nothing rented")
            checked.append(Target(wtype or target.wtype, target.deployment))
            continue
        if offered is None:
            offered = api.workspace_types()
        if target.wtype not in offered:
            shown = ", ".join(sorted(offered)[:20]) or "none"
            raise ConfigurationError(f"--rerobots-rent-ahead: no workspace type "
                                     f"{target.wtype!r} (on offer: {shown}); nothing rented")
        checked.append(target)
    return checked


def _login_key() -> tuple[str, str]:
    """A fresh ed25519 login key: (public key line, private key's OpenSSH text)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    text = private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption()).decode("ascii")
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    return f"{public} pytest-rerobots", text


def rent_ahead(api: RerobotsClient, settings: Settings, names: Sequence[str], *,
               checkout: str | None = None, write: Callable[[str], Any] = print) -> int:
    """Rent every target (see the module docstring) for the test runs of ``checkout``
    (default: the current directory; the plugin names pytest's rootdir, as its runs do);
    0 if all were rented ahead, 1 if some were left to the test run. A
    :class:`.ConfigurationError` (bad input) rents nothing."""
    wanted = check(api, targets(settings, names))
    assert settings.ledger is not None
    keep.check_ledger(settings.ledger)
    ledger = Ledger(settings.ledger, run_id=f"rent-ahead-{uuid.uuid4()}", api_url=api.api_url)
    store = keep.KeptStore(keep.kept_dir(settings.ledger), api_url=api.api_url,
                           token_sha256=api.token_sha256() if api.has_token else None,
                           checkout=checkout)
    idle = settings.rent_ahead_idle * 60.0

    def one(target: Target) -> tuple[bool, str]:
        public, private = _login_key()
        try:
            answer = api.new_instance(target.name, sshkey=public, expire_d=settings.lease,
                                      keepalive=True, reserve=False)
        except RerobotsError as exc:
            return False, (f"rerobots: {target.label} not rented ahead ({exc}); "
                           "the test run rents it")
        if not answer.success:  # (no reservation was asked for: cancelled, not waited on)
            try:
                api.cancel_reservation(answer.id)
            except RerobotsError as exc:
                log.warning("cannot cancel reservation %s: %s", answer.id, exc)
            return False, (f"rerobots: {target.label} is busy: not rented ahead; "
                           "the test run rents it")
        now = time.time()
        ledger.record_rented(answer.id, target.name, token_sha256=store.token_sha256)
        try:
            store.keep_ahead(answer.id, target=target.name, wtype=target.wtype,
                             deployment=target.deployment, key_text=private,
                             secret=settings.secret, interval=settings.keepalive_interval,
                             idle=idle, lease_end=now + settings.lease, ledger=ledger,
                             visible_by=now + VISIBLE_WITHIN)
        except BaseException:
            outcome = keep._end_quietly(api, answer.id)
            if not outcome.startswith("failed"):
                ledger.record_ended(answer.id, outcome, by="rent-ahead")
            raise
        ledger.record_kept(answer.id, keep.AHEAD, wtype=target.wtype,
                           deployment=target.deployment)
        return True, (f"rerobots: rented ahead {answer.id} ({target.label}); the next run "
                      f"of this checkout within {settings.rent_ahead_idle:g} min attaches to it")

    with ThreadPoolExecutor(max_workers=min(8, len(wanted)),
                            thread_name_prefix="rerobots-ahead") as pool:
        results = list(pool.map(one, wanted))
    for _, line in results:
        write(line)
    return 0 if all(ok for ok, _ in results) else 1
