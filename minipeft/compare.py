"""Every PEFT method on the toy task with a matched budget: a table and an accuracy-vs-parameters plot.

Each method gets the same base model, data, number of optimiser steps, batch size, warmup + cosine
schedule and evaluation; the peak learning rate and any method settings are each method's recipe
(minipeft/recipes.py: "toy" without --checkpoint, else "llama-3.2-1b"), the same table finetune reads. The base model is evaluated once, up front.

    python -m minipeft.compare                          # all methods, writes runs/compare/{compare.md,.png,.json}
    python -m minipeft.compare --methods lora,ia3 --steps 100

`--throughput` instead measures training speed and memory on a preset with random weights (meant for
a GPU): packed rows of --max-len tokens, a few warm-up steps, then tokens/s and peak memory per method.

    python -m minipeft.compare --throughput --preset llama-3.2-1b --max-len 512 \\
        --methods lora,dora,ia3,ia3pp,prefix_tuning,llama_adapter
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .adapters import METHODS, apply_method
from .data import encode_example, pack, synthetic_gsm8k
from .evaluate import autocast, evaluate, load_base, load_task, pick_device
from .finetune import Diverged, TrainConfig, train, train_step
from .peft import count_parameters, param_groups
from .recipes import recipe
from .safetensors_io import atomic_write



def available_methods() -> list[str]:
    """The METHODS whose module exists in this checkout."""
    import importlib.util
    return [m for m, (module, _) in METHODS.items() if importlib.util.find_spec(module) is not None]


def compare(methods: list[str], out: Path, steps: int, checkpoint: str | None = None, data: str | None = None,
            limit: int = 0, eval_limit: int = 0, batch_size: int = 16, max_new_tokens: int = 160,
            progress: bool = True) -> list[dict]:
    """Train each method with the same budget; returns one row per method (also compare.json)."""
    device = pick_device()
    model, tok, _ = load_base(checkpoint, None, device, progress)
    _, test, _ = load_task(data, limit)
    test = test[:eval_limit] if eval_limit else test
    base = evaluate(model, tok, test, max_new_tokens=max_new_tokens)
    _, total = count_parameters(model)
    rows = [dict(method="base model", trainable_params=0, trainable_pct=0.0, test_bpt=base["test_bpt"],
                 accuracy=base["accuracy"], seconds=base["seconds"], lr=None)]
    say(progress, f"base model: {base['test_bpt']:.4f} bits/token, accuracy {base['accuracy']:.1%}")
    for method in methods:
        plan = recipe(method, "toy" if checkpoint is None else "llama-3.2-1b")
        cfg = TrainConfig(checkpoint=checkpoint, data=data, method=method, method_args=dict(plan.method_args),
                          out=str(out / method), max_steps=steps, lr=plan.lr,
                          batch_size=batch_size, limit=limit, eval_limit=eval_limit, eval_every=max(1, steps // 4),
                          max_new_tokens=max_new_tokens, baseline=False)
        t0 = time.time()
        try:
            s = train(cfg, progress=False)
            row = dict(method=method, trainable_params=s["trainable_params"], trainable_pct=s["trainable_pct"],
                       test_bpt=s["after"]["test_bpt"], accuracy=s["after"]["accuracy"])
        except Diverged as e:
            row = dict(method=method, trainable_params=None, trainable_pct=None, test_bpt=float("nan"),
                       accuracy=float("nan"), error=str(e))
        rows.append(dict(row, seconds=time.time() - t0, lr=cfg.lr))
        say(progress, format_row(rows[-1]))
    write_outputs(rows, out, steps, total)
    return rows


def format_row(r: dict) -> str:
    params = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
    pct = "-" if r["trainable_pct"] is None else f"{r['trainable_pct']:.3f}"
    lr = "-" if r["lr"] is None else f"{r['lr']:g}"
    return (f"| {r['method']} | {params} | {pct} | {r['test_bpt']:.4f} | {100 * r['accuracy']:.1f} | "
            f"{r['seconds']:.0f} | {lr} |")


def write_outputs(rows: list[dict], out: Path, steps: int, total: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = ["| method | trainable params | % of total | test bits/token | accuracy (%) | seconds | lr |",
             "|---|---:|---:|---:|---:|---:|---:|"] + [format_row(r) for r in rows]
    note = (f"\n{steps} optimiser steps per method, same data order, batch size, warmup + cosine schedule; "
            f"{total:,} base parameters. Errors: " +
            ("; ".join(f"{r['method']}: {r['error']}" for r in rows if "error" in r) or "none") + "\n")
    with atomic_write(out / "compare.md", "w") as f:
        f.write("\n".join(table) + "\n" + note)
    with atomic_write(out / "compare.json", "w") as f:
        json.dump(rows, f, indent=2)
    plot_accuracy_vs_params(rows, out / "compare.png")


def plot_accuracy_vs_params(rows: list[dict], path: Path) -> None:
    """Accuracy against trainable parameters (log x), one labelled point per method (cf. LoRA, Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = sorted((r for r in rows if r["trainable_params"] and r["accuracy"] == r["accuracy"]),
                 key=lambda r: (r["trainable_params"], -r["accuracy"]))
    placed: list[tuple[float, float]] = []  # (log10 params, accuracy %) of labels already drawn
    for r in pts:
        x, y = r["trainable_params"], 100 * r["accuracy"]
        ax.scatter(x, y, s=30)
        near = sum(abs(math.log10(x) - px) < 0.06 and abs(y - py) < 1.5 for px, py in placed)
        placed.append((math.log10(x), y))
        ax.annotate(r["method"], (x, y), fontsize=8, xytext=(4, 3 - 10 * near), textcoords="offset points")
    base = next((r for r in rows if r["method"] == "base model"), None)
    if base is not None:
        ax.axhline(100 * base["accuracy"], color="gray", ls="--", lw=1, label="base model (no fine-tuning)")
        ax.legend(loc="upper left")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Toy GSM8K-format task: accuracy vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- GPU throughput

def throughput(preset: str, methods: list[str], max_len: int = 512, batch_size: int = 8, steps: int = 10,
               warmup_steps: int = 3, grad_checkpoint: bool = False, device: str = "auto") -> list[dict]:
    """Tokens/s and peak memory of `steps` training steps per method on `preset` (random weights),
    packed rows of max_len synthetic GSM8K-format tokens; the first `warmup_steps` are not timed."""
    dev, rows = pick_device(device), []
    for method in methods:
        model, tok, _ = load_base(None, preset, dev, progress=False)
        examples = [encode_example(tok, ex, max_len=max_len) for ex in synthetic_gsm8k(40 * batch_size)]
        idx, targets, seg = pack(examples, max_len, tok.pad_id)
        apply_method(model, method, **recipe(method, "llama-3.2-1b").method_args)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.grad_checkpoint = grad_checkpoint
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-4, fused=dev.type == "cuda")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        tokens, seconds = 0, 0.0
        for step in range(warmup_steps + steps):
            start = (step * batch_size) % max(1, len(idx) - batch_size + 1)
            batch = tuple(t[start:start + batch_size] for t in (idx, targets, seg))  # (B, max_len) each
            t0 = time.time()
            _, n, _, _ = train_step(model, model, opt, [batch], 1.0, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step >= warmup_steps:
                tokens, seconds = tokens + n, seconds + time.time() - t0
        trainable, total = count_parameters(model)
        rows.append(dict(method=method, trainable_params=trainable, tokens_per_s=tokens / seconds,
                         peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None))
        mem = rows[-1]["peak_mem_gib"]
        print(f"{method:>16}: {trainable:>12,} trainable  {rows[-1]['tokens_per_s']:>10,.0f} tokens/s  peak memory "
              + (f"{mem:.2f} GiB" if mem is not None else "n/a (CPU)"), flush=True)
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipeft.compare",
                                description="Compare PEFT methods with a matched budget.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", help="comma-separated names; when not given: every method that exists")
    p.add_argument("--steps", type=int, default=375, help="optimiser steps per method (375 = the toy default's 3 epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (at most 8 with --throughput)")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, .png, .json and the runs")
    p.add_argument("--checkpoint", help="base model folder; when not given: the toy base")
    p.add_argument("--data", help="GSM8K-format folder; when not given: the toy task")
    p.add_argument("--limit", type=int, default=0, help="first N train and test examples (0: all)")
    p.add_argument("--eval-limit", type=int, default=0, help="first N test examples (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget for accuracy")
    p.add_argument("--throughput", action="store_true", help="measure tokens/s and memory on --preset instead")
    p.add_argument("--preset", default="llama-3.2-1b", help="model shape for --throughput (random weights)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per packed row for --throughput")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block (--throughput)")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else available_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown methods {unknown}; known: {sorted(METHODS)}", file=sys.stderr)
        return 1
    if args.throughput:
        throughput(args.preset, methods, args.max_len, min(args.batch_size, 8), grad_checkpoint=args.grad_checkpoint)
        return 0
    t0 = time.time()
    compare(methods, Path(args.out), args.steps, args.checkpoint, args.data, args.limit, args.eval_limit,
            args.batch_size, args.max_new_tokens)
    print(f"wrote {args.out}/compare.md, compare.png, compare.json in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
