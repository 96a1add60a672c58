"""LLaMA-Adapter v1 (gated adaption prompts) and v2 (+ bias/scale on linears, trainable norms)."""

import math

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.llama import Llama, LlamaConfig, apply_rope
from minipeft.methods.llama_adapter import AdaptionPrompt, BiasScaleLinear, merge_bias_scale
from helpers import tiny

NORM_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight")


def adapted(version, seed=0, open_gates=False, **hyper):
    m = tiny(seed)
    torch.manual_seed(seed + 1)
    apply_method(m, "llama_adapter", version=version, prompt_len=3, **hyper)
    if open_gates:  # a trained-looking adapter: gates, scales and biases away from their init
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, AdaptionPrompt):
                    mod.gate.uniform_(-1.0, 1.0)
                elif isinstance(mod, BiasScaleLinear):
                    mod.adapter_scale.uniform_(0.5, 1.5)
                    mod.adapter_bias.normal_(0.0, 0.05)
    return m


def train_steps(m, steps, lr=3e-2):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4, 16), generator=g)  # a 16-token corner of the vocabulary: learnable
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    opt = torch.optim.AdamW(peft.param_groups(m, lr, weight_decay=0.01), lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = m(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- identity and the branch itself


@pytest.mark.parametrize("version", [1, 2])
def test_identity_at_init(version):
    m = adapted(version)
    idx = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(idx), tiny()(idx))  # tanh(0) = 0 gates; scale 1, bias 0: exactly the base model


def test_branch_is_a_separate_gated_softmax_over_unrotated_prompt_keys():
    m = adapted(1, open_gates=True)
    attn = m.layers[1].self_attn
    branch = attn.extra_branch
    q = torch.randn(2, 4, 5, 16)  # (B, n_heads, T, hd)
    K, hd = 3, 16
    k = attn.k_proj(branch.prompt).view(K, 2, hd).transpose(0, 1)  # (n_kv, K, hd): no RoPE applied
    v = attn.v_proj(branch.prompt).view(K, 2, hd).transpose(0, 1)
    k, v = k.repeat_interleave(2, dim=0), v.repeat_interleave(2, dim=0)  # query head h uses kv head h // 2
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)  # softmax over the K prompt keys only
    expected = torch.tanh(branch.gate).view(1, 4, 1, 1) * (probs @ v)
    torch.testing.assert_close(branch(q, attn), expected, atol=1e-6, rtol=1e-5)
    # the base softmax is untouched: attention with the branch = attention without it + o_proj(branch)
    x = torch.randn(2, 5, 64)
    cos, sin = m.rope(torch.arange(5).expand(2, -1))
    with torch.no_grad():
        y, _ = attn(x, cos, sin)
        attn.extra_branch = None
        y_base, _ = attn(x, cos, sin)
        attn.extra_branch = branch
        q = apply_rope(attn.q_proj(x).view(2, 5, 4, 16), cos, sin).transpose(1, 2)  # (B, n_heads, T, hd) after RoPE
        extra = attn.o_proj(branch(q, attn).transpose(1, 2).reshape(2, 5, 64))
        torch.testing.assert_close(y, y_base + extra, atol=1e-6, rtol=1e-5)
    # only the top L layers get a prompt
    assert [l.self_attn.extra_branch is not None for l in m.layers] == [True, True]
    assert [l.self_attn.extra_branch is not None for l in adapted(1, n_layers_adapted=1).layers] == [False, True]


# ---------------------------------------------------------------- gradients


def test_v1_trains_only_prompts_and_gates_base_bit_identical():
    m = adapted(1)
    base = {k: v.clone() for k, v in tiny().state_dict().items()}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == [f"layers.{i}.self_attn.extra_branch.{w}" for i in range(2) for w in ("prompt", "gate")]
    train_steps(m, 1)
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(trainable)
    # with the gate at exactly 0 only the gate gets a gradient on the first step; the prompt follows
    assert all(grads[f"layers.{i}.self_attn.extra_branch.gate"].abs().sum() > 0 for i in range(2))
    assert all(grads[f"layers.{i}.self_attn.extra_branch.prompt"].abs().sum() == 0 for i in range(2))
    train_steps(m, 1)
    assert all(m.layers[i].self_attn.extra_branch.prompt.grad.abs().sum() > 0 for i in range(2))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base.items())


