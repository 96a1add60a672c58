"""Lab 06's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "06_tying_across_layers"


TL_V = "self.v = nn.Parameter(torch.ones(base.out_features))   # per layer: outputs"
TL_U = "self.u = nn.Parameter(torch.ones(R))                   # per layer: the rank"
TL_SHARED = 'return nn.ParameterDict({"A": uniform_A(R, linear.in_features), "B": B})'
TL_FACTORS = 'return self.shared["A"], torch.diag(self.u), self.v[:, None] * self.shared["B"]'
TL_B = "B = nn.Parameter(torch.zeros(linear.out_features, R))    # B = 0: the base model"
CORE = "self.core = nn.Parameter(torch.eye(R))     # M_i = I: starts as tied LoRA"
EMBEDDING = "self.embedding = nn.Parameter(one_hot(layer, n_layers))   # w_i"
EYES = "eyes = torch.eye(R).repeat(SLICES, 1, 1)                # every M_i starts as I"


@pytest.mark.parametrize("plant, hint", [
    # build 1: the tying
    pytest.param([("if kind not in shared:\n            shared[kind]", "if True:\n            shared[kind]")],
                 "hold different shared tensors", id="tie-a-set-per-layer"),
    pytest.param([('kind, layer = name.split(".")[-1], int', 'kind, layer = "all", int')],
                 "q_proj and v_proj share one set", id="tie-one-set-for-all-kinds"),
    pytest.param([("model, shared, n_layers = copy.deepcopy(base), {}", "model, shared, n_layers = base, {}")],
                 "changed the model it was given", id="tie-in-place"),
    pytest.param([('int(name.split(".")[1])  # layers.3', 'n_layers - 1 - int(name.split(".")[1])  # layers.3')],
                 "layer indices", id="tie-layer-index"),
    # build 2: Tied-LoRA
    pytest.param([(TL_V, "pass"), (TL_SHARED, 'return nn.ParameterDict({"A": uniform_A(R, linear.in_features), '
                                              '"B": B, "v": nn.Parameter(torch.ones(linear.out_features))})'),
                  (TL_FACTORS, 'return self.shared["A"], torch.diag(self.u), '
                               'self.shared["v"][:, None] * self.shared["B"]')],
                 "new_shared holds `v`", id="tl-v-shared"),
    pytest.param([(TL_V, TL_V + "\n        self.A = uniform_A(R, base.in_features)"),
                  (TL_SHARED, 'return nn.ParameterDict({"B": B})'),
                  (TL_FACTORS, 'return self.A, torch.diag(self.u), self.v[:, None] * self.shared["B"]')],
                 "new_shared has no `A`", id="tl-A-per-layer"),
    pytest.param([(TL_V, TL_V + "\n        self.shared = nn.ParameterDict({k: nn.Parameter(p.detach().clone()) "
                                "for k, p in shared.items()})")],
                 "a copy of `A`", id="tl-shared-copied-per-layer"),
    pytest.param([(TL_V, "self.v = nn.Parameter(torch.zeros(base.out_features))")], "v starts at zero",
                 id="tl-v-zeros"),
    pytest.param([(TL_U, "self.u = nn.Parameter(torch.rand(R))")], "the scaling vectors start at one",
                 id="tl-u-random"),
    pytest.param([(TL_B, "B = nn.Parameter(torch.randn(linear.out_features, R))")], "B must start at zero",
                 id="tl-B-random"),
    pytest.param([(TL_SHARED, 'return nn.ParameterDict({"A": nn.Parameter(torch.randn(R, linear.in_features)), '
                              '"B": B})')], "beyond LoRA's bound", id="tl-A-normal"),
    # build 3: partially tied LoRA
    pytest.param([("self.mix_a = nn.Parameter(one_hot(layer, n_layers))", "self.mix_a = nn.Parameter(torch.ones(SLICES))")],
                 "starts at all ones", id="pt-mix-ones"),
    pytest.param([("self.mix_b = nn.Parameter(one_hot(layer, n_layers))",
                   "self.mix_b = nn.Parameter(one_hot(n_layers - 1 - layer, n_layers))")],
                 "want one-hot on slice", id="pt-mix-wrong-slice"),
    pytest.param([('torch.einsum("kmn,k->mn", self.shared["L_A"], self.mix_a)',
                   'torch.einsum("kmn,k->mn", self.shared["L_A"], self.mix_b)')],
                 "A_i is not the layer's A", id="pt-A-mixed-by-mix_b"),
    pytest.param([("self.v = nn.Parameter(torch.ones(base.out_features))\n        self.u = nn.Parameter(torch.ones(R))\n",
                   "self.v = nn.Parameter(torch.ones(base.out_features))\n        self.u = nn.Parameter(torch.zeros(R))\n")],
                 "u starts at zero", id="pt-u-zeros"),
    # build 4: Tied-LoRA Extra
    pytest.param([(CORE, "self.core = nn.Parameter(torch.zeros(R, R))")], "the core starts at zero",
                 id="extra-core-zeros"),
    pytest.param([(CORE, "self.core = nn.Parameter(torch.randn(R, R))")], "the core starts as the identity",
                 id="extra-core-random"),
    pytest.param([(CORE, "pass"), ("return shared\n\n    def factors(self):\n        return self.shared[\"A\"], self.core",
                                   'shared["core"] = nn.Parameter(torch.eye(R))\n        return shared\n\n'
                                   '    def factors(self):\n        return self.shared["A"], self.shared["core"]')],
                 "new_shared holds `core`", id="extra-core-shared"),
    # build 5: tensor embedding
    pytest.param([(EMBEDDING, "self.embedding = nn.Parameter(torch.ones(SLICES))")], "starts at all ones",
                 id="emb-embedding-ones"),
    pytest.param([(EYES, "eyes = torch.zeros(SLICES, R, R)")], "every slice L\\[k\\] starts as the identity",
                 id="emb-L-zeros"),
    pytest.param([(EMBEDDING, EMBEDDING + "\n        self.L = nn.Parameter(torch.eye(R).repeat(SLICES, 1, 1))"),
                  ('"B": B,\n                                 "L": nn.Parameter(eyes)})', '"B": B})'),
                  ('M = torch.einsum("kab,k->ab", self.shared["L"], self.embedding)',
                   'M = torch.einsum("kab,k->ab", self.L, self.embedding)')],
                 "new_shared has no `L`", id="emb-L-per-layer"),
    # exercises
    pytest.param([("(q_out + 8) + (kv_out + 8)", "2 * (q_out + 8)")], "is not it", id="ex1-q-width-twice"),
    pytest.param([("return s * (v[:, None] * B * u) @ A", "return (v[:, None] * B * u) @ A")], "scale s",
                 id="ex2-no-scale"),
    pytest.param([("return s * (v[:, None] * B * u) @ A", "return s * (B * u) @ A")], "not Delta W_i",
                 id="ex2-no-v"),
    pytest.param([("if partially_tied_count(l) > 851_968)", "if partially_tied_count(l) > 800_000)")],
                 "not more than LoRA's", id="ex3-threshold"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
