"""Checks of lab 11 (bottleneck adapters and AdaMix): the student's bottleneck, its sequential and parallel
wrappers, AdaMix's routed/averaged forward and its symmetric KL, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The checks build their
own inputs and leave the notebook's random state as they found it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig
from ..methods.adamix import AdaMixConfig, MixtureBottleneck, symmetric_kl
from ..methods.bottleneck_adapter import Bottleneck
from . import Wrong, assert_same_outputs_and_grads, check_build, expect, make_base

D, K = 64, 8


def _noise(module: nn.Module, seed: int, size: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(size * torch.randn(p.shape, generator=g))
    return module


def _projections(adapter: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
    expect(isinstance(down, nn.Linear) and isinstance(up, nn.Linear),
           "keep the two projections as self.down = nn.Linear(d, k) and self.up = nn.Linear(k, d) (minipeft's "
           "names, so that the checks can pair your tensors with its)")
    return down, up


def _branch(h, down, up, f=F.gelu, scaling=1.0):
    return scaling * F.linear(f(F.linear(h, down.weight, down.bias)), up.weight, up.bias)


def check_my_bottleneck(MyBottleneck) -> str:
    """MyBottleneck(d, k, scaling=1.0): s (f(h W_down + b_down) W_up + b_up), identity-making zeros at init."""
    torch.manual_seed(0)
    adapter = MyBottleneck(D, K)
    down, up = _projections(adapter)
    expect(tuple(down.weight.shape) == (K, D) and tuple(up.weight.shape) == (D, K),
           f"down.weight {tuple(down.weight.shape)}, up.weight {tuple(up.weight.shape)}: with d = {D}, k = {K} "
           f"want nn.Linear(d, k) (weight ({K}, {D})) down and nn.Linear(k, d) (weight ({D}, {K})) up")
    expect(down.bias is not None and up.bias is not None, "both projections have a bias, b_down and b_up")
    expect(all(p.requires_grad for p in adapter.parameters()), "a tensor of the adapter is frozen: all four train")
    expect(torch.count_nonzero(up.weight) == 0 and torch.count_nonzero(up.bias) == 0,
           "W_up and b_up must start at zero (the up-projection): then the branch outputs exactly 0 and every "
           "adapter is the identity at init, so the adapted model starts as the base model")
    expect(torch.count_nonzero(down.bias) == 0, "b_down starts at zero (as in minipeft and Houlsby's code)")
    expect(torch.count_nonzero(down.weight) > 0,
           "W_down is all zeros: with W_up = 0 too, f(h W_down) = f(0) = 0, so W_up's gradient is 0 and so is "
           "W_down's; W_down keeps nn.Linear's random (Kaiming-uniform) initialisation")
    bound = 1 / math.sqrt(D)
    expect(down.weight.abs().max() <= bound * (1 + 1e-6),
           f"W_down's entries reach {down.weight.abs().max():.3g}, beyond nn.Linear's Kaiming-uniform bound "
           f"1/sqrt(d) = {bound:.3g}: keep nn.Linear's own initialisation of W_down")
    h = torch.randn(2, 5, D)
    out0 = adapter(h)
    expect(tuple(out0.shape) == (2, 5, D), f"for h of shape (2, 5, {D}) the branch has shape {tuple(out0.shape)}")
    expect(torch.count_nonzero(out0) == 0, "at init the branch must output exactly 0 (W_up = 0, b_up = 0)")
    summary = []
    for scaling in (1.0, 4.0):
        mine = MyBottleneck(D, K, scaling)
        theirs = _noise(Bottleneck(D, K, "gelu", scaling), seed=1)
        m_down, m_up = _projections(mine)
        pairs = [(m_down.weight, theirs.down.weight), (m_down.bias, theirs.down.bias),
                 (m_up.weight, theirs.up.weight), (m_up.bias, theirs.up.bias)]
        with torch.no_grad():
            for p_mine, p_theirs in pairs:
                p_mine.copy_(p_theirs)
            out_mine, out_theirs = mine(h), theirs(h)
        if not torch.allclose(out_mine, out_theirs, atol=1e-5):
            factor = ((out_mine * out_theirs).sum() / (out_theirs * out_theirs).sum()).item()
            expect(not torch.allclose(out_mine, factor * out_theirs, atol=1e-5),
                   f"with scaling={scaling} your branch is {factor:.3g} x minipeft's: multiply the whole branch by "
                   "s = scaling, once")
            for name, f in (("ReLU", F.relu), ("SiLU", F.silu), ("no nonlinearity", lambda z: z)):
                with torch.no_grad():
                    other = _branch(h, theirs.down, theirs.up, f, scaling)
                expect(not torch.allclose(out_mine, other, atol=1e-5), f"your f looks like {name}: the lab's "
                                                                       "adapters use GELU (F.gelu)")
            expect(False, "your branch differs from s (f(h W_down + b_down) W_up + b_up): check the order "
                          "(down, then f, then up) and the biases")
        summary.append(assert_same_outputs_and_grads(lambda: mine(h), lambda: theirs(h), pairs,
                                                     names=["down.weight", "down.bias", "up.weight", "up.bias"]))
    return f"zero branch at init; same output and gradients as minipeft's Bottleneck for s = 1 and 4 " \
           f"(largest difference {max(summary):.1e})"


def _frozen_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=False).requires_grad_(False)


def check_my_adapter_linear(MyAdapterLinear) -> str:
    """MyAdapterLinear(base, k): y + adapter(y), y = base(x); = bottleneck_adapter houlsby and pfeiffer."""
    base = _frozen_linear(48, 32, seed=0)
    layer = MyAdapterLinear(base, K)
    adapter = getattr(layer, "adapter", None)
    expect(getattr(layer, "base", None) is base and isinstance(adapter, nn.Module),
           "keep the frozen Linear as self.base and the bottleneck as self.adapter (minipeft's names)")
    _, up = _projections(adapter)
    expect(up.out_features == base.out_features,
           f"the adapter's width is {up.out_features}: it acts on the Linear's OUTPUT, "
           f"MyBottleneck(base.out_features, k) = ({base.out_features}, k)")
    x = torch.randn(3, 48)
    y = base(x)
    out0 = layer(x)
    expect(torch.count_nonzero(out0) > 0, "at init your layer returns 0: the residual (skip) connection is missing, "
                                          "return y + adapter(y)")
    expect(torch.equal(out0, y), "at init the adapted Linear must return base(x) exactly: y + adapter(y) with the "
                                 "adapter's output exactly 0 (W_up = 0, b_up = 0)")
    _noise(adapter, seed=2)
    with torch.no_grad():
        out, branch = layer(x), adapter(y)
    expect(not torch.allclose(out, branch, atol=1e-5), "you return adapter(y) alone: the residual (skip) connection "
                                                       "is missing, y + adapter(y)")
    expect(torch.allclose(out, y + branch, atol=1e-5), "the output is not y + adapter(y), y = base(x): the adapter "
                                                       "reads the Linear's output and its branch is added to it")
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    summaries = []
    for placement, targets in (("houlsby", ("o_proj", "down_proj")), ("pfeiffer", ("down_proj",))):
        mine = copy.deepcopy(tiny)
        peft.inject(mine, targets, lambda name, linear: MyAdapterLinear(linear, K))
        theirs = apply_method(copy.deepcopy(tiny), "bottleneck_adapter", placement=placement, bottleneck=K)
        expect(torch.equal(mine(idx), tiny(idx)), f"{placement}: the adapted model is not the base model at init")
        summaries.append(f"{placement}: " + check_build(mine, theirs, idx).split(";")[0])
    return "; ".join(summaries)


def check_my_parallel(MyParallel) -> str:
    """MyParallel(mlp, d, k, scaling): mlp(x) + adapter(x); = bottleneck_adapter parallel, s = 4."""
    tiny = make_base(0)
    mlp = copy.deepcopy(tiny.layers[0].mlp).requires_grad_(False)
    layer = MyParallel(mlp, D, K, 4.0)
    adapter = getattr(layer, "adapter", None)
    expect(getattr(layer, "base", None) is mlp and isinstance(adapter, nn.Module),
           "keep the frozen sub-layer as self.base and the bottleneck as self.adapter (minipeft's names)")
    x = torch.randn(2, 5, D)
    y = mlp(x)
    out0 = layer(x)
    expect(torch.count_nonzero(out0) > 0, "at init your module returns 0: the sub-layer's own output is missing, "
                                          "return mlp(x) + adapter(x)")
    expect(torch.equal(out0, y), "at init the module must return mlp(x) exactly (the adapter's branch is 0)")
    _noise(adapter, seed=3)
    with torch.no_grad():
        out = layer(x)
        expect(not torch.allclose(out, y + adapter(y), atol=1e-5),
               "your adapter reads the MLP's output (the sequential placement): the parallel adapter reads the "
               "sub-layer's INPUT x and adds to its output, mlp(x) + adapter(x)")
        expect(not torch.allclose(out, adapter(x), atol=1e-5), "you return adapter(x) alone: add the sub-layer's "
                                                               "output, mlp(x) + adapter(x)")
        expect(torch.allclose(out, y + adapter(x), atol=1e-5), "the output is not mlp(x) + adapter(x)")
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mine = copy.deepcopy(tiny)
    peft.wrap_modules(mine, ("mlp",), lambda name, sub: MyParallel(sub, tiny.config.dim, K, 4.0))
    theirs = apply_method(copy.deepcopy(tiny), "bottleneck_adapter", placement="parallel", bottleneck=K, scaling=4.0)
    return "parallel, s = 4: " + check_build(mine, theirs, idx)


def _mixture(seed: int = 4) -> MixtureBottleneck:
    torch.manual_seed(seed)
    return _noise(MixtureBottleneck(D, AdaMixConfig(bottleneck=K, n_experts=4)), seed=seed)


def _with(mix: MixtureBottleneck, h, wd, bd, wu, bu):
    return F.linear(F.gelu(F.linear(h, wd, bd)), wu, bu) * mix.scaling


def check_mixture_forward(my_mixture_forward) -> str:
    """my_mixture_forward(mix, h): copies (i, j) drawn i then j in training, the copies' average in eval."""
    mix = _mixture()
    M = len(mix.down_weight)
    h = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(5))
    names = ["down_weight", "down_bias", "up_weight", "up_bias"]
    worst = 0.0
    for mode in ("train", "eval"):
        for seed in range(6):
            mine, theirs = copy.deepcopy(mix).train(mode == "train"), copy.deepcopy(mix).train(mode == "train")

            def run_mine():
                torch.manual_seed(seed)
                return my_mixture_forward(mine, h)

            def run_theirs():
                torch.manual_seed(seed)
                return theirs(h)

            with torch.no_grad():
                try:
                    out_mine = run_mine()
                except NotImplementedError:
                    raise
                except RuntimeError as e:
                    raise Wrong(f"your forward fails ({str(e)[:80]}): the copies are stacked along dim 0, "
                                "(M, k, d), (M, k), (M, d, k), (M, d); one copy is p[i], the average p.mean(0)") \
                        from None
                out_theirs = run_theirs()
            if not torch.allclose(out_mine, out_theirs, atol=1e-5):
                torch.manual_seed(seed)
                i, j = int(torch.randint(M, ())), int(torch.randint(M, ()))
                W = [getattr(mix, n).detach() for n in names]
                alternatives = {
                    "same": _with(mix, h, W[0][i], W[1][i], W[2][i], W[3][i]),
                    "routed": _with(mix, h, W[0][i], W[1][i], W[2][j], W[3][j]),
                    "swapped": _with(mix, h, W[0][j], W[1][j], W[2][i], W[3][i]),
                    "average": _with(mix, h, *(w.mean(0) for w in W)),
                    "first": _with(mix, h, *(w[0] for w in W)),
                    "outputs": torch.stack([_with(mix, h, W[0][c], W[1][c], W[2][c], W[3][c])
                                            for c in range(M)]).mean(0),
                    "weights only": _with(mix, h, W[0].mean(0), W[1][0], W[2].mean(0), W[3][0]),
                }
                close = {k for k, v in alternatives.items() if torch.allclose(out_mine, v.detach(), atol=1e-5)}
                if mode == "train":
                    expect("average" not in close, "in training mode (mix.training) AdaMix routes: one random copy "
                                                   "per projection; the average is for eval mode")
                    expect("same" not in close, "you used the same copy i for both projections: draw i for "
                                                "W_down, b_down, then a second, independent j for W_up, b_up")
                    expect("swapped" not in close, "the first draw picks the down-projection's copy i, the second "
                                                   "the up-projection's j")
                    expect(False, "not the output of copies (i, j) drawn as int(torch.randint(M, ())) for i, then "
                                  "for j (the same draws as minipeft, so the same seed gives the same routing)")
                expect("outputs" not in close, "you averaged the outputs of the copies; AdaMix averages the WEIGHTS "
                                               "(adaptation merging): one adapter with the mean W_down, b_down, "
                                               "W_up, b_up")
                expect("first" not in close,
                       "in eval mode you used one copy: average the M copies of every tensor over dim 0")
                expect(not close & {"routed", "same"}, "in eval mode (mix.training is False) nothing is routed: "
                                                       "compute with the average of the M copies of every tensor")
                expect("weights only" not in close, "average the biases too, not only the weights")
                expect(False, "in eval mode compute with the mean over the copies (dim 0) of each of W_down, "
                              "b_down, W_up, b_up")
            pairs = [(getattr(mine, n), getattr(theirs, n)) for n in names]
            worst = max(worst, assert_same_outputs_and_grads(run_mine, run_theirs, pairs, names=names))
            if mode == "eval":
                break
    return f"6 routings and the averaged forward = MixtureBottleneck's, outputs and gradients ({worst:.1e})"


