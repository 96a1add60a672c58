"""Checks of lab 12 (AdaLoRA and DyLoRA): the student's AdaLoRA layer, its orthogonality term, the importance
scores, the cubic budget, the global mask, the DyLoRA layer (plain and frozen), and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). `check_build` copies
minipeft's factors into the student's, so it cannot see an initialisation: every layer check looks at the
init first, on the student's module alone. The checks build their own inputs and leave the notebook's
random state as they found it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig
from ..methods import adalora
from . import Wrong, check_build, expect, make_base

TARGETS = ("q_proj", "v_proj")


def _parameter(layer: nn.Module, name: str, shape: tuple, what: str) -> nn.Parameter:
    p = getattr(layer, name, None)
    expect(isinstance(p, nn.Parameter), f"`self.{name}` should be an nn.Parameter ({what})")
    expect(p.requires_grad, f"`self.{name}` is frozen: it trains ({what})")
    expect(tuple(p.shape) == shape, f"`self.{name}` has shape {tuple(p.shape)}; want {shape} ({what})")
    return p


def _frozen_linear(n_in: int, n_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=False).requires_grad_(False)


def _tiny_and_idx():
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return tiny, idx


def _measured_factor(delta: torch.Tensor, plain: torch.Tensor) -> float:
    return ((delta * plain).sum() / (plain * plain).sum()).item()


# ---------------------------------------------------------------------------------------------- AdaLoRA

def check_my_adalora(MyAdaLoRALinear) -> str:
    """MyAdaLoRALinear(base, r, alpha): W x + (alpha / r) P diag(lam) Q x; P, Q ~ N(0, 0.02^2), lam = 0."""
    n, m, r, alpha = 256, 128, 8, 16.0
    layer = MyAdaLoRALinear(_frozen_linear(n, m), r, alpha)
    P = _parameter(layer, "P", (m, r), "P maps r numbers to the output: (out, r)")
    lam = _parameter(layer, "lam", (r, 1), "lambda is a column of r numbers, (r, 1), as minipeft stores lora_E")
    Q = _parameter(layer, "Q", (r, n), "Q maps the input to r numbers: (r, in)")
    expect(torch.count_nonzero(lam) == 0, "lambda must start at zero, so that the model starts as the base model "
                                          "(P and Q start random: with lambda = 0 they still get no update of the "
                                          "function, and lambda gets a gradient)")
    for name, t in (("P", P), ("Q", Q)):
        expect(torch.count_nonzero(t) > 0, f"{name} is all zeros: P and Q start random, N(0, 0.02^2) (with lambda = 0 "
                                           "the model is unchanged anyway, and a zero P or Q would leave lambda "
                                           "without a gradient)")
        std = t.std().item()
        expect(abs(std / 0.02 - 1) < 0.15 and t.abs().max() < 0.02 * 6,
               f"{name}'s standard deviation is {std:.3g}: P and Q start N(0, 0.02^2), torch.randn(...) * 0.02")
    x = torch.randn(5, n)
    expect(torch.equal(layer(x), layer.base(x)), "at init (lambda = 0) the layer must return base(x) exactly")
    with torch.no_grad():
        lam.copy_(torch.randn(r, 1))
        delta = layer(x) - layer.base(x)
        plain = ((x @ Q.T) * lam.view(-1)) @ P.T
    factor = _measured_factor(delta, plain)
    expect(torch.allclose(delta, factor * plain, rtol=1e-4, atol=1e-6),
           "the branch is not a multiple of P diag(lambda) Q x: lambda scales the r components between Q and P, "
           "((x Q^T) * lambda) P^T")
    expect(abs(factor / (alpha / r) - 1) < 1e-4,
           f"the branch is {factor:.4g} x P diag(lambda) Q x, want s = alpha / r = {alpha / r:g} (r the initial rank)")
    tiny, idx = _tiny_and_idx()
    mine = copy.deepcopy(tiny)
    peft.inject(mine, TARGETS, lambda name, linear: MyAdaLoRALinear(linear, 4, 8.0))
    theirs = apply_method(copy.deepcopy(tiny), "adalora", r=4, final_r=2, alpha=8.0, targets=TARGETS, total_step=100)

    def to_theirs(name: str) -> str:
        head, leaf = name.rsplit(".", 1)
        return f"{head}.{dict(P='lora_B', lam='lora_E', Q='lora_A').get(leaf, leaf)}"

    return check_build(mine, theirs, idx, rename=to_theirs)


def check_orthogonality(my_orthogonality) -> str:
    """my_orthogonality(P, Q) = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (eq. 4), value and gradients."""
    g = torch.Generator().manual_seed(1)
    out, r, n = 48, 4, 64
    P0, Q0 = 0.3 * torch.randn(out, r, generator=g), 0.3 * torch.randn(r, n, generator=g)
    module = adalora.AdaLoRALinear(_frozen_linear(n, out), adalora.AdaLoRAConfig(r=r, final_r=2, total_step=10))
    with torch.no_grad():
        module.lora_B.copy_(P0)
        module.lora_A.copy_(Q0)
    P, Q = P0.clone().requires_grad_(True), Q0.clone().requires_grad_(True)
    try:
        value = my_orthogonality(P, Q)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        if "size" not in str(e) and "shape" not in str(e):
            raise
        raise Wrong(f"your term fails on P (out, r) = {tuple(P0.shape)}, Q (r, in) = {tuple(Q0.shape)} ({e}): "
                    "both products must be (r, r), compared with the r x r identity") from None
    want = module.orthogonality()
    expect(isinstance(value, torch.Tensor) and value.numel() == 1, "return one number (a 0-dim tensor)")
    if not torch.allclose(value, want, rtol=1e-5):
        fro = lambda t: t.square().sum()
        I_r, I_o, I_n = torch.eye(r), torch.eye(out), torch.eye(n)
        term_p, term_q = fro(P0.T @ P0 - I_r), fro(Q0 @ Q0.T - I_r)
        for other, hint in (
                (fro(P0 @ P0.T - I_o) + term_q, "you penalise P P^T (out x out): P should have orthonormal "
                                                "COLUMNS, so the product is P^T P (r x r)"),
                (term_p + fro(Q0.T @ Q0 - I_n), "you penalise Q^T Q (in x in): Q should have orthonormal ROWS, so "
                                                "the product is Q Q^T (r x r)"),
                (fro(P0 @ P0.T - I_o) + fro(Q0.T @ Q0 - I_n), "both products are the wrong way round: P^T P and "
                                                              "Q Q^T, each (r x r)"),
                (term_p.sqrt() + term_q.sqrt(), "those are the unsquared Frobenius norms (Hugging Face PEFT's "
                                                "variant): eq. 4 squares them"),
                (term_p, "only the P term: add ||Q Q^T - I||^2"), (term_q, "only the Q term: add ||P^T P - I||^2"),
                (fro(P0.T @ P0) + fro(Q0 @ Q0.T), "the identity is missing: ||P^T P - I||^2, not ||P^T P||^2")):
            expect(not torch.allclose(value.detach(), other, rtol=1e-5), hint)
        expect(False, f"{value.item():.5f}, want {want.item():.5f}: ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2")
    g_mine = torch.autograd.grad(value, (P, Q), allow_unused=True)
    g_theirs = torch.autograd.grad(want, (module.lora_B, module.lora_A))
    for name, a, b in zip(("P", "Q"), g_mine, g_theirs):
        expect(a is not None, f"{name} gets no gradient from your term (a .detach() too many?)")
        expect(torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"the value is right but the gradient of {name} differs "
                                                          "(a .detach() too many?)")
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    p_orth, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
    zero = my_orthogonality(p_orth, q.T.contiguous()).item()
    expect(abs(zero) < 1e-8, f"for orthonormal P columns and Q rows your term is {zero:.2e}, want 0")
    return f"value {want.item():.4f} and gradients = AdaLoRALinear.orthogonality; 0 for orthonormal P and Q"


def check_importance(my_importance_update, my_triplet_scores) -> str:
    """The smoothed sensitivity and uncertainty (eqs. 9-10) and a triplet's score (eq. 11), = minipeft's."""
    tiny, idx = _tiny_and_idx()
    model = apply_method(copy.deepcopy(tiny), "adalora", r=4, final_r=2, alpha=8.0, targets=TARGETS, total_step=100)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    opt = torch.optim.Adam(peft.param_groups(model, 1e-2))
    mod = model.layers[1].self_attn.v_proj
    beta1, beta2 = 0.85, 0.6   # different, so that swapped betas show
    bar, unc = {}, {}
    keys = (("P", "lora_B"), ("lam", "lora_E"), ("Q", "lora_A"))
    for step in range(3):
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        # the previous step's averages (for the hints), before either side updates
        old_bar = {k: mod.ema_ipt.get(t, torch.zeros_like(getattr(mod, t))).clone() for k, t in keys}
        old_unc = {k: mod.ema_unc.get(t, torch.zeros_like(getattr(mod, t))).clone() for k, t in keys}
        mod.update_importance(beta1, beta2)
        for key, theirs in keys:
            p = getattr(mod, theirs)
            my_importance_update(bar, unc, key, p, beta1, beta2)
            expect(key in bar and key in unc, f"after a step, bar[{key!r}] and unc[{key!r}] must hold the running "
                                              "averages (update the dicts in place)")
            b_mine, u_mine = torch.as_tensor(bar[key]).detach(), torch.as_tensor(unc[key]).detach()
            b_want, u_want = mod.ema_ipt[theirs], mod.ema_unc[theirs]
            if not torch.allclose(b_mine, b_want, rtol=1e-5, atol=1e-12):
                w, grad = p.detach(), p.grad
                alternatives = (
                    ((w * grad), "the sensitivity is |w grad|: take the absolute value"),
                    (grad.abs(), "the sensitivity is |w grad|, the weight times its gradient, not |grad| alone"),
                    ((w * grad).square(), "the sensitivity is |w grad|, not its square"))
                for ipt, hint in alternatives:
                    expect(not torch.allclose(b_mine, beta1 * old_bar[key] + (1 - beta1) * ipt, rtol=1e-5,
                                              atol=1e-12), hint)
                ipt = (w * grad).abs()
                expect(not torch.allclose(b_mine, beta2 * old_bar[key] + (1 - beta2) * ipt, rtol=1e-5, atol=1e-12),
                       "the sensitivity's average uses beta1 (the uncertainty's uses beta2): betas swapped?")
                expect(not torch.allclose(b_mine, (1 - beta1) * old_bar[key] + beta1 * ipt, rtol=1e-5, atol=1e-12),
                       "the weights of the average are swapped: I_bar <- beta1 I_bar + (1 - beta1) I, the old "
                       "average keeps beta1")
                expect(False, "your smoothed sensitivity differs: I_bar <- beta1 I_bar + (1 - beta1) |w grad|")
            if not torch.allclose(u_mine, u_want, rtol=1e-5, atol=1e-12):
                ipt = (p.detach() * p.grad).abs()
                expect(not torch.allclose(u_mine, beta2 * old_unc[key] + (1 - beta2) * (ipt - old_bar[key]).abs(),
                                          rtol=1e-5, atol=1e-12),
                       "the uncertainty compares I with the NEW average: update I_bar first, then "
                       "U <- beta2 U + (1 - beta2) |I - I_bar|")
                expect(not torch.allclose(u_mine, beta2 * old_unc[key] + (1 - beta2) * (ipt - b_want),
                                          rtol=1e-5, atol=1e-12), "the uncertainty averages |I - I_bar|: take the "
                                                                  "absolute value")
                expect(False, "your uncertainty differs: U <- beta2 U + (1 - beta2) |I - I_bar|")
        opt.step()
    try:
        scores = my_triplet_scores(bar, unc)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        raise Wrong(f"your scores fail ({str(e)[:60]}...): P is (out, r), its column i belongs to triplet i "
                    "(average over dim 0); Q is (r, in), its row i (average over dim 1)") from None
    want = mod.triplet_scores()
    expect(isinstance(scores, torch.Tensor) and tuple(scores.shape) == (4,),
           f"return one score per triplet, shape (r,) = (4,); got "
           f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__} (P is (out, r): "
           "its column i belongs to triplet i; Q is (r, in): its row i)")
    if not torch.allclose(scores, want, rtol=1e-5, atol=0):
        s = {k: mod.ema_ipt[t] * mod.ema_unc[t] for k, t in keys}
        expect(not torch.allclose(scores, s["lam"].view(-1) + s["P"].sum(0) + s["Q"].sum(1), rtol=1e-5, atol=0),
               "you sum the scores of P's column and Q's row: eq. 11 takes their MEAN")
        expect(not torch.allclose(scores, s["lam"].view(-1), rtol=1e-5, atol=0),
               "only lambda's score: add the mean score of P's column i and of Q's row i")
        plain = {k: mod.ema_ipt[t] for k, t in keys}
        expect(not torch.allclose(scores, plain["lam"].view(-1) + plain["P"].mean(0) + plain["Q"].mean(1),
                                  rtol=1e-5, atol=0), "s(w) = I_bar x U: the uncertainty multiplies the smoothed "
                                                      "sensitivity")
        expect(False, "your scores differ from triplet_scores: S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij), "
                      "s = I_bar x U")
    return "3 steps: sensitivity, uncertainty and the triplets' scores = update_importance and triplet_scores"


def _schedule(b0, bT, T, t_init, t_final, power=3, rounding=int, denominator=None, warm_up=True, upside=False):
    def b(t):
        if warm_up and t <= t_init:
            return b0
        if t > T - t_final:
            return bT
        frac = (t - t_init) / (denominator if denominator is not None else T - t_init - t_final)
        if upside:
            return rounding(b0 - (b0 - bT) * (1 - frac) ** power)
        return rounding(bT + (b0 - bT) * (1 - frac) ** power)
    return b


def check_budget(my_budget) -> str:
    """my_budget(t, b0, bT, T, t_init, t_final) = adalora.budget at every step of two schedules."""
    for r, final_r, T, t_init, t_final, n_mod in ((12, 4, 100, 10, 20, 10), (8, 3, 57, 5, 11, 7)):
        config = adalora.AdaLoRAConfig(r=r, final_r=final_r, total_step=T, tinit=t_init, tfinal=t_final)
        b0, bT = r * n_mod, final_r * n_mod
        steps = range(T + 1)
        mine = [my_budget(t, b0, bT, T, t_init, t_final) for t in steps]
        want = [adalora.budget(config, n_mod, t) for t in steps]
        if mine == want:
            continue
        wrong = [t for t in steps if mine[t] != want[t]]
        t = wrong[0]
        expect(all(isinstance(v, int) for v in mine), f"return an integer number of triplets, got "
                                                      f"{type(mine[t]).__name__} ({mine[t]}) at t = {t}: round down "
                                                      "with int()")
        for candidate, hint in (
                (dict(power=2), "a square: the schedule is cubic, (1 - fraction)^3"),
                (dict(denominator=T - t_init), "the fall ends at T - t_final: the fraction is "
                                               "(t - t_init) / (T - t_init - t_final)"),
                (dict(upside=True), "upside down: the budget starts at b0 and falls to b_T, "
                                    "b_T + (b0 - b_T)(1 - fraction)^3"),
                (dict(rounding=round), "you round to the nearest: round down, int(), as minipeft and PEFT"),
                (dict(warm_up=False), f"before t_init = {t_init} the warm-up keeps the whole budget b0 = {b0}")):
            schedule = _schedule(b0, bT, T, t_init, t_final, **candidate)
            expect([schedule(t) for t in steps] != mine, hint)
        if t <= t_init:
            expect(False, f"at t = {t} <= t_init = {t_init} you give {mine[t]}: the warm-up keeps the whole budget "
                          f"b0 = {b0} (up to and including t_init)")
        if t > T - t_final:
            expect(False, f"at t = {t}, in the last t_final = {t_final} steps, you give {mine[t]}: the final phase "
                          f"holds b_T = {bT}")
        expect(False, f"at t = {t} you give {mine[t]}, want {want[t]}: "
                      "b_T + (b0 - b_T)(1 - (t - t_i) / (T - t_i - t_f))^3, rounded down")
    return "= adalora.budget at every step of two schedules"


class Scored:
    """A module with given triplet scores: just what adalora.mask_to_budget reads and writes."""

    def __init__(self, s):
        self.s, self.mask = s, None

    def triplet_scores(self):
        return self.s

    def apply_mask(self):
        pass


def check_masks(my_masks) -> str:
    """my_masks(scores, keep): the `keep` highest scores over all modules together, as mask_to_budget."""
    g = torch.Generator().manual_seed(3)
    for sizes, keep in (((4, 4, 4, 4), 7), ((3, 5, 2), 4), ((6, 6), 9)):
        scores = [torch.rand(n, generator=g) * (1 + i) for i, n in enumerate(sizes)]   # modules differ in size
        stubs = [Scored(s) for s in scores]
        adalora.mask_to_budget(stubs, keep)
        want = [s.mask for s in stubs]
        mine = my_masks([s.clone() for s in scores], keep)
        expect(isinstance(mine, (list, tuple)) and len(mine) == len(scores),
               f"return one mask per module: a list of {len(scores)} bool tensors")
        mine = [torch.as_tensor(m) for m in mine]
        expect(all(m.dtype == torch.bool and m.shape == s.shape for m, s in zip(mine, scores)),
               "each mask is a bool tensor of its module's length (True = kept)")
        if all(torch.equal(a, b) for a, b in zip(mine, want)):
            continue
        total = sum(sizes)
        own_top = all(not m.any() or m.all() or s[m].min() > s[~m].max() for m, s in zip(mine, scores))
        proportional = all(abs(int(m.sum()) - keep * len(s) / total) <= 1 for m, s in zip(mine, scores))
        expect(not (own_top and proportional),
               "you cut every module on its own: the budget is global, the `keep` highest scores whatever module "
               "they are in (that is how rank moves between modules)")
        n_kept = sum(int(m.sum()) for m in mine)
        expect(n_kept == keep, f"you keep {n_kept} triplets, the budget is {keep} (over all modules together)")
        lowest = torch.cat(scores).topk(keep, largest=False).indices
        low = torch.zeros(sum(sizes), dtype=torch.bool)
        low[lowest] = True
        expect(not torch.equal(torch.cat(mine), low), "you kept the LOWEST scores: keep the most important triplets")
        expect(False, f"not the {keep} highest scores over all modules")
    return "= mask_to_budget on three sets of modules"


# ---------------------------------------------------------------------------------------------- DyLoRA

def check_my_dylora(MyDyLoRALinear) -> str:
    """MyDyLoRALinear(base, r, alpha, b, frozen=False): W x + (alpha / b) B[:, :b] A[:b] x, LoRA's init."""
    n, m, r, alpha, b = 256, 48, 6, 12.0, 3
    layer = MyDyLoRALinear(_frozen_linear(n, m), r, alpha, b)
    A = _parameter(layer, "lora_A", (r, n), "A maps the input to r numbers: (r, in), all r rows, b of them used")
    B = _parameter(layer, "lora_B", (m, r), "B maps r numbers to the output: (out, r)")
    expect(torch.count_nonzero(B) == 0, "B must start at zero, so the layer starts as the base layer (LoRA's init)")
    expect(torch.count_nonzero(A) > 0, "A is all zeros: with B = 0 as well, neither factor ever gets a gradient "
                                       "(dL/dB needs A x, dL/dA needs B); A starts random, Kaiming-uniform as LoRA's")
    bound = 1 / math.sqrt(n)
    expect(A.abs().max() <= bound * (1 + 1e-6),
           f"A's entries reach {A.abs().max():.3g}, beyond Kaiming-uniform's bound 1/sqrt(in) = {bound:.3g}: "
           "nn.init.kaiming_uniform_(A, a=math.sqrt(5)), as LoRA")
    expect(abs(A.std().item() * math.sqrt(3 * n) - 1) < 0.15,
           f"A's standard deviation is {A.std():.3g}, Kaiming-uniform's is 1/sqrt(3 in) = {1 / math.sqrt(3 * n):.3g}")
    x = torch.randn(5, n)
    expect(torch.equal(layer(x), layer.base(x)), "at init (B = 0) the layer must return base(x) exactly")
    with torch.no_grad():
        B.copy_(torch.randn(m, r))
        delta = layer(x) - layer.base(x)
        plain = (x @ A[:b].T) @ B[:, :b].T
        full = (x @ A.T) @ B.T
    factor = _measured_factor(delta, plain)
    if not torch.allclose(delta, factor * plain, rtol=1e-4, atol=1e-5):
        expect(not torch.allclose(delta, _measured_factor(delta, full) * full, rtol=1e-4, atol=1e-5),
               f"you use all r = {r} components: at rank b use only the first b rows of A and columns of B, "
               "A[:b] and B[:, :b]")
        expect(False, "the branch is not a multiple of B[:, :b] A[:b] x: the first b rows of A, the first b columns "
                      "of B, (x A[:b]^T) B[:, :b]^T")
    expect(abs(factor / (alpha / r) - 1) > 1e-4, f"you scale by alpha / r = {alpha / r:g}: DyLoRA scales rank b by "
                                                 f"alpha / b = {alpha / b:g} (eq. 3), so every prefix is an adapter "
                                                 "of its own size")
    expect(abs(factor / (alpha / b) - 1) < 1e-4, f"the branch is {factor:.4g} x B[:, :b] A[:b] x, want alpha / b = "
                                                 f"{alpha / b:g}")
    # which components get a gradient, plain and frozen
    for frozen in (False, True):
        layer = MyDyLoRALinear(_frozen_linear(n, m), r, alpha, b, frozen=frozen)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(m, r))
        try:
            (layer(x) * torch.randn(5, m)).sum().backward()
        except RuntimeError as e:
            if "does not require grad" not in str(e):
                raise
            raise Wrong(f"frozen={frozen}: no component gets a gradient: "
                        + ("detach only the first b-1 rows of A and columns of B; row b and column b train"
                           if frozen else "nothing is detached without frozen")) from None
        rows = (layer.lora_A.grad.norm(dim=1) > 0).tolist()
        cols = (layer.lora_B.grad.norm(dim=0) > 0).tolist()
        want = [(i == b - 1) if frozen else (i < b) for i in range(r)]
        expect(not any(rows[b:]) and not any(cols[b:]), "components beyond b got a gradient: only A[:b] and "
                                                        "B[:, :b] take part in a rank-b step")
        if frozen:
            expect(rows == want and cols == want,
                   f"frozen=True: components with a gradient {[i + 1 for i in range(r) if rows[i]]} (A) and "
                   f"{[i + 1 for i in range(r) if cols[i]]} (B), want only the b-th, {b}: use the first b-1 with "
                   ".detach() (row b of A and column b of B train)")
        else:
            expect(rows == want and cols == want,
                   f"frozen=False: components with a gradient {[i + 1 for i in range(r) if rows[i]]} (A), want 1..{b}: "
                   "all of A[:b] and B[:, :b] train (no .detach())")
    tiny, idx = _tiny_and_idx()
    for rank, train, frozen in ((1, False, False), (4, False, False), (3, True, True), (3, True, False)):
        mine = copy.deepcopy(tiny).train(train)
        peft.inject(mine, TARGETS, lambda name, linear: MyDyLoRALinear(linear, 4, 8.0, rank, frozen=frozen))
        theirs = apply_method(copy.deepcopy(tiny), "dylora", r=4, alpha=8.0, eval_rank=rank, targets=TARGETS,
                              frozen=frozen).train(train)
        theirs.layers[0].self_attn.q_proj.rank.b = rank  # the b a training step drew (shared by all modules)
        check_build(mine, theirs, idx)
    return ("Kaiming-uniform A, B = 0, scale alpha / b, the frozen gradient pattern; same logits and gradients as "
            "dylora at b = 1, 4 (eval) and b = 3 (training, frozen and not)")


