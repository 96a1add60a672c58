"""The one injection mechanism every PEFT method in minipeft shares.

A method plugs into a `Llama` in one (or both) of two ways:

1. Linear wrappers, swapped in by module name. `inject(model, targets, wrap)` finds the `nn.Linear`
   modules whose names match `targets` and replaces each by `wrap(name, linear)`. Targets are names
   or glob patterns over module names, matched against the full name or its tail:
   `["q_proj", "v_proj"]`, `"all-linear"` (every Linear in the decoder, not `lm_head`, as Hugging
   Face PEFT does), `"layers.1[0-5].*.down_proj"`. `wrap_modules(model, targets, wrap)` does the
   same for modules of any kind, e.g. a whole `mlp` (the parallel adapter reads its input).
2. Slots. `fill_slot(model, slot, make)` puts `make(layer_index, attention)` in one of the
   attention's named slots (`qk_adapter`, `kv_prefix`, `extra_branch`), or the model's
   `input_prefix`; see minipeft/llama.py.

Every base parameter is frozen first. A method module is then just: a config dataclass (with a
`method` name), the wrapper/slot modules, and an `apply(model, config)` that calls the two functions
above and `record(model, config)`.

What the core asks of adapter modules (duck-typed, no base class needed):
  * `merge()` / `unmerge()`: fold the adapter into / out of the base weight; the core makes both
    idempotent through the module's `merged` flag and transactional (checks first, rolls back). A
    module that cannot merge sets `mergeable = False` and may give a `why_not_mergeable` sentence;
    one whose merged form a Llama checkpoint cannot hold sets `unloadable = False` and
    `why_not_unloadable` (read by `merge_and_unload`). A Linear wrapper keeps its Linear in `.base`,
    which `match_targets` never selects again: methods do not nest.
  * `peft_method` (str): the method name, used by the parameter report.
  * parameters may carry `lr_scale` (float) and `no_weight_decay` (bool) attributes, read by
    `param_groups` (LoRA+, the B learning-rate boost).

Saving and loading live in minipeft/adapters.py (minipeft's format) and minipeft/hf_peft.py (Hugging
Face PEFT's); this file is about putting methods in place, plus `check_base`, which both use.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict
from typing import Callable

import torch
import torch.nn as nn

SLOTS = ("qk_adapter", "kv_prefix", "extra_branch")


def freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def freeze_base_once(model: nn.Module) -> None:
    """Freeze the base model the first time a method is put in place. Later calls (a second method,
    or one method injecting twice) must not freeze the adapter parameters created in between, and the
    cross-layer adapter parameters in `model.peft_shared` are never part of the base."""
    if getattr(model, "peft_base_frozen", False):
        return
    shared = {id(p) for p in model.peft_shared.parameters()} if hasattr(model, "peft_shared") else set()
    for p in model.parameters():
        if id(p) not in shared:
            p.requires_grad_(False)
    model.peft_base_frozen = True


def match_targets(model: nn.Module, targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules that `targets` selects (in model order); error if none.

    Methods do not nest: the Linear inside a wrapper (`q_proj.base`) is never a candidate, and a
    target that names an already wrapped Linear (or "all-linear" while any is wrapped) is refused
    with "already has <method> on <name>", instead of wrapping the wrapper's inner Linear."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    adapters = {n for n, m in model.named_modules() if hasattr(m, "peft_method")}
    wrapped = {n: m.peft_method for n, m in model.named_modules()
               if n in adapters and isinstance(getattr(m, "base", None), nn.Linear)}

    def inside_adapter(n: str) -> bool:  # a wrapper's .base, a prefix MLP's layers, ...
        parts = n.split(".")
        return parts[0] == "peft_shared" or any(".".join(parts[:i]) in adapters for i in range(1, len(parts)))

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
               and not inside_adapter(n)]

    def selected(n: str) -> bool:
        return "all-linear" in patterns or any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, "*." + p)
                                               for p in patterns)

    taken = [n for n in wrapped if selected(n)]  # in model order
    if taken:
        raise ValueError(f"targets {patterns}: the model already has {wrapped[taken[0]]} on {taken[0]}"
                         f"{f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''}; minipeft does not "
                         "nest methods on one Linear: choose other targets, or load into a fresh base model")
    hits = [n for n in linears if selected(n)]
    if not hits:
        examples = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(f"targets {patterns} matched no linear module; names look like "
                         f"'{linears[0] if linears else ''}', leaf names are {examples}")
    return hits


def inject(model: nn.Module, targets, wrap: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Freeze the base model and replace each matched Linear by `wrap(name, linear)`."""
    names = match_targets(model, targets)
    freeze_base_once(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # new modules start in training mode; follow the model's mode (dropout off in an eval model)
        setattr(parent, child, wrap(name, getattr(parent, child)).train(model.training))
    return names


def wrap_modules(model: nn.Module, targets, wrap: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Like inject, for modules of any kind (a method that must see a whole sub-layer's input and
    output, e.g. the parallel adapter around `mlp`): names or globs as in match_targets. Every
    wrapper is built before any is swapped in, so a wrap that raises leaves the model unchanged."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    names = [n for n, _ in model.named_modules()
             if n and any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, "*." + p) for p in patterns)]
    if not names:
        raise ValueError(f"targets {patterns} matched no module; module names look like 'layers.0.mlp'")
    nested = [n for n in names if any(n.startswith(m + ".") for m in names)]
    if nested:
        raise ValueError(f"targets {patterns} match '{nested[0]}' and a module that contains it; pick one level")
    wrapped = {name: wrap(name, model.get_submodule(name)) for name in names}
    freeze_base_once(model)
    for name, new in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new.train(model.training))
    return names


