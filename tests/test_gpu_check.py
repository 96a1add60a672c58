"""scripts/gpu_check.py (issue 18, point 1) on CPU: its --device cpu --quick path runs the same code as
`make gpu-check` on the tiny preset, so the script cannot rot where no GPU is available."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_path_measures_throughput_and_writes_one_json(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--sections", "throughput,bench",
                           "--methods", "lora,llama_adapter"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["quick"] and report["torch"]
    rows = report["sections"]["throughput"]
    assert [r["method"] for r in rows] == ["lora", "llama_adapter"]
    assert all(r["tokens_per_s"] > 0 and r["trainable_params"] > 0 for r in rows)
    assert "bench" in report["sections"] and "total_seconds" in report["sections"]
    assert "tokens/s" in capsys.readouterr().out  # each figure is printed as it goes


def test_tests_section_runs_the_gpu_marked_tests_on_the_chosen_device(gpu_check, tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, cwd, env, capture_output, text, timeout):
        seen.update(cmd=cmd, env=env)
        return subprocess.CompletedProcess(cmd, 1, "lora: loss 6.2, 10 trained\n1 failed, 19 passed\n", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--sections", "tests"]) == 1
    assert seen["cmd"][-3:] == ["-m", "gpu", "tests/test_gpu.py"]
    assert seen["env"]["MINIPEFT_GPU_DEVICE"] == "cpu" and seen["env"]["MINIPEFT_GPU_PRESET"] == "tiny"
    tests = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["tests"]
    assert tests["summary"] == "1 failed, 19 passed" and tests["figures"] == ["lora: loss 6.2, 10 trained"]


def test_cuda_without_a_gpu_and_without_install_fails_clearly(gpu_check, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--device", "cuda", "--no-install", "--out", str(tmp_path)]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_whole_quick_path_as_make_gpu_check_runs_it(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["tests"]["returncode"] == 0 and len(report["sections"]["throughput"]) >= 17
