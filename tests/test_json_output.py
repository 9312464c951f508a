"""--json on every command that reports a result: one JSON document on stdout holding the facts the
text output states, notes on stderr, and a refusal still one `error:` line with nothing on stdout."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from reapsurgery.cli import main
from reapsurgery.common.units import human
from reapsurgery.evaluation.report import table_rows
from tests.helpers import write_mask

SMALL_RUN = ["--num-samples", "4", "--max-length", "16", "--batch-size", "2", "--device", "cpu", "-q"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def text_and_json(*args) -> tuple[str, dict, str]:
    """The command's text stdout, its --json document (the same run, repeated with --json) and that run's stderr."""
    text = run(*args)
    assert text.exit_code == 0, text.output
    rerun = ("--overwrite",) if args[0] in ("plan", "calibrate", "merge-saliency", "evaluate", "apply") else ()
    as_json = run(*args, "--json", *rerun)  # the same outputs again: the first run wrote them
    assert as_json.exit_code == 0, as_json.output
    return text.stdout, json.loads(as_json.stdout), as_json.stderr


@pytest.fixture(scope="module")
def world(checkpoints, tmp_path_factory):
    from reapsurgery.common.checkpoint import Checkpoint
    from reapsurgery.common.saliency import LayerStats, Saliency

    root = tmp_path_factory.mktemp("json")
    ckpt = checkpoints["qwen3_moe"]
    c = Checkpoint.open(ckpt)
    for name, scale in (("a.json", 1.0), ("b.json", 2.0)):
        stats = {l: LayerStats(100, [10.0 + e for e in range(8)], [1.0 + e for e in range(8)],
                               [2.0 + scale * e for e in range(8)], [0.5 + scale * (e % 3) for e in range(8)], [3.0] * 8)
                 for l in c.moe_layers}
        Saliency(c.fingerprint(), {"samples": 4, "tokens": 100}, stats).save(root / name)
    return {"root": root, "ckpt": ckpt, "saliency": root / "a.json", "other": root / "b.json",
            "mask": write_mask(ckpt, [0, 2, 5, 7], root / "mask.json")}


def test_plan(world, tmp_path):
    text, doc, stderr = text_and_json("plan", world["saliency"], "--sparsity", "0.3", "-o", tmp_path / "m.json")
    sha = re.search(r"wrote \S+ \(sha256 (\w+)\)", text)[1]
    kept, E, drop = map(int, re.search(r"keep (\d+) of (\d+) routed experts .* \(drop (\d+),", text).groups())
    assert (doc["sha256"], doc["kept"], doc["num_experts"], doc["drop"], doc["sparsity"]) == (sha, kept, E, drop, 0.25)
    mask = json.loads((tmp_path / "m.json").read_text())
    assert {l: p["kept"] for l, p in doc["layers"].items()} == mask["layers"]
    assert doc["output"] == str(tmp_path / "m.json") and doc["provenance"] == mask["provenance"]
    assert "note: --sparsity 0.3 of 8 experts is 2.4" in stderr  # notes stay on stderr


def test_apply_and_dry_run_and_verify(world, tmp_path):
    args = ["apply", world["saliency"], world["ckpt"]]
    text = run(*args, tmp_path / "text", "--keep", "4", "-q")
    assert text.exit_code == 0, text.output
    r = run(*args, tmp_path / "json", "--keep", "4", "-q", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    before, after, layers, shards, size, was = re.search(
        r"wrote \S+: (\d+) -> (\d+) experts in (\d+) MoE layers, (\d+) shard\(s\), (.+) \(was (.+)\)", text.stdout).groups()
    assert doc["dry_run"] is False and doc["out"] == str(tmp_path / "json")
    assert (doc["experts_before"], doc["experts_after"], doc["moe_layers"], doc["shards"]) == tuple(
        map(int, (before, after, layers, shards)))
    assert (human(doc["bytes_written"]), human(doc["bytes_before"])) == (size, was)
    assert doc["config_changes"] == {"num_local_experts": [8, 4]} and "num_local_experts 8 -> 4" in text.stdout
    assert doc["plan"]["kept"] == 4
    assert json.loads((tmp_path / "json" / "reapsurgery.mask.json").read_text())["layers"] == {
        l: p["kept"] for l, p in doc["plan"]["layers"].items()}

    dry_text, dry, _ = text_and_json("apply", world["mask"], world["ckpt"], tmp_path / "dry", "--dry-run")
    assert dry["dry_run"] is True and not (tmp_path / "dry").exists() and dry["plan"] is None
    assert f"{len(dry['shards'])} shard(s), {human(dry['bytes'])}" in dry_text
    assert all(f"  {s['name']}  " in dry_text for s in dry["shards"])

    ok_text, ok, _ = text_and_json("verify", tmp_path / "json")
    tensors, shards, size, layers, experts = re.search(
        r"ok: \S+: (\d+) tensors in (\d+) shard\(s\), (.+), (\d+) MoE layers with (\d+) experts each", ok_text).groups()
    assert ok["ok"] is True and ok["problems"] == []
    assert (ok["tensors"], ok["shards"], human(ok["total_size"]), ok["moe_layers"], ok["num_experts"]) == (
        int(tensors), int(shards), size, int(layers), int(experts))

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "json", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    r = run("verify", bad, "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 2 and doc["ok"] is False and doc["problems"]
    assert r.stderr.splitlines() == [f"error: {p}" for p in doc["problems"]]


def test_calibrate_and_merge(world, tmp_path):
    text, doc, stderr = text_and_json("calibrate", world["ckpt"], "-o", tmp_path / "s.json", *SMALL_RUN)
    layers, samples, tokens, device, dtype, never = re.search(
        r"wrote \S+: (\d+) MoE layers, (\d+) samples, (\d+) tokens on (\w+) \((\w+)\); (\d+) \(layer, expert\)", text).groups()
    cal = doc["calibration"]
    assert (len(doc["moe_layers"]), cal["samples"], cal["tokens"], cal["device"], cal["dtype"]) == (
        int(layers), int(samples), int(tokens), device, dtype)
    assert sum(doc["never_routed"].values()) == int(never)
    assert cal == json.loads((tmp_path / "s.json").read_text())["calibration"]
    assert stderr.startswith("note: hidden states")

    text, doc, _ = text_and_json("merge-saliency", world["saliency"], world["other"], "-o", tmp_path / "m.json")
    runs, tokens = map(int, re.search(r"wrote \S+: (\d+) runs, (\d+) tokens", text).groups())
    assert (len(doc["inputs"]), doc["calibration"]["tokens"]) == (runs, tokens) == (2, 200)


def test_evaluate(world, tmp_path):
    args = ["evaluate", world["ckpt"], "--mask", world["mask"], *SMALL_RUN]
    text = run(*args)
    assert text.exit_code == 0, text.output
    r = run(*args, "--json", "-o", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc.pop("written") == [str(tmp_path / "report.json")]
    assert doc == json.loads((tmp_path / "report.json").read_text())
    # the text's table, rendered from the document, is the table the text run printed (the same data and seed)
    header, *rows = text.stdout.splitlines()
    assert header.startswith(f"{doc['data']['samples']} samples, {doc['data']['predicted_positions']} predicted tokens")
    assert [row.split() for row in rows] == [" ".join(map(str, row)).split() for row in table_rows(doc, human)]


@pytest.mark.parametrize("args, error", [
    (["plan", "{root}/nope.json", "--keep", "4", "-o", "{tmp}/m.json"], "{root}/nope.json: does not exist"),
    (["apply", "{root}/mask.json", "{tmp}/nockpt", "{tmp}/out"], "{tmp}/nockpt: does not exist"),
    (["verify", "{tmp}/nockpt"], "{tmp}/nockpt: does not exist"),
    (["calibrate", "{tmp}/nockpt", "-o", "{tmp}/s.json"], "{tmp}/nockpt: does not exist")])
def test_a_refusal_is_still_one_error_line(world, tmp_path, args, error):
    r = run(*[a.format(root=world["root"], tmp=tmp_path) for a in args], "--json")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"error: {error.format(root=world['root'], tmp=tmp_path)}\n"
