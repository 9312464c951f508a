"""Bad input: one line naming the file and the problem, exit code 2, no output that looks complete,
and the input untouched."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from reapsurgery.errors import ReapError

from tests.conftest import tree_hash
from tests.helpers import cli, write_mask, write_saliency


def refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def src(checkpoints, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(checkpoints["deepseek_v3"], path)
    return path


def run_refused(src, tmp_path, mask_json, *needles, out=None):
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps(mask_json) if not isinstance(mask_json, str) else mask_json)
    out = out or tmp_path / "out"
    before = tree_hash(src)
    line = refused(cli("apply", mask, src, out), *needles)
    assert tree_hash(src) == before
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(".out.reapsurgery-*"))
    return line


def good_mask(src, tmp_path):
    return json.loads(write_mask(src, [0, 2, 5, 7], tmp_path / "good.json").read_text())


def test_out_inside_or_equal_to_ckpt(src, tmp_path):
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    before = tree_hash(src)
    refused(cli("apply", mask, src, src / "pruned"), "inside the input")
    refused(cli("apply", mask, src, src), "output directory is the input checkpoint")
    refused(cli("apply", mask, src, tmp_path, "--overwrite"), "contains the input")
    assert tree_hash(src) == before


def test_out_not_empty_unless_overwrite(src, tmp_path):
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    refused(cli("apply", mask, src, out), str(out), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    assert cli("apply", mask, src, out, "--overwrite", "-q").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_fingerprint_mismatch_names_field(src, tmp_path):
    m = good_mask(src, tmp_path)
    m["model"]["num_hidden_layers"] = 61
    run_refused(src, tmp_path, m, "mask.json", "num_hidden_layers", "61", "3")
    m = good_mask(src, tmp_path)
    m["model"]["architecture"] = "Qwen3MoeForCausalLM"
    run_refused(src, tmp_path, m, "architecture", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")
    m = good_mask(src, tmp_path)
    m["model"]["num_experts"] = 16
    run_refused(src, tmp_path, m, "num_experts", "16", "8")


def test_expert_index_out_of_range(src, tmp_path):
    m = good_mask(src, tmp_path)
    m["layers"]["1"] = [0, 2, 5, 8]
    run_refused(src, tmp_path, m, "layer 1", "out of range 0..7")


def test_top_k_larger_than_kept(checkpoints, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    m = json.loads(write_mask(src, [3], tmp_path / "g.json").read_text())
    run_refused(src, tmp_path, m, "keeps 1 experts", "num_experts_per_tok=2")


def test_unequal_drops_across_groups(src, tmp_path):
    m = good_mask(src, tmp_path)
    m["layers"] = {"1": [0, 1, 2, 5], "2": [0, 1, 2, 5]}
    run_refused(src, tmp_path, m, "n_group=2", "[3, 1]")


def test_malformed_masks(src, tmp_path):
    good = good_mask(src, tmp_path)
    cases = [
        ("{not json", "not valid JSON"),
        ({**good, "format": "other"}, "'format'"),
        ({**good, "version": 7}, "version 7"),
        ({**good, "layers": {"1": [0, 2, 5, 7], "2": [0, 2, 5]}}, "same number of experts"),
        ({**good, "layers": {"1": [2, 0, 5, 7], "2": [0, 2, 5, 7]}}, "ascending and unique"),
        ({**good, "layers": {"one": [0, 2, 5, 7]}}, "not a decimal layer index"),
        ({**good, "layers": {"1": [0, 2, 5, 7]}}, "lacks MoE layers [2]"),
        ({**good, "layers": {"0": [0, 2, 5, 7], "1": [0, 2, 5, 7], "2": [0, 2, 5, 7]}}, "not MoE layers"),
        ({**good, "layers": {"1": "all", "2": [0, 2, 5, 7]}}, "list of integer"),
        ({k: v for k, v in good.items() if k != "model"}, "fingerprint"),
    ]
    for mask, needle in cases:
        run_refused(src, tmp_path, mask, "mask.json", needle)


def test_truncated_shard(src, tmp_path):
    mask = good_mask(src, tmp_path)
    shard = src / "model-00005-of-00012.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    run_refused(src, tmp_path, mask, "model-00005-of-00012.safetensors", "truncated")


def test_corrupt_header(src, tmp_path):
    mask = good_mask(src, tmp_path)
    shard = src / "model-00003-of-00012.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"#!@$"
    shard.write_bytes(bytes(data))
    run_refused(src, tmp_path, mask, "model-00003-of-00012.safetensors", "corrupt")


def test_index_names_missing_file(src, tmp_path):
    mask = good_mask(src, tmp_path)
    (src / "model-00007-of-00012.safetensors").unlink()
    run_refused(src, tmp_path, mask, "model.safetensors.index.json", "model-00007-of-00012.safetensors")


def test_missing_mask_and_missing_checkpoint(src, tmp_path):
    refused(cli("apply", tmp_path / "nope.json", src, tmp_path / "out"), "nope.json", "does not exist")
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    refused(cli("apply", mask, tmp_path / "nockpt", tmp_path / "out"), "nockpt: does not exist")


def test_failure_midway_leaves_no_output(src, tmp_path, monkeypatch):
    """A crash while writing shards leaves neither OUT nor a partial directory behind."""
    from reapsurgery.surgery import apply as surgery, copier
    from reapsurgery.common.mask import load_mask

    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    calls = {"n": 0}
    real = copier.copy_range

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(*a)

    monkeypatch.setattr(copier, "copy_range", failing)
    monkeypatch.setattr(copier, "PIECE", 4096)
    before = tree_hash(src)

    with pytest.raises(ReapError, match=r"out/model-0000\d-of-\d+\.safetensors: .*No space left on device"):
        surgery.apply_mask(load_mask(mask), mask, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert tree_hash(src) == before


def test_verify_reports_inconsistent_checkpoint(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    out = tmp_path / "out"
    assert cli("apply", write_mask(src, [0, 1, 2, 3], tmp_path / "m.json"), src, out, "-q").returncode == 0
    config = json.loads((out / "config.json").read_text())
    config["num_local_experts"] = 8
    (out / "config.json").write_text(json.dumps(config))
    r = cli("verify", out)
    assert r.returncode == 2 and "config says 8" in r.stderr and "Traceback" not in r.stderr
    assert cli("verify", src).returncode == 0
    mtp = cli("verify", checkpoints["deepseek_v3"])  # hub layout: an MTP layer past the decoder stack
    assert mtp.returncode == 0, mtp.stderr


# -- the refusal table: every bad input through the CLI, in process ------------------------------

from tests.refusal_cases import CASES  # noqa: E402


def _snapshot(*roots) -> dict[str, str]:
    """Every path under the roots (directories too, hidden ones included) with its file's hash."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def world(checkpoints, tmp_path_factory):
    """The good inputs the table's cases start from, made once."""
    from importlib import resources

    from reapsurgery.common.checkpoint import Checkpoint
    from reapsurgery.common.saliency import Saliency, load_saliency

    root = tmp_path_factory.mktemp("world")
    ckpt = root / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], ckpt)
    c = Checkpoint.open(ckpt)
    mask = write_mask(ckpt, [0, 2, 5, 7], root / "mask.json")
    write_saliency(ckpt, root / "saliency.json")
    first_2d = next(v[0] for v in c.tensors().values() if len(v[1].shape) == 2)
    table = json.loads(resources.files("reapsurgery.common").joinpath("layouts.json").read_text())
    mtp_ckpt = root / "mtp_ckpt"  # DeepSeek-V3: 3 decoder layers and an MTP layer stored as layer 3
    shutil.copytree(checkpoints["deepseek_v3"], mtp_ckpt)
    mtp_mask = write_mask(mtp_ckpt, [0, 2, 5, 7], root / "mtp_mask.json")
    m = Checkpoint.open(mtp_ckpt)  # and statistics for its MTP layer (calibrate --mtp calibrate)
    stats = load_saliency(write_saliency(ckpt, root / "saliency.json")).layers
    Saliency(m.fingerprint(), {}, {l: stats[1] for l in [*m.moe_layers, 3]}).save(root / "mtp_saliency.json")
    return {"root": root, "ckpt": ckpt, "mask": mask, "saliency": root / "saliency.json", "shard": first_2d,
            "other_shard": next(s for s in c.shards if s != first_2d), "layout": table["qwen3_moe"],
            "mtp_ckpt": mtp_ckpt, "mtp_mask": mtp_mask, "mtp_saliency": root / "mtp_saliency.json"}


