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
