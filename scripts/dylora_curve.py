"""DyLoRA's rank-search-free claim, tested in kind on the toy task (issue 16).

Valipour et al. 2023 (arXiv:2210.07558) train one adapter for every rank b <= r_max at once and
claim it then serves each b without a search over ranks. Here: fine-tune DyLoRA (r_max = 8) once on
the toy task with the minipeft.finetune machinery, cut the trained adapter to every b = 1..8 with
`dylora.truncate`, and evaluate test bits/token and greedy accuracy at each; next to it plain LoRA
trained separately at each fixed rank in --lora-ranks (same targets, alpha, steps, data).

    OMP_NUM_THREADS=1 python scripts/dylora_curve.py --out runs/dylora_curve

writes OUT/curve.json, OUT/curve.md (the table) and OUT/curve.png (the plot). The defaults are a
shortened run that fits about 15 minutes on one loaded CPU thread; the settings go into curve.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minipeft.adapters import load_adapter
from minipeft.base import load_base
from minipeft.finetune import train
from minipeft.runs import TrainConfig
from minipeft.scoring import evaluate
from minipeft.tasks import load_test_set
from minipeft.methods import dylora
from minipeft.recipes import recipe
from minipeft.safetensors_io import atomic_write


def run_one(method: str, method_args: dict, args, out: Path, lr: float = 0.0) -> dict:
    """Train with the finetune machinery; the summary (its final evaluation is on the first --test problems)."""
    cfg = TrainConfig(method=method, method_args=method_args, out=str(out), max_steps=args.steps,
                      lr=lr or recipe(method, "toy").lr, batch_size=16, max_len=256, max_new_tokens=160,
                      eval_limit=args.test, limit=0, baseline=False, eval_every=args.steps, seed=args.seed)
    return train(cfg, progress=False)


def evaluate_adapter(adapter: Path, args, b: int | None = None) -> dict:
    model, tok, _ = load_base()
    load_adapter(model, adapter)
    if b is not None:
        dylora.truncate(model, b)
    test, _ = load_test_set(None)
    return evaluate(model.eval(), tok, test[:args.test], max_len=256, max_new_tokens=160)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind, marker in (("dylora", "o-"), ("lora", "s--")):
        pts = [(r["rank"], r["test_bpt"], r["accuracy"]) for r in rows if r["method"] == kind]
        if pts:
            b, bpt, acc = zip(*pts)
            axes[0].plot(b, bpt, marker, label=f"{kind} (one run, cut to b)" if kind == "dylora" else "LoRA trained at r = b")
            axes[1].plot(b, [100 * a for a in acc], marker, label=kind)
    axes[0].set(xlabel="rank b", ylabel="test bits/token", title="Test loss by rank")
    axes[1].set(xlabel="rank b", ylabel="test accuracy (%)", title="Greedy accuracy by rank")
    axes[0].legend()
    fig.suptitle("DyLoRA (r_max = 8, trained once) vs LoRA per rank, toy task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/dylora_curve")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per training run (batch 16)")
    p.add_argument("--test", type=int, default=100, help="test problems evaluated per rank")
    p.add_argument("--lora-ranks", default="1,2,4,8", help="ranks at which plain LoRA is trained ('' for none)")
    p.add_argument("--frozen", action="store_true", help="DyLoRA's frozen mode (only the b-th row/column trains)")
    p.add_argument("--lr", type=float, default=0.0, help="DyLoRA's peak rate (0: its toy recipe's)")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out, targets, t0 = Path(args.out), tuple(args.targets.split(",")), time.time()
    torch.set_num_threads(1)
    rows = []
    run_one("dylora", dict(r=8, r_min=1, alpha=16.0, targets=targets, frozen=args.frozen), args, out / "dylora",
            args.lr)
    for b in range(1, 9):
        rows.append(dict(method="dylora", rank=b, **evaluate_adapter(out / "dylora" / "adapter", args, b)))
        print(rows[-1], flush=True)
    for r in [int(x) for x in args.lora_ranks.split(",") if x]:
        summary = run_one("lora", dict(r=r, alpha=16.0, targets=targets), args, out / f"lora_r{r}")
        rows.append(dict(method="lora", rank=r, **summary["after"]))
        print(rows[-1], flush=True)
    settings = dict(vars(args), lr_dylora=args.lr or recipe("dylora", "toy").lr, lr_lora=recipe("lora", "toy").lr,
                    batch_size=16, wall_seconds=round(time.time() - t0), threads=1)
    with atomic_write(out / "curve.json", "w") as f:
        json.dump(dict(settings=settings, rows=rows), f, indent=1)
    lines = ["| b | DyLoRA bits/token | DyLoRA acc. | LoRA (r = b) bits/token | LoRA acc. |", "|---|---|---|---|---|"]
    lora = {r["rank"]: r for r in rows if r["method"] == "lora"}
    for r in (x for x in rows if x["method"] == "dylora"):
        l = lora.get(r["rank"])
        lines.append(f"| {r['rank']} | {r['test_bpt']:.4f} | {100 * r['accuracy']:.1f}% | "
                     + (f"{l['test_bpt']:.4f} | {100 * l['accuracy']:.1f}% |" if l else "- | - |"))
    with atomic_write(out / "curve.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, out / "curve.png")
    print("\n".join(lines))
    print(f"settings: {settings}")


if __name__ == "__main__":
    main()
