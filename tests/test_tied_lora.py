"""Tied-LoRA and its relatives (partially tied LoRA, Tied-LoRA Extra, Tensor Embedding) on the tiny
seeded model: the five checks every method gets, a short training run, closed-form parameter counts,
the expressiveness statements of partially tied LoRA, and each shared tensor stored exactly once."""

from __future__ import annotations

import pytest
import torch

from minipeft import peft
from minipeft.adapters import WEIGHTS_FILE, apply_method, load_adapter, save_adapter
from minipeft.llama import Llama, LlamaConfig
from minipeft.safetensors_io import load_file

TARGETS = ("q_proj", "v_proj", "down_proj")  # three shapes on tiny: 64->64, 64->32, 192->64
METHODS = {
    "tied_lora": dict(r=4, targets=TARGETS),
    "partially_tied_lora": dict(r=4, l_a=2, l_b=1, targets=TARGETS),
    "tied_lora_extra": dict(r1=4, r2=3, targets=TARGETS),
    "tensor_embedding": dict(r1=4, r2=3, l=1, targets=TARGETS),
}


def tiny(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_name("tiny")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return Llama(cfg).eval()


def adapted(method: str, seed: int = 0, **hyper) -> Llama:
    return apply_method(tiny(seed), method, **(METHODS[method] | hyper))


def perturb(model: Llama, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, so the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def tokens(B: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- identity, gradients, merge


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    idx = tokens()
    base_logits = tiny()(idx)
    assert torch.equal(adapted(method)(idx), base_logits)  # exact: the zero factor makes the update exactly 0


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_keeps_fp32_adapter(method):
    m = tiny().to(torch.bfloat16)
    apply_method(m, method, **METHODS[method])
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    assert m(tokens()).dtype == torch.bfloat16


@pytest.mark.parametrize("method", METHODS)
def test_gradients_only_on_adapter_and_base_unchanged(method):
    m = tiny()
    base = [(p, p.detach().clone()) for p in m.parameters()]
    apply_method(m, method, **METHODS[method])
    perturb(m)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert peft.trainable_by_method(m) == {method: sum(p.numel() for p in trainable)}
    opt = torch.optim.AdamW(peft.param_groups(m, lr=1e-2, weight_decay=0.1))
    idx = tokens(T=12)
    _, loss = m(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(p.grad is None for p, _ in base)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert all(torch.equal(p, before) for p, before in base)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged(method):
    m = adapted(method)
    perturb(m)
    idx = tokens()
    weights = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith("base.weight")}
    before = m(idx)
    assert rel_err(before, tiny()(idx)) > 1e-3  # the adapter really changes the output
    peft.merge(m)
    assert rel_err(m(idx), before) < 1e-5
    peft.unmerge(m)
    assert rel_err(m(idx), before) < 1e-5
    for n, p in m.named_parameters():
        if n in weights:
            assert (p - weights[n]).abs().max() < 1e-6


# ---------------------------------------------------------------- cache, save/load


@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_full_forward(method):
    m = adapted(method)
    perturb(m)
    idx = tokens(T=11)
    full = m(idx)
    m.setup_kv_cache(2, 16)
    steps = [m(idx[:, :6], cache_start=0)] + [m(idx[:, t:t + 1], cache_start=t) for t in range(6, 11)]
    m.clear_kv_cache()
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    prompts = [[5, 17, 99, 3, 250], [42, 7, 300]]
    generated = m.generate(prompts, max_new_tokens=6)
    for prompt, new in zip(prompts, generated):
        seq = list(prompt)
        for _ in range(6):  # greedy decoding by full forward passes, no cache
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt):]


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tmp_path):
    m = adapted(method)
    perturb(m)
    idx = tokens()
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(idx), m(idx))
    with pytest.raises(ValueError, match="different base model.*n_layers"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_save_load_rebuilds_frozen_random_factors(tmp_path):
    """trainable="vu": A and B are frozen random, not saved; the seed rebuilds them on load."""
    m = adapted("tied_lora", trainable="vu")
    perturb(m)
    save_adapter(m, tmp_path)
    assert not any(k.startswith("peft_shared.") for k in load_file(tmp_path / WEIGHTS_FILE))
    fresh = tiny()
    torch.manual_seed(123)  # the global RNG state must not matter: the factors come from config.seed
    load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(tokens()), m(tokens()))


@pytest.mark.parametrize("method", METHODS)
def test_shared_tensors_stored_once(method, tmp_path):
    m = adapted(method)
    shared = list(m.peft_shared.parameters())
    assert len(m.peft_shared) == len(TARGETS)  # one holder per target name, whatever the layer count
    named = [p for _, p in m.named_parameters(remove_duplicate=False)]
    state = list(m.state_dict().values())
    for p in shared:
        assert sum(q is p for q in named) == 1
        assert sum(t.data_ptr() == p.data_ptr() for t in state) == 1
    save_adapter(m, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_FILE)
    assert sum(k.startswith("peft_shared.") for k in saved) == len(shared)
    assert len(saved) == len([p for p in m.parameters() if p.requires_grad])


