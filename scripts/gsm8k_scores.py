"""Strict-match vs flexible-extract vs minipeft's own accuracy on the toy GSM8K task, before and after
fine-tuning: the figures of docs/lm-eval.md's section "Strict vs flexible on the toy task, measured".

Trains `make finetune`'s run (LoRA with its toy recipe on the shipped toy base; `--steps N` for fewer
optimiser steps) into --run, unless a finished run is there already, and reads its two prediction files:
every test problem's greedy generation, zero-shot in the toy's own `Question: ...\\nAnswer:` format,
scored three ways by minipeft.scoring.evaluate (predictions_base.jsonl: the base model's;
predictions.jsonl: the fine-tuned model's). Then evaluates the same base and adapter under lm-eval's
gsm8k_cot prompt, zero-shot (`Q: ...\\nA:`, a layout in none of the toy base's pretraining documents),
scored by that task's own strict-match ("The answer is N."): what the two figures say when the task
scores another format than the one fine-tuning taught. Writes OUT/summary.json (the figures, how often
a generation has a `#### N` line, the run's settings, the machine and its load average) and prints the
table the page quotes.

    .venv/bin/python scripts/gsm8k_scores.py --run runs/toy/lora-scores --out results/toy-gsm8k-scores
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from minipeft.adapters import load_adapter
from minipeft.base import load_base, pick_device
from minipeft.data import INVALID, STRICT, lm_eval_regex
from minipeft.finetune import main as finetune_main
from minipeft.safetensors_io import write_json
from minipeft.scoring import evaluate
from minipeft.tasks import load_test_set

FIGURES = (("accuracy", "correct"), ("strict_match", "strict_match"), ("flexible_extract", "flexible_extract"))


def figures(records: list[dict]) -> dict:
    """The three scores, how many generations hold a `#### N` line (the fine-tuning format, gsm8k's
    strict-match regex) and how the two lm-eval figures split the problems."""
    n = len(records)
    mean = lambda test: sum(map(test, records)) / n
    out = {key: mean(lambda r: r[field]) for key, field in FIGURES}
    return out | dict(n=n, answer_line=mean(lambda r: lm_eval_regex(r["generated"], STRICT["gsm8k"][0]) != INVALID),
                      strict_only=mean(lambda r: r["strict_match"] and not r["flexible_extract"]),
                      flexible_only=mean(lambda r: r["flexible_extract"] and not r["strict_match"]))


def cot_zero_shot(run: Path, train: dict, data: str) -> dict:
    """{"before", "after"}: the base model and the run's adapter on the same test problems under lm-eval's
    gsm8k_cot prompt, zero-shot, with the run's generation budget; with the machine's load meanwhile."""
    load_before, t0, out = os.getloadavg(), time.time(), {}
    test, _ = load_test_set(data, "gsm8k", train["eval_limit"])
    model, tok, _ = load_base(train["checkpoint"], train["preset"], pick_device(train["device"]), progress=False)
    for tag in ("before", "after"):
        if tag == "after":
            load_adapter(model, run / "adapter")
        result = evaluate(model, tok, test, train["format"], train["max_len"], train["eval_batch_size"],
                          train["max_new_tokens"], run / f"predictions_cot_{tag}.jsonl", gsm8k_style="gsm8k_cot",
                          shots=0)
        out[tag] = figures(read_jsonl(run / f"predictions_cot_{tag}.jsonl"))
        assert all(out[tag][k] == result[k] for k in ("accuracy", "strict_match", "flexible_extract"))
    return out | dict(machine=machine(load_before, time.time() - t0))


def table(summary: dict) -> str:
    """The page's table: one row per figure, before and after fine-tuning, in percent."""
    rows = [("minipeft's accuracy", "accuracy"), ("strict-match (lm-eval)", "strict_match"),
            ("flexible-extract (lm-eval)", "flexible_extract"), ("generations with a `#### N` line", "answer_line"),
            ("flexible right, strict wrong", "flexible_only"), ("strict right, flexible wrong", "strict_only")]
    lines = [f"| toy GSM8K, {summary['before']['n']} test problems, zero-shot | base model | after LoRA |",
             "|---|---:|---:|"]
    lines += [f"| {label} | {100 * summary['before'][key]:.1f}% | {100 * summary['after'][key]:.1f}% |"
              for label, key in rows]
    cot = summary["cot_zero_shot"]
    lines += ["| **the same models, lm-eval's gsm8k_cot prompt `Q: ...\\nA:`, zero-shot** | | |"]
    lines += [f"| {label} | {100 * cot['before'][key]:.1f}% | {100 * cot['after'][key]:.1f}% |"
              for label, key in rows[:4]]
    return "\n".join(lines)


