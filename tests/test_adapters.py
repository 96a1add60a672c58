"""Bottleneck adapters (Houlsby, Pfeiffer, parallel), full fine-tuning, the extra-loss hook and AdaMix on
the tiny seeded model (CPU): the five tests every method gets, a short training run, closed-form
parameter counts (tiny and llama-3.2-1b on the meta device)."""

import math

import pytest
import torch
import torch.nn.functional as F

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods.bottleneck_adapter import AdapterLinear, Bottleneck, ParallelAdapter
from helpers import tiny, assert_cached_decoding_equals_full_forward

IDX = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
BASE_1B = 1_235_814_400  # Llama 3.2 1B as published


def perturb(model, seed=1, scale=0.05):
    """Give every trainable tensor (the zero W_up included) random values, so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def train_losses(model, steps=15, lr=1e-2):
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    model.train()
    opt = torch.optim.AdamW(peft.param_groups(model, lr))
    losses = []
    for _ in range(steps):
        _, loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_only_trainable_change(model, idx=IDX):
    """Gradients reach exactly the trainable tensors; after an AdamW step (with weight decay) every
    frozen tensor is bit-identical and every trainable one moved."""
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        assert p.grad is None or p.grad.abs().sum() > 0, n
    torch.optim.AdamW(peft.param_groups(model, 1e-2, weight_decay=0.1)).step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(not torch.equal(params[n], t) for n, t in trained.items())


# ================================================================ bottleneck adapters


def adapter_model(placement, seed=0, **hyper):
    return apply_method(tiny(seed), "bottleneck_adapter", placement=placement, bottleneck=8, **hyper)


def bottleneck_closed_form(cfg, placement, k):
    """2 d k + k + d per adapter; houlsby has two per layer, pfeiffer and parallel one."""
    return cfg.n_layers * (2 if placement == "houlsby" else 1) * (2 * cfg.dim * k + k + cfg.dim)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_identity_at_init(placement):
    ref = tiny()(IDX)
    for activation in ("gelu", "relu", "silu"):
        assert torch.equal(adapter_model(placement, activation=activation)(IDX), ref)  # W_up = 0, b_up = 0


def test_bottleneck_placements_wrap_the_right_modules():
    m = adapter_model("houlsby")
    layer = m.layers[0]
    assert isinstance(layer.self_attn.o_proj, AdapterLinear) and isinstance(layer.mlp.down_proj, AdapterLinear)
    assert layer.self_attn.o_proj.weight is layer.self_attn.o_proj.base.weight
    m = adapter_model("pfeiffer")
    assert isinstance(m.layers[1].mlp.down_proj, AdapterLinear)
    assert not isinstance(m.layers[1].self_attn.o_proj, AdapterLinear)
    m = adapter_model("parallel")
    assert isinstance(m.layers[0].mlp, ParallelAdapter) and type(m.layers[0].mlp.base.down_proj) is torch.nn.Linear


def test_bottleneck_equations_by_hand():
    """Sequential: y + s f(y W_d + b_d) W_u + b_u on o_proj's output. Parallel: the adapter reads the
    normed hidden state that gate_proj/up_proj read (the MLP's input), not down_proj's input."""
    m = perturb(adapter_model("houlsby", activation="relu", scaling=2.0))
    o = m.layers[0].self_attn.o_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y = x @ o.base.weight.T
    a = o.adapter
    by_hand = y + 2.0 * (F.relu(y @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(o(x), by_hand)
    m = perturb(adapter_model("parallel"))
    mlp = m.layers[0].mlp
    seen = {}
    mlp.base.gate_proj.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))  # returns None
    out = mlp(x)
    assert torch.equal(seen["x"], x)
    a = mlp.adapter
    torch.testing.assert_close(out, mlp.base(x) + F.gelu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)


def test_bottleneck_config_errors():
    with pytest.raises(ValueError, match="placement must be one of"):
        adapter_model("serial")
    with pytest.raises(ValueError, match="activation must be one of"):
        adapter_model("houlsby", activation="tanh")
    m = tiny()
    with pytest.raises(ValueError, match="parallel placement wraps feed-forward.*'layers.0.self_attn' is a Attention"):
        apply_method(m, "bottleneck_adapter", placement="parallel", targets=("mlp", "self_attn"))
    with pytest.raises(ValueError, match="matched no module"):
        apply_method(m, "bottleneck_adapter", placement="parallel", targets=("ffn",))
    with pytest.raises(ValueError, match="match 'layers.0.mlp.down_proj' and a module that contains it"):
        peft.wrap_modules(m, ("layers.0.mlp", "layers.0.mlp.down_proj"), lambda name, mod: mod)
    assert all(p.requires_grad for p in m.parameters())  # nothing frozen or swapped on error
    assert not any(isinstance(mod, ParallelAdapter) for mod in m.modules())


def test_parallel_adapter_stacks_with_other_methods(tmp_path):
    """He et al.'s MAM adapter: prefix tuning in the attention + a scaled parallel adapter on the FFN;
    here also over LoRA on the FFN's Linears. Saved and loaded in the order applied."""
    m = apply_method(tiny(), "lora", r=4, targets=("down_proj", "up_proj"))
    apply_method(m, "prefix_tuning", prefix_len=3)
    apply_method(m, "bottleneck_adapter", placement="parallel", bottleneck=8, scaling=4.0)
    perturb(m)
    assert isinstance(m.layers[0].mlp, ParallelAdapter) and hasattr(m.layers[0].mlp.base.down_proj, "lora_A")
    save_adapter(m, tmp_path)
    assert torch.equal(load_adapter(tiny(), tmp_path)(IDX), m(IDX))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_gradients_only_on_adapters(placement):
    m = perturb(adapter_model(placement))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    assert peft.count_parameters(m)[0] == bottleneck_closed_form(m.config, placement, 8)
    assert_only_trainable_change(m)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_merge_refuses_clearly(placement):
    m = perturb(adapter_model(placement))
    before, state = m(IDX), {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(NotImplementedError, match="cannot merge: bottleneck_adapter.*nonlinearity.*nothing was merged"):
        peft.merge(m)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert torch.equal(m(IDX), before)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_cached_decoding_equals_full_forward(placement):
    assert_cached_decoding_equals_full_forward(perturb(adapter_model(placement)), IDX)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_save_load_round_trip_and_wrong_base(placement, tmp_path):
    m = perturb(adapter_model(placement, activation="silu", scaling=4.0))
    save_adapter(m, tmp_path)
    loaded = load_adapter(tiny(), tmp_path)
    assert loaded.peft_configs == m.peft_configs
    assert torch.equal(loaded(IDX), m(IDX))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bottleneck_short_training_run_lowers_the_loss(placement):
    # sequential adapters read o_proj/down_proj outputs, which are small in the random tiny model
    # (std-0.02 weights): they move the loss less than the parallel one (measured -0.16..-0.20 vs -0.78)
    losses = train_losses(adapter_model(placement), steps=20)
    assert losses[-1] < losses[0] - (0.5 if placement == "parallel" else 0.12), losses


def test_bottleneck_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    lines = []
    for placement, k in (("houlsby", 64), ("pfeiffer", 64), ("parallel", 64), ("houlsby", 16)):
        with torch.device("meta"):
            m = Llama(cfg)
        apply_method(m, "bottleneck_adapter", placement=placement, bottleneck=k)
        trainable, total = peft.count_parameters(m)
        assert trainable == bottleneck_closed_form(cfg, placement, k) and total == BASE_1B + trainable
        lines.append(f"llama-3.2-1b bottleneck_adapter {placement} k={k}: {peft.trainable_report(m).splitlines()[0]}")
    assert bottleneck_closed_form(cfg, "houlsby", 64) == 8_456_192  # the numbers in the module docstring
    assert bottleneck_closed_form(cfg, "pfeiffer", 64) == 4_228_096
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_bottleneck_bf16_base_keeps_fp32_adapters():
    m = adapter_model("houlsby")
    m.to(torch.bfloat16)
    for mod in m.modules():
        if isinstance(mod, Bottleneck):
            mod.float()
    logits, loss = m(IDX[:, :-1], IDX[:, 1:])
    assert logits.dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)


# ================================================================ full fine-tuning

FULL_CASES = [dict(), dict(targets=("layers.1.*", "norm.weight"))]
FULL_IDS = ["everything", "top-block-and-final-norm"]


def full_model(hyper, seed=0, **overrides):
    return apply_method(tiny(seed, **overrides), "full", **hyper)


def layer_weights(cfg) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.dim * q + 2 * cfg.dim * kv + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim


@pytest.mark.parametrize("hyper", FULL_CASES, ids=FULL_IDS)
def test_full_identity_at_init(hyper):
    assert torch.equal(full_model(hyper)(IDX), tiny()(IDX))


@pytest.mark.parametrize("hyper", FULL_CASES, ids=FULL_IDS)
def test_full_gradients_only_on_chosen_weights(hyper):
    m = full_model(hyper)
    cfg = m.config
    expected = sum(p.numel() for p in m.parameters()) if not hyper else layer_weights(cfg) + cfg.dim
    assert peft.count_parameters(m)[0] == expected
    assert_only_trainable_change(m)


def test_full_tied_embedding_is_one_tensor_and_vectors_skip_decay():
    m = full_model(dict(targets=("lm_head.weight",)))
    assert m.embed_tokens.weight.requires_grad and peft.count_parameters(m)[0] == 512 * 64
    m = full_model({})
    assert all(getattr(p, "no_weight_decay", False) == (p.ndim == 1) for p in m.parameters())
    with pytest.raises(ValueError, match=r"full: targets \['mlp'\] matched no parameter"):
        apply_method(tiny(), "full", targets=("mlp",))


@pytest.mark.parametrize("hyper", FULL_CASES, ids=FULL_IDS)
def test_full_merge_is_trivially_a_no_op(hyper):
    m = perturb(full_model(hyper))
    before, state = m(IDX), {k: v.clone() for k, v in m.state_dict().items()}
    peft.merge(m)  # nothing to fold: no adapter module, the trained weights already are the weights
    assert torch.equal(m(IDX), before)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    peft.unmerge(m)
    assert torch.equal(m(IDX), before)


@pytest.mark.parametrize("hyper", FULL_CASES, ids=FULL_IDS)
def test_full_cached_decoding_equals_full_forward(hyper):
    assert_cached_decoding_equals_full_forward(perturb(full_model(hyper)), IDX)


@pytest.mark.parametrize("hyper", FULL_CASES, ids=FULL_IDS)
def test_full_save_load_round_trip_and_wrong_base(hyper, tmp_path):
    from minipeft.adapters import WEIGHTS_FILE
    from minipeft.safetensors_io import load_file
    m = perturb(full_model(hyper))
    save_adapter(m, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_FILE)
    assert set(saved) == {n for n, p in m.named_parameters() if p.requires_grad}  # the changed weights only
    loaded = load_adapter(tiny(), tmp_path)
    assert torch.equal(loaded(IDX), m(IDX))
    with pytest.raises(ValueError, match="different base model.*dim: adapter 64 vs model 32"):
        load_adapter(tiny(dim=32), tmp_path)


def test_full_short_training_run_lowers_the_loss():
    losses = train_losses(full_model({}), lr=3e-3)
    assert losses[-1] < losses[0] - 1.0, losses


def test_full_parameter_counts_and_memory_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    lines = []
    for hyper, expected in ((dict(), BASE_1B), (dict(targets=("layers.15.*",)), layer_weights(cfg))):
        with torch.device("meta"):
            m = Llama(cfg)
        apply_method(m, "full", **hyper)
        assert peft.count_parameters(m) == (expected, BASE_1B)
        lines.append(f"llama-3.2-1b full {hyper}: {peft.trainable_report(m).splitlines()[0]}")
    # the memory figures in full.py's docstring
    assert round(BASE_1B * (2 + 12) / 1e9, 1) == 17.3 and round(BASE_1B * 14 / 2**30, 1) == 16.1
    assert round(BASE_1B * 16 / 1e9, 1) == 19.8 and round(BASE_1B * 16 / 2**30, 1) == 18.4
    assert round(BASE_1B * 4 / 1e9, 1) == 4.9 and round(BASE_1B * 12 / 1e9, 1) == 14.8  # adapter/, train_state.pt
    from minipeft.toy import TOY_BASE
    with torch.device("meta"):
        assert peft.count_parameters(apply_method(Llama(LlamaConfig(**TOY_BASE)), "full"))[0] == 1_246_848
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ================================================================ the extra-loss hook in finetune.train_step


def test_extra_loss_hook_adds_its_gradient_and_sees_the_logits():
    """A term 0.5 ||w||^2 on one weight adds exactly w to that weight's gradient (SGD, lr 1: the step
    moves it by -w more) and nothing elsewhere; the reported loss stays the cross-entropy; a term
    with needs_logits makes the forward return its logits (to every term), else they get None."""
    from minipeft.finetune import train_step
    batch = (IDX[:, :-1], IDX[:, 1:], torch.ones_like(IDX[:, :-1]))
    runs, seen = [], []

    def penalty(model, forward, b, logits):
        seen.append(logits)
        return 0.5 * model.layers[1].mlp.down_proj.weight.square().sum()

    def peek(model, forward, b, logits):
        seen.append(logits)
        return logits.new_zeros(())
    peek.needs_logits = True

    for hooks in ((), (penalty,), (penalty, peek)):
        m = full_model(dict(targets=("layers.1.*",)))
        for fn in hooks:
            peft.add_extra_loss(m, fn)
        before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        bits, *_ = train_step(m, m, torch.optim.SGD(peft.param_groups(m, 1.0)), [batch], 0.0, torch.device("cpu"))
        runs.append((bits, before, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}))
    (bits0, before, plain), *hooked_runs = runs
    w = "layers.1.mlp.down_proj.weight"
    for bits, _, hooked in hooked_runs:
        assert bits == pytest.approx(bits0, rel=1e-6)  # with logits built, the loss goes through F.cross_entropy
        for n in plain:
            expected = -before[n] if n == w else torch.zeros_like(before[n])
            torch.testing.assert_close(hooked[n] - plain[n], expected, rtol=1e-5, atol=1e-6)
    assert seen[0] is None and seen[1] is seen[2] and torch.equal(seen[1], tiny()(batch[0]))


