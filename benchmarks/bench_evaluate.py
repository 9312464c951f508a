#!/usr/bin/env python
"""Benchmark `reapsurgery evaluate` against `reapsurgery calibrate` on the same checkpoint and tokens.

One streamed pass reads each layer once whatever the number of variants; the compute grows
with them (each variant runs every layer once more, plus its LM head). This prints, for 1, 2
and 4 variants, evaluate's wall time and peak RSS and its ratio to calibrate's, measured in
the same run (alternated, medians over --repeat), then one JSON line.

1. Builds the random-weight Qwen3-MoE of bench_calibrate.py (16 layers x 64 experts, top-4,
   per-expert names as transformers saves them) of about --size-gb GiB (default 0.75, float32),
   with bench_calibrate's own builder, and writes --samples rows of --tokens random ids.
2. Calibrates it once and plans masks at sparsity 0.25, 0.5, 0.625, 0.75 with `plan`.
3. Times, in separate processes, page cache warm, alternating the order each repeat:
     calibrate: reapsurgery calibrate CKPT -o sal.json --dataset tokens.jsonl ... -q
     evaluate:  reapsurgery evaluate CKPT --mask m1.json [... m4.json] --dataset tokens.jsonl ... -q

    python benchmarks/bench_evaluate.py                  # ~0.75 GiB, 16 x 128 tokens, 2 repeats
    python benchmarks/bench_evaluate.py --size-gb 0.5 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    GiB, HF_ENV, dir_bytes, drop_scratch, machine_info, make_scratch, med_of, need_disk, paired_ratio,
    print_header, print_machine, reapsurgery_cmd, rounded, run_warm,
)
from bench_calibrate import write_tokens  # noqa: E402  (the same checkpoint and token files as bench_calibrate)

ENV = dict(HF_ENV, TQDM_DISABLE="1")
SPARSITIES = ["0.25", "0.5", "0.625", "0.75"]
VARIANTS = (1, 2, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.75, help="checkpoint size in GiB (keep it modest: <= 1)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    work = make_scratch(args.workdir, "bench-evaluate-")
    try:
        machine = machine_info(work, cp=False)
        need_disk(machine, work, args.size_gb * 1.2 + 0.2)
        ckpt = work / "ckpt"
        subprocess.run([sys.executable, str(HERE.parent / "bench_calibrate.py"), "--_build", str(ckpt),
                        "--size-gb", str(args.size_gb), "--dtype", "float32", "--seed", "0"], check=True, env=ENV)
        built = json.loads(Path(f"{ckpt}.build.json").read_text())
        tokens = work / "tokens.jsonl"
        write_tokens(tokens, args.samples, args.tokens, built["arch"]["vocab_size"], 0)
        data = ["--dataset", str(tokens), "--num-samples", str(args.samples), "--max-length", str(args.tokens),
                "--device", "cpu", "--dtype", "float32", "--batch-size", str(args.batch_size), "-q"]
        cmd = reapsurgery_cmd()
        sal = work / "sal.json"
        calibrate = cmd + ["calibrate", str(ckpt), "-o", str(sal), "--overwrite", *data]
        subprocess.run(calibrate, check=True, env=ENV, stdout=subprocess.DEVNULL)
        masks = []
        for s in SPARSITIES:
            masks.append(work / f"mask-{s}.json")
            subprocess.run(cmd + ["plan", str(sal), "--sparsity", s, "-o", str(masks[-1]), "--overwrite"], check=True, env=ENV,
                           stdout=subprocess.DEVNULL)
        runs: dict[str, list[dict]] = {"calibrate": [], **{f"evaluate x{k}": [] for k in VARIANTS}}
        commands = {"calibrate": calibrate}
        for k in VARIANTS:
            commands[f"evaluate x{k}"] = cmd + ["evaluate", str(ckpt), *[a for m in masks[:k] for a in ("--mask", str(m))],
                                                "-o", str(work / f"report{k}.json"), "--overwrite", *data]
        log = work / "runs.log"
        for r in range(args.repeat):
            order = list(commands) if r % 2 == 0 else list(reversed(commands))
            for name in order:
                runs[name].append(run_warm(commands[name], log, ckpt, ENV))
        size = dir_bytes(ckpt) / GiB
        machine["loadavg_end"] = list(os.getloadavg())
        print_machine("bench_evaluate", machine)
        print_header(f"checkpoint {size:.2f} GiB ({built['layers']} layers x {built['arch']['num_experts']} experts, "
                     f"float32), {args.samples} samples x {args.tokens} tokens, batch {args.batch_size}, "
                     f"{args.repeat} alternated run(s) each")
        base = med_of(runs["calibrate"], "wall_s")
        print(f"  {'command':<14} {'wall (median)':>14} {'peak RSS':>10} {'wall / calibrate':>17}")
        result = {}
        for name, ms in runs.items():
            ratio = paired_ratio(ms, runs["calibrate"]) if name != "calibrate" else 1.0
            wall, rss = med_of(ms, "wall_s"), max(m["rss_mib"] for m in ms)
            print(f"  {name:<14} {wall:>12.2f} s {rss:>6.0f} MiB {ratio:>17.2f}")
            result[name] = {"wall_s": wall, "rss_mib": rss, "ratio_to_calibrate": ratio,
                            "runs": [rounded(m) for m in ms]}
        report = json.loads((work / "report4.json").read_text())
        print("  quality at 4 variants: " + ", ".join(f"{v['sparsity']:.3g}: KL {v['kl_mean']:.3g}, "
                                                      f"top-1 {v['top1_agreement']:.3f}" for v in report["variants"]))
        print(json.dumps({"checkpoint_gib": size, "calibrate_wall_s": base, "results": result}))
    finally:
        drop_scratch(args.keep, work)


if __name__ == "__main__":
    main()
