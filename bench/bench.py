"""Benchmark minipeft against the reference: Hugging Face transformers (LlamaForCausalLM) + PEFT (LoRA).

    python bench/bench.py --threads 1                       # CPU, the small config (~6 minutes, 2-core sandbox)
    python bench/bench.py --config llama-3.2-1b --batch 1 --seq-len 128 --sections parity,train,memory
    python bench/bench.py --device cuda                     # llama-3.2-1b, bf16, max-len 512 and 2048, MFU

Needs the optional extras: `pip install -e ".[bench]"` (transformers, peft). Results: README.md, Performance.

Parity comes first, so that the timings compare the same work: minipeft's random-weight model is written
with `save_pretrained` and both implementations read that file with their own `from_pretrained` (ours must
give back the model's tensors exactly, and theirs the same function: our writer against their reader);
LoRA r=16, alpha=32 goes on all seven linear layers of every block in
both, with the SAME A and B (B made non-zero so the branch matters); then RoPE frequencies, logits, loss,
LoRA gradients and greedy generations (left-padded batch, KV cache) must agree. A mismatch stops the run.

Then, in ONE process, the two implementations take turns, the order reversed every other round (warm-up
first, then repetitions; medians):
  train     one step = forward + cross-entropy + backward + AdamW on the LoRA parameters
  memory    peak memory of the same step, one fresh subprocess per implementation (see `memory_child`)
  generate  tokens/s with the KV cache, greedy, batch 1 and 8, exactly --new-tokens new tokens per row
  scaling   step time vs sequence length (batch 1), generation time vs output length (batch 1)

Model FLOPs per trained token (frozen base, so no weight gradients; PaLM's convention, arXiv:2204.02311
appendix B, which counts attention over the full context T, not the causal half):
    4 N         forward 2N + gradients w.r.t. activations 2N, N = weights in matrix products
                (the 7 projections per block and lm_head; the embedding lookup is no product)
  + 6 N_lora    forward, activation and weight gradients of the LoRA factors
  + 12 L d T    QK^T and AV: 4 L d T forward, twice that backward (d = n_heads * head_dim)
MFU = tokens/s * FLOPs/token / --peak-tflops (default on CUDA 989 = H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from minipeft.adapters import apply_method  # noqa: E402
from minipeft.llama import Llama, LlamaConfig, rope_frequencies  # noqa: E402
from minipeft.methods.lora import LoRALinear  # noqa: E402

LORA = dict(r=16, alpha=32.0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("minipeft", "hf+peft")
# minipeft's training loss: chunked, without the (B, T, vocab) logits (llama.linear_cross_entropy)
LOSS_KWARGS = {"return_logits": False}

# The CPU config: Llama 3.2-1B's shape (GQA 4:1, head_dim 64, ffn 4x dim, llama3 RoPE, tied head) scaled
# down so the run fits in minutes on 2 cores. The vocabulary is Llama 2's size, not Llama 3's 128256, which
# would make lm_head 80% of the work here (21% in the 1B model); --vocab 128256 restores it.
CPU_SMALL = dict(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=2048)


def make_config(name: str, vocab: int | None = None) -> LlamaConfig:
    cfg = LlamaConfig(**CPU_SMALL) if name == "cpu-small" else LlamaConfig.from_name(name)
    if vocab:
        cfg.vocab_size = vocab
    return cfg


def quiet_transformers() -> None:
    """Their load-progress bars and config notes (bos/eos ids outside a small vocabulary) are noise here."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# The two models, with the same weights


def peft_lora_config():
    from peft import LoraConfig
    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")


def lora_pairs(mini, ref) -> list[tuple[str, LoRALinear, torch.nn.Module]]:
    """(name, minipeft LoRALinear, peft LoraLayer) for every adapted module, matched by name."""
    pairs = [(name, m, ref.get_submodule(f"base_model.model.model.{name}"))
             for name, m in mini.named_modules() if isinstance(m, LoRALinear)]
    assert len(pairs) == 7 * mini.config.n_layers, f"expected LoRA on 7 x {mini.config.n_layers} linears, got {len(pairs)}"
    return pairs


