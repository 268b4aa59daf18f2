"""The simulated robot hosts: real SSH servers on loopback, one per instance (the 'sim' extra).

:class:`HostManager` (:mod:`.manager`) starts and stops them; each host (:mod:`.host`) is
served by one of two backends, :mod:`.asyncssh_backend` (in-process, the default) or
:mod:`.openssh_backend` (``/usr/sbin/sshd -i`` per admitted connection), and runs its
commands in a bubblewrap sandbox of its own (:mod:`.sandbox`) where the machine can make
one; :mod:`.processes` holds the process utilities both use to leave nothing running.
"""

from __future__ import annotations

from ..hostproto import HostInfo
from .manager import BACKENDS, HostManager
from .openssh_backend import SSHD

__all__ = ["BACKENDS", "SSHD", "HostInfo", "HostManager"]
