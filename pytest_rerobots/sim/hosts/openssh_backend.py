"""The OpenSSH backend: a private ``sshd -D -e`` per host, behind a firewall proxy.

Each host runs OpenSSH's own sshd on a private port; the host's listener (see :mod:`.host`)
admits connections through the firewall and splices them to sshd, which then sees every
connection as coming from 127.0.0.1 (which does not matter here). A ``ForceCommand`` wrapper
gives commands and ``sftp-server`` the host's directory and ``HOME``. When this process is not
root, sshd can only log in the user running it: :attr:`OpensshSetup.login_user` names the
user that works (``root`` whenever we are root, which is how CI runs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import pathlib
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ConfigurationError, RerobotsError
from .host import Host, HostContext
from .processes import (
    CHUNK,
    MARKER_VAR,
    cmdline,
    descendants,
    reap,
    signal_all,
    subprocess_exec,
)

__all__ = ["SSHD", "OpensshHost", "OpensshSetup"]

SSHD = "/usr/sbin/sshd"
# Debian, Fedora/RHEL and Arch put OpenSSH's sftp-server in one of these.
_SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)
_START_TIMEOUT = 15.0  # seconds for sshd to start listening


@dataclass(frozen=True)
class OpensshSetup:
    """What this machine's OpenSSH needs, found once per manager by :meth:`probe`."""

    #: The user that can log in: ``root``, or the user running a non-root sshd.
    login_user: str
    #: The path of OpenSSH's ``sftp-server``.
    sftp_server: str
    #: sshd_config lines that only some sshd versions know.
    sshd_options: str

    @classmethod
    def probe(cls) -> OpensshSetup:
        """Check for sshd and sftp-server; a missing one is a :class:`ConfigurationError`."""
        _check_openssh()
        login_user = "root" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        return cls(login_user, _sftp_server(), _sshd_version_options())


_SESSION_SCRIPT = """\
#!/bin/sh
# sshd runs this for every exec, shell and sftp request (ForceCommand): it puts
# the session in the host's directory with HOME there, whatever passwd says.
{marker_var}={marker}; export {marker_var}
HOME={home}; export HOME
cd "$HOME" || exit 1
if [ -z "${{SSH_ORIGINAL_COMMAND+set}}" ]; then
    /bin/sh
else
    /bin/sh -c "$SSH_ORIGINAL_COMMAND"
fi
# Not exec: the shell reports a command killed by signal n as 128+n.
exit $?
"""

_SSHD_CONFIG = """\
# Private sshd of one simulated rerobots host; written by pytest_rerobots.sim.hosts.
Port {port}
ListenAddress 127.0.0.1
HostKey {private}/host_key
PidFile {private}/sshd.pid
AuthorizedKeysFile {private}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
UseDNS no
PermitTTY yes
PrintMotd no
PrintLastLog no
X11Forwarding no
# Local forwarding (direct-tcpip) as a real robot allows it: Instance.forward().
AllowTcpForwarding local
AllowAgentForwarding no
PermitTunnel no
PermitUserEnvironment no
LoginGraceTime 30
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp {sftp_server}
ForceCommand {private}/session
# The login shell runs the ForceCommand. Bash run by sshd sources ~/.bashrc, so
# HOME must already be the host's directory here (its .bashrc, if any, as on a
# real host; never the .bashrc of whoever runs the simulator).
SetEnv "HOME={home}" "{marker_var}={marker}"
{extra}"""


