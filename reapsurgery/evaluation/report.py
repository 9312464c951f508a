"""report.json (format in README, "Evaluating masks"), its table, and its quality-vs-size plot."""

from __future__ import annotations

from pathlib import Path

from ..errors import ReapError


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


def plot_report(report: dict, path: str | Path, overwrite: bool = False) -> None:
    """KL, top-1 agreement and perplexity against checkpoint size, one point per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReapError(path, "--plot needs matplotlib: pip install 'reapsurgery[plot]'") from None
    gib = 1 << 30
    orig = report["original"]
    variants = report["variants"]
    sizes = [v["bytes"] / gib for v in variants]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("kl_mean", "KL(original || pruned), nats", 0.0), ("top1_agreement", "top-1 agreement", 1.0),
              ("perplexity", "perplexity", orig["perplexity"])]
    for ax, (key, title, at_original) in zip(axes, panels):
        ax.plot(sizes, [v[key] for v in variants], "o", label="pruned")
        ax.plot([orig["bytes"] / gib], [at_original], "s", color="black", label="original")
        for x, v in zip(sizes, variants):
            ax.annotate(f"{v['experts_kept']}/{orig['experts']}", (x, v[key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel("checkpoint size (GiB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report['model'].get('architecture')}: {report['data'].get('predicted_positions')} predicted tokens "
                 f"of {report['data'].get('dataset', 'the evaluation data')}", fontsize=10)
    fig.tight_layout()
    import io

    from ..common.files import write_atomic

    png = io.BytesIO()  # drawn in memory, then written as every file is: complete or absent, errors naming it
    fig.savefig(png, dpi=120, format=plot_format(path))
    plt.close(fig)
    write_atomic(path, png.getvalue(), overwrite)