def machine(load_before: tuple, seconds: float) -> dict:
    """Where and under what load the run trained and was evaluated (the machine is shared)."""
    import torch
    return dict(cpus=os.cpu_count(), processor=cpu_name(), torch_threads=torch.get_num_threads(),
                load_average_1_5_15_min_before=[round(x, 2) for x in load_before],
                load_average_1_5_15_min_after=[round(x, 2) for x in os.getloadavg()],
                wall_seconds=round(seconds, 1), date=time.strftime("%Y-%m-%d"))


def relative(path: str) -> str:
    """A path inside the working directory as a relative one (the committed file names no home folder)."""
    return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd().resolve()) else path


def cpu_name() -> str:
    """/proc/cpuinfo's model name (Linux), else what platform says."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def read_jsonl(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if not records or "strict_match" not in records[0]:
        raise ValueError(f"{path}: no strict_match in its records (written before minipeft scored GSM8K lm-eval's "
                         "way): give a new --run folder")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=".venv/bin/python scripts/gsm8k_scores.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/toy/lora-scores", help="the finetune run folder (trained if not finished)")
    p.add_argument("--out", default="results/toy-gsm8k-scores", help="where summary.json goes")
    p.add_argument("--steps", type=int, default=0, help="optimiser steps (0: make finetune's default, 3 epochs)")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    try:
        if not (run / "summary.json").exists():  # = make finetune RUN=<run> [ARGS="--max-steps N"]
            load_before, t0 = os.getloadavg(), time.time()
            steps = ["--max-steps", str(args.steps)] if args.steps else []
            if finetune_main(["--method", "lora", "--out", str(run), *steps]) != 0:
                return 1
            write_json(run / "machine.json", machine(load_before, time.time() - t0))
        config, summary = json.loads((run / "config.json").read_text()), json.loads((run / "summary.json").read_text())
        before, after = read_jsonl(run / "predictions_base.jsonl"), read_jsonl(run / "predictions.jsonl")
        trained_by = json.loads((run / "machine.json").read_text()) if (run / "machine.json").exists() else None
        cot = cot_zero_shot(run, config["train"], config["data"])
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train = config["train"]
    result = dict(
        before=figures(before) | dict(test_bpt=summary["before"]["test_bpt"]),
        after=figures(after) | dict(test_bpt=summary["after"]["test_bpt"]),
        run=dict(folder=args.run, method=train["method"], lr=train["lr"], steps=config["steps"],
                 epochs=train["epochs"], max_steps=train["max_steps"], batch_size=train["batch_size"],
                 format=train["format"], max_new_tokens=train["max_new_tokens"], base=relative(config["base"]),
                 data=relative(config["data"]), run_wall_seconds=round(summary["wall_seconds"], 1)),
        command=f".venv/bin/python scripts/gsm8k_scores.py --run {args.run} --out {args.out}"
                + (f" --steps {args.steps}" if args.steps else ""),
        machine=trained_by or "not recorded: the run was trained outside this script", cot_zero_shot=cot)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", result)
    print(table(result))
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
