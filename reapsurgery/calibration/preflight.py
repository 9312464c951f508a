"""What calibrate and evaluate check before torch is imported, so that a refusal costs nothing.

Importing torch and transformers takes seconds (tens on a loaded machine); everything here
answers from files alone. Where it cannot be sure, it says nothing and torch decides later
(calibrate.resolve_device).
"""

from __future__ import annotations

import ctypes
import os
import sys

from ..common.checkpoint import Checkpoint
from ..errors import ReapError


def check_device(device: str) -> None:
    """Refuse --device cuda[:N] where this machine certainly has no CUDA device."""
    why = why_no_cuda() if device.startswith("cuda") else None
    if why:
        raise ReapError(None, f"--device {device}: no CUDA device is available ({why})")


def why_no_cuda() -> str | None:
    """Why torch.cuda.is_available() is certainly False here, found without importing torch; None when
    it may be True.

    macOS: torch has no CUDA builds there. Linux: a CUDA build of torch reaches the GPU through
    the NVIDIA driver's libcuda.so.1, found by the dynamic loader as this lookup finds it; a ROCm
    build answers torch.cuda through AMD's driver, which needs /dev/kfd. Neither present: no device.
    Anywhere else (Windows, WSL's driver, a driver present but no device), torch decides."""
    if sys.platform == "darwin":
        return "torch has no CUDA on macOS"
    if sys.platform != "linux" or os.path.exists("/dev/kfd"):
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver here: libcuda.so.1 cannot be loaded"
    return None


def mtp_layers_on_disk(ckpt: Checkpoint) -> list[int]:
    """Layers stored past the decoder stack, read from the index alone (no model built);
    refuses when there are none or the family's layout cannot calibrate them."""
    layout, n = ckpt.layout, ckpt.num_hidden_layers
    if not layout.mtp_block:
        raise ReapError(ckpt.path / "config.json", f"--mtp calibrate: the {layout.name} layout describes no "
                                                   "multi-token-prediction block (mtp_block); its MTP tensors can only be dropped")
    layers = ckpt.stored_mtp_layers()
    if not layers:
        count = layout.mtp_count(ckpt.cfg)
        raise ReapError(ckpt.path, f"--mtp calibrate: no multi-token-prediction layer on disk (no layer {n} or later; "
                                   f"config {layout.mtp_key}={count})")
    return layers
