"""Lab 05's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "05_prefix_prompt_adapter"


PREFIX_KEYS = "keys = torch.cat([k_p.expand(B, -1, -1, -1), k], 2)"
PREFIX_HIDE = "hide = F.pad(future, (k_p.shape[2], 0))"
PROMPT_CAT = "x = torch.cat([prompt.expand(B, -1, -1), model.embed_tokens(idx)], 1)"
MLP_ROWS = "rows = out(torch.tanh(hidden(prefix_input)))"
MLP_RETURN = "return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)"
GATE_INIT = "self.gate = nn.Parameter(torch.zeros(n_heads))"
GATED = "return torch.tanh(self.gate).view(1, -1, 1, 1) * (weights @ v_p)"
BITFIT_BIAS = "self.bias = nn.Parameter(torch.zeros(base.out_features))  # b = 0: the base"


@pytest.mark.parametrize("plant, hint", [
    # build 1: the attention with a prefix
    pytest.param([(PREFIX_KEYS, "P = k_p.shape[2]\n    k_p = apply_rope(k_p.transpose(1, 2), cos[:1, :P], "
                                "sin[:1, :P]).transpose(1, 2)\n    " + PREFIX_KEYS)],
                 "prefix keys were rotated by RoPE", id="prefix-rope"),
    pytest.param([(PREFIX_HIDE, "hide = torch.ones(T, T + k_p.shape[2], dtype=torch.bool).triu(1)")],
                 "shifted by the P prefix columns", id="prefix-mask-unshifted"),
    pytest.param([("t.repeat_interleave(H // Hkv, 1)", "t.repeat(1, H // Hkv, 1, 1)")],
                 "tiled \\(repeat\\)", id="prefix-kv-tiled"),
    pytest.param([("q = apply_rope(attn.q_proj(x).view(B, T, H, d), cos, sin)",
                   "q = attn.q_proj(x).view(B, T, H, d)")],
                 "RoPE is the identity", id="prefix-q-not-rotated"),
    pytest.param([(PREFIX_KEYS, "keys = torch.cat([k_p.detach().expand(B, -1, -1, -1), k], 2)")],
                 "k_p got no gradient", id="prefix-detached"),
    # build 2: prompt tuning
    pytest.param([(PROMPT_CAT, "x = torch.cat([model.embed_tokens(idx), prompt.expand(B, -1, -1)], 1)"),
                  ("model.norm(x[:, k:])", "model.norm(x[:, :T])")], "BEFORE the tokens", id="prompt-after"),
    pytest.param([("model.norm(x[:, k:])", "model.norm(x[:, :T])")], "the first T positions", id="prompt-slice"),
    pytest.param([("model.lm_head(model.norm(x[:, k:]))", "model.lm_head(x[:, k:])")], "final RMSNorm",
                 id="prompt-no-norm"),
    pytest.param([(PROMPT_CAT, "x = torch.cat([prompt.detach().expand(B, -1, -1), model.embed_tokens(idx)], 1)")],
                 "the prompt got no gradient", id="prompt-detached"),
    # build 3: LLaMA-Adapter's branch
    pytest.param([(GATE_INIT, "self.gate = nn.Parameter(torch.ones(n_heads))")], "the zero gate is the point",
                 id="adapter-gate-ones"),
    pytest.param([(GATE_INIT, "self.gate = nn.Parameter(torch.full((n_heads,), 0.01))")], "must start at 0",
                 id="adapter-gate-small"),
    pytest.param([("self.prompt = nn.Parameter(torch.randn(K, dim))",
                   "self.prompt = nn.Parameter(torch.zeros(K, dim))")],
                 "the prompt is all zeros", id="adapter-prompt-zeros"),
    pytest.param([("self.prompt = nn.Parameter(torch.randn(K, dim))",
                   "self.prompt = nn.Parameter(0.02 * torch.randn(K, dim))")], "start it N\\(0, 1\\)",
                 id="adapter-prompt-small"),
    pytest.param([(GATED, "return self.gate.view(1, -1, 1, 1) * (weights @ v_p)")], "through tanh",
                 id="adapter-no-tanh"),
    pytest.param([("return t.repeat_interleave(rep, 0)", "return t.repeat(rep, 1, 1)")], "tiled \\(repeat\\)",
                 id="adapter-kv-tiled"),
    pytest.param([(GATE_INIT, "self.gate = nn.Parameter(torch.zeros(1))")], "one gate per query head",
                 id="adapter-one-gate"),
    # build 4: the prefix MLP
    pytest.param([(MLP_ROWS, "rows = out(torch.tanh(torch.tanh(hidden(prefix_input))))")],
                 "tanh is applied twice", id="mlp-tanh-twice"),
    pytest.param([(MLP_ROWS, "rows = out(torch.tanh(hidden(torch.tanh(hidden(prefix_input)))))")],
                 "through `hidden` \\(and the tanh\\) twice", id="mlp-hidden-twice"),
    pytest.param([(MLP_ROWS, "rows = torch.tanh(out(torch.tanh(hidden(prefix_input))))")],
                 "a tanh after `out`", id="mlp-tanh-after-out"),
    pytest.param([(MLP_RETURN, "return kv[:, 1].transpose(0, 1), kv[:, 0].transpose(0, 1)")],
                 "keys and values are swapped", id="mlp-kv-swapped"),
    pytest.param([("kv = rows.view(P, -1, 2, n_kv, head_dim)[:, layer]",
                   "kv = rows.view(P, 2, -1, n_kv, head_dim)[:, :, layer]")], "split by layer first",
                 id="mlp-layout"),
    # build 5: BitFit
    pytest.param([(BITFIT_BIAS, "self.bias = nn.Parameter(torch.randn(base.out_features))")],
                 "must start at zero", id="bitfit-random"),
    pytest.param([(BITFIT_BIAS, "self.bias = nn.Parameter(torch.full((base.out_features,), 123.0))")],
                 "must start at zero", id="bitfit-123"),
    pytest.param([(BITFIT_BIAS, "self.bias = nn.Parameter(torch.zeros(base.in_features))")],
                 "added to the output", id="bitfit-in-features"),
    pytest.param([(BITFIT_BIAS, "self.bias = nn.Parameter(torch.zeros(base.out_features), requires_grad=False)")],
                 "the bias is frozen", id="bitfit-frozen"),
    # build 6: LLaMA-Adapter v2
    pytest.param([("return self.scale * (self.base(x) + self.bias)", "return self.scale * self.base(x) + self.bias")],
                 "the bias sits inside the scale", id="v2-bias-outside"),
    pytest.param([("self.scale = nn.Parameter(torch.ones(base.out_features))",
                   "self.scale = nn.Parameter(torch.zeros(base.out_features))")], "the scale must start at one",
                 id="v2-scale-zeros"),
    pytest.param([("norm.weight.requires_grad_(True)", "pass")], "RMSNorm weights stay frozen", id="v2-norms-frozen"),
    pytest.param([('apply_method(copy.deepcopy(model), "llama_adapter"', 'apply_method(model, "llama_adapter"')],
                 "changed the model it was given", id="v2-in-place"),
    # exercises
    pytest.param([("gate_one_effects = (True, True)", "gate_one_effects = (True, False)")], "not the second",
                 id="ex1-no-prompt-gradient"),
    pytest.param([("cfg_1b.n_layers * 2 * 10 * cfg_1b.n_kv_heads * cfg_1b.head_dim",
                   "cfg_1b.n_layers * 2 * 10 * cfg_1b.dim")], "n_kv_heads \\* head_dim", id="ex2-prefix-dim"),
    pytest.param([("+ 2 * cfg_1b.ffn_dim", "+ cfg_1b.ffn_dim")], "output widths", id="ex3-one-ffn"),
    pytest.param([("return scale[:, None] * W, scale * bias", "return scale[:, None] * W, bias")],
                 "b_merged is not it", id="ex4-bias-unscaled"),
    pytest.param([("return scale[:, None] * W, scale * bias", "return W * scale[:3], scale * bias")],
                 "W_merged is not it", id="ex4-wrong-axis"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
