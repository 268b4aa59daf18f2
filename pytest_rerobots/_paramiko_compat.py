"""What :mod:`pytest_rerobots.ssh` needs from paramiko beyond its documented API.

Kept in this one module so that a paramiko release that moves these internals
breaks one small file, not the SSH code, and so that the upper bound on paramiko
in ``pyproject.toml`` has an obvious reason. Each piece was checked against
paramiko 3.4.1 (the lowest allowed; CI runs it), 4.0 and 5.1, where it is the same:

* **exit-signal.** OpenSSH reports a command that died of a signal with an
  ``exit-signal`` channel request and no ``exit-status``. paramiko ignores that
  request, so ``Channel.exit_status`` stays -1. There is no hook for channel
  requests on the client side: ``Transport`` dispatches incoming channel
  messages through its class attribute ``_channel_handler_table``, which maps
  ``MSG_CHANNEL_REQUEST`` to ``Channel._handle_request``. :func:`transport_factory`
  makes transports whose table sends that message to :func:`handle_channel_request`
  first; everything but ``exit-signal`` still goes to paramiko's handler.
* **Waking on output.** ``Channel.in_buffer`` and ``in_stderr_buffer`` (paramiko's
  ``BufferedPipe``) can set a ``threading.Event`` when data or EOF arrives, which
  is how paramiko's own ``Channel.fileno()`` works. Waiting on one event for both
  streams lets one thread read stdout and stderr with no polling interval.
* **Waiting for the exit status with a timeout.** ``Channel.recv_exit_status()``
  waits without one; ``Channel.status_event`` is the event behind it.

``transport_factory`` is a function rather than the ``Transport`` subclass itself:
``SSHClient.connect`` calls it with keyword arguments that differ between releases
(``gss_kex`` and ``gss_deleg_creds`` up to 4.x, not in 5.x), and it passes on
whatever it is given.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

__all__ = ["handle_channel_request", "transport_factory", "wait_for_exit_status",
           "wake_on_output"]


def handle_channel_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """Turn an ``exit-signal`` into exit status ``128 + n``, as a shell reports a
    command killed by signal ``n``; hand every other request to paramiko."""
    start = m.packet.tell()
    if m.get_text() == "exit-signal":
        m.get_boolean()  # want_reply: never set for exit-signal
        name = m.get_text()
        try:
            chan.exit_status = 128 + signal.Signals["SIG" + name].value
        except KeyError:
            chan.exit_status = 128  # a signal this platform has no number for
        chan.status_event.set()
        return
    m.packet.seek(start)  # paramiko's handler reads the request from its start
    paramiko.Channel._handle_request(chan, m)  # type: ignore[attr-defined]  # private


class _Transport(paramiko.Transport):
    """paramiko's Transport, with :func:`handle_channel_request` for channel requests."""

    _channel_handler_table = {  # noqa: RUF012 (a class-level dispatch table, as in paramiko)
        **paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]  # private
        MSG_CHANNEL_REQUEST: handle_channel_request,
    }


def transport_factory(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """For ``SSHClient.connect(transport_factory=...)``: a Transport that maps
    ``exit-signal`` to an exit status."""
    return _Transport(sock, **kwargs)


def wake_on_output(chan: paramiko.Channel, event: threading.Event) -> None:
    """Have ``event`` set whenever stdout or stderr data, or EOF, arrives on ``chan``."""
    chan.in_buffer.set_event(event)
    chan.in_stderr_buffer.set_event(event)


def wait_for_exit_status(chan: paramiko.Channel, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: for ever) for the exit status; True once
    ``chan.exit_status`` holds it (-1 when the channel closed without one)."""
    return chan.status_event.wait(timeout)
