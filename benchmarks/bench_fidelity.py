#!/usr/bin/env python
"""What pruning does to a model that has learned something, criterion by criterion, and whether
`evaluate` predicts the checkpoints `apply` writes.

For each --aux-coef (the router's load-balancing loss; default: transformers' 0.001, and 0.1 for
routing closer to even, as in the REAP paper's models):

1. The trained Qwen3-MoE of fidelity_model.py (the standard library's source split by file into
   train / calibration / held-out; a BPE tokenizer trained with `tokenizers`; a fixed number of
   optimizer steps, so the model is the same however loaded the machine; cached by its options).
2. `reapsurgery calibrate` on the calibration split (and once on the held-out split, for the
   routing the held-out text sees: the share of routed tokens each mask keeps, and the balance).
3. --random random masks per sparsity; ONE `reapsurgery evaluate` pass on the held-out split over
   every criterion (`--method` all of plan's methods) x --sparsities and the random masks.
4. `reapsurgery plan --from-evaluation` at each sparsity (the tool's measured choice, by KL), REAP
   and one random mask at the highest sparsity: each `apply`-written, loaded with transformers'
   AutoModelForCausalLM, and its held-out perplexity set against evaluate's prediction.

Prints, per model, the routing balance (share of routed tokens taken by the busiest quarter of
experts, per layer and overall) and a markdown table (criterion x sparsity: perplexity, KL, top-1
agreement, share of routed tokens kept), then the apply check.

    python benchmarks/bench_fidelity.py                       # both regimes; trains what is not cached
    python benchmarks/bench_fidelity.py --aux-coef 0.001 --steps 400 --samples 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    HF_ENV, drop_scratch, machine_info, make_scratch, print_machine, reap, reapsurgery_cmd, rmtree,
)
import fidelity_model  # noqa: E402

ENV = dict(HF_ENV, TQDM_DISABLE="1")
METHODS = ("reap", "frequency", "weighted-frequency", "ean-sum", "ean-mean", "weighted-ean")


def run(args: list, log: Path) -> float:
    """A reapsurgery command; its output appended to `log`; the seconds it took."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ reapsurgery " + " ".join(map(str, args)) + "\n")
        f.flush()
        r = subprocess.run([*reapsurgery_cmd(), *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=ENV)
    if r.returncode:
        raise SystemExit(f"reapsurgery {' '.join(map(str, args))} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def counts(saliency_path: Path) -> dict[int, list[float]]:
    """Routed tokens per expert, per MoE layer, from a saliency file."""
    sal = reap("saliency").load_saliency(saliency_path)
    return {l: list(s.count) for l, s in sorted(sal.layers.items())}


def busiest_quarter(routed: dict[int, list[float]]) -> tuple[dict[int, float], float]:
    """Share of routed tokens taken by the busiest quarter of experts, per layer and over all layers."""
    per, top_all, total_all = {}, 0.0, 0.0
    for l, c in routed.items():
        top = sum(sorted(c, reverse=True)[: max(1, len(c) // 4)])
        per[l] = top / sum(c)
        top_all, total_all = top_all + top, total_all + sum(c)
    return per, top_all / total_all


def kept_share(layers: dict[int, list[int]], routed: dict[int, list[float]]) -> float:
    """Share of the (token, expert) routings of the original model that go to experts the mask keeps."""
    kept = sum(routed[l][e] for l, es in layers.items() for e in es)
    return kept / sum(sum(c) for c in routed.values())


def random_masks(model: Path, sparsities: list[float], n: int, seed: int, out: Path) -> list[tuple[float, Path]]:
    """n masks per sparsity, each layer keeping a uniformly random set of experts."""
    Checkpoint = reap("checkpoint").Checkpoint
    Mask = reap("mask").Mask
    ckpt = Checkpoint.open(model)
    fp = ckpt.fingerprint()
    E = fp["num_experts"]
    rnd = random.Random(seed)
    made = []
    for s in sparsities:
        keep = E - math.floor(s * E + 0.5)
        for j in range(n):
            layers = {l: sorted(rnd.sample(range(E), keep)) for l in ckpt.moe_layers}
            path = out / f"random-{s}-{j}.json"
            Mask(fp, layers, {"method": "random", "seed": seed, "sparsity": s, "index": j}).save(path, overwrite=True)
            made.append((s, path))
    return made


def transformers_perplexity(model_dir: Path, samples: list[list[int]]) -> float:
    """exp(mean next-token NLL) of the checkpoint loaded whole by transformers, sample by sample."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in samples:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            n += len(ids) - 1
    return math.exp(nll / n)


def one_model(args: argparse.Namespace, aux: float, work: Path) -> dict:
    t0 = time.perf_counter()
    margs = argparse.Namespace(**{**vars(args), "aux_coef": aux})
    model, info = fidelity_model.trained_model(margs, args.cache)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    rows = fidelity_model.split_data(model / "tokenizer.json", work, args.max_length, 1 << 30)
    data = ["--num-samples", args.samples, "--max-length", args.max_length, "--dtype", "float32", "--device", "cpu",
            "--batch-size", 8, "-q"]
    sal, sal_held = work / "saliency.json", work / "saliency-held-out.json"
    seconds = {"calibrate": run(["calibrate", model, "-o", sal, "--dataset", work / "calibration.jsonl", *data], log)}
    run(["calibrate", model, "-o", sal_held, "--dataset", work / "held_out.jsonl", *data], log)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    randoms = random_masks(model, sparsities, args.random, args.seed, work)
    report = work / "report.json"
    seconds["evaluate"] = run(["evaluate", model, sal, "--method", ",".join(METHODS), "--sparsity", args.sparsities,
                               *[a for _, p in randoms for a in ("--mask", p)], "--dataset", work / "held_out.jsonl",
                               *data, "-o", report, "--plot", work / "report.png"], log)
    rep = json.loads(report.read_text())

    routed = counts(sal_held)
    plan_from_files = reap("plan").plan_from_files
    load_mask = reap("mask").load_mask
    for v in rep["variants"]:
        made = v["made"]
        if "method" in made and "saliency" in made:
            layers = plan_from_files(sal, model, method=made["method"], sparsity=made.get("sparsity"),
                                     keep=made.get("keep")).mask.layers
        else:
            layers = load_mask(made["mask_file"]).layers
        v["kept_share"] = kept_share(layers, routed)

    # the checkpoints apply writes, loaded with transformers: the tool's choice at each sparsity, REAP and a random
    # mask at the highest sparsity
    samples = reap("data").load_samples(str(work / "held_out.jsonl"), model, num_samples=args.samples,
                                        max_length=args.max_length, seed=0).samples
    checks = []
    top = max(sparsities)
    targets = [(f"measured choice at {s:g} (plan --from-evaluation, by KL)", ["--from-evaluation", report, "--sparsity", s])
               for s in sparsities]
    targets.append((f"reap at {top:g}", ["--method", "reap", "--sparsity", top]))
    for label, opts in targets:
        mask = work / f"chosen-{len(checks)}.json"
        run(["plan", sal, *opts, "-o", mask, "--ckpt", model], log)
        checks.append((label, mask))
    checks.append((f"random mask 0 at {top:g}", next(p for s, p in randoms if s == top)))
    applied = []
    for label, mask in checks:
        out = work / f"applied-{len(applied)}"
        run(["apply", mask, model, out, "-q"], log)
        m = load_mask(mask)
        chosen = m.provenance.get("chosen_by", {})
        sha = chosen.get("measured_mask_sha256") or m.sha256
        (variant,) = [v for v in rep["variants"] if v["mask_sha256"] == sha]
        ppl = transformers_perplexity(out, samples)
        applied.append({"mask": label, "variant": Path(variant["source"]).name, "experts_kept": variant["experts_kept"],
                        "evaluate_ppl": variant["perplexity"],
                        "transformers_ppl": ppl, "relative": abs(ppl - variant["perplexity"]) / ppl})
        rmtree(out)
    per_layer, overall = busiest_quarter(routed)
    return {"aux_coef": aux, "model": str(model), "training": info, "rows": rows, "report": rep,
            "balance": {"per_layer": per_layer, "overall": overall}, "applied": applied, "seconds": seconds,
            "total_seconds": time.perf_counter() - t0, "work": str(work)}


def print_model(r: dict, args: argparse.Namespace) -> None:
    rep, info = r["report"], r["training"]
    orig = rep["original"]
    E = orig["experts"]
    print(f"\n### router_aux_loss_coef {r['aux_coef']}\n")
    print(f"model: {r['model']}")
    print(f"trained {info['options']['steps']} steps x {info['options']['batch']} x {info['options']['seq_len']} "
          f"tokens ({info['tokens_seen']:,} tokens seen of {info['train_tokens']:,} in {info['train_files']} files) in "
          f"{info['train_seconds']:.0f} s, final training loss {info['final_loss']:.3f}; "
          f"calibrate {r['seconds']['calibrate']:.0f} s, one evaluate pass over {len(rep['variants'])} variants "
          f"{r['seconds']['evaluate']:.0f} s")
    d = rep["data"]
    print(f"held-out: {d['samples']} samples x {args.max_length} tokens ({d['predicted_positions']} predicted "
          f"positions); original perplexity {orig['perplexity']:.2f}")
    per = " ".join(f"{l}: {s:.0%}" for l, s in r["balance"]["per_layer"].items())
    print(f"routing balance (held-out): the busiest quarter of the {E} experts takes {r['balance']['overall']:.0%} "
          f"of the routed tokens (per layer {per}; even routing: 25%)\n")
    print("| sparsity | criterion | perplexity | KL (nats) | top-1 agreement | routed tokens kept |")
    print("|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for v in rep["variants"]:
        name = v["made"]["method"] if "method" in v["made"] else "random"
        groups.setdefault((v["sparsity"], name), []).append(v)
    for s in sorted({k[0] for k in groups}):
        best = min((vs[0]["perplexity"], name) for (sp, name), vs in groups.items() if sp == s and name != "random")[1]
        for (sp, name), vs in sorted(groups.items(), key=lambda kv: kv[0][1] == "random"):  # criteria, then random
            if sp != s:
                continue
            mean = lambda key: sum(v[key] for v in vs) / len(vs)  # noqa: E731
            label = f"**{name}**" if name == best else name
            if len(vs) > 1:
                ppls = [v["perplexity"] for v in vs]
                label = f"random (mean of {len(vs)})"
                ppl = f"{mean('perplexity'):.1f} ({min(ppls):.1f}-{max(ppls):.1f})"
            else:
                ppl = f"{vs[0]['perplexity']:.3f}"
            print(f"| {s:.0%} ({E - round(s * E)} of {E}) | {label} | {ppl} | {mean('kl_mean'):.4f} | "
                  f"{mean('top1_agreement'):.4f} | {mean('kept_share'):.1%} |")
    print("\n(bold: the lowest held-out perplexity at that sparsity among the criteria; rank below: by held-out "
          "perplexity among the six criteria at that sparsity)\n")
    print("| checkpoint written by apply | evaluated as | evaluate perplexity | transformers perplexity | relative "
          "difference | rank among the criteria |")
    print("|---|---|---|---|---|---|")
    for a in r["applied"]:
        same = sorted(v["perplexity"] for v in rep["variants"]
                      if "method" in v["made"] and v["experts_kept"] == a["experts_kept"])
        rank = f"{same.index(a['evaluate_ppl']) + 1} of {len(same)}" if a["evaluate_ppl"] in same else "-"
        print(f"| {a['mask']} | {a['variant']} | {a['evaluate_ppl']:.4f} | {a['transformers_ppl']:.4f} | "
              f"{a['relative']:.1e} | {rank} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fidelity_model.add_model_options(ap, several=True)
    ap.add_argument("--sparsities", default="0.25,0.5,0.75")
    ap.add_argument("--random", type=int, default=3, help="random masks per sparsity")
    ap.add_argument("--samples", type=int, default=128, help="calibration and held-out samples")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "reapsurgery-bench",
                    help="where trained models are kept (keyed by their options)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    work = make_scratch(args.workdir, "bench-fidelity-")
    t0 = time.perf_counter()
    try:
        machine = machine_info(work, cp=False)
        results = [one_model(args, float(a), work / f"aux-{a}") for a in args.aux_coef.split(",")]
        machine["loadavg_end"] = list(os.getloadavg())
        print_machine(f"bench_fidelity: {' '.join(sys.argv[1:]) or '(defaults)'}; {time.perf_counter() - t0:.0f} s",
                      machine, f", torch threads while training {args.threads}")
        for r in results:
            print_model(r, args)
        print(json.dumps({"results": [{k: v for k, v in r.items() if k not in ("report",)} for r in results]},
                         default=str))
    finally:
        drop_scratch(args.keep, work)


if __name__ == "__main__":
    main()
