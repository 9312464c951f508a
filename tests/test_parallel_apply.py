"""Parallel surgery: any number of copy workers writes the very same bytes, adjacent ranges are
copied as one, and a worker that fails mid-run leaves nothing behind and says so in one line."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.common.safetensors_io import PAGE, read_header
from reapsurgery.surgery import copier, shards, writer
from reapsurgery.surgery.apply import apply_mask
from reapsurgery.surgery.safetensors_plan import plan_surgery
from reapsurgery.surgery.writer import file_ranges
from tests.conftest import tree_hash
from tests.helpers import assert_output_is_input_slices, cli, write_mask
from tests.reference import load, logits, pruned_in_memory
from tests.test_apply import FAMILIES
from tests.test_quantized import CT_CASES, FP8_FAMILIES, KEEP, compressed, fp8, mxfp4  # noqa: F401 (fixtures)


def _serial_and_parallel(src, keep, tmp_path, monkeypatch):
    """Also with the output split into shards for the workers (as a large one is): the split
    depends on the plan alone, never on --jobs."""
    mask = write_mask(src, keep, tmp_path / "m.json")
    apply_mask(load_mask(mask), mask, src, tmp_path / "serial", jobs=1)
    monkeypatch.setattr(copier, "PIECE", 4096)  # many pieces, ranges split across workers
    apply_mask(load_mask(mask), mask, src, tmp_path / "parallel", jobs=4)
    serial, parallel = tree_hash(tmp_path / "serial"), tree_hash(tmp_path / "parallel")
    assert serial == parallel
    assert any(name.endswith(".safetensors") for name in serial)
    _split_like_a_large_output(monkeypatch)
    apply_mask(load_mask(mask), mask, src, tmp_path / "split-serial", jobs=1)
    apply_mask(load_mask(mask), mask, src, tmp_path / "split-parallel", jobs=3)
    split = tree_hash(tmp_path / "split-serial")
    assert split == tree_hash(tmp_path / "split-parallel")
    assert sum(n.endswith(".safetensors") for n in split) > sum(n.endswith(".safetensors") for n in serial)


def _split_like_a_large_output(monkeypatch):
    """Fixtures are small, and some have many shards: split them as a large output of few shards is."""
    monkeypatch.setattr(shards, "PART_MIN", 1)
    monkeypatch.setattr(shards, "MAX_JOBS", 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_output_is_byte_identical_to_serial(checkpoints, tmp_path, monkeypatch, family):
    _serial_and_parallel(checkpoints[family], [0, 2, 5, 7], tmp_path, monkeypatch)


@pytest.mark.parametrize("fmt", [f"fp8-{f}" for f in FP8_FAMILIES] + ["mxfp4"] + ["ct-" + "-".join(c) for c in CT_CASES])
def test_parallel_output_is_byte_identical_to_serial_quantized(request, tmp_path, monkeypatch, fmt):
    kind, _, rest = fmt.partition("-")
    if kind == "fp8":
        src, keep = request.getfixturevalue("fp8")[rest], KEEP[rest]
    elif kind == "mxfp4":
        src, keep = request.getfixturevalue("mxfp4"), [0, 3, 4, 7]
    else:
        family, scheme = rest.split("-", 1)
        src, keep = request.getfixturevalue("compressed")[(family, scheme)], KEEP[family]
    _serial_and_parallel(src, keep, tmp_path, monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_adjacent_source_ranges_are_one_copy(checkpoints, tmp_path, family):
    """Keeping every expert, each output shard is copied in as many ranges as the source data
    has gaps (dropped MTP tensors) plus one; keeping experts 0-3, never more ranges than kept runs."""
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    E = ckpt.num_experts
    plan = plan_surgery(ckpt, load_mask(write_mask(src, list(range(E)), tmp_path / "all.json")), tmp_path / "all.json")
    for shard in plan.shards:
        header = ckpt.header(shard.source)
        names = {t.name for t in shard.tensors}
        kept = sorted((i.start, i.end) for n, i in header.tensors.items() if n in names)
        runs = []
        for start, end in kept:  # independent expectation: the kept tensors' byte intervals merged
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
        assert file_ranges(shard) == [(header.data_offset + a, b - a) for a, b in runs], shard.source


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "single_file"])
def test_output_split_for_the_workers_loads_like_the_unsplit_one(checkpoints, tmp_path, monkeypatch, family):
    """A large output shard is written as several, so that each worker has a file of its own:
    transformers loads them to the same logits as in-memory pruning, every tensor is the
    input's bytes, and each part's data starts where its first source range does in a page."""
    src, keep = checkpoints[family], [0, 2, 5, 7]
    ckpt = Checkpoint.open(src)
    mask = write_mask(src, keep, tmp_path / "m.json")
    _split_like_a_large_output(monkeypatch)
    plan = plan_surgery(ckpt, load_mask(mask), mask)
    assert len(plan.shards) > len(ckpt.shards)
    apply_mask(load_mask(mask), mask, src, tmp_path / "out", jobs=3)

    pruned, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(logits(pruned), logits(pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep))))
    assert_output_is_input_slices(src, tmp_path / "out", keep)
    assert cli("verify", tmp_path / "out").returncode == 0
    for shard in plan.shards:
        data_offset = read_header(tmp_path / "out" / shard.name).data_offset
        assert data_offset % 8 == 0 and data_offset % PAGE == shard.ranges[0] % PAGE, shard.name


def test_workers_keep_to_files_nobody_else_writes(tmp_path, monkeypatch):
    """A worker shares a file (on ext4 no faster than one writer) only when every other file is
    being written or has nothing left; each piece is copied once, each file's in order."""
    taken = []  # (thread, file, piece), recorded under the scheduler's lock as pieces are handed out

    def file(f, n):
        for i in range(n):
            piece = copier.Piece(tmp_path / "src", tmp_path / f"out{f}", i, ((i, 1),))
            taken.append((threading.get_ident(), f, piece))
            yield piece

    sizes = [7, 2, 5, 1, 3]
    monkeypatch.setattr(copier, "_copy_piece", lambda piece, stop, drop: threading.Event().wait(0.002 * (1 + piece.dst_offset % 3)))
    copier.run_pieces([file(f, n) for f, n in enumerate(sizes)], 3)

    held: dict[int, int] = {}  # thread -> the file it writes, until it takes its next piece
    handed = [0] * len(sizes)
    for thread, f, piece in taken:
        held.pop(thread, None)
        if f in held.values():
            free = [g for g in range(len(sizes)) if g not in held.values() and handed[g] < sizes[g] and g != f]
            assert not free, f"a worker joined file {f} while files {free} had no writer"
        held[thread] = f
        assert piece.dst_offset == handed[f]
        handed[f] += 1
    assert handed == sizes


