#!/usr/bin/env python
"""Benchmark `reapsurgery apply`: wall time against `cp`, peak RSS, and the in-memory alternative.

One run does four things and prints a table, then one JSON line (the last line of stdout):

1. Builds synthetic Qwen3-MoE checkpoints (BF16, per-expert tensor names, shards of
   --shard-gb GiB, valid safetensors headers over arbitrary bytes, an exact index) of
   several sizes (--sizes, default 1.8 (about 1 GiB of output) and --size-gb).
2. For each size, times `reapsurgery apply` at 50% sparsity with 1 and N copy workers
   (--jobs), `cp -r` of the apply output (the very same bytes), `cat` of its shards to
   /dev/null (reading the kept bytes once, front to back: the read floor) and, for scale,
   `cp -r` of the input checkpoint, in rotating order,
   median of --repeat runs, twice: cold (sync, then drop_caches, before every command: what
   a real checkpoint of hundreds of GB sees) and warm (the command's input read once before).
3. Reports the peak RSS of the apply process alone (run under GNU time, see common.run_measured).
4. Builds a real (random-weight) Qwen3-MoE checkpoint with transformers and compares
   what users do today (from_pretrained, index_select the fused experts and router,
   save_pretrained) with `reapsurgery apply` of the same mask, and checks that both
   outputs hold byte-identical tensors.

    python benchmarks/bench_apply.py                 # 1.8 GiB (~1 GiB out) and 5 GiB, 3 repeats
    python benchmarks/bench_apply.py --size-gb 12 --repeat 2 --keep --workdir /data/bench

Sizes are GiB (2**30 bytes). Cold runs need root (writing /proc/sys/vm/drop_caches);
without it only warm runs are made, and a checkpoint larger than free memory is the way to
see cold behaviour.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402  (this directory; standard library only at import)
    GiB, HF_ENV, MiB, RSS_METHOD, Filler, alternated, dir_bytes, drop_scratch, fs_sync, machine_info, make_scratch, max_of,
    med_of, need_disk, copy_summary, print_copy_table, print_header, print_machine, reap, reapsurgery_cmd, rmtree, rounded,
    rotated, run_cold, can_drop_caches, run_measured, run_warm, shard_plan, synth_layer, tensor_order,
)

# Synthetic checkpoint: Qwen3-30B-A3B per-layer shapes, 64 experts, smaller vocab so that
# experts hold >90% of the bytes as in real MoE checkpoints.
SYNTH = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=64,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=32768)

# Real checkpoint for the in-memory comparison (~0.5 GB BF16 with 5 layers).
REAL = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32,
            num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
            vocab_size=32768, max_position_embeddings=4096, tie_word_embeddings=False,
            norm_topk_prob=True)


# --------------------------------------------------------------------------- synthetic checkpoint


def _nbytes(shape) -> int:
    return 2 * math.prod(shape)  # BF16


def synth_layers_for(size_bytes: int, c: dict) -> int:
    H, V = c["hidden_size"], c["vocab_size"]
    fixed = 2 * _nbytes((V, H)) + _nbytes((H,))
    per_layer = sum(_nbytes(s) for _, s in synth_layer(0, c))
    return max(1, round((size_bytes - fixed) / per_layer))


def build_synthetic(out: Path, size_gib: float, shard_gib: float, seed: int = 0) -> dict:
    """Write a Qwen3-MoE-shaped checkpoint of ~size_gib GiB; returns a description."""
    sio = reap("safetensors_io")

    c = dict(SYNTH)
    layers = synth_layers_for(int(size_gib * GiB), c)
    shards = shard_plan(tensor_order(c, layers), 2, int(shard_gib * GiB))  # BF16

    out.mkdir(parents=True)
    filler = Filler(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        idx = sio.write_order([(n, "BF16") for n, _ in tensors])
        entries = [(tensors[j][0], "BF16", tensors[j][1], _nbytes(tensors[j][1])) for j in idx]
        data = sum(e[3] for e in entries)
        fd = os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, sio.encode_header(entries, {"format": "pt"}))
            filler.write(fd, data)
        finally:
            os.close(fd)
        for name, *_ in entries:
            weight_map[name] = fname
        total += data

    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151645, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 40960, "max_window_layers": layers,
        "mlp_only_layers": [], "norm_topk_prob": True, "num_hidden_layers": layers,
        "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False, **c,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 40960}) + "\n")
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# synthetic Qwen3-MoE (bench_apply.py)\n")
    return {"layers": layers, "shards": len(shards), "tensor_bytes": total, "file_bytes": dir_bytes(out)}


# --------------------------------------------------------------------------- helpers


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.suffix == ".safetensors")


def make_mask(ckpt: Path, path: Path, kind: str, seed: int) -> list[int]:
    Checkpoint, Mask = reap("checkpoint").Checkpoint, reap("mask").Mask

    c = Checkpoint.open(ckpt)
    E = c.num_experts
    layers = {}
    for L in c.moe_layers:
        if kind == "even":
            layers[L] = list(range(0, E, 2))
        else:
            layers[L] = sorted(random.Random(seed * 1000 + L).sample(range(E), E // 2))
    Mask(model=c.fingerprint(), layers=layers,
         provenance={"method": f"bench_apply {kind} half", "seed": seed}).save(path)
    return layers[c.moe_layers[0]]


def check_synthetic_output(src: Path, out: Path, mask_path: Path) -> str:
    """Header-level verify plus a byte comparison of a few retained tensors and one router."""
    Checkpoint, load_mask, verify = reap("checkpoint").Checkpoint, reap("mask").load_mask, reap("verify").verify

    rep = verify(out)
    if not rep.ok:
        return "verify FAILED: " + "; ".join(rep.problems[:3])
    mask = load_mask(mask_path)
    s, o = Checkpoint.open(src), Checkpoint.open(out)
    st, ot = s.tensors(), o.tensors()

    def read(ck, tensors, name, off=0, n=None):
        shard, info = tensors[name]
        n = info.nbytes if n is None else n
        with open(ck.path / shard, "rb") as f:
            f.seek(ck.header(shard).data_offset + info.start + off)
            return f.read(n)

    L = o.moe_layers[-1]
    keep = mask.layers[L]
    checks = 0
    for j in (0, len(keep) // 2, len(keep) - 1):
        for proj in ("gate_proj", "down_proj"):
            a = read(o, ot, f"model.layers.{L}.mlp.experts.{j}.{proj}.weight")
            b = read(s, st, f"model.layers.{L}.mlp.experts.{keep[j]}.{proj}.weight")
            if a != b:
                return f"MISMATCH layer {L} expert {j}<-{keep[j]} {proj}"
            checks += 1
    row = st[f"model.layers.{L}.mlp.gate.weight"][1].shape[1] * 2
    router = read(o, ot, f"model.layers.{L}.mlp.gate.weight")
    for j, e in enumerate(keep):
        if router[j * row:(j + 1) * row] != read(s, st, f"model.layers.{L}.mlp.gate.weight", e * row, row):
            return f"MISMATCH router row {j}<-{e}"
    a = read(o, ot, "lm_head.weight", 0, 1 << 20)
    if a != read(s, st, "lm_head.weight", 0, 1 << 20):
        return "MISMATCH lm_head"
    return f"ok (verify ok, {rep.tensors} tensors, {checks} expert tensors + router + lm_head byte-equal)"


# --------------------------------------------------------------------------- subprocess helpers


def helper_build_real(out: str, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=layers, **REAL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200MB")
    Path(out, "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# random Qwen3-MoE (bench_apply.py)\n")


def helper_inmemory(ckpt: str, mask_path: str, out: str) -> None:
    """What users do today: load everything, drop experts from the fused tensors, save."""
    import torch
    from transformers import AutoModelForCausalLM

    mask = json.loads(Path(mask_path).read_text())
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    kept = None
    with torch.no_grad():
        for key, keep in mask["layers"].items():
            mlp = model.model.layers[int(key)].mlp
            idx = torch.tensor(keep, dtype=torch.long)
            ex = mlp.experts
            ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj.index_select(0, idx), requires_grad=False)
            ex.down_proj = torch.nn.Parameter(ex.down_proj.index_select(0, idx), requires_grad=False)
            ex.num_experts = len(keep)
            mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.index_select(0, idx), requires_grad=False)
            mlp.gate.num_experts = len(keep)
            kept = len(keep)
    model.config.num_experts = kept
    model.save_pretrained(out, max_shard_size="200MB")


def compare_outputs(a: Path, b: Path) -> str:
    """Same tensor names, dtypes, shapes and bytes in two checkpoints (reads raw bytes, no torch)."""
    Checkpoint = reap("checkpoint").Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    ta, tb = ca.tensors(), cb.tensors()
    if set(ta) != set(tb):
        only = sorted(set(ta) ^ set(tb))[:4]
        return f"DIFFERENT tensor names ({len(ta)} vs {len(tb)}; e.g. {only})"
    if ca.num_experts != cb.num_experts:
        return f"DIFFERENT num_experts in config ({ca.num_experts} vs {cb.num_experts})"
    for name in sorted(ta):
        (sa, ia), (sb, ib) = ta[name], tb[name]
        if (ia.dtype, ia.shape) != (ib.dtype, ib.shape):
            return f"DIFFERENT {name}: {ia.dtype}{list(ia.shape)} vs {ib.dtype}{list(ib.shape)}"
        with open(ca.path / sa, "rb") as fa, open(cb.path / sb, "rb") as fb:
            fa.seek(ca.header(sa).data_offset + ia.start)
            fb.seek(cb.header(sb).data_offset + ib.start)
            if fa.read(ia.nbytes) != fb.read(ib.nbytes):
                return f"DIFFERENT bytes in {name}"
    return f"identical ({len(ta)} tensors byte-equal, num_experts {ca.num_experts})"


# --------------------------------------------------------------------------- benchmark phases


def print_rep(r: int, op: str, width: int, m: dict) -> None:
    print(f"  rep {r + 1} {op:{width}s}: {m['wall_s']:6.2f}s (+sync {m['sync_s']:5.2f}s)  "
          f"rss {m['rss_mib']:7.1f} MiB  user {m['user_s']:.2f}s sys {m['sys_s']:.2f}s  "
          f"machine busy {m['machine_busy_pct']:3.0f}%", flush=True)


def bench_size(args, work: Path, size: float, log: Path, results: list) -> None:
    ck = (args.input_work or work) / f"synth-{size:g}g"
    print(f"\n[size {size:g} GiB] building synthetic checkpoint in {ck} ...", flush=True)
    t = time.perf_counter()
    desc = build_synthetic(ck, size, args.shard_gb, seed=args.seed)
    build_s = time.perf_counter() - t
    sync_s = fs_sync(ck)
    print(f"  built {desc['file_bytes'] / GiB:.2f} GiB, {desc['layers']} layers x {SYNTH['num_experts']} experts, "
          f"{desc['shards']} shards, in {build_s:.1f}s (+{sync_s:.1f}s sync)", flush=True)
    mask = work / f"mask-{size:g}g.json"
    make_mask(ck, mask, args.mask, args.seed)
    ref = work / f"ref-{size:g}g"  # one apply output: what cp copies and cat reads (the same bytes)
    run_measured(reapsurgery_cmd() + ["apply", str(mask), str(ck), str(ref), "-q"], log)
    check = check_synthetic_output(ck, ref, mask)
    print(f"  output check: {check}", flush=True)
    shards = " ".join(str(p) for p in weight_files(ref))

    ops = [f"apply-j{j}" for j in args.jobs] + ["cp", "cp-in", "cat"]
    res = {"size_gib": size, "input_bytes": desc["file_bytes"], "layers": desc["layers"],
           "num_experts": SYNTH["num_experts"], "shards": desc["shards"], "output_bytes": dir_bytes(ref),
           "output_weight_bytes": sum(p.stat().st_size for p in weight_files(ref)), "check": check, "modes": {}}
    n = 0
    for mode in args.modes:
        runs: dict[str, list] = {op: [] for op in ops}
        for r, order in rotated(args.repeat, ops):
            for op in order:
                n += 1
                target = work / f"{op}-{size:g}g-{n}"
                if op.startswith("apply"):
                    src = ck
                    cmd = reapsurgery_cmd() + ["apply", str(mask), str(ck), str(target), "-q", "--jobs", op[7:]]
                elif op == "cp":
                    src, cmd = ref, ["cp", "-r", str(ref), str(target)]
                elif op == "cp-in":  # what copying the checkpoint costs, for scale
                    src, cmd = ck, ["cp", "-r", str(ck), str(target)]
                else:
                    src, cmd = ref, ["sh", "-c", f"cat {shards} > /dev/null"]
                m = run_cold(cmd, log, work) if mode == "cold" else run_warm(cmd, log, src, sync=work)
                runs[op].append(m)
                print_rep(r, f"{mode} {op}", 14, m)
                rmtree(target)
        res["modes"][mode] = {
            **copy_summary(runs, ops),
            "machine_busy_pct": med_of([m for op in ops for m in runs[op]], "machine_busy_pct"),
        }
    rmtree(ref)
    if not args.keep:
        rmtree(ck)
    fs_sync(work)
    results.append(res)


def bench_real(args, work: Path, log: Path) -> dict:
    ck = work / "real-qwen3-moe"
    print(f"\n[real model] building random-weight Qwen3-MoE ({args.real_layers} layers) with transformers in {ck} ...",
          flush=True)
    t = time.perf_counter()
    run_measured([sys.executable, str(HERE), "--_build-real", str(ck), "--real-layers", str(args.real_layers)], log,
                 HF_ENV)
    fs_sync(work)
    size = dir_bytes(ck)
    print(f"  built {size / MiB:.0f} MiB in {time.perf_counter() - t:.1f}s", flush=True)
    mask = work / "mask-real.json"
    make_mask(ck, mask, args.mask, args.seed)

    runs = {"inmemory": [], "apply": []}
    same = None
    for r, order in alternated(args.repeat, "inmemory", "apply"):
        for op in order:
            target = work / f"real-{op}-{r}"
            if op == "apply":
                cmd = reapsurgery_cmd() + ["apply", str(mask), str(ck), str(target)]
            else:
                cmd = [sys.executable, str(HERE), "--_inmemory", str(ck), str(mask), str(target)]
            m = run_warm(cmd, log, ck, HF_ENV, sync=work)
            runs[op].append(m)
            print_rep(r, op, 8, m)
        if same is None:
            same = compare_outputs(work / f"real-apply-{r}", work / f"real-inmemory-{r}")
            print(f"  outputs: {same}", flush=True)
        out_bytes = dir_bytes(work / f"real-apply-{r}")
        for op in order:
            rmtree(work / f"real-{op}-{r}")
    if not args.keep:
        rmtree(ck)
    a, b = runs["apply"], runs["inmemory"]
    res = {
        "input_bytes": size,
        "layers": args.real_layers,
        "num_experts": REAL["num_experts"],
        "output_bytes": out_bytes,
        "inmemory_s": med_of(b, "wall_s"),
        "apply_s": med_of(a, "wall_s"),
        "inmemory_rss_mib": max_of(b, "rss_mib"),
        "apply_rss_mib": max_of(a, "rss_mib"),
        "inmemory_sync_s": med_of(b, "wall_sync_s"),
        "apply_sync_s": med_of(a, "wall_sync_s"),
        "outputs": same,
        "runs": runs,
    }
    res["speedup"] = res["inmemory_s"] / res["apply_s"]
    res["rss_ratio"] = res["inmemory_rss_mib"] / res["apply_rss_mib"]
    return res


# --------------------------------------------------------------------------- report


def report(args, machine: dict, floor: dict, sizes: list[dict], real: dict | None, total_s: float) -> None:
    p = print
    print_machine("reapsurgery apply benchmark", machine, tools=f", {machine['cp']}")
    p(f"settings: mask={args.mask} half (50% sparsity), shards {args.shard_gb:g} GiB, repeat {args.repeat} "
      f"(median; order rotated), jobs {args.jobs}, {'/'.join(args.modes)} page cache, sync before each run")
    p(f"interpreter floor: `reapsurgery --version` peak RSS {floor['rss_mib']:.1f} MiB, {floor['wall_s']:.2f}s (median of 3) "
      f"(fixed start-up cost inside every apply wall time); entry point {reapsurgery_cmd()[0]}")
    if args.input_work:
        p(f"inputs on {machine['input_dir']} ({machine['input_fstype']}), outputs on {machine['workdir']}: "
          f"cross-filesystem copies")

    jobs = [f"apply-j{j}" for j in args.jobs]
    p("\n1) apply vs cp of the same output bytes and vs cat of them (the read floor), synthetic Qwen3-MoE, BF16")
    print_copy_table(p, sizes, jobs, ("busy", lambda m: f"{m['machine_busy_pct']:4.0f}%"))
    p("   medians of the rotated runs; jN/cp = apply with N jobs / cp -r of its output, jN/cat = / cat of the output's")
    p("   shards to /dev/null, jN/cpin = / cp -r of the input checkpoint (for scale: apply writes about half of it);")
    p("   cold = sync + drop_caches before every command, warm = inputs read once before;")
    p("   apply times include interpreter start-up. Targets: at 5 GiB cold <= 1.0 and warm <= 0.6 x cp; at ~1 GiB")
    p("   of output <= 1.1 x cp.")
    for r in sizes:
        for mode, m in r["modes"].items():
            p(f"   {r['size_gib']:g} GiB {mode}: " + "; ".join(f"{op} [{', '.join(f'{x:.2f}' for x in xs)}]"
                                                        for op, xs in m["runs_s"].items()) +
              "; paired /cp " + ", ".join(f"{op[6:]} {v:.2f}" for op, v in m["paired_cp"].items()))
        p(f"      output check: {r['check']}")
    if any(m["machine_busy_pct"] > 65 for r in sizes for m in r["modes"].values()):
        p(f"   WARNING: other processes kept the {machine['nproc']} CPUs busy during the runs; wall times are noisy")

    if real:
        p(f"\n3) today's approach vs apply on a real random-weight Qwen3-MoE "
          f"({real['input_bytes'] / MiB:.0f} MiB, {real['layers']} layers x {real['num_experts']} experts, BF16)")
        hdr = f"{'method':<48} | {'wall s':>7} {'+sync s':>8} | {'peak RSS':>10}"
        print_header(hdr)
        p(f"{'from_pretrained + index_select + save_pretrained':<48} | {real['inmemory_s']:7.2f} "
          f"{real['inmemory_sync_s']:8.2f} | {real['inmemory_rss_mib']:6.0f} MiB")
        p(f"{'reapsurgery apply':<48} | {real['apply_s']:7.2f} {real['apply_sync_s']:8.2f} | "
          f"{real['apply_rss_mib']:6.0f} MiB")
        p(f"   apply is {real['speedup']:.1f}x faster and uses {real['rss_ratio']:.1f}x less peak memory; "
          f"outputs: {real['outputs']}")
    p(f"\ntotal benchmark time {total_s:.0f}s")

    summary = {
        "bench": "reapsurgery.apply",
        "machine": machine,
        "settings": {"sizes_gib": args.sizes, "shard_gib": args.shard_gb, "repeat": args.repeat, "mask": args.mask,
                     "seed": args.seed, "jobs": args.jobs, "modes": args.modes},
        "floor_rss_mib": round(floor["rss_mib"], 1),
        "floor_wall_s": round(floor["wall_s"], 3),
        "sizes": sizes,
        "real": None if not real else rounded(real, skip=("runs",)),
        "total_s": round(total_s, 1),
    }
    print(json.dumps(summary, sort_keys=True))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=5.0, help="largest synthetic checkpoint, GiB (default 5)")
    ap.add_argument("--sizes", type=str, default=None,
                    help="comma-separated synthetic sizes in GiB (default: 1.8 (~1 GiB of output) and SIZE)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size, GiB (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions per measurement (median)")
    ap.add_argument("--jobs", type=str, default=None,
                    help="comma-separated apply --jobs values to time (default: 1 and apply's default)")
    ap.add_argument("--modes", type=str, default=None,
                    help="cold,warm (default: both; cold needs permission to write /proc/sys/vm/drop_caches)")
    ap.add_argument("--mask", choices=["even", "random"], default="even",
                    help="keep experts 0,2,4,... or a seeded random half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-layers", type=int, default=5,
                    help="layers of the real transformers-built model (~110 MB each; 0 skips that part)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--input-dir", type=Path, default=None,
                    help="build the synthetic checkpoints here instead of the workdir, e.g. on another "
                         "filesystem to measure cross-filesystem copies (default: the workdir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--_build-real", dest="build_real", help=argparse.SUPPRESS)
    ap.add_argument("--_inmemory", dest="inmemory", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.build_real:
        return helper_build_real(args.build_real, args.real_layers)
    if args.inmemory:
        return helper_inmemory(*args.inmemory)

    args.sizes = sorted(float(s) for s in args.sizes.split(",")) if args.sizes else [1.8, args.size_gb]
    default_jobs = __import__("reapsurgery.surgery.copier", fromlist=["default_jobs"]).default_jobs()
    args.jobs = [int(j) for j in args.jobs.split(",")] if args.jobs else sorted({1, default_jobs})
    args.modes = args.modes.split(",") if args.modes else ["cold", "warm"]
    if "cold" in args.modes and not can_drop_caches():
        print("cannot drop the page cache here (needs root and a writable /proc/sys/vm/drop_caches): warm runs only;"
              " for cold numbers use a checkpoint larger than free memory (--size-gb)", file=sys.stderr)
        args.modes = [m for m in args.modes if m != "cold"]
    work = make_scratch(args.workdir, "reapsurgery-bench-")
    log = work / "commands.log"
    machine = machine_info(work)
    args.input_work = None
    if args.input_dir:
        args.input_work = make_scratch(args.input_dir, "reapsurgery-bench-in-")
        im = machine_info(args.input_work)
        machine["input_dir"], machine["input_fstype"] = str(args.input_work), im["fstype"]
    print(f"scratch {work} (log of every command: {log})", flush=True)
    t0 = time.perf_counter()
    try:
        need = max(args.sizes) * (1.6 if args.input_work else 2.6) + 2
        need_disk(machine, work, need)
        floors = [run_measured(reapsurgery_cmd() + ["--version"], log) for _ in range(3)]
        floor = {"wall_s": med_of(floors, "wall_s"), "rss_mib": max_of(floors, "rss_mib"), "rss_method": RSS_METHOD}
        sizes: list[dict] = []
        for size in args.sizes:
            bench_size(args, work, size, log, sizes)
        real = bench_real(args, work, log) if args.real_layers > 0 else None
        machine["loadavg_end"] = list(os.getloadavg())
        report(args, machine, floor, sizes, real, time.perf_counter() - t0)
    finally:
        drop_scratch(args.keep, work, args.input_work)


if __name__ == "__main__":
    main()
