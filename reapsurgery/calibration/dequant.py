"""Dequantising a quantized checkpoint's tensors as they are read, one layer at a time.

Calibration runs the model unquantized in the compute dtype (CPU, or GPUs without FP8 or
MXFP4 kernels), so a quantized weight and its companions (scales) are read together and
turned into the one full-precision tensor they stand for, under the weight's own name; the
companions never reach the model. Nothing else of the checkpoint is ever dequantised.

- Block FP8 (`quant_method: fp8`, DeepSeek-V3 style): `X.weight` (F8) times `X.weight_scale_inv`
  expanded over `weight_block_size` blocks (edge blocks cut, as the FP8 kernels compute).
Decoding runs on the compute device (`read_layer_tensors(..., device)`): the quantized bytes
and scales travel there as stored and every decoder below is plain torch, so a GPU decodes
at its own speed and the CPU runs the very same code.

- MXFP4 (gpt-oss): `X_blocks` + `X_scales` -> `X`, with transformers' own
  `convert_moe_packed_tensors`.
- compressed-tensors (llm-compressor): `X.weight_packed` or `X.weight` with `X.weight_scale`,
  `X.weight_zero_point`, `X.weight_shape`, ... -> `X.weight`, with the `compressed-tensors`
  library's own decompressor for the module's format and scheme (the library must be installed).

Activation quantization (static FP8 input scales, NVFP4 input scales) is not simulated: the
weights are what the quantized model holds, the activations stay in the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from ..common.checkpoint import Checkpoint
from ..errors import ReapError
from .finite import check_weight
from .shardread import ShardFiles
from .timing import TIMINGS

SUPPORTED = ("fp8", "mxfp4", "compressed-tensors")
ACTIVATION_COMPANIONS = ("input_scale", "activation_scale", "input_global_scale", "input_zero_point", "output_scale")
CT_COMPANIONS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale")


def quantization_config(config: dict) -> dict | None:
    for d in (config, config.get("text_config") or {}):
        if isinstance(d, dict) and isinstance(d.get("quantization_config"), dict):
            return d["quantization_config"]
    return None


def strip_quantization(config) -> None:
    """Drop quantization_config from a transformers config (and its text config) in place, so the
    model is built unquantized in the compute dtype."""
    for c in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if c is not None and hasattr(c, "quantization_config"):
            try:
                delattr(c, "quantization_config")
            except AttributeError:
                c.quantization_config = None


@dataclass
class Dequantizer:
    method: str
    block: tuple[int, int] | None
    # logical (full-precision) key -> the checkpoint keys it is made from, the quantized one first
    sources: dict[str, list[str]] = field(default_factory=dict)
    qc: dict = field(default_factory=dict)

    @classmethod
    def for_checkpoint(cls, ckpt: Checkpoint) -> "Dequantizer | None":
        qc = quantization_config(ckpt.config)
        if qc is None:
            return None
        method = qc.get("quant_method")
        if method not in SUPPORTED:
            raise ReapError(ckpt.path / "config.json",
                            f"calibration cannot dequantise quant_method {method!r} (supported: {', '.join(SUPPORTED)}); "
                            "calibrate on an unquantized or dequantised copy and apply the mask to this checkpoint")
        block = tuple(qc["weight_block_size"]) if method == "fp8" and qc.get("weight_block_size") else None
        keys = set(ckpt.weight_map)
        sources: dict[str, list[str]] = {}
        if method == "compressed-tensors":
            try:
                import compressed_tensors  # noqa: F401
            except ImportError:
                raise ReapError(ckpt.path / "config.json", "calibrating a compressed-tensors checkpoint needs the "
                                "compressed-tensors library: pip install compressed-tensors") from None
        for key in sorted(keys):
            if method == "compressed-tensors":
                module, _, leaf = key.rpartition(".")
                if leaf in CT_COMPANIONS + ACTIVATION_COMPANIONS and (f"{module}.weight" in keys or f"{module}.weight_packed" in keys):
                    continue
                if leaf in ("weight", "weight_packed") and f"{module}.weight_scale" in keys:
                    sources[f"{module}.weight"] = [key] + [f"{module}.{c}" for c in CT_COMPANIONS if f"{module}.{c}" in keys]
                else:
                    sources[key] = [key]
            elif method == "fp8":
                if key.endswith("_scale_inv"):
                    if key.removesuffix("_scale_inv") not in keys:
                        raise ReapError(ckpt.path, f"scale {key!r} has no weight {key.removesuffix('_scale_inv')!r}")
                    continue
                if key.rpartition(".")[2] in ACTIVATION_COMPANIONS:
                    continue
                sources[key] = [key] + ([key + "_scale_inv"] if key + "_scale_inv" in keys else [])
            else:
                if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" in keys:
                    continue
                if key.endswith("_blocks"):
                    base = key.removesuffix("_blocks")
                    if base + "_scales" not in keys:
                        raise ReapError(ckpt.path, f"MXFP4 blocks {key!r} have no {base + '_scales'!r}")
                    sources[base] = [key, base + "_scales"]
                else:
                    sources[key] = [key]
        return cls(method, block, sources, qc)

    def make(self, key: str, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        names = self.sources[key]
        if len(names) == 1:
            return raw[names[0]]
        if self.method == "fp8":
            return dequantize_fp8_block(raw[names[0]], raw[names[1]], self.block)
        if self.method == "compressed-tensors":
            return self._decompress(key, {n.rpartition(".")[2]: raw[n] for n in names})
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(raw[names[0]], raw[names[1]], dtype=torch.float32)

    def _decompress(self, key: str, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """compressed-tensors: the library's own decompressor for the module's format and scheme."""
        from compressed_tensors.compressors import BaseCompressor

        scheme = _ct_scheme(self.qc, key.removesuffix(".weight"))
        compressor = BaseCompressor.get_value_from_registry(scheme.format or self.qc.get("format"))
        return compressor.decompress(local, scheme)["weight"].to(torch.float32)


def _ct_scheme(qc: dict, module: str):
    """The config group that quantizes `module`: one whose `re:` targets match it, else one
    targeting a class (Linear), as compressed-tensors assigns them."""
    import re

    from compressed_tensors.quantization import QuantizationScheme

    groups = list((qc.get("config_groups") or {}).values())
    for group in groups:
        if any(t.startswith("re:") and re.match(t[3:], module) for t in group.get("targets", [])):
            return QuantizationScheme.model_validate(group)
    for group in groups:
        if any(not t.startswith("re:") for t in group.get("targets", [])):
            return QuantizationScheme.model_validate(group)
    raise ReapError(None, f"no compressed-tensors config group covers {module!r}")


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """F32 weight of block-FP8 `q` [.., out, in] with `scale_inv` [.., ceil(out/bo), ceil(in/bi)]."""
    w = q.to(torch.float32)
    s = scale_inv.to(torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    rows, cols = w.shape[-2:]
    if block is None:  # no block size in the config: derive it from the grid
        block = (math.ceil(rows / s.shape[-2]), math.ceil(cols / s.shape[-1]))
    bo, bi = block
    if s.shape[-2:] != (math.ceil(rows / bo), math.ceil(cols / bi)):
        raise ReapError(None, f"FP8 scale grid {list(s.shape)} does not fit a weight {list(w.shape)} in {bo}x{bi} blocks")
    s = s.repeat_interleave(bo, dim=-2)[..., :rows, :].repeat_interleave(bi, dim=-1)[..., :cols]
    return w * s


def _dequantizer(ckpt: Checkpoint) -> Dequantizer | None:
    if "_dequantizer" not in ckpt.__dict__:
        ckpt.__dict__["_dequantizer"] = Dequantizer.for_checkpoint(ckpt)
    return ckpt.__dict__["_dequantizer"]


def is_quantized(ckpt: Checkpoint) -> bool:
    """Whether reading this checkpoint dequantises (its tensors then go through read_layer_tensors)."""
    return _dequantizer(ckpt) is not None


def logical_keys(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensor names as an unquantized checkpoint would have them."""
    d = _dequantizer(ckpt)
    return list(ckpt.weight_map) if d is None else list(d.sources)


