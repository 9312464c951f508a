"""The masks an evaluation compares, each checked against the checkpoint and sized as `apply` would
write it, with a record of how it was made. No torch: `evaluate` refuses a bad mask, option or plan
before the model is touched."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..common.checkpoint import Checkpoint
from ..common.mask import Mask
from ..inspect import mask_size


@dataclass
class Variant:
    """One mask to evaluate; `label` says where it came from (a file, or saliency + options) and
    `made` records it as data (report.json's "made": what `plan --from-evaluation` replans)."""

    mask: Mask
    mask_path: Path
    label: str
    sha256: str
    size: dict = field(default_factory=dict)  # inspect.mask_size: params and bytes before/after
    made: dict = field(default_factory=dict)

    @property
    def experts_kept(self) -> int:
        return self.mask.kept


def sized_variant(mask: Mask, mask_path: str | Path, label: str, sha256: str, ckpt: Checkpoint,
                  made: dict | None = None) -> Variant:
    """Check the mask against the checkpoint (apply's own checks) and size what apply would write."""
    size = mask_size(mask, mask_path, ckpt.path, ckpt.layout)
    return Variant(mask, Path(mask_path), label, sha256, size,
                   made if made is not None else {"mask_file": str(mask_path), "mask_sha256": sha256})


def plan_made(saliency_path: str | Path, saliency_sha256: str, method: str, request: tuple[str, float | int],
              options: dict) -> dict:
    """How a planned variant was made: everything plan_mask needs to make it again."""
    key, value = request
    return {"saliency": str(saliency_path), "saliency_sha256": saliency_sha256, "method": method, key: value,
            "preserve_super_experts": bool(options.get("preserve_super_experts")),
            "preserve_outliers": bool(options.get("preserve_outliers")),
            "pins": {str(l): sorted(v) for l, v in sorted((options.get("pins") or {}).items())},
            "strict": bool(options.get("strict"))}


def made_options(made: dict) -> dict:
    """plan_mask's keyword arguments from a "made" record (plan_made's inverse)."""
    return {"method": made["method"], "sparsity": made.get("sparsity"), "keep": made.get("keep"),
            "preserve_super_experts": made["preserve_super_experts"], "preserve_outliers": made["preserve_outliers"],
            "pins": {int(l): set(v) for l, v in made["pins"].items()}, "strict": made["strict"]}


def planned_variants(saliency_path: Path, ckpt: Checkpoint, methods: list[str], requests: list[tuple[str, float | int]],
                     options: dict) -> tuple[list[Variant], list]:
    """Every method x (--sparsity/--keep value) planned as `plan` would, sparsity-major: the variants
    and their plans (for their notes). `options` are plan_mask's other keyword arguments."""
    from ..common.saliency import load_saliency
    from ..plan import mask_bytes, plan_for_checkpoint

    saliency = load_saliency(saliency_path)
    variants, plans = [], []
    for key, value in requests:
        for method in methods:
            planned = plan_for_checkpoint(saliency, saliency_path, ckpt, **{**options, "method": method,
                                                                          "sparsity": None, "keep": None, key: value})
            plans.append(planned)
            sha = hashlib.sha256(mask_bytes(planned.mask)).hexdigest()
            label = f"{saliency_path.name} --method {method} --{key} {value}"
            variants.append(sized_variant(planned.mask, saliency_path, label, sha, ckpt,
                                          plan_made(saliency_path, saliency.sha256, method, (key, value), options)))
    return variants, plans
