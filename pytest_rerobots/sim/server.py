"""The simulator's HTTP server: werkzeug's threaded WSGI server with limits of its own.

Any local user can reach the simulator without a token, so what one connection may cost is
bounded (:class:`ServerLimits`, documented in the docs' security notes, docs/security.md):

- a request body past ``max_body`` bytes is a 413 (checked on ``Content-Length`` before
  anything is read, and while reading a chunked body), and JSON nested deeper than
  ``max_json_depth`` is a 400 (both in :mod:`.api`); after a 413, werkzeug reads and
  discards what the client still sends, so that it sees the answer, here in reads of at
  most :data:`DRAIN_CHUNK` bytes (werkzeug's own are 10 MB), then hangs up;
- a connection silent for ``idle_timeout`` seconds is closed (the socket's timeout), and so is
  one that has not delivered a whole request (line, headers and body) ``request_timeout``
  seconds after it began, however slowly it trickles (a reaper thread);
- at most ``max_connections`` connections are open at once: the next one closes the oldest
  that is not being answered (idle or still sending its request), so idle or slow
  connections cannot hold every descriptor and thread while callers wait;
- ``X-Forwarded-For`` is believed only with ``trust_forwarded_for`` (off by default), and
  ``rate_table_max`` bounds the per-address rate windows (:mod:`.accounts`).

Connections are kept alive, as the real service's are: werkzeug's handler ends every
connection after one answer (``Connection: close``), so that every call would pay a TCP
connection on both ends and a thread of the server's. :class:`LimitedHandler` leaves out
that header, and keeps the connection for the next request, when the request was HTTP/1.1,
did not ask to close, had no chunked body and its body was read to the end (so the next
request begins at the next byte); otherwise it closes as before.

werkzeug's server is kept (rather than waitress or cheroot) because the lost-response fault
needs the connection's socket in the WSGI environment (``werkzeug.socket``), and because a
threaded server with these limits answers as fast as before (``bench/sim_limits.py``).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from ..errors import ConfigurationError

__all__ = ["DRAIN_CHUNK", "LimitedServer", "ServerLimits"]

#: Largest read while discarding the rest of a refused body (werkzeug makes at most 1000).
DRAIN_CHUNK = 64 * 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one caller may cost the simulator; the defaults suit any test suite."""

    #: Largest request body, in bytes; past it, 413.
    max_body: int = 1024 * 1024
    #: Deepest nesting of arrays and objects in a JSON body; past it, 400.
    max_json_depth: int = 64
    #: Seconds a connection may stay silent (between requests, or mid-request).
    idle_timeout: float = 30.0
    #: Seconds from the start of a request to its last body byte.
    request_timeout: float = 30.0
    #: Connections open at once; one more closes the oldest.
    max_connections: int = 256
    #: Take the caller's address from ``X-Forwarded-For`` (rate limits, default firewall rule).
    trust_forwarded_for: bool = False
    #: Rate windows kept per caller address or token; the oldest go first.
    rate_table_max: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_body", "max_json_depth", "max_connections", "rate_table_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"simulator limit {name}: expected a positive "
                                         f"integer, got {value!r}")
        for name in ("idle_timeout", "request_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"simulator limit {name}: expected a positive "
                                         f"number of seconds, got {value!r}")
        if not isinstance(self.trust_forwarded_for, bool):
            raise ConfigurationError("simulator limit trust_forwarded_for: expected true or "
                                     f"false, got {self.trust_forwarded_for!r}")


