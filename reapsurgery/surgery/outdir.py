"""Writing an output directory that never looks complete until it is.

Everything is written into a hidden sibling directory, which is renamed into place
at the end; on any failure it is removed and OUT is left as it was.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ReapError


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise ReapError(out, f"output directory is inside the input checkpoint {src}")
    if out_r in src_r.parents:
        raise ReapError(out, f"output directory contains the input checkpoint {src}")
    if out.exists() and not out.is_dir():
        raise ReapError(out, "output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ReapError(out, "output directory is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `out` on success; call check_output first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.reapsurgery-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.reapsurgery-old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
