"""Where one decoding step's time goes, minipeft against transformers + PEFT (CPU, batch 1 by default).

    .venv/bin/python bench/bench_decode.py              # needs the bench extra (transformers, peft)
    .venv/bin/python bench/bench_decode.py --batch 8

Both models come from bench.build_models (the same file, the same LoRA r=16 on all seven linears). Per new
token, in process CPU time (as bench.py's tokens per CPU second): the difference between generating 65 and
1 new tokens, over 64. Beside them, the arithmetic both must do: every base weight's product with a
(batch, in) input in the model's order, head included, and the LoRA branches' two products (on these
small factors mostly the cost of the calls); what is left is everything else (norms, RoPE, attention,
sampling, casts, views, Python and the dispatcher). Then the aten operations of one minipeft decoding
step as they reach the kernels (a TorchDispatchMode below autograd: casts to the same dtype, which
return at once, are not among them), and what a few small operations cost on a 512-vector. Medians
over --runs, one thread.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from minipeft.llama import _RMSNorm  # noqa: E402


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def per_call_us(fn, n: int = 20000) -> float:
    for _ in range(200):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = bench.make_config("cpu-small")
    mini, ref = bench.build_models(cfg, torch.float32, "cpu")
    mini.eval(), ref.eval()
    wrappers = [m for m in mini.modules() if hasattr(m, "lora_A")]
    B = args.batch
    prompts = torch.randint(0, cfg.vocab_size, (B, 32), generator=torch.Generator().manual_seed(3)).tolist()

    def per_token(generate) -> float:
        t = time.process_time()
        generate(1)
        one = time.process_time() - t
        t = time.process_time()
        generate(65)
        return (time.process_time() - t - one) / 64

    def products(weights) -> float:
        pairs = [(torch.ones(B, w.shape[1]), w.t()) for w in weights]  # inputs made before the clock
        t = time.process_time()
        for _ in range(20):
            for x, w_t in pairs:
                torch.mm(x, w_t)
        return (time.process_time() - t) / 20

    lora = lambda: products([t for m in wrappers for t in (m.lora_A, m.lora_B)])  # noqa: E731
    times = collections.defaultdict(list)
    with torch.no_grad():
        for _ in range(args.runs):
            times["minipeft"].append(per_token(lambda n: mini.generate(prompts, max_new_tokens=n)))
            times["transformers + PEFT"].append(per_token(lambda n: bench.hf_generate(ref, prompts, n)))
            times["base weights' products"].append(products([m.base.weight for m in wrappers] + [mini.lm_head.weight]))
            times["LoRA products"].append(lora())
        count = CountOps()
        mini.generate(prompts, max_new_tokens=1)
        with count:
            mini.generate(prompts, max_new_tokens=2)  # prefill + one decoding step
        with CountOps() as prefill:
            mini.generate(prompts, max_new_tokens=1)
    print(f"cpu-small (dim 512, 4 layers, vocabulary 32000), fp32, LoRA r=16 on 7 linears, batch {B}, prompt 32, "
          f"one thread, torch {torch.__version__}; ms per new token, median (min-max) of {args.runs} runs")
    for name, ts in times.items():
        print(f"  {name:<24}{statistics.median(ts) * 1e3:7.2f}  ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})")
    step = count.ops - prefill.ops
    print(f"aten operations in one minipeft decoding step: {sum(step.values())} "
          f"({sum(step.values()) / cfg.n_layers:.0f} per layer with the head's share); most common: "
          + ", ".join(f"{k} {v}" for k, v in step.most_common(8)))
    x, w, a = torch.randn(1, 1, 512), torch.ones(512), torch.randn(16, 512)
    no_ctx = types.SimpleNamespace(save_for_backward=lambda *tensors: None)
    with torch.no_grad():
        costs = {"x * 2.0": lambda: x * 2.0, "A.to(same dtype)": lambda: a.to(x.dtype),
                 "RMSNorm autograd.Function": lambda: _RMSNorm.apply(x, w, 1e-5),
                 "RMSNorm's formula called directly": lambda: _RMSNorm.forward(no_ctx, x, w, 1e-5)}
        print("microseconds per call on a (1, 1, 512) input: " +
              ", ".join(f"{k} {per_call_us(f):.1f}" for k, f in costs.items()))


if __name__ == "__main__":
    main()
