"""`reapsurgery calibrate` and `merge-saliency`: the calibration stage's commands."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .common import (OUTPUT, data_options, emit_json, json_option, layout_from, layout_option, load_data,
                     one_line_errors, overwrite_option, run_options)
from .progress import note, progress_bars


class Duration(click.ParamType):
    """Seconds, or a number with s, m or h: 90, 30s, 10m, 1.5h."""

    name = "DURATION"
    UNITS = {"s": 1, "m": 60, "h": 3600}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        scale = self.UNITS.get(text[-1:], None)
        try:
            seconds = float(text[:-1] if scale else text) * (scale or 1)
        except ValueError:
            seconds = -1.0
        if not seconds >= 0 or seconds == float("inf"):
            self.fail(f"{value!r} is not a duration like 90, 30s, 10m or 1h", param, ctx)
        return seconds


class Size(click.ParamType):
    """Bytes, or a number with K, M, G, T (powers of 1024; KiB, MB... accepted): 512M, 8G, 1.5TiB."""

    name = "SIZE"
    UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
        unit = text[-1:] if text[-1:] in self.UNITS else ""
        try:
            n = float(text[: len(text) - len(unit)]) * self.UNITS[unit]
        except ValueError:
            n = 0.0
        if not 0 < n < float("inf"):
            self.fail(f"{value!r} is not a size like 512M, 8G or 1.5T", param, ctx)
        return int(n)


@click.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=OUTPUT, required=True, help="Where to write saliency.json.")
@data_options
@run_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last saved layer (state in OUTPUT.resume/).")
@click.option("--checkpoint-every", type=Duration(), default="10m", show_default=True,
              help="Save the resume state at most this often (90, 30s, 10m, 1h; 0: after every layer). It is "
                   "written in the background as one file replaced atomically, and also on Ctrl-C or an error.")
@click.option("--hidden-memory", type=Size(), default=None, metavar="SIZE",
              help="Most memory the hidden states may take on the compute device (512M, 8G...). Default: what is "
                   "free there (CUDA's free memory, or MemAvailable on the CPU) less two layers' weights and 1/8 "
                   "for the forward. When all samples' do not fit, they are kept in host memory and each batch is "
                   "moved to the device for its forward; when even host memory (MemAvailable less two layers and "
                   "1/8) does not hold them (on the CPU: at once), the samples are split into chunks and each "
                   "chunk streams the layers again. Same statistics either way (they are sums); a note says "
                   "which was chosen, and the provenance records it (hidden_states, chunks).")
@click.option("--mtp", type=click.Choice(["auto", "drop", "calibrate"]), default="auto", show_default=True,
              help="Multi-token-prediction block (DeepSeek-V3, GLM-4.x: layers past the stack; Qwen3-Next: "
                   "mtp.*), run by vLLM, SGLang and llama.cpp for speculative decoding: 'calibrate' measures its "
                   "experts from the block's own inputs, and plan/apply prune and keep it; 'drop' leaves it out, "
                   "and apply drops it; 'auto' calibrates it for families whose loaders need it present "
                   "(Qwen3-Next: llama.cpp's converter) and drops it for the others.")
@layout_option
@overwrite_option
@json_option
@one_line_errors
def calibrate(ckpt: Path, output: Path, dataset: str | None, text_field: str | None, num_samples: int,
              max_length: int, seed: int, batch_size: int, device: str, dtype: str, resume: bool,
              checkpoint_every: float, hidden_memory: int | None, trust_remote_code: bool, mtp: str, quiet: bool,
              layout_file: Path | None, overwrite: bool, as_json: bool) -> None:
    """Measure per-expert REAP saliency of CKPT on calibration text.

    Loads one decoder layer at a time from the shards into a transformers model built
    on the meta device, runs every sample through it, and records each expert's routed
    count, gate sum, output-norm sums and max activation from the model's real routing.
    The run's state is kept beside OUTPUT (OUTPUT.resume/, every --checkpoint-every), so --resume
    continues a crashed run; it is removed once OUTPUT is written. A state of an earlier run is
    never replaced silently: --resume continues it, --overwrite discards it. Under torchrun
    (`torchrun --nproc-per-node N -m reapsurgery calibrate ...`) each rank takes a share of the
    samples and rank 0 writes; on several nodes the same command runs on each, with torchrun's
    --nnodes, --node-rank and --master-addr.
    """
    from ..calibration.preflight import check_device, mtp_layers_on_disk
    from ..calibration.statedir import check_state_dir, has_state
    from ..common.checkpoint import Checkpoint, resolve_checkpoint
    from ..common.files import check_output_file, input_clash
    from ..errors import ReapError

    # every check that needs no torch first (importing it takes seconds): a refusal costs nothing
    check_device(device)
    ckpt_dir = resolve_checkpoint(ckpt)
    inputs = [p for p in (layout_file, Path(dataset) if dataset else None) if p is not None and p.exists()]
    input_dirs = [ckpt_dir] if ckpt_dir.is_dir() else []
    check_output_file(output, inputs, input_dirs, overwrite=overwrite)
    state_dir = Path(f"{output}.resume")
    clash = input_clash(state_dir, inputs, input_dirs, directory=True)
    if clash:
        raise ReapError(state_dir, f"the resume state's directory {clash}; choose another -o")
    check_state_dir(state_dir, resume, overwrite)
    layout = layout_from(layout_file)
    opened = Checkpoint.open(ckpt_dir, layout)
    opened.tensors()  # index and shard headers agree, before any layer is read
    if mtp == "calibrate":
        mtp_layers_on_disk(opened)
    data, provenance, data_notes = load_data(opened, dataset, text_field, num_samples, max_length, seed)  # tokenizing imports torch
    for line in data_notes:
        note(f"note: {line}")
    from ..calibration.calibrate import calibrate as run_calibrate, resolve_device
    from ..plan import never_routed_meaning

    resolve_device(device)  # what the cheap check could not rule out
    try:
        saliency = run_calibrate(
            opened.path, data.samples, batch_size=batch_size, device=device, dtype=dtype,
            state_dir=state_dir, resume=resume, checkpoint_every=checkpoint_every, output=output, overwrite=overwrite,
            hidden_memory=hidden_memory, trust_remote_code=trust_remote_code,
            provenance=provenance, bar=progress_bars(quiet), layout=layout, mtp=mtp,
        )
    except KeyboardInterrupt as e:
        if has_state(state_dir):
            e.message = (f"interrupted; the finished layers are kept in {state_dir}: run the same command "
                         "with --resume to continue from there")
        raise
    cal = saliency.calibration
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun rank 0 writes and reports
        return
    never_routed = {layer: sum(1 for c in stats.count if c == 0) for layer, stats in saliency.layers.items()}
    never = sum(never_routed.values())
    if never:
        model = saliency.model
        tokens = min(saliency.layers[l].tokens for l, n in never_routed.items() if n)
        note(f"note: {never} (layer, expert) pairs never routed: "
             f"{never_routed_meaning(tokens, model['num_experts'], model['num_experts_per_tok'])}")
    if as_json:
        emit_json({"output": output, "moe_layers": sorted(saliency.layers), "mtp_layers": saliency.mtp_layers,
                   "never_routed": never_routed, "calibration": cal})
        return
    chunks = f" in {cal['chunks']} chunks" if cal.get("chunks", 1) > 1 else ""
    chunks += ", hidden states in host memory," if cal.get("hidden_states") == "host" else ""
    mtp_note = f" (multi-token-prediction layers {saliency.mtp_layers} included)" if saliency.mtp_layers else ""
    click.echo(f"wrote {output}: {len(saliency.layers)} MoE layers{mtp_note}, {cal['samples']} samples, "
               f"{cal['tokens']} tokens{chunks} on {cal['device']} ({cal['dtype']}); {never} (layer, expert) pairs never routed")


@click.command("merge-saliency")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=OUTPUT, required=True, help="Merged saliency.json.")
@overwrite_option
@json_option
@one_line_errors
def merge_saliency(files: tuple[Path, ...], output: Path, overwrite: bool, as_json: bool) -> None:
    """Sum the statistics of calibration runs on the same model (e.g. several datasets)."""
    from ..common.files import check_output_file
    from ..common.saliency import load_saliency, merge_saliency as merge

    check_output_file(output, inputs=files, overwrite=overwrite)
    merged = merge([load_saliency(f) for f in files], list(files))
    merged.save(output, overwrite)
    if as_json:
        emit_json({"output": output, "inputs": files, "moe_layers": sorted(merged.layers),
                   "calibration": merged.calibration})
        return
    click.echo(f"wrote {output}: {len(files)} runs, {merged.calibration['tokens']} tokens")