# ================================================================ AdaMix

from minipeft.methods import adamix  # noqa: E402
from minipeft.methods.adamix import ConsistencyLoss, MixtureBottleneck, symmetric_kl  # noqa: E402

ADAMIX_CASES = [dict(), dict(placement="parallel", share_up=True, n_experts=3)]
ADAMIX_IDS = ["houlsby-M4", "parallel-shared-up-M3"]


def adamix_model(hyper, seed=0, **overrides):
    return apply_method(tiny(seed, **overrides), "adamix", bottleneck=8, **hyper)


def mixtures(model):
    return [m for m in model.modules() if isinstance(m, MixtureBottleneck)]


def adamix_closed_form(cfg, placement="houlsby", k=64, M=4, share_up=False):
    d = cfg.dim
    per = M * (d * k + k) + (1 if share_up else M) * (d * k + d)
    return cfg.n_layers * (2 if placement == "houlsby" else 1) * per


@pytest.mark.parametrize("hyper", ADAMIX_CASES, ids=ADAMIX_IDS)
def test_adamix_identity_at_init_in_train_and_eval_mode(hyper):
    m, ref = adamix_model(hyper), tiny()(IDX)
    assert torch.equal(m(IDX), ref)
    assert torch.equal(m.train()(IDX), ref)  # every routed copy of W_up is 0 too
    mix = mixtures(m)[0]
    assert all(torch.equal(p[0], p[i]) for p in mix.parameters() for i in range(len(p)))  # copies start equal


