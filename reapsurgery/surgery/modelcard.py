"""The output's README.md: the source's model card, kept intact, plus a record of the pruning."""

from __future__ import annotations

from .. import __version__
from ..common.checkpoint import Checkpoint
from ..common.mask import Mask

SECTION = "## Expert pruning (reapsurgery)"


def pruning_section(ckpt: Checkpoint, mask: Mask, experts_before: int, moe_layers: int,
                    dropped_layers: list[int]) -> str:
    E, kept = experts_before, mask.kept
    prov = mask.provenance
    lines = [
        SECTION,
        "",
        f"This checkpoint was pruned with reapsurgery {__version__}: routed experts were removed",
        "from every MoE layer; all other weights are byte-for-byte those of the source.",
        "",
        f"- Source: `{ckpt.path.resolve().name}` ({ckpt.fingerprint()['architecture']})",
        f"- Routed experts per MoE layer: {E} -> {kept} (sparsity {1 - kept / E:.3f}) in {moe_layers} MoE layers",
        f"- Mask sha256: `{mask.sha256 or 'n/a'}` (copy in `reapsurgery.mask.json`)",
    ]
    if prov.get("method"):
        lines.append(f"- Saliency method: {prov['method']}")
    if prov.get("saliency_sha256"):
        lines.append(f"- Saliency sha256: `{prov['saliency_sha256']}`")
    if dropped_layers:
        lines.append(f"- Dropped multi-token-prediction layers: {dropped_layers}")
    lines += ["", "Retained experts (original indices) per layer:", "", "| layer | retained experts |", "|---|---|"]
    lines += [f"| {layer} | {' '.join(map(str, keep))} |" for layer, keep in sorted(mask.layers.items())]
    return "\n".join(lines) + "\n"


def pruned_card(source_card: str | None, ckpt: Checkpoint, mask: Mask, experts_before: int,
                moe_layers: int, dropped_layers: list[int]) -> str:
    """The source's card (or a minimal one) with the pruning section appended."""
    section = pruning_section(ckpt, mask, experts_before, moe_layers, dropped_layers)
    if source_card is None:
        name = ckpt.path.resolve().name
        return f"---\ntags:\n- moe\n- pruned\n- reapsurgery\n---\n\n# {name} (experts pruned)\n\n{section}"
    return source_card.rstrip("\n") + "\n\n" + section
