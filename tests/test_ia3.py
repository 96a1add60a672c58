"""(IA)^3 and (IA)^3++ on the tiny seeded model: the five method tests, training, parameter counts,
and the Hugging Face PEFT IA3 format."""

import json

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.hf_peft import PREFIX as PEFT_PREFIX
from minipeft.hf_peft import ia3_from_peft as from_peft
from minipeft.hf_peft import ia3_to_peft as to_peft
from minipeft.methods.ia3 import IA3Config, IA3Linear
from minipeft.methods.ia3 import apply as apply_ia3
from minipeft.methods.ia3pp import QKSkipNorm, merge_and_unload
from minipeft.llama import Llama, LlamaConfig, apply_rope
from minipeft.safetensors_io import save_file
from helpers import tiny, assert_cached_decoding_equals_full_forward

CASES = [
    ("ia3", {}),
    ("ia3", dict(targets=("all-linear",), feedforward_targets=("down_proj",))),
    ("ia3pp", {}),
    ("ia3pp", dict(use_l_o=False)),
    ("ia3pp", dict(use_qk_norm=False)),
    ("ia3pp", dict(use_qk_norm=False, use_l_o=False)),
]
IDS = ["ia3", "ia3-all-linear", "ia3pp", "ia3pp-no-l_o", "ia3pp-no-norm", "ia3pp-no-norm-no-l_o"]
IDX = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def adapted(name, hyper, seed=0, **overrides):
    return apply_method(tiny(seed, **overrides), name, **hyper)


def perturb(model, seed=1, scale=0.3):
    """Move every adapter parameter away from its identity value, so the checks below see the method."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def closed_form(cfg: LlamaConfig, name: str, hyper: dict) -> int:
    """Trainable numbers from the docstrings' formulas."""
    L, kv, hd = cfg.n_layers, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
    if name == "ia3" and hyper.get("targets") == ("all-linear",):
        # outputs of q, k, v, o, gate, up; input of down
        return L * (cfg.n_heads * hd + 2 * kv + cfg.dim + 2 * cfg.ffn_dim + cfg.ffn_dim)
    if name == "ia3":
        return L * (kv + kv + cfg.ffn_dim)
    d_o = cfg.dim if hyper.get("use_l_o", True) else 0
    d_norm = 2 * hd if hyper.get("use_qk_norm", True) else 0
    return L * (kv + kv + d_o + cfg.ffn_dim + d_norm)  # L x (d_k + d_v + d_o + d_ff + d_norm_q + d_norm_k)


# ---------------------------------------------------------------- the five tests


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_identity_at_init(name, hyper):
    base = tiny()(IDX)
    torch.testing.assert_close(adapted(name, hyper)(IDX), base, rtol=0, atol=0)


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_only_adapter_parameters_train(name, hyper):
    m = perturb(adapted(name, hyper))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all(n.endswith((".ia3_l", ".q_scale", ".k_scale")) for n in trainable)
    assert peft.count_parameters(m)[0] == closed_form(m.config, name, hyper)
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


def test_ia3pp_matches_the_design_card_equations():
    """X_attn = softmax((Norm(Q)+Q)(Norm(l_k K)+l_k K)^T/sqrt(d)) (l_v V), Out = l_o (W_o X_attn),
    X_ff = (l_ff gamma(W_1 x)) W_2, written out by hand for layer 0 (RoPE after the norm, as in Llama)."""
    m = perturb(adapted("ia3pp", {}))
    attn, mlp, cfg = m.layers[0].self_attn, m.layers[0].mlp, m.config
    T, hd, rep = 7, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    x = torch.randn(1, T, cfg.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = m.rope(torch.arange(T)[None])

    def norm(t, alpha):  # RMSNorm per head over head_dim, scale alpha
        return alpha * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    q = (x @ attn.q_proj.weight.T).view(1, T, cfg.n_heads, hd)
    k = (x @ attn.k_proj.base.weight.T * attn.k_proj.ia3_l).view(1, T, cfg.n_kv_heads, hd)
    v = (x @ attn.v_proj.base.weight.T * attn.v_proj.ia3_l).view(1, T, cfg.n_kv_heads, hd)
    q = apply_rope(norm(q, attn.qk_adapter.q_scale) + q, cos, sin).transpose(1, 2)  # (1, n_heads, T, hd)
    k = apply_rope(norm(k, attn.qk_adapter.k_scale) + k, cos, sin).transpose(1, 2).repeat_interleave(rep, 1)
    v = v.transpose(1, 2).repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    x_attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, T, -1)
    out = attn.o_proj.ia3_l * (x_attn @ attn.o_proj.base.weight.T)
    torch.testing.assert_close(attn(x, cos, sin)[0], out, rtol=1e-5, atol=1e-6)
    gamma = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    x_ff = (mlp.down_proj.ia3_l * gamma) @ mlp.down_proj.base.weight.T
    torch.testing.assert_close(mlp(x), x_ff, rtol=1e-5, atol=1e-6)


