"""Checks of lab 06 (tying across layers): the injection that shares one set of tensors per kind of weight,
the four tied methods' wrappers (Tied-LoRA, partially tied LoRA, Tied-LoRA Extra, tensor embedding), and the
exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The wrappers follow the
lab's interface: `Wrapper.new_shared(linear)` makes the tensors shared by every layer of one kind of weight
(an nn.ParameterDict), `Wrapper(linear, shared, layer, n_layers)` adds the layer's own. The checks look at
both apart (which tensor is shared and which is per layer, their initialisation), then inject the wrapper
into a 4-layer tiny model and compare it with minipeft's method (`check_build`: the same logits and
gradients) and its parameter count.
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
from . import Wrong, check_build, expect, make_base

TARGETS = ("q_proj", "v_proj")
R, SLICES, N_LAYERS = 8, 2, 4   # minipeft's defaults (r = 8, l = 2), on a 4-layer tiny model

# Which tensors each method shares across the layers of one kind of weight, and which each layer owns
ROLES = {
    "tied_lora": (("A", "B"), ("v", "u")),
    "partially_tied_lora": (("L_A", "L_B"), ("mix_a", "mix_b", "v", "u")),
    "tied_lora_extra": (("A", "B"), ("core",)),
    "tensor_embedding": (("A", "B", "L"), ("embedding",)),
}


def _four_layers() -> Llama:
    return make_base(0, replace(LlamaConfig.from_name("tiny"), n_layers=N_LAYERS))


def _idx(model: Llama) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def minipeft_name(method: str):
    """Your parameter name -> minipeft's: the shared tensors, listed under the first layer that holds them
    (`layers.0.self_attn.q_proj.shared.A`), are minipeft's `peft_shared.<method>__q_proj.A`."""
    def rename(name: str) -> str:
        parts = name.split(".")
        if "shared" not in parts:
            return name
        i = parts.index("shared")
        return f"peft_shared.{method}__{parts[i - 1]}.{parts[i + 1]}"
    return rename


def _tied_model(base: Llama, Wrapper, targets=TARGETS) -> Llama:
    """The lab's injection: one `Wrapper.new_shared(linear)` per kind of weight, shared by its layers."""
    model, shared, n_layers = copy.deepcopy(base), {}, base.config.n_layers
    def wrap(name: str, linear: nn.Linear) -> nn.Module:
        kind, layer = name.split(".")[-1], int(name.split(".")[1])
        if kind not in shared:
            shared[kind] = Wrapper.new_shared(linear)
        return Wrapper(linear, shared[kind], layer, n_layers)
    peft.inject(model, targets, wrap)
    return model


def _wrappers(model: nn.Module, kind: str) -> list[nn.Module]:
    return [layer.self_attn.get_submodule(kind) for layer in model.layers]


# ----------------------------------------------------------------------------------------------
# Build 1: the injection


class _ReferenceTiedLoRA(nn.Module):
    """Tied-LoRA in the lab's interface (what the check of my_tied_model injects)."""

    def __init__(self, base, shared, layer, n_layers):
        super().__init__()
        self.base, self.shared, self.layer, self.n_layers = base, shared, layer, n_layers
        self.v, self.u = nn.Parameter(torch.ones(base.out_features)), nn.Parameter(torch.ones(R))

    @staticmethod
    def new_shared(linear):
        bound = linear.in_features ** -0.5
        return nn.ParameterDict({"A": nn.Parameter(torch.empty(R, linear.in_features).uniform_(-bound, bound)),
                                 "B": nn.Parameter(torch.zeros(linear.out_features, R))})

    def forward(self, x):
        h = F.linear(x, self.shared["A"]) * self.u
        return self.base(x) + 2.0 * F.linear(h, self.v[:, None] * self.shared["B"])   # alpha / r = 16 / 8


