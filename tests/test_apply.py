"""`reapsurgery apply`: the pruned checkpoint loads in transformers and equals in-memory pruning."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from fixtures import build
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.surgery.verify import verify
from tests.helpers import (apply_leaving_source_untouched, assert_output_is_input_slices, cli, output_tensors,
                           tensor_bytes, write_mask)
from tests.reference import load, logits, pruned_in_memory

MASKS = {
    "keep_all": lambda E, k: list(range(E)),
    "keep_half": lambda E, k: [0, 2, 5, 7],  # two per group of 4: valid for group-limited routers
    "keep_top_k": lambda E, k: [1, 6],  # top_k experts, one per group
}
FAMILIES = [*build.FAMILIES, "single_file"]
# keep_all is proven byte for byte for every family below; loading it as well is kept for these
KEEP_ALL_LOADED = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "llama4", "single_file"]
LOGIT_CASES = [(f, m) for f in FAMILIES for m in MASKS if m != "keep_all" or f in KEEP_ALL_LOADED]


def all_tensors(ckpt_dir):
    return {name: path for name, (path, _) in output_tensors(ckpt_dir).items()}


@pytest.mark.parametrize("family,mask_name", LOGIT_CASES)
def test_pruned_checkpoint_matches_in_memory_pruning(checkpoints, tmp_path, family, mask_name):
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    keep = MASKS[mask_name](ckpt.num_experts, ckpt.top_k)
    if mask_name == "keep_top_k" and (ckpt.layout.n_group(ckpt.cfg) or 1) > 1:
        keep = [1, 2, 5, 6]  # group-limited routers: top_k reachable through topk_group=1 group
    mask = write_mask(src, keep, tmp_path / "mask.json")
    apply_leaving_source_untouched(mask, src, tmp_path / "out")

    pruned, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(src, {l: keep for l in ckpt.moe_layers}, len(keep))
    assert torch.equal(logits(pruned), logits(reference))
    assert verify(tmp_path / "out").ok  # in-process: an output without the MTP block is derived again


@pytest.mark.parametrize("family", FAMILIES)
def test_every_output_tensor_is_a_byte_slice_of_the_input(checkpoints, tmp_path, family):
    src = checkpoints[family]
    keep = [0, 2, 5, 7]
    assert cli("apply", write_mask(src, keep, tmp_path / "m.json"), src, tmp_path / "out", "-q").returncode == 0
    assert_output_is_input_slices(src, tmp_path / "out", keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_every_tensor_byte_for_byte(checkpoints, tmp_path, family):
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    mask = write_mask(src, list(range(ckpt.num_experts)), tmp_path / "m.json")
    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0
    inp, out = all_tensors(src), all_tensors(tmp_path / "out")
    decoder = {n for n in inp if not ckpt.layout.is_mtp(n, ckpt.num_hidden_layers)}
    assert set(out) == decoder
    for name in out:
        assert tensor_bytes(out[name], name) == tensor_bytes(inp[name], name), name


def test_index_config_card_and_other_files(checkpoints, tmp_path):
    src = checkpoints["deepseek_v3"]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    r = cli("apply", mask, src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    import json

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # no stray or empty shard
    total = 0
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            keys = list(f.keys())
            assert keys, f"empty shard {shard}"
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
            assert f.metadata() == {"format": "pt"}
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and config["num_nextn_predict_layers"] == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")  # source metadata header kept first
    assert hashlib.sha256(mask.read_bytes()).hexdigest() in card
    assert "| 1 | 0 2 5 7 |" in card and "8 -> 4" in card
    assert (out / "LICENSE").read_bytes() == (src / "LICENSE").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    drop = [line for line in r.stdout.splitlines() if "multi-token-prediction" in line]
    assert len(drop) == 1 and "layers [3] dropped, num_nextn_predict_layers set to 0" in drop[0], r.stdout
    assert "no MTP speculative decoding" in drop[0] and "--mtp calibrate" in drop[0] and "--mtp keep-full" in drop[0]


def test_card_written_when_source_has_none(checkpoints, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints["mixtral"], src)
    (src / "README.md").unlink()
    assert cli("apply", write_mask(src, [0, 1, 2, 3], tmp_path / "m.json"), src, tmp_path / "out", "-q").returncode == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "## Expert pruning (reapsurgery)" in card


def test_config_aliases_rewritten_including_nested_text_config(checkpoints, tmp_path):
    """Hub Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts: rewrite both."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts"] = config["num_local_experts"]
    (src / "config.json").write_text(json.dumps(config))
    assert cli("apply", write_mask(src, [0, 1, 2, 3], tmp_path / "m.json"), src, tmp_path / "out", "-q").returncode == 0
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_experts"] == 4 and out["num_local_experts"] == 4
    assert {k: v for k, v in out.items() if k not in ("num_experts", "num_local_experts")} == \
        {k: v for k, v in config.items() if k not in ("num_experts", "num_local_experts")}


