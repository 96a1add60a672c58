"""A fine-tuning run's plumbing, apart from the training loop (minipeft/finetune.py): its settings
(`TrainConfig`, their ranges, the command line and `--set` coercion, the recipes), its folder, what it
writes there and how it resumes, and its plots.

The run folder (--out):
    minipeft_run.json    written first: marks the folder as a minipeft run (--overwrite deletes only such
                         folders) and records the size and sha256 of the base's and the data's files,
                         which --resume checks
    config.json          the full training configuration, the method's config, parameter counts
    metrics.jsonl        one JSON record per line: "baseline", "train" (every step), "eval", "epoch",
                         "final" (or "stopped")
    adapter/             the adapter (adapters.save_adapter), refreshed at every save point
    train_state.pt       optimiser, scheduler, RNG states, step and the adapter tensors, in ONE atomic
                         file: --resume continues from it exactly, with the same data order. Plain data
                         only, read with torch.load(weights_only=True) (a state file from elsewhere can
                         never run code), and tied to this run by the hash of its config.json
    predictions.jsonl    the final greedy answers (predictions_base.jsonl: the base model's)
    loss.png             train and test bits/token against the step
    summary.json         before/after numbers, wall time, tokens/s, peak memory

Every file is written atomically (temp file + rename), state before adapter, so a killed process
loses at most the steps since the last save point and never leaves a torn adapter behind.

A new run needs a new or empty --out: an existing run folder is refused unless --resume (continue it)
or --overwrite (delete it whole and start over), so a finished run is never wiped by running the
same command again, and two runs never mix their records. --resume takes every setting from the run's
config.json; other flags may come with it only with the saved values (`make finetune` always passes
--method). Every setting's range is checked up front (`check_config`), with the flag's name. The run
folder is printed at the start and at the end; Ctrl-C prints the command that resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import shutil
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .adapters import CONFIG_FILE, METHODS, adapter_state, checked_hyper, load_adapter_state, method_module, \
    save_adapter, sha256_file, value_has_type
from .base import SHIPPED, pick_device
from .recipes import describe, recipe
from .safetensors_io import INDEX, STAGING_PREFIX, atomic_write, read_json, regular, write_json
from .tasks import TASKS, check_train_split, toy_folder
from .toy import TOY_TRAINING

STATE_FILE = "train_state.pt"


# ----------------------------------------------------------------------------- the settings

@dataclass
class TrainConfig:
    checkpoint: str | None = None  # HF or Meta folder with its tokenizer; None -> the toy base
    preset: str | None = None      # instead: a LlamaConfig preset with random weights (GPU checks)
    data: str | None = None        # folder with train.jsonl / test.jsonl; None -> the toy task
    task: str = "gsm8k"            # minipeft/tasks.py: gsm8k, mmlu, arc_challenge, dolly, text
    train_split: str = "train"     # the split trained on: MMLU "train" (auxiliary_train/), "dev" or "val"; ARC "dev"
    method: str = "lora"
    method_args: dict = field(default_factory=dict)  # the method config's fields, e.g. {"r": 16}
    out: str = "runs/latest"
    epochs: int = 1
    max_steps: int = 0             # > 0: exactly this many optimiser steps (the data cycles)
    lr: float = 2e-4               # peak learning rate
    weight_decay: float = 0.0
    warmup: float = 0.05           # fraction of the steps with a linear warmup
    min_lr_ratio: float = 0.0      # cosine decays to lr * min_lr_ratio
    batch_size: int = 8            # examples (or packed rows) per micro-batch
    grad_accum: int = 1            # micro-batches per optimiser step
    max_len: int = 512             # tokens per example (longer answers lose their tail) / packed row
    clip: float = 1.0              # max gradient norm
    seed: int = 0
    eval_every: int = 0            # steps between test evaluations (0: at epoch ends only)
    save_every: int = 0            # steps between saves (0: at every evaluation)
    limit: int = 0                 # > 0: the first N train and N test examples (quick runs)
    eval_limit: int = 0            # > 0: the first N test examples for accuracy and bits/token
    format: str = "plain"          # "plain" (base models) or "chat" (Instruct models)
    pack: bool = False             # pack examples into rows of max_len (segment masks keep them apart)
    compile: bool = False          # torch.compile the training forward
    grad_checkpoint: bool = False  # recompute each block in backward (activation memory)
    max_new_tokens: int = 256      # generation budget for accuracy
    eval_batch_size: int = 32
    baseline: bool = True          # evaluate the base model before training
    device: str = "auto"
    quantize: str | None = None    # a frozen quantised base (minipeft/quant.py): "nf4" (QLoRA), "int8"
                                   # (weight-only) or "llm_int8" (LLM.int8(): int8 x int8 + outlier split)
    attention: str = "dense"       # "strided" | "fixed": Child et al.'s sparse patterns (minipeft/sparse_attention.py)
    sparse_block: int = 64         # l of the sparse patterns
    sparse_summary: int = 8        # c of the "fixed" pattern
    recipe: dict = field(default_factory=dict)  # which recipes.py entry set lr/method_args (CLI runs)
    parallel: str = "fsdp"         # under torchrun with N > 1 processes: "fsdp" (shard) or "ddp" (replicate)


# Every numeric setting's allowed range, in one place: (field, test, what the flag needs)
RANGES = [
    ("epochs", lambda v: v >= 1, ">= 1"), ("max_steps", lambda v: v >= 0, ">= 0 (0: use --epochs)"),
    ("lr", lambda v: 0 < v < math.inf, "> 0"), ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0"),
    ("warmup", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"), ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("batch_size", lambda v: v >= 1, ">= 1"), ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("max_len", lambda v: v >= 2, ">= 2"), ("clip", lambda v: 0 <= v < math.inf, ">= 0 (0: off)"),
    ("seed", lambda v: v >= 0, ">= 0"), ("eval_every", lambda v: v >= 0, ">= 0 (0: per epoch)"),
    ("save_every", lambda v: v >= 0, ">= 0 (0: with evaluations)"), ("limit", lambda v: v >= 0, ">= 0 (0: all)"),
    ("eval_limit", lambda v: v >= 0, ">= 0 (0: all)"), ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval_batch_size", lambda v: v >= 1, ">= 1"), ("sparse_block", lambda v: v >= 1, ">= 1"),
    ("sparse_summary", lambda v: v >= 1, ">= 1 (and <= --sparse-block)"),
]


def check_config(cfg: TrainConfig) -> None:
    """Refuse a setting out of range (or of the wrong type), naming its command-line flag and value."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if not value_has_type(getattr(cfg, f.name), hints[f.name]):
            raise ValueError(f"--{f.name.replace('_', '-')} must be {_type_name(hints[f.name])}, "
                             f"got {getattr(cfg, f.name)!r}")
    for name, ok, need in RANGES:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be {need}")
    if (cfg.attention not in ("dense", "strided", "fixed")
            or cfg.attention == "fixed" and cfg.sparse_summary > cfg.sparse_block):
        raise ValueError(f"--attention {cfg.attention!r} --sparse-summary {cfg.sparse_summary} --sparse-block "
                         f"{cfg.sparse_block}: attention must be dense, strided or fixed, and c <= l")
    if cfg.format not in ("plain", "chat"):
        raise ValueError(f"--format {cfg.format!r}: must be 'plain' or 'chat'")
    check_train_split(cfg.task, cfg.train_split)  # an unknown task raises here too, naming the tasks
    pick_device(cfg.device)  # raises for an unknown device or one this machine lacks


