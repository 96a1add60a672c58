"""(IA)^3: learned vectors that rescale keys, values and the feed-forward hidden state.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (T-Few), arXiv:2205.05638, section 3.3. Three vectors per block, initialised to ones:

    softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)        l_k, l_v scale the k_proj / v_proj outputs
    (l_ff ⊙ gamma(W_1 x)) W_2                            l_ff scales the INPUT of down_proj

For SwiGLU, gamma(W_1 x) is silu(gate_proj(x)) * up_proj(x), the input of down_proj. Hugging Face
PEFT calls a layer whose vector multiplies the input a "feedforward module". Here `targets` (which
Linears get a vector; PEFT's `target_modules`) and `feedforward_targets` (which of them scale the input;
PEFT's `feedforward_modules`).

Trains: the vectors only, L * (2 * n_kv_heads * head_dim + ffn_dim) numbers with the defaults
(147,456 for llama-3.2-1b, 0.0119% of its 1,235,814,400 weights).
Merges: yes, into the weight. Output scaling is diag(l) W (rows), input scaling W diag(l) (columns);
unmerge divides back, exact up to float rounding in fp32; bf16 weights keep 8 mantissa bits, so each
merged entry is rounded to ~0.4% there: merge in fp32 when exactness matters. A vector with a zero entry would wipe a row or
column that unmerge could not restore, so such a module reports `mergeable = False` and
peft.merge refuses with the reason before changing anything.

Interop: minipeft/hf_peft.py reads and writes Hugging Face PEFT's IA3 format, where each vector is
`base_model.model.<HF module name>.ia3_l`, shaped (out, 1), or (1, in) for feed-forward modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft


@dataclass
class IA3Config:
    method: ClassVar[str] = "ia3"
    # Linears that get a vector (names or globs, as in peft.inject); the paper's k, v and FFN choice
    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    # the subset whose vector scales the INPUT (the FFN hidden state); the rest scale the output
    feedforward_targets: tuple[str, ...] = ("down_proj",)


class IA3Linear(nn.Module):
    """A frozen Linear whose output (or, if `feedforward`, input) is multiplied by a learned vector."""

    def __init__(self, base: nn.Linear, feedforward: bool, method: str = "ia3"):
        super().__init__()
        self.base, self.feedforward, self.peft_method, self.merged = base, feedforward, method, False
        n = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, dtype=torch.float32, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        l = self.ia3_l
        if self.feedforward:
            return self.base((x.to(l.dtype) * l).to(x.dtype))
        y = self.base(x)
        return (y.to(l.dtype) * l).to(y.dtype)

    @property
    def mergeable(self) -> bool:
        return bool((self.ia3_l != 0).all())

    @property
    def why_not_mergeable(self) -> str:
        zeros = (self.ia3_l == 0).nonzero().flatten().tolist()
        return (f"has zero entries at {zeros[:5]} in its vector; folding them into the weight would "
                f"erase rows/columns that unmerge could not restore")

    def merge(self) -> None:
        w, l = self.base.weight, self.ia3_l.to(self.base.weight.dtype)
        if self.feedforward:
            w.mul_(l)                     # W diag(l): column j of W meets input feature j
        else:
            w.mul_(l[:, None])            # diag(l) W: row i of W makes output feature i
            if self.base.bias is not None:
                self.base.bias.mul_(l)    # l * (W x + b)

    def unmerge(self) -> None:
        w, l = self.base.weight, self.ia3_l.to(self.base.weight.dtype)
        if self.feedforward:
            w.div_(l)
        else:
            w.div_(l[:, None])
            if self.base.bias is not None:
                self.base.bias.div_(l)


def apply(model: nn.Module, config: IA3Config) -> nn.Module:
    """Wrap every Linear named by `config.targets` in an IA3Linear (vectors of ones)."""
    targets = peft.match_targets(model, config.targets)
    ff = set(peft.match_targets(model, config.feedforward_targets)) if config.feedforward_targets else set()
    if ff - set(targets):
        raise ValueError(f"IA3Config: feedforward_targets must be a subset of targets; "
                         f"{sorted(ff - set(targets))[:3]} are not targets")
    peft.inject(model, config.targets, lambda name, linear: IA3Linear(linear, feedforward=name in ff))
    peft.record(model, config)
    return model
