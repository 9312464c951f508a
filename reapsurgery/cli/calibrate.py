"""`reapsurgery calibrate` and `merge-saliency`: the calibration stage's commands."""

from __future__ import annotations

from pathlib import Path

import click

from .common import layout_from, layout_option, one_line_errors


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write saliency.json.")
@click.option("--dataset", help="Local .jsonl/.json/.parquet/.txt file or a cached hub dataset id. Default: built-in text.")
@click.option("--text-field", help="Field holding the text (default: text, content or prompt).")
@click.option("--num-samples", default=512, show_default=True, help="Calibration samples to use.")
@click.option("--max-length", default=2048, show_default=True, help="Tokens per sample, at most.")
@click.option("--seed", default=0, show_default=True, help="Seed for sample selection.")
@click.option("--batch-size", default=8, show_default=True, help="Samples per forward batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              help="Compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own modeling code.")
@click.option("--mtp", type=click.Choice(["auto", "drop", "calibrate"]), default="auto", show_default=True,
              help="Multi-token-prediction block (DeepSeek-V3, GLM-4.x: layers past the stack; Qwen3-Next: "
                   "mtp.*), run by vLLM, SGLang and llama.cpp for speculative decoding: 'calibrate' measures its "
                   "experts from the block's own inputs, and plan/apply prune and keep it; 'drop' leaves it out, "
                   "and apply drops it; 'auto' calibrates it for families whose loaders need it present "
                   "(Qwen3-Next: llama.cpp's converter) and drops it for the others.")
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

    from ..calibration.calibrate import calibrate as run_calibrate
    from ..calibration.data import load_samples

    if mtp == "calibrate":  # refuse before the data and the model are loaded
        from ..common.checkpoint import Checkpoint
        from ..calibration.mtp import mtp_layers_on_disk

        mtp_layers_on_disk(Checkpoint.open(ckpt, layout_from(layout_file)))
    data = load_samples(dataset, ckpt, num_samples=num_samples, max_length=max_length, seed=seed,
                        text_field=text_field)
    provenance = {"dataset": data.description, "max_length": max_length, "seed": seed}
    saliency = run_calibrate(
        ckpt, data.samples, batch_size=batch_size, device=device, dtype=dtype,
        state_dir=Path(f"{output}.resume"), resume=resume, trust_remote_code=trust_remote_code,
        provenance=provenance, bar=partial(tqdm, disable=quiet), layout=layout_from(layout_file), mtp=mtp,
    )
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
    from ..common.saliency import load_saliency, merge_saliency as merge

    merged = merge([load_saliency(f) for f in files], list(files))
    merged.save(output)
    click.echo(f"wrote {output}: {len(files)} runs, {merged.calibration['tokens']} tokens")
