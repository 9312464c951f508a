#!/usr/bin/env python
"""Benchmark `reapsurgery calibrate`: peak RSS against the checkpoint size, wall time against
what a user does without it (from_pretrained + one plain forward pass over the same tokens).

One run does this and prints a table, then one JSON line (the last line of stdout):

1. Builds a real, random-weight Qwen3-MoE checkpoint (16 layers x 64 experts, top-4,
   per-expert tensor names as transformers saves them, shards of at most 1 GB as
   save_pretrained(max_shard_size="1GB") cuts them) of about --size-gb GiB in --dtype
   (default float32, see below). It is not built in memory: the config comes from
   AutoConfig.for_model("qwen3_moe", ...), the tensor names are checked against a tiny
   model that transformers builds and saves itself, and the big one is written shard by
   shard with safetensors save_file (weights N(0, 0.02), norms 1). The baseline run
   below loads it with from_pretrained and fails on any missing/unexpected tensor.
2. Writes --samples rows of --tokens random token ids (seeded) to tokens.jsonl, so no
   tokenizer is needed and every sample has the same length (no padding anywhere).
3. Times, in separate processes started the same way (wall from process start, peak
   RSS of that process alone via GNU time, see common.run_measured), alternating
   which goes first, --repeat times, page cache warmed before each:
     calibrate: reapsurgery calibrate CKPT -o sal.json --dataset tokens.jsonl
                --num-samples N --max-length T --device cpu --dtype D --batch-size 8 -q
     baseline:  AutoModelForCausalLM.from_pretrained(CKPT, dtype=D) and one forward pass
                over the same samples in the same batches of 8 (use_cache=False; only the
                last position's logits, logits_to_keep=1, since calibrate computes no
                logits; --full-logits computes them all).
4. Reports calibrate peak RSS / checkpoint size (target <= 0.25) and calibrate wall /
   baseline wall (target <= 1.3). If a target is missed (or --profile always), runs the
   same calibrate command once more in-process with timers wrapped around reapsurgery's
   phases (skeleton, shard reads, conversion, layer forward, experts, observer, state
   save) and an RSS sampler, and prints where the time and the peak memory go.

    python benchmarks/bench_calibrate.py                       # ~4 GiB float32, 16 x 256 tokens
    python benchmarks/bench_calibrate.py --size-gb 1 --repeat 1 --profile never

Why float32 by default: on CPUs without AVX512-BF16/AMX, PyTorch's bfloat16 GEMM is one to
two orders of magnitude slower than float32 (the machine line prints both rates, measured;
0.9 vs ~130 GFLOP/s on a 2-core AMD EPYC VM), so a bfloat16 forward of a 4 GiB model takes
far too long on such a machine. --dtype bfloat16 builds the checkpoint and runs both
processes in bfloat16 (half the build cost and disk) where the CPU has bfloat16 GEMMs.
Both wall times include Python start-up and imports. Sizes are GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402  (this directory; standard library only at import)
    GiB, HF_ENV, MiB, RSS_METHOD, alternated, cpu_s, dir_bytes, drop_scratch, fs_sync, machine_info, make_scratch,
    max_of, med_of, need_disk, paired_ratio, print_machine, reap, reapsurgery_cmd, rounded, run_measured, run_warm,
    shard_plan, tensor_order,
)

LAYERS = 16
# Qwen3-MoE-shaped: 64 experts, top-4; moe_intermediate_size is solved for the size asked.
ARCH = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
            intermediate_size=3072, num_experts=64, num_experts_per_tok=4, vocab_size=32768,
            max_position_embeddings=4096, tie_word_embeddings=False, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], initializer_range=0.02, rms_norm_eps=1e-6)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
SHARD_BYTES = 10**9  # save_pretrained's "1GB"
ENV = dict(HF_ENV, TQDM_DISABLE="1")
RSS_TARGET = 0.25
WALL_TARGET = 1.3


# --------------------------------------------------------------------------- checkpoint


def arch_for(size_gib: float, dtype: str, layers: int = LAYERS) -> dict:
    """ARCH with moe_intermediate_size (a multiple of 16) chosen so the weights are ~size_gib."""
    c = dict(ARCH, moe_intermediate_size=16)
    nbytes = DTYPE_BYTES[dtype]
    base = sum(math.prod(s) for _, s in tensor_order(c, layers))
    per_unit = layers * 3 * c["num_experts"] * c["hidden_size"]  # params per unit of moe_intermediate_size
    want = size_gib * GiB / nbytes
    units = max(16, round((want - base + 16 * per_unit) / per_unit / 16) * 16)
    return dict(ARCH, moe_intermediate_size=units)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def check_names_against_transformers(work: Path) -> str:
    """A tiny Qwen3-MoE built and saved by transformers itself has exactly our names and shapes."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = dict(ARCH, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                vocab_size=128)
    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, **tiny)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = work / "tiny-names"
    model.save_pretrained(out)
    got = {}
    for p in sorted(out.glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            for k in f.keys():
                got[k] = tuple(f.get_slice(k).get_shape())
    ours = dict(tensor_order(tiny, 2))
    shutil.rmtree(out)
    if got != ours:
        only_t = sorted(set(got) - set(ours))[:4]
        only_o = sorted(set(ours) - set(got))[:4]
        bad = [k for k in set(got) & set(ours) if got[k] != ours[k]][:4]
        raise SystemExit(f"tensor names differ from transformers' save_pretrained: only there {only_t}, "
                         f"only here {only_o}, shapes {bad}")
    return f"names/shapes equal to transformers' save_pretrained of a tiny model ({len(got)} tensors)"


def helper_build(out: str, size_gib: float, dtype: str, seed: int) -> None:
    """Child process: write the checkpoint shard by shard; prints a JSON description."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    out = Path(out)
    out.mkdir(parents=True)
    names_check = check_names_against_transformers(out.parent)
    c = arch_for(size_gib, dtype, LAYERS)
    cfg = AutoConfig.for_model("qwen3_moe", num_hidden_layers=LAYERS, dtype=dtype, **c)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(out)
    tdt = getattr(torch, dtype)
    nbytes = DTYPE_BYTES[dtype]
    order = tensor_order(c, LAYERS)
    shards = shard_plan(order, nbytes, SHARD_BYTES)
    g = torch.Generator().manual_seed(seed)
    std = c["initializer_range"]
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in tensors:
            if _is_norm(name):
                t = torch.ones(shape, dtype=tdt)
            else:
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(tdt)
            data[name] = t
            weight_map[name] = fname
            total += t.numel() * nbytes
        save_file(data, str(out / fname), metadata={"format": "pt"})
        del data
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# random Qwen3-MoE (bench_calibrate.py)\n")
    Path(f"{out}.build.json").write_text(json.dumps({"arch": c, "layers": LAYERS, "shards": len(shards),
                                                    "tensor_bytes": total, "tensors": len(order),
                                                    "names_check": names_check}))


def write_tokens(path: Path, samples: int, tokens: int, vocab: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(samples):
            f.write(json.dumps({"input_ids": [rnd.randrange(vocab) for _ in range(tokens)]}) + "\n")


# --------------------------------------------------------------------------- child processes


def _now_rss() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def helper_baseline(ckpt: str, data: str, dtype: str, batch: int, num: int, length: int, seed: int,
                    full_logits: bool, out_json: str) -> None:
    """Child process: from_pretrained + one forward pass over the calibration samples."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    load_samples = reap("data").load_samples  # the very samples, order and batches calibrate uses

    t_import = time.perf_counter()
    samples = load_samples(data, ckpt, num_samples=num, max_length=length, seed=seed).samples
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype), output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched keys, errors
    if problems:
        raise SystemExit(f"from_pretrained did not load the checkpoint cleanly: {str(problems)[:500]}")
    t_load = time.perf_counter()
    rss_loaded = _now_rss()
    finite = True
    with torch.no_grad():
        for s in range(0, len(samples), batch):
            chunk = samples[s:s + batch]
            width = max(len(x) for x in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            am = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, :len(x)] = torch.tensor(x)
                am[i, :len(x)] = 1
            out = model(input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=0 if full_logits else 1)
            finite = finite and bool(torch.isfinite(out.logits).all())
    t_fwd = time.perf_counter()
    Path(out_json).write_text(json.dumps({
        "import_s": t_import - t0, "load_s": t_load - t_import, "forward_s": t_fwd - t_load,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "rss_after_load_mib": rss_loaded.get("VmRSS"), "finite_logits": finite,
        "tokens": sum(len(x) for x in samples),
    }))


