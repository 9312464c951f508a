"""GGUF apply keeps the safetensors path's promises: bad input and masks that do not fit are refused in
one line (exit 2) with nothing written; signals, kills and a full disk leave no output file or partial
one, and --overwrite never leaves OUT missing."""

from __future__ import annotations

import errno
import json
import shutil
import signal

import pytest

from reapsurgery.common.gguf_model import GGUFModel
from reapsurgery.common.mask import Mask
from reapsurgery.errors import ReapError
from tests.conftest import tree_hash
from tests.gguf_helpers import reader_fields
from tests.helpers import cli
from tests.test_faults import hidden, needs_strace, traced
from tests.test_gguf_apply import KEEP, gguf_mask
from tests.test_gguf_read import CASES
from tests.test_refusals import refused


@pytest.fixture
def src(gguf_files, tmp_path):
    """A private copy of the single-file fixture (so that a test may watch its directory)."""
    d = tmp_path / "src"
    shutil.copytree(gguf_files["single"].parent, d)
    return d / gguf_files["single"].name


@pytest.mark.parametrize("case", ["bad magic", "version 1", "big-endian", "data past the end", "overlapping tensors",
                                  "truncated in the tensor infos"])
def test_bad_gguf_input_is_refused_in_one_line(gguf_files, tmp_path, case):
    make, message = CASES[case]
    bad = tmp_path / "bad.gguf"
    make(gguf_files["single"], bad)
    mask = gguf_mask(gguf_files["single"], KEEP, tmp_path / "m.json")
    refused(cli("apply", mask, bad, tmp_path / "out.gguf"), str(bad), message)
    if case == "data past the end":  # inspect and verify read GGUF files through the same reader
        refused(cli("inspect", bad), str(bad), message)
        r = cli("verify", bad)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "m.json"]


def _mask(src, path, edit=None, layers=None, keep=KEEP):
    m = GGUFModel.open(src)
    model = m.fingerprint()
    layers = layers or {l: list(keep) for l in m.moe_layers}
    if edit:
        edit(model, layers)
    Mask(model, layers, {"method": "manual"}).save(path, overwrite=True)
    return path


MASKS = {
    "expert count": (lambda m, l: m.update(num_experts=16), "num_experts is 16 in this file but 8 there"),
    "layer count": (lambda m, l: m.update(num_hidden_layers=4), "num_hidden_layers is 4 in this file but 3 there"),
    "hidden size": (lambda m, l: m.update(hidden_size=4096), "hidden_size is 4096 in this file but 256 there"),
    "moe layers": (lambda m, l: (m.update(moe_layers=[0, 1]), l.pop(2)), "moe_layers is [0, 1] in this file"),
    "top-k": (lambda m, l: [v.__delitem__(slice(1, None)) for v in l.values()],
              "keeps 1 experts per layer but the model routes each token to qwen3moe.expert_used_count=2"),
}


@pytest.mark.parametrize("case", MASKS)
def test_a_mask_that_does_not_fit_is_refused(src, tmp_path, case):
    edit, message = MASKS[case]
    mask = _mask(src, tmp_path / "m.json", edit)
    before = tree_hash(src.parent)
    refused(cli("apply", mask, src, tmp_path / "out.gguf"), str(mask), message)
    assert tree_hash(src.parent) == before and not (tmp_path / "out.gguf").exists()


def test_group_limited_router_rules(gguf_files, tmp_path):
    """llama.cpp picks a group by its two best experts: every group keeps the same number, at least two,
    and the groups a token may use (expert_group_used_count) hold top-k."""
    src = gguf_files["nextn"]  # 8 experts in 2 groups, 1 group used, top-2
    for keep, message in (([0, 1, 2, 4], "kept per group: [3, 1]"), ([0, 4], "needs at least 2 per group")):
        mask = _mask(src, tmp_path / "m.json", keep=keep)
        refused(cli("apply", mask, src, tmp_path / "out.gguf"), message)
    assert cli("apply", _mask(src, tmp_path / "ok.json", keep=[0, 1, 4, 5]), src, tmp_path / "out.gguf",
               "-q").returncode == 0


