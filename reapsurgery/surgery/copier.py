"""Copying planned byte ranges with several requests in flight, at the disk's pace.

A single sequential copy leaves an NVMe drive mostly idle: it reaches its bandwidth only
with several reads outstanding. Output shards are created with their final size first, then
worker threads copy pieces of them (at most PIECE output bytes each, positional, so pieces
are independent) while the kernel is told what is read next (WILLNEED) and, when the run is
larger than free memory, what is done with (DONTNEED on the source, so a terabyte run does
not evict everything else from the page cache).
Each worker keeps to an output file of its own: ext4, like most filesystems, lets one writer
into a file at a time (the inode lock), so two threads copying into one file go no faster
than one (benchmarks/bench_writers.py, 1 GiB warm: one thread 0.27 s, two into one file
0.30 s, two into two files 0.15 s).
copy_file_range releases the GIL, so threads are enough.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import ReapError
from ..common.safetensors_io import copy_range

PIECE = 64 << 20  # output bytes per work item: small enough to stop fast and spread over workers
HOLE = (1 << 64) - 1  # a range's source offset meaning: leave these output bytes zero (alignment padding)
MAX_JOBS = 8  # default workers at most: past this an NVMe drive is saturated, not the CPUs


def default_jobs() -> int:
    """Copy workers when --jobs is not given: one per CPU, at least 2 (I/O waits), at most MAX_JOBS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(MAX_JOBS, cpus))


def free_memory() -> int:
    """Free physical memory (MemFree): what a run can fill without evicting anyone's cached data."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0  # unknown: behave as for a run larger than memory


def coalesce(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges with each run that is contiguous in the source merged into one."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if n <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off and off != HOLE:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


@dataclass(frozen=True)
class Piece:
    """Source ranges that fill the output file from dst_offset on, back to back."""

    src: Path
    dst: Path
    dst_offset: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


def pieces(src: Path, dst: Path, dst_offset: int, ranges: list[tuple[int, int]], size: int | None = None) -> Iterator[Piece]:
    """Split coalesced ranges into work items of at most `size` (default PIECE) output bytes."""
    size = size or PIECE
    cur: list[tuple[int, int]] = []
    cur_n, start = 0, dst_offset
    for off, n in ranges:
        while n > 0:
            take = min(n, size - cur_n)
            cur.append((off, take))
            cur_n += take
            off, n = off if off == HOLE else off + take, n - take
            if cur_n == size:
                yield Piece(src, dst, start, tuple(cur))
                start, cur, cur_n = start + cur_n, [], 0
    if cur:
        yield Piece(src, dst, start, tuple(cur))


def _advise(fd: int, off: int, n: int, advice: int) -> None:
    try:
        os.posix_fadvise(fd, off, n, advice)
    except (OSError, AttributeError):  # advice is a hint: unsupported is fine
        pass


def copy_piece(piece: Piece, stop: threading.Event, drop_source: bool = True) -> None:
    """Copy one piece; `drop_source`: tell the kernel the source pages copied are not needed again."""
    src_fd = os.open(piece.src, os.O_RDONLY)
    try:
        dst_fd = os.open(piece.dst, os.O_WRONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                _advise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for off, n in piece.ranges:
                    if off != HOLE:
                        _advise(src_fd, off, n, os.POSIX_FADV_WILLNEED)
            os.lseek(dst_fd, piece.dst_offset, os.SEEK_SET)
            for off, n in piece.ranges:
                if stop.is_set():
                    return
                if off == HOLE:  # the file was created at its final size: these bytes are zeros already
                    os.lseek(dst_fd, n, os.SEEK_CUR)
                    continue
                copy_range(src_fd, dst_fd, off, n)
                if drop_source and hasattr(os, "posix_fadvise"):
                    _advise(src_fd, off, n, os.POSIX_FADV_DONTNEED)
            # Not DONTNEED on the output: on dirty pages it starts writeback at once, and waiting
            # for the disk is what a copy must not do (measured 2-3x slower with a warm cache).
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


# Tests replace this to make a worker fail mid-run, as a full disk or a bad sector would.
_copy_piece = copy_piece


def run_pieces(files: Iterable[Iterable[Piece]], jobs: int, progress: Callable[[int], None] | None = None,
               name_of: Callable[[Path], Path] = lambda p: p, drop_source: bool = True) -> None:
    """Copy the pieces of every output file (one iterable of pieces per file) with `jobs` worker
    threads; the first failure stops all and is raised.

    A worker keeps to its file and moves to one nobody writes; only when fewer files than
    workers are left is a file shared (no faster to write, but its reads still overlap, which
    helps when the source is not cached).
    Failures become one ReapError naming the output file (through name_of, e.g. the final
    path rather than the hidden staging directory). Ctrl-C stops the workers before it
    propagates, so the caller can remove the output.
    """
    queues = [iter(f) for f in files]
    writers = [0] * len(queues)  # workers in each file now
    live = list(range(len(queues)))  # files that may have pieces left, in order
    lock = threading.Lock()
    stop = threading.Event()
    done: queue.SimpleQueue = queue.SimpleQueue()
    errors: list[tuple[Piece, BaseException]] = []

    def take(held: int | None) -> tuple[int | None, Piece | None]:
        """The next piece for a worker that was writing file `held` (None: no file yet); under the lock."""
        if held is not None:
            writers[held] -= 1
        while live:
            i = held if held in live else min(live, key=writers.__getitem__)  # free file first, in order
            piece = next(queues[i], None)
            if piece is not None:
                writers[i] += 1
                return i, piece
            live.remove(i)
        return None, None

    def worker() -> None:
        held = None
        while not stop.is_set():
            with lock:
                held, piece = take(held)
            if piece is None:
                return
            try:
                _copy_piece(piece, stop, drop_source)
            except BaseException as e:  # reported by the main thread
                errors.append((piece, e))
                stop.set()
                return
            done.put(piece.nbytes)

    threads = [threading.Thread(target=worker, name=f"reapsurgery-copy-{i}", daemon=True) for i in range(max(1, jobs))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads) or not done.empty():
            try:
                n = done.get(timeout=0.05)
            except queue.Empty:
                continue
            if progress and not stop.is_set():
                progress(n)
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        piece, e = errors[0]
        if isinstance(e, OSError):
            raise ReapError(name_of(piece.dst), f"cannot copy from {piece.src}: {e.strerror or e}") from None
        raise e
