"""`reapsurgery apply` and `verify`: the surgery stage's commands."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from ..common.checkpoint import HUB_ID
from ..errors import ReapError
from .common import (CHOICE_FLAGS, EXIT_BAD_INPUT, OUTPUT, PLAN_FLAGS, choice_options, echo_mtp, echo_plan, emit_json,
                     human, json_option, layout_from, layout_option, one_line_errors, plan_facts, plan_from_options,
                     plan_options, table)
from .progress import echo_above_bars, progress_bars


def _echo_notes(notes: list[str]) -> None:
    """With --json, the notes that the text output prints among its facts go to stderr."""
    for note in notes:
        echo_above_bars(f"note: {note}")


# what a format calls its output files and where the changed settings are
WORDS = {"safetensors": ("shard", "config.json"), "gguf": ("file", "metadata")}


def _echo_preview(p: dict) -> None:
    unit, where = WORDS[p.get("format", "safetensors")]
    click.echo(
        f"dry run: would write {p['out']}: {p['experts_before']} -> {p['experts_after']} experts in "
        f"{p['moe_layers']} MoE layers, {len(p['shards'])} {unit}(s), {human(p['bytes'])} "
        f"(was {human(p['bytes_before'])}); nothing was written"
    )
    table([(unit, "from", "tensors", "bytes")] +
           [(s["name"], s["source"], s["tensors"], human(s["bytes"])) for s in p["shards"]])
    for key, (old, new) in p["config_changes"].items():
        click.echo(f"  {where}: {key} {old} -> {new}")
    echo_mtp(p["mtp_dropped"], p["kept_mtp_layers"], p["notes"], True, "  ", p["draft_bytes"])
    if p["written"]:
        click.echo(f"  would write: {' '.join(p['written'])}")
    if p["copied"]:
        click.echo(f"  would copy: {' '.join(p['copied'])}")
    for path in p["skipped"]:
        click.echo(f"  would not copy (weights reapsurgery does not prune): {path}")
    if p["replaces_existing"]:
        click.echo(f"  would replace the existing contents of {p['out']} (--overwrite)")


ORDER = "the order is `reapsurgery apply MASK_OR_SALIENCY CKPT OUT`"


def check_order(mask: Path, ckpt: Path, out: Path, gguf: bool = False) -> None:
    """Arguments given in another order (a checkpoint as MASK, a mask as CKPT, the checkpoint as OUT)
    refused with the order, before any message about what the misplaced file is not. `gguf`: CKPT is
    a GGUF model (a file)."""
    if mask.is_dir():
        raise ReapError(mask, f"is a directory, not a mask or saliency file; {ORDER}")
    if ckpt.is_file() and not gguf:
        raise ReapError(ckpt, f"is a file, not a checkpoint directory; {ORDER}")
    if not ckpt.exists() and not HUB_ID.match(str(ckpt)) and (out / "config.json").is_file():
        raise ReapError(ckpt, f"does not exist (and OUT {out} is a checkpoint: arguments in the wrong order? {ORDER})")


@click.command()
@click.argument("mask", metavar="MASK_OR_SALIENCY", type=click.Path(path_type=Path))
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out", type=OUTPUT)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--jobs", "-j", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Copies in flight at once (worker threads); default one per CPU, between 2 and 8. "
                   "Fast NVMe drives reach their bandwidth only with several requests outstanding.")
@click.option("--dry-run", is_flag=True,
              help="Print what would be written (shards, bytes, config changes) and write nothing, not even OUT.")
@click.option("--mtp", "mtp", type=click.Choice(["mask", "keep-full"]), default="mask", show_default=True,
              help="Multi-token-prediction block: 'mask' prunes and keeps it where the mask covers it (saliency "
                   "from `calibrate --mtp calibrate`), else drops it; 'keep-full' also writes it unpruned, with "
                   "the source's config, to OUT/mtp-draft/ (kept byte for byte; vLLM does not draft with it "
                   "beside a pruned trunk: keep the block pruned for that).")
@plan_options
@choice_options
@layout_option
@json_option
@one_line_errors
def apply(mask: Path, ckpt: Path, out: Path, overwrite: bool, quiet: bool, jobs: int | None, dry_run: bool, mtp: str,
          layout_file: Path | None, as_json: bool, **opts) -> None:
    """Write CKPT into OUT with only the experts that MASK_OR_SALIENCY keeps.

    MASK_OR_SALIENCY is a mask.json, or a saliency.json together with --sparsity
    or --keep (and the other options of `reapsurgery plan`) to plan the mask
    here, or --from-evaluation REPORT to plan the variant an evaluation measured
    best (as `reapsurgery plan` does); the mask used is stored in OUT either way.

    Streams the safetensors shards once, copying byte ranges: dropped experts'
    tensors are left out, retained ones renumbered 0..E'-1 in their original
    order, routers and stacked expert tensors sliced. config.json, the index and
    the model card are rewritten; other files are copied. CKPT is never written,
    and OUT appears only once complete.

    CKPT may also be a GGUF file (any quant; a split set by its first part,
    NAME-00001-of-0000N.gguf): OUT is then the pruned .gguf file (a directory of
    as many parts for a split set), its metadata rewritten and the mask recorded
    in it (reapsurgery.mask, reapsurgery.mask_sha256).
    """
    from ..common.files import read_bytes, loads_strict
    from ..common.gguf_file import gguf_model_path
    from ..common.mask import MASK_FORMAT, parse_mask
    from ..common.saliency import SALIENCY_FORMAT
    from ..surgery.apply import apply_mask

    gguf = gguf_model_path(ckpt)
    check_order(mask, ckpt, out, gguf is not None)
    if layout_file is not None and gguf is not None:
        raise ReapError(layout_file, "--layout describes a safetensors checkpoint's tensors; a GGUF file needs none "
                                     "(its expert tensors are known by llama.cpp's names)")
    layout = layout_from(layout_file)
    raw = read_bytes(mask, "mask or saliency file")
    data = loads_strict(raw, mask, "mask or saliency file")
    kind = data.get("format") if isinstance(data, dict) else None
    if kind not in (MASK_FORMAT, SALIENCY_FORMAT):
        raise ReapError(mask, f"is not a mask or saliency file ('format' is {kind!r}; expected "
                              f"{MASK_FORMAT!r} or {SALIENCY_FORMAT!r})")
    if kind == SALIENCY_FORMAT:
        if opts["sparsity"] is None and opts["keep"] is None and opts["max_kl"] is None:
            raise ReapError(mask, "is a saliency file: pass --sparsity F or --keep N to choose how many experts "
                                  "to keep (or make a mask with `reapsurgery plan` first)")
        planned = plan_from_options(mask, ckpt, layout, opts)
        chosen = planned.mask
    else:
        given = [flag for key, flag in {**PLAN_FLAGS, **CHOICE_FLAGS}.items() if opts[key] not in (None, False)]
        if given:
            raise ReapError(mask, f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to a "
                                  "saliency file; this is a mask (its experts are already chosen)")
        import hashlib

        chosen = parse_mask(data, mask, hashlib.sha256(raw).hexdigest())
        planned = None

    if dry_run:
        if gguf is not None:
            from ..surgery.gguf_apply import gguf_preview

            preview = gguf_preview(chosen, mask, gguf, out, overwrite=overwrite, mtp=mtp,
                                   inputs=[p for p in (layout_file, opts["from_evaluation"]) if p])
        else:
            from ..surgery.preview import apply_preview

            preview = apply_preview(chosen, mask, ckpt, out, overwrite=overwrite, layout=layout, mtp=mtp,
                                    inputs=[p for p in (layout_file, opts["from_evaluation"]) if p])
        if planned:
            echo_plan(planned, with_table=not as_json)
        if as_json:
            _echo_notes(preview["notes"])
            emit_json({"dry_run": True, **preview, "plan": plan_facts(planned) if planned else None})
        else:
            _echo_preview(preview)
        return

    total = 0
    bar = None
    bars = progress_bars(quiet)

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first write, so refusals print nothing but the error
            bar = bars(total=total, unit="B", unit_scale=True, desc="writing shards")
        bar.update(n)

    def on_plan(plan) -> None:  # called once every check has passed, before anything is written
        nonlocal total
        total = plan.total_size
        if planned:
            echo_plan(planned, with_table=not quiet and not as_json)

    try:
        result = apply_mask(chosen, mask, ckpt, out, overwrite=overwrite, progress=progress if bars else None,
                            on_plan=on_plan,
                            layout=layout, jobs=jobs, mtp=mtp, note=lambda text: echo_above_bars(f"note: {text}"),
                            inputs=[p for p in (layout_file, opts["from_evaluation"]) if p])
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        _echo_notes(result.notes)
        emit_json({"dry_run": False, **dataclasses.asdict(result), "plan": plan_facts(planned) if planned else None})
        return
    unit, where = WORDS[result.format]
    click.echo(
        f"wrote {result.out}: {result.experts_before} -> {result.experts_after} experts in "
        f"{result.moe_layers} MoE layers, {result.shards} {unit}(s), "
        f"{human(result.bytes_written)} (was {human(result.bytes_before)})"
    )
    for key, (old, new) in result.config_changes.items():
        click.echo(f"  {where}: {key} {old} -> {new}")
    echo_mtp(result.mtp_dropped, result.kept_mtp_layers, result.notes, False, "  ", result.draft_bytes)
    for path in result.skipped:
        click.echo(f"  not copied (weights reapsurgery does not prune): {path}")


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@layout_option
@json_option
@one_line_errors
def verify(ckpt: Path, layout_file: Path | None, as_json: bool) -> None:
    """Check that a checkpoint's index, shard headers, expert tensors and config agree.

    CKPT may be a GGUF file (a split set by its first part, or the directory apply wrote it to):
    its header as llama.cpp reads it, expert counts against shapes, NextN and size-label metadata.
    Exit code 0 when they agree; otherwise every problem is an `error:` line and the exit code is 2
    (with --json, the report, "ok": false and its problems, is printed as well)."""
    from ..surgery.verify import verify as run_verify

    report = run_verify(ckpt, layout_from(layout_file))
    if as_json:
        emit_json({"ok": report.ok, **dataclasses.asdict(report)})
    if not report.ok:
        for problem in report.problems:  # each names its file
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if as_json:
        return
    click.echo(
        f"ok: {ckpt}: {report.tensors} tensors in {report.shards} {WORDS[report.format][0]}(s), "
        f"{human(report.total_size)}, {report.moe_layers} MoE layers with {report.num_experts} experts each"
    )
