"""Lab 03's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "03_ia3pp_initialisation_identity"


ONES = "self.l = nn.Parameter(torch.ones(size))"
ALPHA_Q = "self.alpha_q = nn.Parameter(torch.zeros(head_dim))"
RMS = "torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"
SKIP = "return q + self.alpha_q * self.unit(q), k + self.alpha_k * self.unit(k)"


@pytest.mark.parametrize("plant, hint", [
    # Build 1: the (IA)^3 vector
    pytest.param([(ONES, "self.l = nn.Parameter(torch.zeros(size))")], "starts all zeros", id="l-zeros"),
    pytest.param([(ONES, "self.l = nn.Parameter(torch.randn(size))")], "starts random", id="l-random"),
    pytest.param([(ONES, "self.l = nn.Parameter(torch.full((size,), 123.0))")], "starts all 123", id="l-123"),
    pytest.param([("size = base.in_features if feedforward else base.out_features",
                   "size = base.out_features if feedforward else base.in_features")], "has shape",
                 id="l-wrong-size"),
    pytest.param([("return self.base(x * self.l)", "return self.base(x) * self.l")],
                 "the vector multiplies the input", id="ff-scales-output"),
    # Build 2: the skip-norm
    pytest.param([(ALPHA_Q, "self.alpha_q = nn.Parameter(torch.ones(head_dim))")], "alpha_q` starts all ones",
                 id="alpha-ones"),
    pytest.param([("self.alpha_k = nn.Parameter(torch.zeros(head_dim))",
                   "self.alpha_k = nn.Parameter(torch.randn(head_dim))")], "alpha_k` starts random",
                 id="alpha-random"),
    pytest.param([(SKIP, "return self.alpha_q * self.unit(q), self.alpha_k * self.unit(k)")],
                 "the skip is missing", id="no-skip"),
    pytest.param([(RMS, "(torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + self.eps)")], "inside the square root",
                 id="eps-outside"),
    pytest.param([(RMS, "torch.sqrt(x.pow(2).mean((-2, -1), keepdim=True) + self.eps)")], "not across the heads",
                 id="rms-across-heads"),
    pytest.param([(SKIP, "return q + self.alpha_q * self.unit(q), k + self.alpha_q * self.unit(k)")],
                 "the other alpha", id="alpha-q-for-k"),
    pytest.param([(RMS, RMS + ".detach()")], "gradients of q differ", id="rms-detached"),
    # Build 3: the injection
    pytest.param([("model = copy.deepcopy(base)", "model = base")], "work on a copy", id="no-copy"),
    pytest.param([('feedforward=name.endswith("down_proj")', "feedforward=False")], "scales its INPUT",
                 id="ff-flag"),
    pytest.param([('targets = ["k_proj", "v_proj", "down_proj"]', 'targets = ["k_proj", "v_proj", "up_proj"]')],
                 "not on up_proj", id="up-not-down"),
    pytest.param([('(["o_proj"] if plus else [])', '["o_proj"]')], r"\(IA\)\^3\+\+ only", id="l_o-in-plain"),
    pytest.param([("    if plus:\n        eps", "    if False:\n        eps")], "qk_adapter is empty",
                 id="plus-without-norm"),
    # exercises
    pytest.param([("+ cfg.ffn_dim + cfg.dim + 2", "+ cfg.ffn_dim + 2")], "is not it", id="ex1-no-l_o"),
    pytest.param([("return 1 / (t + 1)", "return 1 / 8")], "equal scores", id="ex2-constant"),
    pytest.param([("alpha_grad_is_zero = True", "alpha_grad_is_zero = False")], "a softmax does not change",
                 id="ex3-false"),
    pytest.param([("W * l[None, :] if feedforward else W * l[:, None]",
                   "W * l[:, None] if feedforward else W * l[None, :]")], "in_features", id="ex4-rows-cols"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