def check_symmetric_kl(my_symmetric_kl) -> str:
    """my_symmetric_kl(a, b): 1/2 (KL(p_a || p_b) + KL(p_b || p_a)), rows averaged, each target detached."""
    g = torch.Generator().manual_seed(6)
    n, V = 20, 50
    a0, b0 = torch.randn(n, V, generator=g), 2 * torch.randn(n, V, generator=g)
    a1, b1, a2, b2 = (t.clone().requires_grad_(True) for t in (a0, b0, a0, b0))
    mine, theirs = my_symmetric_kl(a1, b1), symmetric_kl(a2, b2)
    expect(isinstance(mine, torch.Tensor) and mine.numel() == 1, "return one number (a 0-dim tensor)")
    la, lb = F.log_softmax(a0, -1), F.log_softmax(b0, -1)
    kl_ab = (la.exp() * (la - lb)).sum(-1).mean().item()
    kl_ba = (lb.exp() * (lb - la)).sum(-1).mean().item()
    value, want = mine.item(), theirs.item()
    if not math.isclose(value, want, rel_tol=1e-4):
        for other, hint in ((kl_ab, "KL(p_a || p_b) alone"), (kl_ba, "KL(p_b || p_a) alone"),
                            (0.5 * kl_ab, "1/2 KL(p_a || p_b) alone"), (0.5 * kl_ba, "1/2 KL(p_b || p_a) alone")):
            expect(not math.isclose(value, other, rel_tol=1e-4),
                   f"your value is {hint}: the term is symmetric, 1/2 (KL(p_a || p_b) + KL(p_b || p_a))")
        expect(not math.isclose(value, 2 * want, rel_tol=1e-4), "twice the value: the 1/2 in front of the two KLs")
        expect(not math.isclose(value, n * want, rel_tol=1e-4), f"{n} x the value: average over the N rows, "
                                                                "do not sum them")
        expect(False, f"{value:.5f}, want {want:.5f}: 1/2 sum_v (p_a - p_b)_v (log p_a - log p_b)_v per row, "
                      "averaged over the rows, with p = softmax of the logits")
    mine.backward()
    theirs.backward()
    for name, mine_t, theirs_t in (("a", a1, a2), ("b", b1, b2)):
        expect(mine_t.grad is not None, f"no gradient reaches {name}: detach only each KL's target distribution")
        expect(torch.allclose(mine_t.grad, theirs_t.grad, atol=1e-7),
               f"the value is right but the gradient of {name} differs: as in the authors' code each KL's target "
               "distribution is detached, so KL(p_a || p_b) trains only b and KL(p_b || p_a) only a "
               "(a .detach() missing, or one too many?)")
    return f"value {want:.5f} and gradients = symmetric_kl's"


