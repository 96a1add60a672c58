"""AdaLoRA: "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al. 2023,
arXiv:2303.10512).

LoRA in the form of a singular value decomposition, whose rank is moved to where it matters:

    h = W x + s P Λ Q x,    P: (out, r) = lora_B,  Λ = diag(λ): (r, 1) = lora_E,  Q: (r, in) = lora_A

with s = alpha / r (r = the initial rank of every module; Hugging Face PEFT divides by `ranknum`, the
initial rank, plus 1e-5: a relative 1e-6 difference). P and Q are N(0, 0.02) and λ = 0, so the model
starts unchanged; P, λ and Q train. Instead of truncating an SVD, P and Q are kept near orthogonal by
the regulariser (eq. 4), added to the loss through peft.add_extra_loss:

    R(P, Q) = ||PᵀP - I||²_F + ||QQᵀ - I||²_F,  weighted by `orth_reg_weight`, averaged over modules

(PEFT's AdaLoraModel adds the unsquared Frobenius norms; the paper's eq. 4 squares them, as here).

Importance (eqs. 9-11), from every step's gradients (a peft.add_step_hook, run before they are cleared):
    I(w) = |w ∇w|,   Ī = β1 Ī + (1-β1) I   (sensitivity, smoothed),
    U = β2 U + (1-β2) |I - Ī|   (uncertainty),   s(w) = Ī · U
    S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)   (the triplet i's score, eq. 11)
Budget (eq. 12): b(t) = b0 for t <= t_init; b_T + (b0 - b_T)(1 - (t - t_init)/(T - t_init - t_final))³
until T - t_final; then b_T, with b0 = r × modules and b_T = final_r × modules. Every `delta_t`
steps (and at every step of the final phase, with the mask frozen) the λ_i of the least important
triplets (over the whole model) are set to zero. `total_step` must be the run's number of steps
(finetune sets it so unless --set gives one).
The averages are updated at every step before T - t_final, not at T - t_final itself: the final mask
is chosen from the averages of step T - t_final - 1, as in Hugging Face PEFT (tuners/adalora/layer.py,
RankAllocator.update_and_allocate: `if global_step < total_step - tfinal: self.update_ipt(model)`)
and the authors' code (QingruZhang/AdaLoRA, loralib/adalora.py, RankAllocator.update_and_mask: "do
not update ipt during final fine-tuning"). A run resumed at or after T - t_final, with no averages
and no mask yet, takes one step's averages and masks from them.
The importance averages and the mask are training state that is not saved (masked λ are saved as 0):
a resumed run starts its averages again from zero.

Merges: W <- W + s P Λ Q; unmerge restores a copy of W (exact in every dtype, as lora.py).
Hugging Face PEFT AdaLoRA directories load and save through minipeft/hf_peft.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft


@dataclass
class AdaLoRAConfig:
    method: ClassVar[str] = "adalora"
    r: int = 12                  # initial rank of every module (PEFT's init_r)
    final_r: int = 8             # average rank per module at the end, b_T / modules (PEFT's target_r)
    alpha: float = 32.0          # s = alpha / r (PEFT's lora_alpha, divided by its ranknum = init_r)
    dropout: float = 0.0         # dropout on the branch's input
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # names, globs or "all-linear"
    total_step: int = 1000       # T: the run's optimiser steps (finetune fills it in)
    tinit: int = 0               # warm-up steps at the full budget
    tfinal: int = 0              # final steps at the target budget, mask frozen
    delta_t: int = 1             # mask every delta_t steps during the budget decrease
    beta1: float = 0.85          # EMA of the sensitivity
    beta2: float = 0.85          # EMA of the uncertainty
    orth_reg_weight: float = 0.5  # weight of R(P, Q)

    def __post_init__(self):
        if not (1 <= self.final_r <= self.r and 0 <= self.dropout < 1 and 0 < self.beta1 < 1 and 0 < self.beta2 < 1
                and self.delta_t >= 1 and self.tinit + self.tfinal < self.total_step and self.orth_reg_weight >= 0):
            raise ValueError(f"AdaLoRAConfig: need 1 <= final_r <= r, 0 <= dropout < 1, 0 < beta1, beta2 < 1, "
                             f"delta_t >= 1, tinit + tfinal < total_step, orth_reg_weight >= 0; got {self}")


class AdaLoRALinear(nn.Module):
    """base(x) + s B diag(E) A dropout(x); the triplets i with mask[i] False have E[i] held at 0."""

    peft_method = "adalora"

    def __init__(self, base: nn.Linear, config: AdaLoRAConfig):
        super().__init__()
        self.base, self.config, self.scale = base, config, config.alpha / config.r
        dev, r = base.weight.device, config.r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, device=dev) * 0.02)   # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))                          # λ (r, 1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, device=dev) * 0.02)  # P (out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged, self.mask = False, None  # mask: (r,) bool, the triplets kept (None: all)
        self.ema_ipt: dict[str, torch.Tensor] = {}  # smoothed sensitivity per factor (training state)
        self.ema_unc: dict[str, torch.Tensor] = {}  # uncertainty per factor
        self.register_buffer("weight_before_merge", None, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        x = self.dropout(x)
        h = F.linear(x, (self.lora_A * self.lora_E).to(x.dtype))  # (..., r); the factors cast, not x (lora.py)
        return y + (F.linear(h, self.lora_B.to(h.dtype)) * self.scale).to(y.dtype)

    def merge(self) -> None:
        peft.merge_delta_keeping_base(self, self.delta_weight())

    def unmerge(self) -> None:
        peft.restore_base(self)

    def orthogonality(self) -> torch.Tensor:
        """||PᵀP - I||²_F + ||QQᵀ - I||²_F (eq. 4)."""
        P, Q = self.lora_B, self.lora_A
        eye = torch.eye(Q.shape[0], device=Q.device, dtype=Q.dtype)
        return (P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum()

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Eqs. 9-10 from the current gradients: Ī <- β1 Ī + (1-β1)|w g|, U <- β2 U + (1-β2)|I - Ī|."""
        for key in ("lora_A", "lora_E", "lora_B"):
            p = getattr(self, key)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            bar = self.ema_ipt.get(key, torch.zeros_like(p)) * beta1 + (1 - beta1) * ipt
            self.ema_unc[key] = self.ema_unc.get(key, torch.zeros_like(p)) * beta2 + (1 - beta2) * (ipt - bar).abs()
            self.ema_ipt[key] = bar

    def triplet_scores(self) -> torch.Tensor:
        """(r,) S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) (eq. 11); zeros before any gradient."""
        s = {k: self.ema_ipt[k] * self.ema_unc[k] if k in self.ema_ipt else None for k in ("lora_A", "lora_E", "lora_B")}
        zero = torch.zeros(self.config.r, device=self.lora_E.device)
        return ((zero if s["lora_E"] is None else s["lora_E"].view(-1))
                + (zero if s["lora_A"] is None else s["lora_A"].mean(1))
                + (zero if s["lora_B"] is None else s["lora_B"].mean(0)))

    def apply_mask(self) -> None:
        if self.mask is not None:
            with torch.no_grad():
                self.lora_E.masked_fill_(~self.mask[:, None], 0.0)

    def extra_repr(self) -> str:
        kept = self.config.r if self.mask is None else int(self.mask.sum())
        return f"r={self.config.r}, kept={kept}, scale={self.scale:g}, merged={self.merged}"


