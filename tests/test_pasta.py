"""PaSTA (special-token vectors at every layer) on the tiny seeded model (CPU, about a second)."""

import pytest
import torch

from minipeft import peft
from minipeft.adapters import apply_method, load_adapter, save_adapter
from minipeft.data import encode_example, pack
from minipeft.llama import Llama, LlamaConfig
from minipeft.methods.pasta import LLAMA3_SPECIALS, llama3_special_ids
from minipeft.tokenizer import Tokenizer
from helpers import assert_cached_decoding_equals_full_forward, tiny

TOK = Tokenizer.byte_level()
BOS, START, END, EOT = TOK.bos_id, TOK.start_header_id, TOK.end_header_id, TOK.eot_id


def chat_ids(text: str) -> list[int]:
    return TOK.encode_dialog_prompt([{"role": "user", "content": text}])


def perturbed(seed=0):
    m = apply_method(tiny(seed), "pasta")
    with torch.no_grad():
        m.token_adapter.vectors.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return m


def test_default_ids_are_llama3_specials_in_both_vocabularies():
    assert llama3_special_ids(512) == (BOS, START, END, EOT) == (256, 262, 263, 265)  # the toy's byte level
    assert llama3_special_ids(128256) == (128000, 128006, 128007, 128009)  # Llama 3's own
    assert TOK.encode("Question: 1 + 2?", bos=True)[0] == BOS  # the toy prompts start with <|begin_of_text|>
    assert {START, END, EOT} <= set(chat_ids("hi"))  # the chat format adds the three others
    m = apply_method(tiny(), "pasta")
    assert m.token_adapter.token_ids.tolist() == [256, 262, 263, 265]
    assert m.peft_configs[0].token_ids == (256, 262, 263, 265)  # recorded resolved
    assert len(LLAMA3_SPECIALS) == 4


def test_identity_at_init():
    idx = torch.tensor([chat_ids("What is 2 + 3?")])
    with torch.no_grad():
        assert torch.equal(apply_method(tiny(), "pasta")(idx), tiny()(idx))


def test_the_vector_of_layer_l_is_added_to_special_tokens_entering_layer_l():
    """A reference built from the base blocks: before layer l, add vectors[l, j] where idx == ids[j]."""
    m = perturbed()
    idx = torch.tensor([chat_ids("Sum 4 and 5"), chat_ids("Sum 6 and 7")])
    base = tiny()
    ids, vec = m.token_adapter.token_ids, m.token_adapter.vectors.detach()
    with torch.no_grad():
        x = base.embed_tokens(idx)
        cos, sin = base.rope(torch.arange(idx.shape[1]).expand_as(idx))
        for l, layer in enumerate(base.layers):
            for j, t in enumerate(ids):
                x[idx == t] += vec[l, j]
            x, _ = layer(x, cos, sin)
        torch.testing.assert_close(m(idx), base.lm_head(base.norm(x)), atol=1e-5, rtol=1e-5)
        # ordinary tokens change only through attention: a sequence without special tokens is untouched
        plain = torch.tensor([TOK.encode("no special token here")])
        assert torch.equal(m(plain), base(plain))
        assert (m(idx) - base(idx)).abs().max() > 1e-3


def test_only_the_vectors_train_and_base_is_bit_identical():
    m = apply_method(tiny(), "pasta")
    base = {k: v.clone() for k, v in tiny().state_dict().items()}
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["token_adapter.vectors"]
    opt = torch.optim.AdamW(peft.param_groups(m, 1e-2), lr=1e-2, weight_decay=0.1)
    idx = torch.tensor([TOK.encode("Question: 3 + 4?\nAnswer: 7", bos=True)])  # BOS is the only special
    for _ in range(2):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    grad = m.token_adapter.vectors.grad
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0  # only the ids present get a gradient
    assert all(torch.equal(m.state_dict()[k], v) for k, v in base.items())


def test_merge_is_refused_and_changes_nothing():
    m = perturbed()
    idx = torch.tensor([chat_ids("hi")])
    with torch.no_grad():
        before = m(idx)
    with pytest.raises(NotImplementedError, match="cannot merge: pasta at 'token_adapter' adds a vector at "
                                                  "special-token positions only.*nothing was merged"):
        peft.merge(m)
    with torch.no_grad():
        assert torch.equal(m(idx), before)


def test_kv_cache_generation_equals_full_forward():
    m = perturbed()
    idx = torch.tensor([chat_ids("Add 1 and 2")[:12], [BOS] + TOK.encode("Question: 9 - 3?")[:11]])
    with torch.no_grad():
        assert_cached_decoding_equals_full_forward(m, idx)


def test_packed_rows_equal_each_example_alone():
    m = perturbed()
    examples = [encode_example(TOK, dict(question="1 + 2?", answer="3"), fmt=f) for f in ("chat", "plain")]
    idx, _, seg = pack(examples, max_len=64)
    with torch.no_grad():
        packed = m(idx, segment_ids=seg)
        t = 0
        for x, _ in examples:
            alone = m(torch.tensor([x]))
            torch.testing.assert_close(packed[:1, t:t + len(x)], alone, atol=1e-5, rtol=1e-5)
            t += len(x)


def test_save_load_round_trip_and_wrong_base(tmp_path):
    m = perturbed()
    save_adapter(m, tmp_path)
    idx = torch.tensor([chat_ids("Add 1 and 2")])
    with torch.no_grad():
        assert torch.equal(load_adapter(tiny(), tmp_path)(idx), m(idx))
    with pytest.raises(ValueError, match="different base model.*n_layers: adapter 2 vs model 3"):
        load_adapter(tiny(n_layers=3), tmp_path)


def test_config_errors():
    with pytest.raises(ValueError, match=r"token_ids holds 512; ids must be integers in \[0, 512\)"):
        apply_method(tiny(), "pasta", token_ids=(256, 512))
    with pytest.raises(ValueError, match="repeats an id"):
        apply_method(tiny(), "pasta", token_ids=(256, 256))
    with pytest.raises(ValueError, match="token_adapter slot is already filled by SpecialTokenVectors"):
        apply_method(apply_method(tiny(), "pasta"), "pasta")
    with pytest.raises(ValueError, match="no room for Llama 3's 256 special tokens"):
        llama3_special_ids(100)


def test_parameter_count_closed_form_on_llama_3_2_1b():
    c = LlamaConfig.from_name("llama-3.2-1b")
    with torch.device("meta"):
        m = apply_method(Llama(c), "pasta")
    trainable, total = peft.count_parameters(m)
    assert trainable == c.n_layers * 4 * c.dim == 131_072  # L x n_ids x d, the four default specials
    assert total - trainable == 1_235_814_400
    assert f"{100 * trainable / (total - trainable):.4f}" == "0.0106"  # as the module docstring says
