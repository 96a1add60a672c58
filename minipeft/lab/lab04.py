"""Checks of lab 04 (DoRA's factorisation): the student's DoRA and Simple DoRA layers, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). `check_build` alone
cannot see an initialisation (it copies minipeft's values into the student's tensors), so each layer is
first built on its own: the factors' shapes and initialisation (A Kaiming-uniform, B zero, the magnitude
at the row norms of W0), the output at init, the forward formula with a non-zero B. DoRA's gradients
are then compared with the two ways of writing its backward pass: the norm ||W0 + sBA|| detached (DoRA
section 4.3, what minipeft does) and not detached (the exact gradient), so a missing `.detach()` of the
norm, or one too many (on V, or on the magnitude), gets its own hint.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig
from ..methods.dora import DoRAConfig, DoRALinear
from ..methods.simple_dora import SimpleDoRAConfig, SimpleDoRALinear
from . import Wrong, call_with_hint, check_build, expect, make_base

N_IN, N_OUT, R, ALPHA = 32, 12, 4, 8.0
RENAME = {"A": "lora_A", "B": "lora_B", "m": "magnitude", "w": "magnitude"}


def _param(module: nn.Module, name: str, shape: tuple, what: str) -> nn.Parameter:
    p = getattr(module, name, None)
    expect(isinstance(p, nn.Parameter), f"`self.{name}` should be an nn.Parameter (so it trains and shows in "
                                        "named_parameters())")
    expect(tuple(p.shape) == shape, f"`self.{name}` has shape {tuple(p.shape)}, want {shape}: {what}")
    return p


def _layer(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(nn.Linear(N_IN, N_OUT, bias=False), R, ALPHA)


def _lora_factors(layer: nn.Module, magnitude: str) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """A, B and the magnitude, their shapes and initialisation; LoRA's part as in lab 02."""
    A = _param(layer, "A", (R, N_IN), f"A maps the input to r numbers: (r, in) = {(R, N_IN)}")
    B = _param(layer, "B", (N_OUT, R), f"B maps r numbers to the output: (out, r) = {(N_OUT, R)}")
    mag = _param(layer, magnitude, (N_OUT,), f"one magnitude per OUTPUT feature, the row norms of the (out, in) "
                                             f"weight: ({N_OUT},) (the paper's column-wise norm is of its (in, out) "
                                             "layout)")
    expect(torch.count_nonzero(B) == 0, "B must start at zero, so the layer starts as the base layer")
    expect(torch.count_nonzero(A) > 0, "A is all zeros: with B = 0 as well, neither factor ever gets a gradient; "
                                       "A starts random, Kaiming-uniform (as in LoRA)")
    bound = 1 / math.sqrt(N_IN)
    expect(A.abs().max() <= bound * (1 + 1e-6), f"A's entries reach {A.abs().max():.3g}, beyond Kaiming-uniform's "
                                                f"bound 1/sqrt(in) = {bound:.3g}: nn.init.kaiming_uniform_(A, "
                                                "a=math.sqrt(5))")
    row_norms = layer.base.weight.detach().norm(dim=1)
    if not torch.allclose(mag, row_norms, rtol=1e-5):
        looks = ("all ones" if torch.all(mag == 1) else "all zeros" if torch.all(mag == 0) else
                 "the Frobenius norm of the whole weight" if torch.allclose(mag, layer.base.weight.norm().expand(N_OUT))
                 else "something else")
        raise Wrong(f"`{magnitude}` starts as {looks}; it must start at the row norms of the frozen weight, "
                    "||W0||_row = base.weight.norm(dim=1), so that the layer starts as the base layer")
    return A, B, mag


