"""(IA)^3++: (IA)^3 plus a zero-initialised QK skip-norm and an output vector l_o.

From the design card "Fine-tune Llama3 with (IA)^3++", building on (IA)^3 (Liu et al., T-Few,
arXiv:2205.05638) and on QK-normalisation (as in Qwen3: an RMSNorm on each head's q and k):

    X_attn = softmax((Norm(Q) + Q) (Norm(l_k ⊙ K) + l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)
    Out    = l_o ⊙ (W_o X_attn)
    X_ff   = (l_ff ⊙ gamma(W_1 x)) W_2

Norm(x) = alpha ⊙ x / sqrt(mean(x^2) + eps) is an RMSNorm per head over head_dim, applied to the
projected q and k before RoPE (the attention's `qk_adapter` slot). Its scale alpha starts at ZERO, so
the skip connection alone carries Q and K and the model starts as exactly the base model; alpha
still gets a gradient at zero (d Out / d alpha = x / rms(x) times the upstream gradient), so it learns.
Choice: one alpha of size head_dim for q and one for k, SHARED by all heads of a layer (as Qwen3's
q_norm/k_norm, RMSNorm(head_dim); OLMo 2 instead normalises all heads together), the smallest form.
l_k, l_v, l_ff are (IA)^3's vectors (ones at init); l_o scales o_proj's output.

Trains: per layer d_k + d_v + d_o + d_ff + d_norm_q + d_norm_k
  = 2 * n_kv_heads * head_dim + dim + ffn_dim + 2 * head_dim numbers (tests/test_ia3.py checks this):
182,272 for llama-3.2-1b, 0.0147% of its 1,235,814,400 weights.
Ablations: `use_l_o=False` drops l_o (and d_o); `use_qk_norm=False` drops the norm (and 2 * head_dim),
leaving plain (IA)^3 plus l_o.

Merging: the vectors merge into the weights exactly like (IA)^3 (peft.merge). The norm cannot: it
divides by each token's RMS, which no weight matrix can do. Its merge() is therefore a deliberate
no-op: after peft.merge the norm keeps running on the (now merged) projections and the outputs stay
identical. `merge_and_unload` gives a plain Llama back and refuses, with the reason, while a norm is
present, instead of silently dropping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import peft
from .ia3 import IA3Linear


@dataclass
class IA3PPConfig:
    method: ClassVar[str] = "ia3pp"
    use_qk_norm: bool = True   # the zero-initialised Norm(Q) + Q, Norm(l_k K) + l_k K skip-norms
    use_l_o: bool = True       # l_o on o_proj's output; False is the write-up's "without l_o" ablation


class QKSkipNorm(nn.Module):
    """q -> q + alpha_q ⊙ RMSNorm(q), k -> k + alpha_k ⊙ RMSNorm(k), per head over head_dim, alphas = 0."""

    peft_method = "ia3pp"
    why_not_unloadable = ("is a QK skip-norm q + alpha * q / rms(q), a per-token nonlinearity that no weight "
                          "matrix can hold (peft.merge folds the vectors and keeps it running)")

    def __init__(self, head_dim: int, eps: float, device: torch.device):
        super().__init__()
        self.eps, self.merged = eps, False
        self.q_scale = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32, device=device))
        self.k_scale = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32, device=device))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q (B, T, n_heads, hd), k (B, T, n_kv_heads, hd): normalise each head's vector on its own
        return self.skip_norm(q, self.q_scale), self.skip_norm(k, self.k_scale)

    def skip_norm(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        xf = x.to(scale.dtype)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf + scale * normed).to(x.dtype)

    def merge(self) -> None:
        """Nothing to fold: the norm is nonlinear per token, so it stays active after merging."""

    def unmerge(self) -> None:
        """Nothing was folded."""


def apply(model: nn.Module, config: IA3PPConfig) -> nn.Module:
    """l_k, l_v (k/v_proj outputs), l_ff (down_proj input), l_o (o_proj output), and the QK skip-norm."""
    targets = ["k_proj", "v_proj", "down_proj"] + (["o_proj"] if config.use_l_o else [])
    peft.inject(model, targets, lambda name, linear: IA3Linear(
        linear, feedforward=name.endswith("down_proj"), method="ia3pp"))
    if config.use_qk_norm:
        eps = model.config.norm_eps
        peft.fill_slot(model, "qk_adapter", lambda i, attn: QKSkipNorm(
            attn.head_dim, eps, next(attn.parameters()).device))
    peft.record(model, config)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the (IA)^3++ vectors into the weights and put the plain Linears back (a base Llama again).

    Refuses, changing nothing, while a QK skip-norm is present: it has no weight form. Use
    `peft.merge(model)` instead, which folds the vectors and keeps the norm running."""
    norms = [n for n, m in model.named_modules() if isinstance(m, QKSkipNorm)]
    if norms:
        raise NotImplementedError(f"merge_and_unload: '{norms[0]}' ({len(norms)} layer(s)) is a QK skip-norm "
                                  "q + alpha * q / rms(q), a per-token nonlinearity that no weight matrix can hold; "
                                  "keep it (peft.merge folds the vectors only) or train with use_qk_norm=False")
    for name, m in list(model.named_modules()):
        if isinstance(m, IA3Linear) and m.peft_method == "ia3pp":
            if not m.merged:
                with torch.no_grad():
                    m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
    model.peft_configs = [c for c in getattr(model, "peft_configs", []) if c.method != "ia3pp"]
    return model
