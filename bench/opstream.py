"""The op stream of one LoRA training step, recorded on CPU: the proxy for GPU speed until a GPU is lent.

    .venv/bin/python bench/opstream.py                         # llama-3.2-1b's shape, 1 x 512 tokens, minipeft
    .venv/bin/python bench/opstream.py --impl both --gpu h100  # and transformers + PEFT, where importable

Every aten op of one step (forward, loss, backward; AdamW left out: it touches only the adapter) is
recorded below autograd with a TorchDispatchMode, on CPU, under `torch.autocast("cpu", dtype=bfloat16)`
on a bf16 base with fp32 LoRA factors, as finetune runs on CUDA (`base.autocast`), the loss in CUDA's
chunks (loss.CHUNK_ELEMENTS). CPU autocast SIMULATES
CUDA's: both run matmuls, linear and SDPA in bf16; CUDA's also runs a list of reductions (pow, rsqrt,
softmax, sum, ...) in fp32, which changes nothing here, where those ops already get fp32 inputs. The
kernels are not CUDA's: SDPA is the CPU flash kernel, and a GPU fuses nothing that is not fused here.

Per op: a GEMM (mm, addmm, bmm, baddbmm) counts 2 m n k FLOPs and the bytes of its operands and result;
attention (SDPA) counts 4 B H T S hd FLOPs forward and twice that backward (the full T x S, as bench.py's
MFU convention); every other op counts the bytes it reads and writes (each tensor's extent in memory: a
broadcast operand once), views none. One decoder layer is the difference of a 2-layer and a 1-layer
model's streams (its first layer computes no input gradient: the embedding is frozen).
Also per layer: the bytes of the activations autograd keeps for backward (saved tensors that are not
weights, each storage once).

The roofline (`--gpu`): each GEMM takes max(FLOPs / peak, bytes / bandwidth), attention FLOPs / peak,
every other op bytes / bandwidth; no launch overhead, no overlap. tokens/s = tokens / (the 1-layer model
+ (n_layers - 1) x a layer) for the preset's depth; MFU = tokens/s x FLOPs/token / peak, the FLOPs as
bench.py counts them (bench.flops_per_token: 4 N + 6 N_lora + 12 L d T).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LORA, LORA_TARGETS, flops_per_token, peft_lora_config, quiet_transformers  # noqa: E402
from minipeft import loss  # noqa: E402
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.llama import Llama, LlamaConfig  # noqa: E402

# dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s), from the vendors' data sheets (SXM parts)
GPUS = {"h100": (989.0, 3.35), "h200": (989.0, 4.8), "a100": (312.0, 2.04)}
aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}


def nbytes(t: torch.Tensor) -> int:
    """Bytes of t's extent in memory: a broadcast (stride 0) dimension counts once."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return min(extent, t.numel()) * t.element_size()


def tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def gemm_shape(func, args) -> tuple[int, int, int, int]:
    """(batch, m, k, n) of a GEMM (m, k) @ (k, n)."""
    a, b = (args[1], args[2]) if func.overloadpacket in (aten.addmm, aten.baddbmm) else args[:2]
    return (a.shape[0] if a.dim() == 3 else 1), a.shape[-2], a.shape[-1], b.shape[-1]


def attention_flops(name: str, args) -> int:
    q, k = args[0], args[1]
    if "backward" in name:  # the backward ops take the output's gradient first
        q, k = args[1], args[2]
    B, H, T, hd = q.shape
    return (8 if "backward" in name else 4) * B * H * T * k.shape[2] * hd


class OpRecorder(TorchDispatchMode):
    """Per op: (name, kind, FLOPs, bytes); kind is gemm, small gemm (a dimension <= `small`: LoRA's
    rank), attention, other or view."""

    small = LORA["r"]

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins, outs = tensors((args, kwargs)), tensors(out)
        name = func.overloadpacket.__name__
        in_storage = {t.untyped_storage().data_ptr() for t in ins}
        if not func._schema.is_mutable and outs and all(t.untyped_storage().data_ptr() in in_storage for t in outs):
            self.ops.append((name, "view", 0, 0))
            return out
        moved = sum(nbytes(t) for t in {(t.data_ptr(), t.shape, t.stride()): t for t in ins + outs}.values())
        if func.overloadpacket in GEMMS:
            batch, m, k, n = gemm_shape(func, args)
            kind = "small gemm" if min(m, k, n) <= self.small else "gemm"
            self.ops.append((name, kind, 2 * batch * m * k * n, moved))
        elif "scaled_dot_product" in name:
            self.ops.append((name, "attention", attention_flops(name, args), moved))
        else:
            self.ops.append((name, "other", 0, moved))
        return out


