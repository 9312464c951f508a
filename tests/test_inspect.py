"""`reapsurgery inspect`: the facts users read before and after pruning are right."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from reapsurgery.common.checkpoint import Checkpoint
from tests.handmade import by_reap, fingerprint, for_checkpoint, saliency, stats
from tests.helpers import cli, write_mask
from tests.reference import load


def facts(*args):
    r = cli("inspect", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def on_disk(path):
    """(elements, bytes) of every tensor, read through the safetensors library."""
    c = Checkpoint.open(path)
    params = nbytes = 0
    for name, (shard, _) in c.tensors().items():
        with safe_open(path / shard, "pt") as f:
            t = f.get_tensor(name)
        params += t.numel()
        nbytes += t.numel() * t.element_size()
    return params, nbytes


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_checkpoint_counts_match_the_tensors_and_the_model(checkpoints, family):
    src = checkpoints[family]
    f = facts(src)
    assert f["kind"] == "checkpoint" and f["model"] == Checkpoint.open(src).fingerprint()
    size = f["size"]
    assert (size["params"], size["bytes"]) == on_disk(src)
    by = size["by_category"]
    assert sum(c["params"] for c in by.values()) == size["params"]

    # independent: what transformers builds (it neither builds nor loads the MTP layer)
    state = load(src)[0].state_dict()  # parameters and persistent buffers (score-correction biases)
    assert sum(t.numel() for t in state.values()) == size["params"] - by["mtp"]["params"]
    experts = sum(t.numel() for n, t in state.items() if ".mlp.experts." in n)
    assert by["routed_experts"]["params"] == experts
    E, k = f["model"]["num_experts"], f["model"]["num_experts_per_tok"]
    non_expert = size["params"] - by["mtp"]["params"] - experts
    assert size["active_params"] == round(non_expert + experts * k / E)
    if family == "deepseek_v3":
        assert by["mtp"]["params"] > 0 and f["topk_group"] == 1


def test_checkpoint_table(checkpoints):
    r = cli("inspect", checkpoints["deepseek_v3"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "DeepseekV3ForCausalLM (deepseek_v3)" in out
    assert "MoE 1-2 (2), dense 0" in out
    assert "8 per MoE layer, top-k 2, n_group 2, topk_group 1" in out
    for label in ("params", "active params/token", "bytes", "routed experts", "mtp layers", "F32:"):
        assert label in out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_mask_size_before_and_after_is_what_apply_writes(checkpoints, tmp_path, family):
    src = checkpoints[family]
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    f = facts(mask, "--ckpt", src)
    assert f["kind"] == "mask" and f["experts_before"] == 8 and f["experts_after"] == 4
    before, after = f["size"]["before"], f["size"]["after"]
    assert before == facts(src)["size"]

    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0
    written = facts(tmp_path / "out")["size"]
    assert after == written
    assert (after["params"], after["bytes"]) == on_disk(tmp_path / "out")
    assert after["by_category"]["routed_experts"]["params"] * 2 == before["by_category"]["routed_experts"]["params"]
    assert after["active_params"] <= before["active_params"] and after["bytes"] < before["bytes"]
    assert f["size"]["shards_after"] == len(Checkpoint.open(tmp_path / "out").shards)

    r = cli("inspect", mask, "--ckpt", src)
    assert "before" in r.stdout and "after" in r.stdout and "8 -> 4" in r.stdout


def test_mask_without_checkpoint_reports_what_is_computable(checkpoints, tmp_path):
    mask = write_mask(checkpoints["qwen3_moe"], [1, 3, 4, 6], tmp_path / "m.json")
    f = facts(mask)
    assert f["size"] is None
    assert f["sparsity"] == 0.5 and f["routed_expert_share_kept"] == 0.5
    assert f["active_expert_share"] == {"before": 2 / 8, "after": 2 / 4}
    assert f["layers"] == {"0": [1, 3, 4, 6], "1": [1, 3, 4, 6], "2": [1, 3, 4, 6]}
    r = cli("inspect", mask)
    assert r.returncode == 0 and "--ckpt" in r.stdout and "0:  1 3 4 6" in r.stdout


def test_mask_for_another_checkpoint_refused(checkpoints, tmp_path):
    mask = write_mask(checkpoints["qwen3_moe"], [1, 3, 4, 6], tmp_path / "m.json")
    r = cli("inspect", mask, "--ckpt", checkpoints["mixtral"])
    assert r.returncode == 2 and "architecture" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_saliency_per_layer_facts(tmp_path):
    layers = {
        0: by_reap([1.0, 2.0, 4.0, None, 8.0, 3.0, None, 5.0]),
        1: stats([10, 10, 10, 10, 10, 10, 10, 10], reap_sum=[10, 20, 30, 40, 50, 60, 70, 80], tokens=40),
    }
    path = tmp_path / "s.json"
    saliency(fingerprint(layers=(0, 1)), layers).save(path)
    f = facts(path)
    assert f["kind"] == "saliency" and f["method"] == "reap"
    l0, l1 = f["layers"]["0"], f["layers"]["1"]
    assert l0["never_routed"] == [3, 6] and l1["never_routed"] == []
    assert l0["tokens"] == 1000 and l1["tokens"] == 40 and l1["routed_pairs"] == 80
    assert l0["scores"] == {"min": 1.0, "median": 3.5, "max": 8.0, "max_over_min": 8.0}
    assert l1["scores"]["min"] == 1.0 and l1["scores"]["max"] == 8.0
    assert facts(path, "--method", "frequency")["layers"]["1"]["scores"]["max_over_min"] == 1.0
    r = cli("inspect", path)
    assert r.returncode == 0
    assert "2 (3 6)" in r.stdout  # never-routed count and which


def test_saliency_super_experts_listed(tmp_path):
    layers = {l: by_reap([1.0] * 64, [1.0] * 64) for l in range(4)}
    layers[0].max_activation[3] = 100.0
    layers[3].max_activation[6] = 100.0
    path = tmp_path / "s.json"
    saliency(fingerprint(E=64, layers=range(4)), layers).save(path)
    sup = facts(path)["super_experts"]
    assert sup["first_75_percent"] == {"0": [3]} and sup["all_layers"] == {"0": [3], "3": [6]}


def test_unknown_files_refused(tmp_path, checkpoints):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something.else"}')
    r = cli("inspect", bad)
    assert r.returncode == 2 and "x.json" in r.stderr and "'format'" in r.stderr
    r = cli("inspect", tmp_path / "missing.json")
    assert r.returncode == 2 and "missing.json: does not exist" in r.stderr
    sal = tmp_path / "s.json"
    for_checkpoint(checkpoints["qwen3_moe"]).save(sal)
    r = cli("inspect", sal, "--ckpt", checkpoints["qwen3_moe"])
    assert r.returncode == 2 and "--ckpt goes with a mask" in r.stderr