# ---------------------------------------------------------------------------------------------- exercises

def exercise_1(adalora_params_1b) -> str:
    """AdaLoRA, init_r = 12 on q_proj and v_proj of Llama-3.2-1B: the trainable count."""
    with torch.device("meta"):
        counted = peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), "adalora",
                                                     r=12, final_r=8, targets=("q_proj", "v_proj")))[0]
        lora = peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), "lora",
                                                  r=12, targets=("q_proj", "v_proj")))[0]
    expect(isinstance(adalora_params_1b, int), f"give an integer, got {type(adalora_params_1b).__name__}")
    expect(adalora_params_1b != lora, f"{adalora_params_1b:,} is LoRA r=12's count: AdaLoRA adds lambda, r numbers "
                                      "per module")
    expect(adalora_params_1b == counted, f"{adalora_params_1b:,} is not it: per module P (out x r), lambda (r) and "
                                         "Q (r x in); v_proj's out is n_kv_heads x head_dim")
    return f"{counted:,} numbers (LoRA r=12: {lora:,})"


def exercise_2(budget_at_400) -> str:
    """The budget after step 400 of r=12 -> 8 on 32 modules, T = 1000, t_i = 100, t_f = 200."""
    config = adalora.AdaLoRAConfig(r=12, final_r=8, total_step=1000, tinit=100, tfinal=200)
    want = adalora.budget(config, 32, 400)
    expect(isinstance(budget_at_400, int), f"give an integer (rounded down), got {type(budget_at_400).__name__}")
    expect(budget_at_400 != want + 1, f"{budget_at_400} is one too many: round down")
    expect(budget_at_400 == want, f"{budget_at_400} is not it: b0 = 12 x 32, bT = 8 x 32, the fraction "
                                  "(t - t_i) / (T - t_i - t_f), cubed complement, rounded down")
    return f"{want} of {12 * 32} triplets"