# ----------------------------------------------------------------------------- method arguments

def parse_method_args(method: str, pairs: Sequence[str]) -> dict:
    """["r=16", "targets=q_proj,v_proj"] -> {"r": 16, "targets": ("q_proj", "v_proj")}, typed by the
    method's config dataclass; unknown fields and bad values raise naming the field and its type."""
    _, config_cls = method_module(method)
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE")
        if key not in fields:
            known = ", ".join(f"{k}: {_type_name(t)}" for k, t in fields.items())
            raise ValueError(f"--set {pair!r}: {config_cls.__name__} has no field '{key}'; fields are {known}")
        try:
            out[key] = _coerce(value.strip(), fields[key])
        except ValueError as e:
            raise ValueError(f"--set {pair!r}: {key} expects {_type_name(fields[key])}: {e}") from None
    return out


def _type_name(t) -> str:
    return getattr(t, "__name__", None) if typing.get_origin(t) is None else str(t).replace("typing.", "")


def _preference(t, value: str) -> int:
    """Order in which a union's options are tried: numbers before text; "a,b" is a tuple, "a" a str."""
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        return 0 if "," in value else 6
    return {bool: 1, int: 2, float: 3, typing.Literal: 4}.get(origin or t, 5)


def _coerce(value: str, t):
    """Turn command-line text into a value of type `t` (bool, int, float, str, Literal, tuple/list,
    Optional / unions of these)."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for option in sorted((a for a in args if a is not type(None)), key=lambda a: _preference(a, value)):
            try:
                return _coerce(value, option)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise ValueError(f"{value!r} is not one of {list(args)}")
    if origin in (tuple, list):
        items = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        item_type = args[0] if args else str
        return origin(_coerce(v, item_type) for v in items)
    if t is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean (true/false)")
    if t in (int, float):
        try:
            return t(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid {t.__name__}") from None
    if t in (str, typing.Any):
        return value
    raise ValueError(f"fields of type {_type_name(t)} cannot be set from the command line")


# ----------------------------------------------------------------------------- saving and resuming

def rng_state() -> dict:
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, model, opt, sched, step: int, world=None) -> None:
    """The training state (one atomic file), then the adapter folder (atomic files).

    The state holds only tensors, numbers, strings, lists and dicts, so `load_state` reads it with
    torch.load(weights_only=True): a state file from elsewhere can never run code. It carries the
    run's identity (the hash of its config.json), checked on resume.

    Under torchrun EVERY rank calls it with its `world` (minipeft/distributed.py): the trainable tensors
    and the optimiser state are gathered whole with collectives on every rank (under FSDP each rank
    holds a shard), and so is each rank's RNG state; rank 0 alone writes, and every rank learns whether
    the write succeeded. The file is the one process's file, plus `world_size` and `rng_ranks`."""
    with world.gathered(model) if world else contextlib.nullcontext():
        optimizer = world.full_optimizer_state(opt) if world else opt.state_dict()
        rngs = world.gather_objects(rng_state()) if world else [rng_state()]

        def write() -> None:
            state = dict(format=STATE_FORMAT, step=step, config_sha256=run_identity(run), optimizer=optimizer,
                         scheduler=sched.state_dict(), rng=rngs[0],
                         adapter={k: v.clone().cpu() for k, v in adapter_state(model).items()})
            if len(rngs) > 1:
                state.update(world_size=len(rngs), rng_ranks=rngs)
            try:
                with atomic_write(run / STATE_FILE) as f:
                    torch.save(state, f)
                save_adapter(model, run / "adapter")
            except BaseException:
                remove_temp_files(run)  # a full disk can fail the temp file's close too, before its removal
                raise

        world.on_main(write) if world else write()


