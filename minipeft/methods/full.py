"""Full fine-tuning: every weight trains (or a chosen subset by name); the reference row of every table.

No paper of its own: it is the baseline that PEFT papers compare against (Houlsby et al. 2019,
arXiv:1902.00751, and Hu et al. 2021, arXiv:2106.09685, report "FT" rows). The update is plain

    W <- W - lr * AdamW(dL/dW)     for every W whose name matches `targets`

`targets` are parameter names or globs, matched against the full name or its tail, as module names
are in peft.match_targets: ("*",) trains everything; ("layers.15.*", "norm.weight") only the top
block and the final norm. With tied embeddings (Llama 3.2 1B/3B) `embed_tokens.weight` and
`lm_head.weight` are ONE tensor: naming either trains both. Vectors (the RMSNorm scales) are tagged
`no_weight_decay`, as in nanoGPT (decay would pull a scale towards 0, not 1).

Identity at init: trivially (nothing is added). Merges: trivially yes, there is nothing to fold:
peft.merge finds no adapter module and leaves the weights as they are. save_adapter writes every
trainable tensor, i.e. the changed weights (all of them with ("*",): a full checkpoint, written with
the same atomicity: tensors first, then the JSON naming their sha256); load_adapter re-applies
`full` with the same targets and copies the tensors in.

Memory for Llama-3.2-1B (1,235,814,400 weights; AdamW keeps two fp32 moments per weight):
  * mixed precision as usually quoted: bf16 weights + fp32 master copy, m, v = 1.24 B x (2 + 12)
    bytes = 17.3 GB (16.1 GiB), plus bf16 gradients (2.5 GB) and the activations;
  * minipeft's finetune keeps every trainable tensor in fp32 (prepare_model makes them the master
    weights), so here it is 4 (weights) + 4 (gradients) + 8 (m, v) = 16 bytes per weight: 19.8 GB
    (18.4 GiB) before activations.
It does not fit on 8, 12 or 16 GB GPUs (T4, V100-16GB, RTX 4060/4070/4080), and not on a 24 GB card
(RTX 3090/4090, A10) without gradient checkpointing and short sequences, if then; it fits on
40/80 GB A100s, H100s and H200s. On a CPU it needs ~20 GB of RAM and is very slow. The toy base
(data/toy_base/, 1,246,848 weights) trains fully on a CPU.
Disk, for a finetune run folder on 1B with ("*",): adapter/ holds the fp32 weights (4.9 GB) and
train_state.pt (for --resume) holds them again plus AdamW's two moments (14.8 GB).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from .. import peft


@dataclass
class FullConfig:
    method: ClassVar[str] = "full"
    targets: tuple[str, ...] = ("*",)   # parameter names or globs (full name or tail); "*" = every weight


def matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def apply(model: nn.Module, config: FullConfig) -> nn.Module:
    """Unfreeze every parameter whose name matches `config.targets` (error if none does)."""
    patterns = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    named = list(model.named_parameters(remove_duplicate=False))  # a tied tensor answers to both names
    chosen = [p for n, p in named if matches(n, patterns)]
    if not chosen:
        raise ValueError(f"full: targets {patterns} matched no parameter; names look like "
                         f"{[n for n, _ in named[:3]]}")
    peft.freeze_base_once(model)
    for p in chosen:
        p.requires_grad_(True)
        if p.ndim < 2:
            p.no_weight_decay = True
    peft.record(model, config)
    return model