class LimitedHandler(WSGIRequestHandler):
    """A handler whose socket times out after the server's ``idle_timeout`` and whose
    requests carry a deadline the server's reaper enforces."""

    server: LimitedServer

    def setup(self) -> None:
        """Apply the idle timeout to the connection's socket; wrap its reader."""
        super().setup()
        # On a kept-alive connection, a write waiting for the ACK of the one before would
        # wait out the client's delayed ACK (40 ms), as Nagle's algorithm has it.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection.settimeout(self.server.limits.idle_timeout)
        self.rfile = reader = _Reader(self.rfile)  # type: ignore[assignment]
        self.server.track_reader(self.connection, reader)

    def handle_one_request(self) -> None:
        """Read and answer one request, under the request deadline until its body is read."""
        self.rfile.consumed = False  # type: ignore[attr-defined]
        self.server.begin_request(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.end_request(self.connection)

    def send_header(self, keyword: str, value: str) -> None:
        """Send a header; werkzeug's ``Connection: close`` only if the connection cannot
        serve another request (see the module docstring)."""
        if (keyword.lower() == "connection" and value.lower() == "close"
                and self._reusable()):
            return
        super().send_header(keyword, value)

    def _reusable(self) -> bool:
        """Whether the next request on this connection can be read after this answer."""
        reader = self.rfile
        return (self.request_version == "HTTP/1.1" and not self.close_connection
                and getattr(reader, "consumed", False)
                and "Transfer-Encoding" not in self.headers
                and not self.server.closing)


class LimitedServer(ThreadedWSGIServer):
    """werkzeug's threaded server, with the connection limits of :class:`ServerLimits`."""

    def __init__(self, host: str, port: int, app: Any, limits: ServerLimits,
                 handler: type[LimitedHandler]) -> None:
        self.limits = limits
        # (A condition: :meth:`wait_quiet` waits on it for the answers to end.)
        self._conn_lock = threading.Condition(threading.Lock())
        # Open connections, oldest first, each with its request deadline (None: not reading).
        self._conns: collections.OrderedDict[socket.socket, float | None] = (
            collections.OrderedDict())
        # Those whose request is being answered: closed last.
        self._answering: set[socket.socket] = set()
        self._readers: dict[socket.socket, _Reader] = {}
        self._closing = threading.Event()
        super().__init__(host, port, app, handler=handler)
        self._reaper = threading.Thread(target=self._reap, name="rerobots-sim-reaper",
                                        daemon=True)
        self._reaper.start()

    # ------------------------------------------------------------------ connections

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the new connection, close the oldest past ``max_connections``, serve it."""
        evicted: list[socket.socket] = []
        with self._conn_lock:
            self._conns[request] = None
            excess = len(self._conns) - self.limits.max_connections
            if excess > 0:
                idle = [s for s in self._conns if s not in self._answering and s is not request]
                busy = [s for s in self._conns if s in self._answering]
                for sock in (idle + busy)[:excess]:
                    del self._conns[sock]
                    self._answering.discard(sock)
                    evicted.append(sock)
        for sock in evicted:
            log.info("closing the oldest connection: %d are open", self.limits.max_connections)
            _hang_up(sock)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget a connection as it closes."""
        with self._conn_lock:
            self._conns.pop(request, None)
            self._answering.discard(request)
            self._readers.pop(request, None)
            if not self._answering:
                self._conn_lock.notify_all()
        super().shutdown_request(request)

    def begin_request(self, sock: socket.socket) -> None:
        """A request starts on ``sock``: it must be read within ``request_timeout``."""
        with self._conn_lock:
            if sock in self._conns:
                self._conns[sock] = time.monotonic() + self.limits.request_timeout

    def body_read(self, sock: socket.socket | None) -> None:
        """The request on ``sock`` is read to its end: no deadline while it is answered,
        and nothing of it is left to discard."""
        if sock is None:
            return
        with self._conn_lock:
            if sock in self._conns:
                self._conns[sock] = None
                self._answering.add(sock)
            reader = self._readers.get(sock)
        if reader is not None:
            reader.consumed = True

    @property
    def closing(self) -> bool:
        """Whether the server is closing (no connection is kept for another request)."""
        return self._closing.is_set()

    def end_request(self, sock: socket.socket) -> None:
        """The request on ``sock`` is answered (or the connection ended)."""
        with self._conn_lock:
            self._answering.discard(sock)
            if sock in self._conns:
                self._conns[sock] = None
            if not self._answering:
                self._conn_lock.notify_all()

    def wait_quiet(self, timeout: float) -> None:
        """Wait until no request is being answered, at most ``timeout`` seconds: work that
        can wait (stopping a host) lets the answers in flight go first."""
        with self._conn_lock:
            self._conn_lock.wait_for(lambda: not self._answering, timeout)

    def track_reader(self, sock: socket.socket, reader: _Reader) -> None:
        """Remember the reader of ``sock``, for :meth:`refused_body`."""
        with self._conn_lock:
            self._readers[sock] = reader

    def refused_body(self, sock: socket.socket | None) -> None:
        """The body on ``sock`` was refused: what is left of it is read in small chunks."""
        with self._conn_lock:
            reader = self._readers.get(sock) if sock is not None else None
        if reader is not None:
            reader.cap = DRAIN_CHUNK

    def open_connections(self) -> int:
        """How many connections are open now."""
        with self._conn_lock:
            return len(self._conns)

    def _reap(self) -> None:
        interval = min(0.25, self.limits.request_timeout / 4)
        while not self._closing.wait(interval):
            now = time.monotonic()
            with self._conn_lock:
                late = [s for s, deadline in self._conns.items()
                        if deadline is not None and now >= deadline]
                for sock in late:
                    self._conns[sock] = None
            for sock in late:
                log.info("closing a connection whose request took over %.1f s",
                         self.limits.request_timeout)
                _hang_up(sock)

    def server_close(self) -> None:
        """Stop the reaper, close the listening socket and hang up every open connection
        (a kept-alive one waits for its next request in a thread of its own)."""
        self._closing.set()
        super().server_close()
        with self._conn_lock:
            open_now = list(self._conns)
        for sock in open_now:
            _hang_up(sock)


def _hang_up(sock: socket.socket) -> None:
    """End a connection from outside its thread: its reads return EOF, its thread ends."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Reader:
    """A connection's buffered reader, whose reads can be capped (once a body is refused)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        #: Largest read, once set; ``None`` passes every read through.
        self.cap: int | None = None
        #: The current request is read to its end (its body included): a read finds
        #: nothing more of it. werkzeug discards "what the client still sends" after each
        #: answer; on a kept-alive connection that would be the next request.
        self.consumed = False

    def read(self, size: int | None = -1) -> bytes:
        """Read as the wrapped reader does, at most :attr:`cap` bytes once it is set;
        nothing once the request is :attr:`consumed`."""
        if self.consumed:
            return b""
        cap = self.cap
        if cap is not None and (size is None or size < 0 or size > cap):
            size = cap
        return bytes(self._raw.read(size))

    def readline(self, size: int | None = -1) -> bytes:
        """One line, as the wrapped reader reads it (request and header lines)."""
        return bytes(self._raw.readline(size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)
