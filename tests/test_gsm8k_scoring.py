"""GSM8K scored as lm-evaluation-harness scores it (minipeft.data, the last section): the two filters
and exact match on hand-written generations, and the 5-shot / 8-shot prompts byte for byte against
strings written out here from lm-eval's YAMLs (lm_eval/tasks/gsm8k/*.yaml at commit 4e7e0d47), so
that a drift in either shows. tests/test_lm_eval_model.py checks the same against lm_eval itself."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from minipeft.data import (COT_EXEMPLARS, EXACT_MATCH_IGNORE, GSM8K_UNTIL, INVALID, answers_match, cot_exemplars,
                           cut_at_stop, encode_gsm8k_prompt, extract_gold, extract_prediction, gsm8k_extract,
                           gsm8k_fewshot, gsm8k_messages, gsm8k_prompt, gsm8k_scores, gsm8k_target,
                           lm_eval_exact_match, lm_eval_regex)
from minipeft.tokenizer import Tokenizer

REAL_GSM8K = Path("/work/shared/data/gsm8k")  # development copy; absent on users' machines
GOLD_72 = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def gold(n: str) -> str:
    return f"Some reasoning with 3 numbers, $4 and 5.5.\n#### {n}"


# ----------------------------------------------------------------------------- the regex filter

def test_regex_filter_first_last_tuple_and_fallback():
    assert lm_eval_regex("#### 3 and #### 4", r"#### (\-?[0-9\.\,]+)") == "3"            # first match
    assert lm_eval_regex("1 then 22 then 333", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "333"  # last match
    # a pattern with two groups: findall gives tuples, the first non-empty group counts
    assert lm_eval_regex("costs $7", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "$7"
    assert lm_eval_regex("7", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "7"                 # the second group
    assert lm_eval_regex("no digits here", r"(-?[0-9]+)") == INVALID == "[invalid]"
    assert lm_eval_regex(None, r"(-?[0-9]+)") == INVALID                                # not a str: ""


# ----------------------------------------------------------------------------- gsm8k: strict vs flexible

@pytest.mark.parametrize("generation, gold_n, strict, flexible, strict_ok, flexible_ok", [
    # the training format: both filters agree
    ("Natalia sold 24 clips in May.\nAltogether 72 clips.\n#### 72", "72", "72", "72", True, True),
    # commas are deleted before comparing, by the metric, not the filter
    ("So 1000 in all.\n#### 1,000", "1000", "1,000", "1,000", True, True),
    # `$` after ####: strict-match's regex allows no $, so nothing matches; flexible takes "$18"
    ("She makes $18 a day.\n#### $18", "18", INVALID, "$18", False, True),
    # negative numbers keep their sign
    ("The change is -5.\n#### -5", "-5", "-5", "-5", True, True),
    # decimals: compared as strings, "2.50" is not "2.5" (minipeft's answers_match says equal)
    ("Each costs 2.50.\n#### 2.50", "2.5", "2.50", "2.50", False, False),
    # a trailing period: flexible takes "42." and the metric deletes the final "."; no #### for strict
    ("The answer is 42.", "42", INVALID, "42.", False, True),
    # flexible takes the LAST number: text after the #### line costs it the point
    ("#### 72 clips, 3 left", "72", "72", "3", True, False),
    # no number at all: both filters fall back to "[invalid]"
    ("I cannot solve this.", "72", INVALID, INVALID, False, False),
    # an ellipsis is "number-like" to flexible-extract ([$0-9.,]{2,}): "..." -> ".." after "\.$"
    ("Hmm... I am not sure", "72", INVALID, "...", False, False),
])
def test_gsm8k_filters(generation, gold_n, strict, flexible, strict_ok, flexible_ok):
    scores = gsm8k_scores(generation, gold(gold_n))
    assert gsm8k_extract(generation) == {"strict_match": strict, "flexible_extract": flexible}
    assert scores == {"strict_match": strict_ok, "flexible_extract": flexible_ok,
                      "strict_match_extracted": strict, "flexible_extract_extracted": flexible}


def test_reference_is_the_full_answer_cut_by_the_metric():
    assert gsm8k_target(GOLD_72) == GOLD_72                       # gsm8k: doc_to_target "{{answer}}"
    assert gsm8k_target(GOLD_72, "gsm8k_cot") == "72"             # the CoT styles: after the last ####
    assert gsm8k_target("a\n#### 5 \n", "gsm8k_cot_llama") == "5"
    assert EXACT_MATCH_IGNORE == (",", r"\$", "(?s).*#### ", r"\.$")
    # "(?s).*#### " is greedy and crosses newlines: everything up to the LAST "#### " goes
    assert lm_eval_exact_match("72", "x #### 1\ny\n#### 72")
    assert not lm_eval_exact_match("1", "x #### 1\ny\n#### 72")
    # on the prediction too: a strict match never holds "#### ", but a raw string would be cut the same way
    assert lm_eval_exact_match("rambling\n#### 72", GOLD_72)
    # "\.$": one final period only; case is ignored
    assert lm_eval_exact_match("72.", GOLD_72) and not lm_eval_exact_match("72..", GOLD_72)
    assert lm_eval_exact_match("ABC", "#### abc")
    # minipeft's own scoring is more lenient: decimals compared as numbers, "#### $18" read as 18
    assert answers_match(extract_prediction("#### 2.50"), "2.5")
    assert not gsm8k_scores("#### 2.50", gold("2.5"))["strict_match"]
    assert extract_prediction("#### $18") == extract_gold(gold("18"))


def test_cot_styles_strict_patterns():
    # gsm8k_cot: "The answer is (\-?[0-9\.\,]+)." -- the final "." is ANY character, and one is required
    assert gsm8k_extract("So 8. The answer is 8.", "gsm8k_cot")["strict_match"] == "8"
    assert gsm8k_extract("The answer is 1,234!", "gsm8k_cot")["strict_match"] == "1,234"
    assert gsm8k_extract("The answer is 8", "gsm8k_cot")["strict_match"] == INVALID     # nothing after the 8
    assert gsm8k_extract("The answer is 8\n", "gsm8k_cot")["strict_match"] == INVALID   # "." is not a newline
    assert gsm8k_extract("the answer is 8.", "gsm8k_cot")["strict_match"] == INVALID    # the regex is case-sensitive
    assert gsm8k_scores("Q: The answer is 8.", "x\n#### 8", "gsm8k_cot")["strict_match"]
    # gsm8k_cot_llama: the LAST "The final answer is N"; nested groups -> the outer (first non-empty) one
    gen = "The final answer is 3\nNo wait. The final answer is $1,234."
    assert gsm8k_extract(gen, "gsm8k_cot_llama") == {"strict_match": "$1,234.", "flexible_extract": "$1,234."}
    assert gsm8k_scores(gen, "...\n#### 1234", "gsm8k_cot_llama")["strict_match"]
    assert gsm8k_extract("The final answer is 7", "gsm8k_cot_llama")["strict_match"] == "7"
    with pytest.raises(ValueError, match="gsm8k_cot_llama"):
        gsm8k_scores("#### 1", "#### 1", style="gsm8k-cot")


def test_cut_at_stop_keeps_the_shortest_prefix():
    until = GSM8K_UNTIL["gsm8k"]
    assert until == ("Question:", "</s>", "<|im_end|>")
    assert cut_at_stop("#### 5\n\nQuestion: next</s>", until) == "#### 5\n\n"
    assert cut_at_stop("#### 5</s>\nQuestion: next", until) == "#### 5"
    assert cut_at_stop("no stop", until + ("",)) == "no stop"       # an empty stop string is ignored
    assert GSM8K_UNTIL["gsm8k_cot"] == ("Q:", "</s>", "<|im_end|>")
    assert GSM8K_UNTIL["gsm8k_cot_llama"] == ("<|eot_id|>", "<|start_header_id|>user<|end_header_id|>",
                                              "Q:", "</s>", "<|im_end|>")


# ----------------------------------------------------------------------------- prompts, byte for byte

SHOTS = [{"question": f"Q{i} has {i} apples?", "answer": f"He has {i}.\n#### {i}"} for i in range(1, 6)]

GSM8K_5SHOT = (
    "Question: Q1 has 1 apples?\nAnswer: He has 1.\n#### 1\n\n"
    "Question: Q2 has 2 apples?\nAnswer: He has 2.\n#### 2\n\n"
    "Question: Q3 has 3 apples?\nAnswer: He has 3.\n#### 3\n\n"
    "Question: Q4 has 4 apples?\nAnswer: He has 4.\n#### 4\n\n"
    "Question: Q5 has 5 apples?\nAnswer: He has 5.\n#### 5\n\n"
    "Question: How many?\nAnswer:")

# gsm8k-cot.yaml: doc_to_text 'Q: {{question}}\n\n  A:' (a single-quoted YAML scalar: "Q: ...\nA:"),
# target_delimiter " " (default), fewshot_delimiter "\n\n" (default), the 8 samples in order
GSM8K_COT_8SHOT = (
    "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
    "there will be 21 trees. How many trees did the grove workers plant today?\n"
    "A: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
    "been 21 - 15 = 6. The answer is 6.\n\n"
    "Q: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
    "A: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
    "Q: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?\n"
    "A: Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
    "they had 74 - 35 = 39. The answer is 39.\n\n"
    "Q: Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
    "Jason give to Denny?\n"
    "A: Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
    "The answer is 8.\n\n"
    "Q: Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
    "now?\n"
    "A: Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
    "The answer is 9.\n\n"
    "Q: There were nine computers in the server room. Five more computers were installed each day, from monday to "
    "thursday. How many computers are now in the server room?\n"
    "A: There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
    "were added. 9 + 20 is 29. The answer is 29.\n\n"
    "Q: Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
    "balls did he have at the end of wednesday?\n"
    "A: Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
    "he had 35 - 2 = 33 golf balls. The answer is 33.\n\n"
    "Q: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n"
    "A: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
    "left. 23 - 15 is 8. The answer is 8.\n\n"
    "Q: How many?\nA:")

# gsm8k-cot-llama.yaml: the instruction around each question, target_delimiter "", targets without a final period
INSTR = ("Given the following problem, reason and give a final answer to the problem.\nProblem: {}\n"
         "Your response should end with \"The final answer is [answer]\" where [answer] is the response to the "
         "problem.\n")
LLAMA_TARGETS = [
    "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
    "21 - 15 = 6. The final answer is 6",
    "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The final answer is 5",
    "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
    "had 74 - 35 = 39. The final answer is 39",
    "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
    "final answer is 8",
    "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
    "final answer is 9",
    "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were "
    "added. 9 + 20 is 29. The final answer is 29",
    "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had "
    "35 - 2 = 33 golf balls. The final answer is 33",
    "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. "
    "23 - 15 is 8. The final answer is 8",
]
QUESTIONS = [
    "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
    "will be 21 trees. How many trees did the grove workers plant today?",
    "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
    "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
    "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
    "give to Denny?",
    "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
    "There were nine computers in the server room. Five more computers were installed each day, from monday to "
    "thursday. How many computers are now in the server room?",
    "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
    "did he have at the end of wednesday?",
    "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
]


def test_gsm8k_5shot_prompt():
    assert gsm8k_prompt("How many?", "gsm8k", SHOTS) == GSM8K_5SHOT
    assert gsm8k_prompt("How many?") == "Question: How many?\nAnswer:"            # zero-shot
    assert gsm8k_prompt(" sp ", "gsm8k") == "Question:  sp \nAnswer:"             # {{question}}: not stripped
    with pytest.raises(ValueError, match="training split"):
        gsm8k_prompt("How many?", "gsm8k", 5)


def test_gsm8k_cot_8shot_prompt():
    assert gsm8k_prompt("How many?", "gsm8k_cot") == GSM8K_COT_8SHOT
    assert gsm8k_prompt("How many?", "gsm8k_cot", 8) == GSM8K_COT_8SHOT
    two = gsm8k_prompt("How many?", "gsm8k_cot", 2)
    assert GSM8K_COT_8SHOT.startswith(two[:-len("Q: How many?\nA:")]) and two.endswith("5.\n\nQ: How many?\nA:")
    assert [q for q, _, _ in COT_EXEMPLARS] == QUESTIONS
    # a GSM8K training example as a CoT shot gives only its number (doc_to_target's answer.split('####')[-1])
    assert gsm8k_prompt("How many?", "gsm8k_cot", SHOTS[:1]) == "Q: Q1 has 1 apples?\nA: 1\n\nQ: How many?\nA:"


def test_gsm8k_cot_llama_prompt_and_chat():
    plain = "".join(INSTR.format(q) + t + "\n\n" for q, t in zip(QUESTIONS, LLAMA_TARGETS)) + INSTR.format("How many?")
    assert gsm8k_prompt("How many?", "gsm8k_cot_llama") == plain
    assert [s["target"] for s in cot_exemplars("gsm8k_cot_llama")] == LLAMA_TARGETS
    messages = [m for q, t in zip(QUESTIONS, LLAMA_TARGETS)
                for m in ({"role": "user", "content": INSTR.format(q)}, {"role": "assistant", "content": t})]
    messages.append({"role": "user", "content": INSTR.format("How many?")})
    assert gsm8k_messages("How many?", "gsm8k_cot_llama") == messages
    # in the Llama 3 chat format: Meta's reference (no system turn), each content stripped
    tok = Tokenizer.byte_level()
    ids = encode_gsm8k_prompt(tok, "How many?", "gsm8k_cot_llama", chat=True)
    assert ids == tok.encode_dialog_prompt(messages, add_generation_prompt=True)
    text = tok.decode(ids)
    first = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + INSTR.format(QUESTIONS[0]).strip()
             + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + LLAMA_TARGETS[0] + "<|eot_id|>")
    assert text.startswith(first) and text.count("<|start_header_id|>user") == 9
    assert text.endswith("the response to the problem.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encode_gsm8k_prompt(tok, "How many?", "gsm8k_cot") == tok.encode(GSM8K_COT_8SHOT, bos=True)


def test_fewshot_sampler_is_seeded_once_per_task():
    """lm-eval's default sampler: one random.Random(1234), one rnd.sample(train, 5) per test question in order."""
    pool = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(100)]
    draws = gsm8k_fewshot(pool, 3)
    rnd = random.Random(1234)
    assert draws == [rnd.sample(pool, 5) for _ in range(3)]
    assert draws[0] != draws[1] and gsm8k_fewshot(pool, 1) == draws[:1]  # question i: the (i+1)-th draw


@pytest.mark.skipif(not (REAL_GSM8K / "train.jsonl").exists(), reason="needs GSM8K's train.jsonl")
def test_fewshot_indices_on_real_gsm8k():
    """The training lines lm-eval's 5-shot gsm8k puts before test questions 0, 1 and 2 (7,473 training lines,
    Python's random.sample with seed 1234)."""
    train = [json.loads(line) for line in (REAL_GSM8K / "train.jsonl").read_text().splitlines()]
    index = {id(ex): i for i, ex in enumerate(train)}
    assert [[index[id(ex)] for ex in shots] for shots in gsm8k_fewshot(train, 3)] == [
        [6374, 3610, 957, 61, 742], [7462, 6610, 4769, 286, 5501], [5677, 687, 806, 6279, 2905]]
