"""`reapsurgery plan` and `apply SALIENCY`: which experts are kept, and what is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.errors import ReapError
from reapsurgery.common.mask import load_mask
from reapsurgery.plan import METHODS, drop_count, expert_scores, parse_pins, plan_mask, super_experts
from tests.conftest import tree_hash
from tests.handmade import by_reap, fingerprint, for_checkpoint, saliency, stats
from tests.helpers import cli
from tests.reference import load, logits, pruned_in_memory


def refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def one_layer(layer_stats, **fp):
    return saliency(fingerprint(layers=(0,), **fp), {0: layer_stats})


# -- selection on hand-made statistics -------------------------------------------------

# expert:          0     1    2    3    4     5
COUNT = [10, 1, 4, 2, 8, 5]
GATE_SUM = [1.0, 0.9, 2.0, 0.2, 3.0, 1.5]
NORM_SUM = [10.0, 5.0, 4.0, 8.0, 2.0, 6.0]
REAP_SUM = [2.5, 4.5, 2.0, 0.8, 0.5, 3.0]
# scores:      reap = REAP_SUM/COUNT = .25 4.5 .5 .4 .0625 .6 ; ean-mean = NORM_SUM/COUNT = 1 5 1 4 .25 1.2
EXPECTED_KEEP_3 = {
    "reap": [1, 2, 5],
    "frequency": [0, 4, 5],
    "weighted-frequency": [2, 4, 5],
    "ean-sum": [0, 3, 5],
    "ean-mean": [1, 3, 5],
    "weighted-ean": [0, 1, 5],
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_keeps_its_highest_scores(method):
    sal = one_layer(stats(COUNT, GATE_SUM, NORM_SUM, REAP_SUM), E=6)
    plan = plan_mask(sal, keep=3, method=method)
    assert plan.mask.layers == {0: EXPECTED_KEEP_3[method]}
    assert plan.mask.provenance["method"] == method
    assert plan.mask.provenance["sparsity"] == 0.5


def test_scores_are_the_documented_ratios():
    s = stats(COUNT, GATE_SUM, NORM_SUM, REAP_SUM)
    assert expert_scores(s, "reap") == pytest.approx([0.25, 4.5, 0.5, 0.4, 0.0625, 0.6])
    assert expert_scores(s, "frequency") == COUNT
    assert expert_scores(s, "weighted-frequency") == GATE_SUM
    assert expert_scores(s, "ean-sum") == NORM_SUM
    assert expert_scores(s, "ean-mean") == pytest.approx([1.0, 5.0, 1.0, 4.0, 0.25, 1.2])
    assert expert_scores(s, "weighted-ean") == REAP_SUM


@pytest.mark.parametrize("method", METHODS)
def test_never_routed_experts_are_dropped_first_and_counted(method):
    # expert 2 is routed but scores 0 under every method; expert 5 was never routed
    count = [5, 5, 5, 5, 5, 0]
    gate = [1, 1, 0, 1, 1, 0]
    norm = [1, 1, 0, 1, 1, 0]
    sal = one_layer(stats(count, gate, norm, [1, 1, 0, 1, 1, 0]), E=6)
    plan = plan_mask(sal, keep=5, method=method)
    assert plan.mask.layers[0] == [0, 1, 2, 3, 4]
    assert plan.never_routed == {0: 1}
    assert plan.mask.provenance["never_routed"] == {"0": 1}
    assert any("never routed" in n and "0:1" in n for n in plan.notes)


def test_ties_keep_the_lower_index():
    sal = one_layer(by_reap([1.0] * 8))
    assert plan_mask(sal, keep=3).mask.layers[0] == [0, 1, 2]
    sal = one_layer(by_reap([2.0, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0]))
    assert plan_mask(sal, keep=4).mask.layers[0] == [0, 1, 2, 5]
    # never-routed experts tie with each other too
    sal = one_layer(by_reap([None] * 6 + [1.0, 2.0]))
    assert plan_mask(sal, keep=4).mask.layers[0] == [0, 1, 6, 7]


def test_same_inputs_same_mask():
    sal = for_checkpoint_like(seed=3)
    a = plan_mask(sal, sparsity=0.5, preserve_super_experts=True)
    reordered = saliency(sal.model, dict(reversed(list(sal.layers.items()))))
    b = plan_mask(reordered, sparsity=0.5, preserve_super_experts=True)
    assert a.mask.to_json() == b.mask.to_json() and a.mask.sha256 == b.mask.sha256


def for_checkpoint_like(seed: int):
    import random

    rnd = random.Random(seed)
    layers = {l: by_reap([round(rnd.random(), 1) for _ in range(16)], [rnd.random() for _ in range(16)])
              for l in range(4)}
    return saliency(fingerprint(E=16, layers=range(4)), layers)


def test_drop_count_rounding_rule():
    assert drop_count(8, sparsity=0.5) == 4
    assert drop_count(8, sparsity=0.3) == 2  # 2.4 -> 2
    assert drop_count(8, sparsity=0.3125) == 3  # 2.5 -> 3: halves round up
    assert drop_count(6, sparsity=0.25) == 2  # 1.5 -> 2
    assert drop_count(128, sparsity=0.25) == 32
    assert drop_count(8, keep=3) == 5
    for kwargs, needle in [({}, "exactly one"), ({"sparsity": 0.5, "keep": 4}, "exactly one"),
                           ({"sparsity": 1.0}, "[0, 1)"), ({"sparsity": -0.1}, "[0, 1)"),
                           ({"keep": 0}, "between 1 and"), ({"keep": 9}, "between 1 and")]:
        with pytest.raises(ReapError) as e:
            drop_count(8, **kwargs)
        assert needle in str(e.value)


# -- group-limited routers ------------------------------------------------------------

def grouped(scores, n_group, **fp):
    return one_layer(by_reap(scores), n_group=n_group, model_type="deepseek_v3",
                     architecture="DeepseekV3ForCausalLM", **fp)


def test_group_limited_router_drops_equally_from_every_group():
    # the four least salient experts are all in group 0; a global choice would empty it
    sal = grouped([1, 2, 3, 4, 10, 20, 30, 40], n_group=2)
    plan = plan_mask(sal, sparsity=0.5)
    assert plan.mask.layers[0] == [2, 3, 6, 7]
    assert not plan.notes or all("multiple" not in n for n in plan.notes)
    sal = grouped([9, 1, 8, 2, 7, 3, 6, 4], n_group=4, E=8, top_k=2)
    assert plan_mask(sal, keep=4, min_per_group=1).mask.layers[0] == [0, 2, 4, 6]


def test_group_count_not_a_multiple_is_rounded_with_a_note_or_refused_with_strict():
    sal = grouped([1, 2, 3, 4, 10, 20, 30, 40], n_group=2)
    plan = plan_mask(sal, sparsity=0.375)  # 3 of 8: not a multiple of 2 -> 2 (halves towards fewer)
    assert plan.requested_drop == 3 and plan.drop == 2
    assert plan.mask.layers[0] == [1, 2, 3, 5, 6, 7]
    note = next(n for n in plan.notes if "multiple" in n)
    assert "dropping 3" in note and "dropping 2 instead" in note and "--strict" in note
    with pytest.raises(ReapError) as e:
        plan_mask(sal, sparsity=0.375, strict=True)
    assert "n_group=2" in str(e.value) and "drop 2 or 4" in str(e.value)
    # 3 of 8 with 4 groups rounds to 4 (nearest multiple)
    sal = grouped([1] * 8, n_group=4, top_k=1)
    assert plan_mask(sal, keep=5, min_per_group=1).drop == 4


# -- feasibility ------------------------------------------------------------------------

def test_refuses_fewer_experts_than_top_k():
    sal = one_layer(by_reap([1.0] * 8), top_k=2)
    with pytest.raises(ReapError) as e:
        plan_mask(sal, sparsity=0.9)  # drop 7, keep 1
    assert "num_experts_per_tok=2" in str(e.value) and "keep 1 of 8" in str(e.value)
    with pytest.raises(ReapError, match="num_experts_per_tok=2"):
        plan_mask(sal, keep=1)
    assert plan_mask(sal, keep=2).kept == 2


def test_refuses_too_few_experts_reachable_through_topk_group():
    sal = grouped([1.0] * 8, n_group=4, top_k=4)
    with pytest.raises(ReapError) as e:
        plan_mask(sal, keep=4, topk_group=2, min_per_group=1)  # 2 groups x 1 expert reachable < 4
    assert "topk_group=2" in str(e.value) and "num_experts_per_tok=4" in str(e.value)
    assert plan_mask(sal, keep=4, topk_group=4, min_per_group=1).kept == 4
    # DeepSeek-style routers rank groups by their top-2 scores: two per group at least
    with pytest.raises(ReapError, match="at least 2 per group"):
        plan_mask(grouped([1.0] * 8, n_group=2), keep=2)


# -- preserving experts -----------------------------------------------------------------

def four_layers_with_outliers():
    """4 MoE layers x 64 experts; expert 3 of layer 0 and expert 6 of layer 3 have huge max activations
    and the lowest REAP scores."""
    layers = {}
    for l in range(4):
        scores = [1.0 + e / 100 for e in range(64)]
        maxact = [1.0] * 64
        for e in (3, 6):
            scores[e] = 0.01
        if l == 0:
            maxact[3] = 100.0
        if l == 3:
            maxact[6] = 100.0
        layers[l] = by_reap(scores, maxact)
    return saliency(fingerprint(E=64, layers=range(4)), layers)


def test_super_experts_preserved_in_first_75_percent_of_layers():
    sal = four_layers_with_outliers()
    plain = plan_mask(sal, sparsity=0.5)
    assert 3 not in plain.mask.layers[0] and 6 not in plain.mask.layers[3]
    plan = plan_mask(sal, sparsity=0.5, preserve_super_experts=True)
    assert 3 in plan.mask.layers[0]
    assert 6 not in plan.mask.layers[3]  # last quarter of layers: not considered
    assert len(plan.mask.layers[0]) == 32
    assert plan.mask.provenance["preserved"]["super_experts"] == {"0": [3]}
    outliers = plan_mask(sal, sparsity=0.5, preserve_outliers=True)
    assert 3 in outliers.mask.layers[0] and 6 in outliers.mask.layers[3]


def test_super_expert_threshold_needs_a_tenth_of_the_largest():
    layers = {l: by_reap([1.0] * 64, [1.0] * 64) for l in range(4)}
    layers[0].max_activation[1] = 1000.0  # super
    layers[1].max_activation[2] = 50.0  # above the 99.5th percentile, below 1000/10: not super
    found, threshold = super_experts(layers, all_layers=True)
    assert found == {0: [1]} and threshold == 100.0


def test_pinned_experts_are_kept_and_checked():
    sal = one_layer(by_reap([0.1, 5, 5, 5, 5, 5, 5, 0.2]))
    plan = plan_mask(sal, keep=4, pins=parse_pins("0:0,0:7"))
    assert plan.mask.layers[0] == [0, 1, 2, 7]
    assert plan.mask.provenance["preserved"]["pinned"] == {"0": [0, 7]}
    with pytest.raises(ReapError, match="3 experts of this layer are preserved"):
        plan_mask(sal, keep=2, pins=parse_pins("0:0,0:7,0:3"))
    with pytest.raises(ReapError, match="not an MoE layer"):
        plan_mask(sal, keep=4, pins={5: {0}})
    with pytest.raises(ReapError, match="out of range 0..7"):
        plan_mask(sal, keep=4, pins={0: {8}})
    with pytest.raises(ReapError, match="LAYER:EXPERT"):
        parse_pins("3-17")


def test_saliency_must_cover_every_moe_layer():
    sal = saliency(fingerprint(layers=(0, 1)), {0: by_reap([1.0] * 8)})
    with pytest.raises(ReapError, match=r"no statistics for MoE layers \[1\]"):
        plan_mask(sal, keep=4)


# -- command line --------------------------------------------------------------------------

@pytest.fixture
def qwen_saliency(checkpoints, tmp_path):
    path = tmp_path / "saliency.json"
    for_checkpoint(checkpoints["qwen3_moe"], never_routed=5).save(path)
    return path


def test_plan_writes_a_mask_that_applies(checkpoints, qwen_saliency, tmp_path):
    src = checkpoints["qwen3_moe"]
    r = cli("plan", qwen_saliency, "--sparsity", "0.5", "-o", tmp_path / "mask.json")
    assert r.returncode == 0, r.stderr
    mask = load_mask(tmp_path / "mask.json")
    assert mask.model == Checkpoint.open(src).fingerprint()
    assert mask.kept == 4 and all(5 not in kept for kept in mask.layers.values())  # never routed
    assert mask.provenance["saliency_sha256"] == __import__("hashlib").sha256(qwen_saliency.read_bytes()).hexdigest()
    assert mask.sha256 in r.stdout
    refused(cli("plan", qwen_saliency, "--keep", "1", "-o", tmp_path / "bad.json"), "num_experts_per_tok=2", "keep 1 of 8")
    assert not (tmp_path / "bad.json").exists()
    assert "never routed" in r.stderr
    assert cli("plan", qwen_saliency, "--sparsity", "0.5", "-o", tmp_path / "again.json").returncode == 0
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "mask.json").read_bytes()
    r = cli("apply", tmp_path / "mask.json", src, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr


def test_apply_with_saliency_plans_inline(checkpoints, qwen_saliency, tmp_path):
    src = checkpoints["qwen3_moe"]
    assert cli("plan", qwen_saliency, "--keep", "4", "--method", "frequency", "-o", tmp_path / "m.json").returncode == 0
    assert cli("apply", tmp_path / "m.json", src, tmp_path / "a", "-q").returncode == 0
    r = cli("apply", qwen_saliency, src, tmp_path / "b", "--keep", "4", "--method", "frequency")
    assert r.returncode == 0, r.stderr
    assert "plan (frequency): keep 4 of 8" in r.stdout
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")  # same mask, same bytes, same card


def test_apply_with_saliency_needs_a_count(checkpoints, qwen_saliency, tmp_path):
    line = refused(cli("apply", qwen_saliency, checkpoints["qwen3_moe"], tmp_path / "out"),
                   "saliency.json", "--sparsity", "--keep")
    assert "saliency file" in line
    assert not (tmp_path / "out").exists()


def test_planning_options_refused_with_a_mask(checkpoints, tmp_path):
    from tests.helpers import write_mask

    src = checkpoints["qwen3_moe"]
    mask = write_mask(src, [0, 1, 2, 3], tmp_path / "m.json")
    refused(cli("apply", mask, src, tmp_path / "out", "--sparsity", "0.5"), "m.json", "--sparsity", "saliency file")
    refused(cli("apply", mask, src, tmp_path / "out", "--preserve", "0:1", "--strict"), "--preserve, --strict")
    assert not (tmp_path / "out").exists()


def test_infeasible_plans_refused_before_any_work(checkpoints, tmp_path):
    src = checkpoints["deepseek_v3"]  # n_group=2, topk_group=1, top_k=2: needs 2 per group
    sal = tmp_path / "s.json"
    for_checkpoint(src).save(sal)
    before = tree_hash(src)
    for args, needles in [
        (("--keep", "2"), ("at least 2 per group",)),
        (("--sparsity", "0.375", "--strict"), ("n_group=2", "drop 2 or 4")),
        (("--keep", "4", "--preserve", "1:0,1:1,1:2"), ("layer 1", "router group 0", "pinned [0, 1, 2]")),
    ]:
        refused(cli("apply", sal, src, tmp_path / "out", *args), "s.json", *needles)
        refused(cli("plan", sal, "-o", tmp_path / "m.json", *args), *needles)
    refused(cli("plan", sal, "-o", tmp_path / "m.json", "--sparsity", "0.9"), "at least 2 per group")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert tree_hash(src) == before
    # rounded, with a note on stderr, when not strict
    r = cli("apply", sal, src, tmp_path / "out", "--sparsity", "0.375", "-q")
    assert r.returncode == 0 and "dropping 2 instead" in r.stderr
    assert Checkpoint.open(tmp_path / "out").num_experts == 6


def mismatched(sal_path, field, value, out):
    data = json.loads(sal_path.read_text())
    data["model"][field] = value
    if field == "num_experts":  # a consistent file for a model with more experts
        for layer in data["layers"].values():
            for key in ("count", "gate_sum", "norm_sum", "reap_sum", "max_activation"):
                layer[key] += [0.0] * (value - len(layer[key]))
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("field,value,shown", [
    ("architecture", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"),
    ("num_experts", 16, "8"),
    ("num_hidden_layers", 61, "3"),
    ("n_group", 8, "2"),
    ("moe_layers", [0, 1, 2], "[1, 2]"),
])
def test_saliency_or_mask_for_another_model_is_refused_naming_the_field(checkpoints, tmp_path, field, value, shown):
    src = checkpoints["deepseek_v3"]
    good = tmp_path / "good.json"
    for_checkpoint(src).save(good)
    bad = mismatched(good, field, value, tmp_path / "other.json")
    for args in (("apply", bad, src, tmp_path / "out", "--sparsity", "0.5"),
                 ("apply", bad, src, tmp_path / "out", "--sparsity", "0.5", "--dry-run"),
                 ("plan", bad, "--sparsity", "0.5", "-o", tmp_path / "m.json", "--ckpt", src)):
        line = refused(cli(*args), "other.json", field, shown)
        assert "does not match" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_mask_planned_on_one_architecture_refused_on_another(checkpoints, tmp_path):
    sal = tmp_path / "qwen.json"
    for_checkpoint(checkpoints["qwen3_moe"]).save(sal)
    assert cli("plan", sal, "--sparsity", "0.5", "-o", tmp_path / "m.json").returncode == 0
    # same family, other expert count / layer count: build variants of the config
    refused(cli("apply", tmp_path / "m.json", checkpoints["mixtral"], tmp_path / "out"), "architecture")
    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen3_moe"], src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts_per_tok"] = 4
    (src / "config.json").write_text(json.dumps(config))
    refused(cli("apply", tmp_path / "m.json", src, tmp_path / "out"), "num_experts_per_tok", "2", "4")
    config["num_experts_per_tok"], config["mlp_only_layers"] = 2, [1]
    (src / "config.json").write_text(json.dumps(config))
    refused(cli("apply", tmp_path / "m.json", src, tmp_path / "out"), "moe_layers")
    assert not (tmp_path / "out").exists()


# -- dry run ------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_writes_nothing(checkpoints, tmp_path):
    src = checkpoints["deepseek_v3"]
    sal = tmp_path / "s.json"
    for_checkpoint(src).save(sal)
    out = tmp_path / "sub" / "out"
    before = tree_hash(tmp_path)
    r = cli("apply", sal, src, out, "--sparsity", "0.5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert tree_hash(tmp_path) == before and not (tmp_path / "sub").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert "dry run: would write" in r.stdout and "nothing was written" in r.stdout
    assert "config.json: n_routed_experts 8 -> 4" in r.stdout
    assert "config.json: num_nextn_predict_layers 1 -> 0" in r.stdout
    assert "model-00001-of-" in r.stdout and "LICENSE" in r.stdout

    # the real run writes what the dry run announced
    r2 = cli("apply", sal, src, out, "--sparsity", "0.5", "-q")
    assert r2.returncode == 0, r2.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert shard in r.stdout
    from reapsurgery.cli.common import human as _human

    assert f"{_human(index['metadata']['total_size'])} (was" in r.stdout
    # a dry run refuses what the real run would refuse
    refused(cli("apply", sal, src, out, "--sparsity", "0.5", "--dry-run"), "not empty")


# -- the fine-tune scenario -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_mask_measured_on_one_model_applies_to_its_fine_tune(checkpoints, tmp_path, family):
    """Plan on A, apply the same mask to B (same architecture, other weights): B pruned exactly."""
    from fixtures.build import build

    a = checkpoints[family]
    sal = tmp_path / "saliency-a.json"
    for_checkpoint(a, seed=11).save(sal)
    assert cli("plan", sal, "--sparsity", "0.5", "--method", "reap", "-o", tmp_path / "mask.json").returncode == 0
    mask = load_mask(tmp_path / "mask.json")
    assert len({tuple(v) for v in mask.layers.values()}) > 1  # layers keep different experts

    b = build(family, tmp_path / "b", seed=7)
    r = cli("apply", tmp_path / "mask.json", b, tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    pruned, info = load(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    reference = pruned_in_memory(b, mask.layers, mask.kept)
    assert torch.equal(logits(pruned), logits(reference))
    assert not torch.equal(logits(pruned), logits(pruned_in_memory(a, mask.layers, mask.kept)))  # B is not A


def test_plan_and_inspect_do_not_import_torch(checkpoints, qwen_saliency, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from reapsurgery.cli import main\n"
        f"for args in (['plan', {str(qwen_saliency)!r}, '--keep', '4', '-o', {str(tmp_path / 'm.json')!r}],\n"
        f"             ['inspect', {str(qwen_saliency)!r}], ['inspect', {str(checkpoints['qwen3_moe'])!r}]):\n"
        "    try: main(args)\n"
        "    except SystemExit as e: assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
