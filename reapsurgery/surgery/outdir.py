"""Writing an output directory that never looks complete until it is.

Everything is written into a hidden sibling directory named after this process
(`.OUT.reapsurgery-partial-PID`), which is published at the end with one atomic rename:
`renameat2(RENAME_NOREPLACE)` when OUT is absent, so two runs into one OUT cannot both
succeed, and `renameat2(RENAME_EXCHANGE)` for --overwrite, so OUT is at every instant
either the old or the new complete version, never missing. On any failure or signal the
partial directory is removed; one left by a killed process (SIGKILL, power loss) is
removed by the next run into the same OUT once its PID is gone.

renameat2 is Linux (3.15+, and a filesystem that supports the flags); elsewhere a lock
file created with O_EXCL serialises the check and the plain rename instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ReapError

_AT_FDCWD = -100
_NOREPLACE, _EXCHANGE = 1, 2
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.reapsurgery-(?:partial|old|lock)-(?P<pid>\d+)$")
# test hook: called with a step name ("published") so tests can kill the process at exact points
_hook: Callable[[str], None] | None = None


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r:
        raise ReapError(out, "output directory is the input checkpoint; choose another one")
    if src_r in out_r.parents:
        raise ReapError(out, f"output directory is inside the input checkpoint {src}")
    if out_r in src_r.parents:
        raise ReapError(out, f"output directory contains the input checkpoint {src}")
    if out.exists() and not out.is_dir():
        raise ReapError(out, "output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ReapError(out, "output directory is not empty (pass --overwrite to replace it)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove hidden partial directories of OUT left by processes that no longer run."""
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _HIDDEN.match(entry.name)
        if not m or m["name"] != out.name or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
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


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _taken(out: Path) -> ReapError:
    return ReapError(out, "another process wrote this output directory while this run was writing; "
                          "it was left as that run made it and nothing of this run was kept")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite and out.is_dir():
        try:
            if _renameat2(tmp, out, _EXCHANGE):  # OUT now new; tmp holds the old version
                if _hook:
                    _hook("exchanged")
                shutil.rmtree(tmp)
                return
        except FileNotFoundError:
            pass  # OUT vanished meanwhile: publish as new
        else:
            return _publish_locked(tmp, out, overwrite)
    elif out.is_dir():  # empty (check_output): remove it only while it is still empty
        try:
            os.rmdir(out)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _taken(out) from None
            raise
    try:
        if _renameat2(tmp, out, _NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _taken(out) from None
        raise
    _publish_locked(tmp, out, overwrite)


def _publish_locked(tmp: Path, out: Path, overwrite: bool) -> None:
    """Without renameat2: check and rename under an O_EXCL lock file beside OUT."""
    lock = out.parent / f".{out.name}.reapsurgery-lock-{os.getpid()}"
    others = [p for p in out.parent.glob(f".{out.name}.reapsurgery-lock-*") if p != lock]
    if others:
        raise _taken(out)
    os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        if [p for p in out.parent.glob(f".{out.name}.reapsurgery-lock-*") if p != lock]:
            raise _taken(out)
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise _taken(out)
            old = out.parent / f".{out.name}.reapsurgery-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            if out.is_dir():
                os.rmdir(out)
            tmp.rename(out)
    finally:
        lock.unlink(missing_ok=True)


def _remove_uninterrupted(tmp: Path) -> None:
    """Remove the partial output even if another Ctrl-C (or SIGTERM) arrives meanwhile: a second
    interrupt during the removal must not leave half of it behind."""
    while True:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


@contextmanager
def staged_output(out: Path, overwrite: bool = False,
                  note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a scratch directory that becomes `out` on success; call check_output first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out):
        if note:
            note(f"removed {stale}, left by an earlier run that was killed")
    tmp = out.parent / f".{out.name}.reapsurgery-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, out, overwrite)
    except BaseException as e:
        _remove_uninterrupted(tmp)
        if isinstance(e, OSError) and not isinstance(e, ReapError) and e.filename is None:
            raise ReapError(out, f"cannot write: {e.strerror or e}") from None  # e.g. disk full
        raise


# -- one output file (a GGUF model): the same promises, a hidden sibling file renamed into place --------


def check_output_file_of(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse an output file that is an input, a directory, or (without --overwrite) already there."""
    from ..common.files import check_output_file

    check_output_file(out, inputs=inputs, flag="output")
    if out.exists() and not overwrite:
        raise ReapError(out, "output file exists (pass --overwrite to replace it)")


def check_output_dir_of(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """check_output for inputs that are files (a GGUF split set) rather than a checkpoint directory."""
    out_r = out.resolve()
    for src in inputs:
        if out_r == src.resolve() or out_r in src.resolve().parents:
            raise ReapError(out, f"output directory contains the input file {src}")
    if out.exists() and not out.is_dir():
        raise ReapError(out, "output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ReapError(out, "output directory is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_file(out: Path, overwrite: bool = False, note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield the path of a hidden sibling file (not created) that becomes `out` on success: renamed
    with RENAME_NOREPLACE (a hard link where renameat2 is missing: it also refuses an existing name),
    or RENAME_EXCHANGE under --overwrite, so `out` is at every instant the old file or the new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out):
        if note:
            note(f"removed {stale}, left by an earlier run that was killed")
    tmp = out.parent / f".{out.name}.reapsurgery-partial-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _publish_file(tmp, out, overwrite)
    except BaseException as e:
        while True:  # as _remove_uninterrupted: a second Ctrl-C must not leave it behind
            try:
                tmp.unlink(missing_ok=True)
                break
            except KeyboardInterrupt:
                continue
        if isinstance(e, OSError) and not isinstance(e, ReapError) and e.filename is None:
            raise ReapError(out, f"cannot write: {e.strerror or e}") from None
        raise


def _publish_file(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        if out.is_dir():
            raise ReapError(out, "is a directory; the output is one file")
        if _renameat2(tmp, out, _EXCHANGE):  # out is now the new file; tmp holds the old one
            if _hook:
                _hook("exchanged")
            tmp.unlink()
        else:
            os.replace(tmp, out)
        return
    try:
        if not _renameat2(tmp, out, _NOREPLACE):
            os.link(tmp, out)
            tmp.unlink()
    except FileExistsError:
        raise ReapError(out, "another process wrote this output file while this run was writing; it was left "
                             "as that run made it and nothing of this run was kept") from None
