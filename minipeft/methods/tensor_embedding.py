"""Tensor Embedding Adaptation: Tied-LoRA Extra whose per-layer cores come from a shared stack.

Tied-LoRA Extra (minipeft/methods/tied_lora_extra.py) gives each layer a free core M_i (r2, r1). Here the
cores are themselves tied: a stack L (l, r2, r1) is shared per target name, and each layer keeps only
an embedding vector w_i (l) that mixes it:

    M_i = sum_k w_ik L[k]             (einsum 'kab,k->ab')
    y   = W_i x + s * B M_i A x,      A (r1, in), B (out, r2) shared;  s = alpha / min(r1, r2)

Stacking the update of every layer gives the 3-way tensor dW[i] = s * B (L x_1 w_i) A: a Tucker
decomposition with factors B, A and the layer embeddings w, as in FacT-TK (Jie & Deng, "FacT:
Factor-Tuning for Lightweight Adaptation on Vision Transformer", arXiv:2212.03145), here one per
kind of weight. With l = n_layers and one-hot w_i it is exactly Tied-LoRA Extra (pinned by a test).

Everything trains: A, B, L and every w_i. Initialisation leaves the model unchanged: B = 0; A is
uniform random from `seed`; every L[k] starts as the identity eye(r2, r1) and w_i one-hot on slice
i * l // n_layers, so each M_i starts as the identity, as in Tied-LoRA Extra.

Parameters: sum over targets t of r1*in_t + out_t*r2 + l*r2*r1 + n_t*l, n_t the number of layers
wrapped. Merge: W_i += s B M_i A; unmerge restores W_i exactly (a copy kept while merged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .tied_lora import LowRankDelta, check_slices, leaf_name, one_hot_mixing, shared_factors, uniform
from .tied_lora_extra import TiedLoRAExtraLinear


@dataclass
class TensorEmbeddingConfig:
    method: ClassVar[str] = "tensor_embedding"
    r1: int = 8                # rows of the shared A (r1, in)
    r2: int = 8                # columns of the shared B (out, r2)
    l: int = 2                 # slices of L = length of each w_i: 1 ... n_layers
    alpha: float = 16.0        # the update is scaled by alpha / min(r1, r2)
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # one A, B, L per leaf name; globs, "all-linear"
    seed: int = 0              # A's random values come from it


class TensorEmbeddingLinear(TiedLoRAExtraLinear):
    peft_method = "tensor_embedding"

    def __init__(self, base: nn.Linear, shared: nn.ParameterDict, scale: float, embedding: torch.Tensor):
        LowRankDelta.__init__(self, base, shared, scale)  # no free core: it is mixed from shared["L"]
        self.embedding = nn.Parameter(embedding)  # (l,) w_i

    def core_matrix(self) -> torch.Tensor:
        return torch.einsum("kab,k->ab", self.shared["L"], self.embedding)  # (r2, r1)


def apply(model: nn.Module, config: TensorEmbeddingConfig) -> nn.Module:
    r1, r2, n_layers, owned = config.r1, config.r2, model.config.n_layers, {}
    check_slices("l", config.l, n_layers)

    def wrap(name: str, linear: nn.Linear) -> nn.Module:
        out_f, in_f = linear.weight.shape

        def make(g: torch.Generator) -> dict[str, torch.Tensor]:
            return {"A": uniform((r1, in_f), in_f, g), "B": torch.zeros(out_f, r2),
                    "L": torch.eye(r2, r1).expand(config.l, r2, r1).clone()}

        shared = shared_factors(model, owned, f"tensor_embedding__{leaf_name(name)}", linear, config.seed,
                                make, {"A", "B", "L"})
        embedding = one_hot_mixing(name, n_layers, config.l, linear.weight.device)
        return TensorEmbeddingLinear(linear, shared, config.alpha / min(r1, r2), embedding)

    peft.inject(model, config.targets, wrap)
    peft.record(model, config)
    return model