@pytest.mark.parametrize("fits", [True, False])
def test_source_pages_are_dropped_only_when_the_run_exceeds_free_memory(checkpoints, tmp_path, monkeypatch, fits):
    """A run that fits in free memory evicts nothing, so the source stays cached for the next
    run (another sparsity); a larger one drops each source range once copied."""
    src = checkpoints["qwen3_moe"]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    advice = []
    monkeypatch.setattr(copier, "_advise", lambda fd, off, n, how: advice.append((how, n)))
    monkeypatch.setattr(writer, "free_memory", lambda: (1 << 40) if fits else PAGE)
    plan = plan_surgery(Checkpoint.open(src), load_mask(mask), mask)
    apply_mask(load_mask(mask), mask, src, tmp_path / "out", jobs=2)
    dropped = [n for how, n in advice if how == os.POSIX_FADV_DONTNEED]
    assert sum(n for how, n in advice if how == os.POSIX_FADV_WILLNEED) == plan.total_size
    assert sum(dropped) == (0 if fits else plan.total_size)


def _no_output_left(tmp_path, out):
    """Neither OUT nor its hidden partial, nor the parent directory the run made for it."""
    assert not out.exists()
    assert not out.parent.exists(), "the parent this run made was left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def _cli_in_process(args, capsys):
    from reapsurgery.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_worker_failing_mid_run_leaves_nothing(checkpoints, tmp_path, monkeypatch, capsys, err):
    src = checkpoints["qwen3_moe"]
    before = tree_hash(src)
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    calls = []
    real = copier.copy_piece

    def failing(piece, stop, drop_source):
        calls.append(piece)
        if len(calls) == 5:
            raise OSError(err, os.strerror(err))
        real(piece, stop, drop_source)

    monkeypatch.setattr(copier, "PIECE", 4096)
    monkeypatch.setattr(copier, "_copy_piece", failing)
    out = tmp_path / "parent" / "out"
    code, stderr = _cli_in_process(["apply", mask, src, out, "-q", "--jobs", "3"], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}/model-") and os.strerror(err) in lines[0]
    assert "Traceback" not in stderr
    _no_output_left(tmp_path, out)
    assert tree_hash(src) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace for fault injection")
