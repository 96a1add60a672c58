"""The labs' shared code: the toy task, the build checks, and the status lines the grader reads.

A lab hands the student a stub (`raise NotImplementedError` under a docstring that gives the shapes, the
equation and the initialisation); the cell under it runs one check through `check`, which never raises and
prints ONE line that `python -m minipeft.grade` reads:

    Build 1 (MyLoRA): not built yet (fill in the cell above, then run this cell again)
    Build 1 (MyLoRA): wrong. Hint: B must start at zero, so the model starts as the base model
    Build 1 (MyLoRA): passed (same logits and same gradients ...)
    Exercise 2: not done yet / wrong. Hint: ... / correct

Each lab's checks live in `minipeft/lab/labNN.py`: functions that take the student's object, raise `Wrong`
(through `expect`) with a hint that names the likely mistake, and return a one-line summary when it passes.

The toy task (notebooks 02, 03, 04, 06, 10, 12, 13): a student starts as `make_base()` and learns to match
the next-token distribution of `make_teacher(base)`, whose `targets` weights carry an extra random
rank-`rank` update of relative size `size`. The loss is KL(teacher || student) on random token
sequences, reported relative to the base model's KL on the same tokens (1 = no better than the base),
so a method's progress reads the same whatever the model's size.

    base = make_base()
    teacher = make_teacher(base)
    data = toy_data(base, teacher, steps=100)
    losses, held_out = train(student, data, lr=1e-2)
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from .. import peft
from ..llama import Llama, LlamaConfig

TOY_TARGETS = ("v_proj", "o_proj")


# ----------------------------------------------------------------------------------------------
# Status lines: what a check cell prints, and what the grader reads

class Wrong(AssertionError):
    """A lab check failed; the message is the hint the student sees."""


def expect(condition: bool, hint: str) -> None:
    """Raise Wrong(hint) unless `condition`: every check states the mistake it looks for."""
    if not condition:
        raise Wrong(hint)


def check(label: str, test: Callable[..., str | None], *args) -> bool:
    """Run `test(*args)` and print one status line for `label` ("Build N (name)" or "Exercise N").

    A bare `NotImplementedError` (the stub) or an argument that is still None (an unanswered exercise)
    means "not built yet" / "not done yet"; `Wrong` (or any AssertionError) prints its hint; any other
    error is the student's code failing, printed with its type. Never raises, so the notebook runs on.
    Returns True when the check passed."""
    done, todo = ("correct", "not done yet") if label.startswith("Exercise") else ("passed", "not built yet")
    try:
        if any(arg is None for arg in args):
            raise NotImplementedError
        with torch.random.fork_rng(devices=[]):  # the cells after a check draw the same numbers, built or not
            detail = test(*args)
    except NotImplementedError as e:
        if e.args:  # raised with a message: not the stub, but code (the student's or minipeft's) refusing
            hint = f"your code raised NotImplementedError: {e}"
        else:
            print(f"{label}: {todo} (fill in the cell above, then run this cell again)")
            return False
    except AssertionError as e:
        hint = str(e) or "a check failed without a message (a bug in the lab: please report it)"
    except Exception as e:  # the student's code failed to run: say how
        hint = f"your code raised {type(e).__name__}: {e}"
    else:
        print(f"{label}: {done}" + (f" ({detail})" if detail else ""))
        return True
    print(f"{label}: wrong. Hint: {hint}")
    return False


def call_with_hint(fn: Callable, *args, hint: str):
    """fn(*args); a RuntimeError (a shape mismatch, mostly) becomes Wrong(hint) with the error's text. The
    stub's bare NotImplementedError (a RuntimeError subclass) passes through."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        raise Wrong(f"{hint} (your code raised RuntimeError: {str(e).splitlines()[0]})") from None


def close(a, b: torch.Tensor, atol: float = 1e-4) -> bool:
    """`a` is a tensor of b's shape, equal to `atol` relative to the larger of 1 and b's largest entry."""
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item()))


def name_the_mistake(mine: torch.Tensor, variants: dict[str, torch.Tensor], fallback: str) -> None:
    """Raise Wrong with the hint of the first typical mistake whose result `mine` reproduces, else `fallback`."""
    for hint, wrong in variants.items():
        if close(mine, wrong):
            raise Wrong(hint)
    raise Wrong(fallback)