def test_adamix_routes_at_random_in_training_and_averages_in_eval():
    m = perturb(adamix_model({}), scale=0.2).train()
    torch.manual_seed(3)
    a = m(IDX)
    torch.manual_seed(4)
    assert not torch.allclose(m(IDX), a)  # another draw, another pair of copies
    torch.manual_seed(3)
    assert torch.equal(m(IDX), a)
    # one training forward sends gradient to exactly one copy of each projection per mixture
    m.zero_grad()
    m(IDX).sum().backward()
    for mix in mixtures(m):
        for p in (mix.down_weight, mix.up_weight):
            assert sum(bool(g.abs().sum() > 0) for g in p.grad) == 1
    # eval: s f(h mean(W_down) + mean(b_down)) mean(W_up) + mean(b_up), the same for every call
    mix, h = mixtures(m.eval())[0], torch.randn(3, 64)
    wd, bd, wu, bu = (p.mean(0) for p in (mix.down_weight, mix.down_bias, mix.up_weight, mix.up_bias))
    torch.testing.assert_close(mix(h), F.gelu(h @ wd.T + bd) @ wu.T + bu)


@pytest.mark.parametrize("hyper", ADAMIX_CASES, ids=ADAMIX_IDS)
def test_adamix_gradients_only_on_the_mixtures(hyper):
    m = perturb(adamix_model(hyper))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    M, share = hyper.get("n_experts", 4), hyper.get("share_up", False)
    assert peft.count_parameters(m)[0] == adamix_closed_form(m.config, hyper.get("placement", "houlsby"), 8, M, share)
    assert_only_trainable_change(m)


