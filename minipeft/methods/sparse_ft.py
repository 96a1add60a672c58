"""Sparse fine-tuning: k chosen entries of each targeted weight train, nothing else.

The core (the lecture's "Masked / sparse fine-tuning"): for a weight W (out, in), indices η (k flat
positions, sorted, unique) and trainable values φ (k), applied as

    W' = W + scatter(η, φ),    h = W x + scatter(η, φ) x

computed WITHOUT a dense ΔW: a custom autograd function gathers the k input columns, scales them by φ
and index-adds them into the k output rows (in chunks of entries, so the temporary is (tokens, chunk)),
and its backward returns the k gradients of φ and the input gradient the same way. Training memory
for the method is therefore O(k): φ, its gradient, AdamW's two moments, η (int64), plus the input x
saved for backward (which LoRA saves too). No dense ΔW, dense gradient or dense optimiser state
exists. φ starts at 0: the model is unchanged. Only φ trains; η is a saved buffer.
Merges: W.flat[η] += φ (a scatter-add). Unmerge writes back the k original entries, kept at merge
time (O(k) memory): subtracting φ again is not exact even in fp32 ((w + φ) - φ rounds), and in bf16
the merged w + φ is itself rounded to bf16 (the merged model differs from the unmerged one by that
rounding, and small φ next to large w are partly lost), while unmerge stays exact in every dtype.

Choosing η (`select`, before training; the selection itself is dense: one score per weight entry):
  * "random": uniform without replacement (from `seed`), the default that `apply` starts with;
  * "magnitude": the k largest |W| after a short dense warm-up (weights far from 0);
  * "movement": the k largest Σ_t -∇W_t ⊙ W_t over the warm-up, Sanh et al. 2020, "Movement Pruning:
    Adaptive Sparsity by Fine-Tuning", arXiv:2005.07683 (weights moving away from 0);
  * "fisher": FISH mask, Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks",
    arXiv:2111.09839: the k largest empirical Fisher entries, mean over batches of (∇W)², at the
    pretrained weights (no update). The paper squares per-example gradients (its create_fisher.py
    reads batches of one example): pass batches of one for its estimator (notebook 13 checks both);
    bigger batches square the batch-mean gradient, a cheaper and different mask;
  * "lt_sft": the k largest |W_T - W_0| after the warm-up, the selection of LT-SFT (Ansell et al. 2022,
    "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", ACL): phase 1 fine-tunes densely and
    keeps the k entries that changed most, phase 2 trains only those from the pretrained values. Our
    phase 1 is the short SGD warm-up below, not the paper's full-length dense fine-tuning run.
The warm-up (plain SGD on the targeted weights) is undone afterwards: training starts from the
pretrained W with φ = 0, as LT-SFT's reset. Diff pruning (a learned L0 mask, dense while training)
is diff_pruning.py, whose final cut gives a module of this kind. SpIEL (η changing during training)
is spiel.py, on this core: it sets `dense_grad_observer` to see dL/dW (the one dense tensor, one
weight at a time, in backward) during its few accumulation steps.

Measured (tests/test_sparse.py, slow; 2-core shared CPU): peak RSS of three AdamW steps over the
model's own RSS, a 57 M weight Llama (dim 1024, 4 layers), batch 2 x 128, all-linear, 581,632
trainable: LoRA r=8 108.7 MiB, sparse_ft 125.9 MiB (η's rows/columns as int64 live until backward),
SpIEL-AG 172.3 MiB and SpIEL-MA 125.8 MiB (spiel.py), dense full fine-tuning of the same weights
579.0 MiB (gradient + AdamW moments: 12 bytes per weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn as nn

from .. import peft

STRATEGIES = ("random", "magnitude", "movement", "fisher", "lt_sft")


@dataclass
class SparseFTConfig:
    method: ClassVar[str] = "sparse_ft"
    density: float = 0.01        # k = max(1, round(density * out * in)) entries per targeted weight
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")  # names, globs or "all-linear"
    seed: int = 0                # the initial random η (select() replaces it)
    chunk: int = 1 << 20         # tokens x entries per temporary in forward/backward (4 MiB in fp32)

    def __post_init__(self):
        if not 0 < self.density <= 1 or self.chunk < 1:
            raise ValueError(f"SparseFTConfig: need 0 < density <= 1 and chunk >= 1; got density={self.density}, "
                             f"chunk={self.chunk}")


class SparseDelta(torch.autograd.Function):
    """y (N, out) = scatter(η, φ) x for x (N, in): the k entries only, in chunks of entries."""

    @staticmethod
    def forward(ctx, x, values, rows, cols, out_features: int, step: int, observer=None):
        y = x.new_zeros(x.shape[0], out_features)
        for s in range(0, len(values), step):
            e = slice(s, s + step)
            y.index_add_(1, rows[e], x[:, cols[e]] * values[e])  # (N, chunk) temporary
        ctx.save_for_backward(x, values, rows, cols)
        ctx.step, ctx.observer = step, observer
        return y

    @staticmethod
    def backward(ctx, gy):
        x, values, rows, cols = ctx.saved_tensors
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gv = torch.empty_like(values)
        for s in range(0, len(values), ctx.step):
            e = slice(s, s + ctx.step)
            g = gy[:, rows[e]]  # (N, chunk)
            gv[e] = (g * x[:, cols[e]]).sum(0)  # dL/dφ_i = Σ_n gy[n, row_i] x[n, col_i]
            if gx is not None:
                gx.index_add_(1, cols[e], g * values[e])
        if ctx.observer is not None:  # SpIEL-AG: the dense dL/dW (out, in) of this one weight, then dropped
            ctx.observer(gy.T.float() @ x.float())
        return gx, gv, None, None, None, None, None


class SparseLinear(nn.Module):
    """base(x) + scatter(η, φ) x; φ fp32 whatever the base dtype."""

    peft_method = "sparse_ft"
    peft_state_buffers = ("indices",)  # saved with the parameters (adapters.adapter_state)

    def __init__(self, base: nn.Linear, config: SparseFTConfig, generator: torch.Generator):
        super().__init__()
        self.base, self.config = base, config
        numel = base.weight.numel()
        k = max(1, round(config.density * numel))
        dev = base.weight.device
        idx = torch.randperm(numel, generator=generator)[:k].sort().values if dev.type != "meta" else torch.zeros(k)
        self.register_buffer("indices", idx.to(device=dev, dtype=torch.int64))  # η (k,) flat, sorted
        self.values = nn.Parameter(torch.zeros(k, device=dev))                    # φ (k,)
        self.merged = False
        self.register_buffer("entries_before_merge", None, persistent=False)  # W.flat[η] while merged
        self.dense_grad_observer = None  # a callable given the dense dL/dW in backward (SpIEL-AG), else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        rows, cols = self.indices // self.base.in_features, self.indices % self.base.in_features
        x2 = x.reshape(-1, x.shape[-1]).to(self.values.dtype)  # (N, in)
        step = max(1, self.config.chunk // max(1, x2.shape[0]))
        d = SparseDelta.apply(x2, self.values, rows, cols, self.base.out_features, step, self.dense_grad_observer)
        return y + d.reshape(*x.shape[:-1], -1).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) ΔW, for checks only: training never builds it."""
        d = torch.zeros(self.base.weight.numel(), device=self.values.device)
        return d.index_put((self.indices,), self.values).view_as(self.base.weight)

    def merge(self) -> None:
        flat = self.base.weight.view(-1)
        self.entries_before_merge = flat[self.indices].clone()
        flat[self.indices] = (flat[self.indices].float() + self.values).to(flat.dtype)  # scatter-add

    def unmerge(self) -> None:
        self.base.weight.view(-1)[self.indices] = self.entries_before_merge
        self.entries_before_merge = None

    def extra_repr(self) -> str:
        return f"k={len(self.values)} of {self.base.weight.numel()}, merged={self.merged}"