def test_qk_norm_scales_get_gradients_at_zero_init():
    m = adapted("ia3pp", {})
    _, loss = m(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    norms = [mod for mod in m.modules() if isinstance(mod, QKSkipNorm)]
    assert len(norms) == m.config.n_layers
    for mod in norms:
        assert torch.equal(mod.q_scale, torch.zeros_like(mod.q_scale))
        assert mod.q_scale.grad.abs().min() > 0 and mod.k_scale.grad.abs().min() > 0


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_merge_equivalence(name, hyper):
    m = perturb(adapted(name, hyper))
    w0 = m.layers[0].self_attn.k_proj.base.weight.clone()
    before = m(IDX)
    peft.merge(m)
    assert not torch.equal(m.layers[0].self_attn.k_proj.base.weight, w0)  # the vectors are in the weights now
    assert rel_err(m(IDX), before) < 1e-5
    peft.merge(m)  # idempotent
    assert rel_err(m(IDX), before) < 1e-5
    peft.unmerge(m)
    torch.testing.assert_close(m.layers[0].self_attn.k_proj.base.weight, w0, rtol=1e-6, atol=1e-7)
    assert rel_err(m(IDX), before) < 1e-5


def test_merge_refuses_zero_entry_and_changes_nothing():
    m = perturb(adapted("ia3", {}))
    with torch.no_grad():
        m.layers[1].mlp.down_proj.ia3_l[7] = 0.0
    weights = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(NotImplementedError, match=r"layers\.1\.mlp\.down_proj.*zero entries at \[7\]"):
        peft.merge(m)
    assert all(torch.equal(p, weights[n]) for n, p in m.named_parameters())
    assert not any(mod.merged for mod in m.modules() if isinstance(mod, IA3Linear))


def test_merge_rule_with_a_bias():
    """diag(l) W for outputs (the bias scales too), W diag(l) for inputs, on Linears that have a bias."""
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    for feedforward in (False, True):
        layer = IA3Linear(torch.nn.Linear(6, 4), feedforward=feedforward)
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 2.0)
        before = layer(x)
        with torch.no_grad():  # as peft.merge calls it
            layer.merge()
        layer.merged = True
        torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)


def test_ia3pp_merge_keeps_the_norm_and_unload_refuses_it():
    m = perturb(adapted("ia3pp", {}))
    before = m(IDX)
    peft.merge(m)
    assert all(isinstance(layer.self_attn.qk_adapter, QKSkipNorm) for layer in m.layers)
    assert rel_err(m(IDX), before) < 1e-5  # the norm still runs on the merged projections
    with pytest.raises(NotImplementedError, match="QK skip-norm"):
        merge_and_unload(m)
    assert rel_err(m(IDX), before) < 1e-5


def test_ia3pp_without_norm_unloads_to_a_plain_llama():
    m = perturb(adapted("ia3pp", dict(use_qk_norm=False)))
    before = m(IDX)
    merge_and_unload(m)
    assert not peft.adapter_modules(m) and m.peft_configs == []
    plain = tiny()
    plain.load_state_dict(m.state_dict())  # same keys as a base model
    assert rel_err(plain(IDX), before) < 1e-5


def test_ia3pp_without_norm_and_l_o_is_plain_ia3():
    pp = perturb(adapted("ia3pp", dict(use_qk_norm=False, use_l_o=False)))
    ia3 = adapted("ia3", {})
    ia3.load_state_dict(pp.state_dict())
    torch.testing.assert_close(ia3(IDX), pp(IDX), rtol=0, atol=0)


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(name, hyper):
    m = perturb(adapted(name, hyper))
    assert_cached_decoding_equals_full_forward(m, IDX)


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_save_load_round_trip_and_wrong_base(name, hyper, tmp_path):
    m = perturb(adapted(name, hyper))
    save_adapter(m, tmp_path)
    loaded = load_adapter(tiny(), tmp_path)
    torch.testing.assert_close(loaded(IDX), m(IDX), rtol=0, atol=0)
    with pytest.raises(ValueError, match="different base model.*ffn_dim"):
        load_adapter(tiny(ffn_dim=96), tmp_path)


@pytest.mark.parametrize("name,lr", [("ia3", 0.05), ("ia3pp", 0.05)])
def test_short_training_run_lowers_the_loss(name, lr):
    m = adapted(name, {})
    data = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(5))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(peft.param_groups(m, lr=lr))
    losses = []
    for _ in range(30):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_parameter_counts_match_closed_form(name, hyper):
    m = adapted(name, hyper)
    assert peft.count_parameters(m)[0] == closed_form(m.config, name, hyper)


@pytest.mark.parametrize("name,hyper", CASES, ids=IDS)
def test_parameter_counts_for_llama_1b(name, hyper):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, name, **hyper)
    trainable, total = peft.count_parameters(m)
    print(f"\n{name} {hyper}: {peft.trainable_report(m)}")
    assert trainable == closed_form(cfg, name, hyper)
    docstring_numbers = {("ia3", ()): (147_456, 0.0119), ("ia3pp", ()): (182_272, 0.0147)}  # ia3.py, ia3pp.py
    if (name, tuple(hyper)) in docstring_numbers:
        count, percent = docstring_numbers[name, tuple(hyper)]
        assert trainable == count and round(100 * trainable / (total - trainable), 4) == percent


