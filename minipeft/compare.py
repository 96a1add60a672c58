"""Every PEFT method on the toy task with a matched budget, over seeds: a table with spread and two plots.

Each method gets the same base model, data, number of optimiser steps, batch size, warmup + cosine
schedule and evaluation; the peak learning rate and any method settings are each method's recipe
(minipeft/recipes.py: "toy" without --checkpoint, else "llama-3.2-1b"), the table finetune reads.
Every method runs once per seed (the seed sets the adapter's initialisation and the data order; the
base model is the same), and the table gives mean ± standard deviation over the seeds (one seed, as
with --quick: single values, no spread and no verdicts). The base model is evaluated once, up front;
compare.md's note names every entry whose test bits/token is not clearly below the base's (mean + 2
standard errors over the seeds not under it). The default budget is
one epoch of the toy task (125 steps of batch 16) and the first 100 test problems, so that every method
and the claims' variants (90 runs) finish in about an hour on 2 CPU cores, one one-thread process per
core (55 min measured, results/README.md); `--steps`, `--eval-limit` and `--jobs` change it.

    .venv/bin/python -m minipeft.compare                          # every method + the claims' variants, seeds 0,1,2
    .venv/bin/python -m minipeft.compare --quick                  # one seed, 40 steps, 40 test problems (labs)
    .venv/bin/python -m minipeft.compare --methods lora,ia3pp,ia3pp+use_l_o=false --seeds 0,1,2

A method entry is a name from the methods table, optionally followed by `+field=value` settings of
its config (the same fields as `finetune --set`), e.g. `lora+gamma=4` or `prefix_tuning+mlp_hidden=64`;
the entry is the row's label. Each run keeps its folder runs/<label>/lr<lr>-seed<seed>/ under --out:
a rerun with the same settings reuses finished runs (an interrupted compare continues where it
stopped), other settings in the same --out are refused unless --overwrite.

`--sweep` chooses learning rates by the protocol of the write-up "Parameter Efficient Fine Tuning
Ideas": for each method a small grid of peak rates around its recipe (x1/3, x1, x3 by default;
`--factors 3` tries one rate beyond a choice at the grid's top edge), one seed, three epochs; the
target is the training loss of the third epoch (lowest wins), and the table also reports the best
test loss over the epochs and the accuracy. It writes sweep.md / sweep.json; the chosen rates go into
minipeft/recipes.py by hand, with the figures in a comment.

`--throughput` instead measures training speed and memory on a preset with random weights (meant for
a GPU): packed rows of --max-len tokens, a few warm-up steps, then tokens/s and peak memory per method.

    .venv/bin/python -m minipeft.compare --throughput --preset llama-3.2-1b --max-len 512 \\
        --methods lora,dora,ia3,ia3pp,prefix_tuning,llama_adapter
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import torch

from .adapters import METHODS, apply_method
from .data import encode_example, pack, synthetic_gsm8k
from .base import load_base, pick_device
from .finetune import Diverged, train, train_step
from .runs import TrainConfig, parse_method_args, run_evidence
from .scoring import evaluate
from .peft import count_parameters, param_groups
from .plots import write_plots
from .recipes import describe, recipe
from .safetensors_io import atomic_write, read_json as read_object
from .tasks import TASKS, load_test_set
from .toy import TOY_TRAINING

# The budgets. A full compare (every method, the claims' variants, 3 seeds: 90 runs) at the sweep's three
# epochs would take about 2.5 h on 2 CPU cores; one epoch on half the test problems fits in about an hour.
COMPARE = dict(steps=125, eval_limit=100)                   # the default: one epoch of the toy task, 100 problems
QUICK = dict(steps=40, eval_limit=40, seeds=(0,), evals=1)  # `--quick`: every method in a few minutes on 2 cores
SWEEP = dict(steps=375, eval_limit=0)                       # `--sweep`: three epochs (the protocol), every problem
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)                           # `--sweep`: peak rates tried around each recipe's


def available_methods() -> list[str]:
    """The METHODS whose module exists in this checkout."""
    import importlib.util
    return [m for m, (module, _) in METHODS.items() if importlib.util.find_spec(module) is not None]


def default_entries() -> list[str]:
    """What a full compare runs without --methods: every method, then the claims' variants (CLAIMS)."""
    methods = available_methods()
    variants = [e for _, a, b, _, _ in CLAIMS for e in (a, b) if "+" in e and e.split("+")[0] in methods]
    return methods + list(dict.fromkeys(variants))


