"""`apply`: write the pruned model, complete or not at all.

Planning (which source bytes go where) is per format: safetensors_plan.py for checkpoint
directories, gguf_plan.py for GGUF files. Writing is shared: writer.py copies the planned ranges
with the parallel copier, into an output that appears only once complete (outdir.py).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable

from ..common.checkpoint import INDEX, Checkpoint, share_derived_layout
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


def other_files(src: Path, handled: set[str]) -> tuple[list[str], list[str]]:
    """The files besides config, index and shards that the output gets (tokenizer, templates, code,
    licence...), and the weight files it does not (we cannot prune them), as relative paths.

    Everything that cannot be listed or copied is an error naming it, never a file quietly missing
    from the output: a directory that cannot be read (os.walk skips those by default), a dangling
    link, a FIFO, socket or device (reading a FIFO waits forever, /dev/zero never ends), a link to a
    directory that holds it (copied forever). Other linked directories are followed."""
    copied, skipped = [], []

    def refuse(e: OSError) -> None:
        raise ReapError(e.filename or src, f"cannot read it ({e.strerror or e}), so the output would lack "
                                           "what it holds; nothing was written") from None

    for root, dirs, files in os.walk(src, onerror=refuse, followlinks=True):
        rel_root = Path(root).relative_to(src)
        real = os.path.realpath(root)
        if any(os.path.realpath(up) == real for up in [src, *(src / p for p in rel_root.parents)][: len(rel_root.parts)]):
            raise ReapError(root, "is a link to a directory that holds it: copying it would never end; "
                                  "nothing was written")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(files):
            rel = str(rel_root / fname)
            if rel in handled or fname.startswith("."):
                continue
            path = Path(root) / fname
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as e:
                refuse(e)
            if not regular:
                raise ReapError(path, "is not a regular file (a FIFO, socket or device), so it cannot be copied "
                                      "into the output; nothing was written")
            (skipped if fname.endswith(WEIGHT_SUFFIXES) else copied).append(rel)
    return copied, skipped


def copy_other_files(src: Path, dst: Path, files: list[str]) -> None:
    """Copy `files` (relative paths, from `other_files`) from src into dst."""
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(src / rel, dst / rel)
        except OSError as e:
            raise ReapError(src / rel, f"cannot copy it ({e.strerror or e}); nothing was written") from None


def source_card(ckpt_path: Path) -> str | None:
    """The source's model card (README.md), which the output's extends; None when there is none."""
    path = ckpt_path / "README.md"
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ReapError(path, f"cannot read the model card: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ReapError(path, f"model card is not UTF-8 text (invalid byte at offset {e.start}); the pruned "
                              "model's card extends it, so save it as UTF-8") from None


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
    inputs: Iterable[str | Path] = (),
) -> ApplyResult:
    """Write the pruned checkpoint to out_path; the output appears only once complete. A GGUF file
    (or a directory holding one GGUF model) is pruned by gguf_apply into a file (a split set: a directory).

    `layout` overrides the built-in layout chosen from config.json (a user's layout file);
    `jobs` copy workers run at once (default: from the CPU count). mtp="keep-full" also writes
    the MTP block unpruned into out_path/mtp-draft (a draft model directory with the source's
    config); "mask" keeps and prunes it only where the mask covers it. `inputs`: other files the
    run reads (a layout file), which OUT may not hold, like the mask and the checkpoint."""
    if mtp not in ("mask", "keep-full"):
        raise ReapError(None, f"--mtp {mtp}: choose mask or keep-full")
    mask_path, out_path = Path(mask_path), Path(out_path)
    gguf = gguf_model_path(ckpt_path)
    if gguf is not None:
        from .gguf_apply import apply_gguf

        return apply_gguf(mask, mask_path, gguf, out_path, overwrite, progress, on_plan, jobs, note, mtp, inputs)
    ckpt = Checkpoint.open(ckpt_path, layout)
    check_output(out_path, overwrite, [mask_path, *map(Path, inputs)], [ckpt.path])
    plan = plan_surgery(ckpt, mask, mask_path, draft=mtp == "keep-full")
    # what else the output gets is known, and readable, before a byte is written
    card = source_card(ckpt.path)
    copied, skipped = other_files(ckpt.path, {"config.json", "README.md", INDEX, *ckpt.shards})
    if on_plan:
        on_plan(plan)
    with staged_output(out_path, overwrite, note) as tmp:
        write_files(plan.shards, ckpt.path, tmp, progress, jobs or default_jobs(), lambda p: out_path / p.name)
        with open(tmp / "config.json", "w") as f:
            json.dump(plan.config, f, indent=2)
            f.write("\n")
        write_card(tmp / "README.md", card, ckpt, mask, plan.experts_before, len(plan.moe_layers), plan.dropped_layers,
                   note)
        (tmp / MASK_COPY).write_bytes(mask.encode())  # inside the staged directory: no file of its own to stage
        handled = rewrite_hf_quant_config(ckpt.path, tmp, ckpt.layout, mask.layers)
        copy_other_files(ckpt.path, tmp, [rel for rel in copied if rel not in handled])
        if plan.index is not None:
            write_index(plan.shards, plan.index, tmp)
        if plan.draft_bytes is not None:
            write_draft(ckpt, tmp / DRAFT_DIR)
    if not (plan.dropped_layers or plan.dropped_prefixes):  # the output stores what derivation reads
        share_derived_layout(ckpt, out_path)
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
