"""bf16 on this CPU: does it have bf16 units, and what does a bf16 LoRA step of the 1B shape cost?

    .venv/bin/python bench/bench_cpu.py                 # flags, one GEMM, a llama-3.2-1b LoRA step fp32 vs bf16
    .venv/bin/python bench/bench_cpu.py --seq-len 128 --reps 3

Prints the bf16 flags of /proc/cpuinfo (avx512_bf16: bf16 dot products; amx_bf16: tile matrix units),
the median time of a 256 x 2048 @ 2048 x 8192 matrix product (the 1B model's gate_proj on 256 tokens) in
fp32 and bf16, and one LoRA training step (r=16 on all seven linears, forward + loss + backward + AdamW)
of the llama-3.2-1b shape (random weights, batch 1) with an fp32 base, and with a bf16 base under CPU bf16
autocast (finetune's CUDA setting): wall and process CPU seconds of the step after a first one.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.llama import Llama, LlamaConfig  # noqa: E402


def flags() -> list[str]:
    info = Path("/proc/cpuinfo")
    words = next((ln.split(":", 1)[1].split() for ln in info.read_text().splitlines() if ln.startswith("flags")),
                 []) if info.exists() else []
    return sorted(w for w in words if "bf16" in w)


def gemm_ms(dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(256, 2048).to(dtype), torch.randn(2048, 8192).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def lora_step(dtype: torch.dtype, seq: int, reps: int) -> tuple[float, float]:
    """(wall s, CPU s) of a LoRA step of the 1B shape, median over `reps` after a first step."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # the base is made in its dtype: never an fp32 copy of a bf16 model
    model = Llama(LlamaConfig.from_name("llama-3.2-1b"))
    torch.set_default_dtype(torch.float32)
    apply_method(model, "lora", targets="all-linear", r=16, alpha=32.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters, as finetune keeps them
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (1, seq))
    walls, cpus = [], []
    for _ in range(reps + 1):
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    del model, opt
    gc.collect()
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="measured steps after the first (medians)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; bf16 flags: {', '.join(flags()) or 'none'}")
    f32, b16 = gemm_ms(torch.float32, 10), gemm_ms(torch.bfloat16, 10)
    print(f"256 x 2048 @ 2048 x 8192: fp32 {f32:.1f} ms, bf16 {b16:.1f} ms ({f32 / b16:.1f}x)", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        wall, cpu = lora_step(dtype, args.seq_len, args.reps)
        print(f"llama-3.2-1b LoRA step, batch 1 x {args.seq_len}, {str(dtype)[6:]} base"
              f"{' (bf16 autocast)' if dtype == torch.bfloat16 else ''}: {wall:.1f} s wall, {cpu:.1f} s CPU",
              flush=True)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
