"""LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al. 2021, arXiv:2106.09685).

A frozen weight W (out, in) gets a trainable low-rank update:

    h = W x + s * gamma * B A x,    A: (r, in),  B: (out, r),  s = alpha / r

(rsLoRA, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski 2023,
arXiv:2312.03732: s = alpha / sqrt(r), so the update does not shrink as r grows.)
A starts Kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in)), as in microsoft/LoRA and Hugging Face PEFT, and
B starts at zero, so the model is unchanged at initialisation (section 4.1). Only A and B train.
Merges: W <- W + s*gamma*B A (same logits to float rounding). Unmerge restores W exactly, in every
dtype: merge keeps a copy of W (in W's dtype) until unmerge, because subtracting the product again is
off by rounding (in bf16 one merge + unmerge changed a third of the targeted weights). The cost is one
extra copy of each targeted weight while merged; merge_and_unload drops each copy at once.

`gamma`, the boost of the RANDOM factor (write-up "Parameter Efficient Fine Tuning Ideas"). The two
naming conventions, once: the write-up writes LoRA as x -> xW + xAB with A = 0, so ITS random factor
is B, and it calls gamma the "B-boost"; Hugging Face PEFT, the LoRA paper and this file write
h = W x + B A x with B = 0, so the random factor is A (`lora_A`). gamma always boosts the random
factor: the write-up's B is our A.

One factor starts at O(1), the other at zero. Adam moves every entry by about lr per step whatever
the gradient's size, so over training the random factor A changes by O(lr * steps), little relative
to itself: it stays close to a random projection. Multiply-divide reparameterisation: store A = A0 / gamma and
multiply the branch by gamma, so the forward pass uses A_eff = gamma * A = A0.
  * the function at init is unchanged (A_eff = A0), and so is B's gradient, which sees A only
    through A_eff: B trains as before;
  * dL/dA = gamma * dL/dA_eff. Adam's step ignores the gradient's scale, so dA is the same as
    without gamma and dA_eff = gamma * dA: A's effective learning rate is gamma x, and its relative
    change ||dA|| / ||A|| is gamma x larger. Under SGD dA = -lr * gamma * g_eff, dA_eff = gamma^2 x.

LoRA+ ("LoRA+: Efficient Low Rank Adaptation of Large Models", Hayou et al. 2024, arXiv:2402.12354):
the zero-initialised factor B gets learning rate ratio * lr (they recommend ratio 16); we tag
`B.lr_scale`, which `peft.param_groups` turns into an optimiser group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft


@dataclass
class LoRAConfig:
    method: ClassVar[str] = "lora"
    r: int = 8                   # rank of the update B A
    alpha: float = 16.0          # s = alpha / r (alpha / sqrt(r) with use_rslora); HF PEFT's default is 8
    dropout: float = 0.0         # dropout on the LoRA branch's input only (the base path sees x unchanged)
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # names, globs or "all-linear" (peft.match_targets)
    use_rslora: bool = False     # rank-stabilised scale alpha / sqrt(r) (arXiv:2312.03732)
    gamma: float = 1.0           # A initialised / gamma, branch * gamma: A's Adam learning rate x gamma
    loraplus_ratio: float = 1.0  # LoRA+: B's learning rate = ratio * lr (16 recommended; 1 = off)

    def __post_init__(self):
        if self.r < 1 or self.gamma <= 0 or not 0 <= self.dropout < 1 or self.loraplus_ratio <= 0:
            raise ValueError(f"{type(self).__name__}: need r >= 1, gamma > 0, 0 <= dropout < 1, "
                             f"loraplus_ratio > 0; got r={self.r}, gamma={self.gamma}, "
                             f"dropout={self.dropout}, loraplus_ratio={self.loraplus_ratio}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """base(x) + s * gamma * B A dropout(x); the adapter's weights are fp32 whatever the base dtype."""

    peft_method = "lora"

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.base, self.config = base, config
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, base.in_features, device=device))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # bound 1/sqrt(in), as loralib and HF PEFT
        with torch.no_grad():
            self.lora_A.div_(config.gamma)  # A = A0 / gamma; the branch is multiplied by gamma below
        self.lora_B.lr_scale = config.loraplus_ratio  # LoRA+ (read by peft.param_groups)
        self.scale = config.scaling * config.gamma
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("weight_before_merge", None, persistent=False)  # W while merged: exact unmerge

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `q_proj.weight` keeps working
        return self.base.weight

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the forward uses them (AdaMix-LoRA routes between copies here)."""
        return self.lora_A, self.lora_B

    def lora(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """s * gamma * B A x (+ y) in x's dtype (x already dropped out). The fp32 factors are cast to x's
        dtype, not x to theirs: x is the large tensor (tokens x in against r x in), and q, k and v read the
        same x, so each wrapper would copy it (and under autocast cast the copy back to bf16). The scale
        goes on the (tokens, r) product, the smallest tensor of the branch."""
        A, B = (t.to(x.dtype) for t in self.factors())
        h = F.linear(x, A) * self.scale  # (..., r)
        if y is None:
            return F.linear(h, B)
        # y + h B^T as one matmul that adds y while it writes (addmm): no pass of its own over y
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]).to(y.dtype),
                           B.t().to(y.dtype)).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """s * gamma * B A, (out, in) fp32: what merge() adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return self.lora(self.dropout(x), y)  # y + s * gamma * B A x

    def merge(self) -> None:
        peft.merge_delta_keeping_base(self, self.delta_weight())  # the sum in fp32, one rounding

    def unmerge(self) -> None:
        peft.restore_base(self)

    def extra_repr(self) -> str:
        return f"r={self.config.r}, scale={self.scale:g}, merged={self.merged}"


def apply(model: nn.Module, config: LoRAConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: LoRALinear(linear, config))
    peft.record(model, config)
    return model