class SavedBytes:
    """Bytes of the activations autograd saves for backward (not the weights it also keeps), each storage
    counted once."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, tuple[int, torch.dtype]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.weights:
            self.storages[s.data_ptr()] = (s.nbytes(), t.dtype)
        return t

    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for size, dtype in self.storages.values():
            out[str(dtype).removeprefix("torch.")] += size
        return dict(out)


def build(impl: str, cfg: LlamaConfig, n_layers: int):
    """A bf16 model with `n_layers` blocks and fp32 LoRA factors (r=16, alpha=32, all seven linears)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**cfg.__dict__, "n_layers": n_layers})
    if impl == "minipeft":
        model = Llama(cfg).to(torch.bfloat16)
        apply_method(model, "lora", targets="all-linear", **LORA)
    else:
        from peft import get_peft_model
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
        quiet_transformers()
        model = LlamaForCausalLM(HFConfig(**cfg.to_hf(), attn_implementation="sdpa")).to(torch.bfloat16)
        model = get_peft_model(model, peft_lora_config())  # adapters fp32 (PEFT's autocast_adapter_dtype)
    for p in model.parameters():  # trainable tensors fp32, as finetune.prepare_model makes them
        if p.requires_grad:
            p.data = p.data.float()
    return model.train()


def record(impl: str, cfg: LlamaConfig, n_layers: int, batch: int, seq: int) -> dict:
    """The op stream and saved bytes of one forward + loss + backward."""
    model = build(impl, cfg, n_layers)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)
    rec, saved = OpRecorder(), SavedBytes(model)
    chunks = dict(loss.CHUNK_ELEMENTS)
    loss.CHUNK_ELEMENTS["cpu"] = loss.CHUNK_ELEMENTS["cuda"]  # the loss's chunks as on CUDA
    with torch.autocast("cpu", dtype=torch.bfloat16), rec, \
            torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        if impl == "minipeft":
            value = model(idx, targets, return_logits=False)[1]
        else:
            value = model(input_ids=idx, labels=idx, use_cache=False).loss
        value.backward()
    loss.CHUNK_ELEMENTS.update(chunks)
    return {"ops": rec.ops, "saved": saved.by_dtype()}


def summarise(ops: list) -> dict:
    """Counts, FLOPs and bytes by kind, and count/bytes by op name of the non-GEMM ops."""
    s = {"count": Counter(), "flops": Counter(), "bytes": Counter(), "by_op": defaultdict(lambda: [0, 0])}
    for name, kind, flops, moved in ops:
        s["count"][kind] += 1
        s["flops"][kind] += flops
        s["bytes"][kind] += moved
        if kind == "other":
            s["by_op"][name][0] += 1
            s["by_op"][name][1] += moved
    return s


def difference(two: dict, one: dict) -> dict:
    out = {k: two[k] - one[k] for k in ("count", "flops", "bytes")}
    out["by_op"] = {n: [two["by_op"][n][0] - one["by_op"].get(n, [0, 0])[0],
                        two["by_op"][n][1] - one["by_op"].get(n, [0, 0])[1]] for n in two["by_op"]}
    return out


def seconds(ops: list, peak: float, bw: float) -> float:
    t = 0.0
    for _, kind, flops, moved in ops:
        if kind.endswith("gemm"):
            t += max(flops / peak, moved / bw)
        elif kind == "attention":
            t += flops / peak
        else:
            t += moved / bw
    return t


