"""BitFit (bias vectors added to a bias-free Llama) on the tiny seeded model: the five method tests,
training, and parameter counts."""

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.methods.bitfit import BitFitLinear
from minipeft.llama import Llama, LlamaConfig
from helpers import tiny, assert_cached_decoding_equals_full_forward

CASES = [{}, dict(targets=("q_proj", "gate_proj", "up_proj"))]
IDS = ["all-seven", "query-and-middle-of-mlp"]
IDX = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def bitfit(hyper, seed=0, **overrides):
    return apply_method(tiny(seed, **overrides), "bitfit", **hyper)


def perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def closed_form(cfg: LlamaConfig, hyper: dict) -> int:
    """One bias per output feature of each targeted Linear, in each layer."""
    out = dict(q_proj=cfg.n_heads * cfg.head_dim, k_proj=cfg.n_kv_heads * cfg.head_dim,
               v_proj=cfg.n_kv_heads * cfg.head_dim, o_proj=cfg.dim, gate_proj=cfg.ffn_dim,
               up_proj=cfg.ffn_dim, down_proj=cfg.dim)
    return cfg.n_layers * sum(out[t] for t in hyper.get("targets", out))


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_identity_at_init(hyper):
    torch.testing.assert_close(bitfit(hyper)(IDX), tiny()(IDX), rtol=0, atol=0)


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_only_biases_train(hyper):
    m = perturb(bitfit(hyper))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all(isinstance(m.get_submodule(n.removesuffix(".bias")), BitFitLinear) for n in trainable)
    assert peft.count_parameters(m)[0] == closed_form(m.config, hyper)
    _, loss = m(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    torch.optim.AdamW(peft.param_groups(m, lr=1e-2, weight_decay=0.1)).step()
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"base weight {n} changed"


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_merge_adds_a_bias_and_unmerge_removes_it(hyper):
    m = perturb(bitfit(hyper))
    q = m.layers[0].self_attn.q_proj
    before = m(IDX)
    peft.merge(m)
    assert torch.equal(q.base.bias, q.bias.detach()) and not q.base.bias.requires_grad
    assert rel_err(m(IDX), before) < 1e-5
    peft.merge(m)  # idempotent
    assert rel_err(m(IDX), before) < 1e-5
    peft.unmerge(m)
    assert q.base.bias is None  # back to Llama's bias-free Linear, exactly
    torch.testing.assert_close(m(IDX), before, rtol=0, atol=0)


def test_merge_into_a_linear_that_already_has_a_bias():
    torch.manual_seed(0)
    layer, x = BitFitLinear(torch.nn.Linear(6, 4).requires_grad_(False)), torch.randn(5, 6)
    with torch.no_grad():
        layer.bias.normal_()
    b0, before = layer.base.bias.clone(), layer(x)
    with torch.no_grad():  # as peft.merge calls it
        layer.merge()
    layer.merged = True
    torch.testing.assert_close(layer(x), before)
    with torch.no_grad():
        layer.unmerge()
    torch.testing.assert_close(layer.base.bias, b0)


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(hyper):
    m = perturb(bitfit(hyper))
    assert_cached_decoding_equals_full_forward(m, IDX)


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_save_load_round_trip_and_wrong_base(hyper, tmp_path):
    m = perturb(bitfit(hyper))
    save_adapter(m, tmp_path)
    loaded = load_adapter(tiny(), tmp_path)
    torch.testing.assert_close(loaded(IDX), m(IDX), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different base model.*dim"):
        load_adapter(tiny(dim=32), tmp_path)


def test_short_training_run_lowers_the_loss():
    m = bitfit({})
    data = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(5))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(peft.param_groups(m, lr=1e-2))
    losses = []
    for _ in range(30):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("hyper", CASES, ids=IDS)
def test_parameter_counts_match_closed_form(hyper):
    for cfg in (LlamaConfig.from_name("tiny"), LlamaConfig.from_name("llama-3.2-1b")):
        with torch.device("meta"):
            m = Llama(cfg)
        apply_method(m, "bitfit", **hyper)
        print(f"\nbitfit {hyper} on {cfg.dim=}: {peft.trainable_report(m)}")
        trainable, total = peft.count_parameters(m)
        assert trainable == closed_form(cfg, hyper)
        if cfg.dim == 2048 and not hyper:  # the numbers in bitfit.py's docstring
            assert trainable == 376_832 and round(100 * trainable / (total - trainable), 4) == 0.0305
