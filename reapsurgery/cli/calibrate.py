"""`reapsurgery calibrate` and `merge-saliency`: the calibration stage's commands."""

from __future__ import annotations

from pathlib import Path

import click

from .common import DeviceType, layout_from, layout_option, one_line_errors


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write saliency.json.")
@click.option("--dataset", help="Local .jsonl/.json/.parquet/.txt file or a cached hub dataset id. Default: built-in text.")
@click.option("--text-field", help="Field holding the text (default: text, content or prompt).")
@click.option("--num-samples", default=512, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples to use.")
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Tokens per sample, at most.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed for sample selection.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per forward batch.")
@click.option("--device", default="auto", show_default=True, type=DeviceType(), help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own modeling code.")
@click.option("--mtp", type=click.Choice(["drop", "calibrate"]), default="drop", show_default=True,
              help="Multi-token-prediction layers stored past the decoder stack (DeepSeek-V3, GLM-4.x): "
                   "'drop' leaves them out, and apply drops them; 'calibrate' measures their experts from the "
                   "MTP block's own inputs, and plan/apply prune and keep them (for speculative decoding).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
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
    from ..calibration.data import load_samples
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
    data = load_samples(dataset, opened.path, num_samples=num_samples, max_length=max_length, seed=seed,
                        text_field=text_field, vocab_size=vocab if isinstance(vocab, int) else None)
    provenance = {"dataset": data.description, "max_length": max_length, "seed": seed}
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
