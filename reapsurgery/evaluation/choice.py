"""The mask chosen by measurement: a variant of an evaluation report, planned again from its saliency.

`plan SALIENCY --from-evaluation report.json --sparsity F` (or `--max-kl X`) and `apply` with the same
options pick a variant `evaluate` measured and make its mask again from SALIENCY with the planning
options the report recorded ("made"). The result is checked to be the very mask measured (its
sha256), so what is written is what was evaluated. No torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.files import read_bytes, loads_strict
from ..common.mask import check_fingerprint
from ..errors import ReapError
from .masks import made_options
from .report import EVALUATION_FORMAT

if TYPE_CHECKING:
    from ..common.layouts import Layout
    from ..plan import Plan

# --metric: the report's key, and whether higher is better
METRICS = {"kl": ("kl_mean", False), "perplexity": ("perplexity", False), "top1": ("top1_agreement", True)}


def load_report(path: str | Path) -> tuple[dict, str]:
    """An evaluation report (strictly parsed, format checked) and its sha256."""
    raw = read_bytes(path, "evaluation report")
    report = loads_strict(raw, path, "evaluation report")
    if not isinstance(report, dict) or report.get("format") != EVALUATION_FORMAT:
        found = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise ReapError(path, f"is not an evaluation report ('format' is {found!r}; expected {EVALUATION_FORMAT!r}, "
                              "as `reapsurgery evaluate -o` writes)")
    variants = report.get("variants")
    if (not isinstance(variants, list) or not isinstance(report.get("model"), dict)
            or not all(isinstance(v, dict) for v in variants)):
        raise ReapError(path, "evaluation report without 'model' and a list of 'variants'")
    for i, v in enumerate(variants):
        missing = [k for k in ("source", "experts_kept", "kl_mean", "perplexity", "top1_agreement", "mask_sha256")
                   if k not in v]
        if missing:
            raise ReapError(path, f"variant {i} has no {', '.join(missing)}")
    return report, hashlib.sha256(raw).hexdigest()


def _value(v: dict, key: str) -> float:
    """A variant's number; null (a perplexity past the float range) as infinity."""
    return math.inf if v[key] is None else v[key]


def _better(metric: str):
    """Sort key: lower is better."""
    key, higher = METRICS[metric]
    return lambda v: (-_value(v, key) if higher else _value(v, key))