@pytest.mark.parametrize("hyper", ADAMIX_CASES, ids=ADAMIX_IDS)
def test_adamix_merge_refuses_but_average_makes_one_adapter(hyper, tmp_path):
    m = perturb(adamix_model(hyper))
    out = m(IDX)
    with pytest.raises(NotImplementedError, match="cannot merge: adamix.*nonlinearity.*nothing was merged"):
        peft.merge(m)
    adamix.average(m)
    assert not mixtures(m) and not m.peft_extra_losses
    assert peft.count_parameters(m)[0] == bottleneck_closed_form(m.config, hyper.get("placement", "houlsby"), 8)
    torch.testing.assert_close(m(IDX), out, rtol=0, atol=1e-6)  # eval mode already used the averages
    save_adapter(m, tmp_path)  # saved and loaded as a plain bottleneck adapter
    loaded = load_adapter(tiny(), tmp_path)
    assert [c.method for c in loaded.peft_configs] == ["bottleneck_adapter"]
    assert torch.equal(loaded(IDX), m(IDX))


@pytest.mark.parametrize("hyper", ADAMIX_CASES, ids=ADAMIX_IDS)
def test_adamix_cached_decoding_equals_full_forward(hyper):
    assert_cached_decoding_equals_full_forward(perturb(adamix_model(hyper)), IDX)