def test_safetensors_only_options_are_refused(gguf_files, tmp_path):
    src = gguf_files["nextn"]
    mask = _mask(src, tmp_path / "m.json")
    refused(cli("apply", mask, src, tmp_path / "out.gguf", "--mtp", "keep-full"), "--mtp keep-full")
    refused(cli("apply", mask, src, tmp_path / "out.gguf", "--layout", mask), "--layout describes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


@needs_strace
@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_mid_copy_leaves_nothing(src, tmp_path, sig, code):
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    before = tree_hash(src.parent)
    r = traced(f"copy_file_range:signal={sig}:when=3", "apply", mask, src, tmp_path / "out.gguf", "-q", "-j", "1")
    assert r.returncode == code, r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "src"] and tree_hash(src.parent) == before


@needs_strace
def test_sigkill_leaves_a_hidden_partial_that_the_next_run_removes(src, tmp_path):
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    out = tmp_path / "out.gguf"
    r = traced("copy_file_range:signal=SIGKILL:when=3", "apply", mask, src, out, "-q", "-j", "1")
    assert r.returncode == -signal.SIGKILL
    assert not out.exists() and len(hidden(tmp_path)) == 1
    r = cli("apply", mask, src, out, "-q")
    assert r.returncode == 0 and "removed" in r.stderr, r.stderr
    assert hidden(tmp_path) == [] and cli("verify", out).returncode == 0


@needs_strace
def test_kill_before_the_replace_keeps_the_old_file(src, tmp_path):
    out = tmp_path / "out.gguf"
    a, b = gguf_mask(src, KEEP, tmp_path / "a.json"), gguf_mask(src, [1, 3, 4, 6], tmp_path / "b.json")
    assert cli("apply", a, src, out, "-q").returncode == 0
    old = out.read_bytes()
    r = traced("rename:signal=SIGKILL:when=1", "apply", b, src, out, "-q", "--overwrite")  # os.replace publishes
    assert r.returncode == -signal.SIGKILL
    assert out.read_bytes() == old
    assert cli("apply", b, src, out, "-q", "--overwrite").returncode == 0
    assert hidden(tmp_path) == [] and out.read_bytes() != old
    assert json.loads(reader_fields(out)["reapsurgery.mask"])["layers"]["0"] == [1, 3, 4, 6]


