"""What `apply --dry-run` reports: the output apply would write, after the same checks, creating nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..common.checkpoint import INDEX, Checkpoint
from ..common.layouts import Layout
from ..common.mask import Mask
from .apply import MASK_COPY, other_files
from .safetensors_plan import plan_surgery
from .outdir import check_output


def apply_preview(mask: Mask, mask_path: str | Path, ckpt_path: str | Path, out_path: str | Path,
                  overwrite: bool = False, layout: Layout | None = None, mtp: str = "mask",
                  inputs: Iterable[str | Path] = ()) -> dict[str, Any]:
    """What `apply` would write to out_path, after the same checks; creates nothing."""
    ckpt = Checkpoint.open(ckpt_path, layout)
    out_path = Path(out_path)
    check_output(out_path, overwrite, [Path(mask_path), *map(Path, inputs)], [ckpt.path])
    plan = plan_surgery(ckpt, mask, Path(mask_path), draft=mtp == "keep-full")
    copied, skipped = other_files(ckpt.path, {"config.json", "README.md", INDEX, *ckpt.shards})
    writes_index = plan.index is not None
    return {
        "out": str(out_path),
        "replaces_existing": out_path.is_dir() and any(out_path.iterdir()),
        "checkpoint": str(ckpt.path),
        "experts_before": plan.experts_before,
        "experts_after": plan.kept,
        "moe_layers": len(plan.moe_layers),
        "shards": [{"name": s.name, "source": s.source, "tensors": len(s.tensors), "bytes": s.nbytes}
                   for s in plan.shards],
        "bytes": plan.total_size,
        "bytes_before": plan.bytes_before,
        **plan.change_facts(),
        "draft_bytes": plan.draft_bytes,
        "written": ["config.json", "README.md", MASK_COPY] + ([INDEX] if writes_index else []),
        "copied": copied,
        "skipped": skipped,
    }
