"""Writing planned output files, whatever their format: the seam between planning and copying.

A plan (safetensors shards, GGUF files) describes each output file as an `OutFile`: its name, the
source file its data comes from, its header bytes, and the source byte ranges that follow the
header back to back (a HOLE range is zeros: GGUF's alignment padding). Nothing here knows a
format; every format gets the same parallel range copier, progress and failure handling.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .copier import free_memory, pieces, run_pieces


class OutFile(Protocol):
    name: str  # relative to the output directory
    source: str  # relative to the source directory
    header: bytes  # written first, at offset 0
    ranges: array | Sequence[int]  # source offset, length, offset, length... in output order after the header
    nbytes: int  # bytes after the header (the sum of the ranges' lengths)


def file_ranges(f: OutFile) -> list[tuple[int, int]]:
    """The source ranges of an output file's data, in output order."""
    return list(zip(f.ranges[::2], f.ranges[1::2]))


def write_files(files: Sequence[OutFile], src: Path, dst: Path, progress: Callable[[int], None] | None = None,
                jobs: int = 1, name_of: Callable[[Path], Path] = lambda p: p) -> None:
    """Every output file, complete: headers first (files created at their final size), then the
    data, copied by `jobs` workers in pieces; adjacent source ranges become one copy.
    Source pages are dropped from the page cache once copied only when the run, read and
    written, would not fit in free memory: a smaller one evicts nothing, and keeping its
    pages makes the next run over the same model (another sparsity) read no disk."""
    work = []
    for f in files:
        header = f.header
        fd = os.open(dst / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(header)
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, len(header) + f.nbytes)
        finally:
            os.close(fd)
        work.append((f, len(header)))

    runs = (pieces(src / f.source, dst / f.name, start, file_ranges(f)) for f, start in work)
    run_pieces(runs, jobs, progress, name_of, drop_source=2 * sum(f.nbytes for f, _ in work) > free_memory())
