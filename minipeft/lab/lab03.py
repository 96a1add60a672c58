"""Checks of lab 03 ((IA)^3++ and the initialisation identity): the student's (IA)^3 layer, QK skip-norm and
(IA)^3 / (IA)^3++ injection, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). `check_build` alone
cannot see an initialisation (it copies minipeft's values into the student's tensors), so each build's
initialisation is checked first: (IA)^3's vectors start at ONE, the skip-norm's scale at ZERO, and the
model they make is the base model, bit for bit.
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
from ..methods.ia3 import IA3Linear
from ..methods.ia3pp import QKSkipNorm
from . import Wrong, assert_same_outputs_and_grads, call_with_hint, check_build, expect, make_base

RENAME = {"l": "ia3_l", "alpha_q": "q_scale", "alpha_k": "k_scale"}   # the student's names -> minipeft's


def _param(module: nn.Module, name: str, shape: tuple, what: str) -> nn.Parameter:
    p = getattr(module, name, None)
    expect(isinstance(p, nn.Parameter), f"`self.{name}` should be an nn.Parameter (so it trains and shows in "
                                        "named_parameters())")
    expect(tuple(p.shape) == shape, f"`self.{name}` has shape {tuple(p.shape)}, want {shape}: {what}")
    return p


def _init_hint(p: torch.Tensor, name: str, want: float, why: str) -> None:
    """`p` must be all `want` (1 or 0); otherwise say what it looks like."""
    if torch.all(p == want):
        return
    if torch.all(p == 0):
        looks = "all zeros"
    elif torch.all(p == 1):
        looks = "all ones"
    elif torch.all(p == p.flatten()[0]):
        looks = f"all {p.flatten()[0].item():g}"
    else:
        looks = "random"
    raise Wrong(f"`{name}` starts {looks}; it must start at {want:g}: {why}")


# ---------------------------------------------------------------------------------------------- Build 1


def check_my_ia3(MyIA3) -> str:
    """MyIA3(base, feedforward): a vector of ones on the Linear's output (or, feedforward, its input)."""
    n_in, n_out = 12, 20
    torch.manual_seed(0)
    x = torch.randn(5, n_in)
    for feedforward, size, side in ((False, n_out, "output"), (True, n_in, "input")):
        layer = MyIA3(nn.Linear(n_in, n_out, bias=False), feedforward)
        l = _param(layer, "l", (size,), f"with feedforward={feedforward} the vector scales the layer's {side}, "
                                        f"{size} numbers (in_features = {n_in}, out_features = {n_out})")
        _init_hint(l, "l", 1.0, "a vector of ones multiplies nothing away, so the layer starts as the base layer "
                                "(zeros would switch it off, a random vector would change the model)")
        out = call_with_hint(layer, x, hint=f"with feedforward={feedforward} the vector multiplies the {side}")
        expect(torch.equal(out, layer.base(x)), "with l = 1 the layer must return base(x) exactly")
        with torch.no_grad():
            l.copy_(torch.rand(size) + 0.5)
        out = call_with_hint(layer, x, hint=f"with feedforward={feedforward} the vector multiplies the {side}")
        want = layer.base(x * l) if feedforward else layer.base(x) * l
        expect(torch.allclose(out, want, atol=1e-6),
               f"with feedforward={feedforward} the output must be " +
               ("base(x * l): the vector scales the input features" if feedforward else
                "base(x) * l: the vector scales the output features"))
    # in a model, against minipeft's (IA)^3: same logits and gradients
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mine = copy.deepcopy(tiny)
    peft.inject(mine, ("k_proj", "v_proj", "down_proj"),
                lambda name, linear: MyIA3(linear, feedforward=name.endswith("down_proj")))
    summary = check_build(mine, apply_method(copy.deepcopy(tiny), "ia3"), idx, RENAME)
    return f"ones at init, on the right side; in a tiny Llama: {summary}"


# ---------------------------------------------------------------------------------------------- Build 2


def _skip(x: torch.Tensor, alpha: torch.Tensor, eps: float, dims=(-1,), eps_inside: bool = True,
          skip: bool = True) -> torch.Tensor:
    ms = x.pow(2).mean(dims, keepdim=True)
    unit = x / (torch.sqrt(ms + eps) if eps_inside else torch.sqrt(ms) + eps)
    return (x if skip else 0) + alpha * unit


