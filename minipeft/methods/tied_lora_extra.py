"""Tied-LoRA Extra: shared outer factors, a small per-layer matrix in the middle.

Tied-LoRA (Renduchintala et al., arXiv:2311.09578) lets each layer scale the shared factors only by
diagonal vectors. Here each layer gets a full small matrix M_i between them:

    y = W_i x + s * B M_i A x,        A (r1, in), B (out, r2) shared per target name; M_i (r2, r1)
    s = alpha / min(r1, r2)           (the update's rank is at most min(r1, r2); LoRA divides by r)

This is the structure of LoTR (Bershatsky et al., "LoTR: Low Tensor Rank Weight Adaptation",
arXiv:2402.01376: shared left and right factors, a per-layer core) and of FacT-TT (Jie & Deng,
arXiv:2212.03145) for one kind of weight. Tied-LoRA's diag(v_i) B diag(u_i) A is not a special case
(v_i acts on the out side), but with M_i = diag(u_i) and v_i = 1 it is.

Everything trains: A, B and every M_i. Initialisation leaves the model unchanged: B = 0; A is
uniform random from `seed`; M_i starts as the identity (eye(r2, r1)), so training begins exactly
as tied LoRA with B = 0 does.

Parameters: sum over targets t of r1*in_t + out_t*r2 + n_t*r2*r1, n_t the number of layers wrapped.
Merge: W_i += s B M_i A; unmerge restores W_i exactly (a copy kept while merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from .tied_lora import LowRankDelta, leaf_name, shared_factors, uniform


@dataclass
class TiedLoRAExtraConfig:
    method: ClassVar[str] = "tied_lora_extra"
    r1: int = 8                # rows of the shared A (r1, in)
    r2: int = 8                # columns of the shared B (out, r2)
    alpha: float = 16.0        # the update is scaled by alpha / min(r1, r2)
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # one A, B per leaf name; globs, "all-linear"
    seed: int = 0              # A's random values come from it


class TiedLoRAExtraLinear(LowRankDelta):
    peft_method = "tied_lora_extra"

    def __init__(self, base: nn.Linear, shared: nn.ParameterDict, scale: float, core: torch.Tensor):
        super().__init__(base, shared, scale)
        self.core = nn.Parameter(core)  # (r2, r1) M_i

    def core_matrix(self) -> torch.Tensor:
        """M_i (r2, r1)."""
        return self.core

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.shared["A"])     # (..., r1)
        h = F.linear(h, self.core_matrix())   # (..., r2)
        return self.scale * F.linear(h, self.shared["B"])  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.shared["B"] @ self.core_matrix() @ self.shared["A"]  # (out, in)


def apply(model: nn.Module, config: TiedLoRAExtraConfig) -> nn.Module:
    r1, r2, owned = config.r1, config.r2, {}

    def wrap(name: str, linear: nn.Linear) -> nn.Module:
        out_f, in_f = linear.weight.shape
        make = lambda g: {"A": uniform((r1, in_f), in_f, g), "B": torch.zeros(out_f, r2)}
        shared = shared_factors(model, owned, f"tied_lora_extra__{leaf_name(name)}", linear, config.seed,
                                make, {"A", "B"})
        core = torch.eye(r2, r1, device=linear.weight.device)
        return TiedLoRAExtraLinear(linear, shared, config.alpha / min(r1, r2), core)

    peft.inject(model, config.targets, wrap)
    peft.record(model, config)
    return model