STATE_FORMAT = "minipeft-train-state-2"


def run_identity(run: Path) -> str:
    """sha256 of the run's config.json (which holds a random run_id): what a state file must match."""
    path = run / "config.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def remove_temp_files(run: Path) -> None:
    """What a save killed midway leaves: the `.NAME.*.tmp` files of atomic_write (if even its clean-up
    failed, e.g. disk full) and the staging folders of staged_files (a kill between its renames)."""
    for tmp in [*run.glob(".*.tmp"), *run.glob("adapter/.*.tmp")]:
        tmp.unlink(missing_ok=True)
    for staging in [*run.glob(f"{STAGING_PREFIX}*.staging"), *run.glob(f"adapter/{STAGING_PREFIX}*.staging")]:
        shutil.rmtree(staging, ignore_errors=True)


def load_state(run: Path) -> dict:
    """RUN/train_state.pt, read without unpickling code, checked for its fields and its run."""
    path = run / STATE_FILE
    try:
        regular(path)  # a FIFO or a device there would hang torch.load's open(): refused at once, by name
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (the run never reached a save point)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects other than plain data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be read as a training state ({first[:300]}); it is corrupt, "
                         "truncated, or not plain data (only tensors, numbers and strings are loaded). "
                         "The adapter of the last good save is in adapter/") from None
    need = {"format": str, "step": int, "config_sha256": str, "optimizer": dict, "scheduler": dict,
            "rng": dict, "adapter": dict}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a {STATE_FORMAT} training state (written by another minipeft version?)")
    for key, kind in need.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"{path}: field '{key}' is missing or not a {kind.__name__}")
    if state["config_sha256"] != run_identity(run):
        raise ValueError(f"{path} belongs to another run: its config hash {state['config_sha256'][:12]} differs "
                         f"from {run / 'config.json'}'s {run_identity(run)[:12]}")
    return state


