"""`reapsurgery inspect` and `architectures`: facts about files and families, formatted."""

from __future__ import annotations

from pathlib import Path

import click

from ..plan import METHODS
from .common import echo_mtp, emit_json, fmt, human, json_option, layout_from, layout_option, one_line_errors, table



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
    n = model["num_hidden_layers"]
    # the dense layers as spans between the MoE ones, not a list of every layer (a file may say 10^30)
    edges = [-1, *sorted(moe), n]
    dense = ", ".join(str(a + 1) if b - a == 2 else f"{a + 1}-{b - 1}" for a, b in zip(edges, edges[1:]) if b - a > 1)
    return [
        ("architecture", f"{model['architecture']} ({model['model_type']})"),
        ("decoder layers", f"{n}: MoE {_spans(moe)} ({len(moe)})" + (f", dense {dense}" if dense else "")),
        ("routed experts", f"{model['num_experts']} per MoE layer, top-k {model['num_experts_per_tok']}{groups}"),
    ]


def _echo_sizes(columns: list[tuple[str, dict]]) -> None:
    """Params and bytes side by side for one or more accounts (e.g. before / after)."""
    def cat(a, c, k):
        return a["by_category"][c][k]

    rows = [("", *(name for name, _ in columns))] if len(columns) > 1 else []
    rows.append(("params", *(_count(a["params"]) for _, a in columns)))
    rows.append(("active params/token", *(_count(a["active_params"]) for _, a in columns)))
    rows.append(("bytes", *(human(a["bytes"]) for _, a in columns)))
    for c, label in (("routed_experts", "routed experts"), ("routers", "routers"), ("mtp", "mtp layers"),
                     ("other", "everything else")):
        if any(cat(a, c, "params") for _, a in columns):
            rows.append((f"  {label}", *(f"{_count(cat(a, c, 'params'))} / {human(cat(a, c, 'bytes'))}"
                                         for _, a in columns)))
    rows.append(("tensors", *(a["tensors"] for _, a in columns)))
    dtypes = sorted({d for _, a in columns for d in a["dtypes"]})
    rows.append(("dtypes", *(" ".join(f"{d}:{human(a['dtypes'][d]['bytes'])}" for d in dtypes if d in a["dtypes"])
                             for _, a in columns)))
    table(rows)


ACTIVE_NOTE = "(params: stored tensor elements; active: non-expert + top_k/E of routed-expert params, mtp excluded)"


def _quant(q: dict | None) -> str:
    if not q:
        return "none"
    details = [str(q[k]) for k in ("fmt", "format", "quant_algo") if q.get(k)]
    if q.get("weight_block_size"):
        details.append("blocks " + "x".join(map(str, q["weight_block_size"])))
    return f"{q.get('method')}" + (f" ({', '.join(details)})" if details else "")


def _echo_checkpoint(f: dict) -> None:
    table([("checkpoint", f["path"]), ("layout", f"{f['layout']}, {f['shards']} shard(s)"),
            *_model_rows(f["model"], f["topk_group"]),
            ("quantization", _quant(f.get("quantization")))], indent="")
    click.echo("size:")
    _echo_sizes([("", f["size"])])
    click.echo(ACTIVE_NOTE)


def _echo_gguf(f: dict) -> None:
    nextn, pruned = f["nextn"], f["pruned"]
    rows = [("gguf", f["path"] + (f" (+{len(f['files']) - 1} split parts)" if len(f["files"]) > 1 else "")),
            *_model_rows(f["model"], f["topk_group"]),
            ("hidden size", f["model"]["hidden_size"]),
            ("nextn blocks", f"{nextn['announced']} announced, stored: {_spans(nextn['stored'])}"),
            ("size label", f["size_label"] or "-")]
    if pruned:
        rows.append(("pruned", f"by reapsurgery: {pruned['experts_before']} -> {pruned['experts_after']} routed experts, "
                               f"mask sha256 {pruned['mask_sha256']}"))
    table(rows, indent="")
    click.echo("size:")
    _echo_sizes([("", f["size"])])
    click.echo(ACTIVE_NOTE)


def _echo_mask(f: dict) -> None:
    prov = f["provenance"]
    rows = [("mask", f["path"]), ("sha256", f["sha256"]), *_model_rows(f["model"]),
            ("kept", f"{f['experts_before']} -> {f['experts_after']} routed experts in each of {f['moe_layers']} "
                     f"MoE layers (sparsity {fmt(f['sparsity'])})"),
            ("method", prov.get("method", "-"))]
    if prov.get("saliency_sha256"):
        rows.append(("saliency sha256", prov["saliency_sha256"]))
    size = f["size"]
    if not size:
        share = f["active_expert_share"]
        rows.append(("size", f"routed-expert params kept: {f['routed_expert_share_kept']:.1%}; a token uses "
                             f"{share['before']:.1%} -> {share['after']:.1%} of them; pass --ckpt CKPT for bytes and params"))
    table(rows, indent="")
    if size:
        click.echo(f"size, applied to {size['checkpoint']}:")
        _echo_sizes([("before", size["before"]), ("after", size["after"])])
        if "bytes_saved" in size:
            click.echo(f"bytes saved: {human(size['bytes_saved'])}" + (
                f" (in its own format, {_quant(size['quantization'])})" if size.get("quantization") else ""))
        click.echo(ACTIVE_NOTE)
        where = "metadata" if size.get("format") == "gguf" else "config.json"
        for key, (old, new) in size["config_changes"].items():
            click.echo(f"{where}: {key} {old} -> {new}")
        echo_mtp(size["mtp_dropped"], size["kept_mtp_layers"], size["notes"], True, "")
    click.echo("kept experts per layer:")
    table([(f"{layer}:", " ".join(map(str, kept))) for layer, kept in f["layers"].items()])


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
    table(rows, indent="")
    click.echo(f"{f['method']} scores per layer, over the experts routed at least once:")
    rows = [("layer", "tokens", "routed pairs", "never routed", "min", "median", "max", "max/min")]
    for layer, l in f["layers"].items():
        s = l["scores"] or {}
        never = l["never_routed"]
        listed = " ".join(map(str, never[:8])) + (" ..." if len(never) > 8 else "")
        rows.append((layer, _count(l["tokens"]), _count(l["routed_pairs"]), f"{len(never)}" + (f" ({listed})" if never else ""),
                     fmt(s.get("min")), fmt(s.get("median")), fmt(s.get("max")), fmt(s.get("max_over_min"))))
    table(rows)
    sup = f["super_experts"]
    for label, key in (("first 75% of MoE layers", "first_75_percent"), ("all MoE layers", "all_layers")):
        found = " ".join(f"{l}:{e}" for l, es in sup[key].items() for e in es) or "none"
        click.echo(f"super experts, {label} (max activation > {fmt(sup['threshold'])}): {found}")


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--ckpt", type=click.Path(path_type=Path), metavar="CKPT",
              help="For a mask: the checkpoint, to compute bytes and parameters before and after.")
