"""minipeft/quant.py (issue 18, point 3): NF4 levels as QLoRA's eq. 4 builds them, block-wise absmax with
double quantisation, two codes per byte, NF4Linear / Int8Linear as a frozen base under every
Linear-wrapper method, loading with quantize=, and merging refused. LLM.int8() (arXiv:2208.07339):
LLMInt8Linear against the paper's equations transcribed by hand, with and without outlier features."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from helpers import tiny
from minipeft.adapters import METHODS, apply_method
from minipeft.llama import Llama
from minipeft.peft import match_targets, merge, merge_and_unload
from minipeft import quant
from minipeft.quant import (NF4, Int8Linear, LLMInt8Linear, NF4Linear, QuantLinear, dequantize_model,
                            dequantize_nf4, int8_matmul, nf4_levels, quantize_model, quantize_nf4)

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
    for q in (NF4Linear(lin), Int8Linear(lin), LLMInt8Linear(lin)):
        assert isinstance(q, nn.Linear) and not list(q.parameters())  # frozen: no Parameter at all
        y = q(x)
        # LLM.int8() also rounds the activations: close to x W^T, not equal (tested exactly below)
        tol = {"atol": 0.02, "rtol": 0} if type(q) is LLMInt8Linear else {}
        torch.testing.assert_close(y, x @ q.weight.T, **tol)
        (g,) = torch.autograd.grad(y.sum(), x)  # every kind: the input gradient through the dequantised W
        torch.testing.assert_close(g, torch.ones(3, 64) @ q.weight)
    assert (Int8Linear(lin).weight - lin.weight).abs().max() <= lin.weight.abs().max() / 254 + 1e-7


def test_from_pretrained_quantize_gives_close_logits(tmp_path):
    m = tiny(seed=1)
    m.save_pretrained(tmp_path)
    idx = torch.randint(0, 512, (2, 12))
    ref = m(idx)
    for kind, tol in (("nf4", 0.15), ("int8", 0.01), ("llm_int8", 0.02)):
        q = Llama.from_pretrained(tmp_path, quantize=kind)
        assert sum(isinstance(mod, QuantLinear) for mod in q.modules()) == 7 * q.config.n_layers
        assert type(q.lm_head) is nn.Linear  # the (tied) head stays as it is
        err = (q(idx) - ref).norm() / ref.norm()
        assert 0 < err < tol, (kind, err)


@pytest.mark.parametrize("kind", ["nf4", "llm_int8"])
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full",)])
def test_every_method_trains_on_a_quantised_base(method, kind):
    m = tiny(seed=0)
    quantize_model(m, kind)
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
    for kind in ("nf4", "int8", "llm_int8"):
        assert config_from_args(build_parser().parse_args(["--preset", "tiny", "--quantize", kind])).quantize == kind
    assert config_from_args(build_parser().parse_args(["--preset", "tiny"])).quantize is None


def test_nf4_levels_are_a_buffer_moved_with_the_module_not_copied_per_dequantise(monkeypatch):
    """The codebook lives on the module's device (a non-persistent buffer that .to() moves), so a GPU
    dequantise makes no host-to-device copy; the global NF4 table is never read after construction."""
    torch.manual_seed(0)
    q = NF4Linear(nn.Linear(128, 64, bias=False))
    want = q.dequantize()
    assert "levels" in dict(q.named_buffers()) and "levels" not in q.state_dict()
    monkeypatch.setattr(quant, "NF4", torch.full((16,), float("nan")))  # a dequantise reading it gives NaN
    torch.testing.assert_close(q.dequantize(), want, rtol=0, atol=0)
    assert q.to(torch.device("meta")).levels.device.type == "meta"


# ----------------------------------------------------------------------------- LLM.int8()

def grid_weight(out: int, d: int, seed: int = 0) -> torch.Tensor:
    """A weight already on the int8 row-wise grid (each row's absmax a code of 127): its dequantised
    copy is itself, so the paper's fp16 W[:, O] and Linear8bitLt's dequantised one are the same."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-126, 127, (out, d), generator=g)
    codes[:, 0] = 127
    return codes.float() * (torch.rand(out, 1, generator=g) * 0.05 + 0.01) / 127


def outlier_input(n: int = 48, d: int = 96, seed: int = 1) -> tuple[torch.Tensor, list[int]]:
    """N(0, 1) activations with three outlier feature dimensions, large in most rows, below the
    threshold in some (where they still outweigh the row's other values), and one exact 6.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    cols = [5, 40, 77]
    x[:, cols] = torch.randn(n, 3, generator=g) * 15
    x[:4, cols] = torch.tensor([4.5, -5.0, 5.5])  # outlier columns below 6 in these rows
    x[10, 60] = 6.0                                   # |x| >= 6: column 60 joins O
    return x, sorted(cols + [60])


def paper_llm_int8(X: torch.Tensor, W_t: torch.Tensor, alpha: float = 6.0) -> torch.Tensor:
    """arXiv:2208.07339 section 3.2-3.3 by hand, in float64 with the paper's shapes: X (s, h), W (h, o).
    O = {i : some |X_si| >= alpha}; C ~= sum_{h in O} X^h W^h + S * sum_{h not in O} X^h_i8 W^h_i8 with
    X_i8 = round(127 X / c_x), c_x the row-wise absmax of X[:, not O]; W_i8 = round(127 W / c_w), c_w the
    column-wise absmax of W; S = c_x c_w^T / 127^2 (the product of the dequantisation constants)."""
    X, W = X.double(), W_t.double().T                                  # (s, h), (h, o)
    O = [i for i in range(X.shape[1]) if (X[:, i].abs() >= alpha).any()]
    keep = [i for i in range(X.shape[1]) if i not in O]
    c_x = X[:, keep].abs().max(dim=1).values                             # (s,)
    c_w = W.abs().max(dim=0).values                                      # (o,)
    X_i8 = torch.round(127 * X[:, keep] / c_x[:, None])
    W_i8 = torch.round(127 * W[keep, :] / c_w[None, :])
    C_i32 = X_i8.long() @ W_i8.long()                                    # integer accumulation
    S = torch.outer(c_x, c_w) / 127**2
    return X[:, O] @ W[O, :] + S * C_i32.double()


def vectorwise_int8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weight AND activation int8, vector-wise (sec. 3.2, eq. for C_f16 = S * C_i32), no decomposition."""
    c_x, c_w = x.double().abs().amax(1), w.double().abs().amax(1)
    x_i8, w_i8 = torch.round(127 * x / c_x[:, None]), torch.round(127 * w / c_w[:, None])
    return torch.outer(c_x, c_w) / 127**2 * (x_i8.long() @ w_i8.long().T).double()


def llm_int8_layer(w: torch.Tensor) -> LLMInt8Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    return LLMInt8Linear(lin)


def test_llm_int8_equals_the_papers_equations_with_and_without_outliers():
    w = grid_weight(32, 96)
    layer = llm_int8_layer(w)
    torch.testing.assert_close(layer.weight, w, rtol=1e-6, atol=0)  # on the grid: fp16 W = dequantised W
    x, outliers = outlier_input()
    plain = torch.randn(48, 96, generator=torch.Generator().manual_seed(3))  # no |x| >= 6
    assert plain.abs().max() < 6
    for inputs in (x, plain):
        want = paper_llm_int8(inputs, w).float()
        got = layer(inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(layer(inputs.view(2, 24, 96)), got.view(2, 24, 32))  # (B, T, in) as (B*T, in)
    # the decomposition is what makes them equal: quantising O too (or treating x > 6 as strict) differs
    no_split = paper_llm_int8(x, w, alpha=float("inf")).float()
    strict = paper_llm_int8(x, w, alpha=6.0 + 1e-6).float()
    for wrong in (no_split, strict):
        assert (layer(x) - wrong).abs().max() > 1e-3 * wrong.abs().max()
    assert sorted(i for i in range(96) if (x[:, i].abs() >= 6).any()) == outliers


def test_llm_int8_without_outliers_is_vectorwise_int8_of_weight_and_activation():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    x = torch.randn(40, 128).clamp(-5.9, 5.9)
    layer = llm_int8_layer(w)
    want = vectorwise_int8(x, w).float()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    weight_only = Int8Linear(nn.Linear(128, 64, bias=False).requires_grad_(False))
    weight_only.codes, weight_only.row_scale = layer.codes, layer.row_scale
    assert (layer(x) - weight_only(x)).abs().max() > 1e-4  # the activations are rounded too


def test_int8_matmul_falls_back_to_an_exact_emulation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 4096), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (7, 4096), dtype=torch.int8, generator=g)
    want = a.long() @ b.long().T
    assert torch.equal(int8_matmul(a, b).long(), want)

    def refuse(*args):
        raise RuntimeError("_int_mm: shapes not supported")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_the_decomposition_beats_weight_and_activation_int8_on_outlier_features():
    """The paper's point (sec. 3.3, fig. 1): a few feature dimensions of magnitude ~20-60 set every row's
    absmax, so row-wise int8 rounds the other features coarsely; computing those dimensions apart
    restores the error of inputs without outliers. Printed with -s."""
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    x = torch.randn(64, 512)
    x[:, [7, 100, 300, 451]] *= 20   # 4 of 512 features
    ref = x.double() @ w.double().T
    rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    errors = dict(llm_int8=rel(llm_int8_layer(w)(x)), vectorwise_int8=rel(vectorwise_int8(x, w)),
                  weight_only_int8=rel(Int8Linear(llm_int8_layer(w))(x)))
    print("relative error of x W^T vs fp64, 4 of 512 features x20: " +
          ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["llm_int8"] < errors["vectorwise_int8"] / 3
    assert errors["llm_int8"] < 2 * errors["weight_only_int8"]


def test_lora_trains_on_an_llm_int8_base_and_merge_is_refused():
    m = tiny(seed=0)
    quantize_model(m, "llm_int8")
    assert all(type(mod) is LLMInt8Linear for n, mod in m.named_modules() if n.endswith("q_proj"))
    apply_method(m, "lora", targets="all-linear")
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        _, loss = m(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with pytest.raises(NotImplementedError, match="is quantised"):
        merge(m)


def test_finetune_quantize_llm_int8_runs_on_the_toy_task(tmp_path):
    from minipeft import finetune
    out = tmp_path / "run"
    assert finetune.main(["--method", "lora", "--quantize", "llm_int8", "--out", str(out), "--limit", "16",
                          "--max-steps", "2", "--eval-limit", "2", "--max-new-tokens", "4", "--no-baseline",
                          "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["quantize"] == "llm_int8"
    assert math.isfinite(json.loads((out / "summary.json").read_text())["after"]["test_bpt"])
