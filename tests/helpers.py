from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from reapsurgery.checkpoint import Checkpoint
from reapsurgery.mask import Mask


def write_mask(ckpt: Path, keep: list[int] | dict[int, list[int]], path: Path) -> Path:
    c = Checkpoint.open(ckpt)
    layers = keep if isinstance(keep, dict) else {layer: list(keep) for layer in c.moe_layers}
    Mask(c.fingerprint(), layers, {"method": "manual"}).save(path)
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reapsurgery.cli", *map(str, args)],
                          capture_output=True, text=True)