def exercise_3(dylora_lora_alpha) -> str:
    """The alpha of a plain LoRA (r = 2) that gives DyLoRA's (r = 8, alpha = 16) logits at b = 2."""
    expect(isinstance(dylora_lora_alpha, (int, float)), f"give a number, got {type(dylora_lora_alpha).__name__}")
    tiny, idx = _tiny_and_idx()
    dy = apply_method(copy.deepcopy(tiny), "dylora", r=8, alpha=16.0, eval_rank=2, targets=TARGETS).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in dy.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    lo = apply_method(copy.deepcopy(tiny), "lora", r=2, alpha=float(dylora_lora_alpha), targets=TARGETS)
    with torch.no_grad():
        for name, module in peft.adapter_modules(lo):
            module.lora_A.copy_(dy.get_submodule(name).lora_A[:2])
            module.lora_B.copy_(dy.get_submodule(name).lora_B[:, :2])
        gap = (lo(idx) - dy(idx)).abs().max().item()
    expect(not math.isclose(dylora_lora_alpha, 4.0), "alpha = 4 keeps plain LoRA's scale 16 / 8 = 2: but DyLoRA "
                                                     "scales rank b by alpha / b, not alpha / r")
    expect(gap < 1e-4, f"alpha = {dylora_lora_alpha} gives logits off by {gap:.3f}: DyLoRA scales rank b by alpha / b; "
                       "LoRA of rank 2 by alpha_LoRA / 2")
    return f"LoRA r=2, alpha={dylora_lora_alpha}: DyLoRA's logits at b = 2 (diff {gap:.1e})"


def exercise_4(masks_by_hand) -> str:
    """The masks mask_to_budget sets for scores [0.9, 0.2, 0.4] and [0.5, 0.1, 0.05] at a budget of 3."""
    scores = [torch.tensor([0.9, 0.2, 0.4]), torch.tensor([0.5, 0.1, 0.05])]

    stubs = [Scored(s) for s in scores]
    adalora.mask_to_budget(stubs, 3)
    want = [s.mask.tolist() for s in stubs]
    expect(isinstance(masks_by_hand, (list, tuple)) and len(masks_by_hand) == 2
           and all(len(m) == 3 for m in masks_by_hand), "give two lists of 3 booleans")
    mine = [[bool(v) for v in m] for m in masks_by_hand]
    expect(sum(map(sum, mine)) == 3,
           f"{mine} keeps {sum(map(sum, mine))} triplets: the budget keeps 3 over both modules")
    expect(mine == want, f"{mine} is not it: the 3 highest scores over BOTH modules are kept, whatever module "
                         "they are in")
    return f"{want} (module 1 keeps {sum(want[0])}, module 2 keeps {sum(want[1])})"
