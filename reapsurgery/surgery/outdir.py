"""Writing an output directory that never looks complete until it is.

Everything is written into a directory inside a marked scratch directory beside OUT
(common/staging.py: `.OUT.reapsurgery-partial-PID-XXXXXXXX/OUT`), published at the end with one
atomic rename: `renameat2(RENAME_NOREPLACE)` when OUT is absent, so two runs into one OUT cannot
both succeed, and `renameat2(RENAME_EXCHANGE)` for --overwrite, so OUT is at every instant either
the old or the new complete version, never missing; the old version, swapped into the scratch
directory, is removed with it. A symlinked OUT is followed: its target is written, the link kept.
On any failure or signal the scratch directory (and the parents of OUT this run made) is removed;
one left by a killed process (SIGKILL, power loss) is removed by the next run into the same OUT
once its PID is gone, if its marker proves it ours.

renameat2 is Linux (3.15+, and a filesystem that supports the flags); elsewhere a lock file
created with O_EXCL serialises the check and the plain rename instead.
"""

from __future__ import annotations

import errno
import glob
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..common.files import check_replaceable, input_clash, real_path
from ..common.staging import (EXCHANGE, NAME_KEPT, NOREPLACE, REPLACED, claim, lock_file, publish_file, renameat2,
                              staged)
from ..errors import ReapError



def check_output(out: Path, overwrite: bool, inputs: Iterable[Path] = (), input_dirs: Iterable[Path] = ()) -> None:
    """Refuse an OUT that is, holds or lies inside an input, is a file, or is not empty (unless
    `overwrite`); claim it as the command's output (staging.claim)."""
    clash = input_clash(out, inputs, input_dirs, directory=True)
    if clash:
        raise ReapError(out, f"output directory {clash}")
    target = real_path(out)
    if os.path.lexists(target) and not target.is_dir():
        raise ReapError(out, "output path exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ReapError(out, "output directory is not empty (pass --overwrite to replace it)")
    claim(out)


def _taken(out: Path) -> ReapError:
    return ReapError(out, "another process wrote this output directory while this run was writing; "
                          "it was left as that run made it and nothing of this run was kept")


def _publish(tmp: Path, out: Path, overwrite: bool, shown: Path) -> None:
    if overwrite and out.is_dir():
        try:
            if renameat2(tmp, out, EXCHANGE):  # OUT now new; tmp holds the old version
                return
        except FileNotFoundError:
            pass  # OUT vanished meanwhile: publish as new
        else:
            return _publish_locked(tmp, out, overwrite, shown)
    elif out.is_dir():  # empty (check_output): remove it only while it is still empty
        try:
            os.rmdir(out)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise _taken(shown) from None
            raise
    try:
        if renameat2(tmp, out, NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise _taken(shown) from None
        raise
    _publish_locked(tmp, out, overwrite, shown)


def _publish_locked(tmp: Path, out: Path, overwrite: bool, shown: Path) -> None:
    """Without renameat2: check and rename under an O_EXCL lock file beside OUT."""
    others = lambda: [p for p in out.parent.glob(f".{glob.escape(out.name[:NAME_KEPT])}.reapsurgery-lock-*")]  # noqa: E731
    if others():
        raise _taken(shown)
    lock = lock_file(out)
    try:
        if [p for p in others() if p != lock]:
            raise _taken(shown)
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise _taken(shown)
            out.rename(tmp.parent / REPLACED)  # removed with the scratch directory
        elif out.is_dir():
            os.rmdir(out)
        tmp.rename(out)
    finally:
        lock.unlink(missing_ok=True)


@contextmanager
def staged_output(out: Path, overwrite: bool = False,
                  note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a directory that becomes `out` on success; call check_output first."""
    target = real_path(out)
    try:
        with staged(target, lambda tmp: _publish(tmp, target, overwrite, out), shown=out, note=note) as tmp:
            tmp.mkdir()
            yield tmp
    except OSError as e:  # a full disk, no permission: named as OUT, not as the hidden directory beside it
        if e.filename is not None and ".reapsurgery-partial-" not in os.fsdecode(e.filename):
            raise
        raise ReapError(out, f"cannot write: {e.strerror or e}") from None


# -- one output file (a GGUF model): the same promises, the file written in the scratch directory ------


def check_output_file_of(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Refuse an output file that is or lies in an input, is a directory, or (without --overwrite)
    is already there; claim it as the command's output."""
    clash = input_clash(out, inputs, ())
    if clash:
        raise ReapError(out, f"output {clash}; choose another output file")
    target = real_path(out)
    if target.is_dir():
        raise ReapError(out, "output is a directory; give a file name (a split GGUF set writes a directory "
                             "only when its first part is given)")
    if os.path.lexists(target) and not overwrite:
        raise ReapError(out, "output file exists (pass --overwrite to replace it)")
    check_replaceable(out, target)
    claim(out)


def check_output_dir_of(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """check_output for inputs that are files (a GGUF split set) rather than a checkpoint directory."""
    check_output(out, overwrite, inputs)


@contextmanager
def staged_file(out: Path, overwrite: bool = False, note: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield the path (not created) of a file in a marked scratch directory beside `out` that
    becomes `out` on success: renamed with RENAME_NOREPLACE (a hard link where renameat2 is
    missing: it also refuses an existing name), or replaced by one rename under --overwrite, so
    `out` is at every instant the old file or the new one."""
    target = real_path(out)
    try:
        with staged(target, lambda tmp: publish_file(tmp, target, overwrite), shown=out, note=note) as tmp:
            yield tmp
    except FileExistsError:
        raise ReapError(out, "another process wrote this output file while this run was writing; it was left "
                             "as that run made it and nothing of this run was kept") from None
    except OSError as e:  # a full disk, no permission: named as OUT, not as the hidden file beside it
        if e.filename is not None and ".reapsurgery-partial-" not in os.fsdecode(e.filename):
            raise
        raise ReapError(out, f"cannot write: {e.strerror or e}") from None
