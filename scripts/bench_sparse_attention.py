"""Sparse attention on CPU: a LLaMA-Adapter training step, dense vs strided vs fixed, at long lengths.

    OMP_NUM_THREADS=1 python scripts/bench_sparse_attention.py                 # T = 1024 2048 4096, v1 and v2
    OMP_NUM_THREADS=1 python scripts/bench_sparse_attention.py --seq-len 1024 --versions 1 --steps 1
    OMP_NUM_THREADS=1 python scripts/bench_sparse_attention.py --sections loss --out runs/sparse-attention

Model: the "toy" preset's shape (dim 256, 4 layers, 8 heads, 4 key/value heads, vocabulary 512) with
random weights and max_seq_len raised to the longest T; batch 1, one row of T random tokens, loss on
every token; LLaMA-Adapter (prompt_len 10, all layers) applied, AdamW. Variants:
  dense          SDPA, is_causal=True, no mask (on CPU its flash kernel: O(T) memory)
  dense-math     the same through SDPA's math backend: the (T, T) scores are built and kept for backward,
                 as in attention written out (softmax(q k^T / sqrt(d)) v, e.g. Meta's original LLaMA code)
  strided/fixed  Child et al.'s patterns through the block-sparse gather kernel (minipeft/sparse_attention.py)
  strided-mask   the strided pattern as a dense (T, T) mask over full scores (the reference; --mask-reference)
The loss section fine-tunes the shipped toy base with LLaMA-Adapter v1 on packed rows of 1024 tokens,
once per pattern (LOSS_ARGS: 40 steps of 2 rows), and prints the test bits/token of the base under the
pattern and after the run. Each variant of the step section runs in a fresh process: one warm-up step,
then --steps timed steps (median of wall time and of the process's CPU time: on a shared machine the CPU
time is the steadier figure).
Peak memory is the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs
before the timed steps) minus the resident size just before them: the step's transient memory
(activations, scores, gradients), the model and optimiser state excluded. The children run with
MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the resident set at once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.llama import PRESETS, Llama, LlamaConfig  # noqa: E402
from minipeft.sparse_attention import describe  # noqa: E402

VARIANTS = ("dense", "dense-math", "strided", "fixed")
# glibc: serve every allocation of 64 KiB or more by mmap and unmap it when freed, so the resident
# high-water mark follows the live tensors (by default freed memory stays in the heap, and a step after
# the warm-up reuses it without raising the mark)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(T: int, version: int, variant: str, args) -> dict:
    torch.manual_seed(0)
    kind = {"strided-mask": "strided", "dense-math": "dense"}.get(variant, variant)
    cfg = LlamaConfig(**dict(PRESETS["toy"], max_seq_len=T, attention=kind, sparse_block=args.block,
                             sparse_summary=args.summary))
    model = Llama(cfg)
    if variant == "strided-mask":
        model.attention_kernel = "dense"
    apply_method(model, "llama_adapter", version=version, prompt_len=10)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (1, T + 1))

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    if variant == "dense-math":  # route every SDPA call of this process to the math backend
        from torch.nn.attention import SDPBackend, sdpa_kernel
        math_only = sdpa_kernel(SDPBackend.MATH)  # kept referenced: collected, it would restore the backends
        math_only.__enter__()
    step()  # warm-up: lazy allocations, optimiser state
    rss = vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times = [step() for _ in range(args.steps)]
    return dict(T=T, version=version, variant=variant, step_s=statistics.median(t for t, _ in times),
                cpu_s=statistics.median(c for _, c in times), peak_mib=(vm_kib("VmHWM") - rss) / 1024)


LOSS_ARGS = ["--method", "llama_adapter", "--pack", "--max-len", "1024", "--batch-size", "2", "--max-steps", "40",
             "--eval-limit", "60", "--max-new-tokens", "128", "--seed", "0", "--quiet", "--overwrite"]


def loss_runs(args) -> list[dict]:
    """The toy task with LLaMA-Adapter v1 on packed rows of 1024 tokens, once per attention pattern:
    the shipped toy base's test bits/token before (the pattern alone) and after the short run."""
    rows = []
    print(f"toy task: .venv/bin/python -m minipeft.finetune {' '.join(LOSS_ARGS)} --attention A --sparse-block {args.block} "
          f"--sparse-summary {args.summary} --out {args.out}/A")
    print(f"{'attention':>9} {'base bpt':>9} {'after bpt':>9} {'accuracy':>9} {'train s':>8}")
    for attention in VARIANTS_LOSS:
        out = Path(args.out) / attention
        cmd = [sys.executable, "-m", "minipeft.finetune", *LOSS_ARGS, "--attention", attention, "--sparse-block",
               str(args.block), "--sparse-summary", str(args.summary), "--out", str(out)]
        path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path))
        if done.returncode:
            print(f"{attention:>9}  failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        summary = json.loads((out / "summary.json").read_text())
        row = dict(attention=attention, base_bpt=summary["before"]["test_bpt"], after_bpt=summary["after"]["test_bpt"],
                   accuracy=summary["after"]["accuracy"], train_s=summary["train_seconds"])
        rows.append(row)
        print(f"{attention:>9} {row['base_bpt']:>9.4f} {row['after_bpt']:>9.4f} {row['accuracy']:>9.1%} "
              f"{row['train_s']:>8.0f}", flush=True)
    return rows


VARIANTS_LOSS = ("dense", "strided", "fixed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--versions", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + ("strided-mask",))
    p.add_argument("--mask-reference", action="store_true",
                   help="also run strided-mask (the pattern as a dense mask over full scores)")
    p.add_argument("--block", type=int, default=64, help="l (default 64)")
    p.add_argument("--summary", type=int, default=8, help="c of fixed (default 8)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant (median)")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--sections", default="steps,loss", help="steps (training-step time and memory), loss (toy task)")
    p.add_argument("--out", default="runs/sparse-attention", help="run folders of the loss section")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2], args)))
        return
    variants = args.variants + (["strided-mask"] if args.mask_reference else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, load average {os.getloadavg()}")
    print(describe("strided", args.block, args.summary, torch.device("cpu")))
    rows, sections = [], args.sections.split(",")
    if "steps" in sections:
        print(f"model: toy shape {PRESETS['toy']['dim']} dim, {PRESETS['toy']['n_layers']} layers; batch 1; "
              f"LLaMA-Adapter prompt_len 10; l={args.block}, c={args.summary}; median of {args.steps} steps after "
              "1 warm-up; CPU = process time, peak = VmHWM above the state before the steps")
        rows += step_rows(args, variants)
    if "loss" in sections:
        rows += loss_runs(args)
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def step_rows(args, variants) -> list[dict]:
    print(f"{'T':>5} {'ver':>3} {'variant':>13} {'step s':>8} {'CPU s':>7} {'peak MiB':>9}")
    rows = []
    for T in args.seq_len:
        for version in args.versions:
            for variant in variants:
                cmd = [sys.executable, __file__, "--child", str(T), str(version), variant, "--block", str(args.block),
                       "--summary", str(args.summary), "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV))
                if out.returncode:
                    print(f"{T:>5} {version:>3} {variant:>13}  failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{T:>5} {version:>3} {variant:>13} {row['step_s']:>8.2f} {row['cpu_s']:>7.2f} "
                      f"{row['peak_mib']:>9.0f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
