"""Command line: parse, call one library function, print. Errors are one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import ReapError

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
      reapsurgery plan saliency.json --sparsity 0.5 -o mask.json   # choose experts
      reapsurgery apply mask.json ckpt/ out/      # write the pruned checkpoint
      reapsurgery verify out/                     # check it is self-consistent
    """


# -- planning: options shared by `plan` and `apply` ------------------------------

from ..plan import METHODS  # noqa: E402  (light: no torch)

PLAN_FLAGS = {"sparsity": "--sparsity", "keep": "--keep", "method": "--method",
              "preserve_super_experts": "--preserve-super-experts", "preserve_outliers": "--preserve-outliers",
              "pins": "--preserve", "strict": "--strict"}


def plan_options(fn):
    """Add the planning options (--sparsity, --keep, --method, --preserve..., --strict) to a command."""
    options = [
        click.option("--sparsity", type=float, metavar="F",
                     help="Fraction of routed experts removed from every MoE layer; experts dropped per layer = "
                          "F*E rounded to the nearest integer (halves up)."),
        click.option("--keep", type=int, metavar="N", help="Experts kept per MoE layer (instead of --sparsity)."),
        click.option("--method", type=click.Choice(METHODS), default=None,
                     help="Saliency score that ranks experts; default reap (see `reapsurgery plan --help`)."),
        click.option("--preserve-super-experts", is_flag=True,
                     help="Never drop super experts: max activation above both the 99.5th percentile of all "
                          "experts' max activations and a tenth of the largest, in the first 75% of MoE layers."),
        click.option("--preserve-outliers", is_flag=True,
                     help="Like --preserve-super-experts, in all MoE layers."),
        click.option("--preserve", "pins", metavar="L:E,...",
                     help="Never drop these experts: comma-separated LAYER:EXPERT pairs, e.g. 3:17,3:40."),
        click.option("--strict", is_flag=True,
                     help="Group-limited routers: refuse a drop count that is not a multiple of n_group "
                          "instead of rounding it to the nearest multiple."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _plan_kwargs(opts: dict) -> dict:
    from ..plan import parse_pins

    return dict(sparsity=opts["sparsity"], keep=opts["keep"], method=opts["method"] or "reap",
                preserve_super_experts=opts["preserve_super_experts"],
                preserve_outliers=opts["preserve_outliers"], pins=parse_pins(opts["pins"]), strict=opts["strict"])


LAYOUT_HELP = ("A layout file (JSON, the fields of an entry of reapsurgery/common/layouts.json) describing the "
               "checkpoint's MoE tensors, for a family reapsurgery does not know or to override the built-in one.")


def layout_option(fn):
    """Add --layout FILE to a command that opens a checkpoint."""
    return click.option("--layout", "layout_file", type=click.Path(path_type=Path), metavar="FILE",
                        help=LAYOUT_HELP)(fn)


def _layout(path: Path | None):
    from ..common.layouts import load_layout_file

    return load_layout_file(str(path)) if path is not None else None


def _table(rows: list[tuple], indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _score_range(scores: list) -> str:
    seen = [s for s in scores if s is not None]
    never = len(scores) - len(seen)
    text = f"{_g(min(seen))}..{_g(max(seen))}" if seen else "-"
    return text + (f" (+{never} never routed)" if never else "")


def _echo_plan(plan, table: bool = True) -> None:
    E = plan.num_experts
    if table:
        click.echo(f"plan ({plan.method}): keep {plan.kept} of {E} routed experts in each of {len(plan.layers)} "
                   f"MoE layers (drop {plan.drop}, sparsity {plan.drop / E:.4g})")
        rows = [("layer", "never routed", "preserved", "kept scores", "dropped scores")]
        for l, p in sorted(plan.layers.items()):
            preserved = " ".join(map(str, sorted(set(p.super_experts) | set(p.pinned)))) or "-"
            rows.append((l, len(p.never_routed), preserved, _score_range([p.scores[e] for e in p.kept]),
                         _score_range([p.scores[e] for e in p.dropped])))
        _table(rows)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)


@main.command()
@click.argument("saliency", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write mask.json.")
@plan_options
@click.option("--ckpt", type=click.Path(path_type=Path),
              help="Check SALIENCY against this checkpoint and use its router's topk_group in the feasibility check.")
@layout_option
@one_line_errors
def plan(saliency: Path, output: Path, ckpt: Path | None, layout_file: Path | None, **opts) -> None:
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
    from ..plan import plan_from_files, save_mask

    result = plan_from_files(saliency, ckpt, layout=_layout(layout_file), **_plan_kwargs(opts))
    save_mask(result.mask, output)
    _echo_plan(result)
    click.echo(f"wrote {output} (sha256 {result.mask.sha256})")


def _echo_mtp(dropped: list[int], prefixes: list[str], kept: list[int], notes: list[str], preview: bool, indent: str) -> None:
    """What happens to multi-token-prediction layers: dropped (default) or kept and pruned."""
    drop, keep = ("would drop", "would keep") if preview else ("dropped", "kept")
    if dropped:
        click.echo(f"{indent}{drop} multi-token-prediction layers {dropped} (not run by transformers; "
                   "`calibrate --mtp calibrate` measures and keeps them)")
    for prefix in prefixes:
        click.echo(f"{indent}{drop} multi-token-prediction tensors {prefix}* (not run by transformers)")
    if kept:
        click.echo(f"{indent}{keep} multi-token-prediction layers {kept}, pruned with the mask like the others")
    for note in notes:
        click.echo(f"{indent}note: {note}")


def _echo_preview(p: dict) -> None:
    click.echo(
        f"dry run: would write {p['out']}: {p['experts_before']} -> {p['experts_after']} experts in "
        f"{p['moe_layers']} MoE layers, {len(p['shards'])} shard(s), {_human(p['bytes'])} "
        f"(was {_human(p['bytes_before'])}); nothing was written"
    )
    _table([("shard", "from", "tensors", "bytes")] +
           [(s["name"], s["source"], s["tensors"], _human(s["bytes"])) for s in p["shards"]])
    for key, (old, new) in p["config_changes"].items():
        click.echo(f"  config.json: {key} {old} -> {new}")
    _echo_mtp(p["dropped_layers"], p["dropped_prefixes"], p["kept_mtp_layers"], p["notes"], True, "  ")
    click.echo(f"  would write: {' '.join(p['written'])}")
    if p["copied"]:
        click.echo(f"  would copy: {' '.join(p['copied'])}")
    for path in p["skipped"]:
        click.echo(f"  would not copy (weights reapsurgery does not prune): {path}")
    if p["replaces_existing"]:
        click.echo(f"  would replace the existing contents of {p['out']} (--overwrite)")


@main.command()
@click.argument("mask", metavar="MASK_OR_SALIENCY", type=click.Path(path_type=Path))
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--dry-run", is_flag=True,
              help="Print what would be written (shards, bytes, config changes) and write nothing, not even OUT.")
@plan_options
@layout_option
@one_line_errors
def apply(mask: Path, ckpt: Path, out: Path, overwrite: bool, quiet: bool, dry_run: bool,
          layout_file: Path | None, **opts) -> None:
    """Write CKPT with only the experts MASK keeps into OUT.

    MASK_OR_SALIENCY is a mask.json, or a saliency.json together with --sparsity
    or --keep (and the other options of `reapsurgery plan`) to plan the mask
    here; the mask used is stored in OUT either way.

    Streams the safetensors shards once, copying byte ranges: dropped experts'
    tensors are left out, retained ones renumbered 0..E'-1 in their original
    order, routers and stacked expert tensors sliced. config.json, the index and
    the model card are rewritten; other files are copied. CKPT is never written,
    and OUT appears only once complete.
    """
    from tqdm import tqdm

    from ..common.mask import load_mask
    from ..common.saliency import is_saliency_file
    from ..surgery.apply import apply_mask

    layout = _layout(layout_file)
    if is_saliency_file(mask):
        if opts["sparsity"] is None and opts["keep"] is None:
            raise ReapError(mask, "is a saliency file: pass --sparsity F or --keep N to choose how many experts "
                                  "to keep (or make a mask with `reapsurgery plan` first)")
        from ..plan import plan_from_files

        planned = plan_from_files(mask, ckpt, layout=layout, **_plan_kwargs(opts))
        chosen = planned.mask
    else:
        given = [flag for key, flag in PLAN_FLAGS.items() if opts[key] not in (None, False)]
        if given:
            raise ReapError(mask, f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to a "
                                  "saliency file; this is a mask (its experts are already chosen)")
        chosen = load_mask(mask)
        planned = None

    if dry_run:
        from ..surgery.preview import apply_preview

        preview = apply_preview(chosen, mask, ckpt, out, overwrite=overwrite, layout=layout)
        if planned:
            _echo_plan(planned)
        _echo_preview(preview)
        return

    total = 0
    bar = None

    def progress(n: int) -> None:
        nonlocal bar
        if bar is None:  # created on the first write, so refusals print nothing but the error
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=quiet)
        bar.update(n)

    def on_plan(plan) -> None:  # called once every check has passed, before anything is written
        nonlocal total
        total = plan.total_size
        if planned:
            _echo_plan(planned, table=not quiet)

    try:
        result = apply_mask(chosen, mask, ckpt, out, overwrite=overwrite,
                            progress=progress, on_plan=on_plan, layout=layout)
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
    _echo_mtp(result.dropped_layers, result.dropped_prefixes, result.kept_mtp_layers, result.notes, False, "  ")
    for path in result.skipped:
        click.echo(f"  not copied (weights reapsurgery does not prune): {path}")


@main.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@layout_option
@one_line_errors
def verify(ckpt: Path, layout_file: Path | None) -> None:
    """Check that a checkpoint's index, shard headers, expert tensors and config agree."""
    from ..surgery.verify import verify as run_verify

    report = run_verify(ckpt, _layout(layout_file))
    if not report.ok:
        for problem in report.problems:
            click.echo(f"error: {ckpt}: {problem}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(
        f"ok: {ckpt}: {report.tensors} tensors in {report.shards} shard(s), {_human(report.total_size)}, "
        f"{report.moe_layers} MoE layers with {report.num_experts} experts each"
    )


@main.command()
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

    from ..calibration.calibrate import calibrate as run_calibrate
    from ..calibration.data import load_samples

    if mtp == "calibrate":  # refuse before the data and the model are loaded
        from ..common.checkpoint import Checkpoint
        from ..calibration.mtp import mtp_layers_on_disk

        mtp_layers_on_disk(Checkpoint.open(ckpt, _layout(layout_file)))
    data = load_samples(dataset, ckpt, num_samples=num_samples, max_length=max_length, seed=seed,
                        text_field=text_field)
    provenance = {"dataset": data.description, "max_length": max_length, "seed": seed}
    saliency = run_calibrate(
        ckpt, data.samples, batch_size=batch_size, device=device, dtype=dtype,
        state_dir=Path(f"{output}.resume"), resume=resume, trust_remote_code=trust_remote_code,
        provenance=provenance, bar=partial(tqdm, disable=quiet), layout=_layout(layout_file), mtp=mtp,
    )
    saliency.save(output)
    cal = saliency.calibration
    never = sum(sum(1 for c in layer.count if c == 0) for layer in saliency.layers.values())
    mtp_note = f" (multi-token-prediction layers {saliency.mtp_layers} included)" if saliency.mtp_layers else ""
    click.echo(f"wrote {output}: {len(saliency.layers)} MoE layers{mtp_note}, {cal['samples']} samples, "
               f"{cal['tokens']} tokens on {cal['device']} ({cal['dtype']}); {never} (layer, expert) pairs never routed")


@main.command("merge-saliency")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Merged saliency.json.")
@one_line_errors
def merge_saliency(files: tuple[Path, ...], output: Path) -> None:
    """Sum the statistics of calibration runs on the same model (e.g. several datasets)."""
    from ..common.saliency import load_saliency, merge_saliency as merge

    merged = merge([load_saliency(f) for f in files], list(files))
    merged.save(output)
    click.echo(f"wrote {output}: {len(files)} runs, {merged.calibration['tokens']} tokens")


# -- inspect --------------------------------------------------------------------------

def _count(n) -> str:
    """Parameter count, e.g. 1.23B, 45.6M."""
    if n is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def _spans(indices: list[int]) -> str:
    out: list[str] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def _model_rows(model: dict, topk_group=None) -> list[tuple[str, str]]:
    moe = model["moe_layers"]
    groups = f", n_group {model['n_group']}" if model.get("n_group") is not None else ""
    if topk_group is not None:
        groups += f", topk_group {topk_group}"
    dense = [l for l in range(model["num_hidden_layers"]) if l not in set(moe)]
    return [
        ("architecture", f"{model['architecture']} ({model['model_type']})"),
        ("decoder layers", f"{model['num_hidden_layers']}: MoE {_spans(moe)} ({len(moe)})"
                           + (f", dense {_spans(dense)}" if dense else "")),
        ("routed experts", f"{model['num_experts']} per MoE layer, top-k {model['num_experts_per_tok']}{groups}"),
    ]


def _echo_sizes(columns: list[tuple[str, dict]]) -> None:
    """Params and bytes side by side for one or more accounts (e.g. before / after)."""
    def cat(a, c, k):
        return a["by_category"][c][k]

    rows = [("", *(name for name, _ in columns))] if len(columns) > 1 else []
    rows.append(("params", *(_count(a["params"]) for _, a in columns)))
    rows.append(("active params/token", *(_count(a["active_params"]) for _, a in columns)))
    rows.append(("bytes", *(_human(a["bytes"]) for _, a in columns)))
    for c, label in (("routed_experts", "routed experts"), ("routers", "routers"), ("mtp", "mtp layers"),
                     ("other", "everything else")):
        if any(cat(a, c, "params") for _, a in columns):
            rows.append((f"  {label}", *(f"{_count(cat(a, c, 'params'))} / {_human(cat(a, c, 'bytes'))}"
                                         for _, a in columns)))
    rows.append(("tensors", *(a["tensors"] for _, a in columns)))
    dtypes = sorted({d for _, a in columns for d in a["dtypes"]})
    rows.append(("dtypes", *(" ".join(f"{d}:{_human(a['dtypes'][d]['bytes'])}" for d in dtypes if d in a["dtypes"])
                             for _, a in columns)))
    _table(rows)


ACTIVE_NOTE = "(params: stored tensor elements; active: non-expert + top_k/E of routed-expert params, mtp excluded)"


def _quant(q: dict | None) -> str:
    if not q:
        return "none"
    details = [str(q[k]) for k in ("fmt", "format", "quant_algo") if q.get(k)]
    if q.get("weight_block_size"):
        details.append("blocks " + "x".join(map(str, q["weight_block_size"])))
    return f"{q.get('method')}" + (f" ({', '.join(details)})" if details else "")


def _echo_checkpoint(f: dict) -> None:
    _table([("checkpoint", f["path"]), ("layout", f"{f['layout']}, {f['shards']} shard(s)"),
            *_model_rows(f["model"], f["topk_group"]),
            ("quantization", _quant(f.get("quantization")))], indent="")
    click.echo("size:")
    _echo_sizes([("", f["size"])])
    click.echo(ACTIVE_NOTE)


def _echo_mask(f: dict) -> None:
    prov = f["provenance"]
    rows = [("mask", f["path"]), ("sha256", f["sha256"]), *_model_rows(f["model"]),
            ("kept", f"{f['experts_before']} -> {f['experts_after']} routed experts in each of {f['moe_layers']} "
                     f"MoE layers (sparsity {_g(f['sparsity'])})"),
            ("method", prov.get("method", "-"))]
    if prov.get("saliency_sha256"):
        rows.append(("saliency sha256", prov["saliency_sha256"]))
    size = f["size"]
    if not size:
        share = f["active_expert_share"]
        rows.append(("size", f"routed-expert params kept: {f['routed_expert_share_kept']:.1%}; a token uses "
                             f"{share['before']:.1%} -> {share['after']:.1%} of them; pass --ckpt CKPT for bytes and params"))
    _table(rows, indent="")
    if size:
        click.echo(f"size, applied to {size['checkpoint']}:")
        _echo_sizes([("before", size["before"]), ("after", size["after"])])
        if "bytes_saved" in size:
            click.echo(f"bytes saved: {_human(size['bytes_saved'])}" + (
                f" (in its own format, {_quant(size['quantization'])})" if size.get("quantization") else ""))
        click.echo(ACTIVE_NOTE)
        for key, (old, new) in size["config_changes"].items():
            click.echo(f"config.json: {key} {old} -> {new}")
        _echo_mtp(size["dropped_layers"], size["dropped_prefixes"], size["kept_mtp_layers"], size["notes"], True, "")
    click.echo("kept experts per layer:")
    _table([(f"{layer}:", " ".join(map(str, kept))) for layer, kept in f["layers"].items()])


def _echo_saliency(f: dict) -> None:
    cal = f["calibration"]
    described = ", ".join(f"{k} {cal[k]}" for k in ("dataset", "samples", "tokens", "max_length", "dtype", "device")
                          if cal.get(k) is not None)
    rows = [("saliency", f["path"]), ("sha256", f["sha256"]), *_model_rows(f["model"])]
    mtp = [int(l) for l in f["layers"] if int(l) >= f["model"]["num_hidden_layers"]]
    if mtp:
        rows.append(("mtp layers", f"{_spans(mtp)} (calibrated with --mtp calibrate: plan and apply keep them)"))
    if described:
        rows.append(("calibration", described))
    _table(rows, indent="")
    click.echo(f"{f['method']} scores per layer, over the experts routed at least once:")
    rows = [("layer", "tokens", "routed pairs", "never routed", "min", "median", "max", "max/min")]
    for layer, l in f["layers"].items():
        s = l["scores"] or {}
        never = l["never_routed"]
        listed = " ".join(map(str, never[:8])) + (" ..." if len(never) > 8 else "")
        rows.append((layer, _count(l["tokens"]), _count(l["routed_pairs"]), f"{len(never)}" + (f" ({listed})" if never else ""),
                     _g(s.get("min")), _g(s.get("median")), _g(s.get("max")), _g(s.get("max_over_min"))))
    _table(rows)
    sup = f["super_experts"]
    for label, key in (("first 75% of MoE layers", "first_75_percent"), ("all MoE layers", "all_layers")):
        found = " ".join(f"{l}:{e}" for l, es in sup[key].items() for e in es) or "none"
        click.echo(f"super experts, {label} (max activation > {_g(sup['threshold'])}): {found}")


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path),
              help="For a mask: the checkpoint, to compute bytes and parameters before and after.")
