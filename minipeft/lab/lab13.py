"""Checks of lab 13 (choosing the sparse mask, and diff pruning): the student's four selection scores, the
hard-concrete sample, its expected L0, the test-time gate, the final cut, and the exercises.

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). The checks build their
own inputs (the lab's tiny base, teacher and warm-up batches) and leave the notebook's random state as they
found it.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .. import peft
from ..adapters import adapter_state, apply_method
from ..llama import Llama, LlamaConfig
from ..methods import diff_pruning, sparse_ft
from . import TOY_TARGETS, Wrong, assert_same_outputs_and_grads, expect, make_base, make_teacher

DENSITY, LR = 0.05, 0.5
BETA, GAMMA, ZETA = diff_pruning.BETA, diff_pruning.GAMMA, diff_pruning.ZETA


def _top_k(score: torch.Tensor, density: float = DENSITY) -> torch.Tensor:
    k = max(1, round(density * score.numel()))
    return score.flatten().topk(k).indices.sort().values


def _task():
    """The lab's selection task: the tiny base, its teacher's greedy tokens, 3 batches of 8 sequences."""
    base = make_base(0)
    teacher = make_teacher(base)
    names = peft.match_targets(base, TOY_TARGETS)
    tokens = torch.randint(0, base.config.vocab_size, (3, 8, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batches = [(x[:, :-1], teacher(x[:, :-1]).argmax(-1)) for x in tokens]
    return base, names, batches


def _warm_up(base, names, batches, lr):
    model = copy.deepcopy(base)
    weights = [model.get_submodule(n).weight for n in names]
    trajectory = {n: [] for n in names}
    for idx, targets in batches:
        grads = torch.autograd.grad(model(idx, targets)[1], weights)
        with torch.no_grad():
            for n, w, grad in zip(names, weights, grads):
                trajectory[n].append((w.detach().clone(), grad))
                w -= lr * grad
    return trajectory, {n: w.detach().clone() for n, w in zip(names, weights)}


def _select(base, names, batches, strategy, lr=LR):
    model = apply_method(copy.deepcopy(base), "sparse_ft", density=DENSITY, targets=TOY_TARGETS)
    sparse_ft.select(model, strategy, batches, lr=lr)
    return {n: model.get_submodule(n).indices.clone() for n in names}


def _score_tensor(score, name: str, shape) -> torch.Tensor:
    expect(isinstance(score, torch.Tensor) and tuple(score.shape) == tuple(shape),
           f"{name} must return one score per weight entry, a tensor of the weight's shape {tuple(shape)}; got "
           f"{tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__}")
    return score.detach()


def check_scores(magnitude_score, movement_score, fisher_score, lt_sft_score) -> str:
    """The four scores, each of whose top-k must be sparse_ft.select's eta on the lab's warm-up."""
    base, names, batches = _task()
    trajectory, W_T = _warm_up(base, names, batches, LR)
    at_W0, _ = _warm_up(base, names, batches, 0.0)
    W_0 = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    reference = {
        "magnitude": {n: W_T[n].abs() for n in names},
        "movement": {n: sum(-g * w for w, g in trajectory[n]) for n in names},
        "fisher": {n: sum(g.square() / len(batches) for _, g in at_W0[n]) for n in names},
        "lt_sft": {n: (W_T[n] - W_0[n]).abs() for n in names},
    }
    wrong_ways = {
        "magnitude": lambda n: [
            (W_0[n].abs(), "magnitude reads the weights AFTER the warm-up, |W_T|, not the pretrained |W_0|"),
            (W_T[n], "magnitude keeps the largest |W_T|: take the absolute value (a large negative weight counts)")],
        "movement": lambda n: [
            (sum(g * w for w, g in trajectory[n]), "wrong sign: that keeps the weights moving TOWARD 0; Sanh et al.'s "
                                                   "score is S = -sum_t G_t W_t (positive when the step moves W away "
                                                   "from 0)"),
            (sum(-g * w for w, g in trajectory[n]).abs(), "no absolute value: the sign of -G W says which way the "
                                                          "weight moves, and movement keeps those moving away from 0"),
            (sum(-g * (w - LR * g) for w, g in trajectory[n]), "each G_t goes with the weight it was computed at, "
                                                              "W_t (before the step), not W_(t+1)")],
        "fisher": lambda n: [
            (sum(g for _, g in at_W0[n]), "FISH squares each gradient: the mean of G_t^2 (signed gradients cancel "
                                          "when summed; their squares add up)"),
            (sum(g.abs() for _, g in at_W0[n]), "FISH squares each gradient (the empirical Fisher's diagonal), "
                                                "not its absolute value"),
            (sum(g for _, g in at_W0[n]).square(), "square each batch's gradient, then average: the mean of squares, "
                                                   "not the square of the sum"),
            (sum(g.square() for _, g in trajectory[n]), "FISH's gradients are all taken at the pretrained W_0 (the "
                                                        "warm-up with lr = 0: `grads`), not along the SGD path")],
        "lt_sft": lambda n: [
            (W_T[n] - W_0[n], "LT-SFT keeps the largest |W_T - W_0|: a weight that moved down moved as much"),
            (W_T[n].abs(), "LT-SFT ranks how much each weight CHANGED, |W_T - W_0|, not its size")],
    }
    calls = {"magnitude": lambda n: magnitude_score(W_T[n].clone()),
             "movement": lambda n: movement_score([(w.clone(), g.clone()) for w, g in trajectory[n]]),
             "fisher": lambda n: fisher_score([g.clone() for _, g in at_W0[n]]),
             "lt_sft": lambda n: lt_sft_score(W_0[n].clone(), W_T[n].clone())}
    for strategy in ("magnitude", "movement", "fisher", "lt_sft"):
        want = _select(base, names, batches, strategy)
        for n in names:
            mine = _score_tensor(calls[strategy](n), f"{strategy}_score", W_0[n].shape)
            if torch.equal(_top_k(mine), want[n]) or torch.allclose(mine, reference[strategy][n], rtol=1e-5,
                                                                    atol=1e-12):
                continue
            for other, hint in wrong_ways[strategy](n):
                expect(not torch.equal(_top_k(mine), _top_k(other)), hint)
            expect(False, f"{strategy}: your top-k differs from sparse_ft.select's eta on {n}: see the table's "
                          "formula")
    # FISH as the paper: per-example gradients = select on batches of one example
    singles = [(idx[i:i + 1], targets[i:i + 1]) for idx, targets in batches for i in range(2)]
    per_example, _ = _warm_up(base, names, singles, 0.0)
    want = _select(base, names, singles, "fisher")
    for n in names:
        mine = _score_tensor(fisher_score([g.clone() for _, g in per_example[n]]), "fisher_score", W_0[n].shape)
        expect(torch.equal(_top_k(mine), want[n]), "FISH on batches of one example: your top-k differs from "
                                                   "select's (average G_t^2 over however many gradients you get)")
    return f"all four top-k = sparse_ft.select's eta on the {len(names)} targeted weights (and FISH per example)"


def _gate_module(log_alpha: torch.Tensor) -> diff_pruning.DiffPruneLinear:
    out, n_in = log_alpha.shape
    module = diff_pruning.DiffPruneLinear(nn.Linear(n_in, out, bias=False).requires_grad_(False),
                                          diff_pruning.DiffPruningConfig())
    with torch.no_grad():
        module.log_alpha.copy_(log_alpha)
    return module


def _trained_looking(shape=(32, 64), seed: int = 0) -> torch.Tensor:
    return 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def check_hard_concrete(my_hard_concrete) -> str:
    """my_hard_concrete(log_alpha, u) = DiffPruneLinear.mask() in training from the same u: value and gradient."""
    log_alpha = _trained_looking()
    gate = _gate_module(log_alpha).train()
    torch.manual_seed(1)
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)   # the noise mask() draws after the same seed

    def theirs():
        torch.manual_seed(1)
        return gate.mask()

    with torch.no_grad():
        mine = my_hard_concrete(log_alpha.clone(), u.clone())
        want = theirs()
    expect(isinstance(mine, torch.Tensor) and mine.shape == want.shape,
           f"return one gate per entry, shape {tuple(want.shape)}")
    if not torch.allclose(mine, want, atol=1e-6):
        L = u.log() - (1 - u).log()
        s = torch.sigmoid((L + log_alpha) / BETA)
        for other, hint in (
                ((s + GAMMA) * (ZETA - GAMMA), "the stretch is applied in the wrong order: scale by (zeta - gamma) "
                                               "first, then shift by gamma, s_bar = s (zeta - gamma) + gamma"),
                (s.clamp(0, 1) * (ZETA - GAMMA) + GAMMA, "clip AFTER the stretch, m = min(1, max(0, s_bar)): "
                                                         "stretching last gives values outside [0, 1] and no point "
                                                         "masses at 0 and 1"),
                (s * (ZETA - GAMMA) - GAMMA, "shift by +gamma (gamma = -0.1 is negative): s_bar = s (zeta - gamma) "
                                             "+ gamma stretches (0, 1) to (-0.1, 1.1)"),
                (s * ZETA + GAMMA, "scale by zeta - gamma = 1.2, the length of the interval (gamma, zeta)"),
                (s, "no stretch: s lies in (0, 1) and the clip does nothing, so the gate is never exactly 0 or 1; "
                    "stretch to (gamma, zeta) first"),
                (torch.sigmoid((L + log_alpha) * BETA) * (ZETA - GAMMA) + GAMMA, "divide by the temperature beta, "
                                                                                 "do not multiply"),
                (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA, "that is the test-time gate: a training sample "
                                                                   "adds the noise L = log u - log(1 - u)"),
                (torch.sigmoid((-L + log_alpha) / BETA) * (ZETA - GAMMA) + GAMMA,
                 "the noise is L = log u - log(1 - u) (yours has the opposite sign)")):
            expect(not torch.allclose(mine, other, atol=1e-6) and not torch.allclose(mine, other.clamp(0, 1),
                                                                                       atol=1e-6), hint)
        expect(mine.min() >= 0 and mine.max() <= 1, f"your gates range over [{mine.min():.3f}, {mine.max():.3f}]: "
                                                     "clip after the stretch, m = min(1, max(0, s_bar)), so that m "
                                                     "lies in [0, 1] with point masses at 0 and 1")
        expect(False, "your sample differs from mask(): s = sigmoid((log u - log(1 - u) + log alpha) / beta), "
                      "s_bar = s (zeta - gamma) + gamma, m = min(1, max(0, s_bar))")
    my_log_alpha = log_alpha.clone().requires_grad_(True)
    try:
        worst = assert_same_outputs_and_grads(lambda: my_hard_concrete(my_log_alpha, u), theirs,
                                              [(my_log_alpha, gate.log_alpha)], names=["log_alpha"])
    except RuntimeError as e:
        if "does not require grad" not in str(e):
            raise
        raise Wrong("your sample has no gradient in log alpha (a .detach() too many?): the reparameterisation "
                    "trick needs m to be a differentiable function of log alpha for a fixed u") from None
    return f"the sample and d(sample)/d(log alpha) = mask()'s in training (largest difference {worst:.1e})"


def check_expected_l0(my_expected_l0) -> str:
    """my_expected_l0(log_alpha) = DiffPruneLinear.expected_l0(): value and gradient."""
    log_alpha = _trained_looking(seed=2)
    gate = _gate_module(log_alpha)
    mine_in = log_alpha.clone().requires_grad_(True)
    mine, want = my_expected_l0(mine_in), gate.expected_l0()
    expect(isinstance(mine, torch.Tensor) and mine.numel() == 1, "return one number, the sum over the entries")
    if not torch.allclose(mine, want, rtol=1e-5):
        shift = BETA * math.log(-GAMMA / ZETA)
        for other, hint in (
                (torch.sigmoid(log_alpha - shift).mean(), "E||m||_0 counts the nonzero gates: the SUM over the "
                                                          "entries, not the mean"),
                (torch.sigmoid(log_alpha + shift).sum(), "the sign of the shift: P(m != 0) = sigmoid(log alpha - "
                                                         "beta log(-gamma / zeta)), and log(-gamma / zeta) < 0"),
                (torch.sigmoid(log_alpha).sum(), "P(m != 0) is not sigmoid(log alpha): the stretch moves the "
                                                 "threshold, sigmoid(log alpha - beta log(-gamma / zeta))"),
                (torch.sigmoid(log_alpha - math.log(-GAMMA / ZETA)).sum(), "the shift is beta log(-gamma / zeta): "
                                                                          "the temperature beta multiplies it")):
            expect(not torch.allclose(mine.detach(), other, rtol=1e-5), hint)
        expect(False, f"{mine.item():.2f}, want {want.item():.2f}: sum of sigmoid(log alpha - beta log(-gamma / "
                      "zeta))")
    want.backward()
    try:
        mine.backward()
    except RuntimeError as e:
        if "does not require grad" not in str(e):
            raise
        raise Wrong("the value is right but it has no gradient in log alpha (a .detach() or .item() too many?): "
                    "the penalty trains log alpha") from None
    expect(mine_in.grad is not None and torch.allclose(mine_in.grad, gate.log_alpha.grad, atol=1e-7),
           "the value is right but its gradient in log alpha is not (a .detach() or .item() too many?): the "
           "penalty trains log alpha")
    return f"E||m||_0 = {want.item():.1f} of {log_alpha.numel():,} = expected_l0(), value and gradient"


def check_test_gate(my_test_gate) -> str:
    """my_test_gate(log_alpha) = DiffPruneLinear.mask() outside training."""
    log_alpha = _trained_looking(seed=3)
    want = _gate_module(log_alpha).eval().mask().detach()
    mine = my_test_gate(log_alpha.clone())
    expect(isinstance(mine, torch.Tensor) and mine.shape == want.shape,
           f"return one gate per entry, shape {tuple(want.shape)}")
    mine = mine.detach()
    again = my_test_gate(log_alpha.clone()).detach()
    expect(torch.equal(mine, again), "two calls give different gates: at test time there is no noise (L = 0)")
    if not torch.allclose(mine, want, atol=1e-6):
        s = torch.sigmoid(log_alpha)
        expect(mine.min() >= 0 and mine.max() <= 1, "clip the stretched value to [0, 1]: min(1, max(0, ...))")
        for other, hint in ((s, "stretch sigmoid(log alpha) to (gamma, zeta) before clipping: 1.2 sigmoid(log alpha) "
                                "- 0.1; the gate is then exactly 0 or 1 for large |log alpha|"),
                            ((s + GAMMA) * (ZETA - GAMMA), "the stretch is applied in the wrong order: scale by "
                                                           "(zeta - gamma), then shift by gamma")):
            expect(not torch.allclose(mine, other.clamp(0, 1), atol=1e-6), hint)
        expect(False, "your gate differs from mask() in eval mode: min(1, max(0, sigmoid(log alpha) (zeta - gamma) "
                      "+ gamma))")
    edges = my_test_gate(torch.tensor([[math.log(11) + 0.01, -math.log(11) - 0.01]])).detach().flatten()
    expect(edges[0] == 1 and edges[1] == 0, "exactly 1 from log alpha = log 11 on, exactly 0 below -log 11")
    return "= mask() in eval mode; exactly 0 and 1 beyond -log 11 and log 11"


def check_finalize(my_finalize) -> str:
    """my_finalize(module, density) -> (eta, phi): the k largest |m_hat w| with the test-time gate, = finalize."""
    base = make_base(0)
    model = apply_method(copy.deepcopy(base), "diff_pruning", targets=TOY_TARGETS)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, diff_pruning.DiffPruneLinear):
                m.log_alpha.copy_(2.0 * torch.randn(m.log_alpha.shape, generator=g))
                m.diff.copy_(0.02 * torch.randn(m.diff.shape, generator=g))
    model.train()   # a model still in training mode: the cut must not use a sampled gate
    names = peft.match_targets(base, TOY_TARGETS)
    density = 0.2
    cut = diff_pruning.finalize(copy.deepcopy(model), density)
    for n in names:
        module = model.get_submodule(n)
        result = my_finalize(module, density)
        expect(isinstance(result, (tuple, list)) and len(result) == 2, "return (eta, phi)")
        eta, phi = (torch.as_tensor(t).detach() for t in result)
        want = cut.get_submodule(n)
        k = len(want.values)
        expect(eta.numel() == k and phi.numel() == k,
               f"{n}: keep k = max(1, round(density * numel)) = {k} entries; you keep {eta.numel()}")
        if not torch.equal(eta, want.indices):
            expect(not torch.equal(eta.sort().values, want.indices), "the right positions, but return eta sorted "
                                                                     "(sparse_ft's convention), phi in the same order")
            with torch.no_grad():
                m_hat = module.eval().mask()
                module.train()
                w = module.diff.detach()
            for other, hint in ((w.abs(), "you rank by |w|: the cut keeps the largest |m_hat * w|, the diff as the "
                                          "test-time gate lets it through"),
                                (m_hat * w, "the largest |m_hat * w|: a large negative entry counts as much"),
                                (m_hat, "you rank by the gate alone: the cut keeps the largest |m_hat * w|")):
                expect(not torch.equal(eta.sort().values, _top_k(other, density)), hint)
            expect(False, f"{n}: your eta differs from finalize's: the k largest |m_hat * w| with the deterministic "
                          "(test-time) gate m_hat, not a training sample")
        if not torch.allclose(phi, want.values.detach(), atol=1e-7):
            expect(not torch.allclose(phi, module.diff.detach().flatten()[eta], atol=1e-7),
                   "phi is the gated value (m_hat * w) at eta, not the raw diff w")
            expect(False, f"{n}: your phi differs from finalize's: (m_hat * w).flatten()[eta]")
    return f"eta and phi = diff_pruning.finalize's on {len(names)} weights (density {density})"


# ---------------------------------------------------------------------------------------------- exercises

def exercise_1(expected_l0_v_proj) -> str:
    """E||m||_0 of a tiny v_proj (2,048 entries) at log alpha = -1 everywhere."""
    model = apply_method(make_base(0), "diff_pruning", targets=("layers.0.self_attn.v_proj",), init_log_alpha=-1.0)
    want = model.layers[0].self_attn.v_proj.expected_l0().item()
    expect(isinstance(expected_l0_v_proj, (int, float)), f"give a number, got {type(expected_l0_v_proj).__name__}")
    expect(abs(expected_l0_v_proj - 2048) > 0.5, "2,048 counts the test-time gates that are open (all, at log alpha "
                                                 "= -1); in training a gate is 0 with probability "
                                                 "1 - sigmoid(log alpha - beta log(-gamma / zeta))")
    expect(abs(expected_l0_v_proj - 2048 / (1 + math.e)) > 0.5, "P(m != 0) is not sigmoid(log alpha): the stretch "
                                                                "shifts it by -beta log(-gamma / zeta)")
    expect(abs(expected_l0_v_proj - want) < 0.5, f"{expected_l0_v_proj:.1f} is not it: the sum over the entries of "
                                                 "sigmoid(log alpha - beta log(-gamma / zeta))")
    return f"E||m||_0 = {want:.1f} of 2,048 entries (DiffPruneLinear.expected_l0)"


def exercise_2(sparse_vs_lora) -> str:
    """(density, sparse_ft's file bytes, LoRA's) for r = 8 on q_proj and o_proj of Llama-3.2-1B."""
    expect(isinstance(sparse_vs_lora, (tuple, list)) and len(sparse_vs_lora) == 3,
           "give three numbers: (density, sparse_bytes, lora_bytes)")
    density, sparse_bytes, lora_bytes = sparse_vs_lora
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    expect(isinstance(density, (int, float)) and 0 < density <= 1, f"density {density}: a number in (0, 1]")
    with torch.device("meta"):
        sparse = apply_method(Llama(cfg), "sparse_ft", density=density, targets=("q_proj", "o_proj"))
        lora = apply_method(Llama(cfg), "lora", r=8, targets=("q_proj", "o_proj"))
    n_sparse, n_lora = peft.count_parameters(sparse)[0], peft.count_parameters(lora)[0]
    expect(n_sparse == n_lora, f"density {density} trains {n_sparse:,}, LoRA r=8 {n_lora:,}: k = r (n_in + n_out) "
                               "per weight")
    file_bytes = {name: sum(t.numel() * t.element_size() for t in adapter_state(m).values())
                  for name, m in (("sparse", sparse), ("lora", lora))}
    expect(sparse_bytes != 8 * n_sparse, f"{sparse_bytes:,}: minipeft stores eta as int64, 8 bytes per index "
                                         "(plus 4 per fp32 value)")
    expect(sparse_bytes != 4 * n_sparse, f"{sparse_bytes:,} counts the values only: each also has its int64 index")
    expect(sparse_bytes == file_bytes["sparse"], f"{sparse_bytes:,} is not it: 4 bytes per value plus 8 per int64 "
                                                 "index")
    expect(lora_bytes == file_bytes["lora"], f"{lora_bytes:,} is not it: 4 bytes per value of A and B")
    return (f"{n_lora:,} trainable values each: sparse_ft {sparse_bytes:,} bytes, LoRA {lora_bytes:,} bytes "
            f"({sparse_bytes / lora_bytes:.0f}x, the int64 indices)")


class _ConstantGradient(nn.Module):
    """A one-layer 'model' whose loss is <G, W>: every warm-up step sees the gradient G."""

    def __init__(self, W0: torch.Tensor, G: torch.Tensor):
        super().__init__()
        self.layer = nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(W0)
        self.G = G

    def forward(self, idx, targets):
        return None, (self.layer(torch.eye(self.G.shape[1])) * self.G.T).sum()   # layer(I) = W^T: <W, G>


def exercise_3(kept_positions) -> str:
    """(magnitude's 2 positions, movement's 2) for W_0 = (0.8, -0.5, 0.1, -0.05), G = (0.4, 0.2, -0.3, 0.1)."""
    expect(isinstance(kept_positions, (tuple, list)) and len(kept_positions) == 2,
           "give two sets: (magnitude's positions, movement's positions)")
    W0, G = torch.tensor([[0.8, -0.5, 0.1, -0.05]]), torch.tensor([[0.4, 0.2, -0.3, 0.1]])
    picks = {}
    for strategy in ("magnitude", "movement"):
        toy = apply_method(_ConstantGradient(W0, G), "sparse_ft", density=0.5, targets=("layer",))
        sparse_ft.select(toy, strategy, [(None, None)] * 3, lr=0.1)
        picks[strategy] = set(toy.layer.indices.tolist())
    magnitude, movement = (set(int(i) for i in s) for s in kept_positions)
    expect((magnitude, movement) != (picks["movement"], picks["magnitude"]), "the two sets are swapped: "
                                                                             "(magnitude's, movement's)")
    expect(magnitude == picks["magnitude"], "magnitude: the 2 largest |W_3|, W_3 = W_0 - 3 lr G")
    expect(movement != {0, 1}, "movement: position 0 is large but G has its sign, so every step shrinks it: "
                               "-G W < 0; rank by -sum_t G W_t over W_0, W_1, W_2")
    expect(movement == picks["movement"], "movement: the 2 largest -sum_t G W_t, over W_0, W_1, W_2")
    return f"sparse_ft.select keeps {picks['magnitude']} by magnitude and {picks['movement']} by movement"
