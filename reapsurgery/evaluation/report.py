"""report.json (format in README, "Evaluating masks"), its table, and its quality-vs-size plot."""

from __future__ import annotations

from pathlib import Path

from ..errors import ReapError

EVALUATION_FORMAT = "reapsurgery.evaluation"


def save_report(report: dict, path: str | Path, overwrite: bool = False) -> None:
    """Strict JSON (never a bare NaN), written atomically: a report is either complete or absent."""
    from ..common.files import write_json

    write_json(path, report, overwrite=overwrite)


def table_rows(report: dict, size=lambda n: f"{n / (1 << 30):.3f} GiB") -> list[tuple]:
    """One row for the original, one per variant, in the order given; `size` formats bytes."""
    orig = report["original"]
    rows = [("variant", "experts", "sparsity", "size", "perplexity", "KL (nats)", "top-1 agree", "worst layer error"),
            ("original", orig["experts"], "0", size(orig["bytes"]), _ppl(orig), "0", "1", "-")]
    for v in report["variants"]:
        worst = max(v["layers"].items(), key=lambda kv: kv[1]["relative_error"], default=None)
        rows.append((v["source"], v["experts_kept"], f"{v['sparsity']:.4g}", size(v["bytes"]),
                     _ppl(v), f"{v['kl_mean']:.4g}", f"{v['top1_agreement']:.4f}",
                     f"{worst[1]['relative_error']:.3g} (layer {worst[0]})" if worst else "-"))
    if report["original"].get("mtp"):  # the draft's first depth, where a variant keeps its MTP layers
        rows[0] += ("MTP top-1 agree",)
        rows[1] += ("1",)
        for j, v in enumerate(report["variants"], start=2):
            first = next(iter(v["mtp"].values()), {}) if v.get("mtp") else {}
            rows[j] += (f"{first['top1_agreement']:.4f}" if "top1_agreement" in first else "-",)
    return rows


def variant_group(variant: dict) -> str:
    """What a plot's legend names a variant by: the method it was planned with, else its mask file."""
    made = variant.get("made") or {}
    if "method" in made:
        return made["method"]
    return Path(made.get("mask_file") or variant.get("source") or "mask").name


def _ppl(metrics: dict) -> str:
    """Perplexity, or "inf" where it exceeds the float range (null in the report)."""
    return "inf" if metrics["perplexity"] is None else f"{metrics['perplexity']:.4g}"


def plot_format(path: str | Path) -> str:
    """The image format `path` asks for (its suffix; png without one), checked before a run that ends
    in drawing it: matplotlib must be installed and know the format."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ReapError(path, "--plot needs matplotlib: pip install 'reapsurgery[plot]'") from None
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise ReapError(path, f"--plot cannot draw a .{fmt} file; use one of {', '.join('.' + k for k in sorted(known))}")
    return fmt


def _finite(value: float | None) -> float:
    """A report's number for the plot: null (a perplexity past the float range) left out as NaN."""
    return float("nan") if value is None else value


def plot_report(report: dict, path: str | Path, overwrite: bool = False) -> None:
    """KL, top-1 agreement and perplexity against checkpoint size: one marker and line per method (or
    mask file), so masks of the same size are told apart; sizes in the unit the table uses."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator, ScalarFormatter
    except ImportError:
        raise ReapError(path, "--plot needs matplotlib: pip install 'reapsurgery[plot]'") from None
    from ..common.units import unit_of

    orig = report["original"]
    unit, scale = unit_of(orig["bytes"])
    groups: dict[str, list[dict]] = {}
    for v in report["variants"]:
        groups.setdefault(variant_group(v), []).append(v)
    markers = "os^vD<>pP*Xh"
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    panels = [("kl_mean", "KL(original || pruned), nats", 0.0), ("top1_agreement", "top-1 agreement", 1.0),
              ("perplexity", "perplexity", orig["perplexity"])]
    for ax, (key, title, at_original) in zip(axes, panels):
        for j, (name, members) in enumerate(groups.items()):
            members = sorted(members, key=lambda v: v["bytes"])
            ax.plot([v["bytes"] / scale for v in members], [_finite(v[key]) for v in members], marker=markers[j % len(markers)],
                    linestyle="-" if len(members) > 1 else "none", alpha=0.85, label=name)
        ax.plot([orig["bytes"] / scale], [_finite(at_original)], "s", color="black", label="original")
        ax.set_xlabel(f"checkpoint size ({unit})")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(f"{report['model'].get('architecture')}: {report['data'].get('predicted_positions')} predicted tokens "
                 f"of {report['data'].get('dataset', 'the evaluation data')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below
    import io

    from ..common.files import write_atomic

    png = io.BytesIO()  # drawn in memory, then written as every file is: complete or absent, errors naming it
    fig.savefig(png, dpi=120, format=plot_format(path))
    plt.close(fig)
    write_atomic(path, png.getvalue(), overwrite)
