#!/usr/bin/env python
"""Benchmark `reapsurgery apply` on GGUF files: wall time against `cp` of its own output, and peak RSS.

1. Builds synthetic quantized GGUF files of several sizes (--sizes, GiB): Qwen3-30B-A3B's shapes
   (hidden 2048, 64 experts of 768, top-8), experts in Q4_K (gate, up) and Q6_K (down), attention
   in Q8_0, a router in F32 per layer, a 151,936-token vocabulary with as many merges and a chat
   template (a real model's header: ~5 MB of metadata), arbitrary bytes as data; one file, or a
   split set of --split parts named as gguf-split names them.
2. For each size times `reapsurgery apply` at 50% sparsity (-j 1 and the default jobs), `cp` of
   its output (the very same bytes), `cat` of the output to /dev/null (the read floor) and `cp` of
   the input, in rotating order, median of --repeat runs; cold (sync + drop_caches before every
   command) and warm (the command's input read once before).
3. Reports apply's peak RSS (GNU time), and the bytes of the output checked against the input's
   kept expert slices.

    python benchmarks/bench_gguf.py --workdir /data/bench              # 1.8 and 5 GiB, 3 repeats
    python benchmarks/bench_gguf.py --sizes 1.8 --split 3 --repeat 5
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

from common import (  # noqa: E402  (this directory; standard library only at import)
    GiB, RSS_METHOD, Filler, can_drop_caches, cpu_s, drop_scratch, fs_sync, machine_info, make_scratch, max_of, med_of,
    need_disk, copy_summary, print_copy_table, print_machine, reap, reapsurgery_cmd, rmtree, rotated, run_cold,
    run_measured, run_warm,
)

SYNTH = dict(hidden=2048, ff_exp=768, experts=64, top_k=8, heads=32, kv_heads=4, head_dim=128, vocab=151936)
TYPES = {"F32": 0, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}  # ggml type ids, checked against the gguf package below


def layer_tensors(b: int, c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """One block's tensors as convert_hf_to_gguf.py writes Qwen3-MoE (ne[0] first)."""
    H, F, E, hd = c["hidden"], c["ff_exp"], c["experts"], c["head_dim"]
    p = f"blk.{b}."
    return [(p + "attn_norm.weight", (H,), "F32"),
            (p + "ffn_down_exps.weight", (F, H, E), "Q6_K"), (p + "ffn_gate_exps.weight", (H, F, E), "Q4_K"),
            (p + "ffn_up_exps.weight", (H, F, E), "Q4_K"), (p + "ffn_gate_inp.weight", (H, E), "F32"),
            (p + "ffn_norm.weight", (H,), "F32"), (p + "attn_k_norm.weight", (hd,), "F32"),
            (p + "attn_k.weight", (H, c["kv_heads"] * hd), "Q8_0"), (p + "attn_output.weight", (c["heads"] * hd, H), "Q8_0"),
            (p + "attn_q_norm.weight", (hd,), "F32"), (p + "attn_q.weight", (H, c["heads"] * hd), "Q8_0"),
            (p + "attn_v.weight", (H, c["kv_heads"] * hd), "Q8_0")]