def exercise_1(houlsby_params_1b) -> str:
    """Houlsby, k = 64, on Llama-3.2-1B: the trainable count."""
    with torch.device("meta"):
        counted, total = peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")),
                                                            "bottleneck_adapter", placement="houlsby",
                                                            bottleneck=64))
    expect(isinstance(houlsby_params_1b, int), f"give an integer, got {type(houlsby_params_1b).__name__}")
    expect(houlsby_params_1b != counted // 2, f"{houlsby_params_1b:,} is half of it: Houlsby puts TWO adapters "
                                              "in each layer (after o_proj and after down_proj)")
    expect(houlsby_params_1b == counted, f"{houlsby_params_1b:,} is not it: each adapter is W_down (d x k), b_down "
                                         "(k), W_up (k x d), b_up (d)")
    return f"{counted:,} numbers, {counted / (total - counted):.3%} of the base"


def exercise_2(consistency_term) -> str:
    """The symmetric KL of p_A = (0.5, 0.3, 0.2), p_B = (0.2, 0.2, 0.6), natural log."""
    p_a, p_b = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6])
    want = symmetric_kl(p_a.log()[None], p_b.log()[None]).item()   # log-probabilities are valid logits
    expect(isinstance(consistency_term, (int, float)), f"give a number, got {type(consistency_term).__name__}")
    one_way = [(p * (p.log() - q.log())).sum().item() for p, q in ((p_a, p_b), (p_b, p_a))]
    expect(not any(abs(consistency_term - v) < 5e-5 for v in one_way + [0.5 * v for v in one_way]),
           "that is one KL (or half of one): the term averages both directions")
    expect(abs(consistency_term - 2 * want) > 5e-5, "twice the term: 1/2 (KL(p_A || p_B) + KL(p_B || p_A))")
    expect(abs(consistency_term - want) < 5e-5, f"{consistency_term:.5f} is not it: 1/2 sum_v (p_A - p_B)_v "
                                                "(log p_A - log p_B)_v, natural log")
    return f"{want:.4f} nats (minipeft's symmetric_kl on the log-probabilities)"