def load_checkpoint(run: Path, model, opt, sched, world=None) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from. Under torchrun every rank
    reads the file and keeps its own shard of each tensor (`world`); a run resumes with as many
    processes as it had, since each rank's share of the batches and its random stream depend on N."""
    state = load_state(run)
    size, rank = (world.size, world.rank) if world else (1, 0)
    saved = state.get("world_size", 1)
    if saved != size:
        how = (f"with {saved} processes: torchrun --nproc-per-node {saved} -m minipeft.finetune --resume {run}"
               if saved > 1 else f"in one process: make resume RUN={run}")
        raise ValueError(f"{run / STATE_FILE} was saved by a run of {saved} process(es) and this one has {size}; "
                         f"a run resumes with as many processes as it had: resume it {how}")
    with world.gathered(model, write_back=True) if world else contextlib.nullcontext():
        load_adapter_state(model, state["adapter"], run / STATE_FILE)
    try:
        opt.load_state_dict(state["optimizer"])
        if world:
            world.shard_optimizer_state(opt)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng_ranks"][rank] if saved > 1 else state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise ValueError(f"{run / STATE_FILE}: the optimiser, schedule or RNG state does not fit this run ({e})") from None
    return state["step"]


class Metrics:
    """metrics.jsonl: appended and flushed record by record (a crash loses at most the last line).
    write=False (ranks > 0 under torchrun): the same records, kept in memory only."""

    def __init__(self, path: Path, keep_until_step: int | None = None, write: bool = True):
        self.path, self.write = path, write
        self.records: list[dict] = []
        if keep_until_step is not None and path.exists():  # resuming: drop what came after the save
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the crash
                if rec.get("step", 0) <= keep_until_step and rec["kind"] not in ("final", "stopped"):
                    self.records.append(rec)
        if write:
            with atomic_write(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)

    def log(self, **record) -> dict:
        self.records.append(record)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def last_step(self, kind: str) -> int:
        return max((r["step"] for r in self.records if r["kind"] == kind), default=0)

    def mean_train_bits(self, after: int = 0, epoch: int | None = None) -> float:
        """Token-weighted mean train bits/token over the steps after `after` (of one epoch, if given)."""
        recs = [r for r in self.records if r["kind"] == "train" and r["step"] > after
                and (epoch is None or r["epoch"] == epoch)]
        n = sum(r["answer_tokens"] for r in recs)
        return sum(r["loss_bpt"] * r["answer_tokens"] for r in recs) / n if n else float("nan")


def saved_step(run: Path) -> int:
    return load_state(run)["step"] if (run / STATE_FILE).exists() else 0


