"""config.json as transformers 4.x and 5.x write it, and the strict reading of every field.

The two forms below copy the key layout of `LlamaConfig.to_dict()` (4.x: top-level `rope_theta` +
`rope_scaling`, `torch_dtype`; 5.x: `rope_parameters` holding theta, type and the llama3 numbers,
`dtype`), with the values of a tiny model. Both must give the same RoPE frequencies and logits.
The key sets were checked against the config.json that transformers 5.24 and 4.57 `save_pretrained`
write for this tiny model (4.57 already writes `dtype`; 4.45, which wrote the published Llama 3.2
configs, `torch_dtype`); minipeft's logits matched both libraries' to 4.8e-7."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny
from minipeft.llama import Llama, LlamaConfig, rope_frequencies

# llama3 scaling with a short original context, so that the tiny head's frequencies are really scaled
V4_CONFIG = """{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 192,
  "max_position_embeddings": 512,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 64,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "float32",
  "transformers_version": "4.45.0",
  "use_cache": true,
  "vocab_size": 512
}"""

V5_CONFIG = """{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "dtype": "float32",
  "eos_token_id": 128001,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initializer_range": 0.02,
  "intermediate_size": 192,
  "max_position_embeddings": 512,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "pad_token_id": null,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
    "rope_type": "llama3"
  },
  "tie_word_embeddings": true,
  "transformers_version": "5.0.0",
  "use_cache": true,
  "vocab_size": 512
}"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """model.safetensors of the tiny model (tied head), to pair with either config.json."""
    path = tmp_path_factory.mktemp("weights")
    tiny().save_pretrained(path)
    return path / "model.safetensors"


def checkpoint(tmp_path: Path, weights: Path, config: str | dict, name: str = "ckpt") -> Path:
    path = tmp_path / name
    path.mkdir()
    shutil.copy(weights, path / "model.safetensors")
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_v4_and_v5_forms_give_the_same_frequencies_and_logits(tmp_path, weights):
    m4 = Llama.from_pretrained(checkpoint(tmp_path, weights, V4_CONFIG, "v4"))
    m5 = Llama.from_pretrained(checkpoint(tmp_path, weights, V5_CONFIG, "v5"))
    assert m5.config == m4.config and m5.config.rope_theta == 500000.0
    assert m5.config.rope_scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=64)
    assert torch.equal(rope_frequencies(m4.config), rope_frequencies(m5.config))
    idx = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m5(idx), m4(idx), rtol=0, atol=0)
    # what ignoring rope_parameters gave (theta 10000, no scaling) is a different function
    plain = Llama.from_pretrained(checkpoint(tmp_path, weights, dict(json.loads(V5_CONFIG), rope_parameters=None),
                                             "ignored"))
    assert plain.config.rope_theta == 10000.0 and plain.config.rope_scaling is None
    assert (plain(idx) - m5(idx)).abs().max() > 1e-3


def test_v5_default_rope_type_and_v4_without_scaling_are_plain_rope():
    v5 = dict(json.loads(V5_CONFIG), rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    v4 = dict(json.loads(V4_CONFIG), rope_theta=10000.0, rope_scaling=None)
    assert LlamaConfig.from_hf(v5) == LlamaConfig.from_hf(v4)
    assert LlamaConfig.from_hf(v5).rope_scaling is None and LlamaConfig.from_hf(v5).rope_theta == 10000.0
    # 5.x writers may leave a null rope_theta beside rope_parameters
    assert LlamaConfig.from_hf(dict(v5, rope_theta=None)).rope_theta == 10000.0


def test_missing_fields_take_transformers_defaults():
    cfg = LlamaConfig.from_hf({"model_type": "llama"})
    assert (cfg.vocab_size, cfg.dim, cfg.ffn_dim, cfg.n_layers, cfg.n_heads) == (32000, 4096, 11008, 32, 32)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps, cfg.rope_theta) == (32, 128, 1e-6, 10000.0)
    assert (cfg.rope_scaling, cfg.max_seq_len, cfg.tie_embeddings) == (None, 2048, False)
    # transformers types num_key_value_heads / head_dim `int | None`: null means derived
    cfg = LlamaConfig.from_hf(dict(json.loads(V4_CONFIG), num_key_value_heads=None, head_dim=None))
    assert (cfg.n_kv_heads, cfg.head_dim) == (4, 16)


V4 = json.loads(V4_CONFIG)
BAD_CONFIGS = [  # (what changes in the 4.x config, the field the error must name)
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps"),
    (dict(rope_theta=None), "rope_theta"),
    (dict(rope_scaling="x"), "rope_scaling"),
    (dict(rope_scaling={k: v for k, v in V4["rope_scaling"].items() if k != "low_freq_factor"}), "low_freq_factor"),
    (dict(rope_scaling=dict(V4["rope_scaling"], rope_type="yarn")), "rope_type"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_key_value_heads=3), "n_kv_heads"),
    (dict(vocab_size=512.0), "vocab_size"),
    (dict(model_type="mistral"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters=dict(rope_theta=5e5, rope_type="default", partial_rotary_factor=0.5)), "partial_rotary_factor"),
    (dict(rope_parameters=dict(rope_theta=1e4, rope_type="default")), "rope_theta"),  # contradicts the top-level one
]


@pytest.mark.parametrize("change, field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_a_bad_field_is_one_clear_error_naming_the_file_and_field(tmp_path, weights, change, field):
    path = checkpoint(tmp_path, weights, dict(V4, **change))
    with pytest.raises(ValueError, match=rf"config\.json.*{field}") as e:
        Llama.from_pretrained(path)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)


def test_a_config_that_is_not_an_object(tmp_path, weights):
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got a JSON list"):
        Llama.from_pretrained(checkpoint(tmp_path, weights, "[1, 2]"))


def test_head_dim_inconsistent_with_the_weights(tmp_path, weights):
    with pytest.raises(ValueError, match=r"q_proj\.weight' has shape \(64, 64\), the config expects \(128, 64\)"):
        Llama.from_pretrained(checkpoint(tmp_path, weights, dict(V4, head_dim=32)))


def test_tied_config_with_a_different_head_is_an_error(tmp_path):
    untied = tiny(tie_embeddings=False)
    untied.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(json.loads((tmp_path / "config.json").read_text()),
                                                          tie_word_embeddings=True)))
    with pytest.raises(ValueError, match=r"config\.json: tie_word_embeddings is true, but .*model\.safetensors "
                                         r"holds an lm_head\.weight that differs"):
        Llama.from_pretrained(tmp_path)
    # a tied checkpoint that still carries an identical copy of the head loads (and stays tied)
    model = tiny()
    from minipeft.safetensors_io import load_file, save_file
    model.save_pretrained(tmp_path / "copy")
    state = load_file(tmp_path / "copy" / "model.safetensors")
    save_file(dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"].clone()}),
              tmp_path / "copy" / "model.safetensors")
    loaded = Llama.from_pretrained(tmp_path / "copy")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_home_folder_is_expanded_and_a_missing_folder_says_so(tmp_path, monkeypatch, weights):
    checkpoint(tmp_path, weights, V4_CONFIG, "models")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Llama.from_pretrained("~/models").config.dim == 64
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Llama.from_pretrained(os.path.join(str(tmp_path), "nope"))
