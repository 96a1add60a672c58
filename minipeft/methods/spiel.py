"""SpIEL: "Scaling Sparse Fine-Tuning to Large Language Models" (Ansell et al. 2024, arXiv:2401.16405).

Sparse fine-tuning (sparse_ft.py's core: W' = W + scatter(η, φ), k entries, O(k) training memory)
whose index set η changes during training while k stays fixed. The paper iterates (a) update φ,
(b) drop, (c) grow; we follow its released code (github.com/AlanAnsell/peft, src/peft/tuners/sft/
trainer.py `SftSelector`, defaults in its README) for the schedule and the details:

  * reselection after steps t = γ + jS (j = 0, 1, ..., t <= total_steps): the first (t = γ) replaces
    all of η (fraction 1), later ones a fraction ζ_t = ζ0 (1 - t / total_steps) (linear decay; README:
    "reduced linearly to zero over the course of training", ζ0 = 0.2, S = 20, γ = 5);
  * drop: the n = int(ζ_t k) entries with the smallest |φ| (φ is the change from the pretrained value);
  * grow n new entries, each with φ = 0, so the function is unchanged at the swap, by
    - SpIEL-AG (`growth="gradient"`): in the steps before a reselection, the dense gradient dL/dW
      exists in backward one weight at a time (sparse_ft's `dense_grad_observer`) and is reduced at
      once: the first step picks k candidates (largest |dL/dW|), every step adds their gradients
      (Σg, Σg²: O(k)). The first reselection (t = γ) sees steps 1..γ, the later ones (t = jS + γ)
      steps jS..jS + γ, γ + 1 of them, as the released code: `SftSelector.step` calls
      `begin_selection_phase` (the gradient hooks on) when (t + 1) % S == 0 and
      `end_selection_phase` when t % S == γ. Grow the candidates with the largest |Σg| that are
      not staying in η (a dropped entry may come straight back and then keeps its φ). The new
      entries' AdamW moments start at the candidates' mean g and mean g² (the released code's
      `init_momenta`);
    - SpIEL-MA (`growth="momentum"`): no dense gradient ever. SM3's row and column accumulators
      (Anil et al. 2019, arXiv:1901.11150; beta = 0) are fed each step by the k gradients of φ,
      ν = min(row[i], col[j]) + g², row[i] = max(row[i], ν), col[j] likewise: O(out + in) memory.
      Grow the n entries outside η with the largest row[i] col[j] (found block by block, never as a
      dense (out, in) score). New entries' AdamW moments are reset to 0. The paper pairs MA with the
      SM3 optimiser; we keep AdamW for φ and use SM3's accumulators only to score growth.

The step hook (peft.add_step_hook) runs after `opt.step()`. It reaches AdamW's state through
torch's global optimiser post-step hook, which records which optimiser steps our φ; without one, only
η and φ change. After a swap η is sorted again and φ and the moments are permuted with it.
Only φ trains (AdamW state: 2k). Merges exactly like sparse_ft (scatter-add; unmerge restores).
Measured (tests/test_sparse.py, slow; peak RSS of 3 AdamW steps incl. a full reselection, 57 M weight
Llama, all-linear, 581,632 trainable): LoRA r=8 108.7 MiB, sparse_ft 125.9, SpIEL-MA 125.8, SpIEL-AG
172.3 (one weight's dense gradient and its top-k temporaries in backward), full fine-tuning 579.0.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import peft
from .sparse_ft import SparseFTConfig, SparseLinear

GROWTH = ("gradient", "momentum")


@dataclass
class SpIELConfig(SparseFTConfig):
    method: ClassVar[str] = "spiel"
    growth: str = "gradient"      # "gradient" (SpIEL-AG) or "momentum" (SpIEL-MA)
    every: int = 20               # S: steps between reselections
    accumulate: int = 5           # γ: the first reselection (t = γ) grows from γ steps' gradients, later ones γ + 1
    drop_fraction: float = 0.2    # ζ0: later reselections swap ζ0 (1 - t / total_steps) of k
    total_steps: int = 1000       # ζ reaches 0 here (finetune: the run's steps); no reselection afterwards

    def __post_init__(self):
        super().__post_init__()
        if self.growth not in GROWTH or not 1 <= self.accumulate < self.every or not 0 <= self.drop_fraction <= 1:
            raise ValueError(f"SpIELConfig: need growth in {GROWTH}, 1 <= accumulate < every, 0 <= drop_fraction "
                             f"<= 1; got growth={self.growth!r}, accumulate={self.accumulate}, every={self.every}, "
                             f"drop_fraction={self.drop_fraction}")


class SpIELLinear(SparseLinear):
    """sparse_ft's module; with SM3's row/column accumulators under growth="momentum"."""

    peft_method = "spiel"

    def __init__(self, base: nn.Linear, config: SpIELConfig, generator: torch.Generator):
        super().__init__(base, config, generator)
        shape = (base.out_features, base.in_features) if config.growth == "momentum" else (0, 0)
        dev = base.weight.device
        self.register_buffer("row_acc", torch.zeros(shape[0], device=dev), persistent=False)  # (out,)
        self.register_buffer("col_acc", torch.zeros(shape[1], device=dev), persistent=False)  # (in,)
        self.candidates = None  # AG: (flat indices (c,), Σg (c,), Σg² (c,), steps seen)


class Reselection:
    """The step hook: accumulates the growth statistics and swaps entries on schedule."""

    def __init__(self, config: SpIELConfig):
        self.config, self.optimizer = config, None  # weakref to the optimiser stepping our φ

    def fraction(self, step: int) -> float | None:
        c = self.config
        if step > c.total_steps or step < c.accumulate or (step - c.accumulate) % c.every:
            return None
        return 1.0 if step == c.accumulate else c.drop_fraction * (1 - step / c.total_steps)

    def __call__(self, model: nn.Module, step: int) -> None:
        mods = [m for m in model.modules() if isinstance(m, SpIELLinear) and m.config is self.config]
        if self.config.growth == "momentum":
            for m in mods:
                _feed_sm3(m)
        p = self.fraction(step)
        opt = self.optimizer() if self.optimizer is not None else None
        c = self.config
        for m in mods:
            if p is not None and not m.merged:
                swap(m, int(p * len(m.values)), opt)
            if c.growth == "gradient" and (step + 1) % c.every == 0 and step + 1 + c.accumulate <= c.total_steps:
                self.observe(m, True)  # dL/dW is observed in steps jS .. jS + γ (γ + 1), as the released code
            elif c.growth == "gradient" and p is not None:
                self.observe(m, False)

    def observe(self, m: SpIELLinear, on: bool) -> None:
        m.candidates = None
        m.dense_grad_observer = (lambda g, m=m: _accumulate(m, g)) if on else None


def _accumulate(m: SpIELLinear, g: torch.Tensor) -> None:
    """SpIEL-AG: reduce one dense dL/dW (out, in) to the candidates' running sums."""
    g = g.flatten()
    if m.candidates is None:
        idx = g.abs().topk(min(len(m.values), g.numel())).indices  # k candidates
        m.candidates = [idx, g[idx].clone(), g[idx].square(), 1]
    else:
        idx, s, s2, _ = m.candidates
        s += g[idx]
        s2 += g[idx].square()
        m.candidates[3] += 1