def _shard_rss_mib() -> float:
    """Resident pages of mapped *.safetensors files (safetensors' get_tensor returns mmap-backed tensors)."""
    total, cur = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    cur = line.rstrip().endswith(".safetensors")
                elif cur and head == "Rss:":
                    total += int(line.split()[1])
    except OSError:
        pass
    return total / 1024


class _Timers:
    """Inclusive wall time per named phase, plus an RSS sampler that attributes the peak to a phase."""

    def __init__(self):
        self.t: dict[str, list] = {}
        self.stack: list[str] = ["start-up"]
        self.peak = {"VmRSS": 0.0}
        self.peak_phase = ""
        self.layer_rss: list[dict] = []
        self.mem: dict = {}
        self._stop = False
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop:
            r = _now_rss()
            if r.get("VmRSS", 0) > self.peak["VmRSS"]:
                self.peak, self.peak_phase = r, " > ".join(self.stack[-3:])
            time.sleep(0.002)

    def wrap(self, owner, attr: str, label: str, after=None):
        fn = getattr(owner, attr, None)
        if fn is None:  # reapsurgery changed: time what is still there
            return None

        def timed(*a, **k):
            self.stack.append(label)
            t = time.perf_counter()
            try:
                res = fn(*a, **k)
            finally:
                e = self.t.setdefault(label, [0.0, 0])
                e[0] += time.perf_counter() - t
                e[1] += 1
                self.stack.pop()
            if after:
                after(a, k, res)
            return res

        setattr(owner, attr, timed)
        return fn


def _storage_bytes(objs) -> int:
    """Bytes of the distinct tensor storages reachable in nested tuples/lists/dicts."""
    import torch

    seen, total = set(), 0

    def walk(o):
        nonlocal total
        if isinstance(o, torch.Tensor):
            if o.is_meta:
                return
            key = o.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, (list, tuple)):
            for x in o:
                walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                walk(x)

    walk(objs)
    return total


