"""Simple DoRA (write-up "Parameter Efficient Fine Tuning Ideas"): DoRA's magnitude/direction split
without DoRA's re-normalisation at every step.

DoRA ("DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al. 2024, arXiv:2402.09353) divides by
||W0 + s B A|| in every forward pass. Simple DoRA splits the frozen weight once,

    W = diag(w) W^0,   W^0 = rows of W scaled to unit norm (frozen),   w = ||W||_row (trainable, (out,))

and adds LoRA to the unit-norm direction only:

    h = w * (W^0 x + s B A x)        (the write-up's  x -> (x W^0 + x A B) * w)

so w scales both the frozen direction and the update, and nothing is normalised per step. At init
w = ||W|| and B = 0: the model is unchanged. We never materialise W^0: W^0 x = (W x) / ||W||, so the
base weight stays untouched and h = (w / ||W||) * W x + w * s B A x (w / ||W|| is exactly 1 at init).

Trains A, B (as LoRA, including its rsLoRA / gamma / LoRA+ options) and w; with LoRA+ w gets B's
boosted learning rate, as DoRA's magnitude does in minipeft/methods/dora.py and in Hugging Face PEFT.
Merges: W <- diag(w) (W^0 + s B A) = diag(w / ||W||) W + diag(w) s B A; unmerge restores a copy of
W kept at merge time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from .lora import LoRAConfig, LoRALinear


@dataclass
class SimpleDoRAConfig(LoRAConfig):
    """Same fields and defaults as LoRAConfig; the magnitude vector w is added per target."""

    method: ClassVar[str] = "simple_dora"


class SimpleDoRALinear(LoRALinear):
    peft_method = "simple_dora"

    def __init__(self, base: nn.Linear, config: SimpleDoRAConfig):
        super().__init__(base, config)
        row_norm = base.weight.detach().float().norm(dim=1)  # (out,): ||W||, so W^0 = W / row_norm
        self.register_buffer("row_norm", row_norm, persistent=False)  # frozen; recomputed from the base
        self.magnitude = nn.Parameter(row_norm.clone())  # w
        self.magnitude.lr_scale = config.loraplus_ratio  # LoRA+ boosts w too, as for DoRA (PEFT's choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        y = F.linear(x, self.base.weight)  # W x = row_norm * W^0 x
        w = self.magnitude
        out = ((w / self.row_norm) * y.float() + w * self.lora(self.dropout(x))).to(y.dtype)
        return out if self.base.bias is None else out + self.base.bias

    def merge(self) -> None:
        w = self.base.weight
        self.weight_before_merge = w.detach().clone()
        merged = (self.magnitude / self.row_norm)[:, None] * w.float() + self.magnitude[:, None] * self.delta_weight()
        w.copy_(merged.to(w.dtype))

    def unmerge(self) -> None:
        self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None


def apply(model: nn.Module, config: SimpleDoRAConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: SimpleDoRALinear(linear, config))
    peft.record(model, config)
    return model
