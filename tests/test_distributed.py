"""One job over several processes (minipeft/distributed.py): DDP and FSDP2 under torchrun, on CPUs (gloo).

The 2-process runs are real launches of `python -m minipeft.finetune` (torchrun, or the two processes
torchrun would start, given RANK/WORLD_SIZE/MASTER_PORT by hand so that one can be killed), or of this
file as torchrun's script (`worker`: many trainings in one process group, to pay the start-up once), on
a tiny checkpoint and 40 synthetic GSM8K examples. The one-process references run in this process.
Micro-batches of 3 examples over 2 ranks make shares of 2 and 1, and the last batch of an epoch (40 =
13 x 3 + 1) an empty share: the rank still runs its forward and backward, with no weight."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minipeft import finetune, runs
from minipeft.adapters import adapter_state, apply_method, load_adapter, save_adapter
from minipeft.data import IGNORE, encode_example, synthetic_gsm8k
from minipeft.distributed import World, failure_message, refusal
from minipeft.llama import Llama
from minipeft.safetensors_io import load_file
from minipeft.tokenizer import Tokenizer
from helpers import gsm8k_folder, tiny, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOK = Tokenizer.byte_level()
METHODS = ("lora", "dora", "ia3", "prefix_tuning")  # three Linear wrappers and a slot method


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny checkpoint with the byte-level tokenizer, a GSM8K-format data folder)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt")), gsm8k_folder(tmp_path_factory.mktemp("data"), 40, 4)


def command(files, out: Path, *extra: str) -> list[str]:
    ckpt, data = files
    return ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "3",
            "--grad-accum", "2", "--lr", "1e-2", "--max-new-tokens", "4", "--eval-limit", "2", "--no-baseline",
            "--quiet", *extra]


def train_losses(run: Path, key: str = "loss_bpt") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_curves(two: Path, one: Path, msg: str = "") -> None:
    """Loss to 1e-5 bits; gradient norm to 1e-4 relative (Adam would hide a gradient off by a factor)."""
    for key, rtol, atol in (("loss_bpt", 0, 1e-5), ("grad_norm", 1e-4, 0)):
        two_curve, one_curve = train_losses(two, key), train_losses(one, key)
        torch.testing.assert_close(two_curve, one_curve, rtol=rtol, atol=atol,
                                   msg=f"{msg} {key}: 2 processes {two_curve}, one {one_curve}")


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter.safetensors")


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def two_processes(argv: list[str]) -> list[subprocess.Popen]:
    """The two processes torchrun would start for `python -m minipeft.finetune argv` (pids known)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [subprocess.Popen([sys.executable, "-m", "minipeft.finetune", *argv], cwd=ROOT, text=True,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             env=dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                      LOCAL_RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1",
                                      MINIPEFT_TIMEOUT_S="60"))
            for r in range(2)]


def worker(argvs: list[list[str]]) -> None:
    """torchrun's script for many trainings in one process group: finetune.train for each command line;
    ["save", ARGV...]: build and shard that run's model, fill each rank's shards with rank + 1, and save
    the adapter in both formats from the gathered tensors; ["layout", ARGV...]: build and shard, and
    write each rank's parameters (kind, local shape, the head tied or not) to OUT/layout-RANK.json."""
    world = World.join("cpu")
    try:
        for argv in argvs:
            action = argv[0] if argv[0] in ("save", "layout") else "train"
            cfg = runs.config_from_args(runs.build_parser().parse_args(argv[action != "train":]))
            if action == "train":
                finetune.train(cfg, progress=False, world=world)
                continue
            world.configure(cfg)
            model, _, _ = world.load_base(cfg, world.device, progress=False)
            finetune.prepare_model(model, cfg, 10, world.device, world)
            if action == "layout":
                local = {n: p.to_local() if hasattr(p, "to_local") else p for n, p in model.named_parameters()}
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
                (Path(cfg.out) / f"layout-{world.rank}.json").write_text(json.dumps(dict(
                    kinds={n: type(p).__name__ for n, p in model.named_parameters()},
                    tied=model.lm_head.weight is model.embed_tokens.weight)))
                torch.save({n: t.detach().clone() for n, t in local.items()}, Path(cfg.out) / f"layout-{world.rank}.pt")
                continue
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.to_local().fill_(world.rank + 1)
            with world.gathered(model):
                world.on_main(lambda: (save_adapter(model, Path(cfg.out) / "minipeft"),
                                       save_adapter(model, Path(cfg.out) / "peft", format="peft")))
        world.leave(done=True)
    finally:
        world.leave()


