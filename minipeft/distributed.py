"""One run over several processes: data parallel (DDP) or fully sharded (FSDP2) training under torchrun.

    torchrun --standalone --nproc-per-node 2 -m minipeft.finetune ...               # FSDP2 (the default)
    torchrun --standalone --nproc-per-node 2 -m minipeft.finetune --parallel ddp ...

PyTorch's own engine, used as torchtune's `lora_finetune_distributed` and torchtitan's `apply_fsdp` use
it. torchrun starts N processes and gives each RANK, WORLD_SIZE and LOCAL_RANK; `World.join` makes them
one process group (NCCL on GPUs, gloo on CPUs) whose collectives fail after MINIPEFT_TIMEOUT_S seconds
(600) instead of waiting forever for a rank that died or hangs. What every rank does (finetune.train):

  * data: every rank plans the same global micro-batches (finetune.DataPlan: seed and epoch) and takes
    rows r, r + N, ... of each, so the global batch and the order of examples do not depend on N. The
    loss of each share is weighted by its answer tokens over the step's global count, times N
    (DDP and FSDP average the ranks' gradients): the gradient of the one-process step.
  * DDP (`--parallel ddp`): every rank builds the whole model as one process does; DDP all-reduces the
    gradients, on the last micro-batch of a step only (`no_sync` before it).
  * FSDP2 (`--parallel fsdp`): rank 0 builds the model as one process does (on the CPU), the others
    build the same model on the meta device (no memory). With the base frozen and the method's
    parameters trainable BEFORE sharding, `fully_shard` each block, then the root (model-level
    slots; its frozen weights, the embedding, head and final norm, stay whole on every rank: less memory
    at the step's peak than gathering them); bf16 parameters with fp32 gradient reduction where the base
    is bf16 (MixedPrecisionPolicy); then rank 0 scatters each parameter's shards, one parameter at a
    time, so no rank holds two whole copies and ranks > 0 hold none. The optimiser sees the shards of
    the trainable parameters only; gradients are clipped on the DTensors (one global norm).
  * saving: the trainable tensors and the optimiser state are gathered with `full_tensor()` on EVERY
    rank and written by rank 0 (runs.save_checkpoint). Keeping only rank 0's shard is the bug Hugging
    Face accelerate's FSDP2 adapter save had in 2026: on resume (N-1)/N of each lora_B was zero.
  * evaluation runs whole on every rank in step (an FSDP forward is a collective), so every rank gets
    identical figures; rank 0 writes them.

Refused, with the reason (`refusal`): methods with step hooks or extra loss terms, quantised bases and
--compile under any N > 1; under FSDP also methods whose parameters are shared across layers through
plain references. docs/distributed.md has the commands, the multi-node line and the measured memory.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .base import load_base, pick_device
from .llama import Llama

TIMEOUT_ENV = "MINIPEFT_TIMEOUT_S"
PARALLEL = ("fsdp", "ddp")

# FSDP2 warns about every block, since Block returns its keys/values as views; nothing writes into them.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class World:
    """This process's place in the run. `World()` is one process: every method is then a no-op or
    the plain single-process call, so the training loop has one code path."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank, self.size, self.local_rank, self.device = rank, size, local_rank, device
        self.parallel = "none"  # "ddp" or "fsdp" once `configure` has seen the run's settings

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: str = "auto") -> World:
        """The process group of a torchrun launch (WORLD_SIZE > 1), else one process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device {device!r} under torchrun: give auto, cpu or cuda (each rank takes "
                             f"the GPU of its LOCAL_RANK)")
        cuda = pick_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, "600"))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ValueError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: must be a number of seconds > 0")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        return cls(rank, size, local, torch.device("cuda", local) if cuda else torch.device("cpu"))

    def leave(self, done: bool = False) -> None:
        """Close the process group. done (every rank finished alike): wait for all first, since gloo aborts a
        rank ("terminate called without an active exception") whose peer closes while it still sends, and
        free the garbage in reference cycles (autograd graphs, FSDP state) while the group is still open:
        left to the interpreter's exit it aborted 7 of 45 two-process runs, after gc.collect() 0 of 50.
        Never after an error, where the others may be inside another collective."""
        if self.size > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):  # after a failed collective there may be nothing to close
                if done:
                    gc.collect()
                    dist.barrier()
                dist.destroy_process_group()

    def configure(self, cfg) -> None:
        """Take the run's --parallel, refusing what cannot run over several processes."""
        if self.size == 1:
            return
        if cfg.parallel not in PARALLEL:
            raise ValueError(f"--parallel {cfg.parallel!r}: must be one of {PARALLEL}")
        self.parallel = cfg.parallel
        why = ("--quantize: a quantised base holds packed integer codes that neither DDP nor FSDP2 handle here"
               if cfg.quantize else "--compile is not supported under torchrun yet" if cfg.compile else None)
        if why:
            raise NotImplementedError(f"{why}; run one process, or drop the flag")

    # ------------------------------------------------------------------ small collectives

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """[rank 0's obj, rank 1's, ...] on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """fn() on rank 0 alone; its result, or its error, reaches every rank (so also a barrier)."""
        if self.size == 1:
            return fn()
        outcome = [None]
        if self.main:
            try:
                outcome = [(None, fn())]
            except (ValueError, KeyError, OSError, NotImplementedError) as e:
                outcome = [(e, None)]
        dist.broadcast_object_list(outcome, src=0)
        error, value = outcome[0]
        if error is not None:
            raise error
        return value

    def no_sync(self, forward, last: bool):
        """DDP: no all-reduce before the step's last micro-batch (the gradients accumulate locally)."""
        return forward.no_sync() if self.parallel == "ddp" and not last else contextlib.nullcontext()

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """clip_grad_norm_ over every rank's gradients: under FSDP the norm of the DTensor shards is a
        DTensor that full_tensor() all-reduces into the global norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # ------------------------------------------------------------------ building and wrapping the model

    def load_base(self, cfg, device: torch.device, progress: bool) -> tuple[Llama, object, str]:
        """The base model: whole on every rank (one process, DDP), or (FSDP) built on rank 0's CPU as
        one process builds it, and on the meta device elsewhere."""
        if self.parallel != "fsdp":
            return load_base(cfg.checkpoint, cfg.preset, device, progress)
        holder = {}

        def load():
            holder["model"], tok, name = load_base(cfg.checkpoint, cfg.preset, torch.device("cpu"), progress)
            return holder["model"].config, tok, name

        config, tok, name = self.on_main(load)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # base.load_base's choice
        if self.main:
            return holder.pop("model").to(dtype), tok, name
        with torch.device("meta"):
            return Llama(config).to(dtype).eval(), tok, name

    def apply_method(self, model: Llama, apply) -> None:
        """apply() puts the method in place, then `refusal` may refuse it, on every rank alike. Under FSDP
        rank 0 goes first, on its real model; the others follow on the meta device (rank 0 sends values)."""
        def apply_and_check():
            apply()
            why = refusal(model, self.parallel) if self.size > 1 else None
            if why:
                raise NotImplementedError(why)
        if self.parallel != "fsdp":
            return apply_and_check()
        self.on_main(apply_and_check)
        if not self.main:
            with torch.device("meta"):
                apply()

    def shard(self, model: Llama) -> None:
        """FSDP2, in place: fully_shard each block, then the root; then rank 0's values into every shard."""
        if self.parallel != "fsdp":
            return
        extras = {n: dict(p.__dict__) for n, p in model.named_parameters()}  # lr_scale, no_weight_decay tags
        first = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
        ties = [(n, first[id(p)]) for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n]

        def tie_again():  # .to() and .to_empty() make a new tensor per name: tie them (lm_head = embedding)
            for name, owner in ties:
                module, _, leaf = name.rpartition(".")
                model.get_submodule(module)._parameters[leaf] = model.get_parameter(owner)
        full = None
        if self.main:  # rank 0 keeps its values aside and shards a meta skeleton too: its memory then goes
            full = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
            model.to("meta")  # from the whole copy to the shards one tensor at a time (scatter below)
            tie_again()
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        mesh = init_device_mesh(self.device.type, (self.size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root's frozen weights (the embedding, at 1B also the head: a fifth of the model) stay whole on
        # every rank. Sharded, the root group would all-gather them for the whole forward and backward (the
        # head needs them last), for a moment twice (the gather buffer, then the parameter): more memory at
        # the step's peak than one whole copy. Frozen, they need no gradient reduction (docs/distributed.md).
        in_blocks = {id(p) for p in model.layers.parameters()}
        replicated = {p for p in model.parameters() if id(p) not in in_blocks and not p.requires_grad}
        fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=replicated or None)
        model.to_empty(device=self.device)  # the skeleton's shards get memory, then rank 0's values
        tie_again()
        with torch.no_grad():
            for name, p in model.named_parameters():  # scatter: each rank receives its shard
                p.__dict__.update(extras[name])
                if not isinstance(p, DTensor):  # replicated: the whole tensor, from rank 0
                    if self.main:
                        p.copy_(full.pop(name))
                    dist.broadcast(p, src=0)
                    continue
                src = full.pop(name).to(self.device) if self.main else torch.empty(p.shape, dtype=p.dtype,
                                                                                      device=self.device)
                p.to_local().copy_(distribute_tensor(src, p.device_mesh, p.placements).to_local())
            for name, b in model.named_buffers():  # buffers (index tensors, token ids) are whole everywhere
                if self.main:
                    b.copy_(full.pop(name))
                dist.broadcast(b, src=0)

    def wrap(self, model: Llama):
        """What computes the training loss: DDP(model) under DDP, else the model itself."""
        if self.parallel != "ddp":
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------ saving and loading

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, write_back: bool = False):
        """Inside the block the trainable parameters are whole tensors in place of FSDP's shards: one
        all-gather per tensor on EVERY rank. write_back (loading): afterwards each rank copies its part
        of the whole tensors into its shards. Outside FSDP: nothing to do."""
        if self.parallel != "fsdp":
            yield
            return
        swapped, whole = [], {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if isinstance(p, DTensor) and p.requires_grad:
                    if id(p) not in whole:  # a tensor two modules share is gathered once
                        whole[id(p)] = nn.Parameter(p.full_tensor())
                    swapped.append((module, name, p))
        for module, name, p in swapped:
            module._parameters[name] = whole[id(p)]
        try:
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p
        if write_back:
            with torch.no_grad():
                for module, name, p in swapped:
                    mine = distribute_tensor(whole[id(p)].detach(), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(mine.to_local())

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() with whole tensors (a collective under FSDP): the file is the same for any N."""
        state = opt.state_dict()
        if self.parallel == "fsdp":
            state["state"] = {i: {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in s.items()}
                              for i, s in state["state"].items()}
        return state

    def shard_optimizer_state(self, opt: torch.optim.Optimizer) -> None:
        """After opt.load_state_dict(whole state): each moment tensor becomes this rank's shard."""
        if self.parallel != "fsdp":
            return
        for p, s in opt.state.items():
            for k, v in s.items():
                if isinstance(p, DTensor) and k != "step" and torch.is_tensor(v) and v.shape == p.shape:
                    s[k] = distribute_tensor(v.to(self.device), p.device_mesh, p.placements, src_data_rank=None)


def refusal(model: nn.Module, parallel: str) -> str | None:
    """Why this model's method cannot train over several processes (None: it can)."""
    methods = ", ".join(c.method for c in getattr(model, "peft_configs", [])) or "this method"
    if getattr(model, "peft_step_hooks", None):
        return (f"{methods} under torchrun: its step hook (peft.add_step_hook) changes the adapter after each "
                "step from whole gradients and random draws, which are per rank (and per shard under FSDP); "
                "it trains in one process only")
    if getattr(model, "peft_extra_losses", None):
        return (f"{methods} under torchrun: its extra loss term (peft.add_extra_loss) is computed per "
                "micro-batch, with random routings, and would not equal the one-process term once the "
                "batch is split over ranks; it trains in one process only")
    if parallel == "fsdp" and hasattr(model, "peft_shared"):
        return (f"{methods} under --parallel fsdp: its parameters are shared by every layer through plain "
                "references (model.peft_shared), which FSDP2's shards would not update; use --parallel ddp")
    return None


def failure_message(error: BaseException) -> str | None:
    """What to say when a collective failed (a rank died, hung or lost its network); None: another error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not (isinstance(error, dist.DistError) or re.search(r"gloo|NCCL|[Cc]onnection|[Tt]imed out", text)):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]  # gloo's "[.../pair.cc:537] " source line
    return f"another process of this run stopped or hung, so the process group failed ({text[:160]})"