def make_base(seed: int = 0, config: LlamaConfig | None = None) -> Llama:
    """The "tiny" preset (or `config`) with unit-gain random weights, so attention is far from uniform."""
    torch.manual_seed(seed)
    model = Llama(config or LlamaConfig.from_name("tiny"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model.eval()


def make_teacher(base: Llama, rank: int = 4, size: float = 0.5, seed: int = 1,
                 targets: tuple[str, ...] = TOY_TARGETS) -> Llama:
    """A copy of `base` whose `targets` weights get W += size * |W| / |D| * D, D a random rank-`rank` matrix."""
    teacher, g = copy.deepcopy(base), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in peft.match_targets(teacher, targets):
            w = teacher.get_submodule(name).weight                                  # (out, in)
            delta = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            w += size * w.norm() / delta.norm() * delta
    return teacher


def toy_data(base: Llama, teacher: Llama, steps: int, batch: int = 8, seq: int = 16, seed: int = 2) -> list:
    """steps + 4 batches of (tokens, teacher log-probs, the base's KL on them); the last 4 are held out."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, teacher.config.vocab_size, ((steps + 4) * batch, seq), generator=g)
    with torch.no_grad():
        logp = F.log_softmax(teacher(idx), -1)                                      # (N, seq, vocab)
        base_kl = (logp.exp() * (logp - F.log_softmax(base(idx), -1))).sum(-1).mean(-1)  # (N,)
    return [(i, lp, kl.mean().item()) for i, lp, kl in zip(idx.split(batch), logp.split(batch), base_kl.split(batch))]


def kl_loss(student: Llama, idx: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, averaged."""
    logp = F.log_softmax(student(idx), -1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def train(student: Llama, data: list, lr: float,
          on_step: Callable[[int], None] | None = None) -> tuple[list[float], float]:
    """Adam over the trainable parameters. Returns the loss of every step and the held-out loss at
    the end, each relative to the base model's loss on the same tokens (1 = no better than the base)."""
    opt = torch.optim.Adam(peft.param_groups(student, lr))
    losses = []
    for step, (idx, target, base_kl) in enumerate(data[:-4]):
        loss = kl_loss(student, idx, target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / base_kl)
        if on_step is not None:
            on_step(step)
    with torch.no_grad():
        held_out = sum(kl_loss(student, idx, target).item() for idx, target, _ in data[-4:])
    return losses, held_out / sum(base_kl for _, _, base_kl in data[-4:])


# ----------------------------------------------------------------------------------------------
# "Build, then check": the labs' student-written methods against minipeft's modules


def assert_same_outputs_and_grads(mine: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor],
                                  pairs: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0,
                                  atol: float = 1e-5, names: list[str] | None = None) -> float:
    """Check that mine() and theirs() give the same output, and that L = <G, output> (one fixed random G)
    gives each (my tensor, their tensor) in `pairs` the same gradient, each to `atol` relative to the largest
    value (or 1); raises Wrong with a hint otherwise. `names`: the pairs' names for the hints. Returns the
    largest relative difference seen."""
    names = names or [f"tensor {i}" for i in range(len(pairs))]
    for p in (t for pair in pairs for t in pair):
        p.grad = None
    out_mine, out_theirs = mine(), theirs()
    expect(out_mine.shape == out_theirs.shape,
           f"your output has shape {tuple(out_mine.shape)}, minipeft's {tuple(out_theirs.shape)}")
    scale = max(1.0, out_theirs.abs().max().item())  # tolerances are relative to the largest value (or 1)
    worst = (out_mine - out_theirs).abs().max().item() / scale
    expect(worst <= atol, f"the outputs differ by up to {worst * scale:.2e}: the forward pass computes something "
                          "else (a wrong scale? a transposed factor? a term missing?)")
    G = torch.randn(out_theirs.shape, generator=torch.Generator().manual_seed(seed), dtype=out_theirs.dtype)
    (G * out_mine).sum().backward()
    (G * out_theirs).sum().backward()
    for name, (p_mine, p_theirs) in zip(names, pairs):
        expect(p_mine.shape == p_theirs.shape,
               f"{name} has shape {tuple(p_mine.shape)}, minipeft's {tuple(p_theirs.shape)} (transposed?)")
        expect(p_mine.grad is not None, f"{name} got no gradient (a .detach() or torch.no_grad() too many?)")
        diff = (p_mine.grad - p_theirs.grad).abs().max().item()
        scale = max(1.0, p_theirs.grad.abs().max().item())
        expect(diff <= atol * scale, f"the outputs agree but the gradients of {name} differ by up to {diff:.2e}: "
                                     "a .detach() missing or one too many?")
        worst = max(worst, diff / scale)
    return worst


def check_build(mine: torch.nn.Module, theirs: torch.nn.Module, idx: torch.Tensor,
                rename: dict[str, str] | Callable[[str], str] = None, noise: float = 0.1, seed: int = 0,
                atol: float = 1e-5) -> str:
    """The labs' check of a method built in the notebook (`mine`, a model) against minipeft's (`theirs`).

    Each trainable parameter of `mine` is paired with one of `theirs`: its name with the last part renamed by
    the dict `rename` ({"A": "lora_A"}), or mapped by the function `rename`. Both must train the same number
    of values. Then `theirs`' trainable tensors get random noise of size `noise` (so no factor sits at its
    zero initialisation and every gradient is exercised), are copied into `mine`, and both models must give
    the same logits on `idx` and the same gradient for every pair. Returns a one-line summary."""
    if rename is None:
        rename = {}
    to_theirs = rename if callable(rename) else (
        lambda name: ".".join(name.split(".")[:-1] + [rename.get(name.split(".")[-1], name.split(".")[-1])]))
    theirs_params = dict(theirs.named_parameters())
    mine_trainable = [(n, p) for n, p in mine.named_parameters() if p.requires_grad]
    missing = [n for n, _ in mine_trainable if to_theirs(n) not in theirs_params]
    if missing:
        raise Wrong(f"your trainable tensor {missing[0]!r} has no counterpart in minipeft's model (no "
                    f"{to_theirs(missing[0])!r}): a wrong name, or should it be trainable at all?")
    n_mine = sum(p.numel() for _, p in mine_trainable)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    expect(n_mine == n_theirs, f"you train {n_mine:,} numbers, minipeft trains {n_theirs:,} (a factor's shape, "
                               "or a frozen tensor left trainable?)")
    g = torch.Generator().manual_seed(seed)
    pairs = [(p, theirs_params[to_theirs(n)]) for n, p in mine_trainable]
    with torch.no_grad():
        for p_mine, p_theirs in pairs:
            p_theirs.add_(noise * torch.randn(p_theirs.shape, generator=g))
            p_mine.copy_(p_theirs)
    worst = assert_same_outputs_and_grads(lambda: mine(idx), lambda: theirs(idx), pairs, seed, atol,
                                          names=[n for n, _ in mine_trainable])
    return (f"same logits and same gradients for all {len(pairs)} trainable tensors ({n_mine:,} numbers); "
            f"largest difference {worst:.1e}")
