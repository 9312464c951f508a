"""The output's README.md: the source's model card, kept intact, plus a record of the pruning.

A source from the local Hugging Face cache (a hub id, or a path into the cache) is named by its
hub id in the card's front matter (`base_model:`), so the hub links the pruned model to it; the
source card's other front matter keys are kept. A plain directory gets no base_model: there is
no id to give it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import __version__
from ..common.checkpoint import Checkpoint, hub_source
from ..common.mask import Mask

SECTION = "## Expert pruning (reapsurgery)"


def pruning_section(ckpt: Checkpoint, mask: Mask, experts_before: int, moe_layers: int,
                    dropped_layers: list[int]) -> str:
    E, kept = experts_before, mask.kept
    prov = mask.provenance
    hub = hub_source(ckpt.path)
    source = (f"[`{hub[0]}`](https://huggingface.co/{hub[0]}) at revision `{hub[1]}`" if hub
              else f"`{ckpt.path.resolve().name}`")
    lines = [
        SECTION,
        "",
        f"This checkpoint was pruned with reapsurgery {__version__}: routed experts were removed",
        "from every MoE layer; all other weights are byte-for-byte those of the source.",
        "",
        f"- Source: {source} ({ckpt.fingerprint()['architecture']})",
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
        hub = hub_source(ckpt.path)
        name = hub[0] if hub else ckpt.path.resolve().name
        return f"---\ntags:\n- moe\n- pruned\n- reapsurgery\n---\n\n# {name} (experts pruned)\n\n{section}"
    return source_card.rstrip("\n") + "\n\n" + section


def write_card(path: Path, source_card: str | None, ckpt: Checkpoint, mask: Mask, experts_before: int,
               moe_layers: int, dropped_layers: list[int], note: Callable[[str], None] | None = None) -> None:
    """README.md of the output at `path`: pruned_card of the source's card (read before anything is
    written), with `base_model:` where the source has a hub id."""
    source = ckpt.path / "README.md"
    path.write_text(pruned_card(source_card, ckpt, mask, experts_before, moe_layers, dropped_layers))
    hub = hub_source(ckpt.path)
    if hub is None:
        return
    # the hub client's own reader and writer of card metadata (imported only here: 0.3 s)
    from huggingface_hub import metadata_load, metadata_save

    try:
        metadata = metadata_load(path) or {}
    except Exception as e:  # YAML errors of several types, or front matter that is not a mapping
        if note:
            note(f"{source}: the model card's front matter is not YAML the hub reads ({' '.join(str(e).split())[:200]}); "
                 f"kept as it is, without base_model: {hub[0]}")
        return
    metadata["base_model"] = hub[0]
    metadata.pop("base_model_relation", None)  # the source's relation to its own base, not ours to it
    metadata_save(path, metadata)