@click.option("--method", type=click.Choice(METHODS), default="reap", show_default=True,
              help="For a saliency file: the score whose spread is shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON, for scripts.")
@layout_option
@one_line_errors
def inspect_cmd(path: Path, ckpt: Path | None, method: str, as_json: bool, layout_file: Path | None) -> None:
    """Describe a checkpoint, a saliency file or a mask.

    \b
    checkpoint: architecture, MoE layers, experts and top-k, parameter and byte
                counts (total, active per token, by kind and dtype)
    saliency:   per-layer tokens, never-routed experts, spread of scores, super experts
    mask:       experts kept; with --ckpt, size before and after (bytes, params,
                active params) exactly as `apply` would write it

    Active params = non-expert params + top_k/E of the routed-expert params: roughly
    what one token uses. Only headers and config are read.
    """
    import json

    from ..inspect import inspect_path

    facts = inspect_path(path, ckpt, method, _layout(layout_file))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    {"checkpoint": _echo_checkpoint, "mask": _echo_mask, "saliency": _echo_saliency}[facts["kind"]](facts)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the layouts' facts as JSON, for scripts.")
def architectures(as_json: bool) -> None:
    """List the MoE families reapsurgery knows, with the config keys each reads.

    \b
    A checkpoint's family is found from config.json: model_type (of the text config
    where one is nested), then architectures[0]. For another family, describe its
    MoE tensors in a layout file and pass it with --layout (see the README).
    """
    import json

    from ..common.layouts import describe_layouts

    rows = describe_layouts()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return

    def rule(r: dict) -> str:
        parts = [f"{k}={v}" for k, v in r["moe_layers"].items()]
        return ", ".join(parts) or "every layer"

    table = [("model_type", "architectures", "expert count", "top-k", "MoE layers", "groups, MTP")]
    for r in rows:
        extra = []
        if r["groups"]:
            extra.append(f"{r['groups']['n_group']}/{r['groups']['topk_group']}")
        if r["mtp_layers"]:
            extra.append(r["mtp_layers"] + (" (--mtp calibrate)" if r["mtp_block"] else ""))
        table.append((r["name"], " ".join(r["architectures"]), " ".join(r["num_experts"]), " ".join(r["top_k"]),
                      rule(r), ", ".join(extra) or "-"))
    _table(table, indent="")

