"""Infix tuning ([x; INFIX; y]) on the tiny seeded model (CPU, about a second)."""

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.data import encode_example, pack
from minipeft.llama import Llama, LlamaConfig
from minipeft.tokenizer import Tokenizer
from helpers import tiny

TOK = Tokenizer.byte_level()
IDX = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
PROMPT_LEN = torch.tensor([5, 8])  # row b: tokens 0..p-1 are the prompt, the rest the answer


def answer_mask(idx=IDX, prompt_len=PROMPT_LEN):
    """True from the prompt's last token on (the positions that predict an answer token)."""
    return torch.arange(idx.shape[1])[None, :] >= (prompt_len - 1)[:, None]


def adapted(seed=0, **hyper):
    m = tiny(seed)
    torch.manual_seed(seed + 1)
    return apply_method(m, "infix_tuning", **{"infix_len": 3, **hyper})


def test_prompt_positions_do_not_see_the_infix_and_answer_positions_do():
    m, base = adapted(), tiny()
    mask = answer_mask()
    with torch.no_grad():
        out, ref = m(IDX, answer_mask=mask), base(IDX)
        torch.testing.assert_close(out[~mask], ref[~mask], atol=1e-6, rtol=0)  # causality: the infix comes later
        assert (out[mask] - ref[mask]).abs().amin(-1).max() > 1e-3  # every answer position reads it
        assert (out[mask] - ref[mask]).abs().max(-1).values.min() > 1e-4
        # no answer_mask and no targets: idx is all prompt, the base model
        torch.testing.assert_close(m(IDX), ref, atol=1e-6, rtol=0)


def test_infix_seen_by_every_position_is_prefix_tuning_with_the_same_keys_values():
    m = adapted()
    prefix = apply_method(tiny(), "prefix_tuning", prefix_len=3)
    with torch.no_grad():
        for a, b in zip(m.layers, prefix.layers):
            b.self_attn.kv_prefix.key.copy_(a.self_attn.kv_prefix.key)
            b.self_attn.kv_prefix.value.copy_(a.self_attn.kv_prefix.value)
        everywhere = torch.ones_like(IDX, dtype=torch.bool)
        torch.testing.assert_close(m(IDX, answer_mask=everywhere), prefix(IDX), atol=1e-6, rtol=0)


def test_answer_mask_defaults_to_the_targets_prompt_mask():
    m = adapted()
    targets = IDX.roll(-1, 1)
    targets[~answer_mask()] = -100  # as encode_example: the prompt's targets are -100 but the last one
    with torch.no_grad():
        logits, loss = m(IDX, targets)
        torch.testing.assert_close(logits, m(IDX, answer_mask=answer_mask()), atol=0, rtol=0)
        _, fast = m(IDX, targets, return_logits=False)  # the training/evaluation path
        torch.testing.assert_close(fast, loss, atol=1e-5, rtol=1e-5)
    m.train()
    m.grad_checkpoint = True  # the recomputed blocks get the mask too
    _, recomputed = m(IDX, targets)
    torch.testing.assert_close(recomputed, loss, atol=1e-5, rtol=1e-5)


def test_only_the_infix_trains_and_base_is_bit_identical():
    m = adapted()
    base = {k: v.clone() for k, v in tiny().state_dict().items()}
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names == [f"layers.{i}.self_attn.kv_prefix.{w}" for i in range(2) for w in ("key", "value")]
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2), lr=1e-2, weight_decay=0.1)
    targets = IDX.roll(-1, 1)
    targets[~answer_mask()] = -100
    for _ in range(2):
        _, loss = m(IDX, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base.items())


def test_merge_is_refused_and_changes_nothing():
    m = adapted()
    with torch.no_grad():
        before = m(IDX, answer_mask=answer_mask())
    with pytest.raises(NotImplementedError, match=r"cannot merge: infix_tuning at 'layers\.0\.self_attn\.kv_prefix' "
                                                  r"adds trainable keys/values .*nothing was merged"):
        peft.merge(m)
    with torch.no_grad():
        assert torch.equal(m(IDX, answer_mask=answer_mask()), before)


