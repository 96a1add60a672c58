"""Lab 12's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "12_adalora_dylora"


KAIMING = "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))"


@pytest.mark.parametrize("plant, hint", [
    # AdaLoRA's layer
    pytest.param([("self.lam = nn.Parameter(torch.zeros(r, 1))", "self.lam = nn.Parameter(torch.ones(r, 1))")],
                 "lambda must start at zero", id="adalora-lambda-ones"),
    pytest.param([("self.lam = nn.Parameter(torch.zeros(r, 1))",
                   "self.lam = nn.Parameter(torch.full((r, 1), 123.0))")], "lambda must start at zero",
                 id="adalora-lambda-123"),
    pytest.param([("torch.randn(base.out_features, r) * 0.02", "torch.randn(base.out_features, r)")],
                 "standard deviation", id="adalora-P-unit-normal"),
    pytest.param([("torch.randn(r, base.in_features) * 0.02", "torch.zeros(r, base.in_features)")],
                 "Q is all zeros", id="adalora-Q-zero"),
    pytest.param([("self.base, self.scale = base, alpha / r", "self.base, self.scale = base, alpha")],
                 "want s = alpha / r", id="adalora-scale-alpha"),
    pytest.param([("torch.randn(r, base.in_features) * 0.02", "torch.randn(base.in_features, r) * 0.02"),
                  ("(x @ self.Q.T)", "(x @ self.Q)")], "Q maps the input", id="adalora-Q-transposed"),
    pytest.param([("self.lam = nn.Parameter(torch.zeros(r, 1))",
                   "self.lam = nn.Parameter(torch.zeros(r, 1), requires_grad=False)")], "frozen",
                 id="adalora-lambda-frozen"),
    # the orthogonality term
    pytest.param([("(P.T @ P - eye).square().sum()", "(P @ P.T - torch.eye(P.shape[0])).square().sum()")],
                 "P P\\^T", id="orth-P-wrong-product"),
    pytest.param([("(Q @ Q.T - eye).square().sum()", "(Q.T @ Q - torch.eye(Q.shape[1])).square().sum()")],
                 "Q\\^T Q", id="orth-Q-wrong-product"),
    pytest.param([("(P.T @ P - eye).square().sum()", "(P @ P.T - eye).square().sum()")], "both products must be",
                 id="orth-shape-mismatch"),
    pytest.param([("return (P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum()",
                   "return (P.T @ P - eye).norm() + (Q @ Q.T - eye).norm()")], "unsquared", id="orth-unsquared"),
    pytest.param([("return (P.T @ P - eye).square().sum() + (Q @ Q.T - eye).square().sum()",
                   "return (P.T @ P - eye).square().sum()")], "only the P term", id="orth-P-only"),
    # importance
    pytest.param([("sensitivity = (p * p.grad).abs().detach()", "sensitivity = p.grad.abs().detach()")],
                 "not \\|grad\\| alone", id="importance-grad-only"),
    pytest.param([("sensitivity = (p * p.grad).abs().detach()", "sensitivity = (p * p.grad).detach()")],
                 "absolute value", id="importance-no-abs"),
    pytest.param([("bar[key] = beta1 * bar.get(key, 0.0) + (1 - beta1) * sensitivity",
                   "bar[key] = beta2 * bar.get(key, 0.0) + (1 - beta2) * sensitivity"),
                  ("unc[key] = beta2 * unc.get(key, 0.0) + (1 - beta2)",
                   "unc[key] = beta1 * unc.get(key, 0.0) + (1 - beta1)")], "betas swapped",
                 id="importance-betas-swapped"),
    pytest.param([("    bar[key] = beta1 * bar.get(key, 0.0) + (1 - beta1) * sensitivity\n"
                   "    unc[key] = beta2 * unc.get(key, 0.0) + (1 - beta2) * (sensitivity - bar[key]).abs()",
                   "    unc[key] = beta2 * unc.get(key, 0.0) + (1 - beta2) * (sensitivity - bar.get(key, 0.0)).abs()\n"
                   "    bar[key] = beta1 * bar.get(key, 0.0) + (1 - beta1) * sensitivity")], "NEW average",
                 id="importance-old-bar"),
    pytest.param([('return s["lam"].view(-1) + s["P"].mean(0) + s["Q"].mean(1)',
                   'return s["lam"].view(-1) + s["P"].sum(0) + s["Q"].sum(1)')], "MEAN", id="scores-sum"),
    pytest.param([('return s["lam"].view(-1) + s["P"].mean(0) + s["Q"].mean(1)',
                   'return s["lam"].view(-1) + s["P"].mean(1) + s["Q"].mean(0)')], "its column i belongs to triplet i",
                 id="scores-wrong-axis"),
    # budget
    pytest.param([("return int(bT + (b0 - bT) * (1 - (t - t_init) / (T - t_init - t_final)) ** 3)",
                   "return round(bT + (b0 - bT) * (1 - (t - t_init) / (T - t_init - t_final)) ** 3)")],
                 "round down", id="budget-round"),
    pytest.param([("(T - t_init - t_final)) ** 3)", "(T - t_init - t_final)) ** 2)")], "cubic",
                 id="budget-square"),
    pytest.param([("    if t <= t_init:\n        return b0\n", "")], "warm-up keeps the whole budget",
                 id="budget-no-warm-up"),
    pytest.param([("(T - t_init - t_final)) ** 3)", "(T - t_init)) ** 3)")], "T - t_init - t_final",
                 id="budget-denominator"),
    # masks
    pytest.param([("    flat = torch.cat(scores)\n    kept = torch.zeros(flat.numel(), dtype=torch.bool)\n"
                   "    kept[flat.topk(keep).indices] = True                  # global, not per module\n"
                   "    return list(kept.split([len(s) for s in scores]))",
                   "    total = sum(len(s) for s in scores)\n"
                   "    return [s >= s.topk(round(keep * len(s) / total)).values.min() for s in scores]")],
                 "budget is global", id="masks-per-module"),
    pytest.param([("kept[flat.topk(keep).indices] = True", "kept[flat.topk(keep, largest=False).indices] = True")],
                 "LOWEST", id="masks-lowest"),
    # DyLoRA's layer
    pytest.param([(KAIMING, "nn.init.zeros_(self.lora_A)")], "A is all zeros", id="dylora-A-zero"),
    pytest.param([(KAIMING, "nn.init.constant_(self.lora_A, 123.0)")], "beyond Kaiming", id="dylora-A-123"),
    pytest.param([(KAIMING, "nn.init.normal_(self.lora_A)")], "beyond Kaiming", id="dylora-A-normal"),
    pytest.param([("torch.zeros(base.out_features, r))  # (out, r): zero",
                   "torch.randn(base.out_features, r))  # (out, r)")], "B must start at zero", id="dylora-B-random"),
    pytest.param([("return self.base(x) + (self.alpha / b) * (x @ A.T @ B.T)",
                   "return self.base(x) + (self.alpha / self.lora_A.shape[0]) * (x @ A.T @ B.T)")],
                 "alpha / r", id="dylora-scale-alpha-over-r"),
    pytest.param([("A, B = self.lora_A[:b], self.lora_B[:, :b]", "A, B = self.lora_A, self.lora_B")],
                 "all r = ", id="dylora-all-components"),
    pytest.param([("A = torch.cat([A[:b - 1].detach(), A[b - 1:]])", "A = A"),
                  ("B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)", "B = B")],
                 "frozen=True", id="dylora-frozen-ignored"),
    pytest.param([("A = torch.cat([A[:b - 1].detach(), A[b - 1:]])", "A = A.detach()"),
                  ("B = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:]], dim=1)", "B = B.detach()")],
                 "no component gets a gradient", id="dylora-frozen-all-detached"),
    # exercises
    pytest.param([("adalora_params_1b = cfg1b.n_layers * ((r * (cfg1b.dim + q_out) + r)\n"
                   "                                      + (r * (cfg1b.dim + v_out) + r))",
                   "adalora_params_1b = cfg1b.n_layers * ((r * (cfg1b.dim + q_out))\n"
                   "                                      + (r * (cfg1b.dim + v_out)))")],
                 "LoRA r=12's count", id="ex1-no-lambda"),
    pytest.param([("v_out = cfg1b.n_kv_heads * cfg1b.head_dim", "v_out = cfg1b.n_heads * cfg1b.head_dim")],
                 "n_kv_heads", id="ex1-v-width"),
    pytest.param([("budget_at_400 = int(", "budget_at_400 = 1 + int(")], "round down", id="ex2-rounded-up"),
    pytest.param([("dylora_lora_alpha = 16.0", "dylora_lora_alpha = 4.0")], "alpha / b, not alpha / r",
                 id="ex3-lora-scale"),
    pytest.param([("masks_by_hand = [[True, False, True], [True, False, False]]",
                   "masks_by_hand = [[True, False, True], [True, True, False]]")], "keeps 4 triplets",
                 id="ex4-too-many"),
    pytest.param([("masks_by_hand = [[True, False, True], [True, False, False]]",
                   "masks_by_hand = [[True, False, False], [True, True, False]]")], "BOTH modules",
                 id="ex4-per-module"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
