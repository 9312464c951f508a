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


# resumed with the default budget (all of this machine's free memory: one chunk), it keeps the saved chunks
@pytest.mark.parametrize("resumed_budget", ["same", "default"])
def test_resume_in_a_later_chunk_equals_the_chunked_run(checkpoints, tmp_path, resumed_budget):
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
    if resumed_budget == "default":
        run["hidden_memory"] = None
    resumed = calibrate(checkpoints["qwen3_moe"], texts(), resume=True, on_layer=lambda i, s: started.append(i), **run)
    assert started == [1, 2, 0, 1, 2]  # the rest of chunk 1, then chunk 2
    assert resumed.to_json() == whole.to_json()


@pytest.mark.parametrize("family", ["qwen3_moe", "glm_moe_dsa"])  # glm_moe_dsa: a layer hands the next its top-k
def test_hidden_states_in_host_memory_equal_hidden_states_on_the_device(checkpoints, family):
    # no room on the device (a budget of 0): kept in host memory, each batch and what it carries moved per forward
    run = dict(batch_size=2, device="cpu", dtype="float32", mtp="drop")
    device = calibrate(checkpoints[family], texts(), **run)
    host = calibrate(checkpoints[family], texts(), hidden_memory=0, host_memory=1 << 30, **run)
    assert (device.calibration["hidden_states"], host.calibration["hidden_states"]) == ("device", "host")
    assert host.calibration["chunks"] == 1
    assert {k: v.to_json() for k, v in host.layers.items()} == {k: v.to_json() for k, v in device.layers.items()}


def test_moved_takes_every_tensor_once_and_keeps_the_rest():
    import torch

    from reapsurgery.calibration.streaming import moved

    shared = torch.ones(2)
    call = ((shared, 3, None), {"mask": {"full": shared, "sliding": torch.zeros(1)}, "flag": True, "l": [shared]})
    args, kwargs = moved(call, torch.device("meta"))
    assert args[0].is_meta and args[1:] == (3, None) and kwargs["flag"] is True
    assert kwargs["mask"]["full"] is args[0] and kwargs["l"][0] is args[0]  # one copy of a shared tensor
    assert kwargs["mask"]["sliding"].is_meta and shared.device.type == "cpu"


def test_gpu_placement_device_then_host_then_chunks(monkeypatch):
    import torch

    from reapsurgery.calibration import calibrate as cal
    from reapsurgery.errors import ReapError

    batches = cal.make_batches(texts(), 2)  # 3 batches of 2 x 12, 2 x 10, 1 x 5 tokens
    per = [2 * ids.numel() * 32 * 4 for ids, _ in batches]  # 6144, 5120, 1280 bytes in float32
    cuda = torch.device("cuda", 0)
    place = lambda **kw: cal.place_hidden(batches, 32, torch.float32, cuda, layer_bytes=1000, **kw)  # noqa: E731
    assert (p := place(hidden_memory=sum(per), host_memory=0)).where == "device" and p.chunks == [[0, 1, 2]]
    assert (p := place(hidden_memory=per[0], host_memory=sum(per))).where == "host" and p.chunks == [[0, 1, 2]]
    assert (p := place(hidden_memory=per[0], host_memory=per[0])).where == "host" and p.chunks == [[0], [1], [2]]
    with pytest.raises(ReapError, match="one batch's hidden states"):
        place(hidden_memory=per[0] - 1, host_memory=1 << 30)
    # the defaults: CUDA's free memory and the host's MemAvailable, each less two layers and 1/8
    monkeypatch.setattr(cal.torch.cuda, "mem_get_info", lambda dev: (int((per[0] + 2000) * 8 / 7) + 8, 1 << 40))
    monkeypatch.setattr(cal, "host_available", lambda: int((sum(per) + 2000) * 8 / 7) + 8)
    assert (p := place()).where == "host" and p.chunks == [[0, 1, 2]] and p.budget >= sum(per)
    assert "in host memory" in p.note(cuda)


def test_default_budget_comes_from_meminfo_and_chunks_are_recorded(checkpoints, tmp_path, monkeypatch):
    import json

    import torch
    from click.testing import CliRunner

    from reapsurgery.calibration import calibrate as cal
    from reapsurgery.calibration.streaming import StreamedModel
    from reapsurgery.cli import main as cli
    from reapsurgery.common.checkpoint import Checkpoint

    streamed = StreamedModel(Checkpoint.open(checkpoints["qwen3_moe"]), torch.float32, torch.device("cpu"))
    layer = max(sum(p.numel() for p in m.parameters()) for m in streamed.layers) * 4
    budget = 8000  # two of the three batches (6144, 5120, 1280 bytes) do not fit together: 2 chunks
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 999999 kB\nMemAvailable: {int((budget + 2 * layer) * 8 / 7 / 1024) + 1} kB\n")
    monkeypatch.setattr(cal, "MEMINFO", str(meminfo))
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in texts()))
    out = tmp_path / "sal.json"
    opts = ["--dataset", str(data), "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "-q"]
    r = CliRunner().invoke(cli, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(out), *opts])
    assert r.exit_code == 0, r.output
    assert "note: hidden states (12.0 KiB) on the device (cpu), in 2 chunks" in r.stderr
    assert "(MemAvailable less two layers and 1/8)" in r.stderr
    chunked = json.loads(out.read_text())
    assert (chunked["calibration"]["chunks"], chunked["calibration"]["hidden_states"]) == (2, "device")
    one = tmp_path / "one.json"  # the same samples, as the CLI orders them, in one chunk
    assert CliRunner().invoke(cli, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(one), *opts,
                                    "--hidden-memory", "1G"]).exit_code == 0
    whole = json.loads(one.read_text())
    assert (whole["calibration"]["chunks"], whole["calibration"]["hidden_states"]) == (1, "device")
    for layer_index, a in whole["layers"].items():
        b = chunked["layers"][layer_index]
        assert [a[k] for k in ("tokens", "count", "max_activation")] == [b[k] for k in ("tokens", "count", "max_activation")]
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(b[key], dtype=torch.float64), torch.tensor(a[key], dtype=torch.float64),
                                       rtol=1e-12, atol=0)
    meminfo.write_text(f"MemAvailable: {int(2 * layer * 8 / 7 / 1024) + 1} kB\n")  # not one batch beside two layers
    r = CliRunner().invoke(cli, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(tmp_path / "x.json"), *opts])
    assert r.exit_code == 2 and "error: one batch's hidden states" in r.output and "Traceback" not in r.output
