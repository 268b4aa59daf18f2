"""The commands that run instead of tests: ``pytest --rerobots-sweep``,
``--rerobots-list`` and ``--rerobots-rent-ahead``, each of which exits without collecting.
The plugin's ``pytest_cmdline_main`` picks one and hands it the resolved settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .errors import ConfigurationError
from .ledger import Ledger
from .settings import Settings


def sweep(settings: Settings) -> int:
    """``pytest --rerobots-sweep``: end every live instance in the ledger."""
    assert settings.ledger is not None
    ledger = Ledger(settings.ledger)
    from .client import RerobotsClient  # lazily: requests loads only for a sweep
    from .sweep import sweep

    with RerobotsClient(token=settings.token, api_url=settings.api_url, ignore_env=True) as api:
        try:
            failed = sweep(api, ledger, print)
        except ConfigurationError as exc:  # a ledger or kept directory another user can write
            raise pytest.UsageError(str(exc)) from None
    return 1 if failed else 0


def listing(settings: Settings) -> int:
    """``pytest --rerobots-list``: print what can be rented."""
    from . import listing  # lazily: it loads the client (requests)

    try:
        return listing.main(settings)
    except ConfigurationError as exc:
        raise pytest.UsageError(str(exc)) from None


def rent_ahead(config: pytest.Config, settings: Settings, cache_dir: Path) -> int:
    """``pytest --rerobots-rent-ahead [TYPE...]`` (see :mod:`.ahead`); no collection.
    ``cache_dir``: pytest's cache dir, made (with its ``.gitignore``) if the ledger is
    the first thing written under it."""
    if settings.sweep or config.getoption("rerobots_list"):
        raise pytest.UsageError("--rerobots-rent-ahead: not with --rerobots-sweep or "
                                "--rerobots-list")
    if settings.sim:
        raise pytest.UsageError("--rerobots-rent-ahead: the embedded simulator "
                                "(--rerobots-sim) ends with its process; rent ahead from "
                                "an API that outlives it (REROBOTS_API_URL)")
    if settings.secret is None:
        raise pytest.UsageError("--rerobots-rent-ahead: no rerobots API token: set "
                                "REROBOTS_API_TOKEN or pass --rerobots-token-file")
    # The types named after the option (pytest takes them for paths; nothing is collected).
    from_args = getattr(config, "args_source", None) == pytest.Config.ArgsSource.ARGS
    names = list(config.args) if from_args else []
    from .ahead import rent_ahead  # lazily: it loads the client (requests)
    from .client import RerobotsClient

    assert settings.ledger is not None
    _prepare_cache_dir(cache_dir, settings.ledger)
    with RerobotsClient(token=settings.token, api_url=settings.api_url,
                        ignore_env=True) as api:
        try:
            return rent_ahead(api, settings, names, checkout=str(config.rootpath))
        except ConfigurationError as exc:
            raise pytest.UsageError(str(exc)) from None


def _prepare_cache_dir(cache_dir: Path, ledger: Path) -> None:
    """Before the ledger is first written under pytest's cache dir, make that dir with
    the ``.gitignore`` pytest would give it (pytest adds it only to a dir it makes)."""
    if cache_dir in ledger.parents and not cache_dir.exists():
        cache_dir.mkdir(parents=True)
        (cache_dir / ".gitignore").write_text("# Created by pytest automatically.\n*\n")
