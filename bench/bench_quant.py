"""NF4 / int8 / LLM.int8() bases (minipeft/quant.py), measured on CPU: storage, error, logits, LoRA memory.

    python bench/bench_quant.py                        # every section but bitsandbytes (the 1B steps: minutes)
    python bench/bench_quant.py --sections bytes,error,outliers,logits

  bytes    bytes of the llama-3.2-1b preset's linear weights (7 per block x 16 blocks; lm_head is the tied
           embedding and stays bf16) in bf16 vs NF4 codes + constants, in bits per parameter (one block
           quantised for real, times 16: the blocks have equal shapes)
  error    relative RMS reconstruction error on N(0, 0.02) weights: NF4 vs plain symmetric 4-bit absmax
           (int4, same block 64), with and without double quantisation; int8 row-wise
  outliers x W^T's relative error vs fp64 on N(0, 1) activations whose 4 of 512 features are scaled by 1-60,
           W N(0, 0.02): LLM.int8() vs int8 weight AND activation without the decomposition vs weight-only
           int8 / NF4 (LLM.int8() arXiv:2208.07339 sec. 3.3: the outlier features break row-wise int8)
  logits   the toy preset (random weights) in bf16 vs the same weights as NF4 / int8 / llm_int8
  memory   time and peak resident memory (VmHWM) of a LoRA (r=16, all linear) training step on the
           llama-3.2-1b shape, batch 1, --seq-len tokens, base bf16 / int8 / llm_int8 / nf4, LoRA fp32, under
           CPU bf16 autocast (as the GPU job), each kind in a fresh process (Linux: /proc VmRSS, VmHWM, glibc's
           malloc_trim after the build); a first step, then the one measured
  bitsandbytes  LLMInt8Linear vs bitsandbytes' CPU Linear8bitLt (has_fp16_weights=False, threshold 6.0) on
           the same weights and inputs; needs bitsandbytes installed (not in .venv: a separate environment)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.llama import Llama, LlamaConfig  # noqa: E402
from minipeft.quant import (Int8Linear, LLMInt8Linear, NF4Linear, dequantize_nf4, quantize_model,  # noqa: E402
                            quantize_nf4)


def section_bytes() -> dict:
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    torch.manual_seed(0)
    from minipeft.llama import Block
    block = Block(cfg).to(torch.bfloat16)
    linears = [m for m in block.modules() if type(m) is nn.Linear]
    n = sum(m.weight.numel() for m in linears)
    bf16 = sum(m.weight.numel() * 2 for m in linears)
    nf4 = sum(NF4Linear(m).nbytes() for m in linears)
    nf4_no_dq = sum(NF4Linear(m, double_quant=False).nbytes() for m in linears)
    int8 = sum(Int8Linear(m).nbytes() for m in linears)
    L = cfg.n_layers
    r = dict(params=n * L, bf16_bytes=bf16 * L, nf4_bytes=nf4 * L, nf4_no_double_quant_bytes=nf4_no_dq * L,
             int8_bytes=int8 * L, nf4_bits_per_param=8 * nf4 / n, nf4_no_dq_bits_per_param=8 * nf4_no_dq / n,
             int8_bits_per_param=8 * int8 / n)
    print(f"llama-3.2-1b linear weights ({r['params']:,} params, 7 x {L} blocks):")
    print(f"  bf16 {r['bf16_bytes'] / 2**30:.3f} GiB | NF4 + double-quantised constants {r['nf4_bytes'] / 2**30:.3f} GiB "
          f"({r['nf4_bits_per_param']:.4f} bits/param: constants {r['nf4_bits_per_param'] - 4:.4f}) | "
          f"NF4, fp32 constants {r['nf4_no_double_quant_bytes'] / 2**30:.3f} GiB ({r['nf4_no_dq_bits_per_param']:.4f}) | "
          f"int8 row-wise {r['int8_bytes'] / 2**30:.3f} GiB ({r['int8_bits_per_param']:.4f})", flush=True)
    return r


def section_error() -> dict:
    torch.manual_seed(0)
    w = torch.randn(2048, 2048) * 0.02
    rel = lambda q: ((q - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()  # noqa: E731
    b = w.view(-1, 64)
    s = b.abs().amax(1, keepdim=True) / 7
    int4 = (torch.round(b / s).clamp(-7, 7) * s).view_as(w)
    lin = nn.Linear(2048, 2048, bias=False)
    lin.weight.data = w
    r = dict(nf4=rel(dequantize_nf4(quantize_nf4(w), w.shape)),
             nf4_no_double_quant=rel(dequantize_nf4(quantize_nf4(w, double_quant=False), w.shape)),
             int4_absmax=rel(int4), int8_rowwise=rel(Int8Linear(lin).weight))
    print("relative RMS error on N(0, 0.02) weights (2048 x 2048): " +
          ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
    return r


def section_logits() -> dict:
    torch.manual_seed(0)
    base = Llama(LlamaConfig.from_name("toy")).to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (4, 128))
    r = {}
    with torch.no_grad():
        ref = base(idx).float()
        for kind in ("nf4", "int8", "llm_int8"):
            q = Llama(base.config).to(torch.bfloat16).eval()
            q.load_state_dict(base.state_dict())
            quantize_model(q, kind)
            out = q(idx).float()
            r[kind] = dict(rel_error=((out - ref).norm() / ref.norm()).item(),
                           top1_agreement=(out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    print("toy preset (random weights), logits vs bf16: " +
          ", ".join(f"{k} rel. error {v['rel_error']:.4f}, top-1 agreement {v['top1_agreement']:.3f}"
                    for k, v in r.items()), flush=True)
    return r


def section_outliers() -> dict:
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    lin = nn.Linear(512, 256, bias=False)
    lin.weight.data = w
    layers = dict(llm_int8=LLMInt8Linear(lin), int8_weight_only=Int8Linear(lin), nf4_weight_only=NF4Linear(lin))
    no_split = LLMInt8Linear(lin, threshold=float("inf"))  # every feature int8: weight AND activation
    r = {}
    for scale in (1, 5, 20, 60):
        x = torch.randn(64, 512)
        x[:, [7, 100, 300, 451]] *= scale
        ref = x.double() @ w.double().T
        rel = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        r[scale] = dict(vectorwise_int8_no_split=rel(no_split(x)), **{k: rel(q(x)) for k, q in layers.items()})
        print(f"x W^T, 4 of 512 features x{scale}: relative error " +
              ", ".join(f"{k} {v:.4f}" for k, v in r[scale].items()), flush=True)
    return r


def memory_child(kind: str, seq: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)  # the base is made in bf16: never an fp32 copy of the model
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("llama-3.2-1b"))
    torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu")
    for p in model.parameters():  # random weights
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if kind != "bf16":
        quantize_model(model, kind)
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed build memory back: RSS then counts what is kept
    load_s = time.time() - t0
    rss_model = vm_kib("VmRSS")
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    apply_method(model, "lora", targets="all-linear", r=16, alpha=32.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters on a bf16 base, as the GPU job
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, 128256, (1, seq + 1))
    steps = []
    for _ in range(2):  # the first allocates AdamW's state; the second is measured
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.time() - t0)
    return dict(kind=kind, seq=seq, model_tensors_gib=sum(tensors.values()) / 2**30, model_rss_gib=rss_model / 2**20,
                step_peak_rss_gib=vm_kib("VmHWM") / 2**20,
                step_s=steps[1], first_step_s=steps[0], build_s=load_s, loss=loss.item(),
                load_avg=Path("/proc/loadavg").read_text().split()[:3])


def vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def section_memory(seq: int) -> dict:
    r = {}
    for kind in ("bf16", "int8", "llm_int8", "nf4"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--seq-len", str(seq)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        x = r[kind]
        print(f"LoRA step, llama-3.2-1b shape, batch 1 x {seq} tokens, {kind} base: model "
              f"{x['model_tensors_gib']:.2f} GiB of tensors, {x['model_rss_gib']:.2f} GiB resident, step peak "
              f"{x['step_peak_rss_gib']:.2f} GiB, step {x['step_s']:.1f}s (first {x['first_step_s']:.1f}s), "
              f"loss {x['loss']:.3f}, load average {' '.join(x['load_avg'])}", flush=True)
    return r


def section_bitsandbytes() -> dict:
    """Same codes and scales; outputs compared on inputs exact in fp16 (bitsandbytes quantises X in fp16)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes: not installed here (pip install bitsandbytes in a separate environment)")
        return {}
    torch.manual_seed(0)
    w = (torch.randn(256, 512) * 0.02).half()
    theirs = bnb.nn.Linear8bitLt(512, 256, bias=False, has_fp16_weights=False, threshold=6.0)
    theirs.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = theirs.to("cpu")  # quantises the weight: CB int8 (out, in), SCB fp32 (out,)
    lin = nn.Linear(512, 256, bias=False)
    lin.weight.data = w.float()
    ours = LLMInt8Linear(lin)
    r = dict(bitsandbytes=bnb.__version__, same_codes=torch.equal(theirs.weight.data, ours.codes),
             same_scales=torch.equal(theirs.weight.SCB, ours.row_scale))
    x = torch.randn(64, 512)
    cols = [7, 100, 300, 451]
    inputs = {"no outliers": x.clamp(-5.9, 5.9)}
    big = x.clone()
    big[:, cols] = 8 + 20 * torch.rand(64, 4)                 # outlier columns >= 6 in every row
    inputs["outlier columns >= 6 in every row"] = big
    mixed = big.clone()
    mixed[::4, cols] = 5.0                                   # ... below 6 (but above the rest) in a quarter
    inputs["outlier columns at 5.0 in 1/4 of the rows"] = mixed
    # bitsandbytes' CPU path in train() mode is MatMul8bitFp, dequantise + fp matmul (= our weight-only
    # int8); in eval() mode MatMul8bitLt, LLM.int8() (autograd/_functions.py, matmul)
    for mode, mine in (("eval", ours), ("train", Int8Linear(lin))):
        theirs.train(mode == "train")
        for name, xi in inputs.items():
            xi = xi.half().float().requires_grad_()                # exact in fp16
            y_ours, y_theirs = mine(xi), theirs(xi)
            (g_ours,) = torch.autograd.grad(y_ours.sum(), xi)
            (g_theirs,) = torch.autograd.grad(y_theirs.sum(), xi)
            diff, top = (y_ours - y_theirs).abs(), y_ours.abs().max()
            rows = (diff.amax(1) > 1e-4 * top).sum().item()
            r[f"{mode}: {name}"] = x = dict(
                ours=type(mine).__name__, max_rel_diff=(diff.max() / top).item(), rows_differing=rows,
                median_ratio=(y_theirs / y_ours).median().item(),
                grad_max_abs_diff=(g_ours - g_theirs).abs().max().item())
            print(f"bitsandbytes {bnb.__version__} Linear8bitLt in {mode}() vs {x['ours']}, {name}: largest difference "
                  f"{x['max_rel_diff']:.2e} of max |y|, {rows} of 64 rows differ by > 1e-4 of it, median y ratio "
                  f"{x['median_ratio']:.7f}; input gradients differ by <= {x['grad_max_abs_diff']:.1e}", flush=True)
    print(f"  same int8 codes: {r['same_codes']}, same row scales: {r['same_scales']}", flush=True)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="bytes,error,outliers,logits,memory")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.seq_len)))
        return {}
    torch.set_num_threads(2)
    funcs = dict(bytes=section_bytes, error=section_error, outliers=section_outliers, logits=section_logits,
                 memory=lambda: section_memory(args.seq_len), bitsandbytes=section_bitsandbytes)
    results = {s: funcs[s]() for s in args.sections.split(",")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