def build_synthetic(out: Path, size_gib: float, parts: int, seed: int = 0) -> dict:
    """Write a Qwen3-MoE-shaped quantized GGUF (or a split set of `parts`) of ~size_gib GiB."""
    gf, header = reap("gguf_file"), reap("gguf_header")
    c = gf.constants()
    assert all(int(c.GGMLQuantizationType[k]) == v for k, v in TYPES.items())
    VT = c.GGUFValueType
    s = dict(SYNTH)

    def nbytes(ne, t):
        return gf.tensor_nbytes(ne, TYPES[t])

    per_layer = sum(nbytes(ne, t) for _, ne, t in layer_tensors(0, s))
    fixed = nbytes((s["hidden"], s["vocab"]), "Q4_K") + nbytes((s["hidden"], s["vocab"]), "Q6_K")
    layers = max(1, round((size_gib * GiB - fixed) / per_layer))
    tensors = [("token_embd.weight", (s["hidden"], s["vocab"]), "Q4_K")]
    for b in range(layers):
        tensors += layer_tensors(b, s)
    tensors += [("output_norm.weight", (s["hidden"],), "F32"), ("output.weight", (s["hidden"], s["vocab"]), "Q6_K")]
    arch = "qwen3moe"
    kv = [("general.architecture", VT.STRING, arch), ("general.type", VT.STRING, "model"),
          ("general.name", VT.STRING, "Synthetic Qwen3 30B A3B"), ("general.size_label", VT.STRING, "?"),
          (f"{arch}.block_count", VT.UINT32, layers), (f"{arch}.context_length", VT.UINT32, 40960),
          (f"{arch}.embedding_length", VT.UINT32, s["hidden"]), (f"{arch}.feed_forward_length", VT.UINT32, 6144),
          (f"{arch}.attention.head_count", VT.UINT32, s["heads"]), (f"{arch}.expert_count", VT.UINT32, s["experts"]),
          (f"{arch}.expert_used_count", VT.UINT32, s["top_k"]),
          (f"{arch}.expert_feed_forward_length", VT.UINT32, s["ff_exp"]),
          ("general.file_type", VT.UINT32, 15), ("general.quantization_version", VT.UINT32, 2),
          ("tokenizer.ggml.model", VT.STRING, "gpt2"), ("tokenizer.ggml.pre", VT.STRING, "qwen2")]
    records = [header.encode_kv(k, t, v) for k, t, v in kv]
    records.append(header.encode_kv("tokenizer.ggml.tokens", VT.ARRAY, [f"tok{i:06d}" for i in range(s["vocab"])],
                                    VT.STRING))
    records.append(header.encode_kv("tokenizer.ggml.token_type", VT.ARRAY, [1] * s["vocab"], VT.INT32))
    records.append(header.encode_kv("tokenizer.ggml.merges", VT.ARRAY,
                                    [f"t{i:05d} o{i:05d}" for i in range(s["vocab"] - 256)], VT.STRING))
    records.append(header.encode_kv("tokenizer.chat_template", VT.STRING, "{% for m in messages %}" * 200))
    # the converter's size label of these tensors, as surgery recomputes it
    records[3] = header.encode_kv("general.size_label", VT.STRING,
                                  reap("gguf_plan").size_label((n, ne) for n, ne, _ in tensors))
    out.mkdir(parents=True)
    per_part = -(-len(tensors) // parts)
    groups = [tensors[i:i + per_part] for i in range(0, len(tensors), per_part)]
    filler = Filler(seed)
    files = []
    for i, group in enumerate(groups):
        name = "model.gguf" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.gguf"
        split = [header.encode_kv("split.no", VT.UINT16, i), header.encode_kv("split.count", VT.UINT16, len(groups)),
                 header.encode_kv("split.tensors.count", VT.INT32, len(tensors))] if len(groups) > 1 else []
        recs = (records if i == 0 else []) + split
        infos, off = [], 0
        for n, ne, t in group:
            infos.append(gf.GGUFTensor(n, ne, TYPES[t], off, nbytes(ne, t)))
            off += nbytes(ne, t) + gf.pad(nbytes(ne, t), 32)
        head = header.encode_header(3, recs, len(recs), len(infos), header.encode_tensor_infos(infos), 32)
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, head)
            filler.write(fd, off)
        finally:
            os.close(fd)
        files.append(out / name)
    return {"layers": layers, "files": files, "tensors": len(tensors), "bytes": sum(f.stat().st_size for f in files)}


def make_mask(first: Path, path: Path) -> list[int]:
    GGUFModel, Mask = reap("gguf_model").GGUFModel, reap("mask").Mask
    m = GGUFModel.open(first)
    keep = list(range(0, m.num_experts, 2))
    Mask(m.fingerprint(), {l: keep for l in m.moe_layers}, {"method": "bench_gguf even half"}).save(path)
    return keep