@pytest.mark.parametrize("inject,code,message", [
    ("error=ENOSPC", 2, "No space left on device"),
    ("error=EIO", 2, "Input/output error"),
    ("signal=SIGINT", 130, "interrupted"),
])
def test_kernel_copy_failing_in_a_worker_thread_leaves_nothing(checkpoints, tmp_path, inject, code, message):
    """The real syscall fails (strace injects it in whichever worker thread makes the 4th copy)."""
    src = checkpoints["gpt_oss"]
    mask = write_mask(src, [0, 3, 4, 7], tmp_path / "m.json")
    out = tmp_path / "parent" / "out"
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=copy_file_range",
                        "-e", f"inject=copy_file_range:{inject}:when=4",
                        sys.executable, "-m", "reapsurgery", "apply", str(mask), str(src), str(out), "-q", "-j", "4"],
                       capture_output=True, text=True)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    _no_output_left(tmp_path, out)


@pytest.fixture(scope="module")
def kimi_scale(tmp_path_factory):
    """139,583 tensors (Kimi-K2's count) in a header-scale checkpoint, and a mask keeping half."""
    from fixtures.header_scale import build

    tmp = tmp_path_factory.mktemp("kimi")
    src = build(tmp / "kimi")
    return src, write_mask(src, list(range(0, 384, 2)), tmp / "m.json")


def _peak_rss_mib(*args: str) -> tuple[float, str]:
    """Peak RSS of one CLI command, read by the process itself (VmHWM of its own address space)."""
    code = ("import sys; from reapsurgery.cli import main\n"
            f"try: main({list(args)!r})\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024, r.stdout


def test_surgery_memory_at_kimi_k2_tensor_count(kimi_scale, tmp_path):
    """The issue's target: peak RSS <= 64 MiB at Kimi-K2's tensor count. Was 196 MiB (every tensor
    in dicts, classified 2-3 times), 99 once planning went shard by shard; now the index is
    scanned into a compact map and the output index is merged shard by shard (56 here)."""
    src, mask = kimi_scale
    peak, _ = _peak_rss_mib("apply", str(mask), str(src), str(tmp_path / "out"), "-q")
    assert Checkpoint.open(tmp_path / "out").num_experts == 192
    assert peak <= 64, f"apply: peak RSS {peak:.0f} MiB at 139,583 tensors"
    for command in (["verify", str(src)], ["verify", str(tmp_path / "out")], ["inspect", str(src)],
                    ["inspect", str(mask), "--ckpt", str(src)]):
        peak, out = _peak_rss_mib(*command)
        assert peak <= 64, f"{command[0]}: peak RSS {peak:.0f} MiB at 139,583 tensors"