@pytest.mark.parametrize("hyper", ADAMIX_CASES, ids=ADAMIX_IDS)
def test_adamix_save_load_round_trip_and_wrong_base(hyper, tmp_path):
    m = perturb(adamix_model({**hyper, "consistency_weight": 10.0}))
    save_adapter(m, tmp_path)
    loaded = load_adapter(tiny(), tmp_path)
    assert loaded.peft_configs == m.peft_configs
    assert [f.weight for f in loaded.peft_extra_losses] == [10.0]
    assert torch.equal(loaded(IDX), m(IDX))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


@pytest.mark.parametrize("method", ["adamix", "adamix_lora"])
def test_adamix_routing_survives_gradient_checkpointing(method):
    """Checkpointing re-runs each block in backward; it restores the RNG state first, so the
    recomputation draws the same copies and the gradients equal those without checkpointing."""
    grads = []
    for ckpt in (False, True):
        m = perturb(adamix_model({}) if method == "adamix" else adamix_lora_model({}), scale=0.2).train()
        m.grad_checkpoint = ckpt
        torch.manual_seed(5)
        _, loss = m(IDX[:, :-1], IDX[:, 1:])
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_symmetric_kl_by_hand():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731
    torch.testing.assert_close(symmetric_kl(a, b), 0.5 * (kl(pa, pb) + kl(pb, pa)))
    assert symmetric_kl(a, a) < 1e-7  # 0 up to rounding (log_softmax vs log(softmax))
    a.requires_grad_(True)
    symmetric_kl(a, b).backward()  # only a's log_softmax terms carry gradient (the targets are detached)
    a2 = a.detach().clone().requires_grad_(True)
    (0.5 * F.kl_div(F.log_softmax(a2, -1), pb, reduction="batchmean")).backward()
    torch.testing.assert_close(a.grad, a2.grad)


