"""Layer-streamed calibration equals statistics computed on the whole model's real forward pass."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.build import FAMILIES, build
from reapsurgery.calibration.calibrate import calibrate, make_batches
from reapsurgery.common.checkpoint import Checkpoint
from tests.reference import RTOL, assert_stats_close, layer_outputs, load, reference_stats

LENGTHS = [7, 12, 3, 10, 5]
# transformers' own forward is not batch-invariant for Qwen3-Next's linear attention (its reference
# gated-delta-rule kernel: a padded batch differs from one sample by up to 2e-5), so the comparison
# with unpadded single samples runs unpadded there; padding is covered by test_padding_never_counts
BATCH_SIZE = {"qwen3_next": 1}


def texts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_statistics_and_hidden_states_equal_full_model(checkpoints, family):
    src = checkpoints[family]
    samples = texts()
    captured: dict[int, list[torch.Tensor]] = {}
    resident: list[list[int]] = []

    def on_layer(i, streamed):
        resident.append(streamed.resident_layers())
        streamed.layers[i].register_forward_hook(
            lambda m, a, out: captured.setdefault(i, []).append((out[0] if isinstance(out, tuple) else out).clone()))

    batch_size = BATCH_SIZE.get(family, 2)
    saliency = calibrate(src, samples, batch_size=batch_size, device="cpu", dtype="float32", mtp="drop",
                         on_layer=on_layer)
    model, _ = load(src)
    ref = reference_stats(src, samples, model=model)
    assert_stats_close(saliency.layers, ref)
    ckpt = Checkpoint.open(src)
    assert sorted(saliency.layers) == ckpt.moe_layers
    assert saliency.model == ckpt.fingerprint()
    assert saliency.dense_layers == [i for i in range(ckpt.num_hidden_layers) if i not in ckpt.moe_layers]
    # streaming: at each layer exactly that layer holds real memory
    assert resident == [[i] for i in range(ckpt.num_hidden_layers)]
    # hidden states after each streamed layer equal the full model's forward over the same batches, on real tokens
    batches = make_batches(samples, batch_size, model.config.get_text_config().pad_token_id or 0)
    want = layer_outputs(model, batches)
    assert sorted(captured) == sorted(want)
    for i, outputs in captured.items():
        for got, ref_out, (_, am) in zip(outputs, want[i], batches, strict=True):
            real = am.bool()
            torch.testing.assert_close(got[real], ref_out[real], rtol=1e-5, atol=1e-5)


# nemotron_h: Mamba2 blocks take the padding mask their own way (and a chunked scan)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "nemotron_h"])
def test_padding_never_counts(checkpoints, family):
    samples = texts(seed=3)
    padded = calibrate(checkpoints[family], samples, batch_size=5, device="cpu", dtype="float32", mtp="drop")
    single = calibrate(checkpoints[family], samples, batch_size=1, device="cpu", dtype="float32", mtp="drop")
    assert {k: v.tokens for k, v in padded.layers.items()} == {k: sum(LENGTHS) for k in padded.layers}
    for layer in padded.layers:
        a, b = padded.layers[layer].to_json(), single.layers[layer].to_json()
        assert a["count"] == b["count"]
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=RTOL, atol=1e-6)


# crash in a decoder layer; and, with two chained MTP layers, in the second MTP layer
RESUME_CASES = {"decoder": ("qwen3_moe", None, {}, 2),
                "mtp": ("glm4_moe", {"num_nextn_predict_layers": 2}, {"mtp": "calibrate"}, 4)}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_crash_gives_identical_output(checkpoints, tmp_path, case):
    family, overrides, options, crash_at = RESUME_CASES[case]
    src = build(family, tmp_path / family, overrides=overrides) if overrides else checkpoints[family]
    samples = texts()
    state = tmp_path / "s.json.resume"
    run = dict(batch_size=2, device="cpu", dtype="float32", **options)
    whole = calibrate(src, samples, **run)

    class Crash(Exception):
        pass

    def crash(i, streamed):
        if i == crash_at:
            raise Crash

    with pytest.raises(Crash):
        calibrate(src, samples, state_dir=state, on_layer=crash, **run)
    assert (state / "state.pt").is_file()  # saved on the crash, though checkpoint_every was not due
    started = []
    resumed = calibrate(src, samples, state_dir=state, resume=True, on_layer=lambda i, s: started.append(i), **run)
    assert started == [crash_at]  # finished layers were not recomputed
    assert resumed.to_json() == whole.to_json()
    assert not state.exists()  # cleaned up after success