def choose_variant(report: dict, path: Path, saliency, saliency_path: Path, *, sparsity: float | None = None,
                   keep: int | None = None, max_kl: float | None = None, metric: str = "kl") -> tuple[dict, str, list[str]]:
    """The variant to plan again: the best by `metric` among those keeping what --sparsity/--keep keeps,
    or the sparsest with kl_mean <= max_kl (ties: the best by `metric`); only variants planned from
    this saliency are candidates. Returns it, the rule in words, and notes."""
    from ..plan import drop_count

    if metric not in METRICS:
        raise ReapError(None, f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if (max_kl is None) == (sparsity is None and keep is None) or (sparsity is not None and keep is not None):
        raise ReapError(None, "with --from-evaluation give one of --sparsity F or --keep N (the best variant "
                              "measured there) or --max-kl X (the sparsest variant within that KL)")
    check_fingerprint(report["model"], saliency.model, path, saliency_path)
    variants = report["variants"]
    planned = [v for v in variants if isinstance(v.get("made"), dict) and "saliency_sha256" in v["made"]]
    if not planned:
        raise ReapError(path, "has no variant planned from a saliency file (only mask files, or a report from an "
                              "older reapsurgery): evaluate with SALIENCY --sparsity/--method to measure plannable masks")
    ours = [v for v in planned if v["made"]["saliency_sha256"] == saliency.sha256]
    if not ours:
        theirs = sorted({v["made"]["saliency_sha256"][:12] for v in planned})
        raise ReapError(path, f"its masks were planned from another saliency file (sha256 {', '.join(theirs)}), not "
                              f"{saliency_path} (sha256 {saliency.sha256[:12]}): they cannot be reproduced from it")
    key, _ = METRICS[metric]
    better = _better(metric)
    E = saliency.model["num_experts"]
    if max_kl is not None:
        pool = [v for v in ours if v["kl_mean"] <= max_kl]
        if not pool:
            least = min(ours, key=lambda v: v["kl_mean"])
            raise ReapError(path, f"no variant planned from {saliency_path.name} is within --max-kl {max_kl}: the "
                                  f"lowest KL measured is {least['kl_mean']:.4g} ({least['source']})")
        fewest = min(v["experts_kept"] for v in pool)
        pool = [v for v in pool if v["experts_kept"] == fewest]
        rule = f"the sparsest variant with kl_mean <= {max_kl}" + (f", the best {key} of {len(pool)}" if len(pool) > 1 else "")
    else:
        kept = E - drop_count(E, sparsity, keep)
        pool = [v for v in ours if v["experts_kept"] == kept]
        if not pool:
            measured = sorted({v["experts_kept"] for v in ours}, reverse=True)
            asked = f"--keep {keep}" if keep is not None else f"--sparsity {sparsity}"
            raise ReapError(path, f"no variant planned from {saliency_path.name} keeps {kept} of {E} experts ({asked}); "
                                  f"measured: {', '.join(f'{k} kept' for k in measured)}")
        rule = f"the best {key} of {len(pool)} variant{'s' if len(pool) > 1 else ''} keeping {kept} of {E} experts"
    chosen = min(pool, key=better)  # min is stable: among equals the first in the report
    candidates = {id(v) for v in ours}
    notes = [f"{v['source']} measured better ({key} {_value(v, key):.4g} against {_value(chosen, key):.4g}) but was not planned "
             f"from {saliency_path.name}: apply it as a mask file if it is what you want"
             for v in variants if id(v) not in candidates and v["experts_kept"] == chosen["experts_kept"]
             and better(v) < better(chosen)]
    return chosen, rule, notes


def plan_from_evaluation(saliency_path: str | Path, report_path: str | Path, ckpt_path: str | Path | None = None,
                         layout: "Layout | None" = None, *, sparsity: float | None = None, keep: int | None = None,
                         max_kl: float | None = None, metric: str = "kl") -> "Plan":
    """The plan of the variant the report measured best (choose_variant), made again from the saliency
    with the options it was made with, checked to be that mask; its provenance names the report."""
    from ..common.saliency import load_saliency
    from ..plan import mask_bytes, plan_from_saliency

    saliency_path, report_path = Path(saliency_path), Path(report_path)
    saliency = load_saliency(saliency_path)
    report, report_sha = load_report(report_path)
    chosen, rule, notes = choose_variant(report, report_path, saliency, saliency_path, sparsity=sparsity, keep=keep,
                                         max_kl=max_kl, metric=metric)
    try:
        options = made_options(chosen["made"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ReapError(report_path, f"variant {chosen['source']!r}: its 'made' record is incomplete") from None
    planned = plan_from_saliency(saliency, saliency_path, ckpt_path, layout, **options)
    measured = chosen["mask_sha256"]
    if hashlib.sha256(mask_bytes(planned.mask)).hexdigest() != measured:
        raise ReapError(report_path, f"variant {chosen['source']!r}: planning it again from {saliency_path} gives "
                                     f"another mask than the one measured (sha256 {measured[:12]}); was the report "
                                     "made by another version of reapsurgery?")
    key, _ = METRICS[metric]
    provenance = {**planned.mask.provenance, "chosen_by": {
        "evaluation": str(report_path), "evaluation_sha256": report_sha, "metric": key, "rule": rule,
        "variant": chosen["source"], "measured": {k: chosen[k] for k in ("kl_mean", "perplexity", "top1_agreement")},
        "measured_mask_sha256": measured}}
    mask = replace(planned.mask, provenance=provenance)
    mask = replace(mask, sha256=hashlib.sha256(mask_bytes(mask)).hexdigest())
    chosen_note = (f"chosen from {report_path}: {chosen['source']}, {rule} (measured: KL {chosen['kl_mean']:.4g}, "
                   f"perplexity {_value(chosen, 'perplexity'):.4g}, top-1 agreement {chosen['top1_agreement']:.4g})")
    return replace(planned, mask=mask, notes=[chosen_note, *notes, *planned.notes])
