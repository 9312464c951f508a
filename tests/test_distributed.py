"""`torchrun --nproc-per-node 2 -m reapsurgery calibrate` (gloo on CPU), and the same command on
two nodes, give the statistics of one process: each rank runs a share of the batches, per-layer
sums are all-reduced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.test_calibrate import texts

ROOT = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _one_process(checkpoints, tmp_path, *extra: str) -> tuple[list[str], dict]:
    """The options of the comparison and the saliency of one process with them."""
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in texts() * 2))
    opts = ["--dataset", str(data), "--num-samples", "10", "--batch-size", "2", "--device", "cpu",
            "--dtype", "float32", "-q", *extra]
    one = tmp_path / "one.json"
    # a process of its own with the ranks' environment: float32 matmuls round differently with another thread count
    r = subprocess.run([sys.executable, "-m", "reapsurgery", "calibrate", str(checkpoints["qwen3_moe"]), "-o", str(one),
                        *opts], env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return opts, json.loads(one.read_text())


def test_two_ranks_equal_one_process(checkpoints, tmp_path):
    opts, a = _one_process(checkpoints, tmp_path, "--hidden-memory", "12K")  # 2 chunks per rank as well
    two = tmp_path / "two.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "reapsurgery", "calibrate", str(checkpoints["qwen3_moe"]), "-o", str(two), *opts],
                       env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[:3000] + "\n...\n" + r.stderr[-1500:]  # a rank's own error comes first
    assert r.stdout.count("wrote ") == 1  # rank 0 writes and reports
    b = json.loads(two.read_text())
    assert b["calibration"]["ranks"] == 2 and b["calibration"]["chunks"] >= 2
    _assert_same_statistics(a, b)
    assert not list(tmp_path.glob("*.resume"))


def test_two_nodes_equal_one_process(checkpoints, tmp_path):
    # the same command on every node, as on a cluster: here two launchers on this machine as nodes 0 and 1
    opts, a = _one_process(checkpoints, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two.json"
    logs = [(tmp_path / f"node{n}.out", tmp_path / f"node{n}.err") for n in (0, 1)]
    nodes = []
    for n, (out, err) in enumerate(logs):
        with open(out, "w") as o, open(err, "w") as e:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n), "--master-addr",
                 "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1",
                 "-m", "reapsurgery", "calibrate", str(checkpoints["qwen3_moe"]), "-o", str(two), *opts],
                env=ENV, stdout=o, stderr=e, cwd=tmp_path))
    codes = [p.wait(timeout=300) for p in nodes]
    assert codes == [0, 0], [err.read_text()[-2000:] for _, err in logs]
    # global rank 0 (node 0) writes and reports
    assert [out.read_text().count("wrote ") for out, _ in logs] == [1, 0]
    b = json.loads(two.read_text())
    assert b["calibration"]["ranks"] == 2
    _assert_same_statistics(a, b)
    assert not list(tmp_path.glob("*.resume"))


def _assert_same_statistics(a: dict, b: dict) -> None:
    assert a["layers"].keys() == b["layers"].keys()
    for layer, x in a["layers"].items():
        y = b["layers"][layer]
        assert (x["tokens"], x["count"], x["max_activation"]) == (y["tokens"], y["count"], y["max_activation"])
        for key in ("gate_sum", "norm_sum", "reap_sum"):
            torch.testing.assert_close(torch.tensor(y[key], dtype=torch.float64), torch.tensor(x[key], dtype=torch.float64),
                                       rtol=1e-9, atol=0)