# ----------------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m minipeft.finetune", description=__doc__.split("\n")[0],
                                epilog=f"methods: {', '.join(METHODS)}. See a method's fields, types and defaults "
                                       "with --list-methods, or --method NAME --set help.")
    p.add_argument("--checkpoint", help="HF or Meta checkpoint folder (tokenizer inside); default: the toy base")
    p.add_argument("--preset", help="a LlamaConfig preset with random weights and the byte-level tokenizer")
    p.add_argument("--data", help="folder with train.jsonl and test.jsonl (or the --task's files); default: the "
                                  "task's synthetic toy analogue")
    p.add_argument("--task", choices=tuple(TASKS), default=d.task,
                   help=f"what to train and evaluate on (default {d.task}; minipeft/tasks.py)")
    p.add_argument("--train-split", default=d.train_split,
                   help="the split to train on: train (default; MMLU's auxiliary_train/), or mmlu dev/val, "
                        "arc_challenge dev")
    p.add_argument("--method", default=d.method, metavar="NAME",
                   help=f"the PEFT method, one of: {', '.join(METHODS)} (default {d.method})")
    p.add_argument("--set", dest="method_args", action="append", default=[], metavar="NAME=VALUE",
                   help="a field of the method's config (repeatable), e.g. --set r=16 --set targets=q_proj,v_proj; "
                        "--set help lists the method's fields (default: the method's defaults)")
    p.add_argument("--list-methods", action="store_true", help="list every method with its fields and exit")
    p.add_argument("--out", help="run folder (default runs/toy/METHOD, or runs/CHECKPOINT_NAME/METHOD; other tasks: runs/.../TASK/METHOD)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR with its saved config and state")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run folder --out if it holds a run, and start over (default: refuse)")
    for name, kind, help_ in [
            ("epochs", int, "passes over the training set"), ("max-steps", int, "> 0: this many optimiser steps"),
            ("lr", float, "peak learning rate"), ("weight-decay", float, "AdamW weight decay"),
            ("warmup", float, "warmup fraction of the steps"), ("min-lr-ratio", float, "final lr / peak lr"),
            ("batch-size", int, "examples per micro-batch"), ("grad-accum", int, "micro-batches per step"),
            ("max-len", int, "tokens per example / packed row"), ("clip", float, "gradient norm clip (0: off)"),
            ("seed", int, "random seed"), ("eval-every", int, "steps between test evaluations (0: per epoch)"),
            ("save-every", int, "steps between saves (0: with evaluations)"),
            ("limit", int, "first N train and test examples"), ("eval-limit", int, "first N test examples"),
            ("max-new-tokens", int, "generation budget"), ("eval-batch-size", int, "evaluation batch size")]:
        field_name = name.replace("-", "_")
        toy = f"; toy default {TOY_TRAINING[field_name]}" if field_name in TOY_TRAINING else ""
        default = "the method's recipe in minipeft/recipes.py" if field_name == "lr" else getattr(d, field_name)
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{help_} (default {default}{toy})")
    p.add_argument("--format", choices=("plain", "chat"), default=d.format, help="prompt format (default plain)")
    p.add_argument("--pack", action="store_true", help="pack examples into rows of --max-len")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the base model evaluation")
    p.add_argument("--device", default=d.device, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--quantize", choices=("nf4", "int8", "llm_int8"),
                   help="quantise the frozen base: nf4 (QLoRA), int8 (weight-only), llm_int8 (LLM.int8())")
    p.add_argument("--attention", choices=("dense", "strided", "fixed"), default=d.attention,
                   help="sparse attention pattern (Child et al. 2019; default dense)")
    p.add_argument("--sparse-block", type=int, default=d.sparse_block,
                   help=f"l, the pattern's block (default {d.sparse_block})")
    p.add_argument("--sparse-summary", type=int, default=d.sparse_summary,
                   help=f"c, summary tokens per block of 'fixed' (default {d.sparse_summary})")
    p.add_argument("--parallel", choices=("fsdp", "ddp"), default=d.parallel,
                   help="under torchrun with N > 1 processes: fsdp (FSDP2, shards the model; default) or ddp "
                        "(a whole copy per process); docs/distributed.md")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the command line; without --checkpoint/--preset (the toy default) options
    not given take TOY_TRAINING's values, sized for the toy base on a CPU."""
    defaults = asdict(TrainConfig())
    if not args.checkpoint and not args.preset:
        defaults.update(TOY_TRAINING)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values = {k: defaults[k] if v is None else v for k, v in values.items()}
    values["method_args"] = parse_method_args(args.method, args.method_args)
    values.update(_recipe_values(args, values))
    return TrainConfig(**values)


def describe_method(name: str) -> str:
    """'lora (LoRAConfig): r: int = 8, alpha: float = 16.0, ...' for --list-methods and --set help."""
    _, config_cls = method_module(name)
    hints = typing.get_type_hints(config_cls)
    fields = ", ".join(f"{f.name}: {_type_name(hints[f.name])} = {f.default if f.default is not dataclasses.MISSING else '?'}"
                       for f in dataclasses.fields(config_cls))
    return f"{name} ({config_cls.__name__}): {fields}"


