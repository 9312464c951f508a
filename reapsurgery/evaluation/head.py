"""The language-model head over final hidden states, and the next-token metrics.

Logits come from the model class's own forward (the decoder replaced by a stand-in that
returns the given final-normed hidden states), so whatever the family does between the
decoder and the logits (Granite's `logits_scaling`, softcapping) is done as transformers does it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers.modeling_outputs import MoeModelOutputWithPast

from ..calibration.finite import check_computed
from ..calibration.streaming import StreamedModel
from ..errors import ReapError

LOGIT_ELEMENTS = 1 << 23  # logits computed per chunk of positions (x vocab): 32 MiB of float32


def text_lm(model: nn.Module) -> nn.Module:
    """What runs text: the model, or a wrapper's language model where that holds the LM head
    (Llama4ForConditionalGeneration's text-only forward fails in transformers 5.24)."""
    lm = getattr(model, "language_model", None)
    return lm if lm is not None and hasattr(lm, "lm_head") else model


def load_head(streamed: StreamedModel) -> nn.Module:
    """Fill the output embeddings (the LM head) from the checkpoint: its own tensor, or the
    input embeddings' where the model ties them."""
    model = text_lm(streamed.model)
    head = model.get_output_embeddings()
    if head is None:
        raise ReapError(streamed.ckpt.path, f"{type(model).__name__} has no output embeddings (LM head)")
    names = {id(m): n for n, m in streamed.model.named_modules()}
    prefix = names[id(head)] + "."
    keys = [k for k in streamed.ckpt.weight_map if streamed.converter.target(k)[0].startswith(prefix)]
    if not keys:
        embed = names[id(streamed.model.get_input_embeddings())] + ".weight"
        keys = [k for k in streamed.outer_keys if streamed.converter.target(k)[0] == embed]
        if not keys:
            raise ReapError(streamed.ckpt.path, "no LM head tensor and no input embeddings to tie it to")
        weight = next(iter(streamed._convert(keys, "LM head (tied input embeddings)").values()))
        head._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        return head
    for name, t in streamed._convert(keys, "LM head").items():
        head._parameters[name[len(prefix):]] = nn.Parameter(t, requires_grad=False)
    return head


class _Given(nn.Module):
    """Stands in for the decoder: returns `hidden`, final-normed."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.hidden = norm, None

    def forward(self, *args, **kwargs):
        return MoeModelOutputWithPast(last_hidden_state=self.norm(self.hidden))


@contextlib.contextmanager
def head_only(streamed: StreamedModel) -> Iterator:
    """A function hidden [B, T, H] (decoder output before the final norm) -> logits, run
    through the model's own forward."""
    model = text_lm(streamed.model)
    names = {id(m): n for n, m in streamed.model.named_modules()}
    parent_name, _, attr = names[id(streamed.decoder)].rpartition(".")
    parent = streamed.model.get_submodule(parent_name)
    given = _Given(streamed.final_norm())
    config = model.config
    saved_router_logits = getattr(config, "output_router_logits", None)
    parent._modules[attr] = given
    if saved_router_logits is not None:
        config.output_router_logits = False  # no auxiliary loss from a stand-in

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        given.hidden = hidden
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        out = model(input_ids=ids, use_cache=False)
        check_computed(streamed.ckpt.path, "the LM head: its logits", out.logits, streamed.dtype)
        return out.logits

    try:
        yield logits
    finally:
        parent._modules[attr] = streamed.decoder
        if saved_router_logits is not None:
            config.output_router_logits = saved_router_logits


MAX_LOG = math.log(sys.float_info.max)  # exp() of more is not a float


@dataclass
class TokenMetrics:
    """float64 sums over predicted positions (a real token followed by a real token)."""

    positions: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0

    def perplexity(self) -> float:
        mean = self.nll / self.positions
        return math.exp(mean) if mean < MAX_LOG else math.inf

    def to_json(self, original: bool = False) -> dict:
        """`perplexity` is null where it exceeds the float range (mean_nll says by how much): JSON has no infinity."""
        ppl = self.perplexity()
        out = {"perplexity": ppl if math.isfinite(ppl) else None, "mean_nll": self.nll / self.positions}
        if original:
            return out
        return {**out, "kl_mean": self.kl / self.positions, "top1_agreement": self.agree / self.positions}


@dataclass
class LayerError:
    """Sums of ||h_variant - h_original||^2 and ||h_original||^2 over real positions."""

    diff: float = 0.0
    ref: float = 0.0

    def add(self, variant: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> None:
        v, o = variant.reshape(-1, variant.shape[-1])[mask], original.reshape(-1, original.shape[-1])[mask]
        self.diff += float(torch.sum((v.double() - o.double()) ** 2))
        self.ref += float(torch.sum(o.double() ** 2))

    def relative(self) -> float:
        return math.sqrt(self.diff / self.ref) if self.ref else 0.0


def score(logits_of, vocab: int, original: list[torch.Tensor], variants: list[list[torch.Tensor]],
          batches: list[tuple[torch.Tensor, torch.Tensor]], bar=None,
          shift: int = 1) -> tuple[TokenMetrics, list[TokenMetrics]]:
    """Next-token metrics of the original and every variant from their final hidden states.

    At position t of a sample, with a real token y = ids[t + shift] (the next one; an MTP layer of
    depth d predicts shift = d + 1): NLL = -log p(y); KL(p_original || p_variant) in nats;
    agreement when the argmaxes are equal."""
    base = TokenMetrics()
    out = [TokenMetrics() for _ in variants]
    for b, (ids, am) in enumerate(batches):
        ids, am = ids.to(original[b].device), am.to(original[b].device)
        predicted = am[:, :-shift].bool() & am[:, shift:].bool()  # [B, T-shift]
        step = max(1, LOGIT_ELEMENTS // vocab)
        for row in range(ids.shape[0]):
            n = int(predicted[row].sum())
            if n == 0:
                continue
            targets = ids[row, shift : n + shift]
            for start in range(0, n, step):
                stop = min(n, start + step)
                y = targets[start:stop]
                lo = torch.log_softmax(logits_of(original[b][row : row + 1, start:stop]).float()[0], dim=-1)
                _add(base, lo, y)
                top_o = lo.argmax(-1)
                p_o = lo.exp()
                for v, hidden in enumerate(variants):
                    lv = torch.log_softmax(logits_of(hidden[b][row : row + 1, start:stop]).float()[0], dim=-1)
                    _add(out[v], lv, y)
                    out[v].kl += float(torch.sum(p_o * (lo - lv), dtype=torch.float64))
                    out[v].agree += int((lv.argmax(-1) == top_o).sum())
        if bar:
            bar.update(1)
    return base, out


def _add(m: TokenMetrics, logp: torch.Tensor, y: torch.Tensor) -> None:
    m.positions += y.numel()
    m.nll -= float(logp.gather(1, y[:, None]).sum(dtype=torch.float64))
