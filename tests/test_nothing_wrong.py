"""Nothing silently wrong: a NaN, an overflow, a file that cannot be copied or a config that
miscounts the layers stops the command with an error that says where, instead of a result that
looks complete. (The one-line refusals themselves are in the refusal table.)"""

from __future__ import annotations

import json
import math
import resource
import shutil
import struct
import subprocess
import sys

import pytest

from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.errors import ReapError
from tests.conftest import tree_hash
from tests.helpers import cli, write_mask

RUN = ["-q", "--device", "cpu", "--num-samples", "2", "--max-length", "8"]


def poison(src, tmp_path, tensor: str, values: list[float]):
    """A copy of the checkpoint whose float32 `tensor` starts with `values`; returns (ckpt, shard)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    c = Checkpoint.open(ckpt)
    shard, info = c.tensors()[tensor]
    with open(ckpt / shard, "r+b") as f:
        f.seek(c.header(shard).data_offset + info.start)
        f.write(struct.pack(f"<{len(values)}f", *values))
    return ckpt, shard


def last_error(r) -> str:
    """The run failed with exit 2, no traceback, and its last stderr line is the one error line."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [l for l in lines if l.startswith("error: ")] == lines[-1:], r.stderr
    return lines[-1]


def test_calibrate_refuses_a_nan_in_a_later_layer_naming_tensor_and_shard(checkpoints, tmp_path):
    """Layers 0 and 1 run; the NaN in layer 2's expert stops the run there, before a saliency file is
    written that plan would refuse; the finished layers are not kept as a resume state (a resumed run
    would stop at the same tensor)."""
    tensor = "model.layers.2.mlp.experts.3.up_proj.weight"
    ckpt, shard = poison(checkpoints["qwen3_moe"], tmp_path, tensor, [math.nan])
    r = cli("calibrate", ckpt, "-o", tmp_path / "s.json", *RUN)
    line = last_error(r)
    assert f"{ckpt / shard}: tensor '{tensor}' holds NaN" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_statistics_that_overflow_the_compute_dtype_name_the_layer(checkpoints, tmp_path):
    """Finite weights, but too large for float16: the layer's statistics are not finite numbers.
    The error names the layer and the dtype (float32 computes it), and nothing is written."""
    ckpt, _ = poison(checkpoints["qwen3_moe"], tmp_path, "model.layers.0.post_attention_layernorm.weight", [1e6] * 32)
    r = cli("calibrate", ckpt, "-o", tmp_path / "s.json", *RUN, "--dtype", "float16")
    line = last_error(r)
    assert "layer 0: the " in line and "overflows in float16; try --dtype float32" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_evaluate_refuses_an_overflowing_layer_and_writes_no_report(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"]
    ckpt, _ = poison(src, tmp_path, "model.layers.1.post_attention_layernorm.weight", [1e6] * 32)
    mask = write_mask(ckpt, [0, 2, 5, 7], tmp_path / "m.json")
    r = cli("evaluate", ckpt, "--mask", mask, "-o", tmp_path / "r.json", *RUN, "--dtype", "float16")
    line = last_error(r)
    assert "decoder layer 1" in line and "overflows in float16" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.json"]


def test_json_files_never_hold_bare_nan(tmp_path):
    """Python's json writes NaN and Infinity; JSON has neither. The writers refuse, name the value
    and the file, and leave nothing behind."""
    from reapsurgery.common.files import write_json
    from reapsurgery.common.saliency import LayerStats, Saliency
    from reapsurgery.evaluation.report import save_report

    with pytest.raises(ReapError, match=r"r\.json: not written: variants\[0\]\.kl_mean is nan"):
        save_report({"variants": [{"kl_mean": math.nan}]}, tmp_path / "r.json")
    model = {"architecture": "A", "model_type": "a", "num_hidden_layers": 1, "moe_layers": [0], "num_experts": 2,
             "num_experts_per_tok": 1, "n_group": None}
    sal = Saliency(model, {}, {0: LayerStats(4, [1.0, 1.0], [1.0, 1.0], [1.0, math.inf], [1.0, 1.0], [1.0, 1.0])})
    with pytest.raises(ReapError, match=r"s\.json: not written: layers\.0\.norm_sum\[1\] is inf"):
        sal.save(tmp_path / "s.json")
    with pytest.raises(ReapError, match="is -inf"):
        write_json(tmp_path / "x.json", [1.0, -math.inf])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (apt-get install strace)")
def test_apply_fails_on_a_directory_it_cannot_read(checkpoints, tmp_path):
    """os.walk skips a directory it cannot list unless told otherwise, and apply used to write an
    output without its files. As a non-root user `chmod 000 sub` makes scandir's openat fail with
    EACCES; root is not stopped by modes, so the same failure is injected on that path."""
    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.model").write_text("needed")
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    before = tree_hash(src)
    for extra in ([], ["--dry-run"]):
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(src / "sub"), "-e", "trace=openat",
                            "-e", "inject=openat:error=EACCES", sys.executable, "-m", "reapsurgery", "apply", mask, src,
                            tmp_path / "out", "-q", *extra], capture_output=True, text=True)
        line = last_error(r)
        assert f"{src / 'sub'}: cannot read it (Permission denied)" in line, line
        assert r.stderr.strip() == line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "src"] and tree_hash(src) == before
    assert cli("apply", mask, src, tmp_path / "out", "-q").returncode == 0  # readable: copied
    assert (tmp_path / "out" / "sub" / "tokenizer.model").read_text() == "needed"