@click.option("--method", type=click.Choice(METHODS), default="reap", show_default=True,
              help="For a saliency file: the score whose spread is shown.")
@layout_option
@json_option
@one_line_errors
def inspect_cmd(path: Path, ckpt: Path | None, method: str, as_json: bool, layout_file: Path | None) -> None:
    """Describe a checkpoint, a GGUF file, a saliency file or a mask.

    \b
    checkpoint: architecture, MoE layers, experts and top-k, parameter and byte
                counts (total, active per token, by kind and dtype)
    gguf:       the same from the GGUF header (ggml types), NextN blocks, size
                label, and the mask reapsurgery recorded if it pruned the file
    saliency:   per-layer tokens, never-routed experts, spread of scores, super experts
    mask:       experts kept; with --ckpt (a checkpoint or a GGUF file), size before
                and after (bytes, params, active params) exactly as `apply` would write it

    Active params = non-expert params + top_k/E of the routed-expert params: roughly
    what one token uses. Only headers and config are read.
    """
    from ..inspect import inspect_path

    facts = inspect_path(path, ckpt, method, layout_from(layout_file))
    if as_json:
        emit_json(facts)
        return
    {"checkpoint": _echo_checkpoint, "mask": _echo_mask, "saliency": _echo_saliency,
     "gguf": _echo_gguf}[facts["kind"]](facts)


@click.command()
@json_option
@click.option("--derive", "derive_from", type=click.Path(path_type=Path), metavar="CKPT",
              help="Print the layout derived from transformers' model for CKPT (JSON, accepted by --layout).")
@one_line_errors
def architectures(as_json: bool, derive_from: Path | None) -> None:
    """List the MoE families supported: the built-in layouts, with the config keys each reads,
    and every MoE model type of transformers as the census measured it (supported with a built-in
    or derived layout, refused and why), with the transformers version it was measured with.

    \b
    A checkpoint's family is found from config.json: model_type (of the text config
    where one is nested), then architectures[0]. Any other family that transformers
    builds gets its layout derived from the model itself (expert-indexed tensors are
    those whose shape follows the expert count; names come from the model's own
    conversion mapping). `--derive CKPT` prints that layout; save it, edit it if
    needed, and pass it with --layout to override.
    """
    if derive_from is not None:
        from ..common.checkpoint import derive_entry

        emit_json(derive_entry(derive_from))
        return
    from ..common.layouts import describe_layouts
    from ..common.support import by_status, census, installed_transformers

    rows = describe_layouts()
    data = census()
    if as_json:
        emit_json({"built_in": rows, "census": data})
        return

    def rule(r: dict) -> str:
        parts = [f"{k}={v}" for k, v in r["moe_layers"].items()]
        return ", ".join(parts) or "every layer"

    click.echo("Built-in layouts:")
    rows_out = [("model_type", "architectures", "expert count", "top-k", "MoE layers", "groups, MTP")]
    for r in rows:
        extra = []
        if r["groups"]:
            extra.append(f"{r['groups']['n_group']}/{r['groups']['topk_group']}")
        if r["mtp_layers"]:
            extra.append(r["mtp_layers"] + (" (--mtp calibrate)" if r["mtp_block"] else ""))
        rows_out.append((r["name"], " ".join(r["architectures"]), " ".join(r["num_experts"]), " ".join(r["top_k"]),
                      rule(r), ", ".join(extra) or "-"))
    table(rows_out, indent="  ")
    groups = by_status(data)
    total = len(data["model_types"])
    click.echo(f"\nEvery MoE model type of transformers {data['transformers']}, as the census measured it on "
               f"{data['date']} (calibrate, plan, apply, verify, load):")
    click.echo(f"supported ({len(groups['supported'])} of {total}):")
    table([(mt, e["class"], e["layout"]) for mt, e in groups["supported"].items()], indent="  ")
    for st, title in (("refused", "refused, with why"), ("fails", "fails"),
                      ("not run", "not run: transformers rejects a generic tiny config; no verdict")):
        if groups[st]:
            click.echo(f"{title} ({len(groups[st])}):")
            for mt, e in groups[st].items():
                click.echo(f"  {mt}: {e['reason']}")
    installed = installed_transformers()
    if installed and installed != data["transformers"]:
        click.echo(f"note: transformers {installed} is installed; these were measured with {data['transformers']} "
                   "(`python -m fixtures.census --write` from a source checkout measures them again)", err=True)