def check_output(src: Path, out: Path, keep: list[int]) -> str:
    """verify, then the bytes of a few expert slices, a router and the output head against the input."""
    GGUFModel = reap("gguf_model").GGUFModel
    rep = reap("verify").verify(out)
    if not rep.ok:
        return "verify FAILED: " + "; ".join(rep.problems[:3])
    s, o = GGUFModel.open(src), GGUFModel.open(out)
    where = {t.name: (p, t) for p, t in s.tensors()}
    checks = 0
    for part, t in o.tensors():
        if not (t.name.startswith(f"blk.{o.moe_layers[-1]}.") or t.name == "output.weight"):
            continue
        sp, st = where[t.name]
        with open(part.path, "rb") as fo, open(sp.path, "rb") as fs:
            fo.seek(part.data_offset + t.offset)
            got = fo.read(t.nbytes)
            run = st.nbytes // s.num_experts if t.ne[-1] != st.ne[-1] else st.nbytes
            want = b""
            for e in (keep if t.ne[-1] != st.ne[-1] else [0]):
                fs.seek(sp.data_offset + st.offset + e * run)
                want += fs.read(run)
        if got != want:
            return f"MISMATCH {t.name}"
        checks += 1
    return f"ok (verify ok, {rep.tensors} tensors, {checks} tensors byte-equal to the input's kept slices)"


def bench_size(args, work: Path, size: float, log: Path, results: list) -> None:
    src_dir = work / f"synth-{size:g}g"
    print(f"\n[size {size:g} GiB] building a synthetic GGUF in {src_dir} ...", flush=True)
    t = time.perf_counter()
    desc = build_synthetic(src_dir, size, args.split, args.seed)
    first = desc["files"][0]
    print(f"  built {desc['bytes'] / GiB:.2f} GiB, {desc['layers']} layers x {SYNTH['experts']} experts, "
          f"{len(desc['files'])} file(s), {desc['tensors']} tensors, in {time.perf_counter() - t:.1f}s "
          f"(+{fs_sync(src_dir):.1f}s sync)", flush=True)
    mask = work / f"mask-{size:g}g.json"
    keep = make_mask(first, mask)
    split = len(desc["files"]) > 1
    ref = work / (f"ref-{size:g}g" if split else f"ref-{size:g}g.gguf")
    run_measured(reapsurgery_cmd() + ["apply", str(mask), str(first), str(ref), "-q"], log)
    ref_first = ref / first.name if split else ref
    check = check_output(first, ref_first, keep)
    print(f"  output check: {check}", flush=True)
    out_files = " ".join(str(p) for p in (sorted(ref.iterdir()) if split else [ref]))
    in_files = " ".join(str(p) for p in desc["files"])

    ops = [f"apply-j{j}" for j in args.jobs] + ["cp", "cp-in", "cat"]
    res = {"size_gib": size, "input_bytes": desc["bytes"], "layers": desc["layers"], "files": len(desc["files"]),
           "output_bytes": sum(Path(p).stat().st_size for p in out_files.split()), "check": check, "modes": {}}
    n = 0
    for mode in args.modes:
        runs: dict[str, list] = {op: [] for op in ops}
        for r, order in rotated(args.repeat, ops):
            for op in order:
                n += 1
                target = work / f"{op}-{size:g}g-{n}"
                if op.startswith("apply"):
                    src = src_dir
                    dst = target if split else target.with_suffix(".gguf")
                    cmd = reapsurgery_cmd() + ["apply", str(mask), str(first), str(dst), "-q", "--jobs", op[7:]]
                elif op == "cp":
                    src, cmd = ref, ["cp", "-r", str(ref), str(target)]
                elif op == "cp-in":
                    target.mkdir()
                    src, cmd = src_dir, ["sh", "-c", f"cp {in_files} {target}"]
                else:
                    src, cmd = ref, ["sh", "-c", f"cat {out_files} > /dev/null"]
                m = run_cold(cmd, log, work) if mode == "cold" else run_warm(cmd, log, src, sync=work)
                runs[op].append(m)
                print(f"  rep {r + 1} {mode} {op:8s}: {m['wall_s']:6.2f}s  rss {m['rss_mib']:6.1f} MiB  "
                      f"load {m['loadavg_1m_before']:.1f}", flush=True)
                for p in (target, target.with_suffix(".gguf")):
                    if p.is_dir():
                        rmtree(p)
                    elif p.exists():
                        p.unlink()
        res["modes"][mode] = {
            **copy_summary(runs, ops),
            "loadavg": med_of([m for op in ops for m in runs[op]], "loadavg_1m_before"),
            "cpu_s": {op: med_of(runs[op], cpu_s) for op in ops},  # user + sys: what load does not stretch
        }
    rmtree(ref) if split else ref.unlink()
    if not args.keep:
        rmtree(src_dir)
    fs_sync(work)
    results.append(res)