def test_tied_layers_read_the_same_tensor():
    m = adapted("tied_lora")
    a0, a1 = (m.layers[i].self_attn.q_proj.shared["A"] for i in (0, 1))
    assert a0 is a1 is m.peft_shared["tied_lora__q_proj"]["A"]
    assert m.layers[0].mlp.down_proj.shared["A"].shape == (4, 192)


def test_applying_twice_to_the_same_target_name_is_refused():
    m = apply_method(tiny(), "tied_lora", targets=("layers.0.self_attn.q_proj",))
    with pytest.raises(ValueError, match="tied_lora__q_proj.*already"):
        apply_method(m, "tied_lora", targets=("layers.1.self_attn.q_proj",))


# ---------------------------------------------------------------- Tied-LoRA variants (vBuA)

VARIANTS = ["vBuA", "BA", "vu", "vBA", "BuA", "vBu", "uA", "A", "u", "v", "B"]


@pytest.mark.parametrize("trainable", VARIANTS)
def test_tied_lora_variants_identity_and_trainable_set(trainable):
    m = adapted("tied_lora", trainable=trainable)
    assert torch.equal(m(tokens()), tiny()(tokens()))
    names = {n.rpartition(".")[2] for n, p in m.named_parameters() if p.requires_grad}
    assert names == set(trainable)
    zero = next(t for t in "BvuA" if t in trainable)  # the documented rule: first trainable of B, v, u, A
    layer = m.layers[1].self_attn.q_proj
    tensors = {"A": layer.shared["A"], "B": layer.shared["B"], "u": layer.u, "v": layer.v}
    assert tensors[zero].abs().sum() == 0
    assert all(t is None or t.abs().sum() > 0 for k, t in tensors.items() if k != zero)
    hyper = dict(METHODS["tied_lora"], trainable=trainable)
    assert peft.count_parameters(m)[0] == closed_form("tied_lora", m.config, hyper)


def test_tied_lora_rejects_bad_trainable():
    with pytest.raises(ValueError, match="letters v, B, u, A"):
        adapted("tied_lora", trainable="vBx")


# ---------------------------------------------------------------- expressiveness


def layer_name(m: Llama, i: int, leaf: str) -> str:
    return next(k for k, _ in m.named_modules() if k.startswith(f"layers.{i}.") and k.endswith(leaf))


