"""The Llama 3 decoder and its loaders, on a tiny seeded model (CPU, seconds)."""

import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from minipeft.llama import Llama, LlamaConfig, apply_rope, linear_cross_entropy, rope_frequencies, sample
from minipeft.meta_layout import half_to_interleaved, interleaved_to_half, save_meta
from minipeft.safetensors_io import load_file, read_header, save_file
from helpers import tiny


# ---------------------------------------------------------------- forward, masks, cache


def test_forward_shapes_and_loss():
    m = tiny()
    idx = torch.randint(0, 512, (2, 7))
    targets = idx.clone()
    targets[:, :3] = -100
    logits, loss = m(idx, targets)
    assert logits.shape == (2, 7, 512)
    expected = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 512), idx[:, 3:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_trains", [False, True])
def test_linear_cross_entropy_equals_plain_loss_and_gradients(dtype, head_trains):
    """Chunked loss (4 chunks of 5 rows, some targets ignored) == F.cross_entropy on the full logits,
    and so are the gradients w.r.t. the hidden states and (when it trains) the head weight."""
    torch.manual_seed(0)
    h = torch.randn(19, 16, dtype=dtype, requires_grad=True)
    w = (0.5 * torch.randn(50, 16)).to(dtype).requires_grad_(head_trains)
    t = torch.randint(0, 50, (19,))
    t[::4] = -100
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), t, ignore_index=-100)
    grads = torch.autograd.grad(3 * plain, [h, w] if head_trains else [h])
    chunked = linear_cross_entropy(h, w, t, chunk_elements=5 * 50)
    grads_chunked = torch.autograd.grad(3 * chunked, [h, w] if head_trains else [h])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(chunked, plain, **tol)
    for a, b in zip(grads_chunked, grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():  # evaluation path
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_elements=100), plain.detach(), **tol)
    assert linear_cross_entropy(h, w, torch.full_like(t, -100)).isnan()  # as F.cross_entropy


def test_forward_without_logits_gives_the_same_loss_and_gradients():
    m = tiny().train()
    idx = torch.randint(0, 512, (2, 9))
    targets = idx.roll(-1, 1)
    targets[:, :3] = -100
    logits, loss = m(idx, targets)
    grads = torch.autograd.grad(loss, [m.layers[0].self_attn.q_proj.weight, m.embed_tokens.weight])
    none, loss2 = m(idx, targets, return_logits=False)
    grads2 = torch.autograd.grad(loss2, [m.layers[0].self_attn.q_proj.weight, m.embed_tokens.weight])
    assert none is None
    torch.testing.assert_close(loss2, loss)
    for a, b in zip(grads2, grads):  # the tied embedding's gradient includes the head's part
        torch.testing.assert_close(a, b)


def test_causality():
    m = tiny()
    a = torch.randint(0, 512, (1, 12))
    b = a.clone()
    b[0, 8:] = torch.randint(0, 512, (4,))
    la, lb = m(a), m(b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert not torch.allclose(la[:, 8:], lb[:, 8:])


def test_cached_decoding_equals_full_forward():
    m = tiny()
    idx = torch.randint(0, 512, (2, 11))
    full = m(idx)
    m.setup_kv_cache(2, 16)
    steps = [m(idx[:, :6], cache_start=0)]
    for t in range(6, 11):
        steps.append(m(idx[:, t:t + 1], cache_start=t))
    m.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_sequences():
    m = tiny()
    a, b = torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 4))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[1] * 5 + [2] * 4])
    out = m(packed, segment_ids=seg)
    torch.testing.assert_close(out[:, :5], m(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], m(b), atol=1e-5, rtol=1e-5)


