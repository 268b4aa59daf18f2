"""The sweep, ``pytest --rerobots-sweep``: end every instance that the ledger holds as
live and every instance kept beside it, then forget the kept ones' files (layer 5 of
docs/contract.md, "Termination").

One place for both, because a kept instance is live in the ledger too: its keeper must be
stopped before it is ended, and a kept instance that the ledger never heard of is ended
all the same. Nothing here imports pytest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import keep, safefiles
from .ending import end_ids
from .errors import ConfigurationError
from .health import Health
from .ledger import Ledger
from .options import InstanceOptions
from .outcome import ENDED_OUTCOMES

if TYPE_CHECKING:
    from .client import RerobotsClient

__all__ = ["sweep"]


def sweep(api: RerobotsClient, ledger: Ledger, write: Callable[[str], Any]) -> int:
    """End every live instance in ``ledger`` and every instance kept beside it, writing one
    line per id. The kept ones' keepers are stopped first (they would keep them alive),
    kept instances the ledger never heard of (it was moved, or another ledger kept them)
    are ended too, and the files of every one ended are removed. The number not ended.

    A ledger or kept directory that another user could have planted or could write is
    refused (:class:`.ConfigurationError`) before anything is ended; only records of this
    API origin and token are acted on. The ``kept/`` directory of earlier versions is swept
    too, if it is this user's and safe."""
    warning = keep.check_ledger(ledger.path)
    if warning:
        write(warning)
    token = api.token_sha256() if api.has_token else None
    stores = [keep.KeptStore(keep.kept_dir(ledger.path), api_url=api.api_url,
                             token_sha256=token)]
    legacy = keep.legacy_kept_dir(ledger.path)
    try:
        os.close(safefiles.open_dir(legacy, keep.WHAT))
        stores.append(keep.KeptStore(legacy, api_url=api.api_url, token_sha256=token))
    except FileNotFoundError:
        pass
    except ConfigurationError as exc:
        write(f"rerobots sweep: {legacy} (of an earlier version) not read: {exc}")
    kept = [(store, r) for store in stores for r in store.records() if store.ours(r)]
    if api.has_token:  # (without one nothing is ended: the keepers keep them alive)
        for store in stores:
            store.stop_keepers(write)
    failed = _sweep_ledger(api, ledger, write)
    known = {r["id"] for r in ledger.records()}
    orphans = {r["id"]: r.get("wtype") or "?" for _, r in kept if r["id"] not in known}
    unended = set(orphans) if not api.has_token else set()
    if orphans and api.has_token:
        for ident, outcome in end_ids(api, orphans, ledger=ledger, by="sweep").items():
            write(f"rerobots sweep: {ident} ({orphans[ident]}) {outcome}")
            if outcome not in ENDED_OUTCOMES:
                unended.add(ident)
    failed += len(unended)
    live = {r["id"] for r in ledger.live()} | unended
    for store, record in kept:
        if record["id"] not in live:
            store.forget(record["id"])
            write(f"rerobots sweep: {record['id']} ({record.get('wtype') or '?'}): "
                  "its key and known-hosts files removed")
    try:
        forgotten = Health(ledger.path.parent).forget()
    except ConfigurationError as exc:
        # The record is a favour (where to rent first), kept beside the ledger; in a
        # directory others may write (a ledger in /tmp, which is warned about) it is
        # neither kept nor read, so there is nothing of it to forget.
        write(f"rerobots sweep: no health record forgotten: {exc}")
        forgotten = 0
    if forgotten:
        write(f"rerobots sweep: the health record of {forgotten} deployment(s) forgotten")
    return failed


def _sweep_ledger(client: RerobotsClient, ledger: Ledger, write: Callable[[str], Any]) -> int:
    """End every live instance in the ledger, writing one line per id.

    Records rented from another API origin than ``client``'s are listed and left
    alone (ending them here would answer "not found" and wrongly clear them), and so
    are those rented with another token (their ``token_sha256`` is not this token's;
    records written before rentals carried it are taken as this token's).
    Returns the number that could not be ended (0 = all done).
    """
    live = ledger.live()
    if not live:
        write(f"rerobots sweep: no live instances in {ledger.path}")
        return 0
    token = client.token_sha256() if client.has_token else None
    mine = []
    for record in live:
        where = f"rerobots sweep: {record['id']} ({record.get('target', '?')}) skipped:"
        if record.get("api_url") not in (None, "", client.api_url):
            write(f"{where} rented from {record['api_url']} (sweep with --rerobots-api-url "
                  f"{record['api_url']})")
        elif token and record.get("token_sha256") not in (None, token):
            write(f"{where} rented with another API token (sweep with that token)")
        else:
            mine.append(record)
    if mine and not client.has_token:
        for record in mine:
            write(f"rerobots sweep: {record['id']} ({record.get('target', '?')}) not ended: "
                  "no API token (set REROBOTS_API_TOKEN or pass --rerobots-token-file)")
        return len(mine)
    targets = {r["id"]: r.get("target", "?") for r in mine}
    # The service lists an instance a moment after answering POST /new: one rented just
    # now (a sweep right after --rerobots-rent-ahead, or after a run killed at once)
    # is "not found" for a while, and taking that for "gone" would leave it live.
    now = time.time()
    window = InstanceOptions().notfound_grace
    grace = {r["id"]: window - (now - float(r.get("time") or 0.0)) for r in mine
             if now - float(r.get("time") or 0.0) < window}
    results = end_ids(client, targets, ledger=ledger, by="sweep", notfound_grace=grace)
    for ident, outcome in results.items():
        write(f"rerobots sweep: {ident} ({targets[ident]}) {outcome}")
    failed = sum(1 for o in results.values() if o not in ENDED_OUTCOMES)
    write(f"rerobots sweep: {len(results) - failed} ended, {failed} failed, "
          f"{len(live) - len(mine)} skipped")
    return failed
