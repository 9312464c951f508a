"""The masks an evaluation compares, each checked against the checkpoint and sized as `apply` would
write it. No torch: `evaluate` refuses a bad mask, option or plan before the model is touched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..common.checkpoint import Checkpoint
from ..common.mask import Mask
from ..inspect import mask_size


@dataclass
class Variant:
    """One mask to evaluate; `label` says where it came from (a file, or saliency + option)."""

    mask: Mask
    mask_path: Path
    label: str
    sha256: str
    size: dict = field(default_factory=dict)  # inspect.mask_size: params and bytes before/after

    @property
    def experts_kept(self) -> int:
        return self.mask.kept


def sized_variant(mask: Mask, mask_path: str | Path, label: str, sha256: str, ckpt: Checkpoint) -> Variant:
    """Check the mask against the checkpoint (apply's own checks) and size what apply would write."""
    size = mask_size(mask, mask_path, ckpt.path, ckpt.layout)
    return Variant(mask, Path(mask_path), label, sha256, size)
