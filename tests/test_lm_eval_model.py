"""minipeft inside lm-evaluation-harness (minipeft/lm_eval_model.py), checked against minipeft's own scoring.

Skipped where lm_eval is not installed (the project's .venv; CI). Run in a venv that has it:
    PYTHONPATH=. /tmp/lmeval-venv/bin/python -m pytest tests/test_lm_eval_model.py

lm-eval's own task files are used through `include:` (the installed lm_eval/tasks/... YAMLs: the same
templates, filters, metric and stop strings), with `dataset_path: json` over small local files instead
of the Hugging Face hub. On a tiny seeded model with a random LoRA adapter, loaded from disk:
* MMLU (2-shot): lm-eval's per-choice log-likelihoods and accuracy = minipeft.scoring.evaluate_choices';
* gsm8k (5-shot) and gsm8k_cot_llama (8-shot, chat, multi-turn): lm-eval's prompts = minipeft.data's
  gsm8k_prompt / gsm8k_messages (with lm-eval's seeded shot sampling), its generations = Llama.generate's
  cut at the stop strings, its strict/flexible scores = gsm8k_scores on those generations;
* lm-eval's RegexFilter and exact_match = minipeft.data's functions on hand-written and random strings.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the json builder needs no hub; never try to reach it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters.extraction import RegexFilter  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from helpers import tiny  # noqa: E402
from minipeft.adapters import apply_method, load_adapter, save_adapter  # noqa: E402
from minipeft.data import (EXACT_MATCH_IGNORE, FLEXIBLE, GSM8K_UNTIL, STRICT, cut_at_stop,  # noqa: E402
                           encode_gsm8k_prompt, gsm8k_fewshot, gsm8k_messages, gsm8k_prompt, gsm8k_scores,
                           lm_eval_exact_match, lm_eval_regex, synthetic_gsm8k)
from minipeft.scoring import continuation_logprobs, evaluate_choices  # noqa: E402
from minipeft.llama import Llama  # noqa: E402
from minipeft.lm_eval_model import MinipeftLM  # noqa: E402
from minipeft.tasks import mc_prompt, synthetic_mc  # noqa: E402
from minipeft.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = Path(lm_eval.__file__).parent / "tasks"
GEN = 24  # max_gen_toks for these tests (lm-eval's default is 256)


# ----------------------------------------------------------------------------- a checkpoint, an adapter, local tasks

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint folder, a run folder with a random LoRA adapter, the base + adapter in memory."""
    root = tmp_path_factory.mktemp("lm_eval")
    tiny(max_seq_len=8192).save_pretrained(root / "ckpt")  # 8 chat shots of byte-level tokens: ~4,300
    Tokenizer.byte_level().save(root / "ckpt" / "tokenizer.model")
    model = apply_method(tiny(max_seq_len=8192), "lora", r=4, targets="all-linear")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # B = 0 would make the adapter a no-op
    save_adapter(model, root / "run" / "adapter")
    reference = load_adapter(Llama.from_pretrained(root / "ckpt"), root / "run" / "adapter").eval()
    return root, reference, Tokenizer.byte_level()


