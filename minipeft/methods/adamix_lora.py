"""AdaMix over LoRA: M copies of each LoRA factor, random routing in training, averaged for serving.

Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning",
arXiv:2205.12410, with LoRA (Hu et al. 2021, arXiv:2106.09685) as the adaptation module: each
targeted Linear keeps M copies A_1..A_M (r, in) and B_1..B_M (out, r) (the authors'
AdamixMergedLinear in their NLG code).

    training:  h = W x + s B_j A_i x        i, j drawn uniformly at random in every forward
    serving:   h = W x + s B_bar A_bar x    A_bar = mean_i A_i,  B_bar = mean_j B_j

The copies start identical (one Kaiming-uniform A, B = 0, copied M times, as the authors deep-copy
one LoRA), so the model starts as the base model and the averages are of copies trained from a
common start. The consistency regulariser, lambda * 1/2 (KL(z_A || z_B) + KL(z_B || z_A)) between
two forwards with different routings, is adamix.py's ConsistencyLoss, through peft.add_extra_loss.
`share_a` / `share_b` keep one shared A (or B), as section 3.4's module sharing.

Trains: per target, (M or 1) * r * in + (M or 1) * out * r. llama-3.2-1b, q_proj and v_proj, r = 8,
M = 4: 4 * 851,968 = 3,407,872 (0.276% of the base's weights); served: 851,968, what one
LoRA costs.
Merges: yes, after averaging: W <- W + s B_bar A_bar (eval-mode outputs, to float rounding); the
LoRA options (alpha, use_rslora, gamma, loraplus_ratio, dropout) behave as in lora.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .adamix import ConsistencyLoss
from .lora import LoRAConfig, LoRALinear


@dataclass
class AdaMixLoRAConfig(LoRAConfig):  # r, alpha, dropout, targets, use_rslora, gamma, loraplus_ratio as there
    method: ClassVar[str] = "adamix_lora"
    n_experts: int = 4                # M copies of each factor (the paper: 4)
    share_a: bool = False             # one A shared by all copies of B (section 3.4)
    share_b: bool = False             # one B shared by all copies of A
    consistency_weight: float = 1.0   # lambda on the symmetric KL; 0 turns the second forward off

    def __post_init__(self):
        super().__post_init__()
        if self.n_experts < 1 or self.consistency_weight < 0:
            raise ValueError(f"AdaMixLoRAConfig: need n_experts >= 1 and consistency_weight >= 0, got "
                             f"n_experts={self.n_experts}, consistency_weight={self.consistency_weight}")


class MixtureLoRALinear(LoRALinear):
    """LoRALinear whose A and B are stacks of copies: routed in training, averaged otherwise."""

    peft_method = "adamix_lora"

    def __init__(self, base: nn.Linear, config: AdaMixLoRAConfig):
        super().__init__(base, config)
        M = config.n_experts
        A, B = self.lora_A.detach(), self.lora_B.detach()
        del self.lora_A, self.lora_B  # replaced by their stacks of copies
        self.experts_A = nn.Parameter(A.expand(1 if config.share_a else M, -1, -1).clone())  # (M, r, in)
        self.experts_B = nn.Parameter(B.expand(1 if config.share_b else M, -1, -1).clone())  # (M, out, r)
        self.experts_B.lr_scale = config.loraplus_ratio

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): one random copy of each while training (stochastic routing), else the averages."""
        if not self.training:
            return self.experts_A.mean(0), self.experts_B.mean(0)
        i = int(torch.randint(len(self.experts_A), ()))
        j = int(torch.randint(len(self.experts_B), ()))
        return self.experts_A[i], self.experts_B[j]

    def delta_weight(self) -> torch.Tensor:
        """s * gamma * B_bar A_bar: the averaged update, what merge() adds to W."""
        return (self.experts_B.mean(0) @ self.experts_A.mean(0)) * self.scale


def apply(model: nn.Module, config: AdaMixLoRAConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: MixtureLoRALinear(linear, config))
    if config.consistency_weight > 0 and not any(isinstance(f, ConsistencyLoss)
                                                 for f in getattr(model, "peft_extra_losses", [])):
        peft.add_extra_loss(model, ConsistencyLoss(config.consistency_weight))
    peft.record(model, config)
    return model