def build_models(cfg: LlamaConfig, dtype: torch.dtype, device: str, seed: int = 0):
    """minipeft Llama and transformers+peft LlamaForCausalLM with the same base weights and the same LoRA."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        built = Llama(cfg).to(dtype)
        built.save_pretrained(tmp)  # our writer -> both readers
        # Both load the file the same way (memory-mapped views, as each library loads a checkpoint), so
        # both read weights from the same kind of pages: a model built in anonymous memory read its
        # 32000 x 512 head 11% slower here than one mapped from a file, where the kernel uses 2 MiB pages.
        mini = Llama.from_pretrained(tmp, dtype=dtype)
        ref = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    assert all(torch.equal(t, mini.state_dict()[k]) for k, t in built.state_dict().items()), "save/load changed a tensor"
    del built
    mini, ref = mini.to(device), ref.to(device)
    apply_method(mini, "lora", targets="all-linear", **LORA)
    ref = get_peft_model(ref, peft_lora_config())  # adapter weights fp32, as ours (autocast_adapter_dtype)
    with torch.no_grad():
        for _, m, p in lora_pairs(mini, ref):
            m.lora_B.normal_(std=0.02)  # B = 0 at init would hide any error in the branch
            assert p.scaling["default"] == m.scale, f"LoRA scale: peft {p.scaling['default']} vs minipeft {m.scale}"
            p.lora_A["default"].weight.copy_(m.lora_A)
            p.lora_B["default"].weight.copy_(m.lora_B)
    return mini, ref


# ----------------------------------------------------------------------------------------------
# Parity


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|)."""
    d = (a.float() - b.float()).abs().max().item()
    return d, d / max(b.float().abs().max().item(), 1e-30)


def hf_generate(ref, prompts: list[list[int]], new_tokens: int, pad_id: int = 0) -> torch.Tensor:
    """Greedy, KV cache, left-padded, exactly `new_tokens` per row: (B, new_tokens)."""
    from transformers import GenerationConfig

    T0, dev = max(map(len, prompts)), ref.device
    ids = torch.full((len(prompts), T0), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T0 - len(p):], mask[b, T0 - len(p):] = torch.tensor(p, device=dev), 1
    # No stop token, so every row runs to max_new_tokens (= min_new_tokens), as minipeft without stop_ids
    # does. With an eos id, min_new_tokens would also mask that token's logit, which minipeft does not.
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=pad_id, eos_token_id=None, bos_token_id=None)
    return ref.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, T0:]


def check_parity(mini, ref, cfg: LlamaConfig, dtype: torch.dtype, device: str) -> dict:
    """Compare RoPE, logits, loss, LoRA gradients and greedy generations; res["ok"] says if all agree."""
    fp32 = dtype == torch.float32
    tol = 1e-4 if fp32 else 3e-2
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 64), generator=g).to(device)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)
    res = {"tolerance_rel": tol}
    # their llama3 inverse frequencies (built from the config.json we wrote) vs ours
    res["rope_inv_freq"] = rel_diff(ref.base_model.model.model.rotary_emb.inv_freq.cpu(), rope_frequencies(cfg))
    mini.train(), ref.train()
    with torch.no_grad():
        logits_m = mini(idx)
    loss_m = mini(idx, targets, **LOSS_KWARGS)[1]  # the loss path that the timings use
    out = ref(input_ids=idx, labels=idx, use_cache=False)  # transformers shifts the labels itself
    loss_m.backward(), out.loss.backward()
    res["logits"] = rel_diff(logits_m, out.logits)
    res["loss"] = (loss_m.item(), out.loss.item())
    res["grad_lora_A_worst"] = max((rel_diff(m.lora_A.grad, p.lora_A["default"].weight.grad) + (name,)
                                    for name, m, p in lora_pairs(mini, ref)), key=lambda t: t[1])
    for model in (mini, ref):
        model.zero_grad(set_to_none=True)
    mini.eval(), ref.eval()
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9, 12)]
    with torch.no_grad():
        toks_m = torch.tensor(mini.generate(prompts, max_new_tokens=32))
        toks_r = hf_generate(ref, prompts, 32).cpu()
    res["greedy_tokens_equal"] = torch.equal(toks_m, toks_r)
    res["greedy_tokens_agree"] = (toks_m == toks_r).float().mean().item()
    if not res["greedy_tokens_equal"]:
        res["greedy_first_difference"] = (toks_m != toks_r).nonzero()[0].tolist()
    # bf16: rounding differs (their RoPE rotates in bf16, ours in fp32), so a near-tie may flip one greedy
    # token and everything after it: there the tokens are reported, not required
    res["ok"] = bool(res["logits"][1] <= tol and res["rope_inv_freq"][1] <= 1e-6
                     and res["grad_lora_A_worst"][1] <= 10 * tol
                     and abs(res["loss"][0] - res["loss"][1]) <= tol * abs(res["loss"][1])
                     and (res["greedy_tokens_equal"] or not fp32))
    return res


