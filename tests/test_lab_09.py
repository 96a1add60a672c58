"""Lab 09's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "09_pasta_infix"


ADD = "x = x + (idx == t)[..., None] * E[l, j]  # only where the token is ids[j]"
LAYER = "x, _ = layer(x, cos, sin)                     # the vector enters the layer"
SEEN = "infix_seen = reads[:, None, :, None].expand(B, 1, T, K_i.shape[1])"
INFIX_K = "k = torch.cat([K_i[None].expand(B, -1, -1, -1), k], 2)"


@pytest.mark.parametrize("plant, hint", [
    # build 1: PaSTA
    pytest.param([(ADD, "x = x + E[l, j]")], "added to every token", id="pasta-every-token"),
    pytest.param([(ADD, "x = x + (idx == j)[..., None] * E[l, j]")], "the index into ids", id="pasta-index"),
    pytest.param([(ADD, "x = x + (torch.arange(idx.shape[1]) == t)[..., None] * E[l, j]")],
                 "no vector was added", id="pasta-positions"),
    pytest.param([(ADD, "pass"), (LAYER, LAYER + "\n        for j, t in enumerate(ids):\n"
                                         "            x = x + (idx == t)[..., None] * E[l, j]")],
                 "after layer l", id="pasta-after-layer"),
    pytest.param([(ADD, "x = x + (idx == t)[..., None] * E[0, j]")], "layer 0's vectors", id="pasta-layer-0"),
    pytest.param([(ADD, "x = x + (idx == t)[..., None] * E[l, j].detach()")], "E got no gradient",
                 id="pasta-detached"),
    # build 2: infix attention
    pytest.param([(SEEN, "infix_seen = torch.ones_like(reads)[:, None, :, None].expand(B, 1, T, K_i.shape[1])")],
                 "the prompt positions see the infix", id="infix-seen-by-all"),
    pytest.param([(SEEN, "infix_seen = (~reads)[:, None, :, None].expand(B, 1, T, K_i.shape[1])")],
                 "shown to the prompt and hidden from the answer", id="infix-inverted"),
    pytest.param([(SEEN, "infix_seen = torch.zeros_like(reads)[:, None, :, None].expand(B, 1, T, K_i.shape[1])")],
                 "no query sees the infix", id="infix-seen-by-none"),
    pytest.param([(INFIX_K, "P = K_i.shape[1]\n    K_rot = apply_rope(K_i[None].expand(B, -1, -1, -1).transpose(1, 2), "
                            "cos[:, :P], sin[:, :P]).transpose(1, 2)\n    k = torch.cat([K_rot, k], 2)")],
                 "rotated by RoPE", id="infix-rope"),
    pytest.param([("causal = torch.ones(T, T, dtype=torch.bool).tril()", "causal = torch.ones(T, T, dtype=torch.bool)")],
                 "tokens see later tokens", id="infix-not-causal"),
    pytest.param([("y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)",
                   "k, v = k.repeat(1, H // Hkv, 1, 1), v.repeat(1, H // Hkv, 1, 1)\n"
                   "    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)")],
                 "tiled \\(repeat\\)", id="infix-kv-tiled"),
    # exercises
    pytest.param([("pasta_params_3b = 28 * 4 * 3072", "pasta_params_3b = 16 * 4 * 3072")], "is not it",
                 id="ex1-1b-layers"),
    pytest.param([(">= prompt_len - 1)[None]", ">= prompt_len)[None]")], "the prompt's last token must read",
                 id="ex2-from-first-answer-token"),
    pytest.param([(">= prompt_len - 1)[None]", ">= 0)[None]")], "a prompt position before", id="ex2-all"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
