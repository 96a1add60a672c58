"""bench/bench.py: the FLOP count behind its MFU figures, and, where the optional extras (transformers,
peft) are installed, that the reference it times computes the same function as minipeft. `make test`
never needs the extras: those tests are skipped without them."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minipeft.adapters import apply_method
from minipeft.llama import Llama, LlamaConfig
from minipeft.peft import count_parameters

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("minipeft_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only minipeft and torch at the top
    return module


def needs_reference():
    pytest.importorskip("transformers", minversion="4.45")
    pytest.importorskip("peft", minversion="0.13")


def test_flops_per_token_counts_the_models_own_weights(bench):
    """4 N + 6 N_lora + 12 L d T, with N and N_lora counted from the modules of llama-3.2-1b (meta device)."""
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    with torch.device("meta"):
        model = Llama(cfg)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # 7 per block + lm_head
    assert n == 1_235_746_816
    apply_method(model, "lora", targets="all-linear", **bench.LORA)
    n_lora = count_parameters(model)[0]
    assert n_lora == 11_272_192  # r=16 on every projection of 16 blocks
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 2048
    assert bench.flops_per_token(cfg, 2048) == 4 * n + 6 * n_lora + attention
    print(f"llama-3.2-1b LoRA training: {bench.flops_per_token(cfg, 2048) / 1e9:.2f} GFLOP/token at T=2048")


def test_linear_fit_recovers_a_line(bench):
    a, b = bench.linear_fit([32, 64, 128, 256], [5 + 2 * x for x in (32, 64, 128, 256)])
    assert a == pytest.approx(5) and b == pytest.approx(2)


def test_parity_with_transformers_and_peft(bench):
    """Our checkpoint read by transformers, the same LoRA in peft: same logits, loss, LoRA gradients, greedy tokens."""
    needs_reference()
    cfg = LlamaConfig.from_name("tiny")
    mini, ref = bench.build_models(cfg, torch.float32, "cpu")
    res = bench.check_parity(mini, ref, cfg, torch.float32, "cpu")
    assert res["ok"], res
    assert res["logits"][1] < 1e-5 and res["greedy_tokens_equal"]


def test_parity_check_catches_a_different_adapter(bench):
    needs_reference()
    cfg = LlamaConfig.from_name("tiny")
    mini, ref = bench.build_models(cfg, torch.float32, "cpu")
    with torch.no_grad():
        mini.layers[1].mlp.down_proj.lora_B.mul_(1.01)  # 1% off in one factor of one module
    res = bench.check_parity(mini, ref, cfg, torch.float32, "cpu")
    assert not res["ok"] and res["logits"][1] > 1e-4


@pytest.mark.slow
def test_whole_benchmark_runs_on_the_tiny_config(bench, tmp_path):
    """Every section, the memory subprocesses included, end to end (about 20 s)."""
    needs_reference()
    out = bench.main(["--config", "tiny", "--threads", "1", "--warmup", "0", "--reps", "1", "--scale-reps", "1",
                      "--batch", "2", "--seq-len", "32", "--memory-runs", "1", "--new-tokens", "8", "--prompt-len", "4",
                      "--scale-seq-lens", "16", "32", "--scale-new-tokens", "4", "8", "--json", str(tmp_path / "r.json")])
    assert out["parity"]["ok"] and (tmp_path / "r.json").exists()
    assert all(run["step_bytes"] > 0 for impl in ("minipeft", "hf+peft") for run in out["memory"][0][impl])
    assert [len(g["times"]["minipeft"]) for g in out["generate"]] == [1, 1]


def test_the_implementations_take_turns_in_alternating_order(bench):
    """Neither implementation always runs first in a round (bench.py's timings and memory children)."""
    seen = []
    bench.alternate({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, warmup=0, reps=4, device="cpu")
    assert seen == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [bench.turns(["a", "b"], r) for r in range(2)] == [["a", "b"], ["b", "a"]]


@pytest.fixture(scope="module")
def opstream():
    spec = importlib.util.spec_from_file_location("minipeft_opstream", BENCH.parent / "opstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_opstream_counts_one_layers_gemms(opstream):
    """bench/opstream.py on a small Llama shape under CPU autocast: per layer the 7 projections' forward
    and input-gradient GEMMs (14, 2 x 2 x tokens x weights FLOPs), LoRA's 42 small ones, 2 attention ops."""
    cfg = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)
    r = opstream.measure("minipeft", cfg, 1, 64, "h100")
    layer, tokens = r["layer"], r["tokens"]
    weights = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256  # q, o; k, v; gate, up, down
    assert layer["count"]["gemm"] == 14 and layer["flops"]["gemm"] == 2 * 2 * tokens * weights
    assert layer["count"]["small gemm"] == 42 and layer["count"]["attention"] == 2
    assert layer["bytes"]["other"] > 0 and 0 < r["tokens_per_s"] and 0 < r["mfu"] < 1


def test_a_lora_wrapper_casts_its_factors_not_its_input(opstream):
    """Under autocast on a bf16 base, LoRALinear's forward and backward cast only A (r x in), B (out x r)
    and their gradients: never x (tokens x in), which each wrapper used to copy to fp32 (and autocast
    back to bf16), so that q, k and v made three copies of the same x (76 casts per 1B layer)."""
    from minipeft.methods.lora import LoRAConfig, LoRALinear

    lora = LoRALinear(nn.Linear(256, 64, bias=False).to(torch.bfloat16), LoRAConfig(r=4))
    x = torch.randn(32, 256, dtype=torch.bfloat16, requires_grad=True)
    rec = opstream.OpRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16), rec:
        lora(x).float().pow(2).sum().backward()
    casts = [moved for name, kind, _, moved in rec.ops if name == "_to_copy"]
    assert casts and max(casts) < x.numel() * 2, casts  # each smaller than x in bf16
    assert lora.lora_A.grad is not None and lora.lora_A.grad.dtype == torch.float32