@pytest.mark.parametrize("case", list(CASES))
def test_refusal_table(case, world, tmp_path):
    """exit 2, exactly one `error:` line naming the file, no traceback, every input unchanged and
    nothing new anywhere (no output, no partial, no probe)."""
    from click.testing import CliRunner

    from reapsurgery.cli import main

    argv, names = CASES[case](tmp_path, world)
    before = _snapshot(world["root"], tmp_path)
    r = CliRunner().invoke(main, [str(a) for a in argv])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert names in lines[0], (names, lines[0])
    assert "Traceback" not in r.output and r.stdout == ""
    assert _snapshot(world["root"], tmp_path) == before
# Families whose routed experts cannot be pruned by slicing: every command refuses them, naming why.
# dbrx: experts fused 2-D ([E*ffn, H]); deepseek_v4: first layers hash-routed by a token-id table (tid2eid).
# Nothing is pruned, nothing written.
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
UNSUPPORTED = {
    "dbrx": (dict(d_model=32, n_heads=4, n_layers=2, vocab_size=320, max_seq_len=64,
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                  ffn_config=dict(ffn_hidden_size=16, moe_num_experts=8, moe_top_k=2)),
             "experts fused into another axis"),
    "deepseek_v4": (dict(TINY, num_key_value_heads=1, head_dim=16, num_hidden_layers=2, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=16, q_lora_rank=16, o_lora_rank=16, o_groups=2,
                         index_n_heads=2, index_head_dim=8, index_topk=4, qk_rope_head_dim=8, sliding_window=8,
                         hc_mult=2, mlp_layer_types=["hash_moe", "moe"],
                         layer_types=["heavily_compressed_attention", "compressed_sparse_attention"]),
                    "hash routing"),
}


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_families_are_refused_by_apply_and_calibrate(tmp_path, family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fixtures.build import save_tokenizer

    kwargs, reason = UNSUPPORTED[family]
    src = tmp_path / family
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).save_pretrained(src, max_shard_size="64KB")
    save_tokenizer(src)
    before = tree_hash(src)
    mask = {"format": "reapsurgery.mask", "version": 1,
            "model": {"architecture": json.loads((src / "config.json").read_text())["architectures"][0],
                      "model_type": family, "num_hidden_layers": 2, "moe_layers": [0, 1], "num_experts": 8,
                      "num_experts_per_tok": 2, "n_group": None},
            "layers": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}, "provenance": {"method": "manual"}}
    run_refused(src, tmp_path, mask, str(src / "config.json"), "no built-in layout", reason)
    refused(cli("calibrate", src, "-o", tmp_path / "s.json", "--num-samples", "2"), str(src / "config.json"), reason)
    assert not (tmp_path / "s.json").exists()
    assert tree_hash(src) == before