def prepare_run_folder(run: Path, overwrite: bool) -> None:
    """A new run starts in a new or empty folder (one holding only RUN_MARKER, a run that died at its
    start, counts as empty): running the same command twice must not wipe a finished run's metrics, and
    a forgotten --resume must not mix two runs' records. --overwrite deletes the folder whole, but only a
    minipeft run folder (`run_evidence`), never a checkpoint or project folder that holds a config.json."""
    if not (run.exists() or run.is_symlink()) or (run.is_dir() and all(p.name == RUN_MARKER for p in run.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"{run} already exists and is not empty: continue it with --resume {run}, start over "
                         "with --overwrite, or choose another --out")
    why = "it is a symbolic link" if run.is_symlink() else run_evidence(run) if run.is_dir() else "it is a file"
    if why:
        raise ValueError(f"{run} holds no run ({why}); --overwrite deletes only minipeft run folders: "
                         "choose another --out")
    shutil.rmtree(run)


# ----------------------------------------------------------------------------- what a run is made of

RUN_MARKER = "minipeft_run.json"  # the first file of every run: what --overwrite and compare recognise
# the files of a base checkpoint that make its model: weights (and their index), config, tokenizer
BASE_FILES = ("config.json", "params.json", INDEX, "tokenizer.model", "tokenizer.json")


def start_run(run: Path, cfg: TrainConfig) -> None:
    """Write RUN_MARKER into a new run's folder, before anything else: it marks the folder as a minipeft
    run (--overwrite deletes, compare clears only such folders) and records the size and sha256 of every
    file the run's base and data come from (`input_files`), which --resume checks (`check_inputs`)."""
    run.mkdir(parents=True, exist_ok=True)
    inputs = {kind: dict(folder=str(folder), files={rel: dict(bytes=p.stat().st_size, sha256=sha256_file(p))
                                                    for rel, p in files.items()})
              for kind, folder, files in input_files(cfg)}
    write_json(run / RUN_MARKER, dict(minipeft_run=1, inputs=inputs))


def input_files(cfg: TrainConfig) -> list[tuple[str, Path, dict[str, Path]]]:
    """[("base", folder, {name: file}), ("data", folder, {relative path: file})]: the base checkpoint's
    BASE_FILES and weight files (the toy base's without --checkpoint; none for a --preset, whose weights
    come from the seed), and every file of the data folder not hidden (the task's toy analogue without
    --data; a text file itself). Missing ones are left out: loading them fails later, with its own error."""
    base = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else SHIPPED
    weights = {} if cfg.preset or not base.is_dir() else {
        p.name: p for p in sorted(base.iterdir()) if p.name in BASE_FILES or p.suffix in (".safetensors", ".pth")}
    data = Path(cfg.data).expanduser() if cfg.data else toy_folder(cfg.task)
    if data.is_dir():
        files = {str(p.relative_to(data)): p for p in sorted(data.rglob("*"))
                 if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(data).parts)}
    else:
        files = {data.name: data} if data.exists() or data.is_symlink() else {}
    return [("base", base, weights), ("data", data if data.is_dir() else data.parent, files)]


def check_inputs(run: Path, cfg: TrainConfig) -> None:
    """--resume: refuse when a file the run's base or data came from (as RUN_MARKER recorded it at the
    start) is gone, new, or has other bytes now, naming it: the run would go on training on other data
    or another base than its first steps and its metrics did. A run from before the marker has no record."""
    marker = run / RUN_MARKER
    if not (marker.exists() or marker.is_symlink()):
        return
    recorded = read_json(marker).get("inputs")
    if not isinstance(recorded, dict):
        raise ValueError(f"{marker}: no 'inputs' record (an object); delete {marker} to resume without the check")
    for kind, folder, files in input_files(cfg):
        then = recorded.get(kind, {}).get("files", {}) if isinstance(recorded.get(kind), dict) else {}
        for rel in sorted(set(then) | set(files)):
            if rel not in files:
                change = "is gone"
            elif rel not in then:
                change = "is new (it was not there when the run started)"
            elif not isinstance(then[rel], dict) or files[rel].stat().st_size != then[rel].get("bytes"):
                change = "has another size than when the run started"
            elif (now := sha256_file(files[rel])) != then[rel].get("sha256"):
                was = str(then[rel].get("sha256"))[:12]
                change = f"changed since the run started (sha256 {was}... then, {now[:12]}... now)"
            else:
                continue
            raise ValueError(f"--resume {run}: the {kind} file {folder / rel} {change}; the run would go on with "
                             f"other {'data' if kind == 'data' else 'base weights'} than it started with. Put the "
                             f"original back, or start over with --overwrite (to resume anyway, delete {marker})")


