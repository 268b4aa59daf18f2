"""The OpenSSH backend: ``sshd -i`` for each connection the firewall admitted.

No sshd listens anywhere: the host's listener (see :mod:`.host`) shows every connection to
the firewall and hands an accepted socket, as its stdin and stdout, to a fresh ``sshd -i``
(inetd mode), inside the robot's sandbox when it has one (:mod:`.sandbox`), so that no sshd
can be reached except through the rule check. A ``ForceCommand`` wrapper
gives commands and ``sftp-server`` the host's directory and ``HOME``. When this process is not
root, sshd can only log in the user running it: :attr:`OpensshSetup.login_user` names the
user that works (``root`` whenever we are root, which is how CI runs).
"""

from __future__ import annotations

import asyncio
import collections
import os
import pathlib
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ConfigurationError, RerobotsError
from .host import SFTP_SERVERS, Host, HostContext, find_sftp_server, reset
from .processes import (
    MARKER_VAR,
    cmdline,
    descendants,
    killpg,
    reap,
    signal_all,
    subprocess_exec,
)

__all__ = ["SSHD", "OpensshHost", "OpensshSetup"]

SSHD = "/usr/sbin/sshd"


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
# Private sshd -i of one simulated rerobots host; written by pytest_rerobots.sim.hosts.
HostKey {private}/host_key
PidFile none
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
    """OpenSSH's ``sshd -i`` for each connection the firewall admits."""

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
        self._config = ""
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._sshds: set[asyncio.subprocess.Process] = set()

    async def _start_server(self) -> None:
        if any(c in str(self.directory) for c in '"\\\n'):
            raise ConfigurationError(
                f"the openssh backend cannot quote the host directory {str(self.directory)!r} "
                "in sshd_config; choose a root without quotes, backslashes or newlines"
            )
        if self.sandbox is not None:
            # The robot's own /run: sshd there reads its files and keeps its privilege
            # separation directory, and nothing of it lies among the runner's files.
            inside = "/run/rerobots-sshd"
            private = self.sandbox.outside(inside)
            private.mkdir(mode=0o700)
            self.sandbox.outside("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        else:
            private = pathlib.Path(tempfile.mkdtemp(prefix="rerobots-sshd-"))
            inside = str(private)
            self.context.leftovers.dirs.add(private)
            if os.geteuid() == 0:
                # sshd refuses to start without its privilege separation directory,
                # which only the init system normally creates.
                pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._private = private
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
        self._config = f"{inside}/sshd_config"
        (private / "sshd_config").write_text(
            _SSHD_CONFIG.format(
                private=inside,
                user=self.setup.login_user,
                sftp_server=self.setup.sftp_server,
                home=self.directory,
                marker_var=MARKER_VAR,
                marker=self.marker,
                extra=self.setup.sshd_options,
            )
        )
        # Check the configuration once, so that a broken one fails the start, not a login.
        check = await asyncio.create_subprocess_exec(
            *self.argv(SSHD, "-t", "-f", self._config),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env(), start_new_session=True)
        out, _ = await check.communicate()
        if check.returncode != 0:
            raise RerobotsError(f"sshd for instance {self.instance_id} did not start:\n"
                                + out.decode(errors="replace").strip())

    async def _serve(self, sock: socket.socket) -> None:
        try:
            transport, proc = await subprocess_exec(
                *self.argv(SSHD, "-i", "-e", "-f", self._config),
                stdin=sock.fileno(), stdout=sock.fileno(), stderr=subprocess.PIPE,
                env={**self.env(), "HOME": str(self.directory)},
                start_new_session=True,
            )
        except OSError as exc:
            self.context.record_error(exc)
            reset(sock)
            return
        sock.close()  # sshd holds it now
        self._sshds.add(proc)
        self.context.leftovers.pids.add(proc.pid)
        try:
            assert proc.stderr is not None
            # sshd -e logs to stderr; a full pipe would stall it.
            while line := await proc.stderr.readline():
                self._log.append(line.decode(errors="replace").rstrip())
        finally:
            await reap(transport, proc)
            self._sshds.discard(proc)
            self.context.leftovers.pids.discard(proc.pid)

    async def _close_connections(self) -> None:
        sshds = list(self._sshds)
        # An sshd's session processes lead sessions of their own; the marker finds those.
        children = [pid for proc in sshds for pid in descendants(proc.pid)]
        for proc in sshds:
            killpg(proc.pid, signal.SIGKILL)
        signal_all([pid for pid in children if "sshd" in cmdline(pid)], signal.SIGKILL)

    async def _freeze_connections(self) -> None:
        # A stopped sshd neither reads nor writes; its socket stays open. Stopping kills
        # it (SIGKILL works on a stopped process).
        for proc in list(self._sshds):
            for pid in (proc.pid, *descendants(proc.pid)):
                if pid == proc.pid or "sshd" in cmdline(pid):
                    signal_all([pid], signal.SIGSTOP)

    async def _stop_server(self) -> None:
        sshds = list(self._sshds)
        if sshds:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in sshds], timeout=5)

    def _cleanup(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self.context.leftovers.dirs.discard(self._private)


def _check_openssh() -> None:
    if not os.access(SSHD, os.X_OK):
        raise ConfigurationError(
            f"the openssh host backend needs {SSHD}, which is missing "
            "(Debian: apt-get install openssh-server); use the asyncssh backend instead"
        )


def _sftp_server() -> str:
    path = find_sftp_server()
    if path is None:
        raise ConfigurationError(
            "the openssh host backend needs OpenSSH's sftp-server "
            f"(looked in {', '.join(SFTP_SERVERS)})"
        )
    return path


def _sshd_version_options() -> str:
    """Options that only some sshd versions know."""
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    # OpenSSH 9.8 penalises sources that fail to log in; sshd -i sees no real peer
    # here, so one wrong key could lock everyone out.
    return "PerSourcePenalties no\n" if version >= (9, 8) else ""