def test_ragged_batch_generation_equals_each_prompt_alone():
    m = tiny()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
    batched = m.generate(prompts, max_new_tokens=6)
    alone = [m.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    # and the greedy tokens are the argmax of a plain full forward, step by step
    seq = list(prompts[1])
    for tok in batched[1]:
        assert m(torch.tensor([seq]))[0, -1].argmax().item() == tok
        seq.append(tok)


def test_left_padded_logits_equal_unpadded():
    m = tiny()
    p = torch.randint(0, 512, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), p], dim=1)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(m(padded, segment_ids=seg)[:, 3:], m(p), atol=1e-5, rtol=1e-5)


def test_stop_tokens_and_max_new_tokens():
    m = tiny()
    free = m.generate([[1, 2, 3]], max_new_tokens=8)[0]
    assert len(free) == 8
    stopped = m.generate([[1, 2, 3]], max_new_tokens=8, stop_ids={free[2]})[0]
    assert stopped == free[:free.index(free[2])]


def test_sampling_top_p_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    # a nucleus smaller than the top token's probability leaves only the argmax
    assert all(sample(logits, 1.0, 0.05, g).item() == 1 for _ in range(20))
    draws = {sample(logits, 1.0, 1.0, g).item() for _ in range(300)}
    assert draws == {0, 1, 2, 3}
    assert sample(logits, 0.0, 1.0).item() == 1
    m = tiny()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert (m.generate([[1, 2]], 6, temperature=1.0, generator=g1)
            == m.generate([[1, 2]], 6, temperature=1.0, generator=g2))


# ---------------------------------------------------------------- configs, RoPE, sizes


def test_llama32_1b_parameter_count():
    with torch.device("meta"):
        m = Llama(LlamaConfig.from_name("llama-3.2-1b"))
    assert sum(p.numel() for p in m.parameters()) == 1_235_814_400
    assert m.lm_head.weight is m.embed_tokens.weight


def test_llama3_rope_scaling_for_1b():
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    got = rope_frequencies(cfg).double()
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert len(got) == 32
    kept = torch.isclose(got, base, rtol=1e-6)
    divided = torch.isclose(got, base / 32, rtol=1e-6)
    assert (kept.sum().item(), divided.sum().item()) == (15, 14)
    smoothed = ~(kept | divided)
    assert smoothed.sum().item() == 3
    for i in smoothed.nonzero().flatten().tolist():  # the interpolation formula, term by term
        wavelen = 2 * math.pi / base[i].item()
        s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        assert 0 < s < 1
        assert got[i].item() == pytest.approx((1 - s) * base[i].item() / 32 + s * base[i].item(), rel=1e-6)
    assert LlamaConfig.from_name("llama-3.1-8b").rope_scaling["factor"] == 8.0


def test_meta_ffn_sizes_and_hf_config():
    meta = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
                multiple_of=256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    cfg = LlamaConfig.from_meta(meta)
    assert cfg.ffn_dim == 8192 and cfg.rope_scaling["factor"] == 32.0
    assert LlamaConfig.from_meta(dict(meta, dim=4096, n_layers=32, ffn_dim_multiplier=1.3, multiple_of=1024)).ffn_dim == 14336
    assert LlamaConfig.from_meta(dict(meta, dim=3072, n_heads=24, ffn_dim_multiplier=1.0)).ffn_dim == 8192
    preset = LlamaConfig.from_name("llama-3.2-1b")
    assert LlamaConfig.from_hf(preset.to_hf()) == preset


