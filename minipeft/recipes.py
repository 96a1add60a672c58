"""Per-method training recipes: the peak learning rate and method settings, for each task, in one table.

`python -m minipeft.finetune` reads `recipe(method, task)` when `--lr` is not given (`--lr` and `--set`
still override) and prints which recipe it used; summary.json records it. Two tasks:

* "toy": the shipped toy base (data/toy_base/) on the synthetic GSM8K-format task, 3 epochs of
  batch 16 (minipeft.toy.TOY_TRAINING). The rates start from the per-family rates that compare.py
  used (low-rank matrices 3e-3, tied/shared factors 1e-2, vectors 3e-2: minipeft's choice); then every
  method's was set by the write-up's protocol (`python -m minipeft.compare --sweep`: that rate x 1/3, 1,
  3, one seed, three epochs, the last epoch's training loss chooses), figures in the comments and in
  results/toy-sweep/. Where the choice sat at the edge of its grid, the next rate beyond it was run
  too (sweep-6, sweep-7: `--factors 3` or `1/3`), and again while the new rate won; a choice still at
  an edge says so.
* "llama-3.2-1b": Llama-3.2-1B on GSM8K. Where a published setting exists it is cited next to the
  number; most come from Hugging Face PEFT's MetaMathQA method comparison
  (github.com/huggingface/peft, method_comparison/MetaMathQA/: Llama-3.2-3B, AdamW, weight decay 0.1,
  cosine schedule, batch 4, 5k-10k steps; default lr 1e-4 in default_training_params.json), the
  closest published benchmark to this job. None of these rates were run here (no GPU was lent).

Method settings in `method_args` are applied under any `--set`. For Llama-3.2-1B the table sets
only the rate: the sources' other settings (LoRA r=32, 200 virtual tokens, ...) are quoted in the
comments, with the `--set` that reproduces them, and the method configs keep their own defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("toy", "llama-3.2-1b")
SOURCE = "minipeft/recipes.py"


@dataclass(frozen=True)
class Recipe:
    lr: float                                        # peak learning rate (warmup + cosine)
    method_args: dict = field(default_factory=dict)  # method config fields, under --set


PEFT_BENCH = "HF PEFT MetaMathQA benchmark, method_comparison/MetaMathQA/experiments"

RECIPES: dict[str, dict[str, Recipe]] = {
    "lora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0410, 1e-2 0.0397 (chosen), 3e-2 0.0898
        "toy": Recipe(1e-2),
        # PEFT_BENCH lora/llama-3.2-3B-rank32: lr 1e-4 with r=32, lora_alpha=64 on q_proj+v_proj (PEFT's Llama
        # default; --set r=32 --set alpha=64 to match). The LoRA paper (arXiv:2106.09685, Table 11): 2e-4 on GPT-3.
        "llama-3.2-1b": Recipe(1e-4),
    },
    "dora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1e-3 0.0520, 3e-3 0.0414, 9e-3 0.0400 (chosen), 2.7e-2 0.0567 (sweep-6, beyond the first grid's edge)
        "toy": Recipe(9e-3),
        "llama-3.2-1b": Recipe(1e-4),  # PEFT_BENCH lora/llama-3.2-3B-rank32-dora: lr 1e-4 (r=32, lora_alpha=64)
    },
    "simple_dora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1e-3 0.0551, 3e-3 0.0425, 9e-3 0.0390 (chosen), 2.7e-2 0.0581 (sweep-6, beyond the first grid's edge)
        "toy": Recipe(9e-3),  # minipeft's choice (compare.py's low-rank rate)
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice: DoRA's published rate
    },
    "tied_lora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0503, 1e-2 0.0443, 3e-2 0.0440 (chosen), 9e-2 0.0502 (sweep-6, beyond the first grid's edge)
        "toy": Recipe(3e-2),  # minipeft's choice (compare.py's shared-factor rate)
        "llama-3.2-1b": Recipe(1e-3),  # minipeft's choice (no published Llama-3 setting; shared factors, 10x LoRA)
    },
    "partially_tied_lora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0442, 1e-2 0.0430 (chosen), 3e-2 0.0466
        "toy": Recipe(1e-2),  # minipeft's choice
        "llama-3.2-1b": Recipe(1e-3),  # minipeft's choice
    },
    "tied_lora_extra": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0522, 1e-2 0.0478 (chosen), 3e-2 0.0516
        "toy": Recipe(1e-2),  # minipeft's choice
        "llama-3.2-1b": Recipe(1e-3),  # minipeft's choice
    },
    "tensor_embedding": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0500, 1e-2 0.0476 (chosen), 3e-2 0.0525
        "toy": Recipe(1e-2),  # minipeft's choice
        "llama-3.2-1b": Recipe(1e-3),  # minipeft's choice
    },
    "ia3": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-2 0.0519, 1e-1 0.0439 (chosen), 3e-1 0.0598
        "toy": Recipe(1e-1),
        # PEFT_BENCH ia3/llama-3.2-3B-all-attn-5k-lr0.005: lr 5e-3, weight decay 0 (its default run: 1e-4,
        # too low for vectors). The (IA)3 paper (arXiv:2205.05638) used 3e-3 with Adafactor on T0.
        "llama-3.2-1b": Recipe(5e-3),
    },
    "ia3pp": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1.1e-2 0.0567 (sweep-6, below the first grid's edge), 3.3e-2 0.0467 (chosen), 1e-1 0.0483, 3e-1 0.0740.
        # The claims run (results/toy-claims) used 1e-1.
        "toy": Recipe(3.3e-2),
        "llama-3.2-1b": Recipe(5e-3),  # minipeft's choice: (IA)3's published rate
    },
    "prefix_tuning": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.3494, 1e-2 0.1597, 3e-2 0.0922; beyond that grid's top edge (sweep-6, sweep-7): 9e-2 0.0652
        # (chosen), 2.7e-1 0.0779
        "toy": Recipe(9e-2),
        # PEFT_BENCH prefixtuning/llama-3.2-3B-lr_0.001: lr 1e-3 (200 virtual tokens there; minipeft keeps
        # prefix_len=10: --set prefix_len=200 to match)
        "llama-3.2-1b": Recipe(1e-3),
    },
    "prompt_tuning": {
        # Initialised from words (Lester et al. 2021, arXiv:2104.08691, sections 2.1 and 3.2: inits from real words
        # beat random ones): 20 bytes in the Q&A layout the toy base pretrained on (in its byte-level vocabulary
        # a byte's id is its value). The default "sampled vocab" init draws bytes and reserved ids the toy base
        # never trained and starts at ~7 bits/token (tests/test_toy.py); with it, sweep-2 chose 3e-2 (last-epoch
        # train 0.3254) and one epoch left the base's test loss almost unchanged (0.4384 +- 0.0106 vs 0.4491).
        # --sweep with this init (results/toy-sweep/sweep-5.md: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-2 0.2429, 1e-1 0.2011 (chosen), 3e-1 0.2199
        "toy": Recipe(1e-1, {"init_token_ids": tuple(b"Answer: 2+3=5\n#### 5")}),
        # PEFT_BENCH prompt_tuning/llama-3.2-3B-lr_0.001 and -sample_vocab-lr_0.001: lr 1e-3
        # (200 virtual tokens there; --set prompt_len=200 to match)
        "llama-3.2-1b": Recipe(1e-3),
    },
    # The two below: toy rates checked on the shipped base with 100-step runs (seed 0, 2 shared CPU cores;
    # `python -m minipeft.finetune --method M --max-steps 100 --no-baseline --quiet --out DIR --lr X`), test
    # bits/token / accuracy on the 200 test problems; the base itself: 0.444 / 1.5%.
    "infix_tuning": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-2 0.0920, 1e-1 0.0738 (chosen), 3e-1 0.0896
        "toy": Recipe(1e-1),
        "llama-3.2-1b": Recipe(1e-3),  # minipeft's choice: prefix tuning's published rate (PEFT_BENCH above)
    },
    "pasta": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-2 0.3376, 1e-1 0.3213 (chosen), 3e-1 0.3501
        # In the plain format only <|begin_of_text|> occurs, so 6 x 128 of the 3,072 numbers train.
        "toy": Recipe(1e-1),
        "llama-3.2-1b": Recipe(5e-3),  # minipeft's choice: (IA)3's published rate for vectors (PEFT_BENCH ia3)
    },
    "llama_adapter": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.2751, 1e-2 0.1948, 3e-2 0.1054; beyond that grid's top edge (sweep-6, sweep-7): 9e-2 0.0918
        # (chosen), 2.7e-1 0.1229
        "toy": Recipe(9e-2),
        # PEFT_BENCH adaptionprompt/llama-3.2-3B-lr_0.0005: lr 5e-4 (adapter_len 100 on all 28 layers there).
        # The LLaMA-Adapter repo (OpenGVLab/LLaMA-Adapter alpaca_finetuning_v1/finetuning.sh) uses
        # blr 9e-3 with lr = blr * batch / 256, on LLaMA-7B with prompt_len 10 on 30 layers.
        "llama-3.2-1b": Recipe(5e-4),
    },
    "bitfit": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0781, 1e-2 0.0522, 3e-2 0.0462 (chosen), 9e-2 0.0510 (sweep-6, beyond the first grid's edge)
        "toy": Recipe(3e-2),  # minipeft's choice (compare.py)
        # minipeft's choice; the BitFit paper (arXiv:2106.10199) searched 1e-4..1e-3 for BERT
        "llama-3.2-1b": Recipe(1e-3),
    },
    "bottleneck_adapter": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1e-3 0.0483, 3e-3 0.0375 (chosen), 9e-3 0.0420
        "toy": Recipe(3e-3),  # minipeft's choice (low-rank matrices' rate)
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice (LoRA's published rate)
    },
    "adamix": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-4 0.1010 (sweep-6, below the first grid's edge), 1e-3 0.0748 (chosen), 3e-3 0.0820, 9e-3 0.2341
        "toy": Recipe(1e-3),
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice
    },
    "adamix_lora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1.1e-3 0.0834 (sweep-6, below the first grid's edge), 3.3e-3 0.0698 (chosen), 1e-2 0.1742, 3e-2 5.3826
        "toy": Recipe(3.3e-3),
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice (LoRA's published rate)
    },
    "adalora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1e-2 0.0459, 3e-2 0.0416 (chosen), 9e-2 0.0596
        "toy": Recipe(3e-2),  # minipeft's choice (LoRA's toy rate)
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice (LoRA's published rate)
    },
    "dylora": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1e-3 0.1227, 3e-3 0.0705 (chosen), 9e-3 0.1303
        "toy": Recipe(3e-3),  # minipeft's choice (rank 1 draws scale by alpha / 1: lower than LoRA's)
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice
    },
    "sparse_ft": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.2045, 1e-2 0.1296, 3e-2 0.0621; beyond that grid's top edge (sweep-6, sweep-7): 9e-2 0.0554
        # (chosen), 2.7e-1 0.0611
        "toy": Recipe(9e-2),
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice
    },
    "diff_pruning": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.0413, 1e-2 0.0720, 3e-2 0.2953; below that grid's bottom edge (sweep-6, sweep-7): 3.7e-4 0.0469,
        # 1.1e-3 0.0383 (chosen)
        "toy": Recipe(1.1e-3),
        "llama-3.2-1b": Recipe(1e-4),  # minipeft's choice
    },
    "spiel": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 3.3e-3 0.2082, 1e-2 0.1449, 3e-2 0.0770; beyond that grid's top edge (sweep-6, sweep-7): 9e-2 0.0622
        # (chosen), 2.7e-1 0.0707
        "toy": Recipe(9e-2),
        # minipeft's choice (sparse_ft's rate). ducdauge/sft-llm (the paper's instruction-tuning scripts,
        # scripts/finetune_peft_with_accelerate.sh) sets LEARNING_RATE=1e-5 for Llama-2 7B/13B at batch 128.
        "llama-3.2-1b": Recipe(1e-4),
    },
    "full": {
        # --sweep (results/toy-sweep: 375 steps, seed 0, last-epoch train bits/token):
        # 1.1e-4 0.0359 (sweep-6, below the first grid's edge), 3.3e-4 0.0311 (chosen), 1e-3 0.0359, 3e-3 0.0568
        "toy": Recipe(3.3e-4),  # every weight: far below the adapters' rates
        "llama-3.2-1b": Recipe(2e-5),  # minipeft's choice (a usual full fine-tuning rate for 1B models)
    },
}


def recipe(method: str, task: str) -> Recipe:
    """The recipe of `method` on `task` ("toy" or "llama-3.2-1b"), with errors naming what exists."""
    if task not in TASKS:
        raise KeyError(f"{SOURCE}: unknown task {task!r}; tasks are {TASKS}")
    if method not in RECIPES:
        raise KeyError(f"{SOURCE}: no recipe for method {method!r}; recipes exist for {sorted(RECIPES)}")
    return RECIPES[method][task]


def describe(method: str, task: str, lr: float, from_recipe: bool) -> str:
    """The line finetune prints first, e.g. `recipe: ia3pp on toy: lr 0.033 (minipeft/recipes.py)`. Rates
    are printed in full (repr), so pasting one into --lr gives the same rate."""
    r = recipe(method, task)
    extra = "".join(f", {k}={v}" for k, v in r.method_args.items())
    where = SOURCE if from_recipe else f"--lr; the recipe's is {float(r.lr)!r} in {SOURCE}"
    return f"recipe: {method} on {task}: lr {float(lr)!r}{extra} ({where})"
