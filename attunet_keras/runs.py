"""Files that are whole or absent, and folders with one writer.

A run's JSON files and rewritten log, a predicted volume and a cache entry go through
`atomic_path` (Keras writes the `.keras` files and PIL the PNGs in place): each is
written under a temporary name beside its target and renamed over it, so a reader or
a killed process never sees half of it.
`file_lock` is an OS lock (`fcntl.flock`) on a lock file, released by the kernel when
its holder dies, so a SIGKILL never leaves a stale lock behind. On network file
systems that do not honour `flock` (some NFS set-ups) these locks do not exclude
processes on other hosts.

Standard library only: any module of the package may import it.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile


class Busy(RuntimeError):
    """A lock is held by another process; the message names the lock and its holder."""


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path beside `path`; on success it is renamed to `path`.

    The temporary name starts with a dot, holds the process id and a unique part, and
    ends with `suffix` (e.g. `.npz`, which `numpy.savez` insists on). On an error it is removed
    and `path` is left as it was.
    """
    folder, name = os.path.split(os.path.abspath(path))
    # A name of its own for every call: threads of one process may write one path.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.",
                                             suffix=f".tmp{suffix}", dir=folder)
    os.close(descriptor)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def write_text(path, text):
    """Writes `text` to `path` whole or not at all (`atomic_path`)."""
    with atomic_path(path) as temporary:
        with open(temporary, "w") as file:
            file.write(text)


def write_json(path, values):
    """Writes `values` as indented JSON to `path`, whole or not at all."""
    write_text(path, json.dumps(values, indent=2) + "\n")


def holder(lock_path):
    """The `pid@host` written in a lock file, or None."""
    try:
        with open(lock_path) as file:
            return file.read().strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def file_lock(lock_path, *, wait=True, remove=False, what=None):
    """Holds an exclusive `flock` on `lock_path` (created if needed) for the block.

    The file then holds this process's `pid@host`. With `wait=False` a lock held by
    another process raises `Busy` naming `what` (default: the lock file) and the
    holder, at once. `remove=True` deletes the lock file on release (for locks of
    short-lived things such as cache entries; a waiter that finds it has locked a file
    no longer at the path opens and locks the one that is).
    """
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            name = holder(lock_path) or "another process"
            raise Busy(f"{what or lock_path} is in use by process {name} (lock "
                       f"{lock_path}); wait for it to finish or stop it, then run the "
                       "command again.") from None
        # The file locked must still be the one at the path: a holder with
        # `remove=True` may have deleted it while we waited, and a third process
        # locked a new one. Then lock that one instead.
        try:
            same = os.fstat(descriptor).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        try:
            yield
        finally:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock_path)
            else:
                os.ftruncate(descriptor, 0)
    finally:
        os.close(descriptor)


LOCK_FILE = ".lock"


def entries(folder):
    """The names in `folder` but its lock file (`[]` for a missing folder)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name != LOCK_FILE)


@contextlib.contextmanager
def folder_lock(folder, what="run folder", keep=True):
    """Makes `folder` (if needed) and holds its lock file for the block: one writer.

    A second process asking for it is refused at once (`Busy`, naming the folder and
    the holder's `pid@host`). When the block ends and the folder holds nothing but the
    lock (a start that failed before writing), the lock is removed, and the folder
    too when this call made it, so nothing is left that blocks the corrected command.
    `keep=False` removes the lock file in any case (a folder of outputs, where it
    would only be in the way).
    """
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"output {folder} exists and is not a folder.")
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, LOCK_FILE)
    with file_lock(lock, wait=False, what=f"{what} {folder}", remove=not keep):
        try:
            yield
        finally:
            if not entries(folder):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)
