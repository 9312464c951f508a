"""A family outside the built-in table: every command derives its layout from transformers' model
(with a note), a layout file given with --layout wins, and both prune to the same bytes, equal
to in-memory pruning."""

from __future__ import annotations

import json
from importlib import resources

import torch
from click.testing import CliRunner

from reapsurgery.common import layouts
from reapsurgery.cli import main
from reapsurgery.common.mask import load_mask
from tests.conftest import tree_hash
from tests.reference import load, logits, pruned_in_memory
from tests.helpers import write_mask

FAMILY = "olmoe"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_layout_file_for_a_family_missing_from_the_builtin_table(checkpoints, tmp_path, monkeypatch):
    src = checkpoints[FAMILY]
    table = json.loads(resources.files("reapsurgery.common").joinpath("layouts.json").read_text())
    layout_file = tmp_path / "my_layout.json"
    layout_file.write_text(json.dumps({"name": "my-olmoe", **table[FAMILY]}))
    builtin = layouts.builtin_layouts()
    monkeypatch.setattr(layouts, "builtin_layouts", lambda: {k: v for k, v in builtin.items() if k != FAMILY})

    r = run("inspect", src)
    assert r.exit_code == 0, r.output
    assert "no built-in layout for OlmoeForCausalLM" in r.stderr and "derived" in r.stderr
    assert FAMILY not in [r["name"] for r in json.loads(run("architectures", "--json").output)["built_in"]]

    r = run("inspect", src, "--layout", layout_file)
    assert r.exit_code == 0, r.output
    assert "my-olmoe" in r.output

    sal = tmp_path / "saliency.json"
    r = run("calibrate", src, "-o", sal, "--num-samples", 4, "--max-length", 24, "--device", "cpu", "-q",
            "--layout", layout_file)
    assert r.exit_code == 0, r.output
    mask = tmp_path / "mask.json"
    r = run("plan", sal, "--keep", 4, "--ckpt", src, "-o", mask, "--layout", layout_file)
    assert r.exit_code == 0, r.output
    r = run("inspect", mask, "--ckpt", src, "--layout", layout_file)
    assert r.exit_code == 0, r.output

    out = tmp_path / "out"
    derived_out = tmp_path / "derived_out"
    r = run("apply", mask, src, derived_out, "-q")  # no layout: the derived one
    assert r.exit_code == 0, r.output
    assert run("apply", mask, src, tmp_path / "dry", "--dry-run", "--layout", layout_file).exit_code == 0
    r = run("apply", mask, src, out, "-q", "--layout", layout_file)
    assert r.exit_code == 0, r.output
    assert run("verify", out, "--layout", layout_file).exit_code == 0

    pruned, info = load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    keep = load_mask(mask).layers
    reference = pruned_in_memory(src, keep, 4)
    assert torch.equal(logits(pruned), logits(reference))
    assert tree_hash(derived_out) == tree_hash(out)  # derived and written layouts: the same bytes


def test_architectures_derive_prints_a_layout_that_layout_accepts(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    r = run("architectures", "--derive", src)
    assert r.exit_code == 0, r.output
    entry = json.loads(r.output)
    assert entry["layer_prefix"] == "model.layers.{layer}." and "block_sparse_moe.experts.{expert}." in entry["experts"]
    layout_file = tmp_path / "derived.json"
    layout_file.write_text(r.output)
    r = run("inspect", src, "--layout", layout_file, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["model"]["num_experts"] == 8


def test_unreadable_layout_file_is_one_line(checkpoints, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run("inspect", checkpoints[FAMILY], "--layout", bad)
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {bad}: layout file is not valid JSON")


def test_layout_file_with_a_malformed_mtp_block_is_one_line(checkpoints, tmp_path):
    table = json.loads(resources.files("reapsurgery.common").joinpath("layouts.json").read_text())
    entry = dict(table["deepseek_v3"], mtp_block={"embed_norm": "enorm", "hidden_norm": "hnorm"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entry))
    r = run("inspect", checkpoints["deepseek_v3"], "--layout", bad)
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {bad}: ") and "mtp_block needs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_derived_layout_is_cached_so_the_next_command_needs_no_torch(checkpoints, tmp_path):
    """The first command on a family without a built-in entry derives its layout (torch and
    transformers); the next (verify after apply, inspect...) reads it from the cache."""
    import os
    import subprocess
    import sys

    src = checkpoints["solar_open"]  # no built-in entry
    code = ("import sys; from reapsurgery.common.checkpoint import Checkpoint; "
            f"c = Checkpoint.open({str(src)!r}); print(c.num_experts, 'torch' in sys.modules)")
    env = {**os.environ, "REAPSURGERY_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.stdout.split() == ["8", "True"], first.stderr
    assert second.stdout.split() == ["8", "False"], second.stderr
    assert len(list((tmp_path / "cache" / "layouts").glob("*.json"))) == 1


def test_what_apply_wrote_from_a_derived_family_opens_without_deriving_again(checkpoints, tmp_path):
    """verify OUT after apply reads the source's derived layout (the pruned model's names and family
    are the source's) instead of building the model again, and finds the same layout."""
    import os
    import subprocess
    import sys

    from reapsurgery.common.checkpoint import derive_entry

    src = checkpoints["solar_open"]  # no built-in entry
    env = {**os.environ, "REAPSURGERY_CACHE": str(tmp_path / "cache")}
    mask = write_mask(src, [1, 2, 5, 6], tmp_path / "m.json")
    r = subprocess.run([sys.executable, "-m", "reapsurgery", "apply", str(mask), str(src), str(tmp_path / "out"), "-q"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code = ("import sys; from reapsurgery.common.checkpoint import Checkpoint; "
            f"c = Checkpoint.open({str(tmp_path / 'out')!r}); print(c.num_experts, 'torch' in sys.modules)")
    opened = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert opened.stdout.split() == ["4", "False"], opened.stderr
    assert derive_entry(tmp_path / "out") == derive_entry(src)  # what a derivation of the output gives