def test_v2_also_trains_bias_scale_and_norms_other_base_weights_bit_identical():
    m = adapted(2)
    base = {k: v.clone() for k, v in tiny().state_dict().items()}
    train_steps(m, 2)
    for n, p in m.named_parameters():
        is_norm = n.endswith(NORM_SUFFIXES) or n == "norm.weight"
        ours = "extra_branch" in n or "adapter_bias" in n or "adapter_scale" in n
        assert (p.grad is not None) == (is_norm or ours), n
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, n
    state = {k.replace(".base.", "."): v for k, v in m.state_dict().items()}  # wrapped Linears hold the base at .base
    changed = {k for k, v in base.items() if not torch.equal(state[k], v)}
    assert changed == {k for k in base if k.endswith(NORM_SUFFIXES) or k == "norm.weight"}  # the norms, by design
    groups = peft.param_groups(m, 1e-3, weight_decay=0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for n, p in m.named_parameters():
        if p.requires_grad:  # scales and norms must not decay towards 0; biases follow convention
            assert (id(p) in no_decay) == ("extra_branch" not in n), n


# ---------------------------------------------------------------- generation and the prompt K/V cache


@pytest.mark.parametrize("version", [1, 2])
def test_kv_cache_generation_equals_full_forward(version):
    m = adapted(version, open_gates=True)
    with torch.no_grad():
        idx = torch.randint(0, 512, (2, 11))
        full = m(idx)
        assert (full - tiny()(idx)).abs().max() > 1e-3  # the branch is really on
        m.setup_kv_cache(2, 16)
        steps = [m(idx[:, :6], cache_start=0)] + [m(idx[:, t:t + 1], cache_start=t) for t in range(6, 11)]
        m.clear_kv_cache()
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
        prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]  # ragged: left-padded inside generate
        batched = m.generate(prompts, max_new_tokens=4)
        assert batched == [m.generate([p], max_new_tokens=4)[0] for p in prompts]
        seq = list(prompts[1])
        for tok in batched[1]:  # greedy tokens = argmax of a plain full forward
            assert m(torch.tensor([seq]))[0, -1].argmax().item() == tok
            seq.append(tok)


def test_prompt_kv_computed_once_per_generation_and_never_stale():
    m = adapted(1, open_gates=True)
    prompt_calls = []
    for layer in m.layers:  # count k_proj calls on the (K, dim) prompt, not on (B, T, dim) tokens
        layer.self_attn.k_proj.register_forward_hook(lambda mod, inp, out: prompt_calls.append(inp[0].dim() == 2))
    m.generate([[1, 2, 3], [4, 5]], max_new_tokens=5)
    assert sum(prompt_calls) == 2  # once per adapted layer for 5 decoding steps
    prompt_calls.clear()
    train_steps(m, 2)  # training recomputes every forward (grad enabled, no cache)
    assert sum(prompt_calls) == 2 * 2
    with torch.no_grad():  # the next generation sees the trained prompt, not the cached one
        seq = [1, 2, 3]
        for tok in m.generate([seq], max_new_tokens=3)[0]:
            assert m(torch.tensor([seq]))[0, -1].argmax().item() == tok
            seq.append(tok)


# ---------------------------------------------------------------- merge, save/load


