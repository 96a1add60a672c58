"""The notebooks' helpers: a small random Llama, a teacher that differs from it by a low-rank change,
and a short distillation loop, so each lab can compare methods on the same controlled task.

The task (used by notebooks 02, 03, 04 and 06): a student starts as `make_base()` and learns to match
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

from . import peft
from .llama import Llama, LlamaConfig

TOY_TARGETS = ("v_proj", "o_proj")


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
                                  atol: float = 1e-5) -> float:
    """Assert that mine() and theirs() give the same output, and that L = <G, output> (one fixed random G)
    gives each (my tensor, their tensor) in `pairs` the same gradient, each to `atol` relative to the largest
    value (or 1). Returns the largest relative difference seen."""
    for p in (t for pair in pairs for t in pair):
        p.grad = None
    out_mine, out_theirs = mine(), theirs()
    assert out_mine.shape == out_theirs.shape, f"output shapes differ: {tuple(out_mine.shape)} vs {tuple(out_theirs.shape)}"
    scale = max(1.0, out_theirs.abs().max().item())  # tolerances are relative to the largest value (or 1)
    worst = (out_mine - out_theirs).abs().max().item() / scale
    assert worst <= atol, f"outputs differ by up to {worst * scale:.2e} (tolerance {atol:g} x {scale:.3g})"
    G = torch.randn(out_theirs.shape, generator=torch.Generator().manual_seed(seed), dtype=out_theirs.dtype)
    (G * out_mine).sum().backward()
    (G * out_theirs).sum().backward()
    for i, (p_mine, p_theirs) in enumerate(pairs):
        assert p_mine.shape == p_theirs.shape, f"pair {i}: shapes {tuple(p_mine.shape)} vs {tuple(p_theirs.shape)}"
        assert p_mine.grad is not None, f"pair {i} {tuple(p_mine.shape)}: your tensor got no gradient"
        diff = (p_mine.grad - p_theirs.grad).abs().max().item()
        scale = max(1.0, p_theirs.grad.abs().max().item())
        assert diff <= atol * scale, f"pair {i} {tuple(p_mine.shape)}: gradients differ by up to {diff:.2e}"
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
    assert not missing, f"no parameter of minipeft's model is called {to_theirs(missing[0])!r} (yours: {missing[0]!r})"
    n_mine = sum(p.numel() for _, p in mine_trainable)
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_mine == n_theirs, f"you train {n_mine:,} numbers, minipeft trains {n_theirs:,}"
    g = torch.Generator().manual_seed(seed)
    pairs = [(p, theirs_params[to_theirs(n)]) for n, p in mine_trainable]
    with torch.no_grad():
        for p_mine, p_theirs in pairs:
            p_theirs.add_(noise * torch.randn(p_theirs.shape, generator=g))
            p_mine.copy_(p_theirs)
    worst = assert_same_outputs_and_grads(lambda: mine(idx), lambda: theirs(idx), pairs, seed, atol)
    return (f"same logits and same gradients for all {len(pairs)} trainable tensors ({n_mine:,} numbers); "
            f"largest difference {worst:.1e}")
