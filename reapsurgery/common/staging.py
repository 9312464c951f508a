"""Outputs that are complete or absent, and nothing of reapsurgery's left behind.

Every output -- a file (files.write_atomic) or apply's directory (surgery/outdir.py) -- is written
inside a scratch directory beside it, `.NAME.reapsurgery-partial-PID-XXXXXXXX/`, which holds from
its creation on a marker of its own, `.reapsurgery-scratch` (the process, the host, the output's
name), and is moved into place with one rename. The rename, and the removal of the scratch
directory with whatever the rename replaced, run with SIGINT, SIGTERM and SIGHUP deferred: a signal
that arrives meanwhile is raised once they are done, so after any signal the output is either absent
(or the old one) or complete, and `published()` says which of the command's outputs (claimed by
their checks) were written. The creation of the scratch directory
and of missing parents are deferred the same way, so an interrupt always finds them recorded and
removes them.

A scratch directory left by a process killed outright (SIGKILL, power loss) is removed by the next
run that writes the same output, and only when its process is gone, it was made on this host and
its marker names it: never by its name alone (a user's `.out.reapsurgery-partial-1` stays).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import platform
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("reapsurgery")

MARKER = ".reapsurgery-scratch"
REPLACED = ".reapsurgery-replaced"  # in a scratch directory: the old output moved aside (no renameat2)
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.reapsurgery-partial-(?P<pid>\d{1,10})-[A-Za-z0-9_]+$")
_LOCK = re.compile(r"^\.(?P<name>.+)\.reapsurgery-lock-(?P<pid>\d{1,10})$")
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_AT_FDCWD = -100
NOREPLACE, EXCHANGE = 1, 2  # renameat2 flags

NAME_KEPT = 120  # of the output's name in hidden names beside it: room for the suffix within NAME_MAX (255)
_claimed: set[Path] = set()  # the outputs the command was asked to write, as the user named them
_published: list[Path] = []  # those of them moved into place


def claim(path: Path) -> None:
    """Record `path` as an output of this command (its checks call this), so that `published()`
    lists it once written; what else is written (a cache) is not the command's to report."""
    _claimed.add(Path(path))


def published() -> list[Path]:
    """The command's outputs written so far (complete: each was published by one rename)."""
    return list(_published)


def forget_published() -> None:
    """Start a new record (a command run in-process after another)."""
    _claimed.clear()
    _published.clear()


# -- signals -------------------------------------------------------------------------------


class _Deferral:
    depth = 0
    pending: list[int] = []


def _deferring(original):
    """A handler that records the signal while a deferral is open and otherwise runs `original`."""
    def handler(signum, frame):
        if _Deferral.depth:
            _Deferral.pending.append(signum)
        else:
            original(signum, frame)
    handler.defers = True
    return handler


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done, then the first is raised (dropped
    when the block failed: its error is what happened). Main thread only; Python handlers only
    (a SIGTERM with the default action still ends the process at once, as SIGKILL does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    for s in _SIGNALS:  # handlers are wrapped, never swapped back and forth: no moment without one
        current = signal.getsignal(s)
        if callable(current) and not getattr(current, "defers", False):
            signal.signal(s, _deferring(current))
    _Deferral.depth += 1
    done = False
    try:
        yield
        done = True
    finally:
        _Deferral.depth -= 1
        if not _Deferral.depth:
            pending, _Deferral.pending = _Deferral.pending, []
            handler = signal.getsignal(pending[0]) if pending and done else None
            if callable(handler):
                handler(pending[0], None)


# -- scratch directories -------------------------------------------------------------------


def _marker(pid: int, name: str) -> bytes:
    return json.dumps({"format": "reapsurgery.scratch", "pid": pid, "host": platform.node(), "output": name},
                      sort_keys=True).encode()


def _is_marker(path: Path, pid: int, name: str) -> bool:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 4096:
            return False
        return path.read_bytes() == _marker(pid, name)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's, or not a process id: not provably gone
    return True


def _stale(entry: Path, out: Path) -> bool:
    """Proven ours and abandoned: named for `out`, its process gone, made on this host (the marker
    says so), and holding nothing but what a scratch directory holds."""
    m = _SCRATCH.match(entry.name) or _LOCK.match(entry.name)
    if not m or m["name"] != out.name[:NAME_KEPT]:
        return False
    pid = int(m["pid"])
    if pid == os.getpid() or _alive(pid):
        return False
    if m.re is _LOCK:
        return _is_marker(entry, pid, out.name)
    if entry.is_symlink() or not entry.is_dir() or not _is_marker(entry / MARKER, pid, out.name):
        return False
    try:
        names = {p.name for p in entry.iterdir()}
    except OSError:
        return False
    if REPLACED in names and not os.path.lexists(out):
        return False  # killed between moving the old output aside and the new one in: the only copy
    return names <= {MARKER, out.name, REPLACED}


def remove_stale(out: Path) -> list[Path]:
    """Remove the scratch directories (and lock files) of `out` that killed runs left; returns them."""
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if _stale(entry, out):
            if entry.is_dir():
                remove_scratch(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_scratch(scratch: Path) -> None:
    """Everything in it, then its marker, then the directory: proven ours until the last moment."""
    try:
        entries = [p for p in scratch.iterdir() if p.name != MARKER]
    except FileNotFoundError:
        return
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    (scratch / MARKER).unlink(missing_ok=True)
    try:
        scratch.rmdir()
    except OSError:
        pass


def lock_file(out: Path) -> Path:
    """Create the O_EXCL lock of `out` (the publish without renameat2), marked as ours."""
    lock = out.parent / f".{out.name[:NAME_KEPT]}.reapsurgery-lock-{os.getpid()}"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, _marker(os.getpid(), out.name))
    finally:
        os.close(fd)
    return lock


def _make_parents(directory: Path, created: list[Path]) -> None:
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        created.append(d)


def _remove_parents(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return  # not empty: something else is in it now


@contextmanager
def staged(out: Path, publish: Callable[[Path], None], shown: Path | None = None,
           note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield where to write `out` (a path in a new marked scratch directory beside it; nothing is
    there yet); once the block is done, `publish(path)` moves it into place. Stale scratch
    directories of `out` are removed first; on any failure or signal the scratch directory and the
    parent directories made here are removed. `shown`: the output as the user named it."""
    created: list[Path] = []
    scratch: Path | None = None
    try:
        with deferred_signals():
            _make_parents(out.parent, created)
        for stale in remove_stale(out):
            (note or log.info)(f"removed {stale}, left by an earlier run that was killed")
        with deferred_signals():
            scratch = Path(tempfile.mkdtemp(prefix=f".{out.name[:NAME_KEPT]}.reapsurgery-partial-{os.getpid()}-",
                                            dir=out.parent))
            (scratch / MARKER).write_bytes(_marker(os.getpid(), out.name))
        yield scratch / out.name
        with deferred_signals():
            publish(scratch / out.name)
            if (shown or out) in _claimed:
                _published.append(shown or out)
            remove_scratch(scratch)
    except BaseException:
        with deferred_signals():
            if scratch is not None:
                remove_scratch(scratch)
            _remove_parents(created)
        raise


# -- publishing ----------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if this system or filesystem has no renameat2 with these flags."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move `tmp` to `path`; without `overwrite` never over a file that is there (FileExistsError)."""
    if overwrite:
        os.replace(tmp, path)
    elif not renameat2(tmp, path, NOREPLACE):
        try:
            os.link(tmp, path)  # link() never replaces either
        except FileExistsError:
            raise
        except OSError:  # a filesystem without hard links: check, then rename
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
            os.replace(tmp, path)