def _set_trained(A, B, mag, seed: int = 1) -> None:
    """Give B and the magnitude trained-looking values (nothing at its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        B.copy_(0.3 * torch.randn(B.shape, generator=g))
        mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=g))


# ---------------------------------------------------------------------------------------------- Build 1


def _dora_reference(W0, A, B, m, x, detach_norm: bool = True, detach_V: bool = False) -> torch.Tensor:
    V = W0 + ALPHA / R * B @ A                                   # (out, in)
    norm = V.norm(dim=1)
    return F.linear(x, V.detach() if detach_V else V) * (m / (norm.detach() if detach_norm else norm))


def _grads(out: torch.Tensor, G: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    grads = torch.autograd.grad((G * out).sum(), tensors, allow_unused=True)
    return list(grads)


def _in_a_tiny_llama(MyLayer, method: str) -> str:
    """MyLayer(linear, 8, 16.0) on q_proj, v_proj of a tiny Llama against minipeft's `method` (r=8, alpha=16):
    check_build's same logits and gradients."""
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mine_model = copy.deepcopy(tiny)
    peft.inject(mine_model, ("q_proj", "v_proj"), lambda n, linear: MyLayer(linear, 8, 16.0))
    theirs = apply_method(copy.deepcopy(tiny), method, r=8, alpha=16, targets=("q_proj", "v_proj"))
    return check_build(mine_model, theirs, idx, RENAME)


def check_my_dora(MyDoRA) -> str:
    """MyDoRA(base, r, alpha): h = m * (V x) / ||V||_row, V = W0 + (alpha/r) B A, the norm detached."""
    layer = _layer(MyDoRA)
    A, B, m = _lora_factors(layer, "m")
    g = torch.Generator().manual_seed(0)
    x, G = torch.randn(5, N_IN, generator=g), torch.randn(5, N_OUT, generator=g)
    out = call_with_hint(layer, x, hint="x is (batch, in); V = W0 + s B A is (out, in) and its row norms (out,)")
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (5, N_OUT), f"the output should be (5, {N_OUT})")
    expect(torch.allclose(out, layer.base(x), atol=1e-5), "at init (B = 0, m = ||W0||) the layer must return "
                                                          "base(x)")
    _set_trained(A, B, m)
    W0 = layer.base.weight.detach()
    a, b, mm = (t.detach().clone() for t in (A, B, m))
    out = call_with_hint(layer, x, hint="failed with a non-zero B")
    want = _dora_reference(W0, a, b, mm, x)
    if not torch.allclose(out, want, atol=1e-5):
        for hint, version in (
                ("the branch's scale is missing: V = W0 + s B A with s = alpha / r",
                 F.linear(x, W0 + b @ a) * (mm / (W0 + b @ a).norm(dim=1))),
                ("divide by the row norms of V = W0 + s B A, recomputed in every forward pass, not by those of W0",
                 F.linear(x, W0 + ALPHA / R * b @ a) * (mm / W0.norm(dim=1))),
                ("the magnitude m is missing: W' = m * V / ||V||", F.linear(x, W0 + ALPHA / R * b @ a) /
                 (W0 + ALPHA / R * b @ a).norm(dim=1))):
            expect(not torch.allclose(out, version, atol=1e-5), hint)
        raise Wrong("with a non-zero B the output is not m * (V x) / ||V||_row, V = W0 + s B A (s = alpha / r), "
                    "row norms of V (one per output feature)")
    # the backward pass: the norm detached (DoRA section 4.3), not detached (exact), or V detached instead
    out = layer(x)
    expect(out.requires_grad, "no gradient reaches A, B or m: is the whole forward pass detached (or under "
                              "torch.no_grad())? DoRA detaches only the norm ||V||")
    mine = _grads(out, G, [A, B, m])

    def reference_grads(**detach) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (a, b, mm)]
        return _grads(_dora_reference(W0, *leaves, x, **detach), G, leaves)

    detached, exact = reference_grads(detach_norm=True), reference_grads(detach_norm=False)
    numerator_detached = reference_grads(detach_norm=False, detach_V=True)
    expect(mine[2] is not None and mine[2].abs().max() > 0,
           "m gets no gradient: the magnitude trains; detach only the norm ||V||, not m (nor m / ||V||)")
    expect(mine[0] is not None and mine[1] is not None and mine[1].abs().max() > 0,
           "A and B get no gradient: V = W0 + s B A must keep its graph in the numerator; detach only its "
           "norm ||V||")
    close = lambda u, v: torch.allclose(u, v, atol=1e-5, rtol=1e-4)
    if all(close(u, v) for u, v in zip(mine, exact)) and not close(mine[1], detached[1]):
        raise Wrong("the gradients flow through the norm ||V||: DoRA section 4.3 treats ||W0 + s B A|| as a constant "
                    "in the backward pass, so detach it (what minipeft's DoRALinear does)")
    expect(not all(close(u, v) for u, v in zip(mine[:2], numerator_detached[:2])),
           "V is detached where it multiplies x, so A and B learn only through the norm: DoRA detaches the norm "
           "||V|| and keeps V's graph in the numerator (the reverse)")
    for name, u, v in zip(("A", "B", "m"), mine, detached):
        expect(close(u, v), f"the outputs agree but the gradient of {name} is not DoRA's (norm detached, V and m "
                            "not): a .detach() missing, or one too many?")
    # in a tiny Llama, against minipeft's DoRA: same logits and gradients
    summary = _in_a_tiny_llama(MyDoRA, "dora")
    return f"m = ||W0|| at init, the norm detached; in a tiny Llama: {summary}"


