"""`evaluate` reports what the checkpoint `apply` writes would do: every metric equals the one
computed from the original and the apply-written checkpoint loaded whole with from_pretrained."""

from __future__ import annotations

import json
import math

import pytest
import torch

from reapsurgery.calibration.calibrate import make_batches
from reapsurgery.common.checkpoint import Checkpoint
from reapsurgery.common.mask import load_mask
from reapsurgery.evaluation.evaluate import evaluate
from reapsurgery.evaluation.report import table_rows
from reapsurgery.evaluation.masks import sized_variant
from reapsurgery.evaluation.variants import resident
from tests.helpers import apply_leaving_source_untouched, write_mask
from tests.reference import decoder_layers, load, text_model

LENGTHS = [7, 12, 3, 10, 5]
RTOL = 1e-4
# softmax router; group-limited sigmoid router with correction bias (and an MTP layer on disk);
# stacked experts with biases; stacked experts outside ExpertsInterface, multimodal wrapper; experts whose
# own forward applies a per-expert norm [E, H] (sliced with them); a router that also scores zero experts
FAMILIES = {"qwen3_moe": [[0, 2, 3, 5], [1, 6]],
            "deepseek_v3": [[0, 2, 5, 7], [1, 3, 4, 6]],  # n_group=2: the same count kept per group
            "gpt_oss": [[0, 2, 3, 5], [4, 7]],
            "llama4": [[1, 2, 4, 7], [0, 5]],
            "glm_moe_dsa": [[0, 2, 5, 7], [1, 6]],  # its shared indexer: a value handed from layer to layer
            "ergo": [[0, 3, 4, 6], [2, 5]],
            "longcat_flash": [[0, 2, 3, 5], [1, 6]]}  # its router's zero-computation expert rows kept after the routed


def samples(seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (n,), generator=g).tolist() for n in LENGTHS]


def variants_for(src, keeps, tmp_path):
    ckpt = Checkpoint.open(src)
    out = []
    for j, keep in enumerate(keeps):
        path = write_mask(src, keep, tmp_path / f"mask{j}.json")
        mask = load_mask(path)
        out.append(sized_variant(mask, path, str(path), mask.sha256, ckpt))
    return out


def reference(path, batches, quantization_config=None):
    """Log-probs at every predicted position and each decoder layer's output on real positions,
    from the whole model loaded with from_pretrained (dequantised by transformers where
    `quantization_config` says so), on the same padded batches."""
    model, info = load(path, quantization_config)
    assert not info["missing_keys"]  # (a source's MTP layer is unexpected: transformers does not run it)
    outputs = []
    hooks = [l.register_forward_hook(lambda m, a, out, i=i: outputs.append((i, out[0] if isinstance(out, tuple) else out)))
             for i, l in enumerate(decoder_layers(model))]
    logp, layers, targets = [], {}, []
    with torch.no_grad():
        for ids, am in batches:
            outputs.clear()
            logits = text_model(model)(input_ids=ids, attention_mask=am).logits.float()
            real = am.reshape(-1).bool()
            for i, h in outputs:
                layers.setdefault(i, []).append(h.reshape(-1, h.shape[-1])[real].double())
            predicted = am[:, :-1].bool() & am[:, 1:].bool()
            logp.append(torch.log_softmax(logits[:, :-1][predicted], dim=-1).double())
            targets.append(ids[:, 1:][predicted])
    for h in hooks:
        h.remove()
    return torch.cat(logp), torch.cat(targets), {i: torch.cat(v) for i, v in layers.items()}


def perplexity(logp, y) -> float:
    return math.exp(float(-logp.gather(1, y[:, None]).mean()))