@pytest.mark.parametrize("name", ["single", "split"])
def test_full_disk_leaves_nothing_and_says_which_file(gguf_files, tmp_path, monkeypatch, name):
    from reapsurgery.common.mask import load_mask
    from reapsurgery.surgery import copier
    from reapsurgery.surgery.apply import apply_mask

    src = gguf_files[name]
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    calls = {"n": 0}
    real = copier.copy_range

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr(copier, "copy_range", failing)
    monkeypatch.setattr(copier, "PIECE", 4096)
    out = tmp_path / ("out" if name == "split" else "out.gguf")
    before = tree_hash(src.parent)
    with pytest.raises(ReapError, match=r"No space left on device") as e:
        apply_mask(load_mask(mask), mask, src, out, jobs=2)
    assert e.value.path.startswith(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    assert tree_hash(src.parent) == before


def test_verify_reports_metadata_that_disagrees_with_the_tensors(gguf_files, tmp_path):
    """Each defect is its own line naming the file: a size label that is not the converter's count of the
    tensors, NextN blocks announced but not stored, a recorded mask keeping another count, a MoE block
    without its router."""
    from reapsurgery.common.gguf_file import read_gguf
    from reapsurgery.surgery.gguf_header import encode_kv
    from tests.gguf_helpers import raw_records, rebuild

    src = gguf_files["single"]
    g = read_gguf(src)
    records = raw_records(g)
    STR, U32 = 8, 4
    records["general.size_label"] = encode_kv("general.size_label", STR, "8x999K")
    records["qwen3moe.block_count"] = encode_kv("qwen3moe.block_count", U32, 4)
    records["qwen3moe.nextn_predict_layers"] = encode_kv("qwen3moe.nextn_predict_layers", U32, 1)
    records["reapsurgery.mask"] = encode_kv("reapsurgery.mask", STR, json.dumps({"layers": {"0": [0, 1]}}))
    tensors = [t._replace(name="blk.1.ffn_gate_inq.weight") if t.name == "blk.1.ffn_gate_inp.weight" else t
               for t in g.tensors]
    bad = rebuild(src, tmp_path / "bad.gguf", records=records, tensors=tensors)
    r = cli("verify", bad)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and all(line.startswith(f"error: {bad}: ") for line in lines), r.stderr
    for needle in ("MoE block 1 has no router tensor blk.1.ffn_gate_inp.weight",
                   "qwen3moe.nextn_predict_layers=1 announces 1 NextN block(s) but the file stores 0",
                   "general.size_label is '8x999K' but the tensors make '8x555K'",
                   "reapsurgery.mask does not record a mask keeping the qwen3moe.expert_count=8 experts"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == 4
    assert cli("verify", src).returncode == 0


def _records_edit(key, vtype, value):
    def edit(records, tensors):
        from reapsurgery.surgery.gguf_header import encode_kv

        records[key] = encode_kv(key, vtype, value)
        return tensors
    return edit


def _rename(old, new):
    def edit(records, tensors):
        return [t._replace(name=new) if t.name == old else t for t in tensors]
    return edit


MODELS = {
    "expert count disagreeing with the shapes": (_records_edit("qwen3moe.expert_count", 4, 16),
                                                 "qwen3moe.expert_count=16 experts are expected on its last axis"),
    "no experts": (_records_edit("qwen3moe.expert_count", 4, 0), "is indexed by expert but the metadata has no"),
    "experts one tensor each": (_rename("blk.0.attn_q.weight", "blk.0.ffn_gate.3.weight"),
                                "experts stored one tensor each"),
    "chunk experts": (_records_edit("qwen3moe.experts_per_group", 4, 2), "GroveMoE"),
    "an adapter": (_records_edit("general.type", 8, "adapter"), "is a LoRA adapter"),
    "a block past block_count": (_records_edit("qwen3moe.block_count", 4, 2), "is in block 2, past qwen3moe.block_count=2"),
}


@pytest.mark.parametrize("case", MODELS)
def test_a_gguf_reapsurgery_cannot_prune_is_refused(gguf_files, tmp_path, case):
    from reapsurgery.common.gguf_file import read_gguf
    from tests.gguf_helpers import raw_records, rebuild

    edit, message = MODELS[case]
    src = gguf_files["single"]
    g = read_gguf(src)
    records = raw_records(g)
    tensors = edit(records, list(g.tensors))
    bad = rebuild(src, tmp_path / "bad.gguf", records=records, tensors=tensors)
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    refused(cli("apply", mask, bad, tmp_path / "out.gguf"), str(bad), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "m.json"]


def test_a_split_set_with_a_missing_part_is_refused(gguf_files, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(gguf_files["split"].parent, src_dir)
    first = src_dir / gguf_files["split"].name
    parts = sorted(src_dir.glob("*.gguf"))
    parts[-1].unlink()
    mask = gguf_mask(gguf_files["split"], KEEP, tmp_path / "m.json")
    refused(cli("apply", mask, first, tmp_path / "out"), str(parts[-1]), "is missing")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_not_a_file_is_refused_even_with_overwrite(src, tmp_path):
    """A named pipe (or a device such as /dev/null) where OUT goes would be replaced by the pruned
    file: refused before any work, the pipe left as it is."""
    import os
    import stat

    out = tmp_path / "out.gguf"
    os.mkfifo(out)
    r = cli("apply", gguf_mask(src, KEEP, tmp_path / "m.json"), src, out, "--overwrite")
    refused(r, "out.gguf", "not a regular file")
    assert stat.S_ISFIFO(os.stat(out).st_mode) and hidden(tmp_path) == []