# ---------------------------------------------------------------------------------------------- Build 2


def check_my_simple_dora(MySimpleDoRA) -> str:
    """MySimpleDoRA(base, r, alpha): h = w * (W0 x + s B A x), W0 = W / ||W||_row (frozen), w = ||W|| at init."""
    layer = _layer(MySimpleDoRA)
    A, B, w = _lora_factors(layer, "w")
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base.")}
    extra = sorted(set(trainable) - {"A", "B", "w"})
    expect(not extra, f"{extra[0]!r} is trainable: only A, B and w train; the row norms ||W|| are frozen (keep them "
                      "in a buffer, register_buffer, or a plain tensor)" if extra else "")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, N_IN, generator=g)
    out = call_with_hint(layer, x, hint="x is (batch, in); W's row norms are (out,)")
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (5, N_OUT), f"the output should be (5, {N_OUT})")
    expect(torch.allclose(out, layer.base(x), atol=1e-5), "at init (B = 0, w = ||W||) the layer must return base(x)")
    _set_trained(A, B, w)
    W = layer.base.weight.detach()
    a, b, ww = (t.detach().clone() for t in (A, B, w))
    s, norms = ALPHA / R, W.norm(dim=1)
    out = call_with_hint(layer, x, hint="failed with a non-zero B")
    unit_x, branch = F.linear(x, W) / norms, s * (x @ a.T) @ b.T
    want = ww * (unit_x + branch)
    if not torch.allclose(out, want, atol=1e-5):
        V = W / norms[:, None] + s * b @ a
        for hint, version in (
                ("that renormalises by the row norms of W0 + s B A in every forward pass: DoRA's rule. Simple DoRA "
                 "divides by the frozen ||W|| once and never normalises the update",
                 ww * F.linear(x, V) / V.norm(dim=1)),
                ("w scales the update too: w * (W0 x + s B A x), not w * W0 x + s B A x", ww * unit_x + branch),
                ("the branch's scale is missing: s = alpha / r", ww * (unit_x + branch / s)),
                ("W0 = W / ||W|| has unit rows: divide W x by the row norms of W", ww * (F.linear(x, W) + branch))):
            expect(not torch.allclose(out, version, atol=1e-5), hint)
        raise Wrong("with a non-zero B the output is not w * (W x / ||W||_row + s (x A^T) B^T)")
    # gradients: w, A, B as SimpleDoRALinear's (in a tiny Llama, check_build)
    summary = _in_a_tiny_llama(MySimpleDoRA, "simple_dora")
    return f"w = ||W|| at init, the norms frozen, no renormalisation; in a tiny Llama: {summary}"


# ---------------------------------------------------------------------------------------------- Exercises