def modules(model: nn.Module) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def select(model: nn.Module, strategy: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
           lr: float = 1e-3) -> None:
    """Choose η of every SparseLinear by `strategy` (see the module docstring) from `batches` of
    (idx, targets); φ is reset to 0. magnitude, movement and lt_sft take one SGD step of `lr` per
    batch on the targeted weights (the warm-up), then put the pretrained weights back."""
    if strategy not in STRATEGIES:
        raise ValueError(f"select: unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    mods = modules(model)
    if not mods or any(m.merged for m in mods):
        raise ValueError("select: needs a model with unmerged sparse_ft modules")
    batches = list(batches)
    if strategy != "random" and not batches:
        raise ValueError(f"select: strategy {strategy!r} needs batches of (idx, targets)")
    scores = _scores(model, mods, strategy, batches, lr)
    with torch.no_grad():
        for m, s in zip(mods, scores):
            m.indices.copy_(s.flatten().topk(len(m.values)).indices.sort().values)
            m.values.zero_()


def _scores(model, mods, strategy, batches, lr) -> list[torch.Tensor]:
    if strategy == "random":
        g = torch.Generator().manual_seed(mods[0].config.seed + 1)
        return [torch.rand(m.base.weight.shape, generator=g).to(m.values.device) for m in mods]
    weights = [m.base.weight for m in mods]
    saved = [w.detach().clone() for w in weights]
    scores = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        for idx, targets in batches:
            loss = model(idx, targets)[1]
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for w, g, s in zip(weights, grads, scores):
                    if strategy == "fisher":
                        s += g.float().square() / len(batches)
                    else:
                        if strategy == "movement":
                            s -= g.float() * w.float()  # Sanh et al.: S = -Σ_t (dL/dW) W
                        w -= lr * g
        if strategy == "magnitude":
            scores = [w.detach().float().abs() for w in weights]
        elif strategy == "lt_sft":
            scores = [(w.detach().float() - w0.float()).abs() for w, w0 in zip(weights, saved)]
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
                w.requires_grad_(False)
    return scores


def apply(model: nn.Module, config: SparseFTConfig) -> nn.Module:
    g = torch.Generator().manual_seed(config.seed)
    peft.inject(model, config.targets, lambda name, linear: SparseLinear(linear, config, g))
    peft.record(model, config)
    return model
