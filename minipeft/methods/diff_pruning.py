"""Diff pruning: "Parameter-Efficient Transfer Learning with Diff Pruning" (Guo, Rush, Kim 2021, ACL;
arXiv:2012.07463), with the hard-concrete L0 relaxation of Louizos, Welling, Kingma 2018, "Learning
Sparse Neural Networks through L0 Regularization", arXiv:1712.01312.

Each targeted weight gets a dense diff w (out, in) and a mask m from a hard-concrete distribution:

    W' = W + m ⊙ w,    u ~ U(0, 1),  s = σ((log u - log(1 - u) + log α) / β),
    m = min(1, max(0, s (ζ - γ) + γ))         (β = 2/3, γ = -0.1, ζ = 1.1 as in both papers)

in training (a fresh u per forward); outside training m = min(1, max(0, σ(log α)(ζ - γ) + γ)). The
expected number of nonzero entries, E||m||_0 = Σ σ(log α - β log(-γ / ζ)), is the penalty, added through
peft.add_extra_loss as `l0_weight` × its mean over all entries (so the weight does not scale with the
model). w starts at 0 (the model is unchanged), log α at `init_log_alpha`. w and log α train: 2 numbers
per targeted weight during training (the paper's memory cost; the result is sparse, the training is not).
`finalize(model, density)` is the paper's final magnitude cut: it keeps the k = density × numel largest
|m ⊙ w| of each weight and turns the module into a sparse_ft one (η, φ), which saves only those.
Merges: W <- W + m ⊙ w with the deterministic m; unmerge restores a copy of W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from . import sparse_ft

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


@dataclass
class DiffPruningConfig:
    method: ClassVar[str] = "diff_pruning"
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # names, globs or "all-linear"
    l0_weight: float = 1.0       # weight of the mean expected-L0 penalty
    init_log_alpha: float = 3.0  # log α at the start: σ(3)(ζ-γ)+γ > 1, masks start (deterministically) open

    def __post_init__(self):
        if self.l0_weight < 0:
            raise ValueError(f"DiffPruningConfig: need l0_weight >= 0, got {self.l0_weight}")


class DiffPruneLinear(nn.Module):
    """base(x) + (m ⊙ w) x, m hard-concrete (sampled in training, deterministic otherwise)."""

    peft_method = "diff_pruning"

    def __init__(self, base: nn.Linear, config: DiffPruningConfig):
        super().__init__()
        self.base, self.config = base, config
        dev = base.weight.device
        self.diff = nn.Parameter(torch.zeros(base.weight.shape, device=dev))                            # w
        self.log_alpha = nn.Parameter(torch.full(base.weight.shape, config.init_log_alpha, device=dev))  # log α
        self.merged = False
        self.register_buffer("weight_before_merge", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def mask(self) -> torch.Tensor:
        """(out, in) m in [0, 1]: a hard-concrete sample in training, its deterministic value otherwise."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def expected_l0(self) -> torch.Tensor:
        """Σ P(m != 0) = Σ σ(log α - β log(-γ / ζ))."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def delta_weight(self) -> torch.Tensor:
        return self.mask() * self.diff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(x.to(self.diff.dtype), self.delta_weight()).to(y.dtype)

    def merge(self) -> None:
        peft.merge_delta_keeping_base(self, self.delta_weight())

    def unmerge(self) -> None:
        peft.restore_base(self)


class ExpectedL0:
    """The extra loss: l0_weight × (Σ expected nonzeros) / (Σ entries), over every diff-pruning module."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, model, forward, batch, logits) -> torch.Tensor:
        mods = [m for m in model.modules() if isinstance(m, DiffPruneLinear)]
        return self.weight * sum(m.expected_l0() for m in mods) / sum(m.diff.numel() for m in mods)


@torch.no_grad()
def finalize(model: nn.Module, density: float) -> nn.Module:
    """The final magnitude cut: each diff-pruning module becomes a sparse_ft module holding the k =
    max(1, round(density × numel)) largest |m ⊙ w| (deterministic m); the config record follows."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, DiffPruneLinear)]
    if not mods or any(m.merged for _, m in mods):
        raise ValueError("finalize: needs a model with unmerged diff_pruning modules")
    sparse_config = sparse_ft.SparseFTConfig(density=density, targets=tuple(n for n, _ in mods))
    for name, m in mods:
        d = m.eval().delta_weight().flatten()
        new = sparse_ft.SparseLinear(m.base, sparse_config, torch.Generator()).train(model.training)
        new.indices.copy_(d.abs().topk(len(new.values)).indices.sort().values)
        new.values.copy_(d[new.indices])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.peft_configs = [c for c in model.peft_configs if c.method != "diff_pruning"] + [sparse_config]
    model.peft_extra_losses = [f for f in getattr(model, "peft_extra_losses", []) if not isinstance(f, ExpectedL0)]
    return model


def apply(model: nn.Module, config: DiffPruningConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: DiffPruneLinear(linear, config))
    if config.l0_weight > 0 and not any(isinstance(f, ExpectedL0) for f in getattr(model, "peft_extra_losses", [])):
        peft.add_extra_loss(model, ExpectedL0(config.l0_weight))
    peft.record(model, config)
    return model
