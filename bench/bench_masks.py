"""Attention with a packed row's document mask: dense (B, 1, T, T) bool mask vs FlexAttention block mask.

    python bench/bench_masks.py                     # CPU, T = 2048, toy heads; one fresh process per variant
    python bench/bench_masks.py --forward-only      # CPU FlexAttention has no backward (torch 2.13)
    python bench/bench_masks.py --device cuda --seq-len 2048 8192

Each variant runs forward + backward (forward only with --forward-only) of one grouped-query attention (q, k, v with gradients) on a row
of documents of --doc-len tokens, after building its mask (timed separately: the block mask's cost is
paid once per batch, in Llama.mask_and_positions). Variants: `dense` (SDPA with the bool mask), `causal`
(SDPA is_causal=True: the lower bound, no document masking), `flex` (eager flex_attention) and
`flex-compiled` (torch.compile(flex_attention), the way Llama uses it on CUDA). Peak memory is the
process's high-water mark above its state before the mask (CPU) or max_memory_allocated (CUDA).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft.masks import document_block_mask, segment_mask  # noqa: E402

VARIANTS = ("dense", "causal", "flex", "flex-compiled")


def vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_hwm() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def child(args) -> dict:
    torch.manual_seed(0)
    dev, T, H, KV, hd = args.device, args.seq_len[0], args.heads, args.kv_heads, args.head_dim
    seg = (torch.arange(T, device=dev) // args.doc_len + 1)[None]  # (1, T): documents 1, 2, ...
    grad = not args.forward_only
    q = torch.randn(1, H, T, hd, device=dev, requires_grad=grad)
    k = torch.randn(1, KV, T, hd, device=dev, requires_grad=grad)
    v = torch.randn(1, KV, T, hd, device=dev, requires_grad=grad)
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False) if args.variant == "flex-compiled" else flex_attention

    def build():
        if args.variant == "dense":
            return segment_mask(seg, seg)
        if args.variant == "causal":
            return None
        return document_block_mask(seg)

    def step(mask):
        if args.variant in ("dense", "causal"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            y = flex(q, k, v, block_mask=mask, enable_gqa=True)
        if not args.forward_only:
            y.sum().backward()

    t0 = time.perf_counter()
    mask = build()
    mask_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step(mask)  # warm-up (compiles, for flex-compiled)
    first_s = time.perf_counter() - t0
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_hwm()
    base = vm_kib("VmRSS")
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        mask = build()
        step(mask)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else (vm_kib("VmHWM") - base) / 1024)
    return dict(variant=args.variant, seq_len=T, mask_build_s=mask_s, first_step_s=first_s,
                step_s=statistics.median(times), peak_mib_above_inputs=peak)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048])
    p.add_argument("--doc-len", type=int, default=256, help="tokens per packed document")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--forward-only", action="store_true", help="no backward (FlexAttention has none on CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout", type=int, default=600, help="seconds per variant (compilation included)")
    p.add_argument("--json", type=Path)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return []
    rows = []
    print(f"{'T':>6} {'variant':>14} {'mask build':>11} {'first step':>11} {'step':>9} {'peak MiB':>9}")
    for T in args.seq_len:
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant, "--seq-len", str(T), "--device", args.device,
                   "--doc-len", str(args.doc_len), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
                   "--head-dim", str(args.head_dim), "--reps", str(args.reps)]
            cmd += ["--forward-only"] * args.forward_only
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{T:>6} {variant:>14}  did not finish in {args.timeout}s", flush=True)
                rows.append(dict(variant=variant, seq_len=T, error=f"timeout {args.timeout}s"))
                continue
            if out.returncode:
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{T:>6} {variant:>14}  failed: {err}", flush=True)
                rows.append(dict(variant=variant, seq_len=T, error=err))
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{T:>6} {variant:>14} {r['mask_build_s'] * 1e3:>9.1f}ms {r['first_step_s']:>10.2f}s "
                  f"{r['step_s'] * 1e3:>7.0f}ms {r['peak_mib_above_inputs']:>9.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