def lora_reference(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> Llama:
    """The tiny model with W += scale * B @ A written into the named weights: plain LoRA, merged by hand."""
    ref = tiny()
    with torch.no_grad():
        for name, (A, B) in factors.items():
            ref.get_submodule(name).weight += scale * B @ A
    return ref


def test_partially_tied_with_a_slice_per_layer_is_lora():
    n, r = 2, 4
    m = apply_method(tiny(), "partially_tied_lora", r=r, l_a=n, l_b=n, targets=TARGETS)
    g = torch.Generator().manual_seed(3)
    factors = {}
    with torch.no_grad():
        for leaf in TARGETS:
            stack = m.peft_shared[f"partially_tied_lora__{leaf}"]
            for i in range(n):
                name = layer_name(m, i, leaf)
                A = torch.randn(stack["L_A"][i].shape, generator=g)
                B = torch.randn(stack["L_B"][i].shape, generator=g)
                stack["L_A"][i], stack["L_B"][i] = A, B  # slice i holds layer i's LoRA factors
                layer = m.get_submodule(name)
                layer.mix_a.copy_(torch.eye(n)[i])
                layer.mix_b.copy_(torch.eye(n)[i])
                factors[name] = (A, B)
    idx = tokens()
    assert rel_err(m(idx), lora_reference(factors, 16.0 / r)(idx)) < 1e-5


def test_partially_tied_with_one_slice_is_tied_lora():
    tied = adapted("tied_lora")
    perturb(tied)
    m = apply_method(tiny(), "partially_tied_lora", r=4, l_a=1, l_b=1, targets=TARGETS)
    with torch.no_grad():
        for leaf in TARGETS:
            mine, theirs = m.peft_shared[f"partially_tied_lora__{leaf}"], tied.peft_shared[f"tied_lora__{leaf}"]
            mine["L_A"][0], mine["L_B"][0] = theirs["A"], theirs["B"]
        for name, layer in m.named_modules():
            if hasattr(layer, "mix_a"):
                c = 2.5  # a mixing weight folds into u: (c L_A) with u / c is the same layer
                layer.mix_a.fill_(c)
                layer.mix_b.fill_(1.0)
                layer.u.copy_(tied.get_submodule(name).u / c)
                layer.v.copy_(tied.get_submodule(name).v)
    idx = tokens()
    assert rel_err(m(idx), tied(idx)) < 1e-5


@pytest.mark.parametrize("method, hyper", [("partially_tied_lora", dict(l_a=3)),
                                           ("partially_tied_lora", dict(l_b=0)), ("tensor_embedding", dict(l=3))])
def test_slices_must_be_between_one_and_n_layers(method, hyper):
    with pytest.raises(ValueError, match="n_layers=2"):
        adapted(method, **hyper)


def test_tensor_embedding_with_a_slice_per_layer_is_tied_lora_extra():
    extra = adapted("tied_lora_extra")
    perturb(extra)
    m = adapted("tensor_embedding", l=2)
    with torch.no_grad():
        for leaf in TARGETS:
            mine, theirs = m.peft_shared[f"tensor_embedding__{leaf}"], extra.peft_shared[f"tied_lora_extra__{leaf}"]
            mine["A"].copy_(theirs["A"])
            mine["B"].copy_(theirs["B"])
            for i in range(2):
                name = layer_name(m, i, leaf)
                mine["L"][i] = extra.get_submodule(name).core  # slice i holds layer i's core M_i
                m.get_submodule(name).embedding.copy_(torch.eye(2)[i])
    idx = tokens()
    assert rel_err(m(idx), extra(idx)) < 1e-5


# ---------------------------------------------------------------- training and parameter counts


@pytest.mark.parametrize("method", METHODS)
def test_loss_goes_down(method):
    m = adapted(method).train()
    opt = torch.optim.AdamW(peft.param_groups(m, lr=2e-2))
    idx = tokens(B=2, T=17, seed=7)
    losses = []
    for _ in range(15):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses  # the frozen base alone would stay at losses[0]


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection, from the config alone."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return dict(q_proj=(q, cfg.dim), k_proj=(kv, cfg.dim), v_proj=(kv, cfg.dim), o_proj=(cfg.dim, q),
                gate_proj=(cfg.ffn_dim, cfg.dim), up_proj=(cfg.ffn_dim, cfg.dim),
                down_proj=(cfg.dim, cfg.ffn_dim))


def closed_form(method: str, cfg: LlamaConfig, hyper: dict) -> int:
    """Trainable parameters by the formulas in the module docstrings (every layer wrapped)."""
    n, total = cfg.n_layers, 0
    for leaf in hyper["targets"]:
        out, inp = linear_shapes(cfg)[leaf]
        if method == "lora":
            total += n * hyper["r"] * (inp + out)
        elif method == "tied_lora":
            r, t = hyper["r"], hyper.get("trainable", "vBuA")
            total += ("A" in t) * r * inp + ("B" in t) * out * r + n * (("v" in t) * out + ("u" in t) * r)
        elif method == "partially_tied_lora":
            r, la, lb = hyper["r"], hyper["l_a"], hyper["l_b"]
            vectors = hyper.get("scale_vectors", True) * n * (out + r)
            total += la * r * inp + lb * out * r + n * (la + lb) + vectors
        elif method == "tied_lora_extra":
            r1, r2 = hyper["r1"], hyper["r2"]
            total += r1 * inp + out * r2 + n * r2 * r1
        elif method == "tensor_embedding":
            r1, r2, l = hyper["r1"], hyper["r2"], hyper["l"]
            total += r1 * inp + out * r2 + l * r2 * r1 + n * l
    return total


@pytest.mark.parametrize("method", METHODS)
def test_parameter_count_matches_formula(method):
    m = adapted(method)
    assert peft.count_parameters(m)[0] == closed_form(method, m.config, METHODS[method])


LLAMA_1B = {
    "lora": dict(r=8),
    "tied_lora": dict(r=8),
    "partially_tied_lora": dict(r=8, l_a=4, l_b=4),
    "tied_lora_extra": dict(r1=8, r2=8),
    "tensor_embedding": dict(r1=8, r2=8, l=4),
}


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj")])
def test_llama_1b_parameter_counts(targets):
    """Built on the meta device (no memory); printed next to plain LoRA's formula (`pytest -s`)."""
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    print(f"\nllama-3.2-1b, targets {'+'.join(t.removesuffix('_proj') for t in targets)}:")
    for method, hyper in LLAMA_1B.items():
        hyper = dict(hyper, targets=targets)
        expected = closed_form(method, cfg, hyper)
        if method != "lora":  # LoRA is lora.py's to test; here only its formula, for comparison
            with torch.device("meta"):
                m = Llama(cfg)
            apply_method(m, method, **hyper)
            assert peft.count_parameters(m)[0] == expected
        print(f"  {method:20s} {expected:>12,d}  {hyper}")
