"""One probe of a toy multiple-choice candidate: write it in the MMLU layout, fine-tune the shipped toy base
for N steps (batch 16, max_len 256, the default schedule), print accuracy before/after, per subject, and the
predicted letters. Run from the repository root:

    PYTHONPATH=. OMP_NUM_THREADS=1 python results/toy-mc/probes/probe.py [--pointer] SUBJECTS STEPS METHOD LR N_TRAIN

SUBJECTS: comma-separated, of minipeft.tasks.TOY_SUBJECTS (or, with --pointer, of pointer_mc.MC_SUBJECTS).
"""
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minipeft.tasks as T  # noqa: E402
from minipeft.finetune import train  # noqa: E402
from minipeft.runs import TrainConfig  # noqa: E402

pointer = sys.argv[1] == "--pointer"
args = sys.argv[2:] if pointer else sys.argv[1:]
subjects, steps, method, lr, n_train = args[0].split(","), int(args[1]), args[2], float(args[3]), int(args[4])
if pointer:
    import pointer_mc
    pointer_mc.MC_SUBJECTS = tuple(subjects)

    def make(n, seed, split):
        return pointer_mc.synthetic_mc(n, seed, split)
else:
    def make(n, seed, split):
        return T.synthetic_mc(n, seed, split, subjects)
tag = f"{'pointer-' if pointer else ''}{'-'.join(subjects)}-{n_train}"
folder = Path(f"/tmp/toymc-probe/data-{tag}")
if not folder.exists():
    sets = dict(train=make(n_train, 0, "train"), test=make(200, 1, "test"), dev=make(40, 2, "train"))
    T.write_mmlu_layout(folder, dict(sets, val=sets["dev"]))
run = Path(f"/tmp/toymc-probe/run-{tag}-{steps}-{method}-{lr}")
t0 = time.time()
s = train(TrainConfig(data=str(folder), task="mmlu", method=method, lr=lr, max_steps=steps, batch_size=16,
                      max_len=256, out=str(run), eval_every=max(1, steps // 2)), progress=False)
print(tag, method, lr, steps, "before", s["before"]["accuracy"], "after", s["after"]["accuracy"], f"{time.time() - t0:.0f}s")
for name in ("predictions_base.jsonl", "predictions.jsonl"):
    recs = [json.loads(line) for line in (run / name).read_text().splitlines()]
    by = collections.defaultdict(list)
    for r in recs:
        by[r["subject"]].append(r["correct"])
    print(name, {k: f"{sum(v) / len(v):.3f}" for k, v in by.items()},
          "predicted", dict(collections.Counter(r["prediction"] for r in recs)))
