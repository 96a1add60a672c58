"""Checks of lab 02 (LoRA's two factors): the student's LoRA layer, LoRA+'s optimiser groups, exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .. import peft
from ..adapters import apply_method
from ..llama import Llama, LlamaConfig
from ..methods.lora import LoRAConfig, LoRALinear
from . import check_build, expect, make_base


def _layer(MyLoRA, n: int = 256, m: int = 48, seed: int = 0, **hyper) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=False)
    hyper = dict(dict(r=4, alpha=8.0), **hyper)
    return MyLoRA(base, **hyper)


def _factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    for name in ("A", "B"):
        expect(isinstance(getattr(layer, name, None), nn.Parameter),
               f"`self.{name}` should be an nn.Parameter (so it trains and shows in named_parameters())")
    return layer.A, layer.B


def check_my_lora(MyLoRA) -> str:
    """MyLoRA(base, r, alpha, use_rslora=False, gamma=1.0) against minipeft's LoRALinear."""
    n, m, r = 256, 48, 4
    layer = _layer(MyLoRA, n, m)
    A, B = _factors(layer)
    expect(tuple(A.shape) == (r, n), f"A has shape {tuple(A.shape)}; A maps the input to r numbers: (r, in) = {(r, n)}")
    expect(tuple(B.shape) == (m, r), f"B has shape {tuple(B.shape)}; B maps r numbers to the output: (out, r) = {(m, r)}")
    expect(torch.count_nonzero(B) == 0, "B must start at zero, so the model starts as the base model (h = W x)")
    expect(torch.count_nonzero(A) > 0, "A is all zeros: with B = 0 as well, neither factor ever gets a gradient "
                                       "(dL/dB needs A x, dL/dA needs B); A starts random, Kaiming-uniform")
    bound = 1 / math.sqrt(n)
    expect(A.abs().max() <= bound * (1 + 1e-6),
           f"A's entries reach {A.abs().max():.3g}, beyond Kaiming-uniform's bound 1/sqrt(in) = {bound:.3g}: "
           "use nn.init.kaiming_uniform_(A, a=math.sqrt(5)) (a normal or ones init is a different method)")
    expect(abs(A.std().item() * math.sqrt(3 * n) - 1) < 0.15,
           f"A's standard deviation is {A.std():.3g}, Kaiming-uniform's is 1/sqrt(3 in) = {1 / math.sqrt(3 * n):.3g}")
    x = torch.randn(5, n)
    expect(torch.equal(layer(x), layer.base(x)), "at init the layer must return base(x) exactly (B = 0)")
    # the scale, with B and A set to known values: the branch must be s * gamma * B A x
    for hyper in (dict(r=4, alpha=8.0), dict(r=4, alpha=8.0, use_rslora=True), dict(r=4, alpha=8.0, gamma=4.0)):
        layer = _layer(MyLoRA, n, m, **hyper)
        A, B = _factors(layer)
        with torch.no_grad():
            B.copy_(torch.randn(m, r))
        delta = layer(x) - layer.base(x)
        plain = (x @ A.T) @ B.T
        factor = (delta * plain).sum() / (plain * plain).sum()
        want = hyper.get("gamma", 1.0) * hyper["alpha"] / (math.sqrt(r) if hyper.get("use_rslora") else r)
        expect(torch.allclose(delta, factor * plain, rtol=1e-4, atol=1e-5),
               "the branch is not a multiple of B A x: check the order of the factors, (x A^T) B^T")
        expect(abs(factor / want - 1) < 1e-4,
               f"with {hyper} the branch is {factor:.4g} x B A x, want s * gamma = {want:.4g} "
               "(s = alpha / r, or alpha / sqrt(r) with use_rslora; and gamma multiplies the branch)")
    # gamma: the same seed must give A0 / gamma
    a1, a4 = _layer(MyLoRA, n, m, gamma=1.0).A, _layer(MyLoRA, n, m, gamma=4.0).A
    expect(torch.allclose(4.0 * a4, a1, rtol=1e-5, atol=1e-7),
           "with gamma = 4, store A0 / gamma (draw A0 as usual, then divide by gamma), so gamma * A = A0")
    # in a model, against minipeft: same logits and gradients (minipeft's factors, with noise, copied in)
    tiny = make_base(0)
    idx = torch.randint(0, tiny.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    summary = ""
    for hyper in (dict(r=8, alpha=16.0), dict(r=4, alpha=8.0, use_rslora=True, gamma=4.0)):
        mine = copy.deepcopy(tiny)
        peft.inject(mine, ("q_proj", "v_proj"), lambda name, linear: MyLoRA(linear, **hyper))
        theirs = apply_method(copy.deepcopy(tiny), "lora", targets=("q_proj", "v_proj"), **hyper)
        summary = check_build(mine, theirs, idx, {"A": "lora_A", "B": "lora_B"})
    return summary


def check_loraplus_groups(my_loraplus_groups) -> str:
    """my_loraplus_groups(model, lr, ratio) -> the same groups as peft.param_groups (LoRA+)."""
    lr, ratio = 1e-3, 16.0
    model = apply_method(make_base(0), "lora", targets=("q_proj", "v_proj"), loraplus_ratio=ratio)
    groups = my_loraplus_groups(model, lr, ratio)
    expect(isinstance(groups, list) and all(isinstance(g, dict) and "params" in g and "lr" in g for g in groups),
           "return a list of dicts, each with 'params' (a list of tensors) and 'lr'")
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    expect(len(ids) == len(set(ids)), "a tensor sits in two groups")
    expect(set(ids) <= set(trainable), "a frozen tensor (the base weights) is in a group: only trainable tensors")
    expect(set(ids) == set(trainable), "a trainable tensor is in no group: every lora_A and lora_B must train")
    lrs = {name: g["lr"] for g in groups for name in {trainable[id(p)].rsplit(".", 1)[-1] for p in g["params"]}}
    expect(len([g for g in groups if g["params"]]) == 2 and set(lrs) == {"lora_A", "lora_B"},
           "want two groups, one with every lora_A and one with every lora_B: LoRA+ gives B its own rate")
    expect(not (math.isclose(lrs["lora_A"], ratio * lr) and math.isclose(lrs["lora_B"], lr)),
           "A got the boosted rate: LoRA+ boosts B, the zero-initialised factor, and A keeps lr")
    expect(math.isclose(lrs["lora_A"], lr), f"A's group has lr {lrs['lora_A']:g}, want lr = {lr:g}")
    expect(math.isclose(lrs["lora_B"], ratio * lr), f"B's group has lr {lrs['lora_B']:g}, want ratio * lr = {ratio * lr:g}")
    as_sets = lambda gs: sorted((g["lr"], sorted(id(p) for p in g["params"])) for g in gs)
    expect(as_sets(groups) == as_sets(peft.param_groups(model, lr)), "not the same groups as peft.param_groups")
    return f"two groups, lr {lr:g} for A and {ratio * lr:g} for B, as peft.param_groups"


def _update_size(scale, r: int, n: int = 256, draws: int = 8) -> float:
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(draws):
        A, B = torch.randn(r, n, generator=g) / math.sqrt(n), torch.randn(n, r, generator=g)
        sizes.append((scale(16.0, r) * B @ (A @ torch.randn(n, generator=g))).norm().item())
    return sum(sizes) / draws


def exercise_1(rslora_scale) -> str:
    """rslora_scale(alpha, r): the scale that keeps ||s B A x|| independent of r."""
    ranks = [4, 16, 64, 256]
    values = [rslora_scale(16.0, r) for r in ranks]
    expect(all(isinstance(v, (int, float)) for v in values), f"return a number, got {type(values[0]).__name__}")
    sizes = [_update_size(rslora_scale, r) for r in ranks]
    expect(max(sizes) / min(sizes) < 1.5, f"||s B A x|| for r = {ranks}: {[round(s) for s in sizes]}, not constant; "
                                          "||B A x|| grows like sqrt(r): which power of r cancels it?")
    expect(all(math.isclose(v, LoRAConfig(r=r, alpha=16.0, use_rslora=True).scaling) for v, r in zip(values, ranks)),
           "the right power of r, but not alpha times it: keep alpha in the numerator")
    return f"||s B A x|| for r = {ranks}: {[round(s) for s in sizes]}"


def exercise_2(lora_params_1b) -> str:
    """LoRA r=16 on all-linear of Llama-3.2-1B: the number of trainable values."""
    with torch.device("meta"):
        model = apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), "lora", r=16, targets="all-linear")
    counted = peft.count_parameters(model)[0]
    expect(lora_params_1b == counted, f"{lora_params_1b:,} is not it: each Linear (in -> out) gets A (r, in) and "
                                      "B (out, r); k and v are narrower than q (grouped-query attention)")
    return f"{counted:,} trainable numbers"


