"""minipeft.lab's "build, then check" helpers: a correct hand-written method passes, and a wrong forward, a
wrong gradient or a missing trainable tensor each fail; and every lab's checks pass on its solution and say
"not built" / "not done" on its stubs.

    .venv/bin/python -m pytest tests/test_lab_check.py
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lab_cells import namespace, run_checks
from minipeft import peft
from minipeft.adapters import apply_method
from minipeft.lab import check_build, make_base


class HandLoRA(nn.Module):
    """LoRA written out, as notebook 02 does; `scale` and `grad_factor` let a test break it."""

    def __init__(self, base: nn.Linear, r: int = 8, scale: float = 2.0, grad_factor: float = 1.0):
        super().__init__()
        self.base, self.scale, self.grad_factor = base, scale, grad_factor
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        B = self.B + (self.grad_factor - 1) * (self.B - self.B.detach())  # the value of B, gradient x grad_factor
        return self.base(x) + self.scale * (x @ self.A.T) @ B.T


def hand_model(base, targets=("q_proj", "v_proj"), **kw):
    model = copy.deepcopy(base)
    peft.inject(model, targets, lambda name, linear: HandLoRA(linear, **kw))
    return model


@pytest.fixture(scope="module")
def setup():
    base = make_base(0)
    return base, torch.randint(0, base.config.vocab_size, (2, 8))


def test_a_correct_build_passes(setup):
    base, idx = setup
    theirs = apply_method(copy.deepcopy(base), "lora", r=8, alpha=16)
    summary = check_build(hand_model(base), theirs, idx, {"A": "lora_A", "B": "lora_B"})
    assert "same logits and same gradients for all 8 trainable tensors" in summary


@pytest.mark.parametrize("broken, message", [
    (dict(scale=1.0), "outputs differ"),                       # wrong alpha / r
    (dict(targets=("q_proj",)), "you train"),                  # a target forgotten
])
def test_a_wrong_build_fails(setup, broken, message):
    base, idx = setup
    targets = broken.pop("targets", ("q_proj", "v_proj"))
    theirs = apply_method(copy.deepcopy(base), "lora", r=8, alpha=16)
    with pytest.raises(AssertionError, match=message):
        check_build(hand_model(base, targets, **broken), theirs, idx, {"A": "lora_A", "B": "lora_B"})


def test_a_wrong_gradient_fails(setup):
    """Same logits, but B's gradient is 1.5 times too large: the gradient check must catch it."""
    base, idx = setup
    theirs = apply_method(copy.deepcopy(base), "lora", r=8, alpha=16)
    with pytest.raises(AssertionError, match="gradients of .* differ"):
        check_build(hand_model(base, grad_factor=1.5), theirs, idx, {"A": "lora_A", "B": "lora_B"})


def test_unknown_parameter_name_fails(setup):
    base, idx = setup
    theirs = apply_method(copy.deepcopy(base), "lora", r=8, alpha=16)
    with pytest.raises(AssertionError, match="has no counterpart in minipeft's model"):
        check_build(hand_model(base), theirs, idx, {"A": "lora_A"})  # B not renamed


LABS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("lab", LABS)
def test_every_check_passes_on_the_solution_and_says_not_built_on_the_stubs(lab):
    """In-process (tests/lab_cells.py): the solution's student cells pass every check of the lab; the shipped
    stubs make every build check say "not built" and every exercise check "not done". The labs'
    tests/test_lab_NN.py then plant typical mistakes in the solution's cells."""
    assert {it.status for it in run_checks(lab, namespace(lab)).values()} == {"passed"}
    shipped = run_checks(lab, namespace(lab, solution=False))
    assert {it.status for it in shipped.values()} == {"not built", "not done"}