@pytest.mark.parametrize("family", [*FAMILIES, "deepseek_v3-fp8"])
def test_metrics_equal_those_of_the_applied_checkpoint(checkpoints, tmp_path, family):
    """fp8: a block-FP8 checkpoint (8x8 blocks: real scale grids, dividing every shape, as transformers
    needs: it derives the block from the grid) is read dequantised; its
    reference is the original and the apply-written (still FP8) output, each loaded by
    transformers with FineGrainedFP8Config(dequantize=True)."""
    src, qc = checkpoints[family.removesuffix("-fp8")], None
    if family.endswith("-fp8"):
        from transformers import FineGrainedFP8Config

        from fixtures.quantize import to_fp8_block

        src, qc = to_fp8_block(src, tmp_path / "fp8", block=(8, 8)), FineGrainedFP8Config(dequantize=True)
    keeps = FAMILIES[family.removesuffix("-fp8")]
    variants = variants_for(src, keeps, tmp_path)
    residency: list[tuple] = []

    def on_layer(i, v, streamed, skeletons):
        distinct = {id(s): s for s in skeletons}  # variants keeping as many experts share one skeleton
        pruned = [(w, l) for w, s in enumerate(skeletons) for l in resident(s) if distinct.pop(id(s), None) is not None]
        residency.append((i, v, streamed.resident_layers(), pruned, resident(skeletons[v]) if v is not None else None))

    result = evaluate(src, variants, samples(), batch_size=2, device="cpu", dtype="float32", on_layer=on_layer)
    report = result.to_json()
    ckpt = Checkpoint.open(src)
    batches = make_batches(samples(), 2)

    lo, y, layers_o = reference(src, batches, qc)
    assert report["original"]["perplexity"] == pytest.approx(perplexity(lo, y), rel=RTOL)
    assert report["data"]["predicted_positions"] == y.numel() == sum(n - 1 for n in LENGTHS)
    assert report["model"] == ckpt.fingerprint()
    assert [v["mask_sha256"] for v in report["variants"]] == [v.sha256 for v in variants]
    for j, (keep, got) in enumerate(zip(keeps, report["variants"])):
        out = tmp_path / f"out{j}"
        apply_leaving_source_untouched(variants[j].mask_path, src, out)
        if qc is not None:
            assert any(info.dtype == "F8_E4M3" for _, info in Checkpoint.open(out).tensors().values())
        lv, yv, layers_v = reference(out, batches, qc)
        assert torch.equal(y, yv)
        kl = float((lo.exp() * (lo - lv)).sum(-1).mean())
        assert got["kl_mean"] == pytest.approx(kl, rel=RTOL, abs=1e-7)
        assert got["top1_agreement"] == float((lo.argmax(-1) == lv.argmax(-1)).double().mean())
        assert got["perplexity"] == pytest.approx(perplexity(lv, yv), rel=RTOL)
        assert got["experts_kept"] == len(keep)
        assert got["sparsity"] == (ckpt.num_experts - len(keep)) / ckpt.num_experts
        written = Checkpoint.open(out).tensors().values()
        assert got["bytes"] == sum(info.nbytes for _, info in written)
        assert got["params"] == sum(math.prod(info.shape) for _, info in written)
        assert sorted(map(int, got["layers"])) == ckpt.moe_layers
        for l, e in got["layers"].items():
            ref = float((layers_v[int(l)] - layers_o[int(l)]).norm() / layers_o[int(l)].norm())
            assert e["relative_error"] == pytest.approx(ref, rel=RTOL, abs=1e-6)
    # memory: at each step only layer i of the original, and at most variant v's copy of it, hold tensors
    n = ckpt.num_hidden_layers
    assert [step[:2] for step in residency] == [(i, v) for i in range(n) for v in [None, *range(len(keeps))]]
    for i, v, original, pruned, mine in residency:
        assert original == [i]
        if v is None or i not in ckpt.moe_layers:
            assert pruned == []
        else:
            assert len(pruned) == 1 and pruned[0][1] == i and mine == [i]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_keeping_every_expert_costs_nothing(checkpoints, tmp_path, family):
    src = checkpoints[family]
    (variant,) = variants_for(src, [list(range(8))], tmp_path)
    report = evaluate(src, [variant], samples(3), batch_size=3, device="cpu", dtype="float32").to_json()
    (got,) = report["variants"]
    assert got["kl_mean"] == pytest.approx(0, abs=1e-9)
    assert got["top1_agreement"] == 1.0
    assert got["perplexity"] == pytest.approx(report["original"]["perplexity"], rel=1e-9)
    assert all(e["relative_error"] == pytest.approx(0, abs=1e-9) for e in got["layers"].values())


