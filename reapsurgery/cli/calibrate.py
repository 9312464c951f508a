"""`reapsurgery calibrate` and `merge-saliency`: the calibration stage's commands."""

from __future__ import annotations

from pathlib import Path

import click

from .common import data_options, layout_from, layout_option, load_data, one_line_errors, run_options


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write saliency.json.")
@data_options
@run_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--mtp", type=click.Choice(["auto", "drop", "calibrate"]), default="auto", show_default=True,
              help="Multi-token-prediction block (DeepSeek-V3, GLM-4.x: layers past the stack; Qwen3-Next: "
                   "mtp.*), run by vLLM, SGLang and llama.cpp for speculative decoding: 'calibrate' measures its "
                   "experts from the block's own inputs, and plan/apply prune and keep it; 'drop' leaves it out, "
                   "and apply drops it; 'auto' calibrates it for families whose loaders need it present "
                   "(Qwen3-Next: llama.cpp's converter) and drops it for the others.")
@layout_option
@one_line_errors
def calibrate(ckpt: Path, output: Path, dataset: str | None, text_field: str | None, num_samples: int,
              max_length: int, seed: int, batch_size: int, device: str, dtype: str, resume: bool,
              trust_remote_code: bool, mtp: str, quiet: bool, layout_file: Path | None) -> None:
    """Measure per-expert REAP saliency of CKPT on calibration text.

    Loads one decoder layer at a time from the shards into a transformers model built
    on the meta device, runs every sample through it, and records each expert's routed
    count, gate sum, output-norm sums and max activation from the model's real routing.
    The state after each layer is kept beside OUTPUT, so --resume continues a crashed run.
    """
    from functools import partial

    from tqdm import tqdm

    from ..calibration.calibrate import calibrate as run_calibrate, resolve_device
    from ..common.checkpoint import Checkpoint, resolve_checkpoint
    from ..common.files import check_output_file

    # every check before the data and the model are loaded: a refusal costs nothing
    ckpt_dir = resolve_checkpoint(ckpt)
    check_output_file(output, input_dirs=[ckpt_dir] if ckpt_dir.is_dir() else [])
    layout = layout_from(layout_file)
    opened = Checkpoint.open(ckpt_dir, layout)
    opened.tensors()  # index and shard headers agree, before any layer is read
    if mtp == "calibrate":
        from ..calibration.mtp import mtp_layers_on_disk

        mtp_layers_on_disk(opened)
    resolve_device(device)
    vocab = opened.cfg.get("vocab_size")
    data, provenance = load_data(opened.path, dataset, text_field, num_samples, max_length, seed,
                                 vocab_size=vocab if isinstance(vocab, int) else None)
    state_dir = Path(f"{output}.resume")
    try:
        saliency = run_calibrate(
            opened.path, data.samples, batch_size=batch_size, device=device, dtype=dtype,
            state_dir=state_dir, resume=resume, trust_remote_code=trust_remote_code,
            provenance=provenance, bar=partial(tqdm, disable=quiet), layout=layout, mtp=mtp,
        )
    except KeyboardInterrupt as e:
        if state_dir.is_dir() and any(state_dir.iterdir()):
            e.message = (f"interrupted; the finished layers are kept in {state_dir}: run the same command "
                         "with --resume to continue from there")
        raise
    saliency.save(output)
    cal = saliency.calibration
    never = sum(sum(1 for c in layer.count if c == 0) for layer in saliency.layers.values())
    mtp_note = f" (multi-token-prediction layers {saliency.mtp_layers} included)" if saliency.mtp_layers else ""
    click.echo(f"wrote {output}: {len(saliency.layers)} MoE layers{mtp_note}, {cal['samples']} samples, "
               f"{cal['tokens']} tokens on {cal['device']} ({cal['dtype']}); {never} (layer, expert) pairs never routed")


@click.command("merge-saliency")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Merged saliency.json.")
@one_line_errors
def merge_saliency(files: tuple[Path, ...], output: Path) -> None:
    """Sum the statistics of calibration runs on the same model (e.g. several datasets)."""
    from ..common.files import check_output_file
    from ..common.saliency import load_saliency, merge_saliency as merge

    check_output_file(output, inputs=files)
    merged = merge([load_saliency(f) for f in files], list(files))
    merged.save(output)
    click.echo(f"wrote {output}: {len(files)} runs, {merged.calibration['tokens']} tokens")