MODEL_SLOTS = ("input_prefix", "token_adapter")  # the model-level slots (llama.py's docstring)


def fill_slot(model: nn.Module, slot: str, make: Callable[[int, nn.Module], nn.Module],
              layers: list[int] | None = None) -> None:
    """Freeze the base model and fill `slot` of the chosen layers' attention (all by default)
    with `make(layer_index, attention)`; a model-level slot ("input_prefix": the prompt slot,
    "token_adapter": the token-id slot) is filled once with `make(-1, model)`."""
    if slot in MODEL_SLOTS:
        if getattr(model, slot) is not None:
            raise ValueError(f"the model's {slot} slot is already filled by {type(getattr(model, slot)).__name__}")
        freeze_base_once(model)
        setattr(model, slot, make(-1, model).train(model.training))
        return
    if slot not in SLOTS:
        raise ValueError(f"unknown slot '{slot}'; the attention has {SLOTS} and the model {MODEL_SLOTS}")
    freeze_base_once(model)
    layers = range(len(model.layers)) if layers is None else layers
    for i in layers:  # check every layer before filling any, so a refusal changes nothing
        attn = model.layers[i].self_attn
        if getattr(attn, slot) is not None:
            raise ValueError(f"layers.{i}.self_attn.{slot} is already filled by {type(getattr(attn, slot)).__name__}")
    for i in layers:
        attn = model.layers[i].self_attn
        setattr(attn, slot, make(i, attn).train(model.training))


def shared_container(model: nn.Module) -> nn.ModuleDict:
    """A ModuleDict on the model for parameters shared across layers (Tied-LoRA and friends).

    Layers keep plain (unregistered) references to what they share, so each shared tensor appears
    once in parameters() and state_dict(), under `peft_shared.<key>`.
    """
    if not hasattr(model, "peft_shared"):
        model.peft_shared = nn.ModuleDict()
    return model.peft_shared


def record(model: nn.Module, config) -> None:
    """Remember which method (and hyper-parameters) was applied; save_adapter writes this down."""
    if not hasattr(model, "peft_configs"):
        model.peft_configs = []
    model.peft_configs.append(config)


def add_extra_loss(model: nn.Module, fn: Callable) -> None:
    """Register a training-loss term a method contributes (AdaMix's consistency regulariser).

    finetune.train_step adds `fn(model, forward, batch, logits)` to each micro-batch's loss, where
    batch = (idx, targets, segment_ids) and `forward` is what computed the loss (the model, or its
    compiled form), so the term may run a second forward. `logits` is that forward's (B, T, vocab)
    output if any registered term sets `needs_logits = True`, else None (the loss is then computed
    without ever building the logits). The term is trained on, never reported: the logged loss
    stays the cross-entropy."""
    if not hasattr(model, "peft_extra_losses"):
        model.peft_extra_losses = []
    model.peft_extra_losses.append(fn)