def check_tied_model(my_tied_model) -> str:
    """my_tied_model(base, Wrapper, targets): a copy of base, every target wrapped, one shared set per kind."""
    base = _four_layers()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    model = my_tied_model(base, _ReferenceTiedLoRA, TARGETS)
    expect(not any(isinstance(m, _ReferenceTiedLoRA) for m in base.modules())
           and all(torch.equal(p, before[n]) for n, p in base.state_dict().items()),
           "my_tied_model changed the model it was given: wrap a copy (copy.deepcopy) and return it")
    expect(isinstance(model, Llama), "return the adapted copy of the model")
    for kind in TARGETS:
        wrappers = _wrappers(model, kind)
        expect(all(isinstance(w, _ReferenceTiedLoRA) for w in wrappers),
               f"not every {kind} is wrapped: each target Linear of every layer becomes Wrapper(linear, ...)")
        expect([w.layer for w in wrappers] == list(range(N_LAYERS)),
               f"the {kind} wrappers got layer indices {[w.layer for w in wrappers]}, want {list(range(N_LAYERS))}: "
               "read each Linear's layer from its name, layers.<i>.self_attn...")
        expect(all(w.n_layers == N_LAYERS for w in wrappers), f"pass n_layers = {N_LAYERS}, the model's layer count")
        expect(all(w.shared is wrappers[0].shared for w in wrappers),
               f"the layers' {kind} wrappers hold different shared tensors: call new_shared once per kind of "
               "weight and hand that same set to every layer (that is the tying)")
    kinds = [_wrappers(model, kind)[0].shared for kind in TARGETS]
    expect(kinds[0] is not kinds[1], "q_proj and v_proj share one set of tensors: each kind of weight gets its own "
                                     "(their shapes differ, and so do their jobs)")
    expect(not any(p.requires_grad for n, p in model.named_parameters() if "shared" not in n.split(".")
                   and n.split(".")[-1] not in ("v", "u")),
           "the base model's weights are trainable: wrap with peft.inject (it freezes the base first)")
    theirs = apply_method(copy.deepcopy(base), "tied_lora", targets=TARGETS)
    summary = check_build(model, theirs, _idx(base), minipeft_name("tied_lora"))
    return f"one shared set per kind, the same in all {N_LAYERS} layers; {summary}"


# ----------------------------------------------------------------------------------------------
# Builds 2-5: the four methods


def _check_uniform(t: torch.Tensor, name: str, fan_in: int) -> None:
    expect(torch.count_nonzero(t) > 0, f"{name} is all zeros: with B (or L_B) at zero as well no factor ever gets a "
                                       "gradient; it starts random, uniform_A (LoRA's A)")
    bound = fan_in ** -0.5
    expect(t.abs().max() <= bound * (1 + 1e-6), f"{name}'s entries reach {t.abs().max():.3g}, beyond LoRA's bound "
                                                f"1/sqrt(in) = {bound:.3g}: use uniform_A")
    expect(abs(t.std().item() * math.sqrt(3 * fan_in) - 1) < 0.15,
           f"{name}'s standard deviation is {t.std():.3g}, uniform_A's is 1/sqrt(3 in) = {1 / math.sqrt(3 * fan_in):.3g}")


