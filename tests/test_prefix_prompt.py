"""Prefix tuning and prompt tuning on the tiny seeded model (CPU, seconds).

Neither is an identity at init, so instead of "identity" these tests pin what each one changes:
prompt tuning equals the base model run on [soft prompt; token embeddings]; a word-initialised
prefix equals the base model run with those words prepended (real tokens keep positions 0, 1, ...).
"""

import pytest
import torch
import torch.nn.functional as F

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods.prefix_tuning import LayerPrefix, PrefixTuningConfig, fold, tile
from minipeft.tokenizer import Tokenizer
from helpers import tiny

VARIANTS = {  # name -> (method, hyper-parameters)
    "prefix": ("prefix_tuning", dict(prefix_len=4)),
    "prefix_mlp": ("prefix_tuning", dict(prefix_len=4, mlp_hidden=16, mlp_input_dim=8)),
    "prompt": ("prompt_tuning", dict(prompt_len=5)),
}
METHOD_PARAM_PREFIXES = ("layers.0.self_attn.kv_prefix.", "layers.1.self_attn.kv_prefix.", "peft_shared.prefix_mlp.",
                         "input_prefix.")


def adapted(variant, seed=0):
    method, hyper = VARIANTS[variant]
    m = tiny(seed)
    torch.manual_seed(seed + 1)
    return apply_method(m, method, **hyper)


