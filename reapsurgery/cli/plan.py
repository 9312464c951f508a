"""`reapsurgery plan`: saliency.json -> mask.json."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (OUTPUT, echo_plan, emit_json, json_option, layout_from, layout_option, one_line_errors,
                     overwrite_option, plan_facts, plan_kwargs, plan_options)


@click.command()
@click.argument("saliency", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=OUTPUT, required=True, help="Where to write mask.json.")
@plan_options
@click.option("--ckpt", type=click.Path(path_type=Path), metavar="CKPT",
              help="Check SALIENCY against this checkpoint and use its router's topk_group in the feasibility check.")
@layout_option
@overwrite_option
@json_option
@one_line_errors
def plan(saliency: Path, output: Path, ckpt: Path | None, layout_file: Path | None, overwrite: bool, as_json: bool,
         **opts) -> None:
    """Choose the experts each MoE layer keeps from SALIENCY; write a mask.

    \b
    Methods (score per expert, from the saliency statistics; the highest are kept):
      reap                reap_sum / count  (mean of gate * ||output|| over routed tokens)
      frequency           count             (tokens routed to the expert)
      weighted-frequency  gate_sum          (sum of gate weights)
      ean-sum             norm_sum          (sum of ||output||)
      ean-mean            norm_sum / count  (mean of ||output||)
      weighted-ean        reap_sum          (sum of gate * ||output||)

    Pinned (--preserve) and super experts are always kept; experts never routed
    during calibration are dropped first; equal scores keep the lower index, so
    the same inputs always give the same mask. Group-limited routers (n_group > 1)
    lose the same number of experts in every group. Refuses, before writing
    anything, a plan that leaves fewer experts (or fewer reachable through
    topk_group groups) than num_experts_per_tok.
    """
    from ..common.checkpoint import resolve_checkpoint
    from ..common.files import check_output_file
    from ..plan import plan_from_files, save_mask

    ckpt_dirs = [resolve_checkpoint(ckpt)] if ckpt is not None else []
    check_output_file(output, inputs=[saliency, *filter(None, [layout_file])],
                      input_dirs=[d for d in ckpt_dirs if d.is_dir()], overwrite=overwrite)
    result = plan_from_files(saliency, ckpt, layout=layout_from(layout_file), **plan_kwargs(opts))
    save_mask(result.mask, output, overwrite)
    echo_plan(result, with_table=not as_json)
    if as_json:
        emit_json({"output": output, **plan_facts(result)})
        return
    click.echo(f"wrote {output} (sha256 {result.mask.sha256})")
