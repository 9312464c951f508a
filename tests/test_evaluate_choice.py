"""The mask chosen by measurement: `evaluate --method a,b --sparsity x,y` measures every combination
as `plan` makes it, and `plan`/`apply --from-evaluation` write the one the report ranks best; notes
say when the data cannot support the conclusion."""

from __future__ import annotations

import json
import random

import pytest

from reapsurgery.common.mask import load_mask
from reapsurgery.plan import plan_mask
from tests.handmade import fingerprint, saliency, stats
from tests.helpers import write_saliency

METHODS = ("reap", "frequency", "ean-sum")
SPARSITIES = ("0.25", "0.5")


def cli(*args):
    """The command line in-process (each subprocess would pay torch's import)."""
    from click.testing import CliRunner

    from reapsurgery.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def rows(path, seed, n=6, length=12):
    rnd = random.Random(seed)
    path.write_text("".join(json.dumps({"input_ids": [rnd.randrange(1, 300) for _ in range(length)]}) + "\n"
                            for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def measured(checkpoints, tmp_path_factory):
    """One calibration (6 rows, 8 asked) and one evaluation of methods x sparsities on held-out rows."""
    d = tmp_path_factory.mktemp("choice")
    src = checkpoints["qwen3_moe"]
    cal, held = rows(d / "cal.jsonl", 1), rows(d / "held.jsonl", 2)
    sal = d / "saliency.json"
    r = cli("calibrate", src, "-o", sal, "-q", "--dataset", cal, "--num-samples", 8)
    assert r.exit_code == 0, r.output
    report = d / "report.json"
    r = cli("evaluate", src, sal, "--method", ",".join(METHODS), "--sparsity", ",".join(SPARSITIES), "--dataset", held,
            "--num-samples", 6, "--batch-size", 2, "--dtype", "float32", "-q", "-o", report)
    assert r.exit_code == 0, r.output
    return {"src": src, "sal": sal, "report": report, "cal": cal, "held": held, "evaluate_output": r.output}


def planned(measured, tmp_path, method, sparsity):
    path = tmp_path / f"{method}-{sparsity}.json"
    r = cli("plan", measured["sal"], "--method", method, "--sparsity", sparsity, "-o", path, "--overwrite")
    assert r.exit_code == 0, r.output
    return load_mask(path)


def doctored(measured, tmp_path, change, name="doctored.json"):
    """The report with some variants' numbers (or records) changed: `change(variant)` edits in place."""
    report = json.loads(measured["report"].read_text())
    for v in report["variants"]:
        change(v)
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def refused(r, *needles):
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_the_cross_product_equals_the_planned_masks_evaluated(measured, tmp_path):
    report = json.loads(measured["report"].read_text())
    got = report["variants"]
    assert [(v["made"]["method"], v["made"]["sparsity"]) for v in got] == \
        [(m, float(s)) for s in SPARSITIES for m in METHODS]  # sparsity-major, methods in the order given
    files = []
    for v in got:
        method, sparsity = v["made"]["method"], str(v["made"]["sparsity"])
        assert v["mask_sha256"] == planned(measured, tmp_path, method, sparsity).sha256  # the very mask `plan` writes
        files.append(tmp_path / f"{method}-{sparsity}.json")

    def evaluate(masks, out):
        r = cli("evaluate", measured["src"], *[a for m in masks for a in ("--mask", m)], "--dataset", measured["held"],
                "--num-samples", 6, "--batch-size", 2, "--dtype", "float32", "-q", "-o", out)
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())["variants"]

    # the files `plan` wrote, in reverse order, and one of them alone: the same numbers, bit for bit
    files_report = evaluate(files[::-1], tmp_path / "files.json")[::-1]
    alone = evaluate(files[4:5], tmp_path / "alone.json")
    for v, f in zip(got, files_report):
        for key in ("kl_mean", "perplexity", "top1_agreement", "layers", "bytes", "experts_kept", "mask_sha256"):
            assert v[key] == f[key], (v["source"], key)
        assert f["made"] == {"mask_file": f["source"], "mask_sha256": v["mask_sha256"]}
    assert {k: alone[0][k] for k in ("kl_mean", "perplexity", "top1_agreement")} == \
        {k: got[4][k] for k in ("kl_mean", "perplexity", "top1_agreement")}
    assert "saliency.json --method frequency --sparsity 0.5" in measured["evaluate_output"]


def test_from_evaluation_writes_the_variant_ranked_best(measured, tmp_path):
    report = json.loads(measured["report"].read_text())
    at_half = [v for v in report["variants"] if v["made"]["sparsity"] == 0.5]
    best = min(at_half, key=lambda v: v["kl_mean"])
    out = tmp_path / "best.json"
    r = cli("plan", measured["sal"], "--from-evaluation", measured["report"], "--sparsity", 0.5, "-o", out)
    assert r.exit_code == 0, r.output
    mask = load_mask(out)
    assert mask.layers == planned(measured, tmp_path, best["made"]["method"], "0.5").layers
    chosen = mask.provenance["chosen_by"]
    assert chosen["evaluation"] == str(measured["report"]) and chosen["metric"] == "kl_mean"
    assert chosen["measured_mask_sha256"] == best["mask_sha256"] and chosen["variant"] == best["source"]

    # numbers set so that each metric names another method at 0.5
    numbers = {"reap": (0.30, 50.0, 0.40), "frequency": (0.10, 70.0, 0.50), "ean-sum": (0.20, 60.0, 0.90)}

    def change(v):
        if v["made"]["sparsity"] == 0.5:
            v["kl_mean"], v["perplexity"], v["top1_agreement"] = numbers[v["made"]["method"]]

    report2 = doctored(measured, tmp_path, change)
    for metric, method in ((None, "frequency"), ("kl", "frequency"), ("perplexity", "reap"), ("top1", "ean-sum")):
        out = tmp_path / f"by-{metric}.json"
        extra = ("--metric", metric) if metric else ()
        r = cli("plan", measured["sal"], "--from-evaluation", report2, "--sparsity", 0.5, *extra, "-o", out)
        assert r.exit_code == 0, r.output
        assert load_mask(out).layers == planned(measured, tmp_path, method, "0.5").layers, metric
        assert load_mask(out).provenance["chosen_by"]["variant"].endswith(f"--method {method} --sparsity 0.5")

    # apply takes the same options, through the same implementation
    r = cli("apply", measured["sal"], measured["src"], tmp_path / "out", "--from-evaluation", report2,
            "--sparsity", 0.5, "--metric", "top1", "-q")
    assert r.exit_code == 0, r.output
    written = load_mask(tmp_path / "out" / "reapsurgery.mask.json")
    assert written.layers == planned(measured, tmp_path, "ean-sum", "0.5").layers


def test_max_kl_writes_the_sparsest_variant_within_budget(measured, tmp_path):
    kl = {("reap", 0.25): 0.05, ("frequency", 0.25): 0.02, ("ean-sum", 0.25): 0.04,
          ("reap", 0.5): 0.30, ("frequency", 0.5): 0.25, ("ean-sum", 0.5): 0.12}
    report = doctored(measured, tmp_path, lambda v: v.update(kl_mean=kl[v["made"]["method"], v["made"]["sparsity"]]))
    for budget, method, sparsity in ((0.12, "ean-sum", "0.5"), (0.11, "frequency", "0.25"), (0.3, "ean-sum", "0.5")):
        out = tmp_path / f"kl-{budget}.json"
        r = cli("plan", measured["sal"], "--from-evaluation", report, "--max-kl", budget, "-o", out)
        assert r.exit_code == 0, r.output
        assert load_mask(out).layers == planned(measured, tmp_path, method, sparsity).layers, budget
    out = tmp_path / "none.json"
    refused(cli("plan", measured["sal"], "--from-evaluation", report, "--max-kl", 0.01, "-o", out),
            "doctored.json", "within --max-kl 0.01", "lowest KL measured is 0.02")
    assert not out.exists()


def test_refuses_a_report_it_cannot_act_on(measured, checkpoints, tmp_path):
    out = tmp_path / "m.json"
    sal, src = measured["sal"], measured["src"]

    def plan(report, *more):
        return cli("plan", sal, "--from-evaluation", report, "--sparsity", 0.5, *more, "-o", out)

    # made on another checkpoint: its fingerprint differs from the saliency's
    other = doctored(measured, tmp_path, lambda v: None, "other.json")
    data = json.loads(other.read_text())
    data["model"]["num_experts"] = 16
    other.write_text(json.dumps(data))
    refused(plan(other), "other.json", "does not match", "num_experts")
    # masks planned from another saliency file (same model): this one cannot reproduce them
    another = write_saliency(src, tmp_path / "another.json")
    refused(cli("plan", another, "--from-evaluation", measured["report"], "--sparsity", 0.5, "-o", out),
            "report.json", "another saliency file", "cannot be reproduced")
    # a record that no longer makes the mask measured
    tampered = doctored(measured, tmp_path, lambda v: v["made"].update(method="weighted-ean"))
    refused(plan(tampered), "doctored.json", "another mask than the one measured")
    # nothing measured at that sparsity; not a report; options that the report decides
    refused(cli("plan", sal, "--from-evaluation", measured["report"], "--sparsity", 0.75, "-o", out),
            "report.json", "keeps 2 of 8", "measured: 6 kept, 4 kept")
    refused(plan(sal), "saliency.json", "is not an evaluation report")
    refused(plan(measured["report"], "--method", "reap"), "--method", "--from-evaluation")
    refused(cli("plan", sal, "--max-kl", 0.1, "-o", out), "--max-kl", "--from-evaluation")
    refused(cli("apply", sal, src, tmp_path / "o", "--from-evaluation", other, "--sparsity", 0.5), "does not match")
    assert not out.exists() and not (tmp_path / "o").exists()


def test_notes_say_when_the_data_cannot_support_the_conclusion(measured, tmp_path):
    src, sal = measured["src"], measured["sal"]
    # the module's evaluation ran on 6 of 6 held-out rows: no note
    report = json.loads(measured["report"].read_text())
    assert not any("calibrated on" in n or "requested" in n for n in report["notes"]), report["notes"]

    def evaluate(dataset, n, **more):
        out = tmp_path / "r.json"
        r = cli("evaluate", src, sal, "--keep", 6, "--dataset", dataset, "--num-samples", n, "--batch-size", 2,
                "-q", "-o", out, "--overwrite", *[a for kv in more.items() for a in kv])
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())["notes"], r.output

    notes, output = evaluate(measured["cal"], 8)  # the very samples calibrate used
    assert any("the same samples" in n and "saliency.json was calibrated on" in n for n in notes), notes
    assert any("only 6 non-empty samples, 8 requested" in n for n in notes)
    assert "note: evaluated on the data saliency.json was calibrated on" in output
    notes, _ = evaluate(measured["cal"], 4)  # the same file, other rows
    assert any("another choice of rows" in n for n in notes) and not any("requested" in n for n in notes), notes