def check_skip_norm(MySkipNorm) -> str:
    """MySkipNorm(head_dim, eps): q + alpha_q q / rms(q), k + alpha_k k / rms(k), per head; alphas zero."""
    hd, eps = 16, 1e-5
    g = torch.Generator().manual_seed(0)
    norm = MySkipNorm(hd, eps)
    alphas = [_param(norm, name, (hd,), "one scale per coordinate of a head (head_dim numbers), shared by all "
                                        "heads of the layer") for name in ("alpha_q", "alpha_k")]
    for name, alpha in zip(("alpha_q", "alpha_k"), alphas):
        _init_hint(alpha, name, 0.0, "the skip q + 0 * q / rms(q) = q then leaves the model exactly as it was "
                                     "(with alpha = 1 it would change at init)")
    q, k = torch.randn(2, 5, 4, hd, generator=g), torch.randn(2, 5, 2, hd, generator=g)   # 4 query, 2 kv heads
    out = call_with_hint(norm, q, k, hint="q is (B, T, n_heads, hd) and k (B, T, n_kv_heads, hd): fewer kv heads than "
                                 "query heads")
    expect(isinstance(out, tuple) and len(out) == 2, "forward(q, k) returns the pair (q, k)")
    expect(out[0].abs().max() > 0, "at init (alpha = 0) your q comes back all zeros: the skip is missing, "
                                   "q + alpha * q / rms(q) (a plain QK-norm with alpha = 0 zeroes every query)")
    expect(torch.equal(out[0], q) and torch.equal(out[1], k), "at init (alpha = 0) q and k must come back "
                                                              "unchanged, bit for bit")
    with torch.no_grad():
        for alpha in alphas:
            alpha.copy_(torch.randn(hd, generator=g))
    aq, ak = (a.detach().clone() for a in alphas)
    q_out, k_out = call_with_hint(norm, q, k, hint="failed with non-zero alphas")
    for name, got, x, a, other in (("q", q_out, q, aq, ak), ("k", k_out, k, ak, aq)):
        want = _skip(x, a, eps)
        if torch.allclose(got, want, atol=1e-4):   # eps is checked on small inputs below
            continue
        for hint, version in (
                (f"the skip is missing: {name} + alpha * {name} / rms({name}), so that alpha = 0 leaves {name} as "
                 "it is (a plain QK-norm with alpha = 0 zeroes it)", _skip(x, a, eps, skip=False)),
                (f"{name} is scaled by the other alpha: alpha_q goes with q, alpha_k with k", _skip(x, other, eps)),
                ("rms is per head, over the last dimension (head_dim), not across the heads",
                 _skip(x, a, eps, dims=(-2, -1))),
                ("rms is per head and per token, over the last dimension (head_dim)", _skip(x, a, eps, dims=(-2,)))):
            expect(not torch.allclose(got, version, atol=1e-5), hint)
        raise Wrong(f"{name} is not {name} + alpha * {name} / sqrt(mean({name}^2) + eps) (per head, over head_dim)")
    # eps where it belongs: small inputs, where it matters
    small_q, small_k = q * 1e-3, k * 1e-3
    got = call_with_hint(norm, small_q, small_k, hint="failed on small inputs")[0]
    expect(not torch.allclose(got, _skip(small_q, aq, 0.0), atol=1e-5),
           "eps is missing: rms(q) = sqrt(mean(q^2) + eps), which keeps a zero head finite")
    expect(not torch.allclose(got, _skip(small_q, aq, eps, eps_inside=False), atol=1e-5),
           "eps belongs inside the square root: sqrt(mean(q^2) + eps)")
    expect(torch.allclose(got, _skip(small_q, aq, eps), atol=1e-5), "on small inputs (rms 1e-3) the result is "
                                                                     "off: eps, inside the square root")
    # gradients, w.r.t. the alphas and the inputs, as minipeft's QKSkipNorm; at alpha = 0 and after
    theirs = QKSkipNorm(hd, eps, device="cpu")
    for alpha_q, alpha_k in ((torch.zeros(hd), torch.zeros(hd)), (aq, ak)):
        with torch.no_grad():
            norm.alpha_q.copy_(alpha_q), norm.alpha_k.copy_(alpha_k)
            theirs.q_scale.copy_(alpha_q), theirs.k_scale.copy_(alpha_k)
        q1, q2, k1, k2 = (t.clone().requires_grad_() for t in (q, q, k, k))
        assert_same_outputs_and_grads(lambda: torch.cat([t.flatten() for t in norm(q1, k1)]),
                                      lambda: torch.cat([t.flatten() for t in theirs(q2, k2)]),
                                      [(norm.alpha_q, theirs.q_scale), (norm.alpha_k, theirs.k_scale),
                                       (q1, q2), (k1, k2)], names=["alpha_q", "alpha_k", "q", "k"])
        expect(norm.alpha_q.grad.norm() > 0, "alpha_q gets no gradient at zero: it multiplies q / rms(q)")
    # in a model: minipeft's (IA)^3 vectors with your skip-norm in every qk_adapter slot
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mine = apply_method(copy.deepcopy(tiny), "ia3pp", use_qk_norm=False)
    peft.fill_slot(mine, "qk_adapter", lambda i, attn: MySkipNorm(attn.head_dim, tiny.config.norm_eps))
    summary = check_build(mine, apply_method(copy.deepcopy(tiny), "ia3pp"), idx, RENAME)
    return f"alphas at zero, the identity at init, gradients as QKSkipNorm's; in a tiny Llama: {summary}"


