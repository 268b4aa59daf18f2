"""``rerobots-sim`` (also ``python -m pytest_rerobots.sim``): run the simulator until stopped.

Once serving it prints two lines a shell can ``eval`` or a CI step can append to
``$GITHUB_ENV``::

    REROBOTS_API_URL=http://127.0.0.1:8666
    REROBOTS_API_TOKEN=...

With ``--export`` they read ``export REROBOTS_API_URL=...``, for a shell to take as they are
(``eval "$(rerobots-sim --export | head -2)"`` in a script, or pasted into a terminal);
``--env-file PATH`` also writes them, as ``NAME=value`` lines, to a file only its owner can
read (``set -a; . PATH`` in a shell, or ``env_file`` of a container).

The default user's token is random unless chosen, from a file (``--token-file PATH``, its
first line) or from ``REROBOTS_SIM_TOKEN`` in the environment; never on the command line,
where every local user can read it (``/proc/<pid>/cmdline``), so ``--token`` is refused.
(Not ``REROBOTS_API_TOKEN``: that may hold a real token, which this would print.)

SIGINT and SIGTERM stop it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from ..errors import ConfigurationError
from . import SSH_BACKENDS, Simulator
from .catalog import PROFILES
from .server import ServerLimits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerobots-sim",
        description="Serve a local simulator of the rerobots API on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="loopback address (default %(default)s)")
    parser.add_argument("--port", type=int, default=8666,
                        help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--config", metavar="FILE|PROFILE", default=None,
                        help="TOML catalog, which adds to the built-in one, or the name of a "
                             "built-in profile: " + ", ".join(sorted(PROFILES))
                             + " (default: the built-in catalog)")
    parser.add_argument("--token-file", metavar="PATH", default=None,
                        help="file whose first line is the default user's API token (default: "
                             f"${TOKEN_ENV} if set, else a random token)")
    # Refused, with the two ways that keep the token off the command line.
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trust-forwarded-for", action="store_true",
                        help="take the caller's address from X-Forwarded-For (only behind a "
                             "trusted proxy on this machine; default: the socket's address)")
    parser.add_argument("--ssh-backend", choices=SSH_BACKENDS, default="asyncssh",
                        help="how instances serve SSH (default %(default)s)")
    defaults = ServerLimits()
    parser.add_argument("--max-body", type=int, metavar="BYTES", default=defaults.max_body,
                        help="largest request body; past it, 413 (default %(default)s)")
    parser.add_argument("--max-connections", type=int, metavar="N",
                        default=defaults.max_connections,
                        help="connections open at once; one more closes the oldest "
                             "(default %(default)s)")
    parser.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                        default=defaults.idle_timeout,
                        help="close a connection silent this long (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, metavar="SECONDS",
                        default=defaults.request_timeout,
                        help="close a connection whose request is not read this long after "
                             "it began (default %(default)s)")
    parser.add_argument("--export", action="store_true",
                        help="print 'export REROBOTS_API_URL=...' lines, for a shell to take "
                             "as they are")
    parser.add_argument("--env-file", metavar="PATH", default=None,
                        help="also write the two lines to PATH (mode 0600), for "
                             "'set -a; . PATH' or a container's env_file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


#: The environment variable a chosen token may come from. Not REROBOTS_API_TOKEN, which may
#: hold a real token: the simulator prints the one it uses.
TOKEN_ENV = "REROBOTS_SIM_TOKEN"  # noqa: S105 (a variable name)


def _chosen_token(args: argparse.Namespace) -> str | None:
    """The token from ``--token-file`` or the environment; ``None`` for a random one."""
    if args.token is not None:
        raise ConfigurationError(
            "--token is not accepted: a command line is readable by every local user. Put "
            f"the token in a file (--token-file PATH) or in the environment ({TOKEN_ENV})")
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"--token-file: cannot read {args.token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigurationError(f"--token-file: {args.token_file} has no token on its "
                                     "first line")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _write_env_file(path: str, lines: list[str]) -> None:
    """Write ``lines`` to ``path``, readable by its owner only (it holds the token)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
            handle.write("".join(f"{line}\n" for line in lines))
    except OSError as exc:
        raise ConfigurationError(f"--env-file: cannot write {path}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        token = _chosen_token(args)
        with Simulator(args.config, host=args.host, port=args.port, token=token,
                       ssh_backend=args.ssh_backend,
                       limits=ServerLimits(
                           max_body=args.max_body, max_connections=args.max_connections,
                           idle_timeout=args.idle_timeout, request_timeout=args.request_timeout,
                           trust_forwarded_for=args.trust_forwarded_for)) as sim:
            lines = [f"REROBOTS_API_URL={sim.url}", f"REROBOTS_API_TOKEN={sim.token}"]
            if args.env_file is not None:
                _write_env_file(args.env_file, lines)
            for line in lines:
                print(f"export {line}" if args.export else line, flush=True)
            # A timed wait keeps the main thread responsive to signals on every platform.
            while not stop.wait(0.5):
                sim.check()
    except ConfigurationError as exc:
        print(f"rerobots-sim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