def helper_profile(cli_args: list[str], out_json: str, cprofile: str | None) -> None:
    """Child process: the same `reapsurgery calibrate` command, in-process, with phase timers."""
    t0 = time.perf_counter()
    T = _Timers()
    T.thread.start()
    import torch
    from transformers.integrations import moe as tmoe
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    cal, data, obs, sal, st = (reap(n) for n in ("calibrate", "data", "observe", "saliency", "streaming"))
    main = reap("cli").main
    timings = importlib.import_module("reapsurgery.calibration.timing").TIMINGS

    t_import = time.perf_counter()
    T.mem["after_imports"] = _now_rss()
    T.stack = ["run"]
    T.wrap(data, "load_samples", "load_samples (read tokens.jsonl)")
    T.wrap(cal, "calibrate", "calibrate() total")
    T.wrap(st, "build_skeleton", "build_skeleton (from_config on meta)")
    T.wrap(st.LayoutConverter, "__init__", "LayoutConverter init (meta state_dict)")
    T.wrap(st.StreamedModel, "__init__", "StreamedModel init (skeleton + key map)")
    T.wrap(st.StreamedModel, "load_outer", "load_outer (embeddings)")

    def calls_after(a, k, res):
        h, calls = res
        T.mem["hidden_bytes"] = T.mem.get("hidden_bytes", 0) + h.untyped_storage().nbytes()
        T.mem["layer_call_args_bytes"] = T.mem.get("layer_call_args_bytes", 0) + _storage_bytes(calls)

    T.wrap(st.StreamedModel, "layer_calls", "layer_calls (embed + record layer inputs)", calls_after)
    # shard reads: read_layer_tensors (dequantising where quantized) in newer versions, read_tensors before
    T.wrap(st, "read_layer_tensors", "read_layer_tensors (non-expert tensors: pread, dequantise)")
    T.wrap(st.LayoutConverter, "convert", "LayoutConverter.convert (rename + stack experts)")

    # /proc/self/smaps walks every mapping (~60 ms here): read it on a few layers only, and time it
    smaps_label = "(benchmark's own /proc/self/smaps reads, inside the phases above)"

    def sampled(i) -> bool:
        return i == 0 or i % 4 == 3

    def shard_rss() -> float:
        t = time.perf_counter()
        v = _shard_rss_mib()
        e = T.t.setdefault(smaps_label, [0.0, 0])
        e[0] += time.perf_counter() - t
        e[1] += 1
        return v

    def loaded(a, k, res):
        T.layer_rss.append({"layer": a[1], **_now_rss()})
        if sampled(a[1]):
            T.layer_rss[-1]["shard_mapped"] = shard_rss()

    def forwarded(a, k, res):
        r = T.layer_rss[-1] if T.layer_rss else None
        if r is not None and "in_forward" not in r:
            r["in_forward"] = _now_rss()
            if sampled(r["layer"]):
                r["shard_mapped_in_forward"] = shard_rss()

    def released(a, k, res):
        if T.layer_rss:
            T.layer_rss[-1]["after_release"] = _now_rss()
            if sampled(a[1]):
                T.layer_rss[-1]["after_release"]["shard_mapped"] = shard_rss()

    T.wrap(st.StreamedModel, "install_layer", "install_layer (load_state_dict of the read layer)", loaded)
    T.wrap(st.StreamedModel, "release_layer", "release_layer (to_empty meta)", released)
    T.wrap(mq.Qwen3MoeDecoderLayer, "forward", "decoder layer forward", forwarded)
    T.wrap(mq.Qwen3MoeAttention, "forward", "attention (projections + sdpa + rope)")
    T.wrap(mq.Qwen3MoeSparseMoeBlock, "forward", "sparse MoE block (router + experts)")
    # The observed experts call is bound to each experts module when calibrate observes it: wrap the
    # function before that; the stock implementation is dispatched by name at call time.
    T.wrap(obs, "observed_experts_forward", "experts: observed_experts_forward (all)")
    reg = tmoe.ExpertsInterface._global_mapping
    fn = reg.get("grouped_mm")
    if fn is not None:
        label = "experts: grouped_mm over the n*k pairs"

        def timed(*a, _fn=fn, _label=label, **k):
            T.stack.append(_label)
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                e = T.t.setdefault(_label, [0.0, 0])
                e[0] += time.perf_counter() - t
                e[1] += 1
                T.stack.pop()

        reg["grouped_mm"] = timed
    T.wrap(obs.Observer, "record", "experts: Observer.record (float64 statistics)")

    def saved(a, k, res):
        T.mem["state_hidden_bytes"] = _storage_bytes(a[3])

    T.wrap(importlib.import_module("reapsurgery.calibration.resume").ResumeState, "save",
           "ResumeState.save (hands the state to its writer thread)", saved)
    T.wrap(sal.Saliency, "save", "Saliency.save (sal.json)")
    prof = None
    if cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        main.main(args=cli_args, prog_name="reapsurgery", standalone_mode=False)
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(cprofile)
        T._stop = True
        T.thread.join()
    t_end = time.perf_counter()
    Path(out_json).write_text(json.dumps({
        "import_s": t_import - t0, "run_s": t_end - t_import, "timers": T.t, "peak": T.peak,
        "peak_phase": T.peak_phase, "layer_rss": T.layer_rss, "mem": T.mem,
        "torch_threads": torch.get_num_threads(),
        "phases": dict(timings.seconds), "bytes_read": timings.bytes_read,
    }))