def test_kv_cache_generation_puts_the_infix_after_the_prompt():
    m = adapted()
    with torch.no_grad():
        for layer in m.layers:  # a louder infix, so that greedy tokens show whether it was read
            layer.self_attn.kv_prefix.value.mul_(5)
    mask = answer_mask(prompt_len=torch.tensor([6, 6]))
    with torch.no_grad():
        full = m(IDX, answer_mask=mask)
        m.setup_kv_cache(2, 16)  # prefill = the 6-token prompt, then one token at a time
        steps = [m(IDX[:, :6], cache_start=0, answer_mask=mask[:, :6])]
        steps += [m(IDX[:, t:t + 1], cache_start=t, answer_mask=mask[:, t:t + 1]) for t in range(6, 12)]
        m.clear_kv_cache()
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
        prompts = [IDX[0, :7].tolist(), IDX[1, :4].tolist()]  # ragged: left-padded inside generate
        for prompt, generated in zip(prompts, m.generate(prompts, max_new_tokens=5)):
            seq = list(prompt)
            for _ in range(5):  # greedy without the cache: the prompt's last token on read the infix
                reads = torch.arange(len(seq)) >= len(prompt) - 1
                seq.append(int(m(torch.tensor([seq]), answer_mask=reads[None])[0, -1].argmax()))
            assert generated == seq[len(prompt):]
        # the first new token already differs from the base model's: the prefill's last token read the infix
        assert all(a[0] != b[0] for a, b in zip(m.generate(prompts, 1), tiny().generate(prompts, 1)))


def test_packed_rows_give_each_example_its_own_boundary():
    m = adapted()
    examples = [encode_example(TOK, dict(question=q, answer=a)) for q, a in (("1 + 2?", "3"), ("10 - 4?", "6"))]
    idx, targets, seg = pack(examples, max_len=64)
    with torch.no_grad():
        packed = m(idx, targets, segment_ids=seg)[0]
        assert (packed - tiny()(idx, segment_ids=seg)).abs().max() > 1e-3  # the answers did read the infix
        t = 0
        for x, y in examples:
            alone = m(torch.tensor([x]), torch.tensor([y]))[0]
            torch.testing.assert_close(packed[:1, t:t + len(x)], alone, atol=1e-5, rtol=1e-5)
            t += len(x)


def test_save_load_round_trip_and_wrong_base(tmp_path):
    m = adapted()
    save_adapter(m, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_adapter(tiny(), tmp_path)(IDX, answer_mask=answer_mask()),
                           m(IDX, answer_mask=answer_mask()))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_config_errors_and_word_init():
    with pytest.raises(ValueError, match="kv_prefix is already filled by LayerPrefix"):
        apply_method(apply_method(tiny(), "prefix_tuning", prefix_len=2), "infix_tuning")
    with pytest.raises(ValueError, match=r"answer_mask must be a bool tensor shaped like idx \(2, 12\), got "
                                         r"torch.int64 \(2, 12\)"):
        adapted()(IDX, answer_mask=answer_mask().long())
    with pytest.raises(ValueError, match="infix_len must be >= 1, got 0"):
        apply_method(tiny(), "infix_tuning", infix_len=0)
    words = apply_method(tiny(), "infix_tuning", infix_len=3, init_token_ids=tuple(b"add"))
    ref = apply_method(tiny(), "prefix_tuning", prefix_len=3, init_token_ids=tuple(b"add"))
    assert torch.equal(words.layers[1].self_attn.kv_prefix.value, ref.layers[1].self_attn.kv_prefix.value)


def test_parameter_count_closed_form_on_llama_3_2_1b():
    c = LlamaConfig.from_name("llama-3.2-1b")
    with torch.device("meta"):
        m = apply_method(Llama(c), "infix_tuning", infix_len=10)
    assert peft.count_parameters(m)[0] == c.n_layers * 2 * 10 * c.n_kv_heads * c.head_dim == 163_840


def test_a_sparse_attention_pattern_is_refused_with_the_reason():
    torch.manual_seed(0)
    m = apply_method(tiny(attention="strided", sparse_block=3, sparse_summary=1), "infix_tuning", infix_len=2)
    with pytest.raises(ValueError, match="infix tuning .* does not run with a sparse attention pattern"):
        m(IDX, answer_mask=answer_mask())