# ---------------------------------------------------------------------------------------------- Build 3


def _vector(module: nn.Module) -> torch.Tensor | None:
    """The student's (IA)^3 vector of a wrapped Linear, None for a plain Linear."""
    return None if type(module) is nn.Linear else getattr(module, "l", None)


def check_my_ia3_model(my_ia3) -> str:
    """my_ia3(base, plus): (IA)^3 (l_k, l_v, l_ff) or (IA)^3++ (+ l_o and the skip-norm) on a copy of base."""
    tiny = make_base(0)
    cfg = tiny.config
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = tiny(idx)
    summaries = []
    for plus, name in ((False, "ia3"), (True, "ia3pp")):
        model = my_ia3(tiny, plus)
        expect(isinstance(model, Llama), f"my_ia3 should return the model, got {type(model).__name__}")
        expect(model is not tiny and all(type(layer.self_attn.k_proj) is nn.Linear for layer in tiny.layers),
               "my_ia3 changed `base` itself: work on a copy (copy.deepcopy(base))")
        what = "(IA)^3++" if plus else "(IA)^3"
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for proj, n in (("k_proj", cfg.n_kv_heads * cfg.head_dim), ("v_proj", cfg.n_kv_heads * cfg.head_dim)):
                l = _vector(getattr(attn, proj))
                expect(l is not None, f"layers.{i}.self_attn.{proj} has no vector: {what} scales the outputs of "
                                      "k_proj and v_proj (l_k, l_v)")
                expect(l.numel() == n, f"{proj}'s vector has {l.numel()} numbers, want its {n} outputs")
            l_ff = _vector(mlp.down_proj)
            expect(l_ff is not None or _vector(mlp.up_proj) is None and _vector(mlp.gate_proj) is None,
                   "l_ff sits on down_proj's INPUT (the SwiGLU hidden state), not on up_proj or gate_proj")
            expect(l_ff is not None, f"layers.{i}.mlp.down_proj has no vector: l_ff scales its input")
            expect(l_ff.numel() == cfg.ffn_dim, f"down_proj's vector has {l_ff.numel()} numbers: l_ff scales its "
                                                f"INPUT, the {cfg.ffn_dim} hidden features (feedforward=True)")
            for other in ("q_proj",):
                expect(_vector(getattr(attn, other)) is None, f"{other} gets no vector in (IA)^3 or (IA)^3++")
            expect(_vector(mlp.up_proj) is None and _vector(mlp.gate_proj) is None,
                   "up_proj and gate_proj get no vector: l_ff is on down_proj's input")
            l_o = _vector(attn.o_proj)
            if plus:
                expect(l_o is not None, f"layers.{i}.self_attn.o_proj has no vector: (IA)^3++ adds l_o on its output")
                expect(l_o.numel() == cfg.dim, f"o_proj's vector has {l_o.numel()} numbers, want its {cfg.dim} "
                                               "outputs")
                expect(attn.qk_adapter is not None, f"layers.{i}.self_attn.qk_adapter is empty: (IA)^3++ puts a "
                                                    "MySkipNorm in every attention's qk_adapter slot")
            else:
                expect(l_o is None, "o_proj gets a vector (l_o) in (IA)^3++ only, not in plain (IA)^3")
                expect(attn.qk_adapter is None, "plain (IA)^3 has no skip-norm: leave qk_adapter empty")
        with torch.no_grad():
            expect(torch.equal(model(idx), base_logits), f"{what} at init must give the base model's logits, bit "
                                                          "for bit (vectors of ones, alphas of zero)")
        summaries.append(check_build(model, apply_method(copy.deepcopy(tiny), name), idx, RENAME).split(";")[0])
    return f"(IA)^3: {summaries[0]}; (IA)^3++: {summaries[1]}; both the base model at init"