def test_adamix_consistency_term_compares_two_routings_on_answer_tokens():
    m = perturb(adamix_model(dict(consistency_weight=2.0)), scale=0.2).train()
    idx, targets = IDX[:, :-1], IDX[:, 1:].clone()
    targets[:, :4] = -100  # prompt tokens: left out
    (term,) = m.peft_extra_losses
    torch.manual_seed(7)
    first = m(idx)
    value = term(m, m, (idx, targets, torch.ones_like(idx)), first)
    torch.manual_seed(7)
    a = m(idx)
    b = m(idx)  # the draw the term made
    keep = targets != -100
    torch.testing.assert_close(value, 2.0 * symmetric_kl(a[keep], b[keep]))
    assert value > 0
    one = perturb(adamix_model(dict(n_experts=1)), scale=0.2).train()  # one copy: both forwards agree
    assert one.peft_extra_losses[0](one, one, (idx, targets, None), one(idx)) < 1e-7  # 0 up to rounding
    no_term = adamix_model(dict(consistency_weight=0.0))
    assert not no_term.__dict__.get("peft_extra_losses")
    adamix.average(no_term)  # nothing to drop
    both = apply_method(adamix_model({}), "adamix_lora", r=4)
    adamix.average(both)  # adamix_lora still trains with the term
    assert len(both.peft_extra_losses) == 1 and isinstance(both.peft_extra_losses[0], ConsistencyLoss)


def test_adamix_trains_through_train_step_with_the_consistency_term():
    from minipeft.finetune import train_step
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    batch = (data[:, :-1], data[:, 1:], torch.ones_like(data[:, :-1]))
    m = adamix_model(dict(placement="parallel")).train()
    calls = []
    real = m.peft_extra_losses[0]
    m.peft_extra_losses = [lambda *args: calls.append(1) or real(*args)]
    m.peft_extra_losses[0].needs_logits = True
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2))
    torch.manual_seed(0)
    losses = [train_step(m, m, opt, [batch], 1.0, torch.device("cpu"))[0] for _ in range(20)]
    assert len(calls) == 20 and losses[-1] < losses[0] - 0.4, losses  # bits/token
    # what is served, the averaged copies: measured 9.04 -> 8.29 bits/token
    assert m.eval()(batch[0], batch[1])[1].item() / math.log(2) < losses[0] - 0.5


def test_adamix_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    lines = []
    for hyper in (dict(), dict(share_up=True), dict(placement="parallel")):
        with torch.device("meta"):
            m = Llama(cfg)
        apply_method(m, "adamix", **hyper)
        trainable, total = peft.count_parameters(m)
        placement, share = hyper.get("placement", "houlsby"), hyper.get("share_up", False)
        assert trainable == adamix_closed_form(cfg, placement, 64, 4, share)
        assert total == BASE_1B + trainable
        lines.append(f"llama-3.2-1b adamix M=4 k=64 {hyper}: {peft.trainable_report(m).splitlines()[0]}")
    assert adamix_closed_form(cfg) == 33_824_768 == 4 * 8_456_192  # adamix.py's docstring; served: one adapter
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ================================================================ AdaMix over LoRA

from minipeft.methods.adamix_lora import MixtureLoRALinear  # noqa: E402

ALORA_CASES = [dict(), dict(share_a=True, n_experts=3, targets="all-linear")]
ALORA_IDS = ["qv-M4", "all-linear-shared-A-M3"]


def adamix_lora_model(hyper, seed=0):
    return apply_method(tiny(seed), "adamix_lora", **{"r": 4, "alpha": 8.0, **hyper})


def adamix_lora_closed_form(cfg, r, M, targets=("q_proj", "v_proj"), share_a=False, share_b=False):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = dict(q_proj=(q, cfg.dim), k_proj=(kv, cfg.dim), v_proj=(kv, cfg.dim), o_proj=(cfg.dim, q),
                  gate_proj=(cfg.ffn_dim, cfg.dim), up_proj=(cfg.ffn_dim, cfg.dim), down_proj=(cfg.dim, cfg.ffn_dim))
    leaves = shapes if targets == "all-linear" else targets
    return cfg.n_layers * sum((1 if share_a else M) * r * shapes[t][1] + (1 if share_b else M) * shapes[t][0] * r
                              for t in leaves)