def _one_hot(layer: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(layer * SLICES // N_LAYERS), SLICES).float()


def _check_mixing(t: torch.Tensor, name: str, layer: int) -> None:
    want = _one_hot(layer)
    if torch.equal(t, want):
        return
    expect(torch.count_nonzero(t) > 0, f"{name} starts at zero: then the layer's factor is 0 and gets no gradient; "
                                       "it starts one-hot")
    expect(not torch.equal(t, torch.ones(SLICES)), f"{name} starts at all ones: the layer would start on the sum of "
                                                   "all slices; it starts one-hot on one slice")
    raise Wrong(f"layer {layer}'s {name} starts at {t.tolist()}, want one-hot on slice layer * l // n_layers = "
                f"{layer * SLICES // N_LAYERS} ({want.tolist()}): one_hot(layer, n_layers)")


def _check_vector(t: torch.Tensor, name: str, size: int, what: str) -> None:
    expect(tuple(t.shape) == (size,), f"{name} has shape {tuple(t.shape)}; it scales the {what}: ({size},)")
    if torch.equal(t, torch.ones(size)):
        return
    expect(torch.count_nonzero(t) > 0, f"{name} starts at zero: the scaling vectors start at one (a zero vector "
                                       "cuts the branch, and with B = 0 too no factor gets a gradient)")
    raise Wrong(f"{name} starts at {[round(x, 4) for x in t[:3].tolist()]}...: the scaling vectors start at one, so each layer "
                "starts from the shared factors themselves")


def _check_roles(Wrapper, method: str) -> tuple[dict, nn.Module]:
    """new_shared holds exactly the shared tensors, the wrapper exactly the per-layer ones."""
    shared_names, own_names = ROLES[method]
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)   # a v_proj of the tiny model: in 64, out 32
    shared = Wrapper.new_shared(linear)
    expect(isinstance(shared, (nn.ParameterDict, dict)), "new_shared returns an nn.ParameterDict")
    keys = set(shared.keys())
    for name in own_names:
        expect(name not in keys, f"new_shared holds `{name}`: that tensor is per layer (layer i's own); shared, "
                                 "it would be trained once instead of once per layer (too few parameters) and tie "
                                 "the layers; make it in __init__")
    for name in shared_names:
        expect(name in keys, f"new_shared has no `{name}`: it is one tensor shared by every layer of a kind of "
                             "weight; made in __init__, every layer would train its own copy (n_layers times the "
                             "parameters); make it in new_shared")
    expect(keys == set(shared_names), f"new_shared holds {sorted(keys)}, want {list(shared_names)}")
    expect(all(isinstance(shared[k], nn.Parameter) for k in keys), "new_shared's tensors must be nn.Parameters")
    wrapper = Wrapper(linear, shared, 1, N_LAYERS)
    held = {n.split(".")[-1]: p for n, p in wrapper.named_parameters() if "shared" in n.split(".")}
    for name in shared_names:
        expect(held.get(name, shared.get(name)) is shared.get(name),
               f"the layer holds a copy of `{name}`, not the shared tensor itself: keep the `shared` it is given "
               "(a copy per layer unties the layers)")
    own = {n: p for n, p in wrapper.named_parameters() if "shared" not in n.split(".") and not n.startswith("base.")}
    for name in shared_names:
        expect(name not in own, f"the layer holds its own `{name}`: that tensor is shared by every layer of a kind "
                                f"of weight; take it from `shared` (made once by new_shared)")
    for name in own_names:
        expect(isinstance(own.get(name), nn.Parameter),
               f"the layer has no `self.{name}` (an nn.Parameter): it is this layer's own tensor")
    expect(set(own) == set(own_names), f"the layer holds {sorted(own)}, want {list(own_names)}")
    return shared, wrapper


def _check_in_model(Wrapper, method: str) -> str:
    """Inject into the 4-layer model: shared tensors the same object in every layer, per-layer ones not;
    the base model at init; the parameter count and check_build against minipeft's method."""
    shared_names, own_names = ROLES[method]
    base = _four_layers()
    mine = _tied_model(base, Wrapper)
    theirs = apply_method(copy.deepcopy(base), method, targets=TARGETS)
    for kind in TARGETS:
        wrappers = _wrappers(mine, kind)
        for name in shared_names:
            tensors = [w.shared[name] for w in wrappers]
            expect(all(t is tensors[0] for t in tensors), f"the layers' `{name}` are different tensors: it is shared "
                                                          "by all layers (do not copy it per layer)")
        for name in own_names:
            tensors = [getattr(w, name) for w in wrappers]
            expect(len({id(t) for t in tensors}) == len(tensors), f"`{name}` is the same tensor in several layers: "
                                                                  "each layer owns its own")
    n_mine = peft.count_parameters(mine)[0]
    n_theirs = peft.count_parameters(theirs)[0]
    expect(n_mine == n_theirs, f"you train {n_mine:,} numbers, {method} trains {n_theirs:,}: a tensor of the wrong "
                               "shape, or a per-layer one shared (fewer) or a shared one copied per layer (more)?")
    idx = _idx(base)
    with torch.no_grad():
        expect(torch.equal(mine(idx), base(idx)), "at init the model must be the base model (B, or L_B, at zero)")
    return check_build(mine, theirs, idx, minipeft_name(method))


def _check_factors(wrapper: nn.Module, A_want, M_want, B_want) -> None:
    """factors() of a layer whose tensors were set to known values."""
    got = wrapper.factors()
    expect(isinstance(got, (tuple, list)) and len(got) == 3, "factors() returns three tensors: (A_i, M_i, B_i)")
    A, M, B = got
    for name, t, want in (("A_i", A, A_want), ("M_i", M, M_want), ("B_i", B, B_want)):
        expect(isinstance(t, torch.Tensor) and t.shape == want.shape,
               f"factors()' {name} has shape {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}, "
               f"want {tuple(want.shape)} (A_i (r1, in), M_i (r2, r1), B_i (out, r2))")
    with torch.no_grad():
        if torch.allclose(B @ M @ A, B_want @ M_want @ A_want, atol=1e-5):
            return
        expect(torch.allclose(A, A_want, atol=1e-6), "A_i is not the layer's A: check which tensor (and which slices) "
                                                     "builds it")
        expect(torch.allclose(M, M_want, atol=1e-6), "M_i is not the layer's middle matrix")
        expect(torch.allclose(B, B_want, atol=1e-6), "B_i is not the layer's B (is v scaling B's rows, the outputs?)")


def check_tied_lora(MyTiedLoRA) -> str:
    shared, wrapper = _check_roles(MyTiedLoRA, "tied_lora")
    expect(tuple(shared["A"].shape) == (R, 64) and tuple(shared["B"].shape) == (32, R),
           f"A has shape {tuple(shared['A'].shape)} and B {tuple(shared['B'].shape)}; want A (R, in) = {(R, 64)}, "
           f"B (out, R) = {(32, R)}")
    _check_uniform(shared["A"].detach(), "A", 64)
    expect(torch.count_nonzero(shared["B"]) == 0, "B must start at zero, so the model starts as the base model")
    _check_vector(wrapper.v.detach(), "v", 32, "outputs, out_features")
    _check_vector(wrapper.u.detach(), "u", R, "rank, R")
    with torch.no_grad():
        shared["B"].normal_()
        wrapper.v.copy_(torch.linspace(0.5, 1.5, 32))
        wrapper.u.copy_(torch.linspace(2.0, 1.0, R))
    _check_factors(wrapper, shared["A"], torch.diag(wrapper.u), wrapper.v[:, None] * shared["B"])
    return _check_in_model(MyTiedLoRA, "tied_lora")


def check_partially_tied_lora(MyPartiallyTiedLoRA) -> str:
    shared, wrapper = _check_roles(MyPartiallyTiedLoRA, "partially_tied_lora")
    expect(tuple(shared["L_A"].shape) == (SLICES, R, 64) and tuple(shared["L_B"].shape) == (SLICES, 32, R),
           f"L_A has shape {tuple(shared['L_A'].shape)} and L_B {tuple(shared['L_B'].shape)}; want "
           f"(SLICES, R, in) = {(SLICES, R, 64)} and (SLICES, out, R) = {(SLICES, 32, R)}")
    _check_uniform(shared["L_A"].detach(), "L_A", 64)
    expect(torch.count_nonzero(shared["L_B"]) == 0, "L_B must start at zero, so every B_i = 0: the base model")
    _check_vector(wrapper.v.detach(), "v", 32, "outputs, out_features")
    _check_vector(wrapper.u.detach(), "u", R, "rank, R")
    for layer in range(N_LAYERS):
        w = MyPartiallyTiedLoRA(nn.Linear(64, 32, bias=False), shared, layer, N_LAYERS)
        _check_mixing(w.mix_a.detach(), "mix_a", layer)
        _check_mixing(w.mix_b.detach(), "mix_b", layer)
    with torch.no_grad():
        shared["L_B"].normal_()
        wrapper.mix_a.copy_(torch.tensor([0.7, -0.4]))
        wrapper.mix_b.copy_(torch.tensor([-0.3, 1.1]))
        wrapper.v.copy_(torch.linspace(0.5, 1.5, 32))
        wrapper.u.copy_(torch.linspace(2.0, 1.0, R))
    A = torch.einsum("kmn,k->mn", shared["L_A"], wrapper.mix_a)
    B = torch.einsum("kmn,k->mn", shared["L_B"], wrapper.mix_b)
    _check_factors(wrapper, A, torch.diag(wrapper.u), wrapper.v[:, None] * B)
    return _check_in_model(MyPartiallyTiedLoRA, "partially_tied_lora")


def check_tied_lora_extra(MyTiedLoRAExtra) -> str:
    shared, wrapper = _check_roles(MyTiedLoRAExtra, "tied_lora_extra")
    _check_uniform(shared["A"].detach(), "A", 64)
    expect(torch.count_nonzero(shared["B"]) == 0, "B must start at zero, so the model starts as the base model")
    core = wrapper.core.detach()
    expect(tuple(core.shape) == (R, R), f"the core has shape {tuple(core.shape)}; M_i is (r2, r1) = {(R, R)}")
    expect(torch.count_nonzero(core) > 0, "the core starts at zero: then neither B nor the core ever gets a gradient "
                                          "(each needs the other non-zero); it starts as the identity")
    expect(torch.equal(core, torch.eye(R)), "the core starts as the identity, so training begins as tied LoRA "
                                            "with B = 0 does")
    with torch.no_grad():
        shared["B"].normal_()
        wrapper.core.add_(0.3 * torch.randn(R, R))
    _check_factors(wrapper, shared["A"], wrapper.core, shared["B"])
    return _check_in_model(MyTiedLoRAExtra, "tied_lora_extra")


def check_tensor_embedding(MyTensorEmbedding) -> str:
    shared, wrapper = _check_roles(MyTensorEmbedding, "tensor_embedding")
    _check_uniform(shared["A"].detach(), "A", 64)
    expect(torch.count_nonzero(shared["B"]) == 0, "B must start at zero, so the model starts as the base model")
    L = shared["L"].detach()
    expect(tuple(L.shape) == (SLICES, R, R), f"L has shape {tuple(L.shape)}; want (SLICES, r2, r1) = "
                                             f"{(SLICES, R, R)}")
    expect(torch.equal(L, torch.eye(R).repeat(SLICES, 1, 1)), "every slice L[k] starts as the identity, so each "
                                                              "M_i starts as the identity")
    for layer in range(N_LAYERS):
        w = MyTensorEmbedding(nn.Linear(64, 32, bias=False), shared, layer, N_LAYERS)
        _check_mixing(w.embedding.detach(), "embedding", layer)
    with torch.no_grad():
        shared["B"].normal_()
        shared["L"].add_(0.3 * torch.randn(SLICES, R, R))
        wrapper.embedding.copy_(torch.tensor([0.6, -0.5]))
    _check_factors(wrapper, shared["A"], torch.einsum("kab,k->ab", shared["L"], wrapper.embedding), shared["B"])
    return _check_in_model(MyTensorEmbedding, "tensor_embedding")


# ----------------------------------------------------------------------------------------------
# Exercises


def _count_1b(method: str, **hyper) -> int:
    with torch.device("meta"):
        return peft.count_parameters(apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), method, **hyper))[0]