# ---------------------------------------------------------------------------------------------- Exercises


def exercise_1(ia3pp_params_3b) -> str:
    """(IA)^3++'s trainable numbers on Llama-3.2-3B."""
    cfg = replace(LlamaConfig.from_name("llama-3.2-3b"), vocab_size=8)   # no vector touches the vocabulary
    with torch.device("meta"):
        counted = peft.count_parameters(apply_method(Llama(cfg), "ia3pp"))[0]
    expect(isinstance(ia3pp_params_3b, int), f"give a whole number, got {type(ia3pp_params_3b).__name__}")
    expect(ia3pp_params_3b == counted, f"{ia3pp_params_3b:,} is not it: per layer l_k and l_v "
                                       "(n_kv_heads * head_dim each), l_ff, l_o, and the two alphas")
    return f"(IA)^3++ on Llama-3.2-3B: {counted:,} trainable numbers"


def exercise_2(zero_query_weight) -> str:
    """zero_query_weight(t): the attention weight of query t on each visible key when every query is zero."""
    T, d = 8, 16
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    P = (torch.zeros(T, d) @ torch.randn(T, d, generator=g).T).masked_fill(causal, -math.inf).softmax(-1)
    got = [zero_query_weight(t) for t in range(T)]
    expect(all(isinstance(w, (int, float)) for w in got), f"return a number, got {type(got[0]).__name__}")
    expect(all(abs(w - P[t, 0].item()) < 1e-6 for t, w in enumerate(got)),
           "not yet: query t sees keys 0 .. t, and every score is 0: what is the softmax of t + 1 equal scores?")
    return "each query averages its visible values uniformly: the model would start far from the base"


def exercise_3(alpha_grad_is_zero) -> str:
    """Is dL/d alpha_q exactly zero at alpha = 0 when every key is the same? (measured by autograd)"""
    expect(isinstance(alpha_grad_is_zero, bool), "answer True or False")
    d, T = 8, 5
    skip = QKSkipNorm(d, eps=1e-5, device="cpu")
    g = torch.Generator().manual_seed(0)
    Q, V, G = torch.randn(1, T, 1, d, generator=g), torch.randn(T, d, generator=g), torch.randn(T, d, generator=g)
    K = torch.randn(1, 1, 1, d, generator=g).expand(1, T, 1, d)          # the same key at every position
    q, k = skip(Q, K)
    S = (q[0, :, 0] @ k[0, :, 0].T / math.sqrt(d)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    (G * (S.softmax(-1) @ V)).sum().backward()
    largest = skip.q_scale.grad.abs().max().item()
    expect(alpha_grad_is_zero == (largest < 1e-5),
           "not yet: a softmax does not change when every score in a row moves by the same amount")
    return f"max |dL/d alpha_q| = {largest:.1e}: the uniform attention over identical keys is stationary in alpha"


def exercise_4(merge_ia3) -> str:
    """merge_ia3(W, l, feedforward) -> W' with F.linear(x, W') = the (IA)^3 layer's output."""
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    l_in, l_out = torch.rand(4, generator=g) + 0.5, torch.rand(6, generator=g) + 0.5
    merged_in = call_with_hint(merge_ia3, W, l_in, True, hint="feedforward: l has in_features (4) numbers, W is (6, 4)")
    merged_out = call_with_hint(merge_ia3, W, l_out, False, hint="an output vector has out_features (6) numbers, W is (6, 4)")
    for merged in (merged_in, merged_out):
        expect(isinstance(merged, torch.Tensor) and tuple(merged.shape) == (6, 4),
               "return the merged weight, shaped like W (out, in) = (6, 4)")
    expect(torch.allclose(F.linear(x, merged_in), F.linear(x * l_in, W), atol=1e-6),
           "feed-forward: x * l meets W's columns (the input features)")
    expect(torch.allclose(F.linear(x, merged_out), F.linear(x, W) * l_out, atol=1e-6),
           "output vector: l scales W's rows (the output features)")
    layer = IA3Linear(nn.Linear(4, 6, bias=False), feedforward=False)
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.ia3_l.copy_(l_out)
        layer.merge()
    expect(torch.allclose(layer.base.weight, merged_out), "differs from IA3Linear.merge")
    return "merge_ia3 = IA3Linear.merge, rows for an output vector, columns for an input vector"
