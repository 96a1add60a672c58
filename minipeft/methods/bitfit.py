"""BitFit for a bias-free Llama: train only (new) bias vectors.

Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", arXiv:2106.10199. BitFit freezes every weight and trains
only the bias terms b in y = W x + b (paper section 3).

Llama has NO biases to tune: every Linear is bias=False and RMSNorm has a scale but no shift. So this
module ADDS one, zero-initialised so the model starts as the base model:

    y = W x + b,   b = 0 at init,   b of size out_features

Default targets: the seven Linears of every block (q, k, v, o, gate, up, down; "all-linear" minus
lm_head, whose weight is tied to the embedding), the closest to "all bias terms". The paper also
trains only the "query" and "middle-of-MLP" (the d -> 4d intermediate layer) biases, at a small loss
(section 1); the Llama analogue is `targets=("q_proj", "gate_proj", "up_proj")`.

Trains: the biases, L * (n_heads*hd + 2*n_kv_heads*hd + 2*dim + 2*ffn_dim) numbers with the defaults
(376,832 for llama-3.2-1b, 0.0305% of its 1,235,814,400 weights).
Merges: yes, as a bias. The base Linear has bias None, so merge() gives it a bias Parameter holding
b (frozen) and unmerge() removes it again (exact); a base that already had a bias gets b added and
subtracted. Export (peft.merge_and_unload) refuses: minipeft's Llama and the config.json it writes
have no `attention_bias`/`mlp_bias`, so a checkpoint could not hold the biases; keep the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft


@dataclass
class BitFitConfig:
    method: ClassVar[str] = "bitfit"
    # Linears that get a trainable bias (names or globs, as in peft.inject); default: every Linear of a block
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class BitFitLinear(nn.Module):
    """A frozen Linear plus a trainable, zero-initialised bias on its output."""

    peft_method = "bitfit"
    unloadable = False  # peft.merge_and_unload: a Llama checkpoint has no place for the biases
    why_not_unloadable = ("adds biases, and minipeft's Llama checkpoint (config.json without attention_bias/"
                          "mlp_bias) has no place for them; keep the adapter, or use peft.merge in memory")

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.merged, self.created_base_bias = base, False, False
        self.bias = nn.Parameter(torch.zeros(base.out_features, dtype=torch.float32, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return (y.to(self.bias.dtype) + self.bias).to(y.dtype)

    def merge(self) -> None:
        b = self.bias.to(self.base.weight.dtype)
        if self.base.bias is None:  # the Llama case: give the Linear a bias it never had
            self.base.bias = nn.Parameter(b.clone(), requires_grad=False)
            self.created_base_bias = True
        else:
            self.base.bias.add_(b)

    def unmerge(self) -> None:
        if self.created_base_bias:
            self.base.bias, self.created_base_bias = None, False
        else:
            self.base.bias.sub_(self.bias.to(self.base.bias.dtype))


def apply(model: nn.Module, config: BitFitConfig) -> nn.Module:
    """Wrap every Linear named by `config.targets` in a BitFitLinear (bias of zeros)."""
    peft.inject(model, config.targets, lambda name, linear: BitFitLinear(linear))
    peft.record(model, config)
    return model
