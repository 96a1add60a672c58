"""Lab 04's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "04_dora_factorisation"


DORA_OUT = "return F.linear(x, V) * (self.m / V.norm(dim=1).detach())"
DORA_M = "self.m = nn.Parameter(base.weight.detach().norm(dim=1))"
DORA_A = ("self.A = nn.Parameter(torch.empty(r, base.in_features))     # (r, in): random\n"
          "        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))")
SIMPLE_OUT = "return self.w * (unit + self.scale * (x @ self.A.T) @ self.B.T)"


@pytest.mark.parametrize("plant, hint", [
    # Build 1: DoRA, and where its detach goes
    pytest.param([(DORA_OUT, "return F.linear(x, V) * (self.m / V.norm(dim=1))")], "flow through the norm",
                 id="dora-norm-not-detached"),
    pytest.param([(DORA_OUT, "return F.linear(x, V) * (self.m / V.norm(dim=1)).detach()")],
                 "m gets no gradient", id="dora-m-detached"),
    pytest.param([(DORA_OUT, "return F.linear(x, V.detach()) * (self.m / V.norm(dim=1))")],
                 "V is detached where it multiplies x", id="dora-V-detached-instead"),
    pytest.param([(DORA_OUT, "return F.linear(x, V.detach()) * (self.m / V.norm(dim=1).detach())")],
                 "A and B get no gradient", id="dora-everything-detached"),
    pytest.param([(DORA_M, "self.m = nn.Parameter(torch.ones(base.out_features))")], "starts as all ones",
                 id="dora-m-ones"),
    pytest.param([(DORA_M, "self.m = nn.Parameter(base.weight.detach().norm(dim=0))")],
                 "one magnitude per OUTPUT feature", id="dora-m-column-norms"),
    pytest.param([("self.B = nn.Parameter(torch.zeros(base.out_features, r))    # (out, r): zero",
                   "self.B = nn.Parameter(torch.randn(base.out_features, r))")], "B must start at zero",
                 id="dora-B-random"),
    pytest.param([(DORA_A, "self.A = nn.Parameter(torch.zeros(r, base.in_features))")], "A is all zeros",
                 id="dora-A-zeros"),
    pytest.param([(DORA_OUT, "return F.linear(x, V) * (self.m / self.base.weight.norm(dim=1).detach())")],
                 "recomputed in every forward pass", id="dora-norm-of-W0"),
    pytest.param([("V = self.base.weight + self.scale * self.B @ self.A", "V = self.base.weight + self.B @ self.A")],
                 "scale is missing", id="dora-no-scale"),
    # Build 2: Simple DoRA
    pytest.param([(SIMPLE_OUT, "V = self.base.weight / self.row_norm[:, None] + self.scale * self.B @ self.A\n"
                               "        return self.w * F.linear(x, V) / V.norm(dim=1)")], "DoRA's rule",
                 id="simple-renormalises"),
    pytest.param([('self.register_buffer("row_norm", base.weight.detach().norm(dim=1))',
                   "self.row_norm = nn.Parameter(base.weight.detach().norm(dim=1))")], "'row_norm' is trainable",
                 id="simple-norm-trainable"),
    pytest.param([("self.w = nn.Parameter(self.row_norm.clone())",
                   "self.w = nn.Parameter(torch.ones_like(self.row_norm))")], "starts as all ones",
                 id="simple-w-ones"),
    pytest.param([(SIMPLE_OUT, "return self.w * unit + self.scale * (x @ self.A.T) @ self.B.T")],
                 "w scales the update too", id="simple-w-on-base-only"),
    pytest.param([(SIMPLE_OUT, "return self.w.detach() * (unit + self.scale * (x @ self.A.T) @ self.B.T)")],
                 "got no gradient", id="simple-w-detached"),
    # exercises
    pytest.param([("dora_params_1b = lora + cfg.n_layers * (q + kv)", "dora_params_1b = lora")], "LoRA's count",
                 id="ex1-lora"),
    pytest.param([("return (m / V.norm(dim=1))[:, None] * V", "return (m / W0.norm(dim=1))[:, None] * V")],
                 "each row of V rescaled", id="ex2-norm-of-W0"),
    pytest.param([("return m[:, None] / norm * (g - along)", "return m[:, None] / norm * g")],
                 "the detached gradient", id="ex3-detached"),
    pytest.param([("return w * U.norm(dim=1)", "return w")], "that is w itself", id="ex4-w"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