def exercise_1(vera_params_1b) -> str:
    """Tied-LoRA with trainable="vu" on q_proj, v_proj of Llama-3.2-1B: the number of trainable values."""
    counted = _count_1b("tied_lora", trainable="vu")
    expect(vera_params_1b == counted, f"{vera_params_1b:,} is not it: only the vectors train, v_i (out_features) and "
                                      "u_i (r), per layer and per target; k and v are narrower than q (GQA)")
    return f"{counted:,} trainable numbers, {851_968 / counted:.0f}x fewer than LoRA r=8"


def exercise_2(tied_delta_weight) -> str:
    """tied_delta_weight(A, B, v, u, s) = TiedLoRALinear.delta_weight() on a trained-looking layer."""
    torch.manual_seed(0)
    model = apply_method(make_base(0), "tied_lora", targets=("v_proj",))
    layer = model.layers[1].self_attn.v_proj
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    A, B, v, u = (t.detach() for t in (layer.shared["A"], layer.shared["B"], layer.v, layer.u))
    got = tied_delta_weight(A, B, v, u, layer.scale)
    want = layer.delta_weight().detach()
    expect(isinstance(got, torch.Tensor) and got.shape == want.shape,
           f"return the (out, in) = {tuple(want.shape)} matrix Delta W_i")
    if not torch.allclose(got, want, atol=1e-6):
        expect(not torch.allclose(got, want / layer.scale, atol=1e-6), "the scale s = alpha / r is missing")
        raise Wrong("not Delta W_i: diag(v) scales B's rows (the outputs), diag(u) its columns (the rank), and "
                    "A comes last")
    return "tied_delta_weight = TiedLoRALinear.delta_weight"


def exercise_3(smallest_l_over_lora) -> str:
    """The smallest l with which partially tied LoRA (q_proj, v_proj, r = 8) trains more than LoRA r = 8."""
    expect(isinstance(smallest_l_over_lora, int) and 1 <= smallest_l_over_lora <= 16,
           "l must be an int from 1 to n_layers = 16")
    lora = _count_1b("lora", r=8, targets=TARGETS)
    count = lambda l: _count_1b("partially_tied_lora", l_a=l, l_b=l)
    over = count(smallest_l_over_lora)
    expect(over > lora, f"l = {smallest_l_over_lora} trains {over:,}, not more than LoRA's {lora:,}: count "
                        "r * l * (in + out) shared plus n * (2 l + out + r) per layer, per target")
    below = count(smallest_l_over_lora - 1) if smallest_l_over_lora > 1 else None
    expect(below is None or below <= lora, f"not the smallest: l = {smallest_l_over_lora - 1} already trains "
                                           f"{below:,} > {lora:,}")
    return (f"l = {smallest_l_over_lora}: {over:,} > LoRA's {lora:,}"
            + (f" (l = {smallest_l_over_lora - 1}: {below:,})" if below is not None else ""))
