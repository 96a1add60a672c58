"""NF4 / int8 bases (minipeft/quant.py), measured on CPU: storage, reconstruction error, logits, LoRA memory.

    python bench/bench_quant.py                        # every section (the 1B LoRA step: ~1-2 minutes)
    python bench/bench_quant.py --sections bytes,error,logits

  bytes    bytes of the llama-3.2-1b preset's linear weights (7 per block x 16 blocks; lm_head is the tied
           embedding and stays bf16) in bf16 vs NF4 codes + constants, in bits per parameter (one block
           quantised for real, times 16: the blocks have equal shapes)
  error    relative RMS reconstruction error on N(0, 0.02) weights: NF4 vs plain symmetric 4-bit absmax
           (int4, same block 64), with and without double quantisation; int8 row-wise
  logits   the toy preset (random weights) in bf16 vs the same weights as NF4 / int8: relative logit error
  memory   peak resident memory of one LoRA (r=16, all linear) training step on the llama-3.2-1b shape,
           batch 1, --seq-len tokens, fp32 base vs NF4 base (dequantised to fp32), each in a fresh process
           (VmHWM). fp32, not bf16: this CPU has no bf16 matrix units and a bf16 step ran > 5 minutes.
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
from minipeft.quant import Int8Linear, NF4Linear, dequantize_nf4, quantize_model, quantize_nf4  # noqa: E402


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
        for kind in ("nf4", "int8"):
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


def memory_child(kind: str, seq: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    t0 = time.time()
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("llama-3.2-1b"))
    model = model.to_empty(device="cpu")  # fp32: this CPU has no bf16 matmul units (bf16 steps crawl)
    for p in model.parameters():  # random weights, made block by block: never an fp32 copy of the model
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if kind == "nf4":
        quantize_model(model, "nf4")
    import gc
    gc.collect()
    load_s = time.time() - t0
    rss_model = vm_kib("VmRSS")
    apply_method(model, "lora", targets="all-linear", r=16, alpha=32.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    idx = torch.randint(0, 128256, (1, seq + 1))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.time()
    _, loss = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    loss.backward()
    opt.step()
    return dict(kind=kind, seq=seq, model_rss_gib=rss_model / 2**20, step_peak_rss_gib=vm_kib("VmHWM") / 2**20,
                step_s=time.time() - t0, build_s=load_s, loss=loss.item())


def vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def section_memory(seq: int) -> dict:
    r = {}
    for kind in ("fp32", "nf4"):
        out = subprocess.run([sys.executable, __file__, "--memory-child", kind, "--seq-len", str(seq)],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        x = r[kind]
        print(f"LoRA step, llama-3.2-1b shape, batch 1 x {seq} tokens, {kind} base: model {x['model_rss_gib']:.2f} GiB "
              f"resident, step peak {x['step_peak_rss_gib']:.2f} GiB, step {x['step_s']:.1f}s, loss {x['loss']:.3f}",
              flush=True)
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="bytes,error,logits,memory")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--json", type=Path)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.seq_len)))
        return {}
    torch.set_num_threads(2)
    funcs = dict(bytes=section_bytes, error=section_error, logits=section_logits,
                 memory=lambda: section_memory(args.seq_len))
    results = {s: funcs[s]() for s in args.sections.split(",")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