@pytest.mark.parametrize("hyper", ALORA_CASES, ids=ALORA_IDS)
def test_adamix_lora_identity_at_init_and_counts(hyper):
    m, ref = adamix_lora_model(hyper), tiny()(IDX)
    assert torch.equal(m(IDX), ref) and torch.equal(m.train()(IDX), ref)
    M = hyper.get("n_experts", 4)
    targets = hyper.get("targets", ("q_proj", "v_proj"))
    expected = adamix_lora_closed_form(m.config, 4, M, targets, hyper.get("share_a", False))
    assert peft.count_parameters(m)[0] == expected


@pytest.mark.parametrize("hyper", ALORA_CASES, ids=ALORA_IDS)
def test_adamix_lora_gradients_only_on_the_copies(hyper):
    m = perturb(adamix_lora_model(hyper))
    assert {n.rsplit(".", 1)[-1] for n, p in m.named_parameters() if p.requires_grad} == {"experts_A", "experts_B"}
    assert_only_trainable_change(m)
    m.zero_grad()
    m.train()(IDX).sum().backward()  # stochastic routing: one copy of each factor gets gradient
    for mod in (mod for mod in m.modules() if isinstance(mod, MixtureLoRALinear)):
        assert sum(bool(g.abs().sum() > 0) for g in mod.experts_B.grad) == 1


@pytest.mark.parametrize("hyper", ALORA_CASES, ids=ALORA_IDS)
def test_adamix_lora_merges_the_averaged_update(hyper):
    m = perturb(adamix_lora_model(hyper))
    out, weights = m(IDX), {k: v.clone() for k, v in m.state_dict().items() if k.endswith("base.weight")}
    peft.merge(m)
    merged = m(IDX)
    assert (merged - out).abs().max() / out.abs().max() < 1e-5
    plain = tiny(seed=123)  # the merged base weights alone give these logits
    state = {k.replace(".base.", "."): v for k, v in m.state_dict().items()}
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    assert torch.equal(plain(IDX), merged)
    peft.unmerge(m)
    for k, w in weights.items():
        torch.testing.assert_close(m.state_dict()[k], w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("hyper", ALORA_CASES, ids=ALORA_IDS)
def test_adamix_lora_cached_decoding_equals_full_forward(hyper):
    assert_cached_decoding_equals_full_forward(perturb(adamix_lora_model(hyper)), IDX)


@pytest.mark.parametrize("hyper", ALORA_CASES, ids=ALORA_IDS)
def test_adamix_lora_save_load_round_trip_and_wrong_base(hyper, tmp_path):
    m = perturb(adamix_lora_model({**hyper, "loraplus_ratio": 4.0, "consistency_weight": 3.0}))
    save_adapter(m, tmp_path)
    loaded = load_adapter(tiny(), tmp_path)
    assert loaded.peft_configs == m.peft_configs and [f.weight for f in loaded.peft_extra_losses] == [3.0]
    assert all(mod.experts_B.lr_scale == 4.0 for mod in loaded.modules() if isinstance(mod, MixtureLoRALinear))
    assert torch.equal(loaded(IDX), m(IDX))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_adamix_lora_trains_through_train_step():
    from minipeft.finetune import train_step
    data = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(11))
    batch = (data[:, :-1], data[:, 1:], torch.ones_like(data[:, :-1]))
    m = adamix_lora_model(dict(targets="all-linear")).train()
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2))
    torch.manual_seed(0)
    losses = [train_step(m, m, opt, [batch], 1.0, torch.device("cpu"))[0] for _ in range(20)]
    assert losses[-1] < losses[0] - 0.3, losses  # bits/token, each step with its random routing
    # what is served, the averaged copies: measured 9.04 -> 8.27 bits/token
    assert m.eval()(batch[0], batch[1])[1].item() / math.log(2) < losses[0] - 0.5


def test_adamix_lora_parameter_counts_llama_1b_on_meta(capsys):
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    with torch.device("meta"):
        m = Llama(cfg)
    apply_method(m, "adamix_lora", r=8)
    trainable, total = peft.count_parameters(m)
    assert trainable == adamix_lora_closed_form(cfg, 8, 4) == 3_407_872 == 4 * 851_968  # adamix_lora.py's docstring
    assert total == BASE_1B + trainable
    with capsys.disabled():
        print(f"\nllama-3.2-1b adamix_lora r=8 M=4 q_proj,v_proj: {peft.trainable_report(m).splitlines()[0]}")
