"""minipeft/quant.py (issue 18, point 3): NF4 levels as QLoRA's eq. 4 builds them, block-wise absmax with
double quantisation, two codes per byte, NF4Linear / Int8Linear as a frozen base under every
Linear-wrapper method, loading with quantize=, and merging refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import tiny
from minipeft.adapters import METHODS, apply_method
from minipeft.llama import Llama
from minipeft.peft import match_targets, merge, merge_and_unload
from minipeft.quant import (NF4, Int8Linear, NF4Linear, QuantLinear, dequantize_model, dequantize_nf4,
                            nf4_levels, quantize_model, quantize_nf4)

# bitsandbytes' published NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4"), and its CUDA
# kernels' dDequantizeNF4), read from bitsandbytes-foundation/bitsandbytes.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def test_nf4_levels_are_the_normal_quantiles_of_eq4_and_match_bitsandbytes():
    levels = nf4_levels()
    torch.testing.assert_close(levels, torch.tensor(BNB_NF4), atol=1e-6, rtol=0)
    assert (levels == 0).sum() == 1 and levels.min() == -1 and levels.max() == 1
    assert ((levels < 0).sum(), (levels > 0).sum()) == (7, 8)  # asymmetric: 2^(k-1) and 2^(k-1)+1, zeros merged


def test_nf4_storage_is_4_127_bits_per_weight_and_round_trips():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    state = quantize_nf4(w)
    assert state["codes"].dtype == torch.uint8 and state["codes"].numel() == w.numel() // 2  # two per byte
    assert state["absmax_q"].dtype == torch.int8 and state["absmax_scale"].numel() == w.numel() // 64 // 256
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values()) / w.numel()
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())) < 1e-9  # 4 + 0.127 (+ the mean)
    back = dequantize_nf4(state, w.shape)
    # every value is within half the widest gap between levels (x its block's absmax) of the original
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    assert ((back - w).view(-1, 64).abs() <= absmax * (NF4.diff().max() / 2 + 0.01)).all()
    exact = dequantize_nf4(quantize_nf4(w, double_quant=False), w.shape)
    mse, mse_fp32_constants = (back - w).pow(2).mean(), (exact - w).pow(2).mean()
    assert mse < 1.01 * mse_fp32_constants  # double quantisation adds < 1% to the squared error


def test_nf4_beats_uniform_4bit_absmax_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    nf4 = dequantize_nf4(quantize_nf4(w), w.shape)
    b = w.view(-1, 64)
    s = b.abs().amax(1, keepdim=True) / 7  # plain symmetric int4 absmax, same block
    int4 = (torch.round(b / s).clamp(-7, 7) * s).view_as(w)
    assert (nf4 - w).pow(2).mean() < 0.8 * (int4 - w).pow(2).mean()


def test_quantized_linears_forward_and_input_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(3, 128, requires_grad=True)
    for q in (NF4Linear(lin), Int8Linear(lin)):
        assert isinstance(q, nn.Linear) and not list(q.parameters())  # frozen: no Parameter at all
        y = q(x)
        torch.testing.assert_close(y, x @ q.weight.T)
        (g,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(g, torch.ones(3, 64) @ q.weight)
    assert (Int8Linear(lin).weight - lin.weight).abs().max() <= lin.weight.abs().max() / 254 + 1e-7


def test_from_pretrained_quantize_gives_close_logits(tmp_path):
    m = tiny(seed=1)
    m.save_pretrained(tmp_path)
    idx = torch.randint(0, 512, (2, 12))
    ref = m(idx)
    for kind, tol in (("nf4", 0.15), ("int8", 0.01)):
        q = Llama.from_pretrained(tmp_path, quantize=kind)
        assert sum(isinstance(mod, QuantLinear) for mod in q.modules()) == 7 * q.config.n_layers
        assert type(q.lm_head) is nn.Linear  # the (tied) head stays as it is
        err = (q(idx) - ref).norm() / ref.norm()
        assert 0 < err < tol, (kind, err)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full",)])
def test_every_method_trains_on_an_nf4_base(method):
    m = tiny(seed=0)
    quantize_model(m, "nf4")
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    kwargs = {"targets": "all-linear"} if method in ("lora", "dora") else {}
    apply_method(m, method, **kwargs)
    m.train()
    idx = torch.randint(0, 512, (2, 10))
    idx[:, 0] = 256  # <|begin_of_text|>, as every prompt starts: PaSTA trains only at special tokens
    _, loss = m(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    trained = [p for p in m.parameters() if p.requires_grad]
    assert trained and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), method
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if k in state)  # the quantised base as it was


def test_merging_into_a_quantized_base_is_refused_and_dequantize_then_merge_works():
    m = tiny(seed=0)
    quantize_model(m, "nf4")
    assert "layers.0.self_attn.q_proj" in match_targets(m, "all-linear")
    apply_method(m, "lora", targets="all-linear")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    idx = torch.randint(0, 512, (1, 8))
    want = m(idx)
    with pytest.raises(NotImplementedError, match="quantised"):
        merge(m)
    with pytest.raises(NotImplementedError, match="dequantize_model"):
        merge_and_unload(m)
    dequantize_model(m)
    plain = merge_and_unload(m)
    torch.testing.assert_close(plain(idx), want, atol=1e-4, rtol=1e-4)


def test_quantize_refuses_a_model_that_already_has_adapters_and_unknown_kinds():
    m = tiny()
    with pytest.raises(ValueError, match="unknown kind"):
        quantize_model(m, "fp4")
    apply_method(m, "lora")
    with pytest.raises(ValueError, match="quantise the base first"):
        quantize_model(m, "nf4")


def test_backward_keeps_the_quantised_state_not_the_dense_weight():
    """QLoRA's memory saving: autograd saves no (out, in) dense weight for backward."""
    lin = nn.Linear(256, 128, bias=False)
    q = NF4Linear(lin)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = q(x)
    assert 256 * 128 not in saved
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        torch.nn.functional.linear(x, q.weight)  # what a plain dequantise-then-matmul would keep
    assert 256 * 128 in saved
    y.sum().backward()
    assert x.grad is not None


def test_finetune_takes_a_quantize_flag():
    from minipeft.runs import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["--preset", "tiny", "--quantize", "nf4"]))
    assert cfg.quantize == "nf4"
    assert config_from_args(build_parser().parse_args(["--preset", "tiny"])).quantize is None