def test_calibrate_says_when_fewer_samples_were_found(measured, tmp_path):
    r = cli("calibrate", measured["src"], "-o", tmp_path / "s.json", "-q", "--dataset", measured["cal"],
            "--num-samples", 6)
    assert r.exit_code == 0 and "requested" not in r.output, r.output
    r = cli("calibrate", measured["src"], "-o", tmp_path / "t.json", "-q", "--dataset", measured["cal"],
            "--num-samples", 7)
    assert r.exit_code == 0 and "note: " in r.output and "only 6 non-empty samples, 7 requested" in r.output


@pytest.mark.parametrize("tokens, says", [(100_000, "the router does not use them"),
                                          (40, "cannot tell a dead expert from a rare one")])
def test_never_routed_experts_are_worded_by_what_the_data_can_tell(tokens, says):
    # 8 experts, top-2: an average expert takes a quarter of the tokens; expert 7 never routed
    layer = stats([10] * 7 + [0], gate_sum=[1] * 7 + [0], norm_sum=[1] * 7 + [0], reap_sum=[1] * 7 + [0],
                  tokens=tokens)
    plan = plan_mask(saliency(fingerprint(layers=(0,)), {0: layer}), sparsity=0.25)
    (note,) = [n for n in plan.notes if "never routed" in n]
    assert says in note and "0:1" in note
    other = ("cannot tell" if "router" in says else "the router does not use")
    assert other not in note