@pytest.mark.parametrize("version", [1, 2])
def test_merge_is_refused_and_changes_nothing(version):
    m = adapted(version, open_gates=True)
    idx = torch.randint(0, 512, (1, 6))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        before = m(idx)
    with pytest.raises(NotImplementedError, match="cannot merge: llama_adapter .*gated softmax.*nothing was merged"):
        peft.merge(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(m(idx), before)


def test_v2_merges_bias_and_scale_with_the_prompts_still_active():
    m = adapted(2, open_gates=True)
    idx = torch.randint(0, 512, (2, 7))
    weights = {n: mod.base.weight.clone() for n, mod in m.named_modules() if isinstance(mod, BiasScaleLinear)}
    with torch.no_grad():
        before = m(idx)
        merge_bias_scale(m)
        merge_bias_scale(m)  # idempotent
        merged = m(idx)
        q = m.layers[0].self_attn.q_proj
        torch.testing.assert_close(q.base.weight, q.adapter_scale[:, None] * weights["layers.0.self_attn.q_proj"])
        torch.testing.assert_close(q.base.bias, q.adapter_scale * q.adapter_bias)
        assert ((merged - before).norm() / before.norm()).item() < 1e-5
        peft.unmerge(m)
        assert all(mod.base.bias is None for mod in m.modules() if isinstance(mod, BiasScaleLinear))
        for n, mod in m.named_modules():
            if isinstance(mod, BiasScaleLinear):
                torch.testing.assert_close(mod.base.weight, weights[n], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(m(idx), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_save_load_round_trip_and_wrong_base(version, tmp_path):
    m = adapted(version)
    train_steps(m, 3)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    idx = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), m(idx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="different base model.*dim: adapter 64 vs model 32"):
        load_adapter(tiny(dim=32), tmp_path)


# ---------------------------------------------------------------- training, sizes, errors


@pytest.mark.parametrize("version", [1, 2])
def test_training_lowers_the_loss(version):
    # the tiny random model's frozen lm_head bounds how far v1 can move the logits (measured: about -0.1
    # in 20 steps from ln(512) = 6.24); v2 trains the final norm too and goes further
    losses = train_steps(adapted(version), 20)
    assert losses[-1] < losses[0] - (0.05 if version == 1 else 0.2), losses


def adapter_count(c, K, L, version):
    v1 = L * (K * c.dim + c.n_heads)
    outs = c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim + 2 * c.dim + 2 * c.ffn_dim  # q k v o gate up down
    return v1 if version == 1 else v1 + c.n_layers * 2 * outs + (2 * c.n_layers + 1) * c.dim


def test_parameter_counts_match_closed_forms():
    c = LlamaConfig.from_name("tiny")
    for version in (1, 2):
        assert peft.count_parameters(adapted(version))[0] == adapter_count(c, 3, 2, version)
    assert peft.count_parameters(adapted(1, n_layers_adapted=1))[0] == adapter_count(c, 3, 1, 1)
    c = LlamaConfig.from_name("llama-3.2-1b")
    counts = {}
    with torch.device("meta"):
        for version in (1, 2):
            m = apply_method(Llama(c), "llama_adapter", version=version, prompt_len=10)
            counts[f"v{version} K=10 L=16"] = peft.count_parameters(m)[0]
            assert counts[f"v{version} K=10 L=16"] == adapter_count(c, 10, 16, version)
    print("\nllama-3.2-1b trainable parameters, llama_adapter:", counts)


def test_config_errors():
    with pytest.raises(ValueError, match="version must be 1 or 2, got 3"):
        apply_method(tiny(), "llama_adapter", version=3)
    with pytest.raises(ValueError, match="n_layers_adapted=5, the model has 2 layers"):
        apply_method(tiny(), "llama_adapter", n_layers_adapted=5)


def test_bf16_base_with_float32_adapters():
    for version in (1, 2):
        m = tiny().to(torch.bfloat16)
        apply_method(m, "llama_adapter", version=version, prompt_len=3)
        assert all(p.dtype == torch.float32 for n, p in m.named_parameters() if p.requires_grad and "norm" not in n)
        logits, loss = m(torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 6)))
        assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
        loss.backward()


def test_v2_bias_scale_is_the_papers_form_not_the_released_codes():
    """The documented choice (module docstring): y = s ⊙ (W x + b) with s, b of size out (Gao et al.
    2023), not the released chat65b code's W (s ⊙ x) + b (s of size in) nor multimodal7b's biases only."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4, bias=False)
    mod = BiasScaleLinear(base)
    with torch.no_grad():
        mod.adapter_scale.uniform_(0.5, 1.5)
        mod.adapter_bias.normal_()
    x = torch.randn(3, 6)
    s, b, W = mod.adapter_scale, mod.adapter_bias, base.weight
    assert s.shape == b.shape == (4,)
    torch.testing.assert_close(mod(x), s * (x @ W.T + b))
    assert not torch.allclose(mod(x), x @ W.T + b)  # the bias alone (multimodal7b) is another function
