"""Lab 13's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "13_sparse_masks_diff_pruning"


STRETCH = "return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)     # stretch, THEN clip"


@pytest.mark.parametrize("plant, hint", [
    # the selection scores
    pytest.param([("return sum(-grad * w for w, grad in trajectory)", "return sum(grad * w for w, grad in trajectory)")],
                 "wrong sign", id="movement-sign"),
    pytest.param([("return sum(-grad * w for w, grad in trajectory)",
                   "return sum(-grad * w for w, grad in trajectory).abs()")], "no absolute value",
                 id="movement-abs"),
    pytest.param([("return sum(grad.square() / len(grads) for grad in grads)",
                   "return sum(grad / len(grads) for grad in grads)")], "FISH squares each gradient: the mean",
                 id="fisher-not-squared"),
    pytest.param([("return sum(grad.square() / len(grads) for grad in grads)",
                   "return sum(grad.abs() / len(grads) for grad in grads)")], "not its absolute value",
                 id="fisher-abs"),
    pytest.param([("return sum(grad.square() / len(grads) for grad in grads)",
                   "return sum(grads).square()")], "mean of squares", id="fisher-square-of-sum"),
    pytest.param([("    return W_T.abs()", "    return W_T")], "absolute value", id="magnitude-signed"),
    pytest.param([("    return (W_T - W_0).abs()", "    return W_T - W_0")], "moved down", id="lt-sft-signed"),
    pytest.param([("    return (W_T - W_0).abs()", "    return W_T.abs()")], "CHANGED", id="lt-sft-magnitude"),
    # the hard-concrete sample
    pytest.param([(STRETCH, "return (s + GAMMA) * (ZETA - GAMMA)")], "wrong order", id="stretch-shift-first"),
    pytest.param([(STRETCH, "return s.clamp(0, 1) * (ZETA - GAMMA) + GAMMA")], "clip AFTER the stretch",
                 id="clip-before-stretch"),
    pytest.param([(STRETCH, "return (s * (ZETA - GAMMA) - GAMMA).clamp(0, 1)")], "shift by \\+gamma",
                 id="stretch-minus-gamma"),
    pytest.param([(STRETCH, "return s")], "no stretch", id="no-stretch"),
    pytest.param([("s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)",
                   "s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) * BETA)")], "temperature",
                 id="beta-multiplied"),
    pytest.param([("s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)",
                   "s = torch.sigmoid(log_alpha)")], "test-time gate", id="no-noise"),
    pytest.param([("s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA)",
                   "s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha.detach()) / BETA)")],
                 "no gradient in log alpha", id="log-alpha-detached"),
    # the expected L0
    pytest.param([("return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()",
                   "return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).mean()")], "SUM",
                 id="l0-mean"),
    pytest.param([("return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()",
                   "return torch.sigmoid(log_alpha + BETA * math.log(-GAMMA / ZETA)).sum()")], "sign of the shift",
                 id="l0-shift-sign"),
    pytest.param([("return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()",
                   "return torch.sigmoid(log_alpha).sum()")], "not sigmoid\\(log alpha\\)", id="l0-no-shift"),
    pytest.param([("return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()",
                   "return torch.tensor(torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum().item())")],
                 "no gradient in log alpha", id="l0-no-gradient"),
    # the test-time gate
    pytest.param([("return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)",
                   "return torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA")], "clip", id="test-gate-no-clip"),
    pytest.param([("return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)",
                   "return torch.sigmoid(log_alpha)")], "stretch sigmoid", id="test-gate-no-stretch"),
    pytest.param([("return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)",
                   "u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)\n    "
                   "return (torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / BETA) * (ZETA - GAMMA)"
                   " + GAMMA).clamp(0, 1)")], "no noise", id="test-gate-sampled"),
    # the final cut
    pytest.param([("delta = my_test_gate(module.log_alpha.detach()) * module.diff.detach()",
                   "delta = module.diff.detach()")], "rank by \\|w\\|", id="cut-ignores-gate"),
    pytest.param([("    eta = top_k(delta.abs(), density)", "    eta = top_k(delta, density)")],
                 "large negative entry", id="cut-signed"),
    pytest.param([("delta = my_test_gate(module.log_alpha.detach()) * module.diff.detach()",
                   "delta = module.mask().detach() * module.diff.detach()")], "not a training sample",
                 id="cut-sampled-gate"),
    pytest.param([("    return eta, delta.flatten()[eta]", "    return eta, module.diff.detach().flatten()[eta]")],
                 "raw diff", id="cut-phi-ungated"),
    pytest.param([("    eta = top_k(delta.abs(), density)",
                   "    eta = delta.abs().flatten().topk(max(1, round(density * delta.numel()))).indices")],
                 "sorted", id="cut-unsorted"),
    # exercises
    pytest.param([("expected_l0_v_proj = 2048 / (1 + math.exp(-(-1 - 2 / 3 * math.log(0.1 / 1.1))))",
                   "expected_l0_v_proj = 2048 / (1 + math.exp(1))")], "not sigmoid\\(log alpha\\)",
                 id="ex1-no-shift"),
    pytest.param([("expected_l0_v_proj = 2048 / (1 + math.exp(-(-1 - 2 / 3 * math.log(0.1 / 1.1))))",
                   "expected_l0_v_proj = 2048")], "test-time gates", id="ex1-test-gate"),
    pytest.param([("12 * n_values, 4 * n_values)", "8 * n_values, 4 * n_values)")], "int64", id="ex2-int32"),
    pytest.param([("sparse_vs_lora = (8 * (2048 + 2048) / (2048 * 2048),", "sparse_vs_lora = (0.01,")],
                 "k = r \\(n_in \\+ n_out\\)", id="ex2-density"),
    pytest.param([("kept_positions = ({0, 1}, {1, 2})", "kept_positions = ({1, 2}, {0, 1})")], "swapped",
                 id="ex3-swapped"),
    pytest.param([("kept_positions = ({0, 1}, {1, 2})", "kept_positions = ({0, 1}, {0, 1})")], "shrinks it",
                 id="ex3-movement-as-magnitude"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
