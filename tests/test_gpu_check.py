"""scripts/gpu_check.py on CPU (docs/gpu.md). The GPU machine it is for is bare: a system python3 with torch,
no network, minipeft not installed. The rehearsal here comes as close as this machine allows: a copy of the
working tree (as the device gets), run with `python -I` from a folder outside it, pip pointed at nothing,
and traps for pip / venv / python3 on PATH and in the copy that leave a marker file if anything calls them."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rehearse(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, Path, Path]:
    """Run a copy of the checkout's gpu_check.py as on the bare image: (process, gpu_check.json, copy, marker)."""
    copy, marker, traps, out = tmp_path / "repo", tmp_path / "INSTALL_ATTEMPTED", tmp_path / "bin", tmp_path / "out"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info",
                                                               ".pytest_cache", "notebooks", "results"))
    traps.mkdir()
    for name in ("pip", "pip3", "python", "python3", "virtualenv", "uv"):
        (traps / name).write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\nexit 1\n')
        (traps / name).chmod(0o755)
    for package in ("pip", "venv", "ensurepip"):  # `sys.executable -m pip` from the checkout or a child
        (copy / package).mkdir()
        (copy / package / "__init__.py").write_text(f"import sys\nopen({str(marker)!r}, 'a').write("
                                                    f"{package!r} + ' ' + ' '.join(sys.argv) + '\\n')\n")
        (copy / package / "__main__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/",
               PIP_CONFIG_FILE="/dev/null", PATH=f"{traps}{os.pathsep}{env.get('PATH', '')}")
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run([sys.executable, "-I", str(copy / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out), *args], cwd=tmp_path / "elsewhere", env=env,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, copy, marker


def check_rehearsal(proc, report: dict, copy: Path, marker: Path) -> list[str]:
    """What every rehearsal shows: preflight first, a JSON update after each section, no install attempt."""
    lines = proc.stdout.splitlines()
    assert lines[0] == "== preflight: budget 30s", proc.stdout[-3000:] + proc.stderr[-3000:]
    first_section = next(i for i, ln in enumerate(lines) if ln.startswith("== preflight: ok after"))
    preflight = [ln for ln in lines[:first_section] if ln.startswith("preflight: ")]
    for key in ("python 3.", "torch ", "GPU ", "triton ", "C compiler ", "transformers "):
        assert any(key in ln for ln in preflight), key
    pre = report["sections"]["preflight"]
    assert pre["status"] == "ok" and pre["python_path"] == sys.executable
    assert pre["minipeft"] == str(copy / "minipeft")  # the copy the script put on sys.path, not an install
    updated = [ln.split(":")[0][3:] for ln in lines if ln.startswith("== ") and ln.endswith("gpu_check.json updated")]
    assert updated == ["preflight", "tests", "throughput", "bench"] == list(report["sections"])
    assert all((copy.parent / "out" / f"{s}.log").exists() for s in updated if "seconds" in report["sections"][s])
    assert not marker.exists(), marker.read_text()  # never pip, venv or a python3 from PATH
    return lines


def test_the_script_has_no_install_path():
    code = SCRIPT.read_text()
    assert not re.search(r"pip install|\"-m\", \"(pip|venv|ensurepip)\"|os\.exec", code)
    if shutil.which("make") is None:
        pytest.skip("no make here")
    run = ["make", "-s", "-n", "-C", str(ROOT), "gpu-check"]
    assert subprocess.run(run, capture_output=True, text=True).stdout.strip() == \
        "python3 scripts/gpu_check.py --device cuda --out runs/gpu-check"
    assert subprocess.run([*run, "PY=/opt/py"], capture_output=True, text=True).stdout.startswith("/opt/py scripts/")


def test_a_section_past_its_budget_is_killed_with_its_process_group(gpu_check, tmp_path):
    pid_file = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.time()
    result, lines = gpu_check.run("demo", [sys.executable, "-c", code], 1.5, tmp_path)
    assert result["status"] == "timed_out" and result["returncode"] is None and time.time() - t0 < 10
    assert lines == ["started"] and (tmp_path / "demo.log").read_text() == "started\n"
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed with the group; reaped by init shortly after
        try:
            os.kill(grandchild, 0)
            if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the child's own child outlived the timeout")


def test_the_json_is_rewritten_after_each_section_and_missing_needs_skip_with_a_reason(gpu_check, tmp_path,
                                                                                      monkeypatch, capsys):
    """Children faked: a CUDA machine without a C compiler or transformers; tests time out, throughput is
    killed after one of its two methods. Each section is in gpu_check.json as soon as it ends."""
    calls, snapshots = {}, []

    def fake_run(name, cmd, budget, out, env=None):
        calls[name] = (cmd, budget)
        if name == "preflight":
            (out / "preflight.json").write_text(json.dumps(dict(torch="2.11", pytest="9", compile=False,
                                                                transformers=None, peft="0.17")))
            return dict(status="ok", seconds=1.0), []
        if name == "throughput":
            (out / "throughput.jsonl").write_text(json.dumps(dict(planned=["lora", "dora"])) + "\n"
                                                  + json.dumps(dict(method="lora", tokens_per_s=9.0)) + "\n")
        return dict(status="timed_out", seconds=budget, budget_s=budget), ["lora: loss 6.2, 10 trained"]

    real_write = gpu_check.write_json
    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check, "write_json", lambda path, data: (snapshots.append(json.loads(json.dumps(
        data, default=str))), real_write(path, data)))
    rc = gpu_check.main(["--device", "cuda", "--out", str(tmp_path), "--budget", "tests=7", "--methods", "lora,dora"])
    assert rc == 1 and [list(s["sections"]) for s in snapshots[:4]] == [
        ["preflight"], ["preflight", "tests"], ["preflight", "tests", "throughput"],
        ["preflight", "tests", "throughput", "bench"]]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    tests, throughput, bench = (report["sections"][s] for s in ("tests", "throughput", "bench"))
    assert calls["tests"][1] == 7 and calls["tests"][0][-1] == "tests/test_gpu.py"  # no compiler: no FlexAttention
    assert tests["status"] == "timed_out" and tests["figures"] == ["lora: loss 6.2, 10 trained"]
    assert "--dense" in calls["throughput"][0] and throughput["attention"] == "dense"
    assert throughput["rows"] == [dict(method="lora", tokens_per_s=9.0)] and throughput["not_run"] == ["dora"]
    assert bench == dict(status="skipped", reason="transformers or peft not installed: bench compares against them")
    assert report["status"] == "failed" and report["budgets_s"]["tests"] == 7
    out = capsys.readouterr().out
    assert "test_fast_paths.py left out: no C compiler" in out
    assert "FAILED (tests timed_out, throughput timed_out)" in out


