"""`apply` on GGUF files (any ggml type, single or split): the output holds the kept slices of every
expert-indexed tensor and every other tensor as it was, as llama.cpp's own Python reader reads them,
with the metadata rewritten as the converter would have written it for the pruned model."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from reapsurgery.common.gguf_file import read_gguf
from reapsurgery.common.gguf_model import GGUFModel
from reapsurgery.common.mask import Mask
from tests.conftest import tree_hash
from tests.gguf_helpers import raw_records, reader_fields, reader_tensors, rebuild
from tests.helpers import cli

KEEP = [0, 2, 5, 7]


def gguf_mask(src, keep, path, layers=None):
    """A mask for a GGUF fixture: `keep` in every MoE layer (and in `layers`, e.g. a NextN block)."""
    m = GGUFModel.open(src)
    Mask(m.fingerprint(), {l: list(keep) for l in (layers or m.moe_layers)}, {"method": "manual"}).save(path, overwrite=True)
    return path


def parts_of(path):
    """The files of a GGUF model: the file, or every part of its split set in order."""
    if "-00001-of-" in path.name:
        return sorted(path.parent.glob(path.name.replace("-00001-of-", "-*-of-")))
    return [path]


def all_tensors(path):
    out = {}
    for p in parts_of(path):
        out.update(reader_tensors(p))
    return out


ROUTED = re.compile(r"^blk\.\d+\.(\w+_exps\.\w+|ffn_gate_inp\.(weight|bias)|exp_probs_b\.bias)$")


def expected(src, keep, n_layer, drop_mtp=True):
    """Every output tensor as it must be: the source's bytes, or the rows of the kept experts (the
    slowest axis: expert e's bytes are the e-th of E equal runs), NextN blocks dropped. Indexed by
    expert: llama.cpp's stacked experts (*_exps), the router's weight and bias, exp_probs_b."""
    E = GGUFModel.open(src).num_experts
    out = {}
    for name, (ne, ggml_type, data) in all_tensors(src).items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if drop_mtp and layer is not None and layer >= n_layer:
            continue
        if not ROUTED.match(name):
            out[name] = (ne, ggml_type, data)
            continue
        run = len(data) // E
        out[name] = (ne[:-1] + (len(keep),), ggml_type, b"".join(data[e * run:(e + 1) * run] for e in keep))
    return out


def applied(mask, src, out, *args):
    before = tree_hash(src.parent)
    r = cli("apply", mask, src, out, "-q", *args)
    assert r.returncode == 0, r.stderr
    assert tree_hash(src.parent) == before  # the input is never written
    return r


@pytest.mark.parametrize("name", ["single", "split", "bias", "fused", "nextn", "scales"])
def test_pruned_gguf_holds_the_kept_slices(gguf_files, tmp_path, name):
    src = gguf_files[name]
    model = GGUFModel.open(src)
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    out = tmp_path / ("out" if len(model.parts) > 1 else "out.gguf")
    applied(mask, src, out)
    first = out / src.name if out.is_dir() else out
    assert all_tensors(first) == expected(src, KEEP, model.num_hidden_layers)
    if out.is_dir():
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in parts_of(src))
    # metadata: the expert count and what follows from the tensors rewritten, the rest as it was
    before, after = reader_fields(src), reader_fields(first)
    arch = before["general.architecture"]
    assert after[f"{arch}.expert_count"] == len(KEEP)
    import gguf

    w = gguf.GGUFWriter(None, arch)  # the converter's own parameter count and label of the output's tensors
    for n, (ne, t, data) in all_tensors(first).items():
        w.tensors[0][n] = gguf.gguf_writer.TensorInfo(shape=tuple(reversed(ne)), dtype=t, nbytes=len(data))
    assert after["general.size_label"] == gguf.size_label(*w.get_total_parameter_count()) != before["general.size_label"]
    recorded = json.loads(after["reapsurgery.mask"])
    assert recorded["layers"] == {str(l): KEEP for l in model.moe_layers}
    assert after["reapsurgery.mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    rewritten = {f"{arch}.expert_count", "general.size_label", f"{arch}.block_count", f"{arch}.nextn_predict_layers",
                 "split.tensors.count"}
    assert {k: v for k, v in after.items() if k not in rewritten and not k.startswith("reapsurgery.")} == \
        {k: v for k, v in before.items() if k not in rewritten}
    if model.nextn:  # dropped: the counts say there is none
        assert after[f"{arch}.block_count"] == model.num_hidden_layers and after[f"{arch}.nextn_predict_layers"] == 0
    if len(model.parts) > 1:
        assert after["split.tensors.count"] == len(all_tensors(first))
    assert cli("verify", first).returncode == 0
    # the data starts at the source data's offset within a page (the recorded mask is padded for it)
    assert read_gguf(first).data_offset % 4096 == model.first.data_offset % 4096


def test_keep_all_is_the_source_apart_from_the_recorded_mask(gguf_files, tmp_path):
    """Every byte of the file (header, padding, data) is the source's, once the reapsurgery.* records
    are taken out again."""
    for name in ("single", "fused"):
        src = gguf_files[name]
        mask = gguf_mask(src, range(8), tmp_path / f"{name}.json")
        out = tmp_path / f"{name}.gguf"
        applied(mask, src, out)
        records = {k: v for k, v in raw_records(read_gguf(out)).items() if not k.startswith("reapsurgery.")}
        assert rebuild(out, tmp_path / "stripped.gguf", records=records).read_bytes() == src.read_bytes(), name


def test_nextn_blocks_covered_by_the_mask_are_pruned_and_kept(gguf_files, tmp_path):
    src = gguf_files["nextn_split"]
    model = GGUFModel.open(src)
    n = model.num_hidden_layers
    mask = gguf_mask(src, KEEP, tmp_path / "m.json", layers=model.moe_layers + [n])
    out = tmp_path / "out"
    r = applied(mask, src, out)
    first = out / src.name
    assert all_tensors(first) == expected(src, KEEP, n, drop_mtp=False)
    fields = reader_fields(first)
    assert fields["qwen3moe.block_count"] == n + 1 and fields["qwen3moe.nextn_predict_layers"] == 1
    assert "dropped" not in r.stdout


def test_a_split_output_has_the_parts_of_the_source_even_emptied(gguf_files, tmp_path):
    """Dropping the NextN block can leave a part without tensors: it is still written, so the set
    keeps its names and count (llama.cpp loads a part without tensors, as gguf-split writes one)."""
    src = gguf_files["nextn_split"]
    out = tmp_path / "out"
    applied(gguf_mask(src, KEEP, tmp_path / "m.json"), src, out)
    names = [p.name for p in parts_of(src)]
    assert sorted(p.name for p in out.iterdir()) == names
    assert GGUFModel.open(out / names[0]).nextn == 0


def test_dry_run_writes_nothing(gguf_files, tmp_path):
    src = gguf_files["split"]
    r = cli("apply", gguf_mask(src, KEEP, tmp_path / "m.json"), src, tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "dry run: would write" in r.stdout and "metadata: qwen3moe.expert_count 8 -> 4" in r.stdout
    r = cli("apply", tmp_path / "m.json", src, tmp_path / "out", "--dry-run", "--json")
    facts = json.loads(r.stdout)
    assert facts["format"] == "gguf" and facts["config_changes"]["qwen3moe.expert_count"] == [8, 4]
    assert [f["name"] for f in facts["shards"]] == [p.name for p in parts_of(src)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_overwrite_and_outputs_that_would_touch_the_input(gguf_files, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(gguf_files["single"].parent, src_dir)
    src = src_dir / gguf_files["single"].name
    mask, other = gguf_mask(src, KEEP, tmp_path / "m.json"), gguf_mask(src, [1, 3, 4, 6], tmp_path / "o.json")
    out = tmp_path / "out.gguf"
    applied(mask, src, out)
    r = cli("apply", other, src, out, "-q")
    assert r.returncode == 2 and "output file exists (pass --overwrite" in r.stderr
    applied(other, src, out, "--overwrite")
    assert json.loads(reader_fields(out)["reapsurgery.mask"])["layers"]["0"] == [1, 3, 4, 6]
    before = tree_hash(src_dir)
    for target, args in ((src, ("--overwrite",)), (src_dir, ("--overwrite",))):
        r = cli("apply", mask, src, target, "-q", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert tree_hash(src_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_parallel_copy_writes_the_same_bytes(gguf_files, tmp_path, monkeypatch):
    from reapsurgery.common.mask import load_mask
    from reapsurgery.surgery import copier
    from reapsurgery.surgery.apply import apply_mask

    src = gguf_files["split"]
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    apply_mask(load_mask(mask), mask, src, tmp_path / "serial", jobs=1)
    monkeypatch.setattr(copier, "PIECE", 4096)  # many pieces, holes and ranges split across workers
    apply_mask(load_mask(mask), mask, src, tmp_path / "parallel", jobs=4)
    assert tree_hash(tmp_path / "serial") == tree_hash(tmp_path / "parallel")


def test_a_saliency_file_plans_the_mask_against_the_gguf(gguf_files, tmp_path):
    """apply SALIENCY X.gguf --sparsity F plans as `plan --ckpt X.gguf` does, with the GGUF's router facts."""
    from tests.handmade import saliency, stats

    src = gguf_files["nextn"]  # group-limited: 2 groups of 4, 1 used
    m = GGUFModel.open(src)
    sal = saliency(m.fingerprint(), {l: stats([10 * (e + 1) for e in range(8)], reap_sum=[e for e in range(8)])
                                     for l in m.moe_layers})
    sal.save(tmp_path / "sal.json")
    r = cli("plan", tmp_path / "sal.json", "--sparsity", "0.5", "--ckpt", src, "-o", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    applied(tmp_path / "sal.json", src, tmp_path / "out.gguf", "--sparsity", "0.5")
    recorded = json.loads(reader_fields(tmp_path / "out.gguf")["reapsurgery.mask"])
    assert recorded["layers"] == json.loads((tmp_path / "m.json").read_text())["layers"]
    assert recorded["layers"][str(m.moe_layers[0])] == [2, 3, 6, 7]  # the most salient two of each group


def test_masks_without_hidden_size_still_apply(checkpoints, gguf_files, tmp_path):
    """Masks written before the fingerprint recorded hidden_size apply to both formats; a mask that records
    another hidden size is refused for both."""
    from tests.helpers import write_mask

    st = checkpoints["qwen3_moe"]
    for src, mask in ((st, write_mask(st, KEEP, tmp_path / "st.json")),
                      (gguf_files["single"], gguf_mask(gguf_files["single"], KEEP, tmp_path / "gguf.json"))):
        data = json.loads(mask.read_text())
        assert isinstance(data["model"].pop("hidden_size"), int)
        mask.write_text(json.dumps(data))
        out = tmp_path / ("out.gguf" if src.suffix == ".gguf" else "out")
        applied(mask, src, out)
        data["model"]["hidden_size"] = 12345
        mask.write_text(json.dumps(data))
        r = cli("apply", mask, src, tmp_path / "other", "-q")
        assert r.returncode == 2 and "hidden_size is 12345 in this file" in r.stderr, r.stderr


def test_the_directory_of_a_pruned_split_set_is_a_gguf_input(gguf_files, tmp_path):
    """apply's split output directory is read as the GGUF model it holds: pruned again, verified, inspected."""
    src = gguf_files["split"]
    out = tmp_path / "out"
    applied(gguf_mask(src, KEEP, tmp_path / "m.json"), src, out)
    first = out / src.name
    again = tmp_path / "again"
    r = cli("apply", gguf_mask(first, [1, 3], tmp_path / "m2.json"), out, again, "-q")
    assert r.returncode == 0, r.stderr
    assert all_tensors(again / src.name) == expected(first, [1, 3], GGUFModel.open(first).num_hidden_layers)
    assert cli("verify", again).returncode == 0
    r = cli("inspect", again, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["num_experts"] == 2


def test_inspect_a_mask_against_a_gguf_gives_the_written_sizes(gguf_files, tmp_path):
    src = gguf_files["nextn_split"]
    mask = gguf_mask(src, KEEP, tmp_path / "m.json")
    r = cli("inspect", mask, "--ckpt", src, "--json")
    assert r.returncode == 0, r.stderr
    size = json.loads(r.stdout)["size"]
    applied(mask, src, tmp_path / "out")
    written = all_tensors(tmp_path / "out" / src.name)
    assert size["after"]["bytes"] == sum(len(d) for _, _, d in written.values())
    assert size["after"]["tensors"] == len(written) and size["before"]["tensors"] == len(all_tensors(src))
    assert size["after"]["by_category"]["mtp"]["bytes"] == 0 < size["before"]["by_category"]["mtp"]["bytes"]
    assert size["config_changes"]["qwen3moe.expert_count"] == [8, 4]