def train_steps(m, steps, lr=3e-2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 16, (4, 16), generator=g)  # a 16-token corner of the vocabulary: learnable by any method
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    opt = torch.optim.AdamW(peft.param_groups(m, lr), lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = m(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- what the methods change


def test_prompt_tuning_equals_base_model_on_prepended_embeddings():
    m = adapted("prompt")
    with torch.no_grad():
        m.input_prefix.embeddings.add_(torch.randn_like(m.input_prefix.embeddings))  # not vocab rows any more
    idx = torch.randint(0, 512, (2, 9))
    k, T = 5, 9
    # the reference: the plain base blocks on inputs_embeds = [soft prompt; embed(tokens)], positions -k..T-1
    x = torch.cat([m.input_prefix.embeddings.detach()[None].expand(2, -1, -1), m.embed_tokens(idx)], dim=1)
    cos, sin = m.rope(torch.arange(-k, T)[None])
    with torch.no_grad():
        for layer in m.layers:
            x, _ = layer(x, cos, sin)
        reference = m.lm_head(m.norm(x))[:, k:]
        torch.testing.assert_close(m(idx), reference, atol=1e-5, rtol=1e-5)
        base = tiny()(idx)
    assert (m(idx) - base).abs().max() > 1e-3  # and it is not the base model


def test_word_initialised_prefix_equals_words_prepended():
    words = Tokenizer.byte_level().encode("add")  # 3 tokens, tiled to P = 5: "addad"
    P = 5
    m = tiny()
    apply_method(m, "prefix_tuning", prefix_len=P, init_token_ids=tuple(words))
    ids = tile(words, P)
    assert ids == list(b"addad")
    # each layer's prefix is the base model's keys/values for those words (via the model's own input_prefix path)
    ref = tiny()
    apply_method(ref, "prompt_tuning", prompt_len=P, init_token_ids=tuple(words))
    with torch.no_grad():
        for layer, (k, v) in zip(m.layers, ref.run_input_prefix()):
            torch.testing.assert_close(layer.self_attn.kv_prefix.key, k[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(layer.self_attn.kv_prefix.value, v[0], atol=1e-6, rtol=0)
        # so the model equals the base model reading the words first; real tokens keep positions 0, 1, ...
        idx = torch.randint(0, 512, (2, 7))
        words_then_idx = torch.cat([torch.tensor(ids).expand(2, -1), idx], dim=1)
        base = tiny()(words_then_idx, positions=torch.arange(-P, 7).expand(2, -1))[:, P:]
        torch.testing.assert_close(m(idx), base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(idx), ref(idx), atol=1e-5, rtol=1e-5)  # = prompt tuning from the same words


def test_embedding_only_prefix_tuning_is_prompt_tuning():
    """Li & Liang's embedding-only ablation (section 7): the virtual tokens' activations are free at the
    input layer only and every deeper layer computes them with the frozen model. Built here from the
    paper's definition on the base blocks, it is minipeft's prompt tuning: the same function and the
    same P x dim parameters. It is also the special case of full prefix tuning whose per-layer keys and
    values are what the frozen model makes of those P input embeddings."""
    P, T = 4, 9
    prompt = apply_method(tiny(), "prompt_tuning", prompt_len=P)
    with torch.no_grad():
        prompt.input_prefix.embeddings.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    virtual = prompt.input_prefix.embeddings.detach().clone()  # (P, dim): the only free activations
    idx = torch.randint(0, 512, (2, T))
    base = tiny()
    with torch.no_grad():
        x = torch.cat([virtual[None].expand(2, -1, -1), base.embed_tokens(idx)], dim=1)  # layer 0: [P_e; x]
        cos, sin = base.rope(torch.arange(-P, T)[None])  # real tokens keep positions 0..T-1
        for layer in base.layers:  # every deeper activation, virtual tokens' included, by the frozen model
            x, _ = layer(x, cos, sin)
        embedding_only = base.lm_head(base.norm(x))[:, P:]
        torch.testing.assert_close(prompt(idx), embedding_only, atol=1e-5, rtol=1e-5)
        full = apply_method(tiny(), "prefix_tuning", prefix_len=P)  # free keys/values at every layer ...
        for layer, (k, v) in zip(full.layers, prompt.run_input_prefix()):
            layer.self_attn.kv_prefix.key.copy_(k[0])  # ... set to the frozen model's function of P_e
            layer.self_attn.kv_prefix.value.copy_(v[0])
        torch.testing.assert_close(full(idx), embedding_only, atol=1e-5, rtol=1e-5)
    c = base.config
    assert peft.count_parameters(prompt)[0] == P * c.dim  # embedding-only: P x dim
    assert peft.count_parameters(full)[0] == c.n_layers * 2 * P * c.n_kv_heads * c.head_dim  # full: per layer


def test_prefix_keeps_causality_packing_and_loss_masking():
    m = adapted("prefix")
    a = torch.randint(0, 512, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(0, 512, (4,))
    with torch.no_grad():
        torch.testing.assert_close(m(a)[:, :8], m(b)[:, :8])
        x, y = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 4))
        packed = m(torch.cat([x, y], 1), segment_ids=torch.tensor([[1] * 5 + [2] * 4]))
        torch.testing.assert_close(packed[:, :5], m(x), atol=1e-5, rtol=1e-5)  # each segment sees the prefix
        torch.testing.assert_close(packed[:, 5:], m(y), atol=1e-5, rtol=1e-5)
        targets = a.roll(-1, 1)
        targets[:, :6] = -100
        logits, loss = m(a, targets)
        torch.testing.assert_close(loss, F.cross_entropy(logits[0, 6:], targets[0, 6:]))


# ---------------------------------------------------------------- gradients, cache, merge, save/load


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_method_parameters_train_and_base_is_bit_identical(variant):
    m = adapted(variant)
    base = {k: v.clone() for k, v in tiny().state_dict().items()}
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert before and all(n.startswith(METHOD_PARAM_PREFIXES) for n in before)
    train_steps(m, 1)
    for n, p in m.named_parameters():
        if n in before:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None, n
    for k, v in base.items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_generation_equals_full_forward(variant):
    m = adapted(variant)
    with torch.no_grad():
        idx = torch.randint(0, 512, (2, 11))
        full = m(idx)
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_is_refused_and_changes_nothing(variant):
    m = adapted(variant)
    idx = torch.randint(0, 512, (1, 6))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        before = m(idx)
    with pytest.raises(NotImplementedError, match=rf"cannot merge: {VARIANTS[variant][0]} .*nothing was merged"):
        peft.merge(m)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(m(idx), before)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip_and_wrong_base(variant, tmp_path):
    m = adapted(variant)
    train_steps(m, 2)
    save_adapter(m, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    idx = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), m(idx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


# ---------------------------------------------------------------- reparameterisation, training, sizes


def test_prefix_mlp_fold_gives_identical_outputs_and_drops_the_mlp(tmp_path):
    m = adapted("prefix_mlp")
    train_steps(m, 2)
    idx = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        before = m(idx)
    fold(m)
    assert "prefix_mlp" not in m.peft_shared
    assert all(isinstance(l.self_attn.kv_prefix, LayerPrefix) and l.self_attn.kv_prefix.mlp is None for l in m.layers)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == [f"layers.{i}.self_attn.kv_prefix.{w}" for i in range(2) for w in ("key", "value")]
    assert peft.count_parameters(m)[0] == 2 * 2 * 4 * 2 * 16  # L * 2 * P * n_kv * hd
    with torch.no_grad():
        assert torch.equal(m(idx), before)
    save_adapter(m, tmp_path)  # the recorded config is the folded one, so a fresh base rebuilds it
    with torch.no_grad():
        assert torch.equal(load_adapter(tiny(), tmp_path)(idx), before)
    with pytest.raises(ValueError, match="no prefix-tuning MLP"):
        fold(m)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_lowers_the_loss(variant):
    # the tiny random model's frozen lm_head (std 0.02) bounds how far any of these can move the logits;
    # measured: about -0.1 (prompt) to -0.3 (prefix MLP) in 20 steps from ln(512) = 6.24
    losses = train_steps(adapted(variant), 20)
    assert losses[-1] < losses[0] - 0.05, losses


def test_parameter_counts_match_closed_forms():
    c = LlamaConfig.from_name("tiny")
    L, n_kv, hd, d = c.n_layers, c.n_kv_heads, c.head_dim, c.dim
    assert peft.count_parameters(adapted("prefix"))[0] == L * 2 * 4 * n_kv * hd
    k, h, P = 8, 16, 4  # P' (P, k) -> Linear(k, h) -> tanh -> Linear(h, L * 2 * n_kv * hd)
    assert peft.count_parameters(adapted("prefix_mlp"))[0] == P * k + (k * h + h) + (h + 1) * L * 2 * n_kv * hd
    assert peft.count_parameters(adapted("prompt"))[0] == 5 * d
    with torch.device("meta"):
        counts = {}
        for name, hyper in [("prefix_tuning", dict(prefix_len=10)),
                            ("prefix_tuning", dict(prefix_len=10, mlp_hidden=512)),
                            ("prompt_tuning", dict(prompt_len=20))]:
            m = apply_method(Llama(LlamaConfig.from_name("llama-3.2-1b")), name, **hyper)
            counts[f"{name} {hyper}"] = peft.count_parameters(m)[0]
    print("\nllama-3.2-1b trainable parameters:", counts)
    c = LlamaConfig.from_name("llama-3.2-1b")
    L, n_kv, hd, d = c.n_layers, c.n_kv_heads, c.head_dim, c.dim
    assert list(counts.values()) == [L * 2 * 10 * n_kv * hd,
                                     10 * d + (d * 512 + 512) + (512 + 1) * L * 2 * n_kv * hd,
                                     20 * d]


def test_bf16_base_with_float32_adapters():
    for variant in VARIANTS:
        m = tiny().to(torch.bfloat16)
        method, hyper = VARIANTS[variant]
        apply_method(m, method, **hyper)
        assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        logits, loss = m(torch.randint(0, 512, (2, 6)), torch.randint(0, 512, (2, 6)))
        assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
        loss.backward()


def test_config_errors():
    with pytest.raises(ValueError, match="init_token_ids needs mlp_hidden=0"):
        apply_method(tiny(), "prefix_tuning", mlp_hidden=8, init_token_ids=(1, 2))
    m = adapted("prompt")
    with pytest.raises(ValueError, match="input_prefix slot is already filled"):
        apply_method(m, "prompt_tuning")
    with pytest.raises(ValueError, match="kv_prefix is already filled"):
        apply_method(adapted("prefix"), "prefix_tuning")
    assert PrefixTuningConfig.method == "prefix_tuning"
