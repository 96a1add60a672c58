"""Tests for the shipped toy base (minipeft.toy), its corpus, and the per-method recipes
(minipeft.recipes) as finetune uses them. Each runs in seconds on 2 CPU cores."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from minipeft import base, finetune, toy
from minipeft.adapters import METHODS, adapter_state, apply_method
from minipeft.data import PLAIN_PROMPT, encode_completion, encode_prompt, synthetic_gsm8k, write_jsonl
from minipeft.runs import TrainConfig, build_parser, config_from_args
from minipeft.llama import Llama, LlamaConfig
from minipeft.recipes import RECIPES, TASKS, recipe
from minipeft.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()
INFO = json.loads((toy.SHIPPED / toy.INFO_FILE).read_text())


# ----------------------------------------------------------------------------- the shipped base

def test_shipped_weights_match_their_sha256():
    assert toy.sha256(toy.SHIPPED / toy.WEIGHTS) == INFO["sha256"]
    assert sum(f.stat().st_size for f in toy.SHIPPED.iterdir()) <= 10 * 2**20


def test_shipped_base_reproduces_its_loss_probe():
    """Bits/token on fixed held-out documents: the recorded values within 1e-3 (CPU kernels differ
    by ~1e-6 in fp32; a different or damaged base differs by far more)."""
    model = Llama.from_pretrained(toy.toy_base(progress=False))
    assert toy.loss_probe(model, TOK) == pytest.approx(INFO["probes"]["loss"], abs=1e-3)


def test_shipped_base_is_the_documented_architecture():
    with torch.device("meta"):
        model = Llama(LlamaConfig(**toy.TOY_BASE))
    n = sum(p.numel() for p in model.parameters())
    assert n == INFO["parameters"] == 1_246_848  # toy.py's docstring and the README
    assert LlamaConfig.from_hf(json.loads((toy.SHIPPED / "config.json").read_text())) == LlamaConfig(**toy.TOY_BASE)


def test_missing_base_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "SHIPPED", tmp_path / "toy_base")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing.*--rebuild"):
        toy.toy_base()


# ----------------------------------------------------------------------------- the corpus

def test_corpus_has_the_format_and_every_byte_but_no_test_question():
    docs = toy.pretraining_documents(toy.PretrainRecipe(n_lines=800, n_copy=200, n_stories=400, n_qa=600))
    text = "\n".join(docs)
    train, test = synthetic_gsm8k(300, seed=0), synthetic_gsm8k(200, seed=0, split="test")
    task_bytes = set("".join(ex["question"] + " " + ex["answer"] for ex in train + test).encode())
    assert task_bytes | set(PLAIN_PROMPT.format(question="").encode()) <= set(text.encode())
    assert not any(ex["question"] in text for ex in test)  # also checked at full size when the base was built
    qa = [d for d in docs if d.startswith("Question: ")]
    assert len(qa) == 600 and all("\nAnswer: " in d and "\n#### " in d for d in qa)
    assert not any(d.split("\nAnswer: ")[0].removeprefix("Question: ") in {ex["question"] for ex in train}
                   for d in qa)  # Q&A documents are other content, never a task problem


def test_qa_documents_are_byte_for_byte_the_finetuning_format():
    """A Q&A document encodes exactly as finetune's prompt + completion (without the EOS)."""
    doc = toy.qa_text(1, seed=3)[0]
    question, answer = doc.removeprefix("Question: ").split("\nAnswer: ")
    ids = encode_prompt(TOK, question) + encode_completion(TOK, answer)
    assert ids == TOK.encode(doc, bos=True, eos=True)


# ----------------------------------------------------------------------------- built or loaded

@pytest.fixture()
def small_task(tmp_path):
    write_jsonl(synthetic_gsm8k(16, seed=0), tmp_path / "task" / "train.jsonl")
    write_jsonl(synthetic_gsm8k(4, seed=0, split="test"), tmp_path / "task" / "test.jsonl")
    return tmp_path / "task"


