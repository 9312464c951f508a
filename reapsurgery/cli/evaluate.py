"""`reapsurgery evaluate`: what each mask costs in quality, before any checkpoint is written."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ReapError
from .common import (OUTPUT, PLAN_FLAGS, data_options, emit_json, human, json_option, layout_from, layout_option,
                     load_data, one_line_errors, overwrite_option, plan_kwargs, plan_options, run_options, table)
from .progress import note, progress_bars


def _values(text: str | None, flag: str, kind: type) -> list:
    if text is None:
        return []
    try:
        return [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ReapError(None, f"{flag} {text}: expected comma-separated {'numbers' if kind is float else 'integers'}") from None


def _methods(text: str | None) -> list[str]:
    """--method M[,M...]: each one of plan's methods, each once."""
    from ..plan import METHODS

    methods = [m.strip() for m in (text or "reap").split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ReapError(None, f"--method {text}: {', '.join(map(repr, unknown)) or 'no method given'}; "
                              f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _variants(ckpt, saliency: Path | None, masks: tuple[Path, ...], opts: dict) -> list:
    """Every variant, checked against the opened checkpoint and sized, before the model is touched."""
    from ..common.mask import load_mask
    from ..evaluation.masks import planned_variants, sized_variant

    requests = [("sparsity", s) for s in _values(opts["sparsity"], "--sparsity", float)]
    requests += [("keep", k) for k in _values(opts["keep"], "--keep", int)]
    if saliency is None:
        given = [flag for key, flag in PLAN_FLAGS.items() if opts[key] not in (None, False)]
        if given:
            raise ReapError(None, f"{', '.join(given)}: planning options need a SALIENCY file")
        if not masks:
            raise ReapError(None, "nothing to evaluate: give --mask FILE (repeatable), or SALIENCY with --sparsity/--keep")
    elif not requests:
        raise ReapError(saliency, "pass --sparsity F[,F...] or --keep N[,N...] to plan masks from this saliency file")
    methods = _methods(opts["method"])
    out = [sized_variant(m, p, str(p), m.sha256, ckpt) for p in masks for m in [load_mask(p)]]
    if saliency is None:
        return out
    options = {k: v for k, v in plan_kwargs(opts).items() if k not in ("sparsity", "keep", "method")}
    planned, plans = planned_variants(saliency, ckpt, methods, requests, options)
    for line in dict.fromkeys(n for p in plans for n in p.notes):  # each once, not once per method
        note(f"note: {line}")
    return out + planned


def _check_outputs(ckpt_dir: Path, saliency: Path | None, masks: tuple[Path, ...], layout_file: Path | None,
                   dataset: str | None, output: Path | None, plot: Path | None, overwrite: bool) -> None:
    """-o and --plot: not onto an input or into the checkpoint, not one file, not over a file unless --overwrite."""
    from ..common.files import check_output_file, input_clash

    inputs = [p for p in (saliency, *masks, layout_file, Path(dataset) if dataset else None) if p and p.exists()]
    dirs = [ckpt_dir] if ckpt_dir.is_dir() else []
    if output is not None:
        check_output_file(output, inputs, dirs, "-o", overwrite)
    if plot is not None:
        if output is not None and input_clash(plot, [output]):
            raise ReapError(plot, "--plot and -o name the same file; give each its own")
        check_output_file(plot, inputs, dirs, "--plot", overwrite)


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("saliency", required=False, type=click.Path(path_type=Path))
@click.option("--mask", "masks", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="A mask.json to evaluate; repeat for several (evaluated in the order given, before planned ones).")
@click.option("-o", "--output", type=OUTPUT, help="Where to write report.json.")
@click.option("--plot", type=OUTPUT, metavar="FILE.png",
              help="Draw KL, top-1 agreement and perplexity against checkpoint size (needs reapsurgery[plot]).")
@plan_options(lists=True)
@data_options
@run_options
@layout_option
@overwrite_option
@json_option
@one_line_errors
def evaluate(ckpt: Path, saliency: Path | None, masks: tuple[Path, ...], output: Path | None, plot: Path | None,
             dataset: str | None, text_field: str | None, num_samples: int, max_length: int, seed: int,
             batch_size: int, device: str, dtype: str, trust_remote_code: bool, quiet: bool,
             layout_file: Path | None, overwrite: bool, as_json: bool, **opts) -> None:
    """Measure what pruning CKPT with each mask would cost, without writing a checkpoint.

    \b
      reapsurgery evaluate ckpt/ --mask a.json --mask b.json --dataset held_out.jsonl -o report.json
      reapsurgery evaluate ckpt/ saliency.json --sparsity 0.25,0.5,0.625 --dataset held_out.jsonl

    One layer-streamed pass: each decoder layer is read once and run for the original model
    and, for each mask, as the pruned checkpoint `apply` would write runs it (the module built
    for the pruned expert count, with sliced routers, biases and experts). Reports, on the
    next-token predictions of the data (padding excluded), perplexity, mean KL(original ||
    pruned) in nats and top-1 agreement with the original; the pruned checkpoint's params and
    bytes; and per MoE layer the relative error of its output. Use held-out data, not the
    calibration set. Data, device and dtype options are calibrate's.
    """
    from ..calibration.preflight import check_device
    from ..common.checkpoint import Checkpoint, resolve_checkpoint
    from ..evaluation.report import plot_format, plot_report, save_report, table_rows

    # every check that needs no torch first (importing it takes seconds): a refusal costs nothing
    check_device(device)
    ckpt_dir = resolve_checkpoint(ckpt)
    _check_outputs(ckpt_dir, saliency, masks, layout_file, dataset, output, plot, overwrite)
    opened = Checkpoint.open(ckpt_dir, layout_from(layout_file))
    variants = _variants(opened, saliency, masks, opts)
    if plot is not None:  # refuse before the long run if the plot cannot be drawn
        plot_format(plot)
    data, provenance, data_notes = load_data(opened, dataset, text_field, num_samples, max_length, seed)
    if saliency is not None:
        from ..common.saliency import load_saliency
        from ..evaluation.datanote import calibration_overlap

        overlap = calibration_overlap(load_saliency(saliency).calibration, provenance, saliency.name)
        data_notes += [overlap] if overlap else []
    from ..evaluation.evaluate import evaluate as run_evaluate

    result = run_evaluate(ckpt_dir, variants, data.samples, batch_size=batch_size, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code, provenance=provenance,
                          bar=progress_bars(quiet), layout=opened.layout)
    result.notes[:0] = data_notes
    report = result.to_json()
    d = report["data"]
    if not as_json:
        click.echo(f"{d['samples']} samples, {d['predicted_positions']} predicted tokens on {d['device']} ({d['dtype']}):")
        table(table_rows(report, human))
    for line in report["notes"]:
        click.echo(f"note: {line}", err=True)
    written = []
    for path, write in ((output, save_report), (plot, plot_report)):
        if path is not None:
            write(report, path, overwrite)
            written.append(path)
            if not as_json:
                click.echo(f"wrote {path}")
    if as_json:
        emit_json({**report, "written": written})
