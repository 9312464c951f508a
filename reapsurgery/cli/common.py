"""What every command shares: one-line errors, the planning and layout options, tables."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from ..errors import ReapError
from ..plan import METHODS  # light: no torch

EXIT_BAD_INPUT = 2


def human(n: float) -> str:
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



# -- planning: options shared by `plan` and `apply` ------------------------------


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


def plan_kwargs(opts: dict) -> dict:
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


def layout_from(path: Path | None):
    from ..common.layouts import load_layout_file

    return load_layout_file(str(path)) if path is not None else None


def table(rows: list[tuple], indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _score_range(scores: list) -> str:
    seen = [s for s in scores if s is not None]
    never = len(scores) - len(seen)
    text = f"{fmt(min(seen))}..{fmt(max(seen))}" if seen else "-"
    return text + (f" (+{never} never routed)" if never else "")


def echo_plan(plan, with_table: bool = True) -> None:
    E = plan.num_experts
    if with_table:
        click.echo(f"plan ({plan.method}): keep {plan.kept} of {E} routed experts in each of {len(plan.layers)} "
                   f"MoE layers (drop {plan.drop}, sparsity {plan.drop / E:.4g})")
        rows = [("layer", "never routed", "preserved", "kept scores", "dropped scores")]
        for l, p in sorted(plan.layers.items()):
            preserved = " ".join(map(str, sorted(set(p.super_experts) | set(p.pinned)))) or "-"
            rows.append((l, len(p.never_routed), preserved, _score_range([p.scores[e] for e in p.kept]),
                         _score_range([p.scores[e] for e in p.dropped])))
        table(rows)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)


def echo_mtp(dropped: str | None, kept: list[int], notes: list[str], preview: bool, indent: str,
             draft_bytes: int | None = None) -> None:
    """What happens to multi-token-prediction blocks: one line when dropped, kept and pruned, or a draft."""
    if dropped:
        click.echo(f"{indent}{'dry run: ' if preview else ''}{dropped}")
    if kept:
        click.echo(f"{indent}{'would keep' if preview else 'kept'} multi-token-prediction layers {kept}, "
                   "pruned with the mask like the others")
    if draft_bytes is not None:
        click.echo(f"{indent}{'would write' if preview else 'wrote'} mtp-draft/ ({human(draft_bytes)}): the "
                   "multi-token-prediction block unpruned, with the source's config, a draft model for vLLM's "
                   "--speculative-config '{\"method\": \"mtp\", \"model\": \"OUT/mtp-draft\", ...}'")
    for note in notes:
        click.echo(f"{indent}note: {note}")
