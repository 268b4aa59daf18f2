"""Files of the ledger and of the kept directory, opened so that another local user cannot
redirect them.

The ledger may be given by path (``--rerobots-ledger``, ``REROBOTS_LEDGER``), so it and
the kept directory beside it may sit in a directory others can write (``/tmp``). There,
another user could plant a symbolic link, a FIFO, a record of their own, or rename a
directory between two of our steps. So:

* a directory is opened with ``O_DIRECTORY | O_NOFOLLOW`` and checked with ``fstat``: it
  must be ours and not writable by group or others (:func:`open_dir`); what lies in it is
  reached through that descriptor (``dir_fd=``), so a rename of its path mid-way changes
  nothing;
* a file is opened with ``O_NOFOLLOW`` (and ``O_NONBLOCK``: a FIFO never blocks), then
  checked with ``fstat``: a regular file of ours, of bounded size when read
  (:func:`read_regular`);
* a file is written whole or not at all: a new file of a unique name (``O_EXCL``, as
  ``mkstemp`` makes them) in the same directory, renamed over the old one
  (:func:`write_atomic`).

A check that fails raises :class:`.ConfigurationError`, with the path, what is wrong with
it and what to do. Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator

from .errors import ConfigurationError

__all__ = ["MAX_RECORD", "check_file", "open_dir", "read_regular", "remove_tree",
           "write_atomic"]

#: The largest record or key file read (bytes); a bigger one is not ours.
MAX_RECORD = 1 << 20

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

ADVICE = ("remove it (or, if it is yours, chmod go-w it), or keep the ledger in a directory "
          "only you can write (--rerobots-ledger, REROBOTS_LEDGER)")


def refuse(what: str, path: str | os.PathLike[str], wrong: str) -> ConfigurationError:
    """The one error for an unsafe path: which, what is wrong with it, what to do."""
    return ConfigurationError(f"rerobots: refused: the {what} {os.fspath(path)} {wrong}; "
                              f"{ADVICE}")


def _owner_problem(st: os.stat_result) -> str | None:
    me = os.geteuid()
    if st.st_uid != me:
        return f"is owned by uid {st.st_uid}, not by this user (uid {me})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _link_problem(path: str | os.PathLike[str], dir_fd: int | None) -> str | None:
    """Why ``path`` could not be opened as asked, if that is a reason to refuse it."""
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    return None


def check_dir_stat(st: os.stat_result, what: str, path: str | os.PathLike[str]) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise refuse(what, path, "is not a directory")
    problem = _owner_problem(st)
    if problem:
        raise refuse(what, path, problem)


def check_file(st: os.stat_result, what: str, path: str | os.PathLike[str]) -> None:
    """Refuse anything but a regular file of ours, with one link, that only we may write."""
    if not stat.S_ISREG(st.st_mode):
        raise refuse(what, path, "is not a regular file")
    problem = _owner_problem(st)
    if problem:
        raise refuse(what, path, problem)
    if st.st_nlink != 1:
        raise refuse(what, path, f"has {st.st_nlink} hard links (one is expected)")


def open_dir(path: str | os.PathLike[str], what: str, *, dir_fd: int | None = None,
             create: bool = False) -> int:
    """A descriptor of directory ``path`` (relative to ``dir_fd``, if given), checked: not a
    symbolic link, ours, not writable by group or others. ``create`` makes it (0700)
    if it is missing. The caller closes it."""
    shown = path if dir_fd is None else f"{what} entry {os.fspath(path)}"
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
            break
        except FileNotFoundError:
            if not create or attempt == 2:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise refuse(what, shown, _link_problem(path, dir_fd) or "is not a directory"
                             ) from None
            raise
    try:
        check_dir_stat(os.fstat(fd), what, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened_dir(path: str | os.PathLike[str], what: str, *, dir_fd: int | None = None,
               create: bool = False) -> Iterator[int]:
    fd = open_dir(path, what, dir_fd=dir_fd, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(path: str | os.PathLike[str], what: str, flags: int, *,
              dir_fd: int | None = None, mode: int = 0o600) -> int:
    """``os.open`` without following a symbolic link and without blocking on a FIFO, then
    :func:`check_file`; the descriptor (blocking again)."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR):
            raise refuse(what, path, _link_problem(path, dir_fd) or "is not a regular file"
                         ) from None
        raise
    try:
        check_file(os.fstat(fd), what, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(name: str, dir_fd: int, limit: int = MAX_RECORD) -> bytes | None:
    """The content of ``name`` in ``dir_fd`` if it is a regular file of ours of at most
    ``limit`` bytes; None if it is missing or anything else (a FIFO, a link, too big)."""
    try:
        fd = open_file(name, "file", os.O_RDONLY, dir_fd=dir_fd)
    except (OSError, ConfigurationError):
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return None if size > limit else b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(name: str, data: bytes, dir_fd: int, mode: int = 0o600) -> None:
    """Replace ``name`` in ``dir_fd`` with ``data``, whole or not at all: written to a new
    file of a unique name (``O_CREAT | O_EXCL``, as ``mkstemp`` does, mode ``mode`` from
    the start), then renamed over ``name`` within that same directory."""
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         mode, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - a hundred names of 48 random bits all taken
        raise FileExistsError(errno.EEXIST, "no free temporary name", name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def remove_tree(name: str, dir_fd: int) -> None:
    """Remove directory ``name`` of ``dir_fd`` and what it holds, never following a link
    (a link in it is removed, not what it points to); missing is fine."""
    try:
        fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)  # a link or a file where a directory was
            return
        raise
    try:
        for entry in os.listdir(fd):
            try:
                os.unlink(entry, dir_fd=fd)
            except IsADirectoryError:
                remove_tree(entry, fd)
            except PermissionError:  # what some systems answer to unlink(directory)
                if stat.S_ISDIR(os.lstat(entry, dir_fd=fd).st_mode):
                    remove_tree(entry, fd)
                else:
                    raise
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=dir_fd)