def test_cuda_without_a_gpu_stops_at_the_preflight(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "preflight: --device cuda, but torch sees no CUDA device" in proc.stdout
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["preflight"]["status"] == "failed"
    assert all(sections[s]["status"] == "skipped" for s in ("tests", "throughput", "bench"))


def test_a_plain_interpreter_without_torch_stops_at_the_preflight_in_one_line(tmp_path):
    """The venv's base Python (no venv, no torch here): what a bare image without torch would print."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    if sys.prefix == sys.base_prefix or not base.exists() or subprocess.run(
            [base, "-I", "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no interpreter without torch at hand")
    proc = subprocess.run([base, "-I", str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == ""
    assert "preflight: torch does not import: ModuleNotFoundError: No module named 'torch'" in proc.stdout
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["bench"]["status"] == "skipped"


def test_cpu_rehearsal_a_section_past_its_budget_is_timed_out_and_the_next_one_runs(tmp_path):
    proc, report, copy, marker = rehearse(tmp_path, "--budget", "tests=0.5", "--budget", "throughput=0.5")
    lines = check_rehearsal(proc, report, copy, marker)
    assert proc.returncode == 1 and lines[-1].startswith("gpu-check: FAILED (tests timed_out, throughput timed_out)")
    sections = report["sections"]
    for name in ("tests", "throughput"):
        assert sections[name]["status"] == "timed_out" and sections[name]["budget_s"] == 0.5
        assert sections[name]["seconds"] < 5  # killed at its budget, not left to finish
    assert sections["bench"]["status"] in ("ok", "skipped") and "total_seconds" in report


@pytest.mark.slow
def test_cpu_rehearsal_the_whole_quick_check(tmp_path):
    from minipeft.methods import METHODS
    proc, report, copy, marker = rehearse(tmp_path)
    check_rehearsal(proc, report, copy, marker)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tests, throughput = report["sections"]["tests"], report["sections"]["throughput"]
    assert tests["status"] == "ok" and re.fullmatch(r"\d+ passed in .*", tests["summary"])
    assert [r["method"] for r in throughput["rows"]] == list(METHODS) and throughput["not_run"] == []
    assert all(r["tokens_per_s"] > 0 and r["trainable_params"] > 0 for r in throughput["rows"])
    assert report["status"] == "ok" and report["total_seconds"] < 480