def test_meta_interleaved_rope_matches_half_split_after_permutation():
    """Meta rotates adjacent pairs (complex numbers); HF rotates (i, i+hd/2). Permuting the q/k rows
    must make the two agree, which is what loading a Meta checkpoint relies on."""
    torch.manual_seed(0)
    n_heads, hd, dim, T = 2, 8, 16, 5
    w_meta = torch.randn(n_heads * hd, dim)
    x = torch.randn(T, dim)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv  # (T, hd/2)
    q = (x @ w_meta.T).view(T, n_heads, hd // 2, 2)
    q_meta = torch.view_as_real(torch.view_as_complex(q) * torch.polar(torch.ones_like(ang), ang)[:, None])
    q_meta = q_meta.reshape(T, n_heads, hd)
    q_hf = (x @ interleaved_to_half(w_meta, n_heads).T).view(1, T, n_heads, hd)
    cos, sin = torch.cat([ang, ang], -1).cos()[None, :, None], torch.cat([ang, ang], -1).sin()[None, :, None]
    q_hf = apply_rope(q_hf, cos, sin)[0]
    scores_meta = torch.einsum("thd,shd->hts", q_meta, q_meta)
    scores_hf = torch.einsum("thd,shd->hts", q_hf, q_hf)
    torch.testing.assert_close(scores_meta, scores_hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(half_to_interleaved(interleaved_to_half(w_meta, n_heads), n_heads), w_meta)


# ---------------------------------------------------------------- loaders


def test_hf_and_meta_layouts_load_to_identical_logits(tmp_path):
    m = tiny(seed=1)
    idx = torch.randint(0, 512, (2, 9))
    expected = m(idx)
    m.save_pretrained(tmp_path / "hf")
    save_meta(m, tmp_path / "meta")
    assert not (tmp_path / "hf" / "config.json").read_text().count("lm_head")
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    raw = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert not torch.equal(raw["layers.0.attention.wq.weight"], m.layers[0].self_attn.q_proj.weight)  # interleaved
    for sub in ("hf", "meta"):
        loaded = Llama.from_pretrained(tmp_path / sub)
        torch.testing.assert_close(loaded(idx), expected, atol=1e-5, rtol=1e-5)
        assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()


def test_untied_and_sharded_hf_layout(tmp_path):
    m = tiny(seed=2, tie_embeddings=False)
    m = Llama(m.config).eval()  # rebuild untied
    m.save_pretrained(tmp_path, max_shard_bytes=60_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]
    loaded = Llama.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() != loaded.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, 512, (1, 6))
    torch.testing.assert_close(loaded(idx), m(idx))
    save_meta(m, tmp_path / "meta")
    torch.testing.assert_close(Llama.from_pretrained(tmp_path / "meta")(idx), m(idx), atol=1e-5, rtol=1e-5)


def test_bf16_roundtrip_and_dtype_device_arguments(tmp_path):
    m = tiny(seed=3).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    assert read_header(tmp_path / "model.safetensors")[0]["model.norm.weight"]["dtype"] == "BF16"
    same = Llama.from_pretrained(tmp_path)
    assert same.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(same.layers[1].mlp.up_proj.weight, m.layers[1].mlp.up_proj.weight)
    f32 = Llama.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    assert f32.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def test_safetensors_reader_matches_format_byte_for_byte(tmp_path):
    """Build a file by hand from the format description and read it back."""
    data = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data.numpy().tobytes())
    assert torch.equal(load_file(tmp_path / "x.safetensors")["w"], data)
    save_file({"w": data, "b": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "y.safetensors")
    back = load_file(tmp_path / "y.safetensors")
    assert torch.equal(back["w"], data) and back["b"].dtype == torch.bfloat16


# ---------------------------------------------------------------- error paths


def _saved(tmp_path, seed=0):
    tiny(seed).save_pretrained(tmp_path)
    return tmp_path


def test_error_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown checkpoint layout"):
        Llama.from_pretrained(tmp_path)


def test_error_truncated_and_corrupt_safetensors(tmp_path):
    path = _saved(tmp_path) / "model.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        Llama.from_pretrained(tmp_path)
    path.write_bytes(good[:5])
    with pytest.raises(ValueError, match="not a safetensors file"):
        Llama.from_pretrained(tmp_path)
    path.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    with pytest.raises(ValueError, match="corrupt safetensors header: header length"):
        Llama.from_pretrained(tmp_path)
    n = struct.unpack("<Q", good[:8])[0]
    path.write_bytes(good[:8] + b"{" * n + good[8 + n:])
    with pytest.raises(ValueError, match="invalid JSON"):
        Llama.from_pretrained(tmp_path)


def test_error_missing_unexpected_and_shape(tmp_path):
    _saved(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    bad = {k: v.clone() for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    bad["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.safetensors.*missing keys \['layers\.1\.mlp\.up_proj\.weight'\]"
                                       r".*unexpected keys \['layers\.0\.extra\.weight'\]"):
        Llama.from_pretrained(tmp_path)
    bad = {k: v.clone() for k, v in state.items()}
    bad["model.norm.weight"] = torch.ones(65)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'norm\.weight' has shape \(65,\), the config expects \(64,\)"):
        Llama.from_pretrained(tmp_path)


def test_error_config_disagrees_with_weights(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    json.dump(dict(cfg, num_hidden_layers=3), open(tmp_path / "config.json", "w"))
    with pytest.raises(KeyError, match=r"missing keys \['layers\.2\."):
        Llama.from_pretrained(tmp_path)
    json.dump(dict(cfg, intermediate_size=100), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"gate_proj\.weight' has shape \(192, 64\), the config expects \(100, 64\)"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        Llama.from_pretrained(tmp_path)


def test_error_meta_layout(tmp_path):
    save_meta(tiny(), tmp_path)
    raw = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    raw["layers.0.attention.wz.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "consolidated.00.pth")
    with pytest.raises(KeyError, match=r"consolidated\.00\.pth: unexpected key 'layers\.0\.attention\.wz\.weight'"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.00\.pth is missing"):
        Llama.from_pretrained(tmp_path)


def test_meta_pth_refuses_arbitrary_pickles(tmp_path):
    save_meta(tiny(), tmp_path)
    torch.save({"tok_embeddings.weight": torch.zeros(1), "evil": object()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        Llama.from_pretrained(tmp_path)


# ---------------------------------------------------------------- memory


LOAD_RSS = textwrap.dedent("""
    import sys, torch
    from minipeft.llama import Llama
    def status(key):  # bytes, from /proc/self/status
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
    Llama.from_pretrained(sys.argv[2])(torch.ones(1, 4, dtype=torch.long))  # pay one-off costs first
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    m = Llama.from_pretrained(sys.argv[1])
    for p in m.parameters():  # touch every page of every weight, without allocating copies
        p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    print(status("VmHWM") - base, nbytes)
""")


def _load_overhead(path):
    warm = path / "warmup"
    tiny().to(torch.bfloat16).save_pretrained(warm)
    out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(path), str(warm)], capture_output=True, text=True, check=True)
    used, nbytes = map(int, out.stdout.split())
    assert used > 0.5 * nbytes, "the weights were not all read (measurement broken?)"
    return used / nbytes


@pytest.mark.slow  # ~10 s: writes and reads ~100 MB; `make test-slow`
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the RSS peak")
def test_bf16_load_needs_about_its_weight_bytes(tmp_path):
    """~100 MB of bf16 weights: peak RSS growth while loading stays under 1.3x the weight bytes."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, dim=768, n_layers=6, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                      rope_scaling=None)
    Llama(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    ratio = _load_overhead(tmp_path)
    print(f"~125 MB bf16 load: peak RSS growth = {ratio:.3f} x weight bytes")
    assert ratio < 1.3, f"loading used {ratio:.2f}x the weight bytes"


@pytest.mark.slow
def test_llama32_1b_bf16_load_memory(tmp_path):
    """The real 1B shape (random weights, 2.47 GB bf16)."""
    with torch.device("meta"):
        m = Llama(LlamaConfig.from_name("llama-3.2-1b"))
    state = {f"model.{k}": torch.randn(v.shape, dtype=torch.bfloat16) * 0.02
             for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors")
    json.dump(m.config.to_hf(), open(tmp_path / "config.json", "w"))
    del state
    ratio = _load_overhead(tmp_path)
    print(f"1B bf16 load: peak RSS growth = {ratio:.3f} x weight bytes")
    assert ratio < 1.3
