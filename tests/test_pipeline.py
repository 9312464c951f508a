"""The calibration pipeline: reading layer i+1 on a background thread while layer i runs changes
no statistic, and a released layer's buffers are refilled by the next layers (no fresh memory)."""

from __future__ import annotations

import pytest

from reapsurgery.calibration.calibrate import calibrate
from tests.test_calibrate import texts


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])  # deepseek_v3: a dense layer first
def test_prefetch_gives_the_same_statistics_exactly(checkpoints, family):
    run = dict(batch_size=2, device="cpu", dtype="float32")
    on = calibrate(checkpoints[family], texts(), prefetch=True, **run)
    off = calibrate(checkpoints[family], texts(), prefetch=False, **run)
    assert on.to_json() == off.to_json()


def test_prefetched_layers_reuse_the_released_layers_buffers(checkpoints):
    ptrs: dict[int, set[int]] = {}
    resident: list[list[int]] = []

    def on_layer(i, streamed):
        streamed.POOL_MIN_BYTES = 0  # the fixture's tensors are tiny
        resident.append(streamed.resident_layers())
        ptrs[i] = {p.data_ptr() for n, p in streamed.layers[i].named_parameters() if "experts" in n}

    calibrate(checkpoints["qwen3_moe"], texts(), batch_size=2, device="cpu", dtype="float32", on_layer=on_layer)
    assert resident == [[0], [1], [2]]  # one layer installed at a time
    assert ptrs[1].isdisjoint(ptrs[0])  # read while layer 0 ran
    assert ptrs[2] == ptrs[0]  # layer 2 was read into layer 0's released tensors


def test_hidden_memory_budget_forcing_three_chunks_equals_one_chunk(checkpoints):
    import torch

    samples = texts()  # 5 samples, batches of 2: 3 batches, the largest 2 x 12 tokens
    hidden = 32  # the fixture's hidden_size
    one_batch = 2 * (2 * 12) * hidden * 4  # inputs and outputs of a layer, float32
    run = dict(batch_size=2, device="cpu", dtype="float32")
    whole = calibrate(checkpoints["qwen3_moe"], samples, **run)
    chunked = calibrate(checkpoints["qwen3_moe"], samples, hidden_memory=one_batch, **run)
    assert whole.calibration["chunks"] == 1 and chunked.calibration["chunks"] == 3
    for layer, a in whole.layers.items():
        b = chunked.layers[layer]
        assert (a.tokens, a.count, a.max_activation) == (b.tokens, b.count, b.max_activation)
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(getattr(b, key), dtype=torch.float64),
                                       torch.tensor(getattr(a, key), dtype=torch.float64), rtol=1e-12, atol=0)


def test_resume_in_a_later_chunk_equals_the_chunked_run(checkpoints, tmp_path):
    run = dict(batch_size=2, device="cpu", dtype="float32", hidden_memory=2 * 24 * 32 * 4,
               state_dir=tmp_path / "s.resume", checkpoint_every=0)
    whole = calibrate(checkpoints["qwen3_moe"], texts(), **run)
    seen = []

    def crash(i, streamed):
        seen.append(i)
        if len(seen) == 5:  # chunk 1 (of 0, 1, 2), layer 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(checkpoints["qwen3_moe"], texts(), on_layer=crash, **run)
    started = []
    resumed = calibrate(checkpoints["qwen3_moe"], texts(), resume=True, on_layer=lambda i, s: started.append(i), **run)
    assert started == [1, 2, 0, 1, 2]  # the rest of chunk 1, then chunk 2
    assert resumed.to_json() == whole.to_json()