def helper_gemm() -> None:
    """Child process: float32 vs bfloat16 GEMM rate of this CPU (explains the default dtype)."""
    import torch

    out = {}
    for name in ("float32", "bfloat16"):
        dt = getattr(torch, name)
        a, w = torch.randn(256, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ w
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.4:
            a @ w
            n += 1
        out[name] = round(2 * 256 * 1024 * 1024 * n / (time.perf_counter() - t) / 1e9, 1)
    print(json.dumps(out))


# --------------------------------------------------------------------------- benchmark


def calibrate_cmd(args, ck: Path, data: Path, out: Path) -> list[str]:
    return ["calibrate", str(ck), "-o", str(out), "--dataset", str(data), "--num-samples", str(args.samples),
            "--max-length", str(args.tokens), "--device", "cpu", "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "-q", "--checkpoint-every", str(args.checkpoint_every), "--overwrite"]


def check_saliency(path: Path, layers: int, tokens: int) -> str:
    s = json.loads(path.read_text())
    if len(s["layers"]) != layers:
        return f"BAD: {len(s['layers'])} MoE layers, expected {layers}"
    bad = [k for k, v in s["layers"].items() if v["tokens"] != tokens]
    if bad:
        return f"BAD: layers {bad[:3]} saw another token count than {tokens}"
    vals = [x for v in s["layers"].values() for key in ("gate_sum", "norm_sum", "reap_sum") for x in v[key]]
    if not all(math.isfinite(x) for x in vals):
        return "BAD: non-finite statistics"
    routed = sum(1 for v in s["layers"].values() for c in v["count"] if c > 0)
    total = sum(len(v["count"]) for v in s["layers"].values())
    return f"ok ({layers} MoE layers, {tokens} tokens each, {routed}/{total} experts routed, all sums finite)"


def run_profile(args, ck: Path, data: Path, work: Path, log: Path) -> dict:
    out = work / "sal-profile.json"
    pj = work / "profile.json"
    cprof = work / "calibrate.prof" if args.cprofile else None
    cmd = [sys.executable, str(HERE), "--_profile", str(pj), *(["--_cprofile", str(cprof)] if cprof else []),
           "--", *calibrate_cmd(args, ck, data, out)]
    m = run_warm(cmd, log, ck, ENV)
    p = json.loads(pj.read_text())
    p["wall_s"], p["rss_mib"] = m["wall_s"], m["rss_mib"]
    if cprof:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(str(cprof), stream=buf).sort_stats("tottime").print_stats(25)
        p["cprofile_top"] = buf.getvalue()
    shutil.rmtree(work / "sal-profile.json.resume", ignore_errors=True)
    return p


def fp8_case(args, work: Path, log: Path) -> None:
    """Build, quantize to block FP8 (fixtures.quantize.to_fp8_block), run calibrate profiled once."""
    src = work / "qwen3-moe-random"
    run_measured([sys.executable, str(HERE), "--_build", str(src), "--size-gb", str(args.size_gb), "--dtype", args.dtype,
                  "--seed", str(args.seed), "--experts", str(args.experts), "--layers", str(LAYERS)], log, ENV)
    ck = work / "qwen3-moe-fp8"
    code = (f"import sys; sys.path.insert(0, {str(HERE.parents[1])!r}); from fixtures.quantize import to_fp8_block; "
            f"to_fp8_block({str(src)!r}, {str(ck)!r})")
    run_measured([sys.executable, "-c", code], log, ENV)
    shutil.rmtree(src, ignore_errors=True)
    weights = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    data = work / "tokens.jsonl"
    write_tokens(data, args.samples, args.tokens, ARCH["vocab_size"], args.seed)
    print(f"[fp8] block-FP8 Qwen3-MoE, {LAYERS} layers x {args.experts} experts, {weights / GiB:.2f} GiB of shards; "
          f"{args.samples} x {args.tokens} tokens, compute {args.dtype}", flush=True)
    p = run_profile(args, ck, data, work, log)
    print(f"  calibrate {p['wall_s']:.2f}s from process start, peak RSS {p['rss_mib']:.0f} MiB", flush=True)
    report_phases(p)
    print(json.dumps({"case": "fp8", "weight_bytes": weights, "experts": args.experts, "wall_s": p["wall_s"],
                      "rss_mib": p["rss_mib"], "phases": p.get("phases"), "bytes_read": p.get("bytes_read")}))


def resume_cost_case(args, work: Path, log: Path) -> None:
    """The resume state's share of calibrate() at --samples x --tokens (the issue's target: <= 5% at
    64 x 2048): the profiled calibrate run once with calibrate's default --checkpoint-every (10m) and
    once saving after every layer (0), each printing its phase table."""
    ck = work / "qwen3-moe-random"
    run_measured([sys.executable, str(HERE), "--_build", str(ck), "--size-gb", str(args.size_gb), "--dtype", args.dtype,
                  "--seed", str(args.seed), "--experts", str(args.experts), "--layers", str(LAYERS)], log, ENV)
    a = json.loads(Path(f"{ck}.build.json").read_text())["arch"]
    data = work / "tokens.jsonl"
    write_tokens(data, args.samples, args.tokens, a["vocab_size"], args.seed)
    hidden = args.samples * args.tokens * a["hidden_size"] * DTYPE_BYTES[args.dtype]
    print(f"[resume-cost] random Qwen3-MoE, {LAYERS} layers x {args.experts} experts, hidden {a['hidden_size']}, "
          f"{dir_bytes(ck) / GiB:.2f} GiB; {args.samples} x {args.tokens} tokens, {args.dtype}: hidden states "
          f"{hidden / MiB:.0f} MiB per saved state", flush=True)
    rows = []
    for every in ("10m", "0"):
        args.checkpoint_every = every
        p = run_profile(args, ck, data, work, log)
        wall = p["timers"].get("calibrate() total", [0.0])[0]
        save = (p.get("phases") or {}).get("state save", 0.0)
        saves = p["timers"].get("ResumeState.save (hands the state to its writer thread)", [0.0, 0])[1]
        print(f"\n  --checkpoint-every {every}: calibrate() {wall:.2f}s, {saves} state saves, state save {save:.2f}s "
              f"(background writer) = {save / wall if wall else 0:.1%} of calibrate()", flush=True)
        report_phases(p)
        rows.append({"checkpoint_every": every, "calibrate_s": wall, "saves": saves, "state_save_s": save,
                     "share": save / wall if wall else 0.0, "wall_s": p["wall_s"], "rss_mib": p["rss_mib"]})
    per_save = rows[1]["state_save_s"] / rows[1]["saves"] if rows[1]["saves"] else 0.0
    extra = rows[1]["calibrate_s"] / rows[0]["calibrate_s"] - 1 if rows[0]["calibrate_s"] else 0.0
    print(f"\n  state-save share: {rows[0]['share']:.1%} at the default --checkpoint-every 10m, {rows[1]['share']:.1%} "
          f"saving after every layer (target <= 5%); calibrate() {extra:+.1%} longer when saving after every layer; "
          f"{per_save:.2f}s per save, so one save per 10 minutes costs {per_save / 600:.2%} of a longer run", flush=True)
    print(json.dumps({"case": "resume_cost", "samples": args.samples, "tokens": args.tokens, "layers": LAYERS,
                      "hidden_state_bytes": hidden, "runs": rows, "per_save_s": per_save}))
    shutil.rmtree(ck, ignore_errors=True)


def _proc_io() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def helper_rank_io(cli_args: list[str], out_dir: str) -> None:
    """Child process (one torchrun rank): the calibrate command in-process; what it read, from
    /proc/self/io around the command (imports excluded): rchar counts every byte its read calls
    returned, read_bytes only those fetched from storage (the rest came from the page cache)."""
    import torch  # noqa: F401  (imported before the window, as the command would)
    import transformers  # noqa: F401

    main = reap("cli").main
    timings = importlib.import_module("reapsurgery.calibration.timing").TIMINGS
    before = _proc_io()
    main.main(args=cli_args, prog_name="reapsurgery", standalone_mode=False)
    after = _proc_io()
    rank = int(os.environ.get("RANK", "0") or 0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1") or 1), "pread_bytes": timings.bytes_read,
        **{k: after[k] - before[k] for k in ("rchar", "read_bytes")}}))


def _evict(ck: Path) -> str:
    """Empty the page cache of the checkpoint: drop_caches where allowed, else posix_fadvise DONTNEED per file."""
    from common import DROP_CACHES, can_drop_caches

    subprocess.run(["sync"], check=False)
    if can_drop_caches():
        DROP_CACHES.write_text("3\n")
        return "drop_caches"
    for f in ck.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per file"