def cli(*args):
    """The command line in-process (each subprocess would pay torch's import)."""
    from click.testing import CliRunner

    from reapsurgery.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_both_forms_write_one_report_in_the_order_given(checkpoints, tmp_path):
    src = checkpoints["qwen3_moe"]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in samples(4)))
    sal = tmp_path / "saliency.json"
    assert cli("calibrate", src, "-o", sal, "-q", "--num-samples", 4, "--max-length", 32).exit_code == 0
    mask = write_mask(src, [0, 3, 4, 6], tmp_path / "m.json")
    report = tmp_path / "report.json"
    r = cli("evaluate", src, sal, "--mask", mask, "--sparsity", "0.25,0.5", "--dataset", data, "--batch-size", 2,
            "--dtype", "float32", "-q", "-o", report)
    assert r.exit_code == 0, r.output
    got = json.loads(report.read_text())
    assert got["format"] == "reapsurgery.evaluation" and got["version"] == 1
    assert [v["experts_kept"] for v in got["variants"]] == [4, 6, 4]
    assert got["variants"][0]["mask_sha256"] == load_mask(mask).sha256
    # the planned mask is the one `plan` writes
    planned = tmp_path / "planned.json"
    assert cli("plan", sal, "--sparsity", 0.5, "-o", planned).exit_code == 0
    assert got["variants"][2]["mask_sha256"] == load_mask(planned).sha256
    assert got["data"]["predicted_positions"] == sum(n - 1 for n in LENGTHS)
    assert "saliency.json --method reap --sparsity 0.25" in r.stdout and "original" in r.stdout
    # the same numbers as the library gives for that mask
    (one,) = evaluate(src, variants_for(src, [[0, 3, 4, 6]], tmp_path), samples(4), batch_size=2,
                      device="cpu", dtype="float32").to_json()["variants"]
    assert got["variants"][0]["kl_mean"] == pytest.approx(one["kl_mean"], rel=1e-6)  # other batches: other sums


@pytest.mark.parametrize("args, problem", [
    ((), "nothing to evaluate"),
    (("--sparsity", "0.5"), "need a SALIENCY file"),
    (("--mask", "{other}"), "does not match"),
])
def test_cli_refuses_in_one_line_before_running(checkpoints, tmp_path, args, problem):
    other = write_mask(checkpoints["mixtral"], [0, 1], tmp_path / "other.json")
    report = tmp_path / "report.json"
    r = cli("evaluate", checkpoints["qwen3_moe"], *[a.format(other=other) for a in args], "-o", report)
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and problem in r.output and len(r.output.strip().splitlines()) == 1
    assert not report.exists()


def test_plot_draws_a_png_or_says_what_is_missing(tmp_path, monkeypatch):
    import sys

    from reapsurgery.errors import ReapError
    from reapsurgery.evaluation.report import plot_report

    report = {"model": {"architecture": "X"}, "data": {"predicted_positions": 3},
              "original": {"experts": 8, "bytes": 1 << 20, "perplexity": 2.0},
              "variants": [{"experts_kept": 4, "bytes": 1 << 19, "perplexity": 3.0, "kl_mean": 0.1,
                            "top1_agreement": 0.9}]}
    pytest.importorskip("matplotlib")
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReapError, match=r"pip install 'reapsurgery\[plot\]'"):
        plot_report(report, tmp_path / "q.png")


def mtp_reference(path, batches, scratch):
    """The MTP layers as the draft runs them: transformers' model with them as more decoder layers
    fed the MTP block's inputs (tests/test_mtp.py); logits head(head_norm(out)) from each block's own
    head tensors (the LM head where it has none), read with safetensors. Per depth d: log-probs where
    tokens t and t + d + 1 are real, their targets, and the layer's output where t and t + d are."""
    from tests.test_mtp import (feed_mtp_inputs, layer_style_copy, mtp_as_decoder_layer, mtp_depths, mtp_tensors,
                                norm_like)

    config = mtp_as_decoder_layer(path)
    depths = mtp_depths(config)
    n = config.num_hidden_layers - depths
    model, info = load(layer_style_copy(path, scratch), config=config)
    assert not [k for k in info["missing_keys"] if any(f"layers.{n + d}." in k for d in range(depths))], info
    feed_mtp_inputs(model, path, n, depths)
    seen = {}
    for d in range(1, depths + 1):
        decoder_layers(model)[n + d - 1].register_forward_hook(
            lambda m, a, out, d=d: seen.__setitem__(d, out[0] if isinstance(out, tuple) else out))
    out = {}
    with torch.no_grad():
        for ids, am in batches:
            model(input_ids=ids, attention_mask=am)
            for d in range(1, depths + 1):
                w = mtp_tensors(path, n + d - 1)
                norm, head = norm_like(model, w["head_norm"]), w.get("head", model.get_output_embeddings().weight)
                h = seen[d]
                ahead = am[:, : -d - 1].bool() & am[:, d + 1 :].bool()
                real = torch.zeros_like(am, dtype=torch.bool)
                real[:, :-d] = am[:, :-d].bool() & am[:, d:].bool()
                lp, y, o = out.setdefault(n + d - 1, ([], [], []))
                lp.append(torch.log_softmax((norm(h) @ head.T)[:, : -d - 1][ahead].float(), dim=-1).double())
                y.append(ids[:, d + 1 :][ahead])
                o.append(h[real].double())
    return {l: tuple(torch.cat(x) for x in v) for l, v in out.items()}