def default_jobs(checkpoint: str | None) -> int:
    """One one-thread process per CPU core (at most 8) on the toy base; one process with a checkpoint."""
    return 1 if checkpoint else max(1, min(8, os.cpu_count() or 1))


def parse_entry(entry: str) -> tuple[str, dict]:
    """"ia3pp+use_l_o=false" -> ("ia3pp", {"use_l_o": False}); fields typed as `finetune --set` types them."""
    method, *pairs = entry.split("+")
    if method not in METHODS:
        raise ValueError(f"--methods {entry!r}: unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    return method, parse_method_args(method, pairs)


def run_folder(out: Path, label: str, lr: float, seed: int) -> Path:
    return out / "runs" / label.replace("/", "_") / f"lr{lr:.3g}-seed{seed}"


def plan_runs(entries: list[str], seeds: list[int], out: Path, steps: int, checkpoint: str | None,
              data: str | None, limit: int, eval_limit: int, batch_size: int, max_new_tokens: int,
              lrs: dict[str, list[float]] | None = None, task: str = "gsm8k", evals: int = 7) -> list[TrainConfig]:
    """One TrainConfig per (entry, peak rate, seed): the entry's recipe plus its `+field=value` settings;
    the test loss is measured `evals` times during each run (and at epoch ends)."""
    recipe_task = "toy" if checkpoint is None else "llama-3.2-1b"
    cfgs = []
    for entry in entries:
        method, settings = parse_entry(entry)
        plan = recipe(method, recipe_task)
        for lr in (lrs or {}).get(entry, [plan.lr]):
            for seed in seeds:
                cfgs.append(TrainConfig(
                    checkpoint=checkpoint, data=data, task=task, method=method, method_args={**plan.method_args, **settings},
                    out=str(run_folder(out, entry, lr, seed)), max_steps=steps, lr=lr, seed=seed,
                    batch_size=batch_size, max_len=TOY_TRAINING["max_len"], limit=limit, eval_limit=eval_limit,
                    eval_every=max(1, steps // evals), max_new_tokens=max_new_tokens, baseline=False,
                    recipe=dict(method=method, task=recipe_task, lr=plan.lr, method_args=plan.method_args,
                                entry=entry, lr_from="recipe" if lr == plan.lr else "--sweep",
                                line=f"{describe(method, recipe_task, lr, lr == plan.lr)}; compare entry {entry}")))
    return cfgs


def finished_summary(cfg: TrainConfig, overwrite: bool) -> dict | None:
    """The summary of a finished run with these settings in cfg.out (reused, also after --out was moved),
    else None, the folder cleared for a new run. Only a minipeft run (runs.run_evidence) is ever cleared:
    anything else, and a run whose config.json cannot be read, is refused, naming what is there; a run
    with other settings is refused, naming them, unless `overwrite`."""
    run = Path(cfg.out)
    if not (run.exists() or run.is_symlink()) or (run.is_dir() and not any(run.iterdir())):
        return None
    why = "a symbolic link" if run.is_symlink() else run_evidence(run) if run.is_dir() else "a file"
    if why:
        raise FileExistsError(f"{run}: not a minipeft run folder ({why}); nothing was deleted: move it away, or "
                              "use another --out")
    if (run / "config.json").exists():  # else killed before its settings were written: nothing to keep
        try:
            recorded = read_object(run / "config.json").get("train")
            if not isinstance(recorded, dict):
                raise ValueError(f"{run / 'config.json'}: no 'train' section (an object with the run's settings)")
        except (OSError, ValueError) as e:
            if not overwrite:
                raise FileExistsError(f"{run}: cannot tell which run it holds ({e}); nothing was deleted: repair or "
                                      "move it, or train it again with --overwrite") from None
        else:
            differ = other_settings(recorded, cfg)
            if not differ and (run / "summary.json").exists():
                return read_json(run / "summary.json")
            if differ and not overwrite:
                raise FileExistsError(f"{run}: holds a run with other settings ({differ}); use another --out "
                                      "or --overwrite")
    shutil.rmtree(run)  # a run of ours: unfinished, or replaced with --overwrite
    return None


def other_settings(recorded: dict, cfg: TrainConfig) -> str:
    """"max_steps 3 there, 4 here": the recorded run's settings that differ from cfg's. Not compared:
    out (a moved or differently spelt --out holds the same runs) and recipe (the entry's label and record);
    a setting added after the run was made had its default."""
    plain = lambda c: json.loads(json.dumps(asdict(c), default=str))
    recorded, wanted = {**plain(TrainConfig()), **recorded}, plain(cfg)
    keys = [k for k in {**recorded, **wanted} if k not in ("out", "recipe") and recorded.get(k) != wanted.get(k)]
    shown = "; ".join(f"{k} {recorded.get(k)!r} there, {wanted.get(k)!r} here" for k in keys[:3])
    return shown + (f"; {len(keys) - 3} more" if len(keys) > 3 else "")


def run_one(cfg: TrainConfig, threads: int = 0) -> dict:
    """Train one (entry, rate, seed); a row with the final and the per-evaluation figures."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        s = train(cfg, progress=False)
    except Diverged as e:
        return dict(error=str(e), seconds=time.time() - t0)
    return summary_row(cfg, s)


def summary_row(cfg: TrainConfig, s: dict) -> dict:
    records = read_jsonl(Path(cfg.out) / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    final = next((r for r in reversed(records) if r["kind"] == "final"), {})
    return dict(trainable_params=s["trainable_params"], trainable_pct=s["trainable_pct"],
                test_bpt=s["after"]["test_bpt"], accuracy=s["after"]["accuracy"], seconds=s["wall_seconds"],
                acc_norm=final.get("acc_norm"),  # ARC's choice-text score; None for the other tasks
                # lm-eval's two GSM8K figures (scoring.evaluate); None for the other tasks and older runs
                strict_match=final.get("strict_match"), flexible_extract=final.get("flexible_extract"),
                early_step=evals[0]["step"] if evals else None, early_test_bpt=evals[0]["test_bpt"] if evals else None,
                best_epoch_test_bpt=min((r["test_bpt"] for r in epochs), default=None),
                last_epoch_train_bpt=epochs[-1]["train_bpt"] if epochs else None)


def execute(cfgs: list[TrainConfig], jobs: int, overwrite: bool, progress: bool, report: bool = False) -> list[dict]:
    """Run (or reuse) every config, `jobs` at a time (each in its own process with one thread when
    jobs > 1); prints "run k/N: label (lr, seed)" before each and its result after. `report`: train
    nothing, keep only the finished runs."""
    results: list[dict | None] = [None] * len(cfgs)
    todo = []
    for i, cfg in enumerate(cfgs):
        if report:
            done = read_json(Path(cfg.out) / "summary.json") if (Path(cfg.out) / "summary.json").exists() else None
            if done is not None:
                results[i] = summary_row(cfg, done)
            continue
        done = finished_summary(cfg, overwrite)
        if done is not None:
            results[i] = dict(summary_row(cfg, done), reused=True)
            say(progress, f"run {i + 1}/{len(cfgs)}: {describe_run(cfg)}: reused {cfg.out}  "
                          f"{results[i]['test_bpt']:.4f} bits/token, accuracy {results[i]['accuracy']:.1%}")
        else:
            todo.append(i)

    def report(i: int) -> None:
        r = results[i]
        text = (f"error: {r['error']}" if "error" in r else
                f"{r['test_bpt']:.4f} bits/token, accuracy {r['accuracy']:.1%}, {r['seconds']:.0f}s")
        say(progress, f"    {describe_run(cfgs[i])}: {text}")

    if jobs <= 1:
        for i in todo:
            say(progress, f"run {i + 1}/{len(cfgs)}: {describe_run(cfgs[i])} ...")
            results[i] = run_one(cfgs[i])
            report(i)
    else:
        import multiprocessing
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {}
            for i in todo:
                say(progress, f"run {i + 1}/{len(cfgs)}: {describe_run(cfgs[i])} (queued)")
                futures[i] = pool.submit(run_one, cfgs[i], 1)
            for i, fut in futures.items():
                results[i] = fut.result()
                report(i)
    return [dict(r, label=c.recipe["entry"], method=c.method, lr=c.lr, seed=c.seed)
            for r, c in zip(results, cfgs) if r is not None]


def read_json(path: Path) -> dict | list:
    """A JSON file's contents; a damaged file is a ValueError naming it (main prints it as one line)."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    """One JSON record per line; a damaged line is a ValueError naming the file and line."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
    return records


def describe_run(cfg: TrainConfig) -> str:
    return f"{cfg.recipe['entry']} (lr {cfg.lr:.3g}, seed {cfg.seed})"


def mean_std(values: list[float | None]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1) of the finite values; the mean is NaN without values,
    the std None below two values (one seed has no spread: compare.json stores null, the tables no ±)."""
    values = [v for v in values if v is not None and v == v]
    mean = statistics.fmean(values) if values else float("nan")
    return mean, statistics.stdev(values) if len(values) > 1 else None


def finished(row: dict) -> int:
    """How many of a row's seeds finished (did not diverge)."""
    return len(row["seeds"]) - row["failed"]


NO_VERDICT = "no verdict: one seed (needs >= 2)"


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (label, lr): mean ± std over the seeds of every figure; failed seeds are counted."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        rows.setdefault((r["label"], r["lr"]), []).append(r)
    out = []
    for (label, lr), group in rows.items():
        ok = [r for r in group if "error" not in r]
        row = dict(method=label, lr=lr, seeds=[r["seed"] for r in group], failed=len(group) - len(ok),
                   errors=[r["error"] for r in group if "error" in r],
                   trainable_params=ok[0]["trainable_params"] if ok else None,
                   trainable_pct=ok[0]["trainable_pct"] if ok else None,
                   early_step=ok[0]["early_step"] if ok else None)
        for key in ("test_bpt", "accuracy", "acc_norm", "strict_match", "flexible_extract", "seconds",
                    "early_test_bpt", "best_epoch_test_bpt", "last_epoch_train_bpt"):
            row[key], row[key + "_std"] = mean_std([r.get(key) for r in ok])
        out.append(row)
    return out


def compare(methods: list[str], out: Path, steps: int, checkpoint: str | None = None, data: str | None = None,
            limit: int = 0, eval_limit: int = 0, batch_size: int = 16, max_new_tokens: int = 160,
            progress: bool = True, seeds: list[int] = (0, 1, 2), jobs: int = 1, overwrite: bool = False,
            lrs: dict[str, list[float]] | None = None, report: bool = False, task: str = "gsm8k",
            evals: int = 7) -> list[dict]:
    """Train each method entry once per seed with the same budget; returns the base row and one
    aggregated row per entry (mean ± std over seeds), also written to compare.{md,json} and two plots.
    `lrs` maps an entry to the peak rate(s) to use instead of its recipe's (e.g. chosen by a sweep)."""
    cfgs = plan_runs(methods, list(seeds), out, steps, checkpoint, data, limit, eval_limit, batch_size, max_new_tokens,
                     lrs, task, evals)
    total, base = evaluate_base(checkpoint, data, limit, eval_limit, max_new_tokens, progress, out, task)
    say(progress, f"{len(methods)} methods x {len(seeds)} seeds = {len(cfgs)} runs of {steps} steps; "
                  f"results in {out}/")
    runs = execute(cfgs, jobs, overwrite, progress, report)
    rows = [base] + aggregate(runs)
    if report:
        seeds = sorted({r["seed"] for r in runs})
    settings = dict(steps=steps, batch_size=batch_size, seeds=list(seeds), eval_limit=eval_limit, limit=limit,
                    max_new_tokens=max_new_tokens, base_params=total,
                    base=Path(checkpoint).name if checkpoint else "toy base (data/toy_base)",
                    data=Path(data).name if data else f"toy {task} task", task=task,
                    recipes="toy" if checkpoint is None else "llama-3.2-1b")
    write_outputs(rows, runs, out, settings)
    say(progress, "\n" + "\n".join(table_lines(rows)))
    return rows


def evaluate_base(checkpoint, data, limit, eval_limit, max_new_tokens, progress, out: Path,
                  task: str = "gsm8k") -> tuple[int, dict]:
    """The base model's row (evaluated once per --out and settings, kept in base_eval.json) and its size."""
    settings = dict(checkpoint=checkpoint, data=data, limit=limit, eval_limit=eval_limit, max_new_tokens=max_new_tokens,
                    task=task)
    cached = out / "base_eval.json"
    saved = read_json(cached) if cached.exists() else {}
    if saved.get("settings") == settings:
        total, base = saved["total_params"], saved["base"]
    else:
        model, tok, _ = load_base(checkpoint, None, pick_device(), progress)
        test, _ = load_test_set(data, task, limit)
        base = evaluate(model, tok, test[:eval_limit] if eval_limit else test, max_new_tokens=max_new_tokens, task=task)
        total = count_parameters(model)[1]
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached, "w") as f:
            json.dump(dict(settings=settings, total_params=total, base=base), f, indent=2)
    say(progress, f"base model: {base['test_bpt']:.4f} bits/token, accuracy {base['accuracy']:.1%}")
    row = dict(method="base model", lr=None, seeds=[], failed=0, errors=[], trainable_params=0, trainable_pct=0.0,
               early_step=None, test_bpt=base["test_bpt"], accuracy=base["accuracy"], seconds=base["seconds"],
               acc_norm=base.get("acc_norm"), strict_match=base.get("strict_match"),
               flexible_extract=base.get("flexible_extract"))
    return total, row


# The design documents' claims, each tested by two compare entries: (claim, entry, reference entry, figure,
# kind). kind "better": the entry's figure is lower (bits) than the reference's; "same": no difference
# beyond the noise; "steadier": a smaller spread over seeds and no more diverged runs.
CLAIMS = [
    ("(IA)3++ beats (IA)3", "ia3pp", "ia3", "test_bpt", "better"),
    ("(IA)3++ is close to LoRA with a fifth of its parameters", "ia3pp", "lora", "test_bpt", "same"),
    ("l_o helps (IA)3++", "ia3pp", "ia3pp+use_l_o=false", "test_bpt", "better"),
    ("Simple DoRA ~ DoRA", "simple_dora", "dora", "test_bpt", "same"),
    ("partial tying beats LoRA at the same size", "partially_tied_lora+r=16", "lora+r=6", "test_bpt", "better"),
    ("the gamma boost speeds up training early", "lora+gamma=4", "lora", "early_test_bpt", "better"),
    ("the prefix MLP stabilises prefix tuning", "prefix_tuning+mlp_hidden=64", "prefix_tuning", "test_bpt", "steadier"),
    ("LLaMA-Adapter v2 beats v1", "llama_adapter+version=2", "llama_adapter", "test_bpt", "better"),
]


def judge(a: dict, b: dict, key: str, kind: str) -> tuple[str, str]:
    """A verdict on one claim from two aggregated rows, and the figures it rests on. The difference of
    means counts when it exceeds two standard errors, sqrt(sa^2/na + sb^2/nb) (a rough two-sided 95%
    test; with 3 seeds a wide one). Fewer than two finished seeds on either side: no verdict."""
    na, nb = finished(a), finished(b)
    ma, sa, mb, sb = a[key], a.get(key + "_std"), b[key], b.get(key + "_std")
    figures = f"{spread(ma, sa, na)} vs {spread(mb, sb, nb)}"
    if not (na and nb and ma == ma and mb == mb):
        return "not measured", figures
    if kind == "steadier":
        figures += f"; diverged {a['failed']} vs {b['failed']} of {len(a['seeds'])}"
        if min(len(a["seeds"]), len(b["seeds"])) < 2:
            return NO_VERDICT, figures
        if a["failed"] != b["failed"]:
            return ("holds" if a["failed"] < b["failed"] else "does not hold"), figures
    if na < 2 or nb < 2:
        return NO_VERDICT, figures
    if kind == "steadier":
        return ("holds" if sa < sb / 2 else "does not hold" if sa > 2 * sb else "within noise"), figures
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    diff = ma - mb
    if kind == "same":
        return ("holds (no difference beyond noise)" if abs(diff) <= 2 * se else
                f"does not hold ({'higher' if diff > 0 else 'lower'} by {abs(diff):.4f})"), figures
    if diff < -2 * se:
        return "holds", figures
    return ("does not hold (the reverse)" if diff > 2 * se else "within noise"), figures


def claims_table(rows: list[dict]) -> list[str]:
    """Markdown lines: each claim whose two entries are in `rows`, the figures and a verdict."""
    by_label = {r["method"]: r for r in rows}
    lines = ["| claim | entry vs reference | figure | entry vs reference (mean ± std) | verdict |",
             "|---|---|---|---|---|"]
    for claim, a, b, key, kind in CLAIMS:
        if a in by_label and b in by_label:
            verdict, figures = judge(by_label[a], by_label[b], key, kind)
            what = {"test_bpt": "test bits/token", "early_test_bpt": f"test bits/token at step {by_label[a]['early_step']}"}
            lines.append(f"| {claim} | {a} vs {b} | {what[key]} | {figures} | {verdict} |")
    return lines


def chosen_rates(path: Path) -> dict[str, list[float]]:
    """{entry: [rate]} for every entry a sweep.json chose a rate for."""
    try:
        rows = json.loads(path.read_text())
        return {r["method"]: [r["lr"]] for r in rows if r["chosen"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--rates {path}: not a sweep.json written by `compare --sweep` ({e})") from None


def sweep(methods: list[str], out: Path, steps: int, factors=SWEEP_FACTORS, checkpoint: str | None = None,
          data: str | None = None, limit: int = 0, eval_limit: int = 0, batch_size: int = 16,
          max_new_tokens: int = 160, progress: bool = True, seed: int = 0, jobs: int = 1,
          overwrite: bool = False, task: str = "gsm8k") -> list[dict]:
    """The write-up's protocol: a grid of peak rates per method (recipe rate x factors), one seed; the
    lowest training loss of the last epoch wins. Writes sweep.md / sweep.json; returns one row per rate."""
    recipes = "toy" if checkpoint is None else "llama-3.2-1b"
    lrs = {e: sorted(float(f"{recipe(parse_entry(e)[0], recipes).lr * f:.2g}") for f in factors) for e in methods}
    cfgs = plan_runs(methods, [seed], out, steps, checkpoint, data, limit, eval_limit, batch_size, max_new_tokens, lrs,
                     task)
    say(progress, f"sweep: {len(methods)} methods x {len(factors)} rates = {len(cfgs)} runs of {steps} steps")
    rows = aggregate(execute(cfgs, jobs, overwrite, progress))
    for entry in methods:
        mine = [r for r in rows if r["method"] == entry]
        best = min(mine, key=lambda r: r["last_epoch_train_bpt"] if r["last_epoch_train_bpt"] == r["last_epoch_train_bpt"]
                   else math.inf)
        for r in mine:
            r["chosen"] = r is best
    lines = ["| method | peak lr | train bits/token, last epoch | best test bits/token (epoch ends) | "
             "final test bits/token | accuracy (%) | chosen |", "|---|---:|---:|---:|---:|---:|:---:|"]
    lines += [f"| {r['method']} | {r['lr']:.3g} | {r['last_epoch_train_bpt']:.4f} | {r['best_epoch_test_bpt']:.4f} | "
              f"{r['test_bpt']:.4f} | {100 * r['accuracy']:.1f} | {'yes' if r['chosen'] else ''} |" for r in rows]
    note = (f"\n{steps} optimiser steps of batch {batch_size} per run, seed {seed}; grid: the recipe's rate times "
            f"{', '.join(f'{f:.3g}' for f in factors)}; target: the last epoch's training loss (lowest wins).\n")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "sweep.md", "w") as f:
        f.write("\n".join(lines) + "\n" + note)
    with atomic_write(out / "sweep.json", "w") as f:
        json.dump(rows, f, indent=2)
    say(progress, "\n" + "\n".join(lines) + note)
    return rows


def sweep_factors(text: str) -> tuple[float, ...]:
    """`--factors` "1/3,1,3" -> (0.333..., 1.0, 3.0); anything but positive numbers or fractions is refused."""
    try:
        factors = tuple(float(Fraction(f.strip())) for f in text.split(","))
    except (ValueError, ZeroDivisionError):
        factors = ()
    if not factors or not all(f > 0 for f in factors):
        raise ValueError(f"--factors {text!r}: give positive numbers or fractions, comma-separated (e.g. 1/3,1,3)")
    return factors


def pm(mean: float, std: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """"0.0517 ± 0.0028"; the mean alone where there is no spread (std None or NaN); "-" without a mean."""
    if mean != mean:
        return "-"
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None and std == std else "")


def spread(mean: float, std: float | None, n: int) -> str:
    """A claim's figure: mean ± std over n seeds, "0.0816 (1 seed)" where one seed gives no spread."""
    return pm(mean, std) + (f" ({n} seed)" if n == 1 else "")


# the optional columns: (key, heading), shown when some row has a figure: ARC's choice-text score, and
# lm-eval's two GSM8K figures (docs/lm-eval.md), the ones published GSM8K scores are
OPTIONAL_COLUMNS = (("acc_norm", "acc_norm (%)"), ("strict_match", "strict-match (%)"),
                    ("flexible_extract", "flexible-extract (%)"))


def table_lines(rows: list[dict]) -> list[str]:
    """The compare table; the OPTIONAL_COLUMNS some row has a figure for (acc_norm: ARC; strict-match and
    flexible-extract: GSM8K), after accuracy."""
    extra = [(key, head) for key, head in OPTIONAL_COLUMNS
             if any(r.get(key) is not None and r[key] == r[key] for r in rows)]
    lines = ["| method | trainable params | % of total | test bits/token | accuracy (%) | "
             + "".join(f"{head} | " for _, head in extra) + "seconds per run | lr | seeds |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|"]
    for r in rows:
        params = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        pct = "-" if r["trainable_pct"] is None else f"{r['trainable_pct']:.3f}"
        seeds = str(len(r["seeds"])) + (f" ({r['failed']} diverged)" if r["failed"] else "") if r["seeds"] else "-"
        std = lambda key: r.get(key + "_std") if finished(r) > 1 else None  # one run: no spread to show
        lines.append(f"| {r['method']} | {params} | {pct} | {pm(r['test_bpt'], std('test_bpt'))} | "
                     f"{pm(r['accuracy'], std('accuracy'), 100, 1)} | "
                     + "".join(f"{pm(_or_nan(r.get(key)), std(key), 100, 1)} | " for key, _ in extra)
                     + f"{r['seconds']:.0f} | "
                     f"{'-' if r['lr'] is None else format(r['lr'], '.3g')} | {seeds} |")
    return lines


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def not_clearly_below_base(rows: list[dict]) -> list[str]:
    """Entries whose test bits/token is not clearly below the base model's: mean + 2 standard errors over
    the seeds (the base is one deterministic evaluation) is not under the base's figure. An entry with
    one finished seed is judged neither way (one_seed_entries)."""
    base = next((r for r in rows if r["method"] == "base model"), None)
    if base is None:
        return []
    failing = []
    for r in rows:
        if r is base or not r["seeds"] or finished(r) == 1:
            continue
        n, std = finished(r), r.get("test_bpt_std")
        se = std / math.sqrt(n) if n > 1 and std is not None and std == std else math.nan
        if not (n and r["test_bpt"] + 2 * se < base["test_bpt"]):
            failing.append(r["method"])
    return failing


def one_seed_entries(rows: list[dict]) -> list[str]:
    """Entries with exactly one finished seed: no spread, so no verdict on them."""
    return [r["method"] for r in rows if r["seeds"] and finished(r) == 1]


def below_base_line(rows: list[dict]) -> str:
    """compare.md's last line: which entries' test bits/token is clearly below the base model's."""
    entries, unjudged = [r for r in rows if r["seeds"]], one_seed_entries(rows)
    if entries and len(unjudged) == len(entries):
        return NO_VERDICT
    failing = not_clearly_below_base(rows)
    line = "every entry" if not failing else f"all but {', '.join(failing)}"
    return line + (f"; {NO_VERDICT} for {', '.join(unjudged)}" if unjudged else "")


def write_outputs(rows: list[dict], runs: list[dict], out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    errors = "; ".join(f"{r['method']}: {e}" for r in rows for e in r["errors"]) or "none"
    seeds = (f"mean ± sample std over seeds {settings['seeds']} (adapter init and data order)"
             if len(settings["seeds"]) > 1 else f"one seed, {settings['seeds']} (adapter init and data order): "
             "single values, no spread and no verdicts")
    note = (f"\n{settings['steps']} optimiser steps of batch {settings['batch_size']} per run, the same data, "
            f"warmup + cosine schedule; {seeds}; {settings['base_params']:,} base parameters; base: {settings['base']}; data: {settings['data']}"
            + (f"; first {settings['eval_limit']} test problems" if settings["eval_limit"] else "")
            + f". Peak rates from minipeft/recipes.py ({settings['recipes']}). Diverged runs: {errors}\n")
    with atomic_write(out / "compare.md", "w") as f:
        f.write("\n".join(table_lines(rows)) + "\n" + note + "Test bits/token clearly below the base model's "
                "(mean + 2 standard errors over the seeds under it): " + below_base_line(rows) + "\n")
    with atomic_write(out / "compare.json", "w") as f:
        json.dump(dict(settings=settings, rows=rows, runs=runs), f, indent=2)
    claims = claims_table(rows)
    if len(claims) > 2:  # the entries of at least one claim were run
        with atomic_write(out / "claims.md", "w") as f:
            f.write("\n".join(claims) + "\n" + note)
    write_plots(rows, out, settings)


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
                                description="Compare PEFT methods with a matched budget, over seeds.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", help="comma-separated entries, each a method name with optional +field=value "
                                     "settings (e.g. ia3pp+use_l_o=false); when not given: every method, plus the "
                                     "claims' variants in a full compare")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (adapter init and data order)")
    p.add_argument("--steps", type=int, help=f"optimiser steps per run; default {COMPARE['steps']} (one epoch of the "
                   f"toy task), {SWEEP['steps']} with --sweep (three epochs)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['steps']} steps, {QUICK['eval_limit']} test problems, seed 0: a few minutes on 2 cores")
    p.add_argument("--sweep", action="store_true", help="choose peak rates: recipe x 1/3, 1, 3 (--factors), one "
                                                        "seed, three epochs; the last epoch's train loss decides")
    p.add_argument("--factors", default="1/3,1,3", help="--sweep: the grid, as multiples of each recipe's rate, "
                   "comma-separated numbers or fractions (e.g. 3 to try one rate above the recipe's)")
    p.add_argument("--rates", help="a sweep.json: each entry it chose a rate for runs at that rate, not its recipe's")
    p.add_argument("--report", action="store_true", help="train nothing: the tables and plots of the runs "
                                                         "already finished in --out")
    p.add_argument("--jobs", type=int, help="runs at a time, each a process with one thread; default: one per "
                   "CPU core (at most 8), 1 with --checkpoint")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (at most 8 with --throughput)")
    p.add_argument("--out", help="folder for the tables, plots and runs; default runs/compare (runs/compare-quick, "
                                 "runs/sweep)")
    p.add_argument("--overwrite", action="store_true", help="replace runs in --out made with other settings")
    p.add_argument("--checkpoint", help="base model folder; when not given: the toy base")
    p.add_argument("--task", choices=tuple(TASKS), default="gsm8k", help="what to train and evaluate on "
                   "(minipeft/tasks.py); accuracy is NaN for dolly and text: read bits/token there")
    p.add_argument("--data", help="the task's data folder; when not given: its toy analogue")
    p.add_argument("--limit", type=int, default=0, help="first N train and test examples (0: all)")
    p.add_argument("--eval-limit", type=int, help=f"first N test examples (0: all); default {COMPARE['eval_limit']}, "
                   f"all with --sweep")
    p.add_argument("--max-new-tokens", type=int, default=160, help="generation budget for accuracy")
    p.add_argument("--throughput", action="store_true", help="measure tokens/s and memory on --preset instead")
    p.add_argument("--preset", default="llama-3.2-1b", help="model shape for --throughput (random weights)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per packed row for --throughput")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing per block (--throughput)")
    args = p.parse_args(argv)
    full = not (args.methods or args.quick or args.sweep or args.throughput)
    methods = args.methods.split(",") if args.methods else default_entries() if full else available_methods()
    try:
        for entry in methods:
            parse_entry(entry)
        seeds = [int(s) for s in args.seeds.split(",")]
        factors = sweep_factors(args.factors)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.throughput:
        throughput(args.preset, [parse_entry(e)[0] for e in methods], args.max_len, min(args.batch_size, 8),
                   grad_checkpoint=args.grad_checkpoint)
        return 0
    budget = QUICK if args.quick else SWEEP if args.sweep else COMPARE
    args.steps = args.steps if args.steps is not None else budget["steps"]
    args.eval_limit = args.eval_limit if args.eval_limit is not None else budget["eval_limit"]
    args.jobs = args.jobs if args.jobs is not None else default_jobs(args.checkpoint)
    if args.quick:
        seeds = list(QUICK["seeds"])
    evals = QUICK["evals"] if args.quick else 7
    out = Path(args.out or ("runs/sweep" if args.sweep else "runs/compare-quick" if args.quick else "runs/compare"))
    t0 = time.time()
    try:
        if args.sweep:
            sweep(methods, out, args.steps, factors, args.checkpoint, args.data, args.limit, args.eval_limit,
                  args.batch_size, args.max_new_tokens, seed=seeds[0], jobs=args.jobs, overwrite=args.overwrite,
                  task=args.task)
            print(f"wrote {out}/sweep.md, sweep.json in {time.time() - t0:.0f}s")
            return 0
        compare(methods, out, args.steps, args.checkpoint, args.data, args.limit, args.eval_limit, args.batch_size,
                args.max_new_tokens, seeds=seeds, jobs=args.jobs, overwrite=args.overwrite, task=args.task, evals=evals,
                lrs=chosen_rates(Path(args.rates)) if args.rates else None, report=args.report)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}/compare.md, compare_accuracy.png, compare_bpt.png, compare.json in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