def ranks_io_case(args, work: Path, log: Path) -> None:
    """Ranks on one node share the page cache: `torchrun --nproc-per-node N` (gloo, CPU) from a cold
    cache, against one process, with per-rank bytes read from storage and from the page cache."""
    ck = work / "qwen3-moe-random"
    run_measured([sys.executable, str(HERE), "--_build", str(ck), "--size-gb", str(args.size_gb), "--dtype", args.dtype,
                  "--seed", str(args.seed), "--experts", str(args.experts), "--layers", str(LAYERS)], log, ENV)
    weights = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    a = json.loads(Path(f"{ck}.build.json").read_text())["arch"]
    data = work / "tokens.jsonl"
    write_tokens(data, args.samples, args.tokens, a["vocab_size"], args.seed)
    args.checkpoint_every = "10m"
    print(f"[ranks-io] random Qwen3-MoE, {LAYERS} layers x {args.experts} experts, {weights / GiB:.2f} GiB of shards "
          f"({weights} bytes); {args.samples} x {args.tokens} tokens; cold page cache before each run", flush=True)
    print("  per rank: pread = checkpoint bytes it asked for; rchar = bytes its read calls returned; read_bytes = "
          "bytes it fetched from storage (mmap faults of safe_open included); from page cache = what one process "
          "alone fetched from storage less this rank's read_bytes", flush=True)
    print(f"  {'ranks':>5} {'rank':>4} {'pread':>10} {'rchar':>10} {'read_bytes':>11} {'from page cache':>16} "
          f"{'wall':>7}", flush=True)
    rows, alone = [], 0
    for n in (1, args.ranks_io):
        how = _evict(ck)
        out_dir = work / f"io-{n}"
        out_dir.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), str(HERE),
               "--_rank_io", str(out_dir), "--", *calibrate_cmd(args, ck, data, work / f"sal-{n}.json")]
        m = run_measured(cmd, log, dict(ENV, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n))))
        ranks = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])
        alone = alone or ranks[0]["read_bytes"]  # the first run is one process
        for r in ranks:
            cached = max(alone - r["read_bytes"], 0)
            r["from_page_cache"] = cached
            print(f"  {n:>5} {r['rank']:>4} {r['pread_bytes'] / MiB:6.0f} MiB {r['rchar'] / MiB:6.0f} MiB "
                  f"{r['read_bytes'] / MiB:7.0f} MiB {cached / MiB:12.0f} MiB {m['wall_s']:6.1f}s", flush=True)
        storage = sum(r["read_bytes"] for r in ranks)
        print(f"  {n} rank(s): storage reads {storage / MiB:.0f} MiB in all = {storage / weights:.2f} x the shards, "
              f"{storage / alone:.2f} x one process's (cache emptied by {how})", flush=True)
        rows.append({"ranks": n, "per_rank": ranks, "storage_bytes": storage, "wall_s": m["wall_s"], "evicted_by": how})
    print(json.dumps({"case": "ranks_io", "weight_bytes": weights, "runs": rows}))
    shutil.rmtree(ck, ignore_errors=True)