def add_step_hook(model: nn.Module, fn: Callable) -> None:
    """Register `fn(model, step)`, run after every optimiser step (AdaLoRA's budget schedule, DyLoRA).

    finetune.train_step calls `run_step_hooks(model, step)` after `opt.step()` and BEFORE the gradients
    are cleared, so a hook may read `p.grad` (AdaLoRA's sensitivity |theta * grad|). `step` is the
    global step just completed, counting from 1."""
    if not hasattr(model, "peft_step_hooks"):
        model.peft_step_hooks = []
    model.peft_step_hooks.append(fn)


def run_step_hooks(model: nn.Module, step: int | None = None) -> None:
    """Call every registered step hook with `step` (None: one more than the last step seen, so a
    caller that does not count steps still gets 1, 2, 3, ...)."""
    step = getattr(model, "peft_last_step", 0) + 1 if step is None else step
    model.peft_last_step = step
    for fn in getattr(model, "peft_step_hooks", []):
        fn(model, step)


def applied_configs(model: nn.Module) -> list[dict]:
    return [dict(method=c.method, **asdict(c)) for c in getattr(model, "peft_configs", [])]


# ----------------------------------------------------------------------------------------------
# Merging


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "peft_method")]


def merge(model: nn.Module) -> None:
    """Fold every adapter into the base weights (idempotent). Transactional: it refuses, changing
    nothing, if any adapter cannot be merged (checked first), and if a merge still fails midway the
    modules merged so far are unmerged again before the error propagates."""
    mods = adapter_modules(model)
    _refuse_quantized_base(mods, "merge")
    blocked = [(n, m) for n, m in mods if not getattr(m, "mergeable", True)]
    if blocked:
        n, m = blocked[0]
        raise NotImplementedError(f"cannot merge: {m.peft_method} at '{n}' " +
                                  getattr(m, "why_not_mergeable", "has no merge rule") +
                                  f" ({len(blocked)} such module(s)); nothing was merged")
    _switch(mods, to_merged=True)


def _refuse_quantized_base(mods: list[tuple[str, nn.Module]], what: str) -> None:
    """A quantised base (minipeft/quant.py) has no dense weight to add the update to: refuse."""
    quantized = [n for n, m in mods if getattr(getattr(m, "base", None), "quantized", False)]
    if quantized:
        raise NotImplementedError(
            f"cannot {what}: the base at '{quantized[0]}' ({len(quantized)} module(s)) is quantised (NF4/int8); "
            "adding the update there would round it away to 4/8 bits. Call minipeft.quant.dequantize_model(model) "
            "first (a bf16 base carrying the quantisation error), then merge; nothing was merged")


def unmerge(model: nn.Module) -> None:
    """Undo merge() (idempotent; transactional like merge)."""
    _switch(adapter_modules(model), to_merged=False)