def exercise_3(gamma_step_factors) -> str:
    """(SGD factor, Adam factor) of the effective step of gamma * A with gamma = 4 against gamma = 1."""
    measured = []
    for optimizer in (torch.optim.SGD, torch.optim.Adam):
        steps = []
        for gamma in (1.0, 4.0):
            torch.manual_seed(0)
            layer = LoRALinear(nn.Linear(32, 16, bias=False), LoRAConfig(r=4, gamma=gamma))
            with torch.no_grad():
                layer.lora_B.fill_(0.5)  # a non-zero B, so A has a gradient
            layer(torch.randn(3, 32, generator=torch.Generator().manual_seed(1))).pow(2).sum().backward()
            before = gamma * layer.lora_A.detach().clone()
            optimizer([layer.lora_A], lr=1e-3).step()
            steps.append((gamma * layer.lora_A.detach() - before).norm().item())
        measured.append(steps[1] / steps[0])
    expect(isinstance(gamma_step_factors, (tuple, list)) and len(gamma_step_factors) == 2,
           "give two numbers: (sgd_factor, adam_factor)")
    expect(all(abs(a / m - 1) < 0.01 for a, m in zip(gamma_step_factors, measured)),
           "not yet: dL/dA = gamma dL/dA_eff (chain rule) and dA_eff = gamma dA; which optimiser's step "
           "scales with the gradient?")
    return f"measured: SGD {measured[0]:.2f}x, Adam {measured[1]:.2f}x"
