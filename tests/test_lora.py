"""LoRA, DoRA and Simple DoRA on the tiny seeded model (CPU): the five tests every method gets, a short
training run, closed-form parameter counts, the gamma reparameterisation, and the Hugging Face PEFT format."""

import json
import math
import types

import pytest
import torch

from minipeft import hf_peft, peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods.dora import DoRAConfig, DoRALinear
from minipeft.safetensors_io import load_file, save_file
from helpers import tiny

METHODS = ["lora", "dora", "simple_dora"]
HYPER = dict(r=4, alpha=8.0, targets="all-linear")
LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model.model."


def tokens(B=2, T=12, seed=5):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1):
    """Give the zero-initialised B (and the magnitudes) random values, so the adapter does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def adapted(method, seed=0, **hyper):
    model = tiny(seed)
    apply_method(model, method, **{**HYPER, **hyper})
    return randomize(model, seed + 1)


def plain_copy(model):
    """A Llama without wrappers holding the model's current (possibly merged) base weights."""
    plain = tiny(seed=123)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    return plain


def linear_shapes(cfg):
    """(out, in) of each targetable Linear of one decoder layer."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return dict(q_proj=(q, cfg.dim), k_proj=(kv, cfg.dim), v_proj=(kv, cfg.dim), o_proj=(cfg.dim, q),
                gate_proj=(cfg.ffn_dim, cfg.dim), up_proj=(cfg.ffn_dim, cfg.dim), down_proj=(cfg.dim, cfg.ffn_dim))


def closed_form(cfg, method, r, leaves):
    """LoRA: r (in + out) per target; DoRA / Simple DoRA add one magnitude per output feature."""
    shapes = linear_shapes(cfg)
    per_layer = sum(r * (shapes[n][0] + shapes[n][1]) + (shapes[n][0] if method != "lora" else 0) for n in leaves)
    return cfg.n_layers * per_layer


# ---------------------------------------------------------------- the five tests


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method):
    model, idx = tiny(), tokens()
    ref = model(idx)
    apply_method(model, method, **HYPER, dropout=0.1)
    assert torch.equal(model(idx), ref)  # bit for bit: B = 0, and m = ||W|| gives a scale of exactly 1
    q = model.layers[0].self_attn.q_proj
    assert q.weight is q.base.weight  # code reading `q_proj.weight` still finds the base weight


@pytest.mark.parametrize("method", METHODS)
def test_gradients_only_on_adapter(method):
    model, idx = adapted(method), tokens(4, 16)
    model.train()
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == ({"lora_A", "lora_B"} if method == "lora" else {"lora_A", "lora_B", "magnitude"})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(peft.param_groups(model, 1e-2, weight_decay=0.1))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        assert p.grad is None or p.grad.abs().sum() > 0, n
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(not torch.equal(params[n], t) for n, t in trained.items())


@pytest.mark.parametrize("method", METHODS)
def test_merge_equivalence(method):
    model, idx = adapted(method), tokens()
    base_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("base.weight")}
    out = model(idx)
    peft.merge(model)
    merged = model(idx)
    assert (merged - out).abs().max() / out.abs().max() < 1e-5
    assert torch.equal(plain_copy(model)(idx), merged)  # the merged weights alone give these logits
    peft.unmerge(model)
    after = model.state_dict()
    for k, w in base_before.items():  # LoRA subtracts its product again; (Simple) DoRA restores a copy
        if method == "lora":
            torch.testing.assert_close(after[k], w, rtol=0, atol=1e-7)
        else:
            assert torch.equal(after[k], w)
    torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_equals_full_forward(method):
    model, idx = adapted(method), tokens(2, 11)
    full = model(idx)
    model.setup_kv_cache(2, 16)
    steps = [model(idx[:, :6], cache_start=0)] + [model(idx[:, t:t + 1], cache_start=t) for t in range(6, 11)]
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    prompts = [[5, 17, 99, 3, 250], [42, 7, 300]]  # generate(): left-padded batch, KV cache
    for prompt, new in zip(prompts, model.generate(prompts, max_new_tokens=5)):
        seq = list(prompt)
        for tok in new:  # greedy decoding with full forward passes gives the same tokens
            assert model(torch.tensor([seq]))[0, -1].argmax().item() == tok
            seq.append(tok)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip_and_wrong_base(method, tmp_path):
    model, idx = adapted(method, gamma=2.0, loraplus_ratio=4.0, use_rslora=True), tokens()
    out = model(idx)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh(idx), out)
    assert fresh.peft_configs == model.peft_configs
    assert all(m.lora_B.lr_scale == 4.0 for _, m in peft.adapter_modules(fresh))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


# ---------------------------------------------------------------- training, counts, dtypes


@pytest.mark.parametrize("method", METHODS)
def test_short_training_run_lowers_the_loss(method):
    model = tiny()
    apply_method(model, method, **HYPER)
    model.train()
    data = tokens(4, 17, seed=11)
    opt = torch.optim.AdamW(peft.param_groups(model, 2e-2))
    losses = []
    for _ in range(15):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("method", METHODS)
def test_parameter_counts_closed_form(method):
    cfg = LlamaConfig.from_name("tiny")
    for r, targets in ((4, "all-linear"), (8, ("q_proj", "v_proj"))):
        model = tiny()
        apply_method(model, method, r=r, targets=targets)
        leaves = LEAVES if targets == "all-linear" else targets
        assert peft.count_parameters(model)[0] == closed_form(cfg, method, r, leaves)


def test_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    shapes = linear_shapes(cfg)
    base_total = (cfg.vocab_size * cfg.dim + cfg.dim  # tied embedding / head, final norm
                  + cfg.n_layers * (sum(o * i for o, i in shapes.values()) + 2 * cfg.dim))
    lines = []
    for method, r, targets in (("lora", 8, ("q_proj", "v_proj")), ("lora", 16, ("q_proj", "v_proj")),
                               ("dora", 8, ("q_proj", "v_proj")), ("simple_dora", 8, ("q_proj", "v_proj")),
                               ("lora", 8, "all-linear"), ("dora", 8, "all-linear")):
        with torch.device("meta"):
            model = Llama(cfg)
        apply_method(model, method, r=r, targets=targets)
        trainable, total = peft.count_parameters(model)
        leaves = LEAVES if targets == "all-linear" else targets
        assert trainable == closed_form(cfg, method, r, leaves)
        assert total == base_total + trainable
        lines.append(f"llama-3.2-1b {method} r={r} {targets}: {peft.trainable_report(model).splitlines()[0]}")
    assert base_total == 1_235_814_400  # Llama 3.2 1B as published
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base(method):
    model = tiny().to(torch.bfloat16)
    apply_method(model, method, **HYPER)
    randomize(model)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapter is fp32
    idx = tokens(2, 13)
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.dtype == torch.bfloat16
    ref = adapted(method)(idx[:, :-1])
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- initialisation, DoRA's detached norm


def test_lora_init_kaiming_uniform_a_zero_b():
    for gamma in (1.0, 4.0):
        model = tiny()
        apply_method(model, "lora", r=8, targets=("down_proj",), gamma=gamma)
        m = model.layers[0].mlp.down_proj
        bound = 1 / math.sqrt(192) / gamma  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
        assert 0.95 * bound < m.lora_A.abs().max() <= bound
        assert abs(m.lora_A.std() / (bound / math.sqrt(3)) - 1) < 0.1
        assert torch.equal(m.lora_B, torch.zeros(64, 8))


def test_dora_norm_is_a_constant_in_backward():
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 8, bias=False), DoRAConfig(r=2, alpha=4.0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.1)
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    ours = [p.grad for p in (layer.lora_A, layer.lora_B, layer.magnitude)]

    def by_hand(detach):
        A, B, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
        V = layer.base.weight + 2.0 * B @ A
        norm = V.norm(dim=1, keepdim=True)
        (x @ (m[:, None] * V / (norm.detach() if detach else norm)).T).square().sum().backward()
        return [A.grad, B.grad, m.grad]

    for a, b in zip(ours, by_hand(detach=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours[0], by_hand(detach=False)[0], rtol=1e-2)


# ---------------------------------------------------------------- gamma and LoRA+


def lora_model(gamma, seed=0):
    model = tiny(seed)
    apply_method(model, "lora", r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), gamma=gamma)
    return model


def lora_modules(model):
    return [m for _, m in peft.adapter_modules(model)]


def test_gamma_keeps_the_function():
    m1, m4 = lora_model(1.0), lora_model(4.0)
    for a, b in zip(lora_modules(m1), lora_modules(m4)):
        assert torch.equal(b.lora_A * 4, a.lora_A)  # A stored divided by gamma ...
        assert b.scale == 4 * a.scale               # ... and the branch multiplied by it
    randomize(m1), randomize(m4)  # the same B in both: the functions agree, not only at B = 0
    torch.testing.assert_close(m4(tokens()), m1(tokens()), rtol=1e-6, atol=1e-6)


def train(model, steps, opt_cls=torch.optim.AdamW, lr=1e-3):
    data = tokens(4, 17, seed=11)
    model.train()
    opt = opt_cls(peft.param_groups(model, lr), lr=lr)
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_gamma_leaves_b_first_update_unchanged():
    m1, m4 = lora_model(1.0), lora_model(4.0)
    train(m1, 1), train(m4, 1)
    for a, b in zip(lora_modules(m1), lora_modules(m4)):
        assert a.lora_B.abs().sum() > 0
        assert torch.equal(a.lora_B, b.lora_B)


def test_gamma_raises_a_relative_adam_update():
    """||dA|| / ||A|| after k Adam steps grows about gamma x (Adam ignores the gradient's scale)."""
    ratios = {}
    for gamma in (1.0, 4.0):
        model = lora_model(gamma)
        before = [m.lora_A.detach().clone() for m in lora_modules(model)]
        train(model, 5)
        ratios[gamma] = [((m.lora_A - a).norm() / a.norm()).item() for m, a in zip(lora_modules(model), before)]
    for r1, r4 in zip(ratios[1.0], ratios[4.0]):
        assert 0.95 * 4 < r4 / r1 < 1.05 * 4, (r1, r4)  # measured 3.99 .. 4.03


def test_gamma_squared_under_sgd():
    """Step 1 moves only B (A's gradient is 0 while B = 0); at step 2 the states agree, so
    dA(gamma) = gamma dA(1) and the effective dA_eff = gamma dA(gamma) = gamma^2 dA_eff(1)."""
    deltas = {}
    for gamma in (1.0, 4.0):
        model = lora_model(gamma).double()  # float64: the small step-2 update is far above rounding
        before = [m.lora_A.detach().clone() for m in lora_modules(model)]
        train(model, 2, torch.optim.SGD, lr=0.5)
        deltas[gamma] = [gamma * (m.lora_A.detach() - a) for m, a in zip(lora_modules(model), before)]  # dA_eff
    for d1, d4 in zip(deltas[1.0], deltas[4.0]):
        assert d1.abs().sum() > 0
        torch.testing.assert_close(d4, 16 * d1, rtol=1e-6, atol=1e-9 * d1.abs().max().item())


def test_loraplus_ratio_reaches_the_optimizer():
    model = tiny()
    apply_method(model, "lora", r=4, loraplus_ratio=16.0)
    groups = peft.param_groups(model, 1e-3)
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {1.0, 16.0}
    assert by_scale[16.0]["lr"] == pytest.approx(16e-3) and by_scale[1.0]["lr"] == pytest.approx(1e-3)
    mods = lora_modules(model)
    assert {id(p) for p in by_scale[16.0]["params"]} == {id(m.lora_B) for m in mods}
    assert {id(p) for p in by_scale[1.0]["params"]} == {id(m.lora_A) for m in mods}


# ---------------------------------------------------------------- Hugging Face PEFT format


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_format_roundtrip(method, tmp_path):
    model = adapted(method, gamma=2.0, use_rslora=True, loraplus_ratio=16.0, targets=("q_proj", "v_proj", "down_proj"))
    out = model(tokens())
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (4, 8.0, True, method == "dora")
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q = model.layers[0].self_attn.q_proj
    assert torch.equal(tensors[PREFIX + "layers.0.self_attn.q_proj.lora_A.weight"], 2.0 * q.lora_A)  # gamma folded
    assert tensors[PREFIX + "layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    suffixes = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if method == "dora" else set())
    assert len(tensors) == 2 * 3 * len(suffixes) and {k.split("_proj.")[1] for k in tensors} == suffixes
    fresh = load_adapter(tiny(), tmp_path)
    torch.testing.assert_close(fresh(tokens()), out, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(tiny(ffn_dim=128), tmp_path)


def test_peft_format_mixed_ranks_use_rank_pattern(tmp_path):
    model = tiny()
    apply_method(model, "lora", r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    apply_method(model, "lora", r=2, alpha=3.0, targets=("layers.1.mlp.down_proj",))
    randomize(model)
    out = model(tokens())
    save_adapter(model, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",  # not all
                                        "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj",  # down_projs
                                        "layers.1.mlp.down_proj"]
    assert config["rank_pattern"] == {r"layers\.1\.mlp\.down_proj": 2}
    assert config["alpha_pattern"] == {r"layers\.1\.mlp\.down_proj": 3.0}
    torch.testing.assert_close(load_adapter(tiny(), tmp_path)(tokens()), out, rtol=1e-6, atol=1e-6)


def test_peft_format_refuses_what_peft_cannot_hold(tmp_path):
    model = adapted("simple_dora")
    with pytest.raises(NotImplementedError, match="simple_dora.*format='minipeft'"):
        save_adapter(model, tmp_path, format="peft")
    model = adapted("lora", targets=("q_proj",))
    apply_method(model, "dora", r=2, targets=("k_proj",))
    with pytest.raises(NotImplementedError, match="one LoRA, DoRA or IA3"):
        save_adapter(model, tmp_path, format="peft")
    model = adapted("lora", targets=("q_proj",))
    apply_method(model, "lora", r=2, targets=("k_proj",), dropout=0.1)
    with pytest.raises(NotImplementedError, match=r"one dropout per adapter; this model mixes \[0.0, 0.1\]"):
        save_adapter(model, tmp_path, format="peft")
    assert not (tmp_path / "adapter_config.json").exists()


def write_peft_dir(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path


def test_hand_written_peft_lora_dir(tmp_path):
    """rsLoRA, a regex target_modules, rank_pattern and alpha_pattern, checked against W + s B A by hand."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
              "target_modules": r".*\.(q_proj|v_proj|down_proj)", "use_rslora": True, "use_dora": False,
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "rank_pattern": {r"layers\.1\.mlp\.down_proj": 2}, "alpha_pattern": {"down_proj": 3},
              "exclude_modules": ["layers.0.self_attn.v_proj"]}
    g = torch.Generator().manual_seed(3)
    base, tensors, expected = tiny(), {}, tiny()
    for i in range(2):
        for name in (f"layers.{i}.self_attn.q_proj", f"layers.{i}.self_attn.v_proj", f"layers.{i}.mlp.down_proj"):
            if name == "layers.0.self_attn.v_proj":
                continue  # excluded
            out_f, in_f = base.get_submodule(name).weight.shape
            r = 2 if name == "layers.1.mlp.down_proj" else 4
            alpha = 3 if name.endswith("down_proj") else 8
            A, B = torch.randn(r, in_f, generator=g) * 0.1, torch.randn(out_f, r, generator=g) * 0.1
            tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = A, B
            with torch.no_grad():  # the hand computation: W + alpha / sqrt(r) * B A
                expected.get_submodule(name).weight += alpha / math.sqrt(r) * B @ A
    write_peft_dir(tmp_path, config, tensors)
    loaded = load_adapter(base, tmp_path)
    torch.testing.assert_close(loaded(tokens()), expected(tokens()), rtol=1e-5, atol=1e-5)
    assert sorted((c.r, c.alpha) for c in loaded.peft_configs) == [(2, 3.0), (4, 3.0), (4, 8.0)]
    assert type(loaded.layers[0].self_attn.v_proj) is torch.nn.Linear


def test_hand_written_peft_dora_dir(tmp_path):
    """DoRA with list targets and layers_to_transform: W' = m (W + s B A) / ||W + s B A|| per output row."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "use_dora": True,
              "target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}
    g = torch.Generator().manual_seed(4)
    base, tensors, expected = tiny(), {}, tiny()
    for name in ("layers.1.self_attn.q_proj", "layers.1.self_attn.o_proj"):
        W = base.get_submodule(name).weight.detach()
        A, B = torch.randn(2, W.shape[1], generator=g) * 0.1, torch.randn(W.shape[0], 2, generator=g) * 0.1
        m = W.norm(dim=1) * (1 + 0.2 * torch.rand(W.shape[0], generator=g))
        tensors.update({f"{PREFIX}{name}.lora_A.weight": A, f"{PREFIX}{name}.lora_B.weight": B,
                        f"{PREFIX}{name}.lora_magnitude_vector": m})
        V = W + 4 / 2 * B @ A
        with torch.no_grad():
            expected.get_submodule(name).weight.copy_(m[:, None] * V / V.norm(dim=1, keepdim=True))
    write_peft_dir(tmp_path, config, tensors)
    loaded = load_adapter(base, tmp_path)
    torch.testing.assert_close(loaded(tokens()), expected(tokens()), rtol=1e-5, atol=1e-5)
    assert type(loaded.layers[0].self_attn.q_proj) is torch.nn.Linear  # layer 0 left alone


def test_peft_dir_errors(tmp_path):
    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    shape_q = {"lora_A.weight": (2, 64), "lora_B.weight": (64, 2)}
    tensors = {f"{PREFIX}layers.{i}.self_attn.q_proj.{k}": torch.zeros(s) for i in range(2) for k, s in shape_q.items()}
    cases = [
        (dict(good, bias="all"), tensors, NotImplementedError, "bias"),
        (dict(good, fan_in_fan_out=True, use_some_future_thing=1), tensors, NotImplementedError,
         r"does not implement \{'fan_in_fan_out': True, 'use_some_future_thing': 1\}"),
        (dict(good, init_lora_weights="pissa"), tensors, NotImplementedError, "pissa"),
        (dict(good, target_modules=["lm_head"]), tensors, NotImplementedError, "lm_head"),
        (dict(good, target_modules=["nope"]), tensors, ValueError, "matched no Linear"),
        (dict(good, peft_type="PREFIX_TUNING"), tensors, NotImplementedError, "PREFIX_TUNING"),
        (dict(good, r=3), tensors, ValueError, r"has shape \(2, 64\), this base model expects \(3, 64\)"),
        (good, {k: v for k, v in tensors.items() if "layers.1" not in k}, KeyError, "missing"),
    ]
    for i, (config, ts, error, message) in enumerate(cases):
        model = tiny()
        with pytest.raises(error, match=message):
            load_adapter(model, write_peft_dir(tmp_path / str(i), config, ts))
        assert not hasattr(model, "peft_configs")  # checked before the model is touched
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(good))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(NotImplementedError, match="adapter_model.bin"):
        load_adapter(tiny(), tmp_path / "bin")


def test_peft_ia3_is_dispatched_to_the_ia3_converters(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_peft, "ia3_from_peft", lambda model, config, tensors, source=None:
                        calls.append(("from", config, sorted(tensors))))
    monkeypatch.setattr(hf_peft, "ia3_to_peft", lambda model: (
        calls.append(("to",)) or ({"peft_type": "IA3", "target_modules": ["k_proj"]},
                                  {PREFIX + "layers.0.self_attn.k_proj.ia3_l": torch.ones(32, 1)})))
    model = tiny()
    model.peft_configs = [types.SimpleNamespace(method="ia3")]
    save_adapter(model, tmp_path, format="peft")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"
    load_adapter(tiny(), tmp_path)
    assert calls == [("to",), ("from", {"peft_type": "IA3", "target_modules": ["k_proj"], "base_model_name_or_path": None},
                                [PREFIX + "layers.0.self_attn.k_proj.ia3_l"])]