@torch.no_grad()
def _feed_sm3(m: SpIELLinear) -> None:
    """SM3's cover-set update (beta = 0) from the k gradients of φ (the hook runs before zero_grad)."""
    if m.values.grad is None:
        return
    rows, cols = m.indices // m.base.in_features, m.indices % m.base.in_features
    nu = torch.minimum(m.row_acc[rows], m.col_acc[cols]) + m.values.grad.float().square()
    m.row_acc.scatter_reduce_(0, rows, nu, reduce="amax")
    m.col_acc.scatter_reduce_(0, cols, nu, reduce="amax")


def _grow_by_momentum(m: SpIELLinear, n: int) -> torch.Tensor:
    """The n flat positions outside η with the largest row_acc[i] col_acc[j], rows in blocks."""
    out_f, in_f = m.base.out_features, m.base.in_features
    block = max(1, m.config.chunk // in_f)
    best_s, best_i = m.row_acc.new_empty(0), m.indices.new_empty(0)
    for r0 in range(0, out_f, block):
        s = torch.outer(m.row_acc[r0:r0 + block], m.col_acc).flatten()  # (block * in,)
        inside = m.indices[(m.indices >= r0 * in_f) & (m.indices < (r0 + block) * in_f)] - r0 * in_f
        s[inside] = -float("inf")  # never grow an entry already in η
        top = s.topk(min(n, s.numel()))
        best_s, best_i = torch.cat([best_s, top.values]), torch.cat([best_i, top.indices + r0 * in_f])
        keep = best_s.topk(min(n, len(best_s))).indices
        best_s, best_i = best_s[keep], best_i[keep]
    return best_i[best_s > -float("inf")]


@torch.no_grad()
def swap(m: SpIELLinear, n: int, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Drop the n smallest |φ| of `m`, grow up to n new entries (φ = 0) by the config's criterion,
    reset their AdamW moments, re-sort η; returns the number of entries that changed."""
    if n == 0:
        return 0
    out = m.values.abs().topk(n, largest=False).indices  # slots to drop
    if m.config.growth == "momentum":
        new = _grow_by_momentum(m, n)
        m1, m2 = torch.zeros(len(new)), torch.zeros(len(new))
    else:
        if m.candidates is None:
            return 0
        idx, s, s2, steps = m.candidates
        staying = m.indices[~torch.isin(torch.arange(len(m.values), device=out.device), out)]
        ok = ~torch.isin(idx, staying)
        idx, s, s2 = idx[ok], s[ok], s2[ok]
        top = s.abs().topk(min(n, len(idx))).indices
        new, m1, m2 = idx[top], s[top] / steps, s2[top] / steps
        back = torch.isin(new, m.indices[out])  # dropped and grown again: keeps its slot and φ
        out = out[~torch.isin(m.indices[out], new)]
        new, m1, m2 = new[~back], m1[~back], m2[~back]
    out = out[:len(new)]
    m.indices[out] = new
    m.values[out] = 0.0
    state = optimizer.state.get(m.values, {}) if optimizer is not None else {}
    for key, init in (("exp_avg", m1), ("exp_avg_sq", m2)):
        if key in state:
            state[key][out] = init.to(state[key])
    order = m.indices.argsort()
    m.indices.copy_(m.indices[order])
    m.values.copy_(m.values[order])
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].copy_(state[key][order])
    return len(out)


def _remember_optimizer(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """torch's global post-step hook: tell each Reselection which optimiser steps its φ."""
    for group in opt.param_groups:
        for p in group["params"]:
            owner = getattr(p, "spiel_reselection", None)
            if owner is not None:
                owner.optimizer = weakref.ref(opt)


_HOOK = []


def apply(model: nn.Module, config: SpIELConfig) -> nn.Module:
    g = torch.Generator().manual_seed(config.seed)
    peft.inject(model, config.targets, lambda name, linear: SpIELLinear(linear, config, g))
    hook = Reselection(config)
    for m in model.modules():
        if isinstance(m, SpIELLinear) and m.config is config:
            m.values.spiel_reselection = hook
            hook.observe(m, config.growth == "gradient")  # the first reselection (t = γ) grows from steps 1..γ
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_remember_optimizer))
    peft.add_step_hook(model, hook)
    peft.record(model, config)
    return model
