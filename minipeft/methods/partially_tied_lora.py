"""Partially tied LoRA: each layer mixes its factors from a few shared slices.

A dial between LoRA and Tied-LoRA (Renduchintala et al., arXiv:2311.09578); minipeft's own
generalisation, not the method of a paper we know of. For each target name
(q_proj, ...) there are two shared stacks, L_A (l_A, r, in) and L_B (l_B, out, r), and each layer i
has mixing vectors w_i^A (l_A) and w_i^B (l_B) that build its own factors:

    A_i = sum_k w_ik^A L_A[k]        (einsum 'kmn,k->mn')
    B_i = sum_k w_ik^B L_B[k]
    y   = W_i x + s * diag(v_i) B_i diag(u_i) A_i x,        s = alpha / r

with the optional Tied-LoRA vectors v_i (out), u_i (r) (`scale_vectors`). With l_A = l_B = 1 and
scale_vectors this is exactly Tied-LoRA (the scalar mixing weights fold into u_i, v_i); with
l_A = l_B = n_layers and one-hot w_i it is exactly LoRA, each layer owning its slice. Both statements
are pinned by tests; 1 <= l <= n_layers is required (more slices add nothing but parameters). The
stacks are stored in nn.Linear's layout, A as (r, in), so a slice is a LoRA factor as it stands.

Everything trains: the shared stacks, the mixing vectors and, if used, u and v.
Initialisation leaves the model unchanged: L_B = 0, so every B_i = 0; L_A is uniform random from
`seed`; layer i's mixing vectors are one-hot on slice i * l // n_layers (each layer its own slice
when l = n_layers, all on one when l = 1); u, v start at 1.

Parameters: sum over targets t of l_A*r*in_t + l_B*out_t*r + n_t*(l_A + l_B) [+ n_t*(out_t + r)
with scale_vectors], n_t the number of layers wrapped. Merge: W_i += s diag(v_i) B_i diag(u_i) A_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .tied_lora import TiedLoRALinear, check_slices, leaf_name, one_hot_mixing, shared_factors, uniform


@dataclass
class PartiallyTiedLoRAConfig:
    method: ClassVar[str] = "partially_tied_lora"
    r: int = 8                 # rank of every A_i (r, in) and B_i (out, r)
    alpha: float = 16.0        # the update is scaled by alpha / r
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # one L_A, L_B per leaf name; globs, "all-linear"
    l_a: int = 2               # slices in L_A: 1 (Tied-LoRA) ... n_layers (LoRA)
    l_b: int = 2               # slices in L_B: the same range
    scale_vectors: bool = True  # per-layer Tied-LoRA vectors v (out), u (r)
    seed: int = 0              # L_A's random values come from it


class PartiallyTiedLoRALinear(TiedLoRALinear):
    peft_method = "partially_tied_lora"

    def __init__(self, base: nn.Linear, shared: nn.ParameterDict, scale: float, mix_a: torch.Tensor,
                 mix_b: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None):
        super().__init__(base, shared, scale, v, u)
        self.mix_a = nn.Parameter(mix_a)  # (l_A,) w_i^A
        self.mix_b = nn.Parameter(mix_b)  # (l_B,) w_i^B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.einsum("kmn,k->mn", self.shared["L_A"], self.mix_a)  # (r, in)
        B = torch.einsum("kmn,k->mn", self.shared["L_B"], self.mix_b)  # (out, r)
        return A, B


def apply(model: nn.Module, config: PartiallyTiedLoRAConfig) -> nn.Module:
    r, n_layers, owned = config.r, model.config.n_layers, {}
    check_slices("l_a", config.l_a, n_layers)
    check_slices("l_b", config.l_b, n_layers)

    def wrap(name: str, linear: nn.Linear) -> nn.Module:
        out_f, in_f = linear.weight.shape
        dev = linear.weight.device

        def make(g: torch.Generator) -> dict[str, torch.Tensor]:
            return {"L_A": uniform((config.l_a, r, in_f), in_f, g), "L_B": torch.zeros(config.l_b, out_f, r)}

        shared = shared_factors(model, owned, f"partially_tied_lora__{leaf_name(name)}", linear,
                                config.seed, make, {"L_A", "L_B"})
        ones = (lambda n: torch.ones(n, device=dev)) if config.scale_vectors else (lambda n: None)
        return PartiallyTiedLoRALinear(linear, shared, config.alpha / r,
                                       one_hot_mixing(name, n_layers, config.l_a, dev),
                                       one_hot_mixing(name, n_layers, config.l_b, dev), ones(out_f), ones(r))

    peft.inject(model, config.targets, wrap)
    peft.record(model, config)
    return model
