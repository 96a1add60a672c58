"""DoRA: "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al. 2024, arXiv:2402.09353).

The weight is split into a magnitude and a direction; LoRA updates the direction, a vector learns
the magnitude (equation 5):

    W' = m * (W0 + s B A) / ||W0 + s B A||,     h = W' x

with the norm taken per OUTPUT feature: the row norm of the (out, in) weight, a vector of shape (out,)
(the paper's "column-wise norm" of its (in, out) layout; Hugging Face PEFT's `lora_magnitude_vector`
has shape (out,) and `torch.linalg.norm(weight, dim=1)`). m starts at ||W0||, so with B = 0 the model
is unchanged at initialisation. Following section 4.3 the norm is treated as a constant in the
backward pass (detached), which saves memory at a negligible cost in accuracy.

Trains A, B (as LoRA, including its rsLoRA / gamma / LoRA+ options) and m (out,).
Merges: W <- m / ||W0 + s B A|| * (W0 + s B A). Unmerging restores a copy of W0 kept at merge time
(dividing the norm back out would be exact only up to rounding).

LoRA+ (`loraplus_ratio`): the magnitude m gets the boosted learning rate ratio * lr, like B. This
matches Hugging Face PEFT's `create_loraplus_optimizer`, which puts every 1-D trainable tensor (DoRA's
`lora_magnitude_vector`, biases) in its "groupB" at lr * loraplus_lr_ratio.

Dropout: we drop out only the LoRA branch's input, h = m/||.|| * (W0 x + s B A dropout(x)). PEFT
instead also rescales W0 applied to the dropped-out input during training; both agree in eval mode.
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
class DoRAConfig(LoRAConfig):
    """Same fields and defaults as LoRAConfig; the magnitude vector is added per target."""

    method: ClassVar[str] = "dora"


class DoRALinear(LoRALinear):
    peft_method = "dora"

    def __init__(self, base: nn.Linear, config: DoRAConfig):
        super().__init__(base, config)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self.weight_norm())  # m = ||W0 + s B A|| = ||W0|| (B = 0), (out,)
        self.magnitude.lr_scale = config.loraplus_ratio  # LoRA+ boosts m too, as PEFT does (docstring)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row, (out,) fp32; W0 is the unmerged base weight."""
        return (self.base.weight.float() + self.delta_weight()).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        scale = self.magnitude / self.weight_norm().detach()  # (out,); section 4.3: no gradient via the norm
        y = F.linear(x, self.base.weight)
        out = (scale * (y.float() + self.lora(self.dropout(x)))).to(y.dtype)
        return out if self.base.bias is None else out + self.base.bias  # the bias is not rescaled

    def merge(self) -> None:
        w = self.base.weight
        self.weight_before_merge = w.detach().clone()
        merged = (self.magnitude / self.weight_norm())[:, None] * (w.float() + self.delta_weight())
        w.copy_(merged.to(w.dtype))

    def unmerge(self) -> None:
        self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None


def apply(model: nn.Module, config: DoRAConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: DoRALinear(linear, config))
    peft.record(model, config)
    return model