def test_output_shards_are_aligned(checkpoints, tmp_path):
    """Every tensor starts at a multiple of its element size, so loaders can memory-map it."""
    from reapsurgery.common.safetensors_io import DTYPE_BITS, read_header

    src = checkpoints["gpt_oss"]
    assert cli("apply", write_mask(src, [1, 3, 4], tmp_path / "m.json"), src, tmp_path / "out", "-q").returncode == 0
    for shard in (tmp_path / "out").glob("*.safetensors"):
        h = read_header(shard)
        assert h.data_offset % 8 == 0
        for t in h.tensors.values():
            assert t.start % max(1, DTYPE_BITS[t.dtype] // 8) == 0


def test_apply_does_not_import_torch(checkpoints, tmp_path):
    import subprocess
    import sys

    src = checkpoints["qwen3_moe"]
    mask = write_mask(src, [0, 1, 2, 3], tmp_path / "m.json")
    code = (
        "import sys; from reapsurgery.cli import main\n"
        f"try: main(['apply', {str(mask)!r}, {str(src)!r}, {str(tmp_path / 'out')!r}, '-q'])\n"
        "except SystemExit as e: assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("disabled", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_fallback_copies_are_identical(checkpoints, tmp_path, monkeypatch, disabled):
    """Across filesystems copy_file_range fails; sendfile or a buffered copy must give the same bytes."""
    from reapsurgery.common import safetensors_io
    from reapsurgery.common.mask import load_mask
    from reapsurgery.surgery.apply import apply_mask

    src = checkpoints["gpt_oss"]
    mask = write_mask(src, [0, 3, 4, 7], tmp_path / "m.json")
    apply_mask(load_mask(mask), mask, src, tmp_path / "kernel")
    monkeypatch.setattr(safetensors_io, "_kernel_copy", {m: m not in disabled for m in ("copy_file_range", "sendfile")})
    apply_mask(load_mask(mask), mask, src, tmp_path / "fallback")
    for shard in (tmp_path / "kernel").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "fallback" / shard.name).read_bytes()


def test_mtp_tensors_outside_the_layer_stack_are_dropped_when_the_mask_does_not_cover_them(checkpoints, tmp_path):
    """Qwen3-Next keeps its multi-token-prediction block (with a full MoE) under mtp.*; a mask without
    it drops it, and both the dry run and apply say in one line what that costs (llama.cpp's
    converter needs --no-mtp then) and how to keep it."""
    src = checkpoints["qwen3_next"]
    assert any(n.startswith("mtp.layers.0.mlp.experts.") for n in all_tensors(src))
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    for args, prefix in ((("--dry-run",), "dry run: "), (("-q",), "")):
        r = cli("apply", mask, src, tmp_path / "out", *args)
        lines = [line.strip() for line in r.stdout.splitlines() if "multi-token-prediction" in line]
        assert r.returncode == 0 and len(lines) == 1, r.stdout
        assert lines[0].startswith(f"{prefix}multi-token-prediction tensors mtp.* dropped, mtp_num_hidden_layers set to 0")
        assert "--no-mtp" in lines[0] and "--mtp calibrate" in lines[0] and "--mtp keep-full" in lines[0]
    assert not [n for n in all_tensors(tmp_path / "out") if n.startswith("mtp.")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mtp_num_hidden_layers"] == 0
