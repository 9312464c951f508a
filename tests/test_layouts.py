"""Layouts are data: what each family's entry says about a config agrees with what transformers builds."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from fixtures.build import FAMILIES, auto_class
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.errors import ReapError
from reapsurgery.common.layouts import Layout, builtin_layouts, describe_layouts
from tests.helpers import cli, write_mask

# config variants that move the MoE layers; None removes the key (transformers' default applies)
VARIANTS = {
    "qwen3_moe": [{"mlp_only_layers": [0, 2]}, {"decoder_sparse_step": 2}],
    "qwen2_moe": [{"mlp_only_layers": None}, {"decoder_sparse_step": 3}],
    "qwen3_next": [{"mlp_only_layers": [0]}],
    "deepseek_v2": [{"first_k_dense_replace": 2}, {"first_k_dense_replace": None}],
    "deepseek_v3": [{"first_k_dense_replace": 0}],
    "glm4_moe": [{"first_k_dense_replace": None}, {"first_k_dense_replace": 2}],
    "glm4_moe_lite": [{"mlp_layer_types": None}, {"mlp_layer_types": ["sparse", "dense", "sparse"]}],
    "dots1": [{"first_k_dense_replace": 2}],
    "ernie4_5_moe": [{"moe_layer_start_index": 0, "moe_layer_end_index": -1, "moe_layer_interval": 2},
                     {"moe_layer_start_index": None, "moe_layer_end_index": None},
                     {"moe_layer_start_index": 0, "moe_layer_end_index": 1}],
    "llama4": [{"interleave_moe_layer_step": 1}, {"interleave_moe_layer_step": 3},
               {"moe_layers": [0, 2], "interleave_moe_layer_step": 2}],
}
CASES = [(f, i) for f in FAMILIES for i in range(len(VARIANTS.get(f, [{}])))]


def transformers_moe_layers(family: str, kwargs: dict) -> list[int]:
    """Decoder layers with routed experts in the model transformers builds (on the meta device)."""
    from transformers import AutoConfig

    from reapsurgery.calibration.observe import observe_experts, is_experts_module
    from tests.reference import decoder_layers

    config = AutoConfig.for_model(family, **kwargs)
    with torch.device("meta"):
        model = auto_class(family).from_config(config)
    observe_experts(model)
    return [i for i, layer in enumerate(decoder_layers(model)) if any(map(is_experts_module, layer.modules()))]


@pytest.mark.parametrize("family,variant", CASES)
def test_moe_layer_rule_agrees_with_transformers(checkpoints, family, variant):
    kwargs = copy.deepcopy(FAMILIES[family])
    text = kwargs.get("text_config", kwargs)
    for key, value in VARIANTS.get(family, [{}])[variant].items():
        if value is None:
            text.pop(key, None)
        else:
            text[key] = value
    layout = builtin_layouts().get(family) or Checkpoint.open(checkpoints[family]).layout  # else derived
    # the layout reads the config as a hub config.json may have it: keys absent, not yet defaulted
    assert layout.moe_layers(text) == transformers_moe_layers(family, kwargs)


def test_every_layout_has_a_fixture_and_fixtures_without_one_are_derived(checkpoints):
    builtin = builtin_layouts()
    assert set(builtin) <= set(FAMILIES)
    for family in sorted(set(FAMILIES) - set(builtin)):
        assert Checkpoint.open(checkpoints[family]).layout.derived, family


def test_describe_layouts_lists_families_with_their_config_keys():
    rows = {d["name"]: d for d in describe_layouts()}
    assert rows["ernie4_5_moe"]["num_experts"][0] == "moe_num_experts"
    assert rows["llama4"]["architectures"] == ["Llama4ForConditionalGeneration", "Llama4ForCausalLM"]
    assert rows["deepseek_v3"]["groups"]["n_group"] == "n_group"


def hunyuan_with_counts(checkpoints, tmp_path, counts):
    src = tmp_path / "src"
    shutil.copytree(checkpoints["hunyuan_v1_moe"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts"] = counts
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_per_layer_expert_counts_all_equal_are_that_count(checkpoints, tmp_path):
    """Older Hunyuan configs give num_experts per layer; equal entries prune like an int."""
    src = hunyuan_with_counts(checkpoints, tmp_path, [8, 8])
    assert Checkpoint.open(src).num_experts == 8
    mask = write_mask(checkpoints["hunyuan_v1_moe"], [0, 2, 5, 7], tmp_path / "m.json")
    r = cli("apply", mask, src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == [4, 4]
    assert "num_experts [8, 8] -> [4, 4]" in r.stdout
    assert cli("verify", tmp_path / "out").returncode == 0


def test_per_layer_expert_counts_that_differ_are_refused(checkpoints, tmp_path):
    src = hunyuan_with_counts(checkpoints, tmp_path, [8, 16])
    with pytest.raises(ReapError, match=r"num_experts.*differs per layer \(\[8, 16\]\)"):
        Checkpoint.open(src)
    r = cli("inspect", src)
    assert r.returncode == 2 and "config.json" in r.stderr and "differs per layer" in r.stderr


def test_layout_file_with_an_unknown_rule_field_is_refused(tmp_path):
    bad = {"num_experts": ["n"], "top_k": ["k"], "layer_prefix": "model.layers.{layer}.",
           "moe_layers": {"every_other": "x"}}
    with pytest.raises(ReapError, match="unknown moe_layers fields \\['every_other'\\]"):
        Layout.from_dict("bad", bad)