def exercise_1(dora_params_1b) -> str:
    """DoRA r=8 on q_proj, v_proj of Llama-3.2-1B: the number of trainable values."""
    cfg = replace(LlamaConfig.from_name("llama-3.2-1b"), vocab_size=8)   # the vocabulary does not matter
    with torch.device("meta"):
        counted = peft.count_parameters(apply_method(Llama(cfg), "dora", r=8))[0]
    expect(isinstance(dora_params_1b, int), f"give a whole number, got {type(dora_params_1b).__name__}")
    lora = counted - cfg.n_layers * (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
    expect(dora_params_1b != lora, "that is LoRA's count: DoRA adds a magnitude per output feature of each target")
    expect(dora_params_1b == counted, f"{dora_params_1b:,} is not it: LoRA's A and B, plus a magnitude of size "
                                      "out_features per target (q_proj and v_proj differ in width: GQA)")
    return f"DoRA r=8 on q, v, Llama-3.2-1B: {counted:,} trainable numbers ({counted - lora:,} more than LoRA)"


def exercise_2(dora_merged_weight) -> str:
    """dora_merged_weight(W0, A, B, m, s) = the weight DoRALinear.merge writes."""
    torch.manual_seed(1)
    layer = DoRALinear(nn.Linear(12, 6, bias=False), DoRAConfig(r=2, alpha=4))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.2)
        W0, A, B, m = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude))
        layer.merge()
    got = call_with_hint(dora_merged_weight, W0, A, B, m, layer.config.scaling,
                hint="W0 (6, 12), A (2, 12), B (6, 2), m (6,): V = W0 + s B A is (6, 12), its row norms (6,)")
    expect(isinstance(got, torch.Tensor) and tuple(got.shape) == (6, 12), "return the merged weight, (out, in) = "
                                                                          "(6, 12)")
    expect(torch.allclose(got, layer.base.weight, atol=1e-6),
           "not yet: V = W0 + s B A, then each row of V rescaled to norm m_i")
    return "= DoRALinear.merge; its row norms are m"


def exercise_3(exact_grad_V) -> str:
    """exact_grad_V(g, V, m): dL/dV through m * V / ||V||_row without detaching the norm."""
    gen = torch.Generator().manual_seed(0)
    V, g, m = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen), torch.rand(5, generator=gen) + 0.5
    V_ref = V.clone().requires_grad_(True)
    (g * (m[:, None] * V_ref / V_ref.norm(dim=1, keepdim=True))).sum().backward()
    got = call_with_hint(exact_grad_V, g, V, m, hint="g and V are (out, in) = (5, 7), m (5,)")
    expect(isinstance(got, torch.Tensor) and tuple(got.shape) == (5, 7), "return dL/dV, shaped like V (5, 7)")
    detached = m[:, None] / V.norm(dim=1, keepdim=True) * g
    expect(not torch.allclose(got, detached, atol=1e-5),
           "that is the detached gradient (m / ||v||) g, what DoRA uses; the exact one also differentiates ||v||")
    expect(torch.allclose(got, V_ref.grad, atol=1e-5),
           "not yet: d(v / ||v||)/dv = (I - v_hat v_hat^T) / ||v||, then times m_i")
    along = ((detached - V_ref.grad) * V / V.norm(dim=1, keepdim=True)).sum(1)
    return f"= autograd; the detached gradient differs only along each row (by up to {along.abs().max():.2f})"


def exercise_4(simple_dora_row_norms) -> str:
    """simple_dora_row_norms(W, A, B, w, s) = the row norms of Simple DoRA's merged weight."""
    torch.manual_seed(2)
    layer = SimpleDoRALinear(nn.Linear(12, 6, bias=False), SimpleDoRAConfig(r=2, alpha=4))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        W, A, B, w = (t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude))
        layer.merge()
    got = call_with_hint(simple_dora_row_norms, W, A, B, w, layer.config.scaling,
                hint="W (6, 12), A (2, 12), B (6, 2), w (6,): one norm per output row")
    expect(isinstance(got, torch.Tensor) and tuple(got.shape) == (6,), "return one norm per row, shape (6,)")
    expect(not torch.allclose(got, w, atol=1e-5), "that is w itself: true at init only; once B != 0 the update "
                                                  "changes the row norms too")
    expect(torch.allclose(got, layer.base.weight.norm(dim=1), atol=1e-5),
           "not yet: the merged weight is diag(w) (W0 + s B A), with W0 = W / ||W|| per row")
    return f"= the merged weight's row norms; w alone is off by up to {(w / got - 1).abs().max():.0%}"
