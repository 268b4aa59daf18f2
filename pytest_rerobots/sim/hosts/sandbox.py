"""A sandbox per simulated robot: bubblewrap namespaces that a host's commands run in.

Each host gets one long-lived ``bwrap`` whose process is the init of the robot's own PID,
mount, UTS, IPC and cgroup namespaces; every command, setup command, sshd and console
emulator of the host enters those namespaces (``nsenter``) with a bounded capability set
(``setpriv``). The robot sees:

* the system read-only (``/usr`` and its merged-usr links, the rest of ``/`` is absent);
* its own writable ``/tmp``, ``/root``, ``/home``, ``/opt``, ``/var``, ``/srv``, ``/run``,
  ``/mnt`` and ``/media``: per-host directories beside the host's directory, so writes
  persist between commands and never reach the runner's files;
* its own ``/etc`` in memory, copied at its start from what others may read of the runner's
  ``/etc`` (no shadow file of the runner's, no private host keys);
* the host's directory at its own path (``HOME`` and the working directory, as without the
  sandbox), its own ``/proc``, read-only, and a minimal ``/dev`` with the catalog's serial
  devices;
* its own hostname, and an environment built from nothing of the runner's.

Killing the init ends every process of the robot (the kernel kills a PID namespace with
its init), and ``--die-with-parent`` ends it with the simulator. The network is shared
with the runner (see docs/simulator-differences.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import tty
from dataclasses import dataclass, field

from ...errors import ConfigurationError

__all__ = ["BWRAP", "PATH", "SETSID", "Sandbox", "SandboxSetup", "Serial", "make_etc_template"]

BWRAP = "/usr/bin/bwrap"
NSENTER = "/usr/bin/nsenter"
SETPRIV = "/usr/bin/setpriv"
#: util-linux's, as nsenter and setpriv: a robot's pty session leads a session of its own.
SETSID = "/usr/bin/setsid"
#: The ``PATH`` of a robot's sessions (nothing of the runner's).
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The writable directories each robot has of its own.
PRIVATE_DIRS = ("tmp", "root", "home", "opt", "var", "srv", "run", "mnt", "media")
# Where the robot's /etc is copied from at its start, inside the sandbox (read-only there).
_ETC_TEMPLATE = "/run/rerobots-etc"
_ETC_SIZE = 64 * 1024 * 1024  # bytes of memory the robot's /etc may fill
# What root keeps inside: a container runtime's usual set, without mknod and raw sockets.
# CAP_SYS_ADMIN above all stays out: it could remount the read-only system writable.
CAPS = ("chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap",
        "net_bind_service", "sys_chroot", "audit_write")
# The keeper is the namespace's init: signals from inside cannot kill it, so kill -9 -1
# on the robot ends the robot's processes but not the robot.
_KEEPER = "trap '' HUP INT TERM; while :; do sleep 3600 & wait; done"
_START_TIMEOUT = 10.0
_NS_GET_PARENT = 0xB702  # ioctl of <linux/nsfs.h>: the owning user namespace
# ioctls of <asm-generic/ioctls.h> (x86, Arm, RISC-V; other architectures number them
# otherwise, and there they fail with ENOTTY): unlock a pty's slave, open it from the master.
_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441  # Linux 4.13
# A fresh /proc still shows the kernel's own settings, and root may write many of them:
# /proc/sys/kernel/core_pattern names a program that the kernel runs as root, outside every
# namespace, when a process crashes. bwrap covers /proc/sys and the like read-only only
# where access(W_OK) says they are writable, and as root that says no (those files check
# the writer themselves), so root's robots could write them. The whole /proc is read-only
# instead, which also covers what the kernel adds later and the network's files, shared
# with the runner; a robot's writes through /proc/self/fd/N still reach the file it names.
_PROC = ("--proc", "/proc", "--remount-ro", "/proc")
# What a robot must not be able to write; the probe checks these inside its sandbox.
_KERNEL_SETTINGS = ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
                    "/proc/sysrq-trigger")


@dataclass(frozen=True)
class SandboxSetup:
    """Whether this machine can sandbox, found once per manager by :meth:`probe`."""

    #: Run the robot in a user namespace of its own (when the simulator is not root).
    userns: bool

    @classmethod
    def probe(cls) -> SandboxSetup | str:
        """The setup, or why this machine cannot sandbox (a sentence)."""
        for tool, package in ((BWRAP, "bubblewrap"), (NSENTER, "util-linux"),
                              (SETPRIV, "util-linux")):
            if not os.access(tool, os.X_OK):
                return f"{tool} is missing (Debian: apt-get install {package})"
        userns = os.geteuid() != 0
        # The same /proc as a robot's: a bwrap that cannot make it read-only cannot sandbox.
        writable = " || ".join(f"test -w {path}" for path in _KERNEL_SETTINGS)
        argv = [BWRAP, *(["--unshare-user"] if userns else []), "--unshare-pid",
                "--unshare-uts", *_system_binds(), *_PROC, "--dev", "/dev",
                "/bin/sh", "-c", f"if {writable}; then exit 3; fi"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10, check=False, env={"PATH": PATH})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap did not run: {exc}"
        if done.returncode == 3:
            return "bwrap left the kernel's settings in /proc writable inside its sandbox"
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip() or f"status {done.returncode}"
            return f"bwrap cannot make namespaces here ({why})"
        return cls(userns)


@dataclass
class Serial:
    """A pseudo-terminal: the robot opens ``path`` (the slave), the emulator drives the master."""

    path: str
    command: str
    master: int
    slave: int
    slave_name: str

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Sandbox:
    """One robot's namespaces; :meth:`start`, :meth:`argv` for each process, :meth:`stop`."""

    setup: SandboxSetup
    hostname: str
    home: pathlib.Path
    #: The runner's /etc as the robots see it (:func:`make_etc_template`, once per manager).
    etc_template: pathlib.Path
    devices: dict[str, str] = field(default_factory=dict)
    #: The init's pid (outside the namespace) and bwrap's, once started.
    pid: int = 0
    bwrap_pid: int = 0
    serials: list[Serial] = field(default_factory=list)
    _bwrap: subprocess.Popen[bytes] | None = None
    _emulators: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _fs: pathlib.Path | None = None
    _userns_fd: int = -1

    def start(self) -> None:
        """Make the private directories and devices, start the namespaces' init."""
        fs = pathlib.Path(tempfile.mkdtemp(prefix=".sandbox-", dir=self.home.parent))
        self._fs = fs
        for name in PRIVATE_DIRS:
            (fs / name).mkdir()
        (fs / "tmp").chmod(0o1777)
        for path, command in self.devices.items():
            master, slave = os.openpty()
            tty.setraw(slave)  # a serial line: no echo, no line editing
            self.serials.append(Serial(path, command, master, slave, os.ttyname(slave)))
        argv = [BWRAP, "--die-with-parent", "--unshare-pid", "--unshare-uts", "--unshare-ipc",
                "--unshare-cgroup-try", "--hostname", self.hostname, "--as-pid-1",
                "--cap-drop", "ALL", "--clearenv"]
        if self.setup.userns:
            argv += ["--unshare-user", "--uid", str(os.getuid()), "--gid", str(os.getgid())]
        argv += _system_binds()
        argv += [*_PROC, "--dev", "/dev"]
        for name in PRIVATE_DIRS:
            argv += ["--bind", str(fs / name), f"/{name}"]
        # /etc lives in memory: copying it there takes a tenth of what a disk copy takes.
        argv += ["--size", str(_ETC_SIZE), "--tmpfs", "/etc",
                 "--ro-bind", str(self.etc_template), _ETC_TEMPLATE]
        argv += ["--bind", str(self.home), str(self.home)]
        for serial in self.serials:
            argv += ["--dev-bind", serial.slave_name, serial.path]
        # bwrap tells the init's pid early, before the mounts are done; the keeper
        # then says "ready" on a second pipe once it runs inside the finished sandbox.
        read_info, write_info = os.pipe()
        read_ready, write_ready = os.pipe()
        try:
            keeper = (f"cp -R -P --preserve=mode,timestamps {_ETC_TEMPLATE}/. /etc/ && "
                      f"echo {shlex.quote(self.hostname)} > /etc/hostname && "
                      f"{{ echo 127.0.1.1 {shlex.quote(self.hostname)} >> /etc/hosts; }} && "
                      f"printf ready >/proc/self/fd/{write_ready}; {_KEEPER}")
            argv += ["--info-fd", str(write_info), "/bin/sh", "-c", keeper]
            self._bwrap = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=(write_info, write_ready),
                env={"PATH": PATH}, start_new_session=True)
            self.bwrap_pid = self._bwrap.pid
            for fd in (write_info, write_ready):
                os.close(fd)
            write_info = write_ready = -1
            self.pid = _read_child_pid(read_info, read_ready, self._bwrap)
            if self.setup.userns:
                inner = os.open(f"/proc/{self.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._userns_fd = fcntl.ioctl(inner, _NS_GET_PARENT)
                finally:
                    os.close(inner)
                os.set_inheritable(self._userns_fd, False)
        finally:
            for fd in (read_info, write_info, read_ready, write_ready):
                if fd != -1:
                    os.close(fd)

    def outside(self, inside: str) -> pathlib.Path:
        """Where a path under one of the private directories lies on the runner's disk."""
        path = pathlib.PurePosixPath(inside)
        assert self._fs is not None and path.parts[1] in PRIVATE_DIRS
        return self._fs.joinpath(*path.parts[1:])

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptors a process started with :meth:`argv` must inherit."""
        return (self._userns_fd,) if self._userns_fd != -1 else ()

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside the sandbox, in the host's directory (start it with
        :attr:`pass_fds`)."""
        prefix = [NSENTER, "-t", str(self.pid), "-m", "-u", "-i", "-p"]
        if self._userns_fd != -1:
            # bwrap's outer user namespace, which owns the others (the init runs in a
            # nested one); the cgroup namespace cannot be joined from it.
            prefix += [f"--user=/proc/self/fd/{self._userns_fd}", "--preserve-credentials"]
        else:
            prefix += ["-C"]
        prefix += [f"-W{self.home}", "--", SETPRIV, "--inh-caps", "-all",
                   "--bounding-set", "-all," + ",".join("+" + c for c in CAPS), "--"]
        return prefix + list(command)

    def openpty(self) -> tuple[int, int]:
        """A pseudo-terminal of the robot's own ``/dev/pts``: ``(master, slave)``, neither
        inheritable.

        The robot's ``tty`` names its slave ``/dev/pts/N``; one of the runner's would be no
        file the robot can see. Raises :class:`OSError` where the kernel cannot do it.
        """
        # /dev and /dev/pts are mount points, which the robot, without CAP_SYS_ADMIN, can
        # neither move nor cover; no link is followed in the last step, and the slave is
        # opened from the master, not by a name the robot could point elsewhere.
        flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
        master = os.open(f"/proc/{self.pid}/root/dev/pts/ptmx", flags | os.O_NOFOLLOW)
        try:
            if not stat.S_ISCHR(os.fstat(master).st_mode):
                raise OSError("the robot's /dev/pts/ptmx is no character device")
            fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
            slave = fcntl.ioctl(master, _TIOCGPTPEER, flags)
        except BaseException:
            os.close(master)
            raise
        return master, slave

    def start_serials(self, env: dict[str, str]) -> None:
        """Start each device's emulator with its stdin and stdout on the master side."""
        for serial in self.serials:
            self._emulators.append(subprocess.Popen(
                self.argv("/bin/sh", "-c", serial.command), stdin=serial.master,
                stdout=serial.master, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True, pass_fds=self.pass_fds))

    def stop(self) -> None:
        """Kill the namespaces' init (and with it every process inside); remove the files."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
        if self._bwrap is not None:
            with contextlib.suppress(ProcessLookupError):
                self._bwrap.kill()
            self._bwrap.wait(timeout=10)
            if self._bwrap.stderr is not None:
                self._bwrap.stderr.close()
            self._bwrap = None
        for emulator in self._emulators:  # nsenter ends with what it ran
            try:
                emulator.wait(timeout=5)
            except subprocess.TimeoutExpired:
                emulator.kill()
                emulator.wait()
        self._emulators.clear()
        for serial in self.serials:
            serial.close()
        self.serials.clear()
        if self._userns_fd != -1:
            os.close(self._userns_fd)
            self._userns_fd = -1
        if self._fs is not None:
            shutil.rmtree(self._fs, ignore_errors=True)
            self._fs = None


def _system_binds() -> list[str]:
    """bwrap arguments for the read-only system: /usr and its merged-usr neighbours."""
    argv = []
    for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = pathlib.Path("/", name)
        if top.is_symlink():
            argv += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            argv += ["--ro-bind", str(top), str(top)]
    return argv


def _read_child_pid(info: int, ready: int, proc: subprocess.Popen[bytes]) -> int:
    """The init's pid from bwrap's ``--info-fd`` JSON, once the keeper says it is ready."""
    result: list[int] = []

    def _read() -> None:
        chunks = []
        while data := os.read(info, 4096):
            chunks.append(data)
            with contextlib.suppress(ValueError, KeyError):
                pid = int(json.loads(b"".join(chunks))["child-pid"])
                if os.read(ready, 16) == b"ready":
                    result.append(pid)
                return

    reader = threading.Thread(target=_read, daemon=True)
    reader.start()
    reader.join(_START_TIMEOUT)
    if result:
        return result[0]
    proc.kill()
    _, err = proc.communicate(timeout=5)
    raise ConfigurationError(
        "bwrap did not start the robot's sandbox: "
        + (err.decode(errors="replace").strip() or f"status {proc.returncode}"))


def make_etc_template(target: pathlib.Path) -> None:
    """Copy the runner's /etc as the robots may see it: what others may read, with a shadow
    file of its own."""
    target.mkdir(mode=0o755)
    _copy_etc(target)
    _write_shadow(target)


def _write_shadow(etc: pathlib.Path) -> None:
    """A shadow file of the copied users with no passwords: none of the runner's hashes,
    and no account looks locked to sshd."""
    try:
        users = [line.split(":", 1)[0] for line in (etc / "passwd").read_text().splitlines()
                 if line and not line.startswith("#")]
    except OSError:
        return
    shadow = etc / "shadow"
    shadow.write_text("".join(f"{user}:*:19000:0:99999:7:::\n" for user in users))
    shadow.chmod(0o600)


def _into_private(link: pathlib.Path) -> bool:
    """Whether a symbolic link of /etc leads into one of the robot's own directories."""
    target = pathlib.PurePosixPath(os.path.normpath(link.parent / os.readlink(link)))
    return len(target.parts) > 1 and target.parts[1] in PRIVATE_DIRS


def _copy_etc(target: pathlib.Path) -> None:
    """The runner's /etc as others may read it: no shadow files, no private host keys."""
    for dirpath, dirnames, filenames in os.walk("/etc"):
        rel = pathlib.Path(dirpath).relative_to("/etc")
        for name in dirnames + filenames:
            src = pathlib.Path(dirpath, name)
            dst = target / rel / name
            try:
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode) and _into_private(src):
                    # A link into /run and the like (systemd's resolv.conf) would dangle
                    # in the robot, whose /run is its own: copy what it shows.
                    if os.access(src, os.R_OK) and src.is_file():
                        shutil.copyfile(src, dst)
                elif stat.S_ISLNK(st.st_mode):
                    dst.symlink_to(os.readlink(src))
                elif stat.S_ISDIR(st.st_mode):
                    dst.mkdir(mode=0o755)
                elif stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:
                    shutil.copyfile(src, dst)
                    dst.chmod(stat.S_IMODE(st.st_mode))
            except OSError:
                continue
        # Unreadable or skipped directories are not walked into.
        dirnames[:] = [d for d in dirnames if (target / rel / d).is_dir()
                       and not (target / rel / d).is_symlink()]