def modules(model: nn.Module) -> list[AdaLoRALinear]:
    return [m for m in model.modules() if isinstance(m, AdaLoRALinear)]


def budget(config: AdaLoRAConfig, n_modules: int, step: int) -> int:
    """The total rank allowed after `step` (eq. 12, the cubic schedule)."""
    b0, bT = config.r * n_modules, config.final_r * n_modules
    T, t0, tf = config.total_step, config.tinit, config.tfinal
    if step <= t0:
        return b0
    if step > T - tf:
        return bT
    return int((b0 - bT) * (1 - (step - t0) / (T - tf - t0)) ** 3 + bT)


class OrthogonalityLoss:
    """The extra loss term: weight × mean over AdaLoRA modules of R(P, Q)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, model, forward, batch, logits) -> torch.Tensor:
        mods = modules(model)
        return self.weight * sum(m.orthogonality() for m in mods) / max(len(mods), 1)


class BudgetSchedule:
    """The step hook: update the importance, then mask the λ of the least important triplets."""

    def __init__(self, config: AdaLoRAConfig):
        self.config = config

    def __call__(self, model: nn.Module, step: int) -> None:
        c, mods = self.config, modules(model)
        final = step > c.total_step - c.tfinal
        if final and all(m.mask is not None for m in mods):  # the final phase: the mask is frozen
            for m in mods:
                m.apply_mask()
            return
        fix = step == c.total_step - c.tfinal  # the final mask, from the averages as they stand (as PEFT)
        if not (fix and any(m.ema_ipt for m in mods)):
            for m in mods:
                m.update_importance(c.beta1, c.beta2)
        if step > c.tinit and (final or fix or step % c.delta_t == 0):
            mask_to_budget(mods, budget(c, len(mods), step))


@torch.no_grad()
def mask_to_budget(mods: list[AdaLoRALinear], keep: int) -> None:
    """Keep the `keep` most important triplets over all modules; zero the λ of the others."""
    scores = [m.triplet_scores() for m in mods]
    flat = torch.cat(scores)
    if keep >= flat.numel():
        return
    threshold = torch.kthvalue(flat.float().cpu(), flat.numel() - keep).values.item()  # as PEFT: <= goes
    for m, s in zip(mods, scores):
        m.mask = s > threshold
        m.apply_mask()


def apply(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    peft.inject(model, config.targets, lambda name, linear: AdaLoRALinear(linear, config))
    if config.orth_reg_weight > 0 and not any(isinstance(f, OrthogonalityLoss)
                                              for f in getattr(model, "peft_extra_losses", [])):
        peft.add_extra_loss(model, OrthogonalityLoss(config.orth_reg_weight))
    if not any(isinstance(f, BudgetSchedule) for f in getattr(model, "peft_step_hooks", [])):
        peft.add_step_hook(model, BudgetSchedule(config))
    peft.record(model, config)
    return model
