#!/usr/bin/env python
"""Why apply's copy workers keep to an output file each: the kernel copy, one file vs two.

Copies one file of --size-gb GiB (page cache warm) with `copy_file_range`, three ways, in
rotating order, median of --repeat runs:

- one thread, into one file;
- two threads, each half of the bytes, into the same file at their offsets (what apply's
  workers did when they took pieces of one shard in turn);
- two threads, each half of the bytes, into two files (what they do now).

On ext4 (and most filesystems) a buffered write holds the file's inode lock, so two writers
into one file take turns: no faster than one, with twice the CPU time (the waiter spins).
Into two files they run side by side. Prints a table and one JSON line.

    python benchmarks/bench_writers.py              # 1 GiB, 5 repeats
    python benchmarks/bench_writers.py --workdir /data --size-gb 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import GiB, MiB, drop_scratch, machine_info, make_scratch, med, need_disk, print_header, print_machine  # noqa: E402


def copy(src: Path, dst: Path, offset: int, count: int, dst_offset: int) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while count:
            n = os.copy_file_range(s, d, count, offset, dst_offset)
            if n == 0:
                raise OSError(f"unexpected end of {src}")
            offset, dst_offset, count = offset + n, dst_offset + n, count - n
    finally:
        os.close(s)
        os.close(d)


def run(way: str, src: Path, out: Path, size: int) -> dict:
    half = size // 2 // 4096 * 4096
    out.mkdir()
    jobs = {
        "one thread": [(out / "a", 0, size, 0)],
        "two threads, one file": [(out / "a", 0, half, 0), (out / "a", half, size - half, half)],
        "two threads, two files": [(out / "a", 0, half, 0), (out / "b", half, size - half, 0)],
    }[way]
    threads = [threading.Thread(target=copy, args=(src, *j)) for j in jobs]
    c0, t0 = os.times(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, c1 = time.perf_counter() - t0, os.times()
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    os.sync()
    return {"wall_s": wall, "sys_s": c1.system - c0.system}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="bytes copied, GiB (default 1)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per way (median; default 5)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: /tmp)")
    args = ap.parse_args()
    if not hasattr(os, "copy_file_range"):
        sys.exit("needs os.copy_file_range (Linux)")

    work = make_scratch(args.workdir, "reapsurgery-writers-")
    machine = machine_info(work, cp=False)
    try:
        need_disk(machine, work, 2 * args.size_gb + 1)
        size = int(args.size_gb * GiB) // 4096 * 4096
        src = work / "src"
        with open(src, "wb") as f:
            block = os.urandom(16 * MiB)
            for _ in range(size // len(block)):
                f.write(block)
            f.write(block[: size % len(block)])
        os.sync()
        ways = ["one thread", "two threads, one file", "two threads, two files"]
        runs: dict[str, list[dict]] = {w: [] for w in ways}
        for r in range(args.repeat):
            for w in ways[r % 3:] + ways[: r % 3]:
                with open(src, "rb") as f:  # keep the source cached
                    while f.read(64 * MiB):
                        pass
                runs[w].append(run(w, src, work / "out", size))
        machine["loadavg_end"] = list(os.getloadavg())
        print_machine("kernel copy: one file vs two", machine)
        print(f"settings: {size / GiB:.2f} GiB, page cache warm, median of {args.repeat} rotated runs")
        print_header(f"{'way':<24} | {'wall s':>7} {'sys s':>7} | {'wall / one thread':>17}")
        base = med([m["wall_s"] for m in runs["one thread"]])
        summary = {}
        for w in ways:
            wall, sys_s = med([m["wall_s"] for m in runs[w]]), med([m["sys_s"] for m in runs[w]])
            summary[w] = {"wall_s": round(wall, 3), "sys_s": round(sys_s, 3), "ratio": round(wall / base, 3),
                          "runs_s": [round(m["wall_s"], 3) for m in runs[w]]}
            print(f"{w:<24} | {wall:7.3f} {sys_s:7.3f} | {wall / base:17.2f}")
        print(json.dumps({"bench": "reapsurgery.writers", "machine": machine, "size_bytes": size,
                          "repeat": args.repeat, "ways": summary}, sort_keys=True))
    finally:
        drop_scratch(False, work)


if __name__ == "__main__":
    main()