def run_evidence(run: Path) -> str | None:
    """None when the folder `run` holds a minipeft run: its RUN_MARKER, or (a run from before the marker)
    a config.json with the run_id and train settings only finetune writes there. Else what it holds
    instead, for an error (a damaged config.json named with its fault), so nothing unknown is deleted."""
    marker, config = run / RUN_MARKER, run / "config.json"
    try:
        if marker.exists() or marker.is_symlink():
            return None if "minipeft_run" in read_json(marker) else f"{marker} has no 'minipeft_run' field"
        if config.exists() or config.is_symlink():
            saved = read_json(config)
            if isinstance(saved.get("run_id"), str) and isinstance(saved.get("train"), dict):
                return None
            found = "its config.json is not a minipeft run's (no run_id and train settings)"
        else:
            found = f"no {RUN_MARKER} or config.json"
    except (OSError, ValueError) as e:
        return str(e)
    names = sorted(p.name for p in run.iterdir())
    return f"{found}; it holds {', '.join(names[:6])}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def resume_config(run: Path, device: str) -> TrainConfig:
    """The TrainConfig saved in RUN/config.json, every field checked, with --out = RUN."""
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run} a run folder?)")
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from None
    train_cfg = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train_cfg, dict):
        raise ValueError(f"{path}: no 'train' section (an object with the run's settings)")
    hints, known = typing.get_type_hints(TrainConfig), {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in train_cfg.items():
        if key not in known:
            raise ValueError(f"{path}: train.{key} is not a setting of this minipeft version")
        if not value_has_type(value, hints[key]):
            raise ValueError(f"{path}: train.{key} must be {_type_name(hints[key])}, got {value!r}")
    cfg = TrainConfig(**dict(train_cfg, out=str(run), device=device))
    _, args = checked_hyper(dict(cfg.method_args, method=cfg.method), f"{path} train.method_args")
    cfg = dataclasses.replace(cfg, method_args=args)
    check_inputs(run, cfg)  # the data and base files are still those the run started from
    return cfg


def _task_of(args: argparse.Namespace) -> str:
    """The recipes.py task: "toy" without --checkpoint/--preset, else Llama-3.2-1B on GSM8K."""
    return "toy" if not args.checkpoint and not args.preset else "llama-3.2-1b"


def _recipe_values(args: argparse.Namespace, values: dict) -> dict:
    """lr (unless --lr), method_args (under --set), out (unless --out) and the record of the recipe."""
    task, r = _task_of(args), recipe(args.method, _task_of(args))
    lr = r.lr if args.lr is None else args.lr
    base = "toy" if task == "toy" else Path(args.checkpoint or args.preset).expanduser().name
    out = args.out or str(Path("runs") / base / ("" if args.task == "gsm8k" else args.task) / args.method)
    line = describe(args.method, task, lr, from_recipe=args.lr is None)
    return dict(lr=lr, method_args={**r.method_args, **values["method_args"]}, out=out,
                recipe=dict(method=args.method, task=task, lr=r.lr, method_args=r.method_args,
                            lr_from="recipe" if args.lr is None else "--lr", line=line))


class _NotGiven(list):
    """The namespace's starting value for every setting: argparse keeps a value already there instead of
    its default (and copies it before an append), so a setting still holding this object was not given."""


def given_settings(argv: Sequence[str]) -> dict:
    """{dest: value} of the flags the command line names, without argparse's defaults."""
    p = build_parser()
    unset = {dest: _NotGiven() for dest in vars(p.parse_args([]))}
    parsed = vars(p.parse_args(argv, namespace=argparse.Namespace(**unset)))
    return {k: v for k, v in parsed.items() if v is not unset[k]}


def check_resume_flags(given: dict, cfg: TrainConfig, run: Path) -> None:
    """--resume RUN takes every setting from RUN/config.json; a flag may come with it (`make finetune`
    always passes --method) only with the value saved there. Refuses the first that differs."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for dest, value in given.items():
        if dest in ("resume", "device", "quiet"):
            continue
        shown = f"--{dest.replace('_', '-')} {value}"
        if dest == "method_args":
            shown, value = " ".join(f"--set {v}" for v in value), parse_method_args(cfg.method, value)
            same, saved = all(cfg.method_args.get(k) == v for k, v in value.items()), cfg.method_args
        elif dest in ("out", "checkpoint", "data"):
            saved = getattr(cfg, dest)
            same = saved is not None and Path(value).expanduser().resolve() == Path(saved).expanduser().resolve()
        elif dest in fields:
            saved, same = getattr(cfg, dest), value == getattr(cfg, dest)
            shown = "--no-baseline" if dest == "baseline" else shown
        else:  # --overwrite, --list-methods
            raise ValueError(f"--resume {run} continues the run saved there; --{dest.replace('_', '-')} cannot "
                             "come with it")
        if not same:
            raise ValueError(f"--resume {run}: {shown} differs from the run's {dest} = {saved!r} in "
                             f"{run / 'config.json'}; a resumed run keeps its settings: drop {shown.split()[0]}, "
                             "or start over with --overwrite")


def saved_step_or_none(run: Path | None) -> int | None:
    try:
        return saved_step(run) if run is not None else None
    except (ValueError, OSError):
        return None


# ----------------------------------------------------------------------------- a run folder as input

def adapter_dir(path: str | Path) -> Path:
    """A run folder (holding adapter/) or an adapter folder itself."""
    path = Path(path)
    if (path / "adapter" / CONFIG_FILE).exists():
        return path / "adapter"
    if (path / CONFIG_FILE).exists() or (path / "adapter_config.json").exists():
        return path
    raise FileNotFoundError(f"{path}: neither a run folder with adapter/{CONFIG_FILE} nor an adapter folder")


# What each TrainConfig field is to the model that evaluate, generate and export rebuild from a run:
# MODEL_FIELDS make the function its adapter was trained in, and base.load_run_base applies every one;
# every other field is in OTHER_FIELDS with the reason it leaves that function alone. A new field in
# neither fails tests/test_reliability_jobs.py, so no setting of a run is forgotten by the jobs.
MODEL_FIELDS = ("checkpoint", "preset", "seed", "attention", "sparse_block", "sparse_summary", "quantize")
_TRAINING = "how the adapter was trained; its saved tensors are the result"
OTHER_FIELDS = {
    "method": "the adapter folder records its method (minipeft_adapter.json)",
    "method_args": "the adapter folder records the method's settings",
    "data": "what is evaluated, not the model: evaluate takes the run's unless --data",
    "task": "what is evaluated: evaluate takes the run's unless --task",
    "format": "the prompt, not the model: evaluate takes the run's unless --format, generate uses --chat for chat",
    "max_len": "where evaluate cuts an example: the run's unless --max-len",
    "train_split": "the training data only", "limit": "which examples (evaluate --limit)",
    "eval_limit": "which test examples (evaluate --limit)",
    "max_new_tokens": "the generation budget (--max-new-tokens)",
    "eval_batch_size": "the batching: the same figures up to float rounding (evaluate --batch-size)",
    "device": "where the run ran: bf16 autocast on CUDA, fp32 on the CPU (rounding, not another function)",
    "compile": "torch.compile computes the same function", "grad_checkpoint": "recomputes the same forward",
    "parallel": "how training was spread over processes (FSDP or DDP); the same model and adapter",
    "out": "the run folder itself", "recipe": "a record of where lr and method_args came from",
    **{name: _TRAINING for name in ("epochs", "max_steps", "lr", "weight_decay", "warmup", "min_lr_ratio",
                                    "batch_size", "grad_accum", "clip", "eval_every", "save_every", "pack",
                                    "baseline")},
}


def run_settings(adapter: str | None) -> dict:
    """The `train` settings of a finetune run folder given as --adapter (also as RUN/adapter; {} for an
    adapter folder of its own, or none), so evaluate, generate and export rebuild the run's model
    (MODEL_FIELDS, base.load_run_base) and evaluate its data in its format."""
    if not adapter:
        return {}
    path = Path(adapter).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{adapter}: --adapter folder does not exist (finetune's runs are in "
                                "runs/toy/METHOD or runs/CHECKPOINT_NAME/METHOD)")
    if not (path / "config.json").is_file() and path.name == "adapter" and run_evidence(path.parent) is None:
        path = path.parent  # RUN/adapter: the run's own settings, not the toy base's defaults
    if not (path / "config.json").is_file():
        return {}
    try:
        saved = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    train = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train, dict):
        raise ValueError(f"{path / 'config.json'}: no 'train' section (an object with the run's settings)")
    return train


# ----------------------------------------------------------------------------- reporting

def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def mean_throughput(recs: list[dict]) -> float:
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in recs)
    return sum(r["tokens"] for r in recs) / seconds if seconds else float("nan")


def summary_line(s: dict) -> str:
    """"lora: test 0.4440 -> 0.0378 bits/token, accuracy 1.5% -> 57.0%, strict-match ... -> ..., flexible-extract
    ... -> ... (...)": lm-eval's two GSM8K figures where the summary has them. A figure the base model has no
    value for (--no-baseline) is printed alone, and the line says the base was not evaluated."""
    before, after = s["before"] or {}, s["after"]
    change = lambda key, spec: (f"{before[key]:{spec}} -> " if key in before else "") + f"{after[key]:{spec}}"
    parts = [f"test {change('test_bpt', '.4f')} bits/token", f"accuracy {change('accuracy', '.1%')}"]
    parts += [f"{label} {change(key, '.1%')}" for key, label in (("strict_match", "strict-match"),
                                                                  ("flexible_extract", "flexible-extract")) if key in after]
    note = "" if before else "; the base model not evaluated"
    return f"{s['method']}: {', '.join(parts)} ({s['trainable_params']:,} trainable params, {s['wall_seconds']:.0f}s{note})"


def say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def progress_bar(progress: bool, total: int, start: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)


