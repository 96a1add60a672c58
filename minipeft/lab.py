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