# ---------------------------------------------------------------- Hugging Face PEFT IA3 format


def peft_ia3_adapter(cfg: LlamaConfig, seed=3, skip=()):
    """An adapter_config.json dict and tensors as PEFT writes them, by hand."""
    g = torch.Generator().manual_seed(seed)
    kv = cfg.n_kv_heads * cfg.head_dim
    tensors = {}
    for i in range(cfg.n_layers):
        for name, shape in ((f"self_attn.k_proj", (kv, 1)), (f"self_attn.v_proj", (kv, 1)),
                            (f"mlp.down_proj", (1, cfg.ffn_dim))):
            if f"layers.{i}.{name}" not in skip:
                tensors[f"base_model.model.model.layers.{i}.{name}.ia3_l"] = 1 + 0.5 * torch.randn(shape, generator=g)
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
              "feedforward_modules": ["down_proj"], "fan_in_fan_out": False, "modules_to_save": None,
              "init_ia3_weights": True, "base_model_name_or_path": "meta-llama/Llama-3.2-1B", "revision": None,
              "inference_mode": True}
    return config, tensors


def peft_merged_reference(tensors):
    """The base model with PEFT's own merge rule applied: weight * ia3_l ((out,1) rows, (1,in) columns)."""
    ref = tiny()
    with torch.no_grad():
        for key, l in tensors.items():
            ref.get_submodule(key.removeprefix("base_model.model.model.").removesuffix(".ia3_l")).weight.mul_(l)
    return ref


def test_from_peft_handwritten_adapter_gives_peft_math():
    config, tensors = peft_ia3_adapter(LlamaConfig.from_name("tiny"))
    m = from_peft(tiny(), config, tensors)
    assert isinstance(m.layers[1].mlp.down_proj, IA3Linear) and m.layers[1].mlp.down_proj.feedforward
    assert not m.layers[1].self_attn.k_proj.feedforward
    assert rel_err(m(IDX), peft_merged_reference(tensors)(IDX)) < 1e-5


def test_from_peft_regex_targets_and_exclude():
    config, tensors = peft_ia3_adapter(LlamaConfig.from_name("tiny"), skip={"layers.1.self_attn.k_proj"})
    config.update(target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=r".*mlp\.down_proj",
                  exclude_modules=["layers.1.self_attn.k_proj"])
    m = from_peft(tiny(), config, tensors)
    assert type(m.layers[1].self_attn.k_proj) is torch.nn.Linear
    assert rel_err(m(IDX), peft_merged_reference(tensors)(IDX)) < 1e-5


def test_from_peft_errors_leave_the_model_alone():
    config, tensors = peft_ia3_adapter(LlamaConfig.from_name("tiny"))
    other = tiny(ffn_dim=96)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.ia3_l' has shape \(1, 192\).*\(1, 96\)"):
        from_peft(other, config, tensors)
    assert not peft.adapter_modules(other)
    tensors.pop(PEFT_PREFIX + "layers.0.self_attn.v_proj.ia3_l")
    with pytest.raises(KeyError, match="missing.*layers.0.self_attn.v_proj.ia3_l"):
        from_peft(tiny(), config, tensors)
    with pytest.raises(ValueError, match="expected 'IA3'"):
        from_peft(tiny(), dict(config, peft_type="LORA"), tensors)


@pytest.mark.parametrize("hyper,targets", [
    ({}, ["k_proj", "v_proj", "down_proj"]),
    (dict(targets=("layers.0.self_attn.k_proj", "layers.1.mlp.down_proj"),
          feedforward_targets=("layers.1.mlp.down_proj",)), ["layers.0.self_attn.k_proj", "layers.1.mlp.down_proj"]),
])
def test_to_peft_from_peft_round_trip(hyper, targets):
    m = perturb(apply_ia3(tiny(), IA3Config(**hyper)))
    config, tensors = to_peft(m)
    config = json.loads(json.dumps(config))
    assert config["peft_type"] == "IA3" and config["target_modules"] == targets
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])
    kv, ffn = m.config.n_kv_heads * m.config.head_dim, m.config.ffn_dim
    for key, t in tensors.items():
        assert t.shape == ((1, ffn) if "down_proj" in key else (kv, 1)), key
    loaded = from_peft(tiny(), config, tensors)
    torch.testing.assert_close(loaded(IDX), m(IDX), rtol=0, atol=0)
    assert rel_err(peft_merged_reference(tensors)(IDX), m(IDX)) < 1e-5


def test_peft_directory_round_trip_through_adapters(tmp_path):
    pytest.importorskip("minipeft.hf_peft")
    config, tensors = peft_ia3_adapter(LlamaConfig.from_name("tiny"))
    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "hand" / "adapter_model.safetensors")
    m = load_adapter(tiny(), tmp_path / "hand")
    assert rel_err(m(IDX), peft_merged_reference(tensors)(IDX)) < 1e-5
    save_adapter(m, tmp_path / "out", format="peft")
    again = load_adapter(tiny(), tmp_path / "out")
    torch.testing.assert_close(again(IDX), m(IDX), rtol=0, atol=0)
