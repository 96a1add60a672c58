"""Lab 11's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "11_adapters_adamix"


ZEROS = "for p in (self.down.bias, self.up.weight, self.up.bias):"


@pytest.mark.parametrize("plant, hint", [
    pytest.param([(ZEROS, "for p in (self.down.bias, self.up.bias):")], "up-projection", id="up-not-zero"),
    pytest.param([(ZEROS, "for p in (self.down.bias, self.down.weight, self.up.weight, self.up.bias):")],
                 "W_down is all zeros", id="down-zero"),
    pytest.param([("                                    # W_down stays random",
                   "\n        nn.init.constant_(self.down.weight, 123.0)")], "beyond nn.Linear's Kaiming",
                 id="down-init-123"),
    pytest.param([("return self.scaling * self.up(F.gelu(self.down(h)))", "return self.up(F.gelu(self.down(h)))")],
                 "multiply the whole branch by s", id="scaling-ignored"),
    pytest.param([("return self.scaling * self.up(F.gelu(self.down(h)))",
                   "return self.scaling * self.up(F.relu(self.down(h)))")], "looks like ReLU", id="relu"),
    pytest.param([("        return y + self.adapter(y)          # the skip connection keeps y",
                   "        return self.adapter(y)")], "residual", id="residual-missing"),
    pytest.param([("return self.base(x) + self.adapter(x)      # input x, not mlp(x)",
                   "y = self.base(x)\n        return y + self.adapter(y)")], "reads the MLP's output",
                 id="parallel-reads-output"),
    pytest.param([("return self.base(x) + self.adapter(x)      # input x, not mlp(x)", "return self.adapter(x)")],
                 "output is missing", id="parallel-residual-missing"),
    pytest.param([("wd, bd, wu, bu = stacked[0][i], stacked[1][i], stacked[2][j], stacked[3][j]",
                   "wd, bd, wu, bu = stacked[0][i], stacked[1][i], stacked[2][i], stacked[3][i]")],
                 "same copy i for both", id="adamix-one-draw"),
    pytest.param([("wd, bd, wu, bu = (p.mean(0) for p in stacked)", "wd, bd, wu, bu = (p[0] for p in stacked)")],
                 "you used one copy", id="adamix-eval-copy-0"),
    pytest.param([("wd, bd, wu, bu = (p.mean(0) for p in stacked)",
                   "wd, bd, wu, bu = (p.mean(1) for p in stacked)")], "stacked along dim 0",
                 id="adamix-average-wrong-dim"),
    pytest.param([("    else:                                         # adaptation merging: the averages\n"
                   "        wd, bd, wu, bu = (p.mean(0) for p in stacked)\n",
                   "    else:\n        M = len(mix.down_weight)\n"
                   "        return torch.stack([mix.scaling * F.linear(F.gelu(F.linear(h, stacked[0][c], "
                   "stacked[1][c])), stacked[2][c], stacked[3][c]) for c in range(M)]).mean(0)\n")],
                 "averaged the outputs", id="adamix-average-outputs"),
    pytest.param([("wd, bd, wu, bu = (p.mean(0) for p in stacked)",
                   "wd, bd, wu, bu = stacked[0].mean(0), stacked[1][0], stacked[2].mean(0), stacked[3][0]")],
                 "biases too", id="adamix-biases-not-averaged"),
    pytest.param([("    if mix.training:                              # stochastic routing: one copy each",
                   "    if False:")], "in training mode", id="adamix-average-in-training"),
    pytest.param([("return 0.5 * (kl_ab + kl_ba).mean()", "return 0.5 * kl_ab.mean()")], "symmetric",
                 id="kl-one-direction"),
    pytest.param([("return 0.5 * (kl_ab + kl_ba).mean()", "return (kl_ab + kl_ba).mean()")], "the 1/2",
                 id="kl-no-half"),
    pytest.param([("return 0.5 * (kl_ab + kl_ba).mean()", "return 0.5 * (kl_ab + kl_ba).sum()")],
                 "average over the N rows", id="kl-sum-rows"),
    pytest.param([("kl_ab = (la.detach().exp() * (la.detach() - lb)).sum(-1)",
                   "kl_ab = (la.exp() * (la - lb)).sum(-1)"),
                  ("kl_ba = (lb.detach().exp() * (lb.detach() - la)).sum(-1)",
                   "kl_ba = (lb.exp() * (lb - la)).sum(-1)")], "detached", id="kl-no-detach"),
    pytest.param([("houlsby_params_1b = cfg1b.n_layers * 2 *", "houlsby_params_1b = cfg1b.n_layers * 1 *")],
                 "TWO adapters", id="ex1-one-adapter"),
    pytest.param([("houlsby_params_1b = cfg1b.n_layers * 2 * (2 * cfg1b.dim * k + k + cfg1b.dim)",
                   "houlsby_params_1b = cfg1b.n_layers * 2 * (2 * cfg1b.dim * k)")], "b_down", id="ex1-no-biases"),
    pytest.param([("consistency_term = 0.5 * ((p_A - p_B) * (p_A.log() - p_B.log())).sum().item()",
                   "consistency_term = (p_A * (p_A.log() - p_B.log())).sum().item()")], "one KL",
                 id="ex2-one-kl"),
    pytest.param([("pairs = [experts_B[j] @ experts_A[i] for i in range(M) for j in range(M)]",
                   "pairs = [experts_B[i] @ experts_A[i] for i in range(M)]")], "diagonal", id="ex3-diagonal"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
