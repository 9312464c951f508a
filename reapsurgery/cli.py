"""Command line: parse, call one library function, print. Errors are one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import ReapError

EXIT_BAD_INPUT = 2


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def one_line_errors(fn):
    """Turn ReapError (and OS errors on files) into `error: <file>: <problem>` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReapError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"error: {where}{e.strerror or e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left in the output directory", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reapsurgery")
def main() -> None:
    """Prune routed experts out of Mixture-of-Experts checkpoints on disk.

    \b
    Typical run:
      reapsurgery apply mask.json ckpt/ out/      # write the pruned checkpoint
      reapsurgery verify out/                     # check it is self-consistent
    """


@main.command()
@click.argument("mask", type=click.Path(path_type=Path))
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@one_line_errors
def apply(mask: Path, ckpt: Path, out: Path, overwrite: bool, quiet: bool) -> None:
    """Write CKPT with only the experts MASK keeps into OUT.

    Streams the safetensors shards once, copying byte ranges: dropped experts'
    tensors are left out, retained ones renumbered 0..E'-1 in their original
    order, routers and stacked expert tensors sliced. config.json, the index and
    the model card are rewritten; other files are copied. CKPT is never written,
    and OUT appears only once complete.
    """
    from tqdm import tqdm

    from .mask import load_mask
    from .surgery import apply_mask

    total = 0
    bar = None

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first write, so refusals print nothing but the error
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=quiet)
        bar.update(n)

    def on_plan(plan) -> None:
        nonlocal total
        total = plan.total_size

    try:
        result = apply_mask(load_mask(mask), mask, ckpt, out, overwrite=overwrite,
                            progress=progress, on_plan=on_plan)
    finally:
        if bar is not None:
            bar.close()
    click.echo(
        f"wrote {result.out}: {result.experts_before} -> {result.experts_after} experts in "
        f"{result.moe_layers} MoE layers, {result.shards} shard(s), "
        f"{_human(result.bytes_written)} (was {_human(result.bytes_before)})"
    )
    for key, (old, new) in result.config_changes.items():
        click.echo(f"  config.json: {key} {old} -> {new}")
    if result.dropped_layers:
        click.echo(f"  dropped multi-token-prediction layers {result.dropped_layers} (not run by transformers)")
    for path in result.skipped:
        click.echo(f"  not copied (weights reapsurgery does not prune): {path}")


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@one_line_errors
def verify(ckpt: Path) -> None:
    """Check that a checkpoint's index, shard headers, expert tensors and config agree."""
    from .verify import verify as run_verify

    report = run_verify(ckpt)
    if not report.ok:
        for problem in report.problems:
            click.echo(f"error: {ckpt}: {problem}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(
        f"ok: {ckpt}: {report.tensors} tensors in {report.shards} shard(s), {_human(report.total_size)}, "
        f"{report.moe_layers} MoE layers with {report.num_experts} experts each"
    )


if __name__ == "__main__":
    main()
