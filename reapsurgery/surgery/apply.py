"""`apply`: write the pruned model, complete or not at all.

Planning (which source bytes go where) is per format: safetensors_plan.py for checkpoint
directories, gguf_plan.py for GGUF files. Writing is shared: writer.py copies the planned ranges
with the parallel copier, into an output that appears only once complete (outdir.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..common.checkpoint import INDEX, Checkpoint
from ..common.gguf_file import gguf_model_path
from ..common.layouts import Layout
from ..common.mask import Mask
from ..common.quant import rewrite_hf_quant_config
from ..errors import ReapError
from .copier import default_jobs
from .draft import DRAFT_DIR, write_draft
from .modelcard import write_card
from .outconfig import write_index
from .outdir import check_output, staged_output
from .result import ApplyResult
from .safetensors_plan import SurgeryPlan, plan_surgery
from .writer import write_files

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
MASK_COPY = "reapsurgery.mask.json"


def copy_other_files(src: Path, dst: Path, handled: set[str]) -> list[str]:
    """Copy tokenizer, templates, code, licence...; skip weight files we cannot prune. Returns skipped paths."""
    skipped = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(src)
        for fname in sorted(files):
            rel = rel_root / fname
            if str(rel) in handled or fname.startswith("."):
                continue
            if fname.endswith(WEIGHT_SUFFIXES):
                skipped.append(str(rel))
                continue
            (dst / rel_root).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / fname, dst / rel)
    return skipped


def apply_mask(
    mask: Mask,
    mask_path: str | Path,
    ckpt_path: str | Path,
    out_path: str | Path,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[SurgeryPlan], None] | None = None,
    layout: Layout | None = None,
    jobs: int | None = None,
    note: Callable[[str], None] | None = None,
    mtp: str = "mask",
) -> ApplyResult:
    """Write the pruned checkpoint to out_path; the output appears only once complete. A GGUF file
    (or a directory holding one GGUF model) is pruned by gguf_apply into a file (a split set: a directory).

    `layout` overrides the built-in layout chosen from config.json (a user's layout file);
    `jobs` copy workers run at once (default: from the CPU count). mtp="keep-full" also writes
    the MTP block unpruned into out_path/mtp-draft (a draft model directory with the source's
    config); "mask" keeps and prunes it only where the mask covers it."""
    if mtp not in ("mask", "keep-full"):
        raise ReapError(None, f"--mtp {mtp}: choose mask or keep-full")
    mask_path, out_path = Path(mask_path), Path(out_path)
    gguf = gguf_model_path(ckpt_path)
    if gguf is not None:
        from .gguf_apply import apply_gguf

        return apply_gguf(mask, mask_path, gguf, out_path, overwrite, progress, on_plan, jobs, note, mtp)
    ckpt = Checkpoint.open(ckpt_path, layout)
    check_output(ckpt.path, out_path, overwrite)
    plan = plan_surgery(ckpt, mask, mask_path, draft=mtp == "keep-full")
    if on_plan:
        on_plan(plan)
    with staged_output(out_path, overwrite, note) as tmp:
        write_files(plan.shards, ckpt.path, tmp, progress, jobs or default_jobs(), lambda p: out_path / p.name)
        with open(tmp / "config.json", "w") as f:
            json.dump(plan.config, f, indent=2)
            f.write("\n")
        write_card(tmp / "README.md", ckpt, mask, plan.experts_before, len(plan.moe_layers), plan.dropped_layers, note)
        mask.save(tmp / MASK_COPY)
        handled = {"config.json", "README.md", INDEX, *ckpt.shards}
        handled |= rewrite_hf_quant_config(ckpt.path, tmp, ckpt.layout, mask.layers)
        skipped = copy_other_files(ckpt.path, tmp, handled)
        if plan.index is not None:
            write_index(plan.shards, plan.index, tmp)
        if plan.draft_bytes is not None:
            write_draft(ckpt, tmp / DRAFT_DIR)
    return ApplyResult(
        out=Path(out_path),
        shards=len(plan.shards),
        bytes_written=plan.total_size,
        bytes_before=plan.bytes_before,
        experts_before=plan.experts_before,
        experts_after=plan.kept,
        moe_layers=len(plan.moe_layers),
        dropped_layers=plan.dropped_layers,
        config_changes=plan.config_changes,
        skipped=skipped,
        dropped_prefixes=plan.dropped_prefixes,
        kept_mtp_layers=plan.kept_mtp_layers,
        notes=plan.notes,
        mtp_dropped=plan.mtp_dropped,
        draft_bytes=plan.draft_bytes,
    )