# ----------------------------------------------------------------------------- the quick one

def test_torchrun_with_two_processes_trains_one_run_not_two_copies(files, tmp_path):
    """The old bug: two independent copies on one folder (twice the train records, or one copy refusing
    the folder the other had made). Now the two processes are one DDP job: 3 train records, the
    one-process losses and gradient norms."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert finetune.main(command(files, one, "--max-steps", "3")) == 0
    done = torchrun("-m", "minipeft.finetune", *command(files, two, "--max-steps", "3", "--parallel", "ddp"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(train_losses(two)) == 3
    assert_same_curves(two, one)
    assert json.loads((two / "config.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------- equal to one process

# Every method that trains over several processes, in the modes it trains in; METHODS run 20 steps
OTHERS = ("simple_dora", "ia3pp", "prompt_tuning", "infix_tuning", "pasta", "llama_adapter", "bitfit",
          "bottleneck_adapter", "sparse_ft", "full")
DDP_ONLY = ("tied_lora", "partially_tied_lora", "tied_lora_extra", "tensor_embedding")
RUNS = [(m, mode, 20) for m in METHODS for mode in ("ddp", "fsdp")] + \
       [(m, mode, 8) for m in OTHERS for mode in ("ddp", "fsdp")] + [(m, "ddp", 8) for m in DDP_ONLY]


@pytest.fixture(scope="module")
def pairs(files, tmp_path_factory) -> Path:
    """Every RUNS entry trained in one process (here) and over 2 (one torchrun launch of `worker`):
    folders one-METHOD-STEPS and MODE-METHOD."""
    root = tmp_path_factory.mktemp("pairs")
    for method, steps in sorted({(m, n) for m, _, n in RUNS}):
        argv = command(files, root / f"one-{method}-{steps}", "--method", method, "--max-steps", str(steps),
                       "--save-every", "10")
        assert finetune.main(argv) == 0
    argvs = [command(files, root / f"{mode}-{m}", "--method", m, "--parallel", mode, "--max-steps", str(n),
                     "--save-every", "10") for m, mode, n in RUNS]
    done = torchrun(__file__, json.dumps(argvs), timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_as_one_loss_and_adapter(pairs, parallel):
    """20 steps of LoRA, DoRA, (IA)3 and prefix tuning: the 2-process loss curve equals the one-process
    curve with the same global batch to 1e-5, and the saved adapter equals its adapter tensor for tensor,
    every lora_B element trained (Hugging Face accelerate's FSDP2 save kept rank 0's shard only)."""
    for method in METHODS:
        one, two = pairs / f"one-{method}-20", pairs / f"{parallel}-{method}"
        assert len(train_losses(two)) == 20
        assert_same_curves(two, one, method)
        a, b = adapter(one), adapter(two)
        assert sorted(a) == sorted(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
        lora_b = [t for name, t in b.items() if name.endswith("lora_B")]
        assert method != "lora" or (lora_b and all(bool((t != 0).all()) for t in lora_b))


@pytest.mark.slow
def test_every_other_method_that_is_not_refused_trains_as_one_process(pairs):
    """8 steps of each other method under DDP and (but for the tied ones) FSDP: the one-process curves."""
    for method, mode, steps in RUNS[len(METHODS) * 2:]:
        assert_same_curves(pairs / f"{mode}-{method}", pairs / f"one-{method}-{steps}", f"{method} {mode}")


@pytest.mark.slow
def test_an_fsdp_adapter_is_saved_whole_in_both_formats(files, tmp_path):
    """Each rank's shards hold its rank + 1: both saved formats hold every rank's rows (rank 0's
    alone would leave the rest out, or zeros), and load into one process as those values."""
    done = torchrun(__file__, json.dumps([["save", *command(files, tmp_path, "--parallel", "fsdp", "--set", "r=4")]]))
    assert done.returncode == 0, done.stderr[-3000:]
    for fmt in ("minipeft", "peft"):
        model = load_adapter(Llama.from_pretrained(files[0]), tmp_path / fmt)
        for name, t in adapter_state(model).items():
            rows = len(t)
            assert torch.equal(t[:(rows + 1) // 2], torch.ones_like(t[:(rows + 1) // 2])), (fmt, name)
            assert torch.equal(t[(rows + 1) // 2:], torch.full_like(t[(rows + 1) // 2:], 2.0)), (fmt, name)


@pytest.mark.slow
def test_the_fsdp_memory_script_measures_one_process_and_each_rank():
    """scripts/fsdp_memory.py (docs/distributed.md's memory table) on one block of the 1B shape: a row for
    the one process and each rank, their ratio to the one process; rank 0 loads the whole model before
    sharding it, the other rank never, so its load peak is the lower; --trace follows one process and the
    last rank; --grad-checkpoint reaches the processes (they report it) and is refused with --trace
    (about 40 s)."""
    def measure(*flags: str) -> str:
        cmd = [sys.executable, "scripts/fsdp_memory.py", "--nproc", "2", "--layers", "1", "--seq", "16",
               "--steps", "1", *flags]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = {line[:16].strip(): [float(v) for v in line[16:].split()] for line in done.stdout.splitlines()
                if line.startswith(("one process  ", "FSDP rank")) and "," not in line}  # not the trace's titles
        assert set(rows) == {"one process", "FSDP rank 0/2", "FSDP rank 1/2"}
        for _, train, ratio, _ in rows.values():
            assert abs(ratio - train / rows["one process"][1]) < 0.011  # printed from unrounded figures
        assert rows["FSDP rank 1/2"][0] < rows["FSDP rank 0/2"][0]
        return done.stdout

    out = measure("--trace")
    assert "recomputed" not in out
    titles = [line.split(",")[0] for line in out.splitlines() if "resident GiB in the last step" in line]
    assert titles == ["one process", "FSDP rank 1/2"]
    traced = [line.split() for line in out.splitlines() if line.startswith("    0 ")]
    assert len(traced) == 2 and all(len(t) == 5 and min(map(float, t[1:])) > 0 for t in traced)
    out = measure("--grad-checkpoint")
    assert "blocks recomputed in the backward" in out.splitlines()[0]
    refused = subprocess.run([sys.executable, "scripts/fsdp_memory.py", "--trace", "--grad-checkpoint"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--trace with --grad-checkpoint" in refused.stderr


@pytest.mark.slow
def test_fsdp_keeps_the_frozen_embedding_whole_and_tied_and_shards_the_rest(files, tmp_path):
    """Under LoRA the frozen embedding (tied to the head) is one whole tensor on every rank, equal to the
    checkpoint's, and still the head's; the blocks' weights are halves. Full fine-tuning trains the
    embedding, so there it is sharded like the rest (docs/distributed.md, Memory)."""
    argvs = [["layout", *command(files, tmp_path / m, "--method", m, "--parallel", "fsdp")] for m in ("lora", "full")]
    done = torchrun(__file__, json.dumps(argvs))
    assert done.returncode == 0, done.stderr[-3000:]
    whole = Llama.from_pretrained(files[0])
    emb, wq = whole.embed_tokens.weight, whole.layers[0].self_attn.q_proj.weight
    half = lambda t, rank: t[rank * len(t) // 2:(rank + 1) * len(t) // 2]  # noqa: E731 (FSDP2 shards rows)
    for method, emb_kind in (("lora", "Parameter"), ("full", "DTensor")):
        for rank in (0, 1):
            found = json.loads((tmp_path / method / f"layout-{rank}.json").read_text())
            local = torch.load(tmp_path / method / f"layout-{rank}.pt", weights_only=True)
            assert found["tied"] and found["kinds"]["embed_tokens.weight"] == emb_kind, (method, found)
            assert torch.equal(local["embed_tokens.weight"], emb if emb_kind == "Parameter" else half(emb, rank))
            q = "layers.0.self_attn.q_proj" + (".base" if method == "lora" else "") + ".weight"
            assert found["kinds"][q] == "DTensor" and torch.equal(local[q], half(wq, rank)), method


# ----------------------------------------------------------------------------- a rank dies

@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_the_run_resumes_to_the_same_adapter(files, tmp_path):
    """kill -9 of rank 1 after the first save: rank 0 exits within the timeout naming what happened and
    the command that resumes; resumed on 2 ranks, the run ends bit for bit as an uninterrupted one."""
    argv = command(files, tmp_path / "killed", "--max-steps", "60", "--save-every", "5")
    procs = two_processes(argv)
    while not (tmp_path / "killed" / runs.STATE_FILE).exists():
        assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert procs[0].wait(timeout=120) == 1  # mid-run: it did not finish
    assert time.time() - killed_at < 60  # MINIPEFT_TIMEOUT_S; gloo sees the closed connection at once
    err = procs[0].stderr.read()
    assert "error: rank 0 of 2: another process of this run stopped or hung" in err, err[-2000:]
    assert f"--nproc-per-node 2 -m minipeft.finetune --resume {tmp_path / 'killed'}" in err
    procs[1].wait()
    for p in two_processes(["--resume", str(tmp_path / "killed"), "--quiet"]) + two_processes(
            command(files, tmp_path / "whole", "--max-steps", "60", "--save-every", "5")):
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "whole")
    a, b = adapter(tmp_path / "killed"), adapter(tmp_path / "whole")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- in this process

@pytest.mark.parametrize("packed", [False, True])
def test_every_rank_takes_its_share_of_the_same_global_batches(packed):
    """For N = 2 and 3 the ranks' shares of each micro-batch hold exactly the one-process batch's
    examples; a rank with no rows left gets one row with every target masked."""
    encoded = [encode_example(TOK, ex, max_len=256) for ex in synthetic_gsm8k(11, seed=1)]
    cfg = runs.TrainConfig(batch_size=4, grad_accum=1, pack=packed, max_len=256)

    def rows(batch) -> list[tuple]:
        idx, targets, seg = batch
        return sorted(tuple(idx[i][seg[i] != 0].tolist()) for i in range(len(idx)) if (targets[i] != IGNORE).any())

    one = finetune.DataPlan(encoded, cfg, TOK.pad_id)
    for n in (2, 3):
        plans = [finetune.DataPlan(encoded, cfg, TOK.pad_id, World(rank=r, size=n)) for r in range(n)]
        for step in range(one.steps_per_epoch):
            whole = rows(one.step_batches(step)[0])
            shares = [p.step_batches(step)[0] for p in plans]
            assert sorted(sum((rows(s) for s in shares), [])) == whole
            for s in shares:
                assert len(s[0]) >= 1  # an empty share still holds a row, fully masked
    if not packed:  # 11 examples in batches of 4: the last batch has 3, so rank 3 of 4 gets none
        last = finetune.DataPlan(encoded, cfg, TOK.pad_id, World(rank=3, size=4))
        short = [b for b in last._epoch(0) if len(b) < 4]
        assert short and (last.share(short[0])[1] == IGNORE).all()


@pytest.mark.parametrize("method,parallel,why", [
    ("lora", "fsdp", None), ("tied_lora", "ddp", None), ("prompt_tuning", "fsdp", None),
    ("tied_lora", "fsdp", "shared by every layer"), ("prefix_tuning mlp_hidden=8", "fsdp", "shared by every layer"),
    ("adalora", "ddp", "step hook"), ("dylora", "fsdp", "step hook"), ("adamix", "ddp", "extra loss term"),
    ("diff_pruning", "fsdp", "extra loss term"),
])
def test_what_cannot_train_over_several_processes_is_refused_with_the_reason(method, parallel, why):
    method, *fields = method.split()
    model = apply_method(tiny(), method, **{k: int(v) for k, v in (f.split("=") for f in fields)})
    found = refusal(model, parallel)
    assert (found is None) if why is None else (why in found and method in found)


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    model = apply_method(tiny(), "lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    runs.save_checkpoint(tmp_path, model, opt, sched, step=1)
    state = torch.load(tmp_path / runs.STATE_FILE, weights_only=True)
    torch.save(dict(state, world_size=2, rng_ranks=[state["rng"]] * 2), tmp_path / runs.STATE_FILE)
    with pytest.raises(ValueError, match="saved by a run of 2 process.*torchrun --nproc-per-node 2 -m "
                                         "minipeft.finetune --resume"):
        runs.load_checkpoint(tmp_path, model, opt, sched)


def test_a_failed_collective_is_told_apart_from_a_bug():
    gloo = RuntimeError("[/w/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3215: "
                        "Connection reset by peer. This is typically caused by a remote worker")
    assert failure_message(gloo) == ("another process of this run stopped or hung, so the process group "
                                     "failed (Read error [127.0.0.1]:3215: Connection reset by peer)")
    assert failure_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


if __name__ == "__main__":  # torchrun's script for the `pairs` fixture
    worker(json.loads(sys.argv[1]))