def bench(args, work: Path, log: Path) -> dict:
    ck = work / "qwen3-moe-random"
    print(f"[build] random-weight Qwen3-MoE, {LAYERS} layers x {ARCH['num_experts']} experts, top-"
          f"{ARCH['num_experts_per_tok']}, {args.dtype}, ~{args.size_gb:g} GiB in {ck} ...", flush=True)
    t = time.perf_counter()
    m = run_measured([sys.executable, str(HERE), "--_build", str(ck), "--size-gb", str(args.size_gb),
                      "--dtype", args.dtype, "--seed", str(args.seed), "--experts", str(args.experts),
                      "--layers", str(LAYERS)], log, ENV)
    desc = json.loads(Path(f"{ck}.build.json").read_text())
    sync_s = fs_sync(work)
    size = dir_bytes(ck)
    weights = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    a = desc["arch"]
    print(f"  built {size / GiB:.2f} GiB ({weights / GiB:.2f} GiB in {desc['shards']} shards, {desc['tensors']} "
          f"tensors) in {time.perf_counter() - t:.1f}s (+{sync_s:.1f}s sync), builder peak RSS {m['rss_mib']:.0f} MiB",
          flush=True)
    print(f"  hidden {a['hidden_size']}, moe_intermediate {a['moe_intermediate_size']}, heads "
          f"{a['num_attention_heads']}/{a['num_key_value_heads']}x{a['head_dim']}, vocab {a['vocab_size']}; "
          f"{desc['names_check']}", flush=True)
    data = work / "tokens.jsonl"
    write_tokens(data, args.samples, args.tokens, a["vocab_size"], args.seed)
    tokens = args.samples * args.tokens

    runs: dict[str, list] = {"calibrate": [], "baseline": []}
    check = base_info = None
    for r, order in alternated(args.repeat, "calibrate", "baseline"):
        for op in order:
            out = work / f"sal-{r}.json"
            bj = work / f"baseline-{r}.json"
            if op == "calibrate":
                cmd = reapsurgery_cmd() + calibrate_cmd(args, ck, data, out)
            else:
                cmd = [sys.executable, str(HERE), "--_baseline", str(ck), str(data), args.dtype, str(args.batch_size),
                       str(args.samples), str(args.tokens), str(args.seed), str(int(args.full_logits)), str(bj)]
            m = run_warm(cmd, log, ck, ENV)
            # CPU share of the machine that other processes took while this one ran (ours: its own cpu seconds)
            own = 100.0 * cpu_s(m) / (m["wall_s"] * (os.cpu_count() or 1))
            m["others_busy_pct"] = max(0.0, m["machine_busy_pct"] - own)
            m["order"] = order.index(op)
            runs[op].append(m)
            extra = ""
            if op == "calibrate":
                if check is None:
                    check = check_saliency(out, LAYERS, tokens)
                out.unlink(missing_ok=True)
                shutil.rmtree(Path(f"{out}.resume"), ignore_errors=True)
            else:
                b = json.loads(bj.read_text())
                m.update({k: b[k] for k in ("import_s", "load_s", "forward_s")})
                base_info = base_info or b
                extra = f"  (imports {b['import_s']:.1f}s, load {b['load_s']:.1f}s, forward {b['forward_s']:.1f}s)"
            print(f"  rep {r + 1} {op:9s}: {m['wall_s']:7.2f}s  peak RSS {m['rss_mib']:7.0f} MiB  user "
                  f"{m['user_s']:.1f}s sys {m['sys_s']:.1f}s  machine busy {m['machine_busy_pct']:3.0f}% (others "
                  f"{m['others_busy_pct']:3.0f}%)  load {m['loadavg_1m_before']:.2f}{extra}", flush=True)
        print(f"  saliency check: {check}", flush=True)

    c, b = runs["calibrate"], runs["baseline"]
    res = {
        "checkpoint_bytes": size, "weight_bytes": weights, "shards": desc["shards"], "arch": a,
        "layers": LAYERS, "dtype": args.dtype, "samples": args.samples, "tokens_per_sample": args.tokens,
        "batch_size": args.batch_size, "tokens": tokens,
        "calibrate_s": med_of(c, "wall_s"), "baseline_s": med_of(b, "wall_s"),
        "calibrate_rss_mib": max_of(c, "rss_mib"), "baseline_rss_mib": max_of(b, "rss_mib"),
        "calibrate_cpu_s": med_of(c, cpu_s), "baseline_cpu_s": med_of(b, cpu_s),
        "baseline_load_s": med_of(b, "load_s"), "baseline_forward_s": med_of(b, "forward_s"),
        "baseline_import_s": med_of(b, "import_s"),
        "baseline_experts_implementation": base_info["experts_implementation"],
        "baseline_attn_implementation": base_info["attn_implementation"],
        "baseline_finite_logits": base_info["finite_logits"],
        "saliency_check": check,
        "machine_busy_pct": med_of(c + b, "machine_busy_pct"),
        "others_busy_pct": med_of(c + b, "others_busy_pct"),
        "paired_ratio": paired_ratio(c, b),
        # what calibrate keeps for every sample between layers: hidden states [N, T, H] in the compute dtype
        "hidden_states_bytes": tokens * a["hidden_size"] * DTYPE_BYTES[args.dtype],
        "runs": runs,
    }
    res["rss_ratio"] = res["calibrate_rss_mib"] * MiB / weights
    res["wall_ratio"] = res["calibrate_s"] / res["baseline_s"]
    res["cpu_ratio"] = res["calibrate_cpu_s"] / res["baseline_cpu_s"]
    res["targets"] = {"rss_ratio_le_0.25": res["rss_ratio"] <= RSS_TARGET,
                      "wall_ratio_le_1.3": res["wall_ratio"] <= WALL_TARGET}
    missed = not all(res["targets"].values())
    if args.profile == "always" or (args.profile == "auto" and missed):
        print("\n[profile] the same calibrate command in-process with phase timers and an RSS sampler ...", flush=True)
        res["profile"] = run_profile(args, ck, data, work, log)
        print(f"  {res['profile']['wall_s']:.2f}s, peak RSS {res['profile']['rss_mib']:.0f} MiB", flush=True)
    if not args.keep:
        shutil.rmtree(ck, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- report

PHASES = [
    # (label, indent) in the order they nest; times are inclusive
    ("load_samples (read tokens.jsonl)", 1),
    ("calibrate() total", 1),
    ("StreamedModel init (skeleton + key map)", 2),
    ("build_skeleton (from_config on meta)", 3),
    ("LayoutConverter init (meta state_dict)", 3),
    ("load_outer (embeddings)", 2),
    ("layer_calls (embed + record layer inputs)", 2),
    ("install_layer (load_state_dict of the read layer)", 2),
    ("read_layer_tensors (non-expert tensors: pread, dequantise)", 3),
    ("LayoutConverter.convert (rename + stack experts)", 3),
    ("decoder layer forward", 2),
    ("attention (projections + sdpa + rope)", 3),
    ("sparse MoE block (router + experts)", 3),
    ("experts: observed_experts_forward (all)", 4),
    ("experts: grouped_mm over the n*k pairs", 5),
    ("experts: Observer.record (float64 statistics)", 5),
    ("release_layer (to_empty meta)", 2),
    ("ResumeState.save (hands the state to its writer thread)", 2),
    ("Saliency.save (sal.json)", 1),
    ("(benchmark's own /proc/self/smaps reads, inside the phases above)", 1),
]


def report_phases(p: dict) -> None:
    """Seconds per pipeline phase (from reapsurgery.calibration.timing) and the overlap efficiency."""
    pr = print
    ph = p.get("phases") or {}
    wall = p["timers"].get("calibrate() total", [0.0])[0]
    read = ph.get("read", 0.0)
    compute = sum(ph.get(k, 0.0) for k in ("dequantise", "convert", "host-to-device", "forward/observe"))
    pr(f"\n   pipeline phases (reading layer i+1 on a background thread overlaps layer i's compute; sums exceed wall):")
    pr(f"   {'phase':<22} {'seconds':>8}  {'share of calibrate()':>20}")
    for k in ("read", "dequantise", "convert", "host-to-device", "forward/observe", "state save", "idle"):
        v = ph.get(k, 0.0)
        pr(f"   {k:<22} {v:8.2f}  {v / wall if wall else 0:19.0%}")
    gbps = p.get("bytes_read", 0) / read / 1e9 if read else 0.0
    pr(f"   calibrate() {wall:.2f}s; read {read:.2f}s ({gbps:.2f} GB/s of preads), compute {compute:.2f}s "
       f"(dequantise + convert + host-to-device + forward/observe)")
    if max(read, compute):
        pr(f"   overlap efficiency: calibrate() / max(read, compute) = {wall / max(read, compute):.2f} (target <= 1.3); "
           f"resume-state cost {ph.get('state save', 0.0) / wall if wall else 0:.1%} of calibrate() (background writer)")


def report_profile(p: dict, res: dict) -> None:
    pr = print
    pr(f"\n3) where calibrate's time and memory go (one extra run of the same command in-process, phase timers; "
       f"{p['wall_s']:.1f}s wall from process start, {p['rss_mib']:.0f} MiB peak RSS)")
    pr(f"   {'python start-up + imports (torch, transformers, reapsurgery)':<58} {p['import_s']:7.2f}s")
    t = p["timers"]
    tt = lambda k: t.get(k, [0.0])[0]  # noqa: E731
    for label, indent in PHASES:
        if label in t:
            s, n = t[label]
            pr(f"   {'  ' * (indent - 1) + label:<58} {s:7.2f}s  x{n}")
        if label.startswith("experts: Observer.record"):
            rest = tt("experts: observed_experts_forward (all)") - tt("experts: grouped_mm over the n*k pairs") \
                - tt("experts: Observer.record (float64 statistics)")
            pr(f"   {'  ' * (indent - 1) + 'experts: rest (repeat_interleave, weighting, sum)':<58} {rest:7.2f}s")
    pk, mem, lr = p["peak"], p["mem"], p["layer_rss"]
    imp = mem.get("after_imports", {})
    pr(f"   peak RSS {pk.get('VmRSS', 0):.0f} MiB (sampled every 2 ms; anon {pk.get('RssAnon', 0):.0f}, file-backed "
       f"{pk.get('RssFile', 0):.0f} MiB) during: {p['peak_phase']}")
    pr(f"   after imports: {imp.get('VmRSS', 0):.0f} MiB (anon {imp.get('RssAnon', 0):.0f}, file-backed "
       f"{imp.get('RssFile', 0):.0f}: shared libraries; more library pages are touched by the first forward)")
    if lr:
        pr(f"   {'layer':>5} | {'after load_layer: anon  file  shard-mapped':>44} | {'in forward: shard-mapped':>24} | "
           f"{'after release: anon  shard-mapped':>34}")
        for r in lr:
            if "shard_mapped" in r:
                rel = r.get("after_release", {})
                pr(f"   {r['layer']:>5} | {r.get('RssAnon', 0):>30.0f} {r.get('RssFile', 0):>5.0f} "
                   f"{r.get('shard_mapped', 0):>13.0f} | {r.get('shard_mapped_in_forward', 0):>24.0f} | "
                   f"{rel.get('RssAnon', 0):>25.0f} {rel.get('shard_mapped', 0):>13.0f}")
        rel = [r["after_release"]["RssAnon"] for r in lr if "after_release" in r]
        fwd = max(r.get("shard_mapped_in_forward", 0) for r in lr)
        if rel:
            pr(f"   anon after release_layer grows {rel[0]:.0f} -> {max(rel):.0f} MiB over the layers (+{max(rel) - rel[0]:.0f}: "
               f"freed layer memory the allocator keeps); up to {fwd:.0f} MiB of shard pages stay mapped during "
               f"the layer's forward (counted in RSS)")
    pr(f"   kept between layers: hidden states {mem.get('hidden_bytes', 0) / MiB:.1f} MiB, recorded layer arguments "
       f"(rotary cos/sin, masks) {mem.get('layer_call_args_bytes', 0) / MiB:.1f} MiB; "
       f"a resume state holds {mem.get('state_hidden_bytes', 0) / MiB:.1f} MiB of hidden states")
    report_phases(p)
    if p.get("cprofile_top"):
        pr("   cProfile, top 25 by own time:")
        for line in p["cprofile_top"].splitlines():
            if line.strip():
                pr("     " + line)


def report(args, machine: dict, res: dict, floor: dict, total_s: float) -> None:
    pr = print
    print_machine("reapsurgery calibrate benchmark", machine,
                  cpu_extra=f"; GEMM float32 {machine['gemm_gflops'].get('float32')} GFLOP/s, bfloat16 "
                            f"{machine['gemm_gflops'].get('bfloat16')} GFLOP/s (torch, all threads)",
                  tools=f", torch {machine['torch']}, transformers {machine['transformers']}",
                  load_extra=f"; machine CPU busy during the timed runs {res['machine_busy_pct']:.0f}%, of which "
                             f"other processes {res['others_busy_pct']:.0f}% (medians)")
    a = res["arch"]
    pr(f"checkpoint: Qwen3-MoE, {res['layers']} layers x {a['num_experts']} experts, top-{a['num_experts_per_tok']}, "
       f"hidden {a['hidden_size']}, moe_intermediate {a['moe_intermediate_size']}, vocab {a['vocab_size']}, "
       f"{res['dtype']}, random N(0, 0.02) weights")
    pr(f"            {res['checkpoint_bytes'] / GiB:.2f} GiB on disk ({res['weight_bytes'] / GiB:.2f} GiB of weights "
       f"in {res['shards']} shards)")
    pr(f"data: {res['samples']} samples x {res['tokens_per_sample']} tokens = {res['tokens']} tokens (random ids, "
       f"no padding), batch size {res['batch_size']}, compute dtype {res['dtype']} on cpu; repeat {args.repeat} "
       f"(median wall, max RSS; order alternated), page cache warm")
    pr(f"floor: `reapsurgery --version` {floor['version']['wall_s']:.2f}s / {floor['version']['rss_mib']:.0f} MiB; "
       f"`python -c 'import torch, transformers'` {floor['imports']['wall_s']:.2f}s / "
       f"{floor['imports']['rss_mib']:.0f} MiB")

    pr("\n1) peak RSS (each process alone, GNU time %M)")
    rr = res["rss_ratio"]
    pr(f"   calibrate {res['calibrate_rss_mib']:8.0f} MiB = {rr:.3f} x checkpoint weights   target <= {RSS_TARGET}: "
       f"{'ok' if rr <= RSS_TARGET else 'MISSED'}")
    pr(f"   baseline  {res['baseline_rss_mib']:8.0f} MiB = {res['baseline_rss_mib'] * MiB / res['weight_bytes']:.3f} "
       f"x checkpoint weights")
    pr(f"   hidden states calibrate keeps for all samples: {res['tokens']} tokens x {a['hidden_size']} x "
       f"{DTYPE_BYTES[res['dtype']]} B = {res['hidden_states_bytes'] / MiB:.1f} MiB "
       f"(grows with samples x tokens: 512 x 2048 tokens at this hidden size would be "
       f"{512 * 2048 * a['hidden_size'] * DTYPE_BYTES[res['dtype']] / GiB:.1f} GiB)")

    pr("\n2) wall time from process start")
    wr = res["wall_ratio"]
    pr(f"   calibrate {res['calibrate_s']:7.2f}s   (cpu {res['calibrate_cpu_s']:.1f}s)")
    pr(f"   baseline  {res['baseline_s']:7.2f}s   (cpu {res['baseline_cpu_s']:.1f}s; imports "
       f"{res['baseline_import_s']:.1f}s, from_pretrained {res['baseline_load_s']:.1f}s, forward "
       f"{res['baseline_forward_s']:.1f}s; experts {res['baseline_experts_implementation']}, attention "
       f"{res['baseline_attn_implementation']}, {'all' if args.full_logits else 'last-position'} logits)")
    pr(f"   calibrate / baseline = {wr:.2f} (median of back-to-back pairs {res['paired_ratio']:.2f}; cpu-time ratio "
       f"{res['cpu_ratio']:.2f})   target <= {WALL_TARGET}: {'ok' if wr <= WALL_TARGET else 'MISSED'}")
    for op in ("calibrate", "baseline"):
        pr(f"   {op} runs: " + ", ".join(f"{m['wall_s']:.2f}s/{m['rss_mib']:.0f} MiB (load {m['loadavg_1m_before']:.1f})"
                                     for m in res["runs"][op]))
    pr(f"   output check: calibrate {res['saliency_check']}; baseline: from_pretrained loaded every tensor (no "
       f"missing/unexpected/mismatched keys), logits {'finite' if res['baseline_finite_logits'] else 'NOT FINITE'}")
    if res["others_busy_pct"] > 10:
        pr(f"   WARNING: other processes took {res['others_busy_pct']:.0f}% of the machine's CPU time during the "
           f"timed runs (median): wall times are noisy; prefer the paired and cpu-time ratios, or rerun on a "
           f"quiet machine")
    if res.get("profile"):
        report_profile(res["profile"], res)
    pr(f"\ntotal benchmark time {total_s:.0f}s")

    summary = {
        "bench": "reapsurgery.calibrate",
        "machine": machine,
        "settings": {"size_gib": args.size_gb, "dtype": args.dtype, "samples": args.samples, "tokens": args.tokens,
                     "batch_size": args.batch_size, "repeat": args.repeat, "seed": args.seed,
                     "full_logits": args.full_logits},
        "result": rounded(res, skip=("runs", "profile"))
        | {f"{op}_runs": [rounded({k: m[k] for k in ("wall_s", "rss_mib", "user_s", "sys_s", "machine_busy_pct",
                                                  "others_busy_pct", "loadavg_1m_before", "order")})
                         for m in res["runs"][op]]
           for op in ("calibrate", "baseline")},
        "profile": None if not res.get("profile") else {
            "wall_s": round(res["profile"]["wall_s"], 2), "rss_mib": round(res["profile"]["rss_mib"], 1),
            "import_s": round(res["profile"]["import_s"], 2),
            "timers_s": {k: round(v[0], 3) for k, v in res["profile"]["timers"].items()},
            "peak": res["profile"]["peak"], "peak_phase": res["profile"]["peak_phase"],
            "mem": res["profile"]["mem"]},
        "floor": floor,
        "targets": res["targets"],
        "total_s": round(total_s, 1),
    }
    print(json.dumps(summary, sort_keys=True))


# --------------------------------------------------------------------------- main


def main() -> None:
    global LAYERS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size, GiB (default 4)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                    help="checkpoint and compute dtype (default float32; see above)")
    ap.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sample (default 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per forward batch (default 8, calibrate's)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each command (median; order alternated)")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="extra in-process calibrate run with phase timers: when a target is missed (auto)")
    ap.add_argument("--cprofile", action="store_true", help="also run that profile under cProfile (slower)")
    ap.add_argument("--full-logits", action="store_true", help="baseline computes logits at every position")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8", action="store_true",
                    help="block-FP8 case: quantize the built checkpoint (DeepSeek-V3 style, 128x128 blocks) and run only "
                         "the profiled calibrate (transformers' own FP8 loading on CPU is no baseline); prints the phase table")
    ap.add_argument("--checkpoint-every", default="0",
                    help="calibrate's --checkpoint-every in the timed runs (default 0: a resume state after every layer, "
                         "the worst case of its cost)")
    ap.add_argument("--experts", type=int, default=64, help="routed experts per layer (default 64; e.g. 256 for the "
                                                             "large-expert-count case)")
    ap.add_argument("--layers", type=int, default=LAYERS, help=f"decoder layers (default {LAYERS})")
    ap.add_argument("--resume-cost", action="store_true",
                    help="resume-state case: only the profiled calibrate, with the default --checkpoint-every 10m and "
                         "with 0 (a save after every layer); prints the state-save share of each (e.g. --samples 64 "
                         "--tokens 2048 --size-gb 0.25 --layers 4: the issue's 64 x 2048 target)")
    ap.add_argument("--ranks-io", type=int, default=0, metavar="N",
                    help="page-cache case: calibrate from a cold cache as one process and under torchrun with N ranks "
                         "(gloo, CPU); prints per rank the bytes read from storage and from the page cache")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the scratch directory (default: /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--_build", dest="build", help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", dest="baseline", nargs=9, help=argparse.SUPPRESS)
    ap.add_argument("--_profile", dest="profile_json", help=argparse.SUPPRESS)
    ap.add_argument("--_cprofile", dest="cprofile_out", help=argparse.SUPPRESS)
    ap.add_argument("--_rank_io", dest="rank_io", help=argparse.SUPPRESS)
    ap.add_argument("--_gemm", dest="gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ARCH["num_experts"], LAYERS = args.experts, args.layers

    if args.build:
        return helper_build(args.build, args.size_gb, args.dtype, args.seed)
    if args.baseline:
        ck, data, dtype, batch, n, t, seed, full, out = args.baseline
        return helper_baseline(ck, data, dtype, int(batch), int(n), int(t), int(seed), full == "1", out)
    if args.profile_json:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return helper_profile(rest, args.profile_json, args.cprofile_out)
    if args.gemm:
        return helper_gemm()
    if args.rank_io:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return helper_rank_io(rest, args.rank_io)

    work = make_scratch(args.workdir, "reapsurgery-bench-cal-")
    log = work / "commands.log"
    machine = machine_info(work, cp=False)
    print(f"scratch {work} (log of every command: {log})", flush=True)
    t0 = time.perf_counter()
    try:
        need_disk(machine, work, args.size_gb * 1.1 + 1)
        if machine["mem_total_gib"] < args.size_gb * 1.6 + 2:
            print(f"WARNING: {machine['mem_total_gib']} GiB RAM; the baseline holds the whole model in memory",
                  flush=True)
        vers = subprocess.run([sys.executable, "-c", "import torch, transformers; print(torch.__version__, "
                               "transformers.__version__)"], capture_output=True, text=True, env=ENV).stdout.split()
        machine["torch"], machine["transformers"] = (vers + ["?", "?"])[:2]
        gemm = subprocess.run([sys.executable, str(HERE), "--_gemm"], capture_output=True, text=True, env=ENV)
        machine["gemm_gflops"] = json.loads(gemm.stdout) if gemm.returncode == 0 else {}
        floor = {
            "version": run_measured(reapsurgery_cmd() + ["--version"], log),
            "imports": run_measured([sys.executable, "-c", "import torch, transformers"], log, ENV),
        }
        floor = {k: {"wall_s": round(v["wall_s"], 3), "rss_mib": round(v["rss_mib"], 1)} for k, v in floor.items()}
        if args.fp8:
            return fp8_case(args, work, log)
        if args.resume_cost:
            return resume_cost_case(args, work, log)
        if args.ranks_io:
            return ranks_io_case(args, work, log)
        res = bench(args, work, log)
        machine["loadavg_end"] = list(os.getloadavg())
        machine["rss_method"] = RSS_METHOD
        report(args, machine, res, floor, time.perf_counter() - t0)
    finally:
        drop_scratch(args.keep, work)


if __name__ == "__main__":
    main()