class OpensshHost(Host):
    """A private OpenSSH sshd behind a firewall-enforcing proxy."""

    def __init__(
        self,
        context: HostContext,
        setup: OpensshSetup,
        instance_id: str,
        directory: pathlib.Path,
        authorized: list[str],
        firewall: Callable[[str], str],
    ) -> None:
        super().__init__(context, instance_id, directory, authorized, firewall)
        self.setup = setup
        self._private: pathlib.Path | None = None
        self._sshd: asyncio.subprocess.Process | None = None
        self._sshd_transport: asyncio.SubprocessTransport | None = None
        self._sshd_port = 0
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._links: set[asyncio.StreamWriter] = set()

    async def _start_server(self) -> None:
        if any(c in str(self.directory) for c in '"\\\n'):
            raise ConfigurationError(
                f"the openssh backend cannot quote the host directory {str(self.directory)!r} "
                "in sshd_config; choose a root without quotes, backslashes or newlines"
            )
        private = pathlib.Path(tempfile.mkdtemp(prefix="rerobots-sshd-"))
        self._private = private
        self.context.leftovers.dirs.add(private)
        key_file = private / "host_key"
        key_file.write_bytes(self.key_pem)
        key_file.chmod(0o600)  # sshd refuses readable host keys whatever StrictModes says
        (private / "authorized_keys").write_text("".join(k + "\n" for k in self.authorized))
        session = private / "session"
        session.write_text(
            _SESSION_SCRIPT.format(
                marker_var=MARKER_VAR,
                marker=shlex.quote(self.marker),
                home=shlex.quote(str(self.directory)),
            )
        )
        session.chmod(0o755)
        if os.geteuid() == 0:
            # sshd refuses to start without its privilege separation directory,
            # which only the init system normally creates.
            pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # a port picked free can be taken before sshd binds it
            self._sshd_port = _free_port()
            config = private / "sshd_config"
            config.write_text(
                _SSHD_CONFIG.format(
                    port=self._sshd_port,
                    private=private,
                    user=self.setup.login_user,
                    sftp_server=self.setup.sftp_server,
                    home=self.directory,
                    marker_var=MARKER_VAR,
                    marker=self.marker,
                    extra=self.setup.sshd_options,
                )
            )
            self._sshd_transport, self._sshd = await subprocess_exec(
                SSHD, "-D", "-e", "-f", str(config),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**self.env(), "HOME": str(private)},
                start_new_session=True,
            )
            self.context.leftovers.pids.add(self._sshd.pid)
            if await self._wait_listening():
                self._spawn(self._drain_log())
                return
            last_error = "\n".join(self._log)
            await self._stop_server()
            if "Address already in use" not in last_error:
                break
        raise RerobotsError(f"sshd for instance {self.instance_id} did not start:\n{last_error}")

    async def _wait_listening(self) -> bool:
        """Read sshd's log until it listens (True) or exits (False)."""
        assert self._sshd is not None and self._sshd.stderr is not None
        stderr = self._sshd.stderr

        async def _read() -> bool:
            while line := await stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self._log.append(text)
                if text.startswith("Server listening on"):
                    return True
            return False

        try:
            return await asyncio.wait_for(_read(), _START_TIMEOUT)
        except asyncio.TimeoutError:
            self._log.append(f"(no 'Server listening' within {_START_TIMEOUT:g} s)")
            return False

    async def _drain_log(self) -> None:
        # sshd -e logs every connection; a full pipe would stall it.
        assert self._sshd is not None and self._sshd.stderr is not None
        while line := await self._sshd.stderr.readline():
            self._log.append(line.decode(errors="replace").rstrip())

    async def _serve(self, sock: socket.socket) -> None:
        client_r, client_w = await asyncio.open_connection(sock=sock)
        self._links.add(client_w)
        try:
            try:
                sshd_r, sshd_w = await asyncio.open_connection("127.0.0.1", self._sshd_port)
            except OSError:
                _reset_transport(client_w)
                return
            self._links.add(sshd_w)
            await asyncio.gather(_splice(client_r, sshd_w), _splice(sshd_r, client_w))
            sshd_w.close()
            self._links.discard(sshd_w)
            client_w.close()
        finally:
            self._links.discard(client_w)

    async def _close_connections(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _stop_server(self) -> None:
        sshd, self._sshd = self._sshd, None
        transport, self._sshd_transport = self._sshd_transport, None
        if sshd is None or transport is None:
            return
        children: list[int] = []
        if sshd.returncode is None:
            # sshd's per-connection children outlive a SIGTERM to the listener
            # by design, so they are signalled by pid too.
            children = descendants(sshd.pid)
            with contextlib.suppress(ProcessLookupError):
                sshd.terminate()
            signal_all(children, signal.SIGTERM)
        reaping = asyncio.ensure_future(reap(transport, sshd))
        try:
            await asyncio.wait_for(asyncio.shield(reaping), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                sshd.kill()
            await reaping
        # Only what still is an sshd: a pid freed since may be someone else's now.
        signal_all([pid for pid in children if "sshd" in cmdline(pid)], signal.SIGKILL)
        self.context.leftovers.pids.discard(sshd.pid)

    def _cleanup(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self.context.leftovers.dirs.discard(self._private)


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


def _reset_transport(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _check_openssh() -> None:
    if not os.access(SSHD, os.X_OK):
        raise ConfigurationError(
            f"the openssh host backend needs {SSHD}, which is missing "
            "(Debian: apt-get install openssh-server); use the asyncssh backend instead"
        )


def _sftp_server() -> str:
    for path in _SFTP_SERVERS:
        if os.access(path, os.X_OK):
            return path
    raise ConfigurationError(
        "the openssh host backend needs OpenSSH's sftp-server "
        f"(looked in {', '.join(_SFTP_SERVERS)})"
    )


def _sshd_version_options() -> str:
    """Options that only some sshd versions know."""
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    # OpenSSH 9.8 penalises sources that fail to log in; behind our proxy every
    # connection comes from 127.0.0.1, so one wrong key would lock everyone out.
    return "PerSourcePenalties no\n" if version >= (9, 8) else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
