"""Lab 02's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "02_lora_learning_rate_of_B"


@pytest.mark.parametrize("plant, hint", [
    pytest.param([("nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))", "nn.init.zeros_(self.A)")],
                 "A is all zeros", id="A-at-zero"),
    pytest.param([("nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))", "nn.init.constant_(self.A, 123.0)")],
                 "beyond Kaiming-uniform's bound", id="A-init-123"),
    pytest.param([("nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))", "nn.init.normal_(self.A)")],
                 "beyond Kaiming-uniform's bound", id="A-normal"),
    pytest.param([("torch.zeros(base.out_features, r)", "torch.randn(base.out_features, r)")],
                 "B must start at zero", id="B-random"),
    pytest.param([("s = alpha / math.sqrt(r) if use_rslora else alpha / r", "s = alpha / r")],
                 "use_rslora", id="rslora-ignored"),
    pytest.param([("self.scale = s * gamma", "self.scale = s")], "gamma multiplies the branch", id="gamma-scale"),
    pytest.param([("self.A.div_(gamma)", "self.A.mul_(1.0)")], "A0 / gamma", id="A-not-divided"),
    pytest.param([("torch.empty(r, base.in_features)", "torch.empty(base.in_features, r)"),
                  ("(x @ self.A.T) @ self.B.T", "(x @ self.A) @ self.B.T")], "A has shape", id="A-transposed"),
    pytest.param([("torch.zeros(base.out_features, r)", "torch.zeros(r, base.out_features)"),
                  ("(x @ self.A.T) @ self.B.T", "(x @ self.A.T) @ self.B")], "B has shape", id="B-transposed"),
    pytest.param([('if not n.endswith("lora_B")], lr=lr)', 'if n.endswith("lora_B")], lr=lr)'),
                  ('if n.endswith("lora_B")],\n                 lr=ratio * lr)',
                   'if not n.endswith("lora_B")],\n                 lr=ratio * lr)')],
                 "LoRA\\+ boosts B", id="loraplus-boosts-A"),
    pytest.param([("trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]",
                   "trainable = list(model.named_parameters())")], "frozen tensor", id="loraplus-frozen"),
    pytest.param([("return alpha / math.sqrt(r)", "return alpha / r")], "not constant", id="ex1-lora-scale"),
    pytest.param([("sum(16 * (n_in + n_out)", "sum(16 * (n_in * n_out)")], "is not it", id="ex2-count"),
    pytest.param([("gamma_step_factors = (gamma ** 2, gamma)", "gamma_step_factors = (gamma, gamma)")],
                 "which optimiser", id="ex3-sgd"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