def _config(src, tmp_path, **changes):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **changes}))
    return ckpt


def test_a_config_counting_fewer_layers_than_stored_is_refused_everywhere(checkpoints, tmp_path):
    """num_hidden_layers 2 on 3 stored decoder layers: apply used to take layer 2 for an MTP block
    (dropping its experts and router, keeping its attention), verify said ok, calibrate skipped it."""
    src = checkpoints["deepseek_v3"]  # 3 decoder layers and an MTP layer stored as layer 3
    ckpt = _config(src, tmp_path, num_hidden_layers=2)
    mask = write_mask(src, [0, 2, 5, 7], tmp_path / "m.json")
    from reapsurgery.common.saliency import LayerStats, Saliency

    c = Checkpoint.open(src)
    stats = {l: LayerStats(10, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8, [1.0] * 8) for l in c.moe_layers}
    Saliency(c.fingerprint(), {}, stats).save(tmp_path / "s.json")
    before = tree_hash(ckpt)
    for argv in (["apply", mask, ckpt, tmp_path / "out"], ["verify", ckpt], ["inspect", ckpt],
                 ["plan", tmp_path / "s.json", "--keep", "4", "--ckpt", ckpt, "-o", tmp_path / "p.json"],
                 ["calibrate", ckpt, "-o", tmp_path / "c.json", *RUN]):
        line = last_error(cli(*argv))
        assert line == (f"error: {ckpt / 'config.json'}: num_hidden_layers is 2, but the checkpoint also stores "
                        "layer 2 past them, and it does not hold a multi-token-prediction block (eh_proj): "
                        "num_hidden_layers must count every decoder layer"), (argv[0], line)
    assert tree_hash(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.json", "s.json"]


def test_a_config_asking_for_a_billion_experts_is_checked_against_what_is_stored(checkpoints, tmp_path):
    """verify compared the experts stored with set(range(E)) for config.json's E: 10^12 experts
    allocated until the kernel ended it. Now the check is sized by what is stored."""
    ckpt = _config(checkpoints["qwen3_moe"], tmp_path, num_local_experts=10**12)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    r = subprocess.run([sys.executable, "-m", "reapsurgery", "verify", ckpt], capture_output=True, text=True,
                       preexec_fn=limit, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "config says 1000000000000 experts" in r.stderr


def test_inspect_json_stays_json_when_a_score_ratio_overflows(tmp_path):
    """`inspect --json` printed max_over_min = Infinity (Python's json, not JSON) for scores 1e-300
    and 1e300; a ratio past the float range is null."""
    from reapsurgery.common.saliency import LayerStats, Saliency

    model = {"architecture": "A", "model_type": "a", "num_hidden_layers": 1, "moe_layers": [0], "num_experts": 2,
             "num_experts_per_tok": 1, "n_group": None}
    Saliency(model, {}, {0: LayerStats(2, [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1e-300, 1e300], [1.0, 1.0])}).save(
        tmp_path / "s.json")
    r = cli("inspect", tmp_path / "s.json", "--json")
    assert r.returncode == 0, r.stderr

    def no_constants(name):
        raise AssertionError(f"{name} in inspect --json output")

    facts = json.loads(r.stdout, parse_constant=no_constants)
    assert facts["layers"]["0"]["scores"]["max_over_min"] is None