def measure(impl: str, cfg: LlamaConfig, batch: int, seq: int, gpu: str) -> dict:
    recs = {n: record(impl, cfg, n, batch, seq) for n in (1, 2)}
    s1, s2 = summarise(recs[1]["ops"]), summarise(recs[2]["ops"])
    layer = difference(s2, s1)
    peak, bw = GPUS[gpu][0] * 1e12, GPUS[gpu][1] * 1e12
    t1, t2 = seconds(recs[1]["ops"], peak, bw), seconds(recs[2]["ops"], peak, bw)
    t_layer, tokens = t2 - t1, batch * seq
    tok_s = tokens / (t1 + (cfg.n_layers - 1) * t_layer)
    saved = {k: recs[2]["saved"].get(k, 0) - recs[1]["saved"].get(k, 0)
             for k in set(recs[2]["saved"]) | set(recs[1]["saved"])}
    return dict(impl=impl, tokens=tokens, n_layers=cfg.n_layers, layer=layer,
                layer_seconds=t_layer, one_layer_model_seconds=t1, tokens_per_s=tok_s,
                mfu=tok_s * flops_per_token(cfg, seq) / peak, saved_per_layer=saved)


def report(r: dict, gpu: str, top: int) -> None:
    lay, mib = r["layer"], 2**20
    c = lay["count"]
    print(f"\n{r['impl']}: per decoder layer, {r['tokens']} tokens")
    print(f"  ops {c['gemm'] + c['small gemm'] + c['attention'] + c['other']} (+{c['view']} views): {c['gemm']} large "
          f"GEMMs ({lay['flops']['gemm'] / 1e9:.1f} GFLOP), {c['small gemm']} small (LoRA, "
          f"{lay['flops']['small gemm'] / 1e9:.2f} GFLOP), {c['attention']} attention "
          f"({lay['flops']['attention'] / 1e9:.1f} GFLOP), {c['other']} other")
    print(f"  bytes moved by non-GEMM ops {lay['bytes']['other'] / mib:.0f} MiB; by GEMMs "
          f"{(lay['bytes']['gemm'] + lay['bytes']['small gemm']) / mib:.0f} MiB")
    saved = r["saved_per_layer"]
    print(f"  activations kept for backward {sum(saved.values()) / mib:.0f} MiB ("
          + ", ".join(f"{k} {v / mib:.0f}" for k, v in sorted(saved.items()) if v) + ")")
    rows = sorted(lay["by_op"].items(), key=lambda kv: -kv[1][1])[:top]
    print("  largest non-GEMM ops: " + ", ".join(f"{n} x{c} {b / mib:.0f} MiB" for n, (c, b) in rows if c or b))
    peak, bw = GPUS[gpu]
    print(f"  roofline on {gpu.upper()} ({peak:g} TFLOP/s, {bw:g} TB/s): a layer {r['layer_seconds'] * 1e3:.3f} ms, "
          f"the 1-layer model {r['one_layer_model_seconds'] * 1e3:.3f} ms (embedding, head, loss; its layer has no "
          f"input gradient) -> {r['n_layers']} layers: {r['tokens_per_s'] / 1e3:.1f}k tokens/s, MFU "
          f"{100 * r['mfu']:.0f}% (FLOPs 4N + 6 N_lora + 12 L d T per token, bench.flops_per_token)", flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-3.2-1b", help="a minipeft preset (the shape; weights are random)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary (smaller: faster head)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--impl", default="minipeft", choices=["minipeft", "hf+peft", "both"])
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--top", type=int, default=8, help="largest non-GEMM ops to list")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LlamaConfig.from_name(args.config)
    if args.vocab:
        cfg.vocab_size = args.vocab
    impls = ["minipeft", "hf+peft"] if args.impl == "both" else [args.impl]
    if "hf+peft" in impls:
        try:
            import peft, transformers  # noqa: E401, F401
        except ImportError:
            print("transformers + peft are not importable: minipeft only")
            impls = ["minipeft"]
    print(f"op stream of one LoRA step (r={LORA['r']}, {', '.join(LORA_TARGETS)}), {args.config} shape "
          f"(vocab {cfg.vocab_size}), batch {args.batch} x {args.seq_len}, bf16 base, fp32 adapters, CPU autocast "
          f"bf16 simulating CUDA's; torch {torch.__version__}")
    results = []
    for impl in impls:
        results.append(measure(impl, cfg, args.batch, args.seq_len, args.gpu))
        report(results[-1], args.gpu, args.top)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