# ----------------------------------------------------------------------------------------------
# Timing


def batch_for(cfg: LlamaConfig, batch: int, seq: int, device: str, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    return idx, torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)


def train_step_fn(model, impl: str, idx: torch.Tensor, targets: torch.Tensor):
    """One optimiser step: forward + cross-entropy + backward + AdamW on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        if impl == "minipeft":  # loss only; transformers returns its logits too, we never build them
            loss = model(idx, targets, **LOSS_KWARGS)[1]
        else:  # labels=idx: transformers shifts inside, the same targets as ours; no KV cache in training
            loss = model(input_ids=idx, labels=idx, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def turns(items: list, round_: int) -> list:
    """The order of one round: reversed every other round, so that neither implementation always runs
    first (after the other's allocations, with the caches as the other left them)."""
    return items if round_ % 2 == 0 else items[::-1]


def alternate(fns: dict, warmup: int, reps: int, device: str) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `reps` rounds taking turns (the order alternating: `turns`). Wall
    seconds per call by name, and under "<name> cpu" the process CPU seconds (all threads): cpu well
    below wall means the CPU was busy."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for name in fns for key in (name, f"{name} cpu")}
    for r in range(reps):
        for name, fn in turns(list(fns.items()), r):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            times[f"{name} cpu"].append(time.process_time() - c0)
    return times


def time_training(models: dict, cfg, batch: int, seq: int, args, warmup: int, reps: int) -> dict:
    idx, targets = batch_for(cfg, batch, seq, args.device)
    for m in models.values():
        m.train()
    fns = {name: train_step_fn(m, name, idx, targets) for name, m in models.items()}
    return alternate(fns, warmup, reps, args.device)


def time_generation(models: dict, cfg, batch: int, new_tokens: int, args, warmup: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
    for m in models.values():
        m.eval()

    @torch.no_grad()
    def run_mini():
        out = models["minipeft"].generate(prompts, max_new_tokens=new_tokens)
        assert all(len(o) == new_tokens for o in out)

    @torch.no_grad()
    def run_ref():
        assert hf_generate(models["hf+peft"], prompts, new_tokens).shape == (batch, new_tokens)

    return alternate({"minipeft": run_mini, "hf+peft": run_ref}, warmup, reps, args.device)


def flops_per_token(cfg: LlamaConfig, seq: int) -> float:
    """Frozen-base LoRA training FLOPs per token (see the module docstring)."""
    attn, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # (in, out) of q, k, v, o, gate, up, down
    linears = [(cfg.dim, attn), (cfg.dim, kv), (cfg.dim, kv), (attn, cfg.dim),
               (cfg.dim, cfg.ffn_dim), (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)]
    n_matmul = cfg.n_layers * sum(i * o for i, o in linears) + cfg.dim * cfg.vocab_size  # + lm_head
    n_lora = cfg.n_layers * LORA["r"] * sum(i + o for i, o in linears)
    return 4 * n_matmul + 6 * n_lora + 12 * cfg.n_layers * attn * seq


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


# ----------------------------------------------------------------------------------------------
# Peak memory, one fresh process per implementation


def memory_child(args) -> None:
    """Build one implementation, then print its peak memory over a few training steps as JSON.

    CPU: torch's CPU tensors come from malloc, which tracemalloc does not see, so we read the kernel's
    resident-set high-water mark (VmHWM in /proc/self/status). Once the model, LoRA, batch and optimiser
    exist we reset it (`5 > /proc/self/clear_refs`, Linux >= 4.0), run the steps, and report
    peak - baseline: activations, gradients, AdamW state and temporaries as the machine must provide them
    (memory malloc keeps after a free is counted once, not again). CUDA: torch.cuda.max_memory_allocated.
    """
    cfg = make_config(args.config, args.vocab)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.memory_child == "minipeft":
        with torch.device(args.device):  # initialise where it runs (fast for 1B on a GPU)
            model = Llama(cfg).to(dtype)
        apply_method(model, "lora", targets="all-linear", **LORA)
    else:
        from peft import get_peft_model
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
        quiet_transformers()
        with torch.device(args.device):
            model = LlamaForCausalLM(HFConfig(**cfg.to_hf())).to(dtype)
        model = get_peft_model(model, peft_lora_config())
    model.train()
    idx, targets = batch_for(cfg, args.batch, args.seq_len, args.device)
    step = train_step_fn(model, args.memory_child, idx, targets)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = vm_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    for _ in range(3):
        step()
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else vm_kib("VmHWM") * 1024
    print(json.dumps({"baseline_bytes": base, "peak_bytes": peak, "step_bytes": peak - base}))


def vm_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_memory(impl: str, batch: int, seq: int, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", impl, "--config", args.config, "--dtype", args.dtype,
           "--device", args.device, "--batch", str(batch), "--seq-len", str(seq)]
    cmd += ["--vocab", str(args.vocab)] if args.vocab else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory child for {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Report


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def row(label: str, mini: float, ref: float, unit: str, fmt: str = "{:.1f}") -> str:
    return f"  {label:<36} {fmt.format(mini):>10} {fmt.format(ref):>10}  {unit:<8} ratio {mini / ref:.3f}"


def header(cfg: LlamaConfig, args) -> str:
    import peft
    import transformers
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    loss = "forward(idx, targets, return_logits=False), chunked cross-entropy"
    return (f"minipeft benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"  device {args.device}: {dev}; torch threads {torch.get_num_threads()}\n"
            f"  torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}\n"
            f"  config {args.config}: vocab {cfg.vocab_size}, dim {cfg.dim}, layers {cfg.n_layers}, heads "
            f"{cfg.n_heads} ({cfg.n_kv_heads} kv), ffn {cfg.ffn_dim}, rope scaling {cfg.rope_scaling is not None}, "
            f"tied head {cfg.tie_embeddings}; dtype {args.dtype}\n"
            f"  LoRA r={LORA['r']} alpha={LORA['alpha']:g} dropout 0 on {', '.join(LORA_TARGETS)}; AdamW lr 1e-4\n"
            f"  minipeft loss: {loss}; transformers: attn_implementation='sdpa', use_cache=False in training\n"
            f"  warm-up {args.warmup}, repetitions {args.reps} (scaling: 1, {args.scale_reps}); medians, "
            f"the implementations take turns, the order alternating by round\n"
            f"  load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def report_parity(par: dict, dtype_name: str) -> None:
    worst = par["grad_lora_A_worst"]
    print(f"\nparity ({dtype_name}, relative tolerance {par['tolerance_rel']:g}): {'OK' if par['ok'] else 'MISMATCH'}\n"
          f"  rope inv_freq   max abs {par['rope_inv_freq'][0]:.2e}  rel {par['rope_inv_freq'][1]:.2e}\n"
          f"  logits          max abs {par['logits'][0]:.2e}  rel {par['logits'][1]:.2e}\n"
          f"  loss            minipeft {par['loss'][0]:.6f}  hf+peft {par['loss'][1]:.6f}\n"
          f"  LoRA A grads    worst {worst[2]}: max abs {worst[0]:.2e}  rel {worst[1]:.2e}\n"
          f"  greedy tokens (4 left-padded prompts x 32 new, KV cache): equal {par['greedy_tokens_equal']}"
          f" ({100 * par['greedy_tokens_agree']:.0f}% agree"
          + (f"; first difference at (row, step) {par['greedy_first_difference']})" if not par["greedy_tokens_equal"]
             else ")"), flush=True)


def report_training(models, cfg, shapes, args, results) -> None:
    print("training step (forward + loss + backward + AdamW)")
    for batch, seq in shapes:
        t = time_training(models, cfg, batch, seq, args, args.warmup, args.reps)
        results.setdefault("train", []).append(dict(batch=batch, seq=seq, times=t))
        m, r, tok, fpt = med(t["minipeft"]), med(t["hf+peft"]), batch * seq, flops_per_token(cfg, seq)
        print(row(f"batch {batch} x seq {seq}: step time", m * 1e3, r * 1e3, "ms"))
        print(row("  process CPU time (all threads)", med(t["minipeft cpu"]) * 1e3, med(t["hf+peft cpu"]) * 1e3, "ms"))
        print(row("  tokens/s", tok / m, tok / r, "tok/s", "{:.0f}"))
        print(row("  model TFLOP/s", tok * fpt / m / 1e12, tok * fpt / r / 1e12, "TFLOP/s", "{:.3f}"))
        if args.peak_tflops:
            print(row(f"  MFU vs {args.peak_tflops:g} TFLOP/s", 100 * tok * fpt / m / 1e12 / args.peak_tflops,
                      100 * tok * fpt / r / 1e12 / args.peak_tflops, "%", "{:.1f}"))
        print(f"  {'':36} wall min..max ms: minipeft {min(t['minipeft']) * 1e3:.0f}..{max(t['minipeft']) * 1e3:.0f}, "
              f"hf+peft {min(t['hf+peft']) * 1e3:.0f}..{max(t['hf+peft']) * 1e3:.0f}", flush=True)


def report_memory(shapes, args, results) -> None:
    how = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "RSS high-water mark"
    print(f"peak memory of the training step ({how}; {args.memory_runs} fresh processes each, taking turns, "
          "the order alternating; "
          "medians; above the built model + LoRA)")
    for batch, seq in shapes:
        runs = {impl: [] for impl in IMPLS}
        for r in range(args.memory_runs):
            for impl in turns(list(IMPLS), r):
                runs[impl].append(measure_memory(impl, batch, seq, args))
        results.setdefault("memory", []).append(dict(batch=batch, seq=seq, **runs))
        step = {impl: [r["step_bytes"] / 2**20 for r in runs[impl]] for impl in IMPLS}
        peak = {impl: med([r["peak_bytes"] / 2**20 for r in runs[impl]]) for impl in IMPLS}
        print(row(f"batch {batch} x seq {seq}: step peak", med(step["minipeft"]), med(step["hf+peft"]), "MiB", "{:.0f}"))
        print(row("  total peak (model included)", peak["minipeft"], peak["hf+peft"], "MiB", "{:.0f}"))
        print(f"  {'':36} step peak min..max MiB: minipeft {min(step['minipeft']):.0f}..{max(step['minipeft']):.0f}, "
              f"hf+peft {min(step['hf+peft']):.0f}..{max(step['hf+peft']):.0f}", flush=True)


def report_generation(models, cfg, args, results) -> None:
    print(f"generation: greedy, KV cache, prompt {args.prompt_len} tokens, exactly {args.new_tokens} new tokens per row")
    for b in args.gen_batches:
        t = time_generation(models, cfg, b, args.new_tokens, args, 1, args.reps)
        results.setdefault("generate", []).append(dict(batch=b, new_tokens=args.new_tokens, times=t))
        n = b * args.new_tokens
        print(row(f"batch {b}: new tokens/s", n / med(t["minipeft"]), n / med(t["hf+peft"]), "tok/s", "{:.0f}"),
              flush=True)


def report_scaling(models, cfg, args, results) -> None:
    print("scaling: training step time vs sequence length (batch 1)")
    for seq in args.scale_seq_lens:
        t = time_training(models, cfg, 1, seq, args, 1, args.scale_reps)
        results.setdefault("scale_train", []).append(dict(seq=seq, times=t))
        m, r = med(t["minipeft"]), med(t["hf+peft"])
        print(row(f"seq {seq}: step time", m * 1e3, r * 1e3, "ms") + f"  {m / seq * 1e3:.2f} / {r / seq * 1e3:.2f} ms per token",
              flush=True)
    print(f"scaling: generation time vs new tokens (batch 1, prompt {args.prompt_len}): with the cache, time = a + b n")
    ns, fits = args.scale_new_tokens, {}
    for n in ns:
        t = time_generation(models, cfg, 1, n, args, 1, args.scale_reps)
        results.setdefault("scale_generate", []).append(dict(new_tokens=n, times=t))
        m, r = med(t["minipeft"]), med(t["hf+peft"])
        print(row(f"{n} new tokens: time", m * 1e3, r * 1e3, "ms") + f"  {m / n * 1e3:.2f} / {r / n * 1e3:.2f} ms per token",
              flush=True)
    for impl in IMPLS:
        ys = [med(s["times"][impl]) for s in results["scale_generate"][-len(ns):]]
        a, b = linear_fit(ns, ys)
        fits[impl] = dict(a_ms=a * 1e3, b_ms_per_token=b * 1e3,
                          max_residual_ms=max(abs(y - a - b * n) for n, y in zip(ns, ys)) * 1e3)
        print(f"  {impl:<9} fit: a = {a * 1e3:.1f} ms, b = {b * 1e3:.2f} ms/token, "
              f"largest residual {fits[impl]['max_residual_ms']:.1f} ms")
    results["scale_generate_fit"] = fits


def profile_step(models: dict, cfg, batch: int, seq: int, args) -> None:
    """--profile: torch.profiler table (by self time) of one training step of each implementation."""
    from torch.profiler import ProfilerActivity, profile

    idx, targets = batch_for(cfg, batch, seq, args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for name, m in models.items():
        m.train()
        step = train_step_fn(m, name, idx, targets)
        step()
        with profile(activities=activities, profile_memory=True) as prof:
            step()
        print(f"\n--- profile: {name}, one training step (batch {batch}, seq {seq}) ---")
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows))


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--config", default=None, help="cpu-small (CPU default) or a minipeft preset (CUDA default llama-3.2-1b)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="training batch (CPU 4; CUDA 4096 tokens / seq-len)")
    p.add_argument("--seq-len", type=int, nargs="+", default=None, help="training length(s) (CPU 256; CUDA 512 2048)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale-reps", type=int, default=3, help="repetitions for the scaling section")
    p.add_argument("--memory-runs", type=int, default=3, help="fresh processes per implementation for memory")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--scale-seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--scale-new-tokens", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU; CUDA default 989 (H100 SXM, dense bf16)")
    p.add_argument("--sections", default="parity,train,memory,generate,scaling")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step of each")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    p.add_argument("--memory-child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.config = args.config or ("llama-3.2-1b" if cuda else "cpu-small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.seq_len = args.seq_len or ([512, 2048] if cuda else [256])
    if args.peak_tflops is None and cuda:
        args.peak_tflops = 989.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        args.seq_len = args.seq_len[0]
        return memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    quiet_transformers()
    sections = set(args.sections.split(","))
    cfg, dtype = make_config(args.config, args.vocab), getattr(torch, args.dtype)
    shapes = [(args.batch or (max(1, 4096 // s) if args.device == "cuda" else 4), s) for s in args.seq_len]
    print(header(cfg, args), flush=True)
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "config": cfg.fingerprint(), "minipeft_loss_kwargs": LOSS_KWARGS}
    mini, ref = build_models(cfg, dtype, args.device)
    models = {"minipeft": mini, "hf+peft": ref}
    if "parity" in sections:
        results["parity"] = par = check_parity(mini, ref, cfg, dtype, args.device)
        report_parity(par, args.dtype)
        if not par["ok"]:
            sys.exit("parity failed: the two implementations do not compute the same function; no timings")
    print(f"\n{'':38} {'minipeft':>10} {'hf+peft':>10}")
    if "train" in sections:
        report_training(models, cfg, shapes, args, results)
    if "memory" in sections:
        report_memory(shapes, args, results)
    if "generate" in sections:
        report_generation(models, cfg, args, results)
    if "scaling" in sections:
        report_scaling(models, cfg, args, results)
    if args.profile:
        profile_step(models, cfg, *shapes[0], args)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