def test_finetuning_does_not_depend_on_whether_the_base_was_just_built(tmp_path, small_task):
    """A base pretrained in this process (consuming random numbers) then fine-tuned, and the same base
    loaded after other random draws, give bit-identical adapters: finetune seeds the adapter init."""
    base = tmp_path / "base"
    toy.build_base(toy.TINY_RECIPE, base, progress=False, full_probes=False)

    def run(out: str) -> dict:
        cfg = TrainConfig(checkpoint=str(base), data=str(small_task), out=str(tmp_path / out), max_steps=3,
                          lr=1e-2, batch_size=4, max_len=128, max_new_tokens=4, baseline=False,
                          method_args=dict(r=4))
        finetune.train(cfg, progress=False)
        from minipeft.adapters import load_adapter
        return adapter_state(load_adapter(Llama.from_pretrained(base), tmp_path / out / "adapter"))

    built = run("built")
    torch.manual_seed(1234)
    random.seed(1234)
    torch.randn(1000)
    loaded = run("loaded")
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)


# ----------------------------------------------------------------------------- recipes

def test_every_method_has_a_recipe_for_every_task():
    assert set(RECIPES) == set(METHODS)
    assert all(set(r) == set(TASKS) and all(x.lr > 0 for x in r.values()) for r in RECIPES.values())
    with pytest.raises(KeyError, match="no recipe for method 'nope'"):
        recipe("nope", "toy")


def test_finetune_ia3_without_lr_uses_its_toy_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune.main(["--method", "ia3", "--out", str(out), "--limit", "16", "--max-steps", "1",
                          "--eval-limit", "2", "--max-new-tokens", "4", "--no-baseline"]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line == "recipe: ia3 on toy: lr 0.1 (minipeft/recipes.py)"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == RECIPES["ia3"]["toy"].lr and summary["recipe"]["lr_from"] == "recipe"
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == RECIPES["ia3"]["toy"].lr


def test_lr_overrides_the_recipe_and_the_run_folder_names_the_base():
    cfg = config_from_args(build_parser().parse_args(["--method", "ia3", "--lr", "1e-3"]))
    assert cfg.lr == 1e-3 and cfg.recipe["lr_from"] == "--lr" and cfg.out == "runs/toy/ia3"
    cfg = config_from_args(build_parser().parse_args(["--checkpoint", "~/models/Llama-3.2-1B"]))
    assert cfg.out == "runs/Llama-3.2-1B/lora" and cfg.lr == RECIPES["lora"]["llama-3.2-1b"].lr
    cfg = config_from_args(build_parser().parse_args(["--preset", "tiny", "--method", "ia3"]))
    assert cfg.out == "runs/tiny/ia3" and cfg.lr == RECIPES["ia3"]["llama-3.2-1b"].lr


def test_prompt_tunings_toy_recipe_starts_from_words_the_base_knows():
    """The toy recipe initialises prompt tuning from words (Lester et al. 2021, sections 2.1 and 3.2): the end of a Q&A
    document in the layout the base pretrained on. At step 0 the prompted base then reads held-out documents
    as well as the base does, while the method's default "sampled vocab" init, rows of random ids of the
    byte-level vocabulary (mostly bytes and reserved ids the base never trained), ruins it (~7 bits/token):
    the compare runs with that init spent their budget recovering (results/toy-sweep/sweep-5.md)."""
    base = Llama.from_pretrained(toy.toy_base(progress=False))
    plain = toy.loss_probe(base, TOK)
    args = recipe("prompt_tuning", "toy").method_args
    assert TOK.decode(list(args["init_token_ids"])) == "Answer: 2+3=5\n#### 5"
    worded = toy.loss_probe(apply_method(copy.deepcopy(base), "prompt_tuning", **args), TOK)
    torch.manual_seed(0)
    sampled = toy.loss_probe(apply_method(copy.deepcopy(base), "prompt_tuning"), TOK)
    for kind in plain:
        assert worded[kind] < 1.15 * plain[kind] and sampled[kind] > 3 * plain[kind], (kind, plain, worded, sampled)
