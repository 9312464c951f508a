"""The census finds every MoE model type transformers has and its result is the support data: the
README's table and `reapsurgery architectures` are generated from census.json, not kept by hand."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors import safe_open

from fixtures.census import README, census_one, markdown, moe_model_types, with_table
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.common.support import by_status, census

# types without modeling code of their own (param2moe: Glm4MoeForCausalLM), in a folder of another
# name (inkling_text: models/inkling), a text model beside its wrapper (qwen3_5_moe_text), and new in 5.25
FOUND_THROUGH_THE_MAPS = {"param2moe", "inkling_text", "qwen3_5_moe_text", "ergo", "kolibri1_1", "minicpm5_moe",
                          "longcat_flash"}


def test_every_moe_model_type_is_found_through_the_auto_maps():
    types = set(moe_model_types())
    assert FOUND_THROUGH_THE_MAPS <= types
    assert not {"llama", "qwen3", "bert"} & types  # dense models are not MoE model types


def test_the_census_data_lists_them_with_the_transformers_version():
    data = census()
    supported = by_status(data)["supported"]
    assert FOUND_THROUGH_THE_MAPS <= set(supported)
    # param2moe has no class of its own: Glm4MoeForCausalLM builds it, and GLM-4.5's built-in layout covers that class
    assert supported["param2moe"]["class"] == "Glm4MoeForCausalLM" and supported["param2moe"]["layout"] == "built-in"
    assert supported["ergo"]["layout"] == "derived"
    assert data["transformers"].count(".") == 2
    assert all(e["reason"] for e in by_status(data)["refused"].values())  # every refusal says why


def test_the_readme_table_is_generated_from_the_census_data():
    readme = README.read_text()
    assert with_table(readme, markdown(census())) == readme


def test_architectures_prints_the_census_without_torch():
    code = ("import sys; from reapsurgery.cli import main; sys.argv = ['reapsurgery', 'architectures']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = census()
    assert f"transformers {data['transformers']}" in run.stdout
    for line in ("  param2moe  Glm4MoeForCausalLM  built-in", "  ergo  ErgoForCausalLM  derived"):
        assert " ".join(line.split()) in {" ".join(l.split()) for l in run.stdout.splitlines()}
    for mt, e in by_status(data)["refused"].items():
        assert f"  {mt}: {e['reason']}" in run.stdout


def test_longcat_flash_passes_the_census_end_to_end(tmp_path):
    """LongCat-Flash's router scores 8 routed and 4 zero-computation experts: calibrate, plan, apply,
    verify, and the pruned model loaded by transformers equals pruning in memory; the zero experts'
    router rows are kept byte for byte after the routed experts' that the mask keeps."""
    row = census_one("longcat_flash", tmp_path)
    assert row["ok"], row
    src, out = tmp_path / "longcat_flash" / "ckpt", tmp_path / "longcat_flash" / "out"
    keep = load_mask(tmp_path / "longcat_flash" / "mask.json").layers
    source, pruned = Checkpoint.open(src), Checkpoint.open(out)
    for layer, kept in keep.items():
        name = f"model.layers.{layer}.mlp.router.classifier.weight"
        with safe_open(src / source.weight_map[name], "pt") as f, safe_open(out / pruned.weight_map[name], "pt") as g:
            before, after = f.get_tensor(name), g.get_tensor(name)
        assert after.shape[0] == len(kept) + 4
        assert torch.equal(after, before[[*kept, *range(8, 12)]])