def write_task(folder: Path, name: str, include: str, splits: dict[str, list[dict]], extra: str = "") -> None:
    for split, docs in splits.items():
        (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    files = "".join(f"\n    {s}: {folder / f'{name}_{s}.jsonl'}" for s in splits)
    (folder / f"{name}.yaml").write_text(f"include: {TASKS / include}\ntask: {name}\ndataset_path: json\n"
                                         f"dataset_name: null\ndataset_kwargs:\n  data_files:{files}\n{extra}")


def greedy(model, tok, ids: list[list[int]], until) -> list[str]:
    return [cut_at_stop(tok.decode(o), until) for o in model.generate(ids, max_new_tokens=GEN, stop_ids=tok.stop_ids)]


@pytest.fixture(scope="module")
def plain_run(files):
    """One simple_evaluate of mmlu_toy (2-shot) and gsm8k_toy (5-shot) through the wrapper, loaded from disk."""
    root, model, tok = files
    as_doc = lambda q: {k: q[k] for k in ("question", "choices", "answer", "subject")}  # noqa: E731
    mc_dev, mc_test = synthetic_mc(3, seed=0), synthetic_mc(6, seed=1, split="test")
    write_task(root, "mmlu_toy", "mmlu/default/_default_template_yaml",
               {"dev": [as_doc(q) for q in mc_dev], "test": [as_doc(q) for q in mc_test]},
               'description: "The following are multiple choice questions (with answers) about toy parity.\\n\\n"\n'
               "num_fewshot: 2\n")
    train, test = synthetic_gsm8k(12, seed=0), synthetic_gsm8k(4, seed=1, split="test")
    shots = gsm8k_fewshot(train, len(test))  # lm-eval's seeded draw, question by question
    generations = greedy(model, tok, [encode_gsm8k_prompt(tok, ex["question"], "gsm8k", s)
                                      for ex, s in zip(test, shots)], GSM8K_UNTIL["gsm8k"])
    for ex, gen in zip(test[:2], generations):  # golds that flexible-extract matches (a random model never does)
        ex["answer"] = "Made up.\n#### " + gsm8k_scores(gen, "")["flexible_extract_extracted"]
    write_task(root, "gsm8k_toy", "gsm8k/gsm8k.yaml", {"train": train, "test": test})
    lm = MinipeftLM(checkpoint=str(root / "ckpt"), adapter=str(root / "run"), dtype="float32", batch_size=4)
    out = simple_evaluate(model=lm, tasks=["mmlu_toy", "gsm8k_toy"], task_manager=TaskManager(include_path=str(root)),
                          log_samples=True, gen_kwargs=f"max_gen_toks={GEN}")
    return out, dict(mc_dev=mc_dev, mc_test=mc_test, test=test, shots=shots, generations=generations)


def test_mmlu_loglikelihoods_and_accuracy_match_minipeft(files, plain_run):
    _, model, tok = files
    out, made = plain_run
    result, records = evaluate_choices(model, tok, made["mc_test"], max_len=4096, shots=2, shot_pool=made["mc_dev"])
    samples = sorted(out["samples"]["mmlu_toy"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [mc_prompt(q, made["mc_dev"][:2]) for q in made["mc_test"]]
    for sample, record in zip(samples, records):
        lls = [ll for ll, _ in sample["filtered_resps"]]
        torch.testing.assert_close(torch.tensor(lls), torch.tensor(record["letter_logprobs"]), atol=1e-4, rtol=0)
        assert sample["acc"] == float(record["correct"])
    assert out["results"]["mmlu_toy"]["acc,none"] == pytest.approx(result["accuracy"])


def test_gsm8k_prompts_generations_and_scores_match_minipeft(plain_run):
    out, made = plain_run
    samples = sorted(out["samples"]["gsm8k_toy"], key=lambda s: (s["doc_id"], s["filter"]))
    by_filter = {f: [s for s in samples if s["filter"] == f] for f in ("strict-match", "flexible-extract")}
    for name, key in (("strict-match", "strict_match"), ("flexible-extract", "flexible_extract")):
        expected = [gsm8k_scores(gen, ex["answer"]) for gen, ex in zip(made["generations"], made["test"])]
        rows = zip(by_filter[name], made["test"], made["shots"], made["generations"], expected)
        for sample, ex, shots, gen, exp in rows:
            assert sample["arguments"][0][0] == gsm8k_prompt(ex["question"], "gsm8k", shots)  # the 5 sampled shots
            assert sample["resps"] == [[gen]]                                                 # the same generation
            assert sample["filtered_resps"] == [exp[f"{key}_extracted"]]
            assert sample["exact_match"] == float(exp[key])
        score = sum(e[key] for e in expected) / len(expected)
        assert out["results"]["gsm8k_toy"][f"exact_match,{name}"] == pytest.approx(score)
    assert out["results"]["gsm8k_toy"]["exact_match,flexible-extract"] >= 0.5  # the two planted golds


def test_gsm8k_cot_llama_chat_prompt_and_scores(files):
    """--apply_chat_template --fewshot_as_multiturn: 8 exemplars as 16 turns in minipeft's Llama 3 format."""
    root, model, tok = files
    test = synthetic_gsm8k(2, seed=2, split="test")
    ids = [encode_gsm8k_prompt(tok, ex["question"], "gsm8k_cot_llama", chat=True) for ex in test]
    generations = greedy(model, tok, ids, GSM8K_UNTIL["gsm8k_cot_llama"])
    write_task(root, "gsm8k_cot_llama_toy", "gsm8k/gsm8k-cot-llama.yaml", {"test": test})
    lm = MinipeftLM(checkpoint=str(root / "ckpt"), adapter=str(root / "run"), dtype="float32")
    out = simple_evaluate(model=lm, tasks=["gsm8k_cot_llama_toy"], task_manager=TaskManager(include_path=str(root)),
                          apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True,
                          gen_kwargs=f"max_gen_toks={GEN}")
    samples = [s for s in out["samples"]["gsm8k_cot_llama_toy"] if s["filter"] == "strict-match"]
    for sample, ex, prompt, gen in zip(sorted(samples, key=lambda s: s["doc_id"]), test, ids, generations):
        context = sample["arguments"][0][0]
        assert lm.encode(context) == prompt == tok.encode_dialog_prompt(gsm8k_messages(ex["question"]))
        assert sample["resps"] == [[gen]]
        assert sample["exact_match"] == float(gsm8k_scores(gen, ex["answer"], "gsm8k_cot_llama")["strict_match"])


# ----------------------------------------------------------------------------- the filters, against lm-eval's code

def _random_generation(r: random.Random) -> str:
    pieces = ["#### ", "The answer is ", "The final answer is ", "$", ",", ".", "-", " ", "\n", "x", "1", "23",
              "4.5", "1,000", "..."]
    return "".join(r.choice(pieces) for _ in range(r.randint(0, 12)))


def test_filters_and_exact_match_equal_lm_evals():
    r = random.Random(0)
    generations = [_random_generation(r) for _ in range(3000)] + [
        "#### 1,000", "#### $18", "The answer is 8", "The answer is 8.", "Hmm... no", "I cannot", "-5.\n#### -5"]
    golds = ["x\n#### 5", "#### 1000", "a #### 1\n#### 18", "#### -5", "#### 4.5"]
    for style, (pattern, group) in STRICT.items():
        for pat, grp in ((pattern, group), (FLEXIBLE, -1)):
            theirs = RegexFilter(regex_pattern=pat, group_select=grp).apply([[g] for g in generations], None)
            ours = [lm_eval_regex(g, pat, grp) for g in generations]
            assert [t[0] for t in theirs] == ours, (style, pat)
            for pred in set(ours):
                for gold in golds:
                    em = exact_match_hf_evaluate([pred], [gold], regexes_to_ignore=list(EXACT_MATCH_IGNORE),
                                                 ignore_case=True, ignore_punctuation=False)["exact_match"]
                    assert bool(em) == lm_eval_exact_match(pred, gold), (pred, gold)


# ----------------------------------------------------------------------------- the three requests directly

def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_greedy_and_rolling(files):
    root, model, tok = files
    lm = MinipeftLM(model=model, tokenizer=tok, batch_size=2)
    prompt = "Question: 2 + 3?\nAnswer:"
    (greedy_ids,) = model.generate([tok.encode(prompt, bos=True)], max_new_tokens=4)
    greedy_text = tok.decode(greedy_ids)  # may hold special tokens' text: read back as those tokens
    results = lm.loglikelihood(_requests("loglikelihood", [(prompt, greedy_text), (prompt, greedy_text[:-1] + "#"),
                                                            (prompt + " ", "A"), ("", "Hello")]))
    assert results[0][1] and not results[1][1]  # is_greedy
    expected = continuation_logprobs(model, [(tok.encode(prompt, bos=True), greedy_ids),
                                             (tok.encode(prompt, bos=True), tok.encode(" A")),
                                             ([tok.bos_id], tok.encode("Hello"))])
    torch.testing.assert_close(torch.tensor([results[0][0], results[2][0], results[3][0]]), torch.tensor(expected),
                               atol=1e-4, rtol=0)  # a trailing space of the context moves to the continuation
    text = "Natalia sold 48 clips in April and half as many in May."
    (whole,) = continuation_logprobs(model, [([tok.bos_id], tok.encode(text))])
    (rolled,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert rolled == pytest.approx(whole, abs=1e-3)  # one window: the full-context log-likelihood
    short = MinipeftLM(model=model, tokenizer=tok, max_length=16)  # windows of 16: each token still scored once
    (windowed,) = short.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-3)


def test_generate_until_cuts_at_the_stop_strings_and_reads_chat_text(files):
    _, model, tok = files
    lm = MinipeftLM(model=model, tokenizer=tok)
    prompts = ["Question: 1 + 1?\nAnswer:", "Q: 7?\nA:"]
    free = [tok.decode(o) for o in model.generate([tok.encode(p, bos=True) for p in prompts], max_new_tokens=12)]
    stop = free[0][3:5]
    out = lm.generate_until(_requests("generate_until", [(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False})
                                                          for p in prompts]))
    assert out == [cut_at_stop(f, [stop]) for f in free] and len(out[0]) <= 3
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "2?"}]
    text = lm.apply_chat_template(chat)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    assert lm.encode(text) == tok.encode_dialog_prompt(chat)  # no second BOS; special-token text read as specials
    open_turn = lm.apply_chat_template(chat[:2], add_generation_prompt=False)  # lm-eval's gen_prefix: continue it
    assert lm.encode(open_turn) == tok.encode_dialog_prompt(chat[:2], add_generation_prompt=False)[:-1]  # no eot


def test_command_line_registers_the_model(files, tmp_path):
    """`python -m minipeft.lm_eval_model` is lm-eval's CLI with --model minipeft: checkpoint + adapter from disk."""
    root, _, _ = files
    as_doc = lambda q: {k: q[k] for k in ("question", "choices", "answer", "subject")}  # noqa: E731
    write_task(tmp_path, "mmlu_cli", "mmlu/default/_default_template_yaml",
               {"dev": [as_doc(q) for q in synthetic_mc(2, seed=0)],
                "test": [as_doc(q) for q in synthetic_mc(6, seed=1, split="test")]})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "minipeft.lm_eval_model", "--model", "minipeft",
           "--model_args", f"checkpoint={root / 'ckpt'},adapter={root / 'run'},dtype=float32",
           "--tasks", "mmlu_cli", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
           "--batch_size", "8"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["mmlu_cli"]["acc,none"] in (0.0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0)
    with pytest.raises(ValueError, match="checkpoint=FOLDER"):
        MinipeftLM()