def report(args, machine: dict, floor: dict, sizes: list[dict], total_s: float) -> None:
    p = print
    print_machine("reapsurgery apply benchmark, GGUF", machine, tools=f", {machine['cp']}")
    p(f"settings: even half of the experts (50% sparsity), {args.split} file(s) per model, repeat {args.repeat} "
      f"(median; order rotated), jobs {args.jobs}, {'/'.join(args.modes)} page cache")
    p(f"interpreter floor: `reapsurgery --version` {floor['wall_s']:.2f}s, peak RSS {floor['rss_mib']:.1f} MiB")
    jobs = [f"apply-j{j}" for j in args.jobs]
    print_copy_table(p, sizes, jobs, ("load", lambda m: f"{m['loadavg']:5.1f}"))
    p("   jN/cp = apply with N jobs / cp of its output; /cat = / cat of the output (the read floor); /cpin = / cp of")
    p("   the input. Targets: cold <= 1.0 x cp; warm, ~1 GiB of output, <= 1.1 x cp (start-up included).")
    for r in sizes:
        for mode, m in r["modes"].items():
            p(f"   {r['size_gib']:g} GiB {mode} CPU seconds (user + sys, medians): " +
              ", ".join(f"{op} {v:.2f}" for op, v in m["cpu_s"].items()))
            p(f"   {r['size_gib']:g} GiB {mode}: " + "; ".join(f"{op} [{', '.join(f'{x:.2f}' for x in xs)}]"
                                                        for op, xs in m["runs_s"].items()) +
              "; paired /cp " + ", ".join(f"{op[6:]} {v:.2f}" for op, v in m["paired_cp"].items()))
        p(f"      output check: {r['check']}")
    p(f"\ntotal benchmark time {total_s:.0f}s")
    print(json.dumps({"bench": "reapsurgery.apply.gguf", "machine": machine, "floor": floor, "sizes": sizes,
                      "settings": {"sizes_gib": args.sizes, "split": args.split, "repeat": args.repeat,
                                   "jobs": args.jobs, "modes": args.modes}, "total_s": round(total_s, 1)},
                     sort_keys=True, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=str, default="1.8,5", help="comma-separated input sizes, GiB (default 1.8,5)")
    ap.add_argument("--split", type=int, default=1, help="parts per model (default 1: one file)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--jobs", type=str, default=None, help="apply --jobs values (default: 1 and apply's default)")
    ap.add_argument("--modes", type=str, default="cold,warm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.sizes = sorted(float(s) for s in args.sizes.split(","))
    default_jobs = reap("copier").default_jobs()
    args.jobs = [int(j) for j in args.jobs.split(",")] if args.jobs else sorted({1, default_jobs})
    args.modes = args.modes.split(",")
    if "cold" in args.modes and not can_drop_caches():
        print("cannot drop the page cache here: warm runs only", file=sys.stderr)
        args.modes = [m for m in args.modes if m != "cold"]
    work = make_scratch(args.workdir, "reapsurgery-bench-gguf-")
    log = work / "commands.log"
    machine = machine_info(work)
    print(f"scratch {work} (log of every command: {log})", flush=True)
    t0 = time.perf_counter()
    try:
        need_disk(machine, work, max(args.sizes) * 2.6 + 2)
        floors = [run_measured(reapsurgery_cmd() + ["--version"], log) for _ in range(3)]
        floor = {"wall_s": med_of(floors, "wall_s"), "rss_mib": max_of(floors, "rss_mib"), "rss_method": RSS_METHOD}
        sizes: list[dict] = []
        for size in args.sizes:
            bench_size(args, work, size, log, sizes)
        machine["loadavg_end"] = list(os.getloadavg())
        report(args, machine, floor, sizes, time.perf_counter() - t0)
    finally:
        drop_scratch(args.keep, work)


if __name__ == "__main__":
    main()