def exercise_3(expected_delta) -> str:
    """expected_delta(experts_A, experts_B, scale): the mean of s B_j A_i over the M^2 pairs = what merge adds."""
    model = apply_method(make_base(0), "adamix_lora", r=4, n_experts=4, targets=("v_proj",))
    _noise(model, seed=7, size=0.1)
    wrap = model.layers[0].self_attn.v_proj
    A, B, s = wrap.experts_A.detach().clone(), wrap.experts_B.detach().clone(), wrap.scale
    W0 = wrap.base.weight.detach().clone()
    with torch.no_grad():
        peft.merge(model)
    merged = wrap.base.weight.detach() - W0
    mine = expected_delta(A.clone(), B.clone(), s)
    expect(isinstance(mine, torch.Tensor) and mine.shape == W0.shape,
           f"return the (out, in) = {tuple(W0.shape)} matrix; got "
           f"{tuple(mine.shape) if isinstance(mine, torch.Tensor) else type(mine).__name__}")
    diagonal = s * torch.stack([B[i] @ A[i] for i in range(4)]).mean(0)
    expect(not torch.allclose(mine, diagonal, atol=1e-6), "that is the mean of the M diagonal deltas s B_i A_i: "
                                                          "routing draws i and j independently, so average over ALL "
                                                          "M^2 pairs (i, j)")
    expect(not torch.allclose(mine, merged / s, atol=1e-6), "the scale s is missing")
    expect(torch.allclose(mine, merged, atol=1e-6), "not the mean of s B_j A_i over all M^2 pairs (i, j)")
    return (f"= s B_bar A_bar, what peft.merge adds; the mean of the M diagonal deltas differs by up to "
            f"{(diagonal - merged).abs().max():.1e}")
