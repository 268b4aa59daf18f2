"""``rerobots-sim`` (also ``python -m pytest_rerobots.sim``): run the simulator until stopped.

Once serving it prints two lines a shell can ``eval`` or a CI step can append to
``$GITHUB_ENV``::

    REROBOTS_API_URL=http://127.0.0.1:8666
    REROBOTS_API_TOKEN=...

SIGINT and SIGTERM stop it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from ..errors import ConfigurationError
from . import SSH_BACKENDS, Simulator
from .catalog import PROFILES


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
    parser.add_argument("--token", default=None,
                        help="the default user's API token (default: a random one)")
    parser.add_argument("--ssh-backend", choices=SSH_BACKENDS, default="asyncssh",
                        help="how instances serve SSH (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


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
        with Simulator(args.config, host=args.host, port=args.port, token=args.token,
                       ssh_backend=args.ssh_backend) as sim:
            print(f"REROBOTS_API_URL={sim.url}", flush=True)
            print(f"REROBOTS_API_TOKEN={sim.token}", flush=True)
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
