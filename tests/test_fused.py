"""Expert tensors read straight into their fused layout equal what transformers' from_pretrained loads."""

from __future__ import annotations

import pytest
import torch

from fixtures.build import FAMILIES, build_model
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.calibration.fused import read_fused
from reapsurgery.calibration.streaming import StreamedModel
from tests.reference import load

STACKED_ON_DISK = {"gpt_oss", "llama4", "granitemoe", "granitemoehybrid", "lara_mini", "granitemoeshared",
                   "granitemoe_swa", "mistral4", "step3p7", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl_moe", "gemma4",
                   "ergo"}  # already one tensor per projection


def fused_equals_loaded(src, dtype: torch.dtype, quantization_config=None) -> int:
    """Compares every fused expert tensor with the parameter from_pretrained gives; returns how many."""
    ckpt = Checkpoint.open(src)
    streamed = StreamedModel(ckpt, dtype, torch.device("cpu"))
    loaded = load(src, quantization_config)[0].state_dict()  # float32
    count = 0
    for layer in ckpt.moe_layers:
        keys = streamed.layer_keys[layer]
        fused, rest = streamed.converter.split_fused(keys)
        direct = {k for t in fused.values() for names in t.keys.values() for k in names}
        assert set(rest) == set(keys) - direct
        for name, target in fused.items():
            got = read_fused(ckpt, target, {k: k for k in keys}, dtype, streamed.converter.meta[name].shape)
            assert got.dtype == dtype and torch.equal(got.float(), loaded[name]), name
            count += 1
    return count


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - STACKED_ON_DISK))
def test_fused_read_equals_from_pretrained(checkpoints, family):
    assert fused_equals_loaded(checkpoints[family], torch.float32) == 2 * len(Checkpoint.open(checkpoints[family]).moe_layers)


def test_fused_read_converts_dtype_and_orders_experts_naturally(tmp_path):
    """A bfloat16 checkpoint calibrated in float32, with experts 10 and 11 (after 9, not after 1)."""
    model = build_model("qwen3_moe", overrides={"num_experts": 12}).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="24KB")
    assert fused_equals_loaded(tmp_path / "bf16", torch.float32) == 6


def test_fused_read_dequantises_expert_by_expert(checkpoints, tmp_path):
    """Block-FP8 experts, dequantised a few at a time into the fused tensor, equal transformers' dequantisation."""
    from fixtures.quantize import to_fp8_block
    from tests.test_quantized import fp8_dequantize

    src = to_fp8_block(checkpoints["qwen3_moe"], tmp_path / "fp8")
    assert fused_equals_loaded(src, torch.float32, fp8_dequantize()) == 6