def _switch(mods: list[tuple[str, nn.Module]], to_merged: bool) -> None:
    """Merge (or unmerge) each module not yet in that state; on an error, undo the ones done."""
    done = []
    try:
        for _, m in mods:
            if bool(getattr(m, "merged", False)) != to_merged:
                with torch.no_grad():
                    m.merge() if to_merged else m.unmerge()
                m.merged = to_merged
                done.append(m)
    except BaseException:
        for m in reversed(done):  # roll back, newest first
            with torch.no_grad():
                m.unmerge() if to_merged else m.merge()
            m.merged = not to_merged
        raise


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into the weights and put the plain nn.Linear modules back: a plain `Llama`
    whose `save_pretrained` folder loads in minipeft and in Hugging Face transformers.

    Only wrappers of a Linear (a module with `.base`) can be unloaded. A method that lives in a slot
    (prefix/prompt tuning, LLaMA-Adapter's prompts, (IA)^3++'s QK skip-norm) or that a Llama checkpoint
    cannot hold (a wrapper with `unloadable = False`, e.g. BitFit's new biases) is refused, with the
    reason, before anything changes. Then each wrapper is merged, its pre-merge copy of the weight
    (kept by merge() for an exact unmerge) dropped at once, and the wrapper replaced by its Linear,
    one module at a time: the peak extra memory is one weight matrix, not a copy of every targeted
    weight. The price: this part is not rolled back; only an error such as running out of memory
    could interrupt it, and the model is then meant to be discarded anyway."""
    mods = adapter_modules(model)
    _refuse_quantized_base(mods, "merge_and_unload")
    slots = [(n, m) for n, m in mods if not isinstance(getattr(m, "base", None), nn.Linear)]
    if slots:
        n, m = slots[0]
        why = getattr(m, "why_not_unloadable", None) or getattr(m, "why_not_mergeable", "has no weight form")
        raise NotImplementedError(f"merge_and_unload: {m.peft_method} at '{n}' {why} ({len(slots)} such "
                                  "module(s)); it cannot become a plain Llama, nothing was changed")
    blocked = [(n, m) for n, m in mods if not getattr(m, "mergeable", True) or not getattr(m, "unloadable", True)]
    if blocked:
        n, m = blocked[0]
        why = (getattr(m, "why_not_unloadable", "") if getattr(m, "mergeable", True)
               else getattr(m, "why_not_mergeable", "has no merge rule"))
        raise NotImplementedError(f"merge_and_unload: {m.peft_method} at '{n}' {why} ({len(blocked)} such "
                                  "module(s)); nothing was changed")
    for name, m in mods:
        if not getattr(m, "merged", False):
            with torch.no_grad():
                m.merge()
            m.merged = True
        if hasattr(m, "weight_before_merge"):
            m.weight_before_merge = None  # no unmerge will come: free the copy before the next merge
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.base)
    for attr in ("peft_shared", "peft_configs"):
        if hasattr(model, attr):
            delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(False)  # a plain base model again, frozen as PEFT left it
    model.peft_base_frozen = False
    return model


# ----------------------------------------------------------------------------------------------
# Reporting and optimisation


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), each shared tensor counted once."""
    params = list(model.parameters())  # parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_by_method(model: nn.Module) -> dict[str, int]:
    owner = {}
    for _, m in adapter_modules(model):
        for p in m.parameters():
            owner.setdefault(id(p), m.peft_method)
    for key, holder in getattr(model, "peft_shared", {}).items():  # keys are "<method>__<target>"
        for p in holder.parameters():
            owner.setdefault(id(p), key.split("__")[0])
    counts: dict[str, int] = {}
    seen = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            key = owner.get(id(p), "unfrozen base")
            counts[key] = counts.get(key, 0) + p.numel()
    return counts


def trainable_report(model: nn.Module) -> str:
    """'trainable params: 1,703,936 || all params: 1,237,518,336 || trainable%: 0.1377', then per method."""
    trainable, total = count_parameters(model)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"]
    for method, n in trainable_by_method(model).items():
        lines.append(f"  {method}: {n:,} ({100 * n / total:.4f}%)")
    return "\n".join(lines)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups: one per (lr_scale, decay) pair found on the trainable parameters.

    A method raises one factor's learning rate by tagging its parameters: `p.lr_scale = 16.0`
    (LoRA+); norms and biases can opt out of decay with `p.no_weight_decay = True`.
    """
    merged = [n for n, m in adapter_modules(model) if getattr(m, "merged", False)]
    if merged:  # merged adapters are skipped by forward, so they would get no gradient at all
        raise RuntimeError(f"the model is merged ('{merged[0]}' and {len(merged) - 1} more adapter module(s)): "
                           "its adapters are folded into the weights and no longer train; call "
                           "minipeft.unmerge(model) before training")
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (float(getattr(p, "lr_scale", 1.0)), bool(getattr(p, "no_weight_decay", False)))
            groups.setdefault(key, []).append(p)
    return [dict(params=ps, lr=lr * scale, weight_decay=0.0 if no_wd else weight_decay, lr_scale=scale)
            for (scale, no_wd), ps in sorted(groups.items())]


def check_base(model: nn.Module, expected: dict, source) -> None:
    """Refuse an adapter recorded for another base model: compare `model.config.fingerprint()` with
    the fingerprint saved beside the adapter, naming each field that differs."""
    have = model.config.fingerprint()
    diff = {k: (v, have.get(k)) for k, v in expected.items() if have.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{source}: this adapter was trained on a different base model ({details})")


def merge_delta_keeping_base(module: nn.Module, delta: torch.Tensor) -> None:
    """W <- W + delta for a wrapper with `base` (an nn.Linear): the sum in fp32 and rounded once, and the
    pre-merge W kept in `module.weight_before_merge`, so that `restore_base` is exact in every dtype
    (adding and subtracting a delta in bf16 is not). Costs one copy of W while merged."""
    w = module.base.weight
    module.weight_before_merge = w.detach().clone()
    w.copy_((w.float() + delta.float()).to(w.dtype))


def restore_base(module: nn.Module) -> None:
    """Undo `merge_delta_keeping_base`: the exact pre-merge weight."""
    module.base.weight.copy_(module.weight_before_merge)
    module.weight_before_merge = None
