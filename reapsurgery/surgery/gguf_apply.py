"""`apply` on a GGUF model: one file out for one file in, a directory of parts for a split set.

The plan is gguf_plan's; the copy is writer.write_files, as for safetensors; the output appears
only once complete: written in a marked scratch directory beside it and renamed into place
(outdir.staged_file; for a split set, outdir.staged_output).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ..common.gguf_model import GGUFModel
from ..common.mask import Mask
from ..errors import ReapError
from .copier import default_jobs
from .gguf_plan import GGUFPlan, plan_gguf
from .outdir import check_output_dir_of, check_output_file_of, staged_file, staged_output
from .result import ApplyResult
from .writer import write_files


def _open(src: Path, out: Path, overwrite: bool, mtp: str, inputs: list[Path]) -> tuple[GGUFModel, bool]:
    if mtp != "mask":
        raise ReapError(None, f"--mtp {mtp} writes a safetensors draft directory; for a GGUF file, keep its NextN "
                              "blocks pruned with a mask that covers them, or let apply drop them")
    model = GGUFModel.open(src)
    split = len(model.parts) > 1
    inputs = [*inputs, *(p.path for p in model.parts)]
    (check_output_dir_of if split else check_output_file_of)(inputs, out, overwrite)
    return model, split


def apply_gguf(mask: Mask, mask_path: Path, src: Path, out: Path, overwrite: bool = False,
               progress: Callable[[int], None] | None = None, on_plan: Callable[[GGUFPlan], None] | None = None,
               jobs: int | None = None, note: Callable[[str], None] | None = None, mtp: str = "mask",
               inputs: Iterable[str | Path] = ()) -> ApplyResult:
    """Write the pruned GGUF to `out` (a file; a directory of parts for a split set). `inputs`: other
    files the run reads (the output may not be or hold one), besides the mask and the GGUF parts."""
    model, split = _open(src, out, overwrite, mtp, [mask_path, *map(Path, inputs)])
    plan = plan_gguf(model, mask, mask_path, None if split else [out.name])
    if on_plan:
        on_plan(plan)
    jobs = jobs or default_jobs()
    if split:
        with staged_output(out, overwrite, note) as tmp:
            write_files(plan.files, src.parent, tmp, progress, jobs, lambda p: out / p.name)
    else:
        with staged_file(out, overwrite, note) as tmp:
            write_files([replace(plan.files[0], name=tmp.name)], src.parent, tmp.parent, progress, jobs, lambda p: out)
    return ApplyResult(out=out, shards=len(plan.files), bytes_written=plan.total_size, bytes_before=plan.bytes_before,
                       experts_before=plan.experts_before, experts_after=plan.kept, moe_layers=len(plan.moe_layers),
                       dropped_layers=plan.dropped_layers, config_changes=plan.metadata_changes, skipped=[],
                       kept_mtp_layers=plan.kept_mtp_layers, notes=plan.notes, mtp_dropped=plan.mtp_dropped,
                       format="gguf")


def gguf_preview(mask: Mask, mask_path: Path, src: Path, out: Path, overwrite: bool = False,
                 mtp: str = "mask", inputs: Iterable[str | Path] = ()) -> dict[str, Any]:
    """What apply_gguf would write, after the same checks; creates nothing."""
    model, split = _open(src, out, overwrite, mtp, [mask_path, *map(Path, inputs)])
    plan = plan_gguf(model, mask, mask_path, None if split else [out.name])
    return {
        "out": str(out),
        "replaces_existing": out.is_file() or (out.is_dir() and any(out.iterdir())),
        "checkpoint": str(src),
        "experts_before": plan.experts_before,
        "experts_after": plan.kept,
        "moe_layers": len(plan.moe_layers),
        "shards": [{"name": f.name, "source": f.source, "tensors": f.n_tensors, "bytes": f.nbytes}
                   for f in plan.files],
        "bytes": plan.total_size,
        "bytes_before": plan.bytes_before,
        **plan.change_facts(),
        "draft_bytes": None,
        "format": "gguf",
        "written": [],
        "copied": [],
        "skipped": [],
    }
