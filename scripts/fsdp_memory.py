"""Peak memory per process of a 1B-shaped Llama (random bf16 weights) fine-tuned with LoRA, one process
against FSDP2 over N CPU processes (gloo): batch 1 per process, T tokens, a few optimiser steps, through
minipeft's own path (distributed.World: rank 0 builds the model, the others a meta skeleton; LoRA put in
place, the base frozen, then fully_shard per block and root, the shards scattered; finetune.train_step).

    .venv/bin/python scripts/fsdp_memory.py                     # llama-3.2-1b shape, T=256, 2 processes
    .venv/bin/python scripts/fsdp_memory.py --nproc 4 --seq 128

Prints each process's peak resident memory (VmHWM, GiB) for building the model ("load": the model
built, LoRA in place, sharded) and for training alone (the peak is reset after loading, through
/proc/self/clear_refs), and the ratio of each rank's training peak to the one process's. The processes
run with MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the resident set at once. On a GPU the
rank-0 copy of the model lives in host memory, so the device holds what "train" measures here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.distributed import World  # noqa: E402
from minipeft.finetune import train_step  # noqa: E402
from minipeft.llama import Llama, LlamaConfig  # noqa: E402
from minipeft.peft import param_groups  # noqa: E402
from minipeft.runs import TrainConfig  # noqa: E402


def status_gib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: the peak), in GiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


def peak_gib(reset: bool = False) -> float:
    """This process's peak resident memory so far (VmHWM), in GiB; reset: start a new peak after reading."""
    peak = status_gib("VmHWM")
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def trace_blocks(model: Llama, log: dict) -> None:
    """log[i] = resident GiB at block i's forward start and end, then its backward start and end (the
    last step's): where in the step the memory goes."""
    for i, block in enumerate(model.layers):
        log[i] = [0.0] * 4
        def mark(slot, i=i):
            return lambda *_: log[i].__setitem__(slot, status_gib("VmRSS"))
        block.register_forward_pre_hook(mark(0))
        block.register_forward_hook(mark(1))
        block.register_full_backward_pre_hook(mark(2))
        block.register_full_backward_hook(mark(3))


def random_bf16(cfg: LlamaConfig) -> Llama:
    """The model with random bf16 weights, built without an fp32 copy: meta, then memory, then values."""
    with torch.device("meta"):
        model = Llama(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.embed_tokens.weight  # to_empty makes new tensors: tie them again
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(std=0.02)
    return model.eval()


def child(role: str, preset: str, seq: int, steps: int, layers: int, recompute: bool, trace: bool) -> None:
    torch.set_num_threads(1)
    world = World.join("cpu") if role == "fsdp" else World()
    world.configure(TrainConfig(parallel="fsdp"))
    cfg = LlamaConfig.from_name(preset)
    cfg = dataclasses.replace(cfg, n_layers=layers or cfg.n_layers)
    t0 = time.time()
    torch.manual_seed(0)
    if world.main:
        model = random_bf16(cfg)
    else:
        with torch.device("meta"):
            model = Llama(cfg).to(torch.bfloat16).eval()
    world.apply_method(model, lambda: apply_method(model, "lora", r=8))
    for p in model.parameters():  # fp32 master weights for what trains, as finetune.prepare_model makes them
        if p.requires_grad:
            p.data = p.data.float()
    world.shard(model)
    model.grad_checkpoint = recompute  # finetune --grad-checkpoint: each block recomputed in the backward
    opt = torch.optim.AdamW(param_groups(model, 1e-4))
    log = {}
    if trace:
        trace_blocks(model, log)
    load = peak_gib(reset=True)
    t1 = time.time()
    g = torch.Generator().manual_seed(world.rank)
    for _ in range(steps):
        idx = torch.randint(0, cfg.vocab_size, (1, seq), generator=g)
        batch = (idx, torch.roll(idx, -1, 1), torch.ones_like(idx))
        model.train()
        start = status_gib("VmRSS")  # the last step's start, for --trace
        train_step(model, model, opt, [batch], 1.0, torch.device("cpu"), world=world)
    out = dict(role=role, rank=world.rank, load_gib=load, train_gib=peak_gib(), load_s=t1 - t0,
               step_s=(time.time() - t1) / steps, recompute=model.grad_checkpoint, start_gib=start, trace=log)
    for line in world.gather_objects(json.dumps(out)):
        if world.main:
            print("RESULT " + line, flush=True)
    world.leave(done=True)


# every large allocation its own mapping, returned at free: the high-water mark then follows the live
# tensors (by default glibc keeps freed blocks in its heap, and what one step freed inflates the next)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(cmd: list[str]) -> list[dict]:
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV))
    found = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not found:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (batch 1 per process)")
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps measured")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="blocks (0: the preset's)")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in the backward, "
                    "as finetune --grad-checkpoint (both runs)")
    ap.add_argument("--trace", action="store_true", help="also print the resident memory at the last step's "
                    "start and at each block's forward and backward (one process and the last rank)")
    ap.add_argument("--role", choices=("one", "fsdp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trace and args.grad_checkpoint:  # the recomputed forward would fire the forward hooks again
        ap.error("--trace with --grad-checkpoint: the blocks' recomputation in the backward would overwrite "
                 "their forward figures; trace without --grad-checkpoint")
    common = ["--preset", args.preset, "--seq", str(args.seq), "--steps", str(args.steps), "--layers", str(args.layers),
              *(["--grad-checkpoint"] if args.grad_checkpoint else []), *(["--trace"] if args.trace else [])]
    if args.role:
        return child(args.role, args.preset, args.seq, args.steps, args.layers, args.grad_checkpoint, args.trace)
    me = [sys.executable, str(Path(__file__).resolve())]
    results = run(me + common + ["--role", "one"])
    results += run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(args.nproc)] + me[1:] + common + ["--role", "fsdp"])
    one = results[0]["train_gib"]
    recomputed = ", blocks recomputed in the backward" if all(r["recompute"] for r in results) else ""
    print(f"{args.preset}, random bf16 weights, LoRA r=8 on q_proj/v_proj, batch 1 x T={args.seq} per process, "
          f"{args.steps} steps{recomputed}, torch {torch.__version__}")
    print(f"{'process':<16}{'load peak GiB':>15}{'train peak GiB':>16}{'train / one':>13}{'s/step':>9}")
    for r in results:
        name = "one process" if r["role"] == "one" else f"FSDP rank {r['rank']}/{args.nproc}"
        print(f"{name:<16}{r['load_gib']:>15.2f}{r['train_gib']:>16.2f}{r['train_gib'] / one:>13.2f}"
              f"{r['step_s']:>9.1f}")
    for r in (results[0], results[-1]) if args.trace else ():
        name = "one process" if r["role"] == "one" else f"FSDP rank {r['rank']}/{args.nproc}"
        print(f"\n{name}, resident GiB in the last step: {r['start_gib']:.3f} at its start, then at each block "
              f"(train peak {r['train_gib']:.3f})")
        print(f"{'block':>5}{'forward start':>15}{'end':>7}{'backward start':>16}{'end':>7}")
        for i, marks in r["trace"].items():
            print(f"{i:>5}{marks[0]:>15.3f}{marks[1]:>7.3f}{marks[2]:>16.3f}{marks[3]:>7.3f}")


if __name__ == "__main__":
    main()