def assert_mtp_matches(report, ref_original, ref_variants: dict[int, dict]):
    """report's original and variant `mtp` entries against the reference, per MTP layer."""
    assert sorted(map(int, report["original"]["mtp"])) == sorted(ref_original)
    for l, (lo, y, ho) in ref_original.items():
        orig = report["original"]["mtp"][str(l)]
        assert orig["evaluated"] and orig["predicted_positions"] == y.numel()
        assert orig["perplexity"] == pytest.approx(perplexity(lo, y), rel=RTOL)
        for v, ref in ref_variants.items():
            lv, yv, hv = ref[l]
            got = report["variants"][v]["mtp"][str(l)]
            assert torch.equal(y, yv) and got["evaluated"] and got["predicted_positions"] == y.numel()
            assert got["kl_mean"] == pytest.approx(float((lo.exp() * (lo - lv)).sum(-1).mean()), rel=RTOL, abs=1e-7)
            assert got["top1_agreement"] == float((lo.argmax(-1) == lv.argmax(-1)).double().mean())
            assert got["perplexity"] == pytest.approx(perplexity(lv, yv), rel=RTOL)
            assert got["relative_error"] == pytest.approx(float((hv - ho).norm() / ho.norm()), rel=RTOL, abs=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "qwen3_next"])
def test_mtp_layers_a_mask_keeps_are_run_as_the_applied_checkpoint_drafts(checkpoints, tmp_path, family):
    src = checkpoints[family]
    ckpt = Checkpoint.open(src)
    n = ckpt.num_hidden_layers
    keep_mtp, stack_only = [0, 2, 5, 7], [1, 3, 4, 6]
    paths = [write_mask(src, {l: keep_mtp for l in [*ckpt.moe_layers, n]}, tmp_path / "with_mtp.json"),
             write_mask(src, stack_only, tmp_path / "stack_only.json")]
    variants = [sized_variant(load_mask(p), p, str(p), load_mask(p).sha256, ckpt) for p in paths]
    report = evaluate(src, variants, samples(), batch_size=2, device="cpu", dtype="float32").to_json()
    batches = make_batches(samples(), 2)
    apply_leaving_source_untouched(paths[0], src, tmp_path / "out")
    ref = mtp_reference(src, batches, tmp_path / "src-layers")
    assert list(ref) == [n] and ref[n][1].numel() == sum(max(k - 2, 0) for k in LENGTHS)
    assert list(report["variants"][0]["mtp"]) == [str(n)] and report["original"]["mtp"][str(n)]["depth"] == 1
    assert_mtp_matches(report, ref, {0: mtp_reference(tmp_path / "out", batches, tmp_path / "out-layers")})
    got = report["variants"][0]["mtp"][str(n)]
    # a mask without the MTP layer: apply drops it, so there is no draft to evaluate
    assert report["variants"][1]["mtp"] is None
    assert report["notes"] == []
    rows = table_rows(report)
    assert rows[0][-1] == "MTP top-1 agree" and rows[2][-1] == f"{got['top1_agreement']:.4f}" and rows[3][-1] == "-"


