"""What the benchmarks share: the machine, measured child processes, alternated runs, report lines.

Imported by bench_apply.py and bench_calibrate.py from their own directory (each puts it on
sys.path, so `python benchmarks/bench_X.py` works from anywhere). Standard library only at
import time: the benchmarks' helper child processes import this module too, and some of
them are the very processes whose peak RSS is measured.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------- reapsurgery

# Every reapsurgery module the benchmarks use, named here only (the package's layout moves;
# this table and CLI_MAIN follow it). Imported lazily, in the processes that need them.
MODULES = {
    "safetensors_io": "reapsurgery.common.safetensors_io",
    "checkpoint": "reapsurgery.common.checkpoint",
    "mask": "reapsurgery.common.mask",
    "verify": "reapsurgery.surgery.verify",
    "cli": "reapsurgery.cli",
    "calibrate": "reapsurgery.calibration.calibrate",
    "data": "reapsurgery.calibration.data",
    "observe": "reapsurgery.calibration.observe",
    "saliency": "reapsurgery.common.saliency",
    "streaming": "reapsurgery.calibration.streaming",
    "copier": "reapsurgery.surgery.copier",
    "gguf_file": "reapsurgery.common.gguf_file",
    "gguf_header": "reapsurgery.surgery.gguf_header",
    "gguf_model": "reapsurgery.common.gguf_model",
    "gguf_plan": "reapsurgery.surgery.gguf_plan",
    "plan": "reapsurgery.plan",
}
CLI_MAIN = ("reapsurgery.cli", "main")  # the console script's entry point (pyproject [project.scripts])


def reap(name: str):
    """A reapsurgery module by its short name in MODULES."""
    return importlib.import_module(MODULES[name])


def reapsurgery_cmd() -> list[str]:
    """The console script installed next to this interpreter.

    Not `shutil.which`: under pyenv that finds a bash shim that runs ~25 processes
    (~0.2 s) before Python starts, which is not reapsurgery's cost.
    """
    exe = Path(sys.executable).parent / "reapsurgery"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    mod, fn = CLI_MAIN
    return [sys.executable, "-c", f"import sys; from {mod} import {fn}; sys.argv[0] = 'reapsurgery'; {fn}()"]


# Child processes that load models with transformers: offline and quiet.
HF_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")


# --------------------------------------------------------------------------- machine


def machine_info(workdir: Path, cp: bool = True) -> dict:
    """CPU model and count, RAM, the workdir's filesystem and free space, kernel, python, load."""
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    fstype = "?"
    try:
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(workdir)],
                                capture_output=True, text=True, check=True).stdout.split("\n")[0].strip() or "?"
    except (OSError, subprocess.CalledProcessError):
        best = ""
        real = str(workdir.resolve())
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    free = shutil.disk_usage(workdir).free
    info = {
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem / GiB, 1),
        "cpu": cpu,
        "workdir": str(workdir),
        "fstype": fstype,
        "disk_free_gib": round(free / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if cp:
        try:
            info["cp"] = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            info["cp"] = "?"
    info["loadavg_start"] = list(os.getloadavg())
    return info


def need_disk(machine: dict, work: Path, need_gib: float) -> None:
    if machine["disk_free_gib"] < need_gib:
        raise SystemExit(f"{work}: {machine['disk_free_gib']} GiB free, this run needs about {need_gib:.0f} GiB")


def make_scratch(parent: Path | None, prefix: str) -> Path:
    """A fresh directory under parent (default: the system temp directory)."""
    parent = parent or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def drop_scratch(keep: bool, *dirs: Path | None) -> None:
    dirs = [d for d in dirs if d]
    if keep:
        print("kept " + " and ".join(str(d) for d in dirs), file=sys.stderr)
    else:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- files


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def warm(path: Path) -> None:
    """Read every file under path once so the timed command reads from the page cache."""
    buf = bytearray(8 * MiB)
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def fs_sync(path: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["sync", "-f", str(path)], check=False)
    return time.perf_counter() - t


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


class Filler:
    """Arbitrary, non-repeating-at-chunk-granularity bytes without generating them all."""

    def __init__(self, seed: int, pool: int = 64 * MiB, chunk: int = 16 * MiB):
        rnd = random.Random(seed)
        block = rnd.randbytes(pool)
        self.buf = memoryview(block + block)
        self.pool, self.chunk, self.rnd = pool, chunk, rnd

    def write(self, fd: int, n: int) -> None:
        while n > 0:
            k = min(n, self.chunk)
            off = self.rnd.randrange(0, self.pool // 4096) * 4096
            done = 0
            while done < k:
                done += os.write(fd, self.buf[off + done: off + k])
            n -= k


# --------------------------------------------------------------------------- Qwen3-MoE layout


def synth_layer(L: int, c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """One decoder layer's tensors (per-expert names, as transformers saves Qwen3-MoE), in module order."""
    H, I, E = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = f"model.layers.{L}."
    out = [
        (p + "self_attn.q_proj.weight", (nh * hd, H)),
        (p + "self_attn.k_proj.weight", (nkv * hd, H)),
        (p + "self_attn.v_proj.weight", (nkv * hd, H)),
        (p + "self_attn.o_proj.weight", (H, nh * hd)),
        (p + "self_attn.q_norm.weight", (hd,)),
        (p + "self_attn.k_norm.weight", (hd,)),
        (p + "mlp.gate.weight", (E, H)),
    ]
    for e in range(E):
        out += [
            (p + f"mlp.experts.{e}.gate_proj.weight", (I, H)),
            (p + f"mlp.experts.{e}.up_proj.weight", (I, H)),
            (p + f"mlp.experts.{e}.down_proj.weight", (H, I)),
        ]
    out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
    return out


def tensor_order(c: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Qwen3-MoE checkpoint as transformers saves it, in module order."""
    H, V = c["hidden_size"], c["vocab_size"]
    order = [("model.embed_tokens.weight", (V, H))]
    for L in range(layers):
        order += synth_layer(L, c)
    order += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    return order


def shard_plan(order, nbytes: int, limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split in module order like save_pretrained: a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    cur = 0
    for name, shape in order:
        n = nbytes * math.prod(shape)
        if shards[-1] and cur + n > limit:
            shards.append([])
            cur = 0
        shards[-1].append((name, shape))
        cur += n
    return shards


# --------------------------------------------------------------------------- measured runs


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_METHOD = "GNU time %M" if TIME else "VmHWM poll"


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one child; wall time and the peak RSS of that process alone.

    A child's rusage ru_maxrss starts from the hiwater RSS of the process it was forked
    from (Linux records the old mm's peak at exec), so os.wait4 on a direct child of a
    benchmark (bench_apply holds a 128 MiB random pool) would report >= that. The command
    is therefore run under GNU time (a ~1 MiB process), whose wait4 of the grandchild gives
    its own peak. Without /usr/bin/time, /proc/PID/status VmHWM is polled instead.
    """
    tfile = log.with_suffix(".time")
    full = [TIME, "-o", str(tfile), "-f", "%M %U %S %I %O %F"] + cmd if TIME else cmd
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        busy0, total0 = cpu_ticks()
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, env=env)
        hwm = 0
        while True:
            pid, status, ru = os.wait4(p.pid, 0 if TIME else os.WNOHANG)
            if pid:
                break
            hwm = max(hwm, _vm_hwm_kib(p.pid))
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        busy1, total1 = cpu_ticks()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n--- log tail ---\n{tail}")
    if TIME:
        fields = tfile.read_text().split()[-6:]
        rss_kib, user, sys_, inb, outb, majflt = int(fields[0]), float(fields[1]), float(fields[2]), \
            int(fields[3]), int(fields[4]), int(fields[5])
    else:
        rss_kib, user, sys_ = hwm, ru.ru_utime, ru.ru_stime
        inb, outb, majflt = ru.ru_inblock, ru.ru_oublock, ru.ru_majflt
    # Share of the machine's CPUs busy during the run; the command itself can fill at most one.
    busy = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")
    return {"wall_s": wall, "rss_mib": rss_kib / 1024, "user_s": user, "sys_s": sys_, "machine_busy_pct": busy,
            "majflt": majflt, "inblock": inb, "oublock": outb, "rss_method": RSS_METHOD}


def run_warm(cmd: list[str], log: Path, src: Path, env: dict | None = None, sync: Path | None = None) -> dict:
    """run_measured with src in the page cache; with sync, the filesystem synced before and after.

    Adds loadavg_1m_before, and with sync the seconds the writeback took (sync_s) and wall_sync_s.
    """
    warm(src)
    if sync:
        fs_sync(sync)
    load0 = os.getloadavg()[0]
    m = run_measured(cmd, log, env)
    m["loadavg_1m_before"] = load0
    if sync:
        m["sync_s"] = fs_sync(sync)
        m["wall_sync_s"] = m["wall_s"] + m["sync_s"]
    return m


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    """Whether this process may empty the page cache (root, and /proc/sys writable here)."""
    try:
        DROP_CACHES.write_text("1\n")
        return True
    except OSError:
        return False


def run_cold(cmd: list[str], log: Path, sync: Path, env: dict | None = None) -> dict:
    """run_measured from an empty page cache (sync, then drop_caches), synced after as run_warm does."""
    fs_sync(sync)
    subprocess.run(["sync"], check=False)
    DROP_CACHES.write_text("3\n")
    load0 = os.getloadavg()[0]
    m = run_measured(cmd, log, env)
    m["loadavg_1m_before"] = load0
    m["sync_s"] = fs_sync(sync)
    m["wall_sync_s"] = m["wall_s"] + m["sync_s"]
    return m


def rotated(repeat: int, ops: list[str]):
    """(rep, order) for each rep: every op back to back, the order rotating from rep to rep."""
    for r in range(repeat):
        k = r % len(ops)
        yield r, ops[k:] + ops[:k]


def alternated(repeat: int, first: str, second: str):
    """(rep, order) for each rep: the two commands back to back, which goes first alternating."""
    for r in range(repeat):
        yield r, [first, second] if r % 2 == 0 else [second, first]


# --------------------------------------------------------------------------- medians and ratios


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _get(key):
    return key if callable(key) else (lambda m: m[key])


def med_of(runs: list[dict], key) -> float:
    """Median of a measured quantity (a key, or a function of one run) over runs."""
    return med([_get(key)(m) for m in runs])


def max_of(runs: list[dict], key) -> float:
    return max(_get(key)(m) for m in runs)


def paired_ratio(a: list[dict], b: list[dict], key="wall_s") -> float:
    """Median of a/b over back-to-back pairs: each pair shares that moment's noise."""
    f = _get(key)
    return med([f(x) / f(y) for x, y in zip(a, b)])


def cpu_s(m: dict) -> float:
    return m["user_s"] + m["sys_s"]


# --------------------------------------------------------------------------- report


def print_machine(title: str, machine: dict, cpu_extra: str = "", tools: str = "", load_extra: str = "") -> None:
    """The report's banner: title, then the machine in three lines."""
    print("\n" + "=" * 100)
    print(title)
    print(f"machine: {machine['nproc']} cpus ({machine['sched_cpus']} usable), {machine['mem_total_gib']} GiB RAM, "
          f"{machine['cpu']}{cpu_extra}")
    print(f"         workdir {machine['workdir']} on {machine['fstype']} ({machine['disk_free_gib']} GiB free), "
          f"kernel {machine['kernel']}, python {machine['python']}{tools}")
    print(f"         load average at start {machine['loadavg_start']}, at end {machine['loadavg_end']}{load_extra}")


def print_header(hdr: str) -> None:
    """A plain-text table's column header, underlined."""
    print(hdr)
    print("-" * len(hdr))


def copy_summary(runs: dict[str, list[dict]], ops: list[str]) -> dict:
    """The medians and ratios of one cache mode's apply-vs-cp runs (what print_copy_table reads)."""
    med_s = {op: med_of(runs[op], "wall_s") for op in ops}
    applies = [op for op in ops if op.startswith("apply")]
    return {
        "median_s": med_s,
        "runs_s": {op: [round(m["wall_s"], 3) for m in runs[op]] for op in ops},
        "ratio_cp": {op: med_s[op] / med_s["cp"] for op in applies},
        "ratio_cat": {op: med_s[op] / med_s["cat"] for op in applies},
        "ratio_cp_in": {op: med_s[op] / med_s["cp-in"] for op in applies},
        "paired_cp": {op: paired_ratio(runs[op], runs["cp"]) for op in applies},
        "apply_rss_mib": max(max_of(runs[op], "rss_mib") for op in applies),
    }


def print_copy_table(p, sizes: list[dict], jobs: list[str], last: tuple[str, Callable[[dict], str]]) -> None:
    """The apply-vs-cp table of bench_apply and bench_gguf: per size and cache mode, the median
    seconds of each command and apply's ratios to cp of the output, cat of it and cp of the input,
    then peak RSS and `last` (its header, and the cell from the mode's results)."""
    label, cell = last
    hdr = (f"{'input':>8} {'output':>8} {'cache':>5} | " + " ".join(f"{op:>9}" for op in jobs) +
           f" {'cp':>7} {'cat':>7} {'cp-in':>7} | " + " ".join(f"{op[6:] + '/cp':>7}" for op in jobs) +
           " " + " ".join(f"{op[6:] + '/cat':>7}" for op in jobs) +
           " " + " ".join(f"{op[6:] + '/cpin':>7}" for op in jobs) + f" | {'RSS MiB':>7} {label:>5}")
    print_header(hdr)
    for r in sizes:
        for mode, m in r["modes"].items():
            t = m["median_s"]
            p(f"{r['input_bytes'] / GiB:6.2f}Gi {r['output_bytes'] / GiB:6.2f}Gi {mode:>5} | " +
              " ".join(f"{t[op]:8.2f}s" for op in jobs) + f" {t['cp']:6.2f}s {t['cat']:6.2f}s {t['cp-in']:6.2f}s | " +
              " ".join(f"{m['ratio_cp'][op]:7.2f}" for op in jobs) + " " +
              " ".join(f"{m['ratio_cat'][op]:7.2f}" for op in jobs) + " " +
              " ".join(f"{m['ratio_cp_in'][op]:7.2f}" for op in jobs) +
              f" | {m['apply_rss_mib']:7.1f} {cell(m)}")


def rounded(d: dict, skip=()) -> dict:
    """d without the keys in skip, floats rounded to 4 places (for the JSON summary line)."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if k not in skip}