def read_layer_tensors(ckpt: Checkpoint, keys: list[str], device: str | torch.device = "cpu",
                       files: ShardFiles | None = None) -> dict[str, torch.Tensor]:
    """The named (logical) tensors on `device`: stored bytes are read (pread, `files` reused
    across calls), moved to `device` as stored (quantized bytes and scales, 1-2 bytes an element
    instead of 4) and dequantised there to float32 where quantized; the same torch code on CPU."""
    d = _dequantizer(ckpt)
    needed = [s for k in keys for s in (d.sources[k] if d else [k])]
    own = files is None
    files = ShardFiles(ckpt) if own else files
    try:
        raw = {k: files.read(k) for k in needed}
    finally:
        if own:
            files.close()
    if torch.device(device).type != "cpu":
        with TIMINGS.phase("host-to-device"):
            raw = {k: t.to(device) for k, t in raw.items()}
    if d is None:
        out = raw
    else:
        with TIMINGS.phase("dequantise"):
            out = {k: d.make(k, raw) for k in keys}
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)  # count the decode here, not in whatever waits next
    for k in keys:  # named by the stored tensor (a quantized weight's own bytes, not its scales)
        stored = d.sources[k][0] if d else k
        check_weight(ckpt.path / ckpt.weight_map[stored], stored, out[k])
    return out
