#!/usr/bin/env python
"""Benchmark what a refusal costs: wall time of calibrate's and evaluate's refusals against
`verify` of a missing checkpoint (a command that never imports torch) and against importing
torch and transformers (what a refusal used to pay first).

A refusal should cost nothing: each case must exit 2 with one `error:` line, and its wall time
is printed with its ratio to `verify`'s. Runs are rotated (every case once per round, the order
shifting), medians of --repeat rounds. `--tree DIR` times the reapsurgery source in DIR instead
of this checkout (e.g. the main branch, for a before/after).

    python benchmarks/bench_refusals.py                 # 5 rounds
    python benchmarks/bench_refusals.py --tree ../main  # the same cases on another checkout

Prints a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from common import drop_scratch, machine_info, make_scratch, med, print_header, print_machine, rotated  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each runs every case once")
    ap.add_argument("--tree", type=Path, default=HERE.parent.parent, help="the reapsurgery source to time")
    ap.add_argument("--workdir", type=Path, default=None, help="where the tiny checkpoint is built")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    work = make_scratch(args.workdir, "bench-refusals-")
    machine = machine_info(work, cp=False)
    env = {**os.environ, "PYTHONPATH": str(args.tree.resolve()), "HF_HUB_OFFLINE": "1"}
    ckpt, mask = work / "ckpt", work / "mask.json"
    subprocess.run([sys.executable, "-m", "fixtures.build", "qwen3_moe", str(ckpt)], cwd=HERE.parent.parent,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", "import sys; from tests.helpers import write_mask; "
                    "from pathlib import Path; write_mask(Path(sys.argv[1]), [0, 2, 5, 7], Path(sys.argv[2]))",
                    str(ckpt), str(mask)], cwd=HERE.parent.parent, check=True, capture_output=True)
    no_cuda = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"],
                             capture_output=True).returncode != 0
    rs = [sys.executable, "-m", "reapsurgery"]
    cases = {
        "verify: missing checkpoint (reference)": rs + ["verify", str(work / "nockpt")],
        "calibrate: missing checkpoint": rs + ["calibrate", str(work / "nockpt"), "-o", str(work / "s.json")],
        "calibrate: missing dataset": rs + ["calibrate", str(ckpt), "-o", str(work / "s.json"),
                                            "--dataset", str(work / "no.jsonl")],
        "evaluate: option error (--sparsity abc)": rs + ["evaluate", str(ckpt), str(mask), "--sparsity", "abc"],
        "evaluate: missing dataset": rs + ["evaluate", str(ckpt), "--mask", str(mask), "--dataset",
                                           str(work / "no.jsonl")],
    }
    if no_cuda:  # where there is a driver the refusal is torch's, not a cheap one
        cases["calibrate: --device cuda, no CUDA"] = rs + ["calibrate", str(ckpt), "-o", str(work / "s.json"),
                                                           "--device", "cuda"]
    importing = "import torch, transformers (not a refusal)"
    cases[importing] = [sys.executable, "-c", "import torch, transformers"]

    walls: dict[str, list[float]] = {name: [] for name in cases}
    for _, order in rotated(args.repeat, list(cases)):
        for name in order:
            t0 = time.perf_counter()
            r = subprocess.run(cases[name], capture_output=True, text=True, env=env, cwd=work)
            walls[name].append(time.perf_counter() - t0)
            refusal = name != importing
            if refusal and (r.returncode != 2 or len(r.stderr.splitlines()) != 1 or not r.stderr.startswith("error: ")):
                raise SystemExit(f"{name}: expected one error line and exit 2, got {r.returncode}:\n{r.stderr}")
    machine["loadavg_end"] = list(os.getloadavg())

    print_machine(f"refusal cost, {args.tree.resolve()}, medians of {args.repeat} rotated rounds", machine)
    reference = med(walls["verify: missing checkpoint (reference)"])
    hdr = f"{'case':<46} {'wall (median)':>14} {'/ verify':>9}"
    print_header(hdr)
    summary = {}
    for name, xs in walls.items():
        print(f"{name:<46} {med(xs):>12.2f} s {med(xs) / reference:>9.2f}")
        summary[name] = {"wall_s": round(med(xs), 4), "ratio_to_verify": round(med(xs) / reference, 3)}
    drop_scratch(args.keep, work)
    print(json.dumps({"tree": str(args.tree.resolve()), "machine": machine, "cases": summary}))


if __name__ == "__main__":
    main()
