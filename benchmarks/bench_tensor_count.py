#!/usr/bin/env python
"""Benchmark surgery's memory in tensor count: peak RSS of apply, verify and inspect on
checkpoints with Kimi-K2's layout at 1/8, 1/2 and all of its 139,583 tensors.

The checkpoints are header-scale (fixtures/header_scale.py: Kimi-K2's names and dtypes, tiny
shapes), so what grows is only what a command holds per tensor. The issue's target is peak
RSS <= 64 MiB at 139,583 tensors; the interpreter floor (`reapsurgery --version`) is printed
beside it, and the growth per 1,000 tensors above that floor.

    python benchmarks/bench_tensor_count.py             # 8, 31 and 61 layers of 384 experts
    python benchmarks/bench_tensor_count.py --layers 61 --repeat 1

Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from common import (  # noqa: E402  (this directory)
    drop_scratch, machine_info, med, print_header, print_machine, reap, reapsurgery_cmd, run_measured, make_scratch,
)

TARGET_MIB = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=str, default="8,31,61", help="layer counts to build (61 = Kimi-K2)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per command (the peak RSS is their maximum)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    from fixtures.header_scale import build

    Checkpoint, Mask = reap("checkpoint").Checkpoint, reap("mask").Mask
    work = make_scratch(args.workdir, "reapsurgery-tensors-")
    log = work / "commands.log"
    machine = machine_info(work, cp=False)
    cmd = reapsurgery_cmd()
    t0 = time.perf_counter()
    rows = []
    try:
        floor = max(run_measured(cmd + ["--version"], log)["rss_mib"] for _ in range(args.repeat))
        for layers in (int(x) for x in args.layers.split(",")):
            src = build(work / f"ckpt-{layers}", layers=layers)
            c = Checkpoint.open(src)
            mask = work / f"mask-{layers}.json"
            Mask(c.fingerprint(), {l: list(range(0, c.num_experts, 2)) for l in c.moe_layers},
                 {"method": "bench_tensor_count even half"}).save(mask)
            tensors = len(c.weight_map)
            out = work / f"out-{layers}"
            commands = {
                "apply": cmd + ["apply", str(mask), str(src), str(out), "-q", "--overwrite"],
                "verify (output)": cmd + ["verify", str(out)],
                "inspect": cmd + ["inspect", str(src)],
                "inspect mask --ckpt": cmd + ["inspect", str(mask), "--ckpt", str(src)],
            }
            for name, argv in commands.items():
                runs = [run_measured(argv, log) for _ in range(args.repeat)]
                rows.append({"tensors": tensors, "layers": layers, "command": name,
                             "rss_mib": max(r["rss_mib"] for r in runs), "wall_s": med([r["wall_s"] for r in runs])})
            print(f"  {layers} layers, {tensors} tensors: " +
                  ", ".join(f"{r['command']} {r['rss_mib']:.1f} MiB" for r in rows if r["layers"] == layers), flush=True)
    finally:
        machine["loadavg_end"] = list(os.getloadavg())
        drop_scratch(args.keep, work)

    print_machine("surgery memory in tensor count (header-scale Kimi-K2 layout, 50% of 384 experts kept)", machine)
    print(f"interpreter floor: `reapsurgery --version` peak RSS {floor:.1f} MiB; target at 139,583 tensors: "
          f"<= {TARGET_MIB} MiB\n")
    print_header(f"{'command':22s} {'tensors':>8s} {'peak RSS MiB':>13s} {'above floor':>12s} {'per 1k tensors':>15s} {'wall':>7s}")
    for r in rows:
        above = r["rss_mib"] - floor
        print(f"{r['command']:22s} {r['tensors']:8d} {r['rss_mib']:13.1f} {above:12.1f} "
              f"{above / r['tensors'] * 1000:13.3f}   {r['wall_s']:6.2f}s")
    largest = max(r["tensors"] for r in rows)
    worst = max(r["rss_mib"] for r in rows if r["tensors"] == largest)
    print(f"\nlargest peak at {largest} tensors: {worst:.1f} MiB ({'meets' if worst <= TARGET_MIB else 'misses'} "
          f"the {TARGET_MIB} MiB target); total benchmark time {time.perf_counter() - t0:.0f}s")
    print(json.dumps({"bench": "reapsurgery.tensor_count", "floor_rss_mib": round(floor, 1), "machine": machine,
                      "rows": rows, "target_mib": TARGET_MIB}, sort_keys=True))


if __name__ == "__main__":
    main()
