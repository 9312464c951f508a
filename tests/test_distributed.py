"""`torchrun --nproc-per-node 2 -m reapsurgery calibrate` (gloo on CPU) gives the statistics of
one process: each rank runs a share of the batches, per-layer sums are all-reduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reapsurgery.cli import main as cli
from tests.test_calibrate import texts

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_equal_one_process(checkpoints, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in texts() * 2))
    opts = ["--dataset", str(data), "--num-samples", "10", "--batch-size", "2", "--device", "cpu",
            "--dtype", "float32", "-q", "--hidden-memory", "12K"]  # 2 chunks per rank as well
    one = tmp_path / "one.json"
    assert CliRunner().invoke(cli, ["calibrate", str(checkpoints["qwen3_moe"]), "-o", str(one), *opts]).exit_code == 0
    two = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "reapsurgery", "calibrate", str(checkpoints["qwen3_moe"]), "-o", str(two), *opts],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 writes and reports
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["calibration"]["ranks"] == 2 and b["calibration"]["chunks"] >= 2
    assert a["layers"].keys() == b["layers"].keys()
    for layer, x in a["layers"].items():
        y = b["layers"][layer]
        assert (x["tokens"], x["count"], x["max_activation"]) == (y["tokens"], y["count"], y["max_activation"])
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(y[key], dtype=torch.float64), torch.tensor(x[key], dtype=torch.float64),
                                       rtol=1e-9, atol=0)
    assert not list(tmp_path.glob("*.resume"))