def test_two_mtp_depths_chain_on_each_variants_own_outputs(tmp_path):
    """Depth 2 reads depth 1's output and predicts the token three ahead."""
    from fixtures.build import build

    src = build("glm4_moe", tmp_path / "glm", overrides={"num_nextn_predict_layers": 2})
    ckpt = Checkpoint.open(src)
    n = ckpt.num_hidden_layers
    keep = [0, 2, 5, 7]
    paths = [write_mask(src, {l: keep for l in [*ckpt.moe_layers, n, n + 1]}, tmp_path / "both.json")]
    variants = [sized_variant(load_mask(p), p, str(p), load_mask(p).sha256, ckpt) for p in paths]
    report = evaluate(src, variants, samples(), batch_size=2, device="cpu", dtype="float32").to_json()
    batches = make_batches(samples(), 2)
    apply_leaving_source_untouched(paths[0], src, tmp_path / "out")
    ref = mtp_reference(src, batches, tmp_path / "src-layers")
    assert [report["original"]["mtp"][str(l)]["depth"] for l in (n, n + 1)] == [1, 2]
    assert ref[n + 1][1].numel() == sum(max(k - 3, 0) for k in LENGTHS)
    assert_mtp_matches(report, ref, {0: mtp_reference(tmp_path / "out", batches, tmp_path / "out-layers")})
    assert report["notes"] == []


def test_mtp_layers_that_cannot_run_are_reported_as_not_evaluated(checkpoints, tmp_path):
    """A mask naming an MTP layer on a checkpoint that does not store it (a fine-tune saved by
    transformers): the variant says so, and the note says why."""
    from fixtures.build import build

    src = build("deepseek_v3", tmp_path / "tuned", with_mtp=False)
    ckpt = Checkpoint.open(src)
    n = ckpt.num_hidden_layers
    path = write_mask(checkpoints["deepseek_v3"], {l: [0, 2, 5, 7] for l in [*ckpt.moe_layers, n]}, tmp_path / "m.json")
    report = evaluate(src, [sized_variant(load_mask(path), path, str(path), load_mask(path).sha256, ckpt)], samples(),
                      batch_size=2, device="cpu", dtype="float32").to_json()
    assert report["original"]["mtp"] is None
    (entry,) = report["variants"][0]["mtp"].items()
    assert entry[0] == str(n) and not entry[1]["evaluated"] and "no multi-token-prediction layer on disk" in entry[1]["reason"]
    (note,) = report["notes"]
    assert f"multi-token-prediction layers [{n}] are not evaluated" in note and "no multi-token-prediction layer on disk" in note
    assert "MTP top-1 agree" not in table_rows(report)[0]


def test_fp8_checkpoint_with_its_mtp_layer_evaluates_as_its_dequantised_twin(checkpoints, tmp_path):
    """Block FP8 everywhere, the MTP layer's own head projection too (F8 with its scales): the
    report equals that of the same checkpoint dequantised to F32 on disk."""
    from fixtures.quantize import dequantized_twin, to_fp8_block

    src = to_fp8_block(checkpoints["deepseek_v3"], tmp_path / "fp8", block=(8, 8))
    twin = dequantized_twin(src, tmp_path / "twin")
    n = Checkpoint.open(src).num_hidden_layers
    assert f"model.layers.{n}.shared_head.head.weight_scale_inv" in Checkpoint.open(src).weight_map
    reports = []
    for path in (src, twin):
        ckpt = Checkpoint.open(path)
        mask = write_mask(path, {l: [0, 2, 5, 7] for l in [*ckpt.moe_layers, n]}, tmp_path / f"{path.name}.json")
        variant = sized_variant(load_mask(mask), mask, "m", load_mask(mask).sha256, ckpt)
        reports.append(evaluate(path, [variant], samples(), batch_size=2, device="cpu", dtype="float32").to_json())
    (q,), (t,) = reports[0]["variants"], reports[1]["variants"]
    assert q["mtp"][str(n)]["evaluated"]
    for key in ("perplexity", "kl_mean", "top1_agreement"):
        assert q[key] == pytest.approx(t[key], rel=RTOL)
        assert q["mtp"][str(n)][key] == pytest.approx(t["mtp"][str(n)][key], rel=RTOL)
    assert q["mtp"][str(n)]["relative_error"] == pytest.approx(t["mtp"][str(n)]["relative_error"], rel=RTOL)
    assert reports[0]["original"]["mtp"][str(n)]["perplexity"] == \
        pytest.approx(reports[1]["original"]["mtp"][str(n)]["perplexity"], rel=RTOL)
    assert q["bytes"] < t["bytes"]  # sized as the FP8 checkpoint apply writes
