"""Lab 01's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "01_llama3_from_the_file_up"


HALVES = "x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]"
ROTATION = "torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)"
REPEAT = "k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)"
SOFTMAX = 'scores.masked_fill(later, float("-inf")).softmax(-1) @ v'


@pytest.mark.parametrize("plant, hint", [
    # Build 1: RMSNorm
    pytest.param([("torch.sqrt(mean_square + eps)", "torch.sqrt(mean_square)")], "eps is missing", id="rms-no-eps"),
    pytest.param([("torch.sqrt(mean_square + eps)", "(torch.sqrt(mean_square) + eps)")],
                 "eps belongs inside the square root", id="rms-eps-outside"),
    pytest.param([("mean_square = x.pow(2).mean(-1, keepdim=True)", "mean_square = x.mean(-1, keepdim=True)")],
                 "mean of the SQUARES", id="rms-mean-not-of-squares"),
    pytest.param([("mean_square = x.pow(2).mean(-1, keepdim=True)", "mean_square = x.pow(2).sum(-1, keepdim=True)")],
                 "MEAN of the squares", id="rms-sum"),
    pytest.param([("return x / torch.sqrt(mean_square + eps) * weight",
                   "x = x - x.mean(-1, keepdim=True)\n    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) "
                   "+ eps) * weight")], "that is LayerNorm", id="rms-layernorm"),
    pytest.param([("torch.sqrt(mean_square + eps) * weight", "torch.sqrt(mean_square + eps)")],
                 "the gain is missing", id="rms-no-weight"),
    # Build 2: the RoPE rotation
    pytest.param([(HALVES, "x1, x2 = x[..., 0::2], x[..., 1::2]")], "interleaved pairs", id="rope-interleaved"),
    pytest.param([(ROTATION, "torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)")],
                 "the wrong way", id="rope-backwards"),
    pytest.param([("angles = positions[:, None].float()", "angles = torch.arange(x.shape[1])[:, None].float()")],
                 "positions you are given", id="rope-arange"),
    # Build 3: llama3 frequencies
    pytest.param([("    if scaling is None:\n        return w.float()", "    if True:\n        return w.float()")],
                 "llama3 scaling is missing", id="freq-no-scaling"),
    pytest.param([("w = theta ** (-2 * i / head_dim)", "w = theta ** (-i / head_dim)")], "exponent has a 2",
                 id="freq-exponent"),
    pytest.param([("torch.where(lam > L / a, w / s, scaled)", "torch.where(lam > L / b, w / s, scaled)")],
                 "you keep 15 frequencies and divide 17", id="freq-threshold"),
    pytest.param([("scaled = (1 - mu) * w / s + mu * w", "scaled = mu * w / s + (1 - mu) * w")],
                 "in between are not", id="freq-mu-reversed"),
    # Build 4: grouped-query attention
    pytest.param([(REPEAT, "k, v = k, v")], "repeat the kv heads", id="gqa-no-repeat"),
    pytest.param([(REPEAT, "k, v = k.repeat(1, g, 1, 1), v.repeat(1, g, 1, 1)")], r"h // g", id="gqa-tiled"),
    pytest.param([(SOFTMAX, "scores.softmax(-1) @ v")], "no causal mask", id="gqa-no-mask"),
    pytest.param([(".triu(1)   # key j > t", ".triu(0)")], "mask j > t only", id="gqa-mask-diagonal"),
    pytest.param([(" / math.sqrt(q.shape[-1])", "")], r"divided by sqrt\(d\)", id="gqa-no-scale"),
    # Build 5: SwiGLU
    pytest.param([("F.silu(x @ w_gate.T) * (x @ w_up.T)", "(x @ w_gate.T) * F.silu(x @ w_up.T)")],
                 "silu belongs on the gate", id="swiglu-swapped"),
    pytest.param([("F.silu(x @ w_gate.T)", "F.relu(x @ w_gate.T)")], "not relu", id="swiglu-relu"),
    pytest.param([("F.silu(x @ w_gate.T) * (x @ w_up.T)", "F.silu(x @ w_gate.T) * (x @ w_up)")],
                 r"\(out, in\) layout", id="swiglu-not-transposed"),
    # Build 6: the forward pass
    pytest.param([("    x = my_rmsnorm(x, model.norm.weight, eps)\n", "")], "final RMSNorm", id="fwd-no-final-norm"),
    pytest.param([("my_rope_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)",
                   "my_rope_frequencies(hd, cfg.rope_theta, None)")], "lack the llama3 scaling",
                 id="fwd-no-rope-scaling"),
    pytest.param([("q = my_apply_rope(q, positions, inv_freq)\n        k = my_apply_rope(k, positions, inv_freq)",
                   "q, k = q, k")], "RoPE is missing", id="fwd-no-rope"),
    pytest.param([("x = x + y.transpose(1, 2)", "x = y.transpose(1, 2)")], "pre-norm residuals",
                 id="fwd-no-residual"),
    # exercises
    pytest.param([("return torch.argsort(perm)", "return perm")], "perm itself", id="ex1-perm"),
    pytest.param([("return torch.argsort(perm)", "return torch.arange(hd)")], r"perm\[inverse\]",
                 id="ex1-identity"),
    pytest.param([("per_token = 2 * cfg_1b.n_layers", "per_token = cfg_1b.n_layers")], "keys AND values",
                 id="ex2-no-values"),
    pytest.param([("/ counted.sum()", "/ len(targets)")], "N counts only", id="ex3-all-positions"),
    pytest.param([("dlogits.T @ h ", "h.T @ dlogits ")], "transposed", id="ex3-dW-transposed"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
