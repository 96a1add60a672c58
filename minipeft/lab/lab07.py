"""Checks of lab 07 (fine-tuning on GSM8K-format problems): the answer-only loss mask, the `####` gold answer,
exercises (the chat-format mask, grading a generation, counting trainable parameters).

Each function takes what the student wrote, raises `Wrong` with a hint naming the likely mistake, and
returns a one-line summary when it passes (run them through `minipeft.lab.check`). They build their own
inputs: the toy base's tokenizer (a file, no model), a few hand-written problems with stray whitespace, and
the first training problems of the toy task.
"""
from __future__ import annotations

import functools
import re

from ..data import (IGNORE, encode_completion, encode_example, encode_prompt, extract_gold, extract_prediction,
                    normalize_number)
from ..tokenizer import Tokenizer
from . import expect

# hand-written problems: whitespace around the question and the answer (both are stripped), a comma, a $
PROBLEMS = [
    dict(question="  Ivy has 7 pens. Dan gives her 5 more. How many pens does Ivy have?\n",
         answer="Ivy has 7+5 = <<7+5=12>>12 pens.\n#### 12\n"),
    dict(question="A farm sells 1,200 eggs a day at $2 a dozen. How much money does it make a day?",
         answer="  1,200 eggs are 1200/12 = <<1200/12=100>>100 dozen.\nIt makes 100*2 = $<<100*2=200>>200.\n#### 200"),
    dict(question="What is 9-11?", answer="9-11 = <<9-11=-2>>-2\n#### -2"),
]

# reference answers in the formats real GSM8K answers use (the gold is after the LAST ####)
GOLD_CASES = ["so 4 + 4 = 8\n#### 8", "#### 1,000", "#### $5.00", "#### -3", "#### 7.50", "#### 0.25",
              "a first #### 2\nthen #### 3", "He pays 2*3 = <<2*3=6>>6 dollars.\n#### 6\n", "#### 12,345,678",
              "#### $1,250.50", "#### -0"]

# generations to grade (exercise 2): the first number after the first ####, else the last number, else None
PREDICTION_CASES = [
    "Dan has 16 stickers.\n#### 16", "#### 24\nQuestion: then #### 7", "It costs $1,250.50 in all.",
    "so 5-3 = 2 left", "the answer is 10-4", "#### -4 degrees", "no number here", "#### none, but 12 before",
    "12 then 7.50", "Mia buys 9*2 = <<9*2=18>>18 books.\n#### 18", "#### $5.00", "#### 3.",
    "the answer is +4", "#### 1,000 apples, 20 baskets", "It has 4 legs.\n#### 4\nThe dog has 4 legs and 2 ears.",
]


@functools.lru_cache(maxsize=1)
def toy_tokenizer() -> Tokenizer:
    """The shipped toy base's tokenizer (byte level: ids 0-255 are bytes, 256-511 Llama 3's specials)."""
    from ..base import toy_base
    return Tokenizer.from_file(toy_base(progress=False))


@functools.lru_cache(maxsize=1)
def _train_problems(n: int = 40) -> tuple[dict, ...]:
    from ..tasks import load_task
    return tuple(load_task()[0][:n])


def _problems() -> list[dict]:
    return PROBLEMS + list(_train_problems())


def _as_ids(seq, what: str) -> list[int]:
    try:
        return [int(i) for i in seq]
    except (TypeError, ValueError):
        raise AssertionError(f"{what} should be a list of token ids (ints), got {type(seq).__name__}") from None


def _check_encoding(fn, fmt: str) -> str:
    """`fn(tok, example)` against encode_example(tok, example, fmt): the shapes, the BOS, the shift, the mask
    (diagnosed by how many targets it masks), the completion (its leading space, its end token)."""
    tok = toy_tokenizer()
    end, end_name = (tok.eos_id, "<|end_of_text|> (tok.eos_id)") if fmt == "plain" else (
        tok.eot_id, "<|eot_id|> (tok.eot_id)")
    problems = _problems()
    for ex in problems:
        got = fn(tok, dict(ex))
        expect(isinstance(got, (tuple, list)) and len(got) == 2, "return a pair (input_ids, targets)")
        x, y = _as_ids(got[0], "input_ids"), _as_ids(got[1], "targets")
        prompt = encode_prompt(tok, ex["question"], fmt)
        completion = encode_completion(tok, ex["answer"], fmt)
        tokens, P = prompt + completion, len(prompt)
        want_x, want_y = encode_example(tok, ex, fmt)
        expect(x != tokens, f"input_ids is the whole sequence, {end_name} included: the model reads tokens[:-1] "
                            "(nothing follows the last token, so there is nothing to predict from it)")
        expect(len(y) != len(x) + 1, "targets has one entry more than input_ids: the BOS is read, never predicted; "
                                     "targets[t] is tokens[t + 1], so both have len(tokens) - 1 entries")
        expect(len(x) == len(y), f"input_ids has {len(x)} entries and targets {len(y)}: want one target per "
                                 "position the model reads")
        expect(x[:1] == [tok.bos_id], f"input_ids starts with {x[:1]}, not <|begin_of_text|> ({tok.bos_id}): the "
                                      "prompt starts with BOS (tok.encode(..., bos=True))")
        expect(x[:2] != [tok.bos_id] * 2, "input_ids starts with two <|begin_of_text|>: BOS once")
        if x != want_x:
            if fmt == "plain" and x == (prompt + tok.encode(ex["answer"].strip()) + [end])[:-1]:
                raise AssertionError("the completion has no leading space: the prompt ends in 'Answer:', and "
                                     "the answer follows it as ' ' + the stripped answer")
            if fmt == "chat" and x == (prompt + tok.encode(" " + ex["answer"].strip()) + [end])[:-1]:
                raise AssertionError("the chat completion starts with a space: the assistant header already ends "
                                     "in two newlines, and the content is the stripped answer")
            expect(x != want_x[:-1], f"input_ids is one token short: the completion ends with {end_name}, so "
                                     "that the model learns to stop")
            i = next((i for i, (a, b) in enumerate(zip(x, want_x)) if a != b), min(len(x), len(want_x)))
            if i < P:
                where = ("the prompt (PLAIN_PROMPT with the stripped question, BOS first)" if fmt == "plain" else
                         "the prompt (tok.encode_dialog_prompt with the question: BOS, the user message, "
                         "an open assistant header)")
            else:
                where = (f"the completion (' ' + the stripped answer, then {end_name})" if fmt == "plain" else
                         f"the completion (the stripped answer, then {end_name})")
            raise AssertionError(f"input_ids differ from tokens[:-1] from position {i} on, in {where}: "
                                 f"yours read {tok.decode(x[i:i + 12])!r}..., want {tok.decode(want_x[i:i + 12])!r}...")
        if y == want_y:
            continue
        # the targets: leading -100s, then the completion's tokens
        masked = next((i for i, t in enumerate(y) if t != IGNORE), len(y))
        expect(not (y[:P - 1] == tokens[1:P] and set(y[P - 1:]) == {IGNORE}),
               "the answer's targets are masked and the prompt's are in the loss: the other way round")
        expect(IGNORE not in y[masked:], "a -100 sits after the first target in the loss: mask only the leading "
                                         "(prompt) targets, in one run")
        expect(y != x, "targets equal input_ids: not shifted. targets[t] is the token the model must predict "
                       "after reading input_ids[:t + 1], i.e. tokens[t + 1]")
        expect(not (masked == 0 and y == tokens[1:]),
               "no target is masked: the prompt's tokens are in the loss, so the model is trained to write "
               "questions too; set the targets that are prompt tokens to IGNORE (-100)")
        expect(masked != P, f"{masked} targets masked, one too many: the target at position P - 1 = {P - 1} (it "
                            f"reads the last prompt token) is the completion's first token "
                            f"{tok.decode([tokens[P]])!r}, and it belongs in the loss; target t is tokens[t + 1]")
        expect(masked != P - 2, f"{masked} targets masked, one too few: the last prompt token "
                                f"{tok.decode([tokens[P - 1]])!r} is a target in the loss. The prompt has P = {P} "
                                "tokens counting <|begin_of_text|>; target t is tokens[t + 1]")
        expect(masked == P - 1, f"{masked} targets masked, but the prompt's tokens are targets 0 .. P - 2 "
                                f"(P = {P} prompt tokens, BOS included: the BOS itself is never a target)")
        expect(y[P - 1:] != tokens[P - 1:-1], "the targets in the loss are not shifted: targets[t] is the token "
                                              "that follows position t, tokens[t + 1], not tokens[t]")
        expect(y[-1:] == [end], f"the last target is {y[-1:]}, not {end_name}: the model must learn to stop")
        expect(y[P - 1:] == completion, "the targets in the loss are not the completion's tokens: targets[t] is "
                                        "tokens[t + 1] (shifted by one, not more)")
        raise AssertionError(f"(input_ids, targets) differ from encode_example(tok, example, {fmt!r})")
    return (f"same (input_ids, targets) as encode_example(tok, example, {fmt!r}) on {len(problems)} problems; "
            "the P - 1 prompt targets masked")


def check_encode_example(my_encode_example) -> str:
    """my_encode_example(tok, example) -> (input_ids, targets), as minipeft.data.encode_example (plain)."""
    return _check_encoding(my_encode_example, "plain")


def _digits_runs(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _call(fn, text: str):
    """fn(text), an error turned into a hint that names the input and what in it may have tripped the code."""
    try:
        return fn(text)
    except NotImplementedError:
        raise
    except Exception as e:
        after = text.rsplit("####", 1)[-1]
        guess = [what for what, there in ((" (this text has two '####': which one does it read after?)",
                                           text.count("####") > 1),
                                          (" (a thousands comma left in?)", "," in after),
                                          (" (a '$' left in?)", "$" in after)) if there]
        raise AssertionError(f"on {text!r} your code raised {type(e).__name__}: {e}{''.join(guess[:1])}") from None


def check_extract_gold(my_extract_gold) -> str:
    """my_extract_gold(answer) -> the canonical number after the last ####, as minipeft.data.extract_gold."""
    cases = GOLD_CASES + [ex["answer"] for ex in _problems()]
    for answer in cases:
        want, got = extract_gold(answer), _call(my_extract_gold, answer)
        expect(isinstance(got, str), f"return the number as a str (like '12'), got {type(got).__name__} {got!r}")
        if got == want:
            continue
        tails = [t.strip() for t in answer.split("####")[1:]]
        case = f"on {answer!r} you return {got!r}"
        expect(not (len(tails) > 1 and got == normalize_number(tails[0])),
               f"{case}: that is the number after the FIRST ####; the gold answer follows the last one")
        runs = _digits_runs(answer)
        expect(not (runs and got in (runs[-1], str(int(runs[-1])))),
               f"{case}: the last run of digits; read the whole number after the last #### (its sign, its "
               "thousands commas and its decimals are part of it)")
        expect("," not in got, f"{case}: thousands commas not removed")
        expect("$" not in got, f"{case}: the '$' not dropped")
        expect(got.lstrip("-") != want.lstrip("-") or got.startswith("-"),
               f"{case}: the sign is gone" if want.startswith("-") else f"{case}: '-0' is written 0")
        expect("." not in want or "." in got, f"{case}: the decimals are gone (only a whole number loses them)")
        expect(not ("." in got and "." not in want), f"{case}: a whole number is written without decimals")
        expect(not got.endswith("0") or "." not in got, f"{case}: trailing zeros after the decimal point")
        raise AssertionError(f"{case}, want the canonical number after the last ####")
    return f"the same gold answer as extract_gold on {len(cases)} reference answers (commas, $, signs, decimals)"


def exercise_1(my_encode_chat) -> str:
    """my_encode_chat(tok, example) -> (input_ids, targets), as encode_example(tok, example, "chat")."""
    return _check_encoding(my_encode_chat, "chat")


def exercise_2(my_extract_prediction) -> str:
    """my_extract_prediction(text): the first number after the first ####, else the last number, else None."""
    for text in PREDICTION_CASES:
        want, got = extract_prediction(text), _call(my_extract_prediction, text)
        if got == want:
            continue
        case = f"on {text!r} you return {got!r}"
        expect(got is not None or want is None, f"{case}: there is a number to read")
        expect(want is not None, f"{case}: return None when the text has no number")
        expect(isinstance(got, str), f"return the number as a str (like '12'), got {type(got).__name__}")
        after = text.partition("####")[2]
        numbers = re.findall(r"[-+]?\$?\d[\d,]*(?:\.\d+)?", text)
        expect(not ("####" in text and numbers and normalize_number(numbers[-1]) == got and
                    normalize_number(numbers[-1]) != want),
               f"{case}: the last number of the text; after a #### the model's answer is the FIRST number "
               "following it (it may ramble on afterwards)")
        expect(not ("####" in text and text.count("####") > 1 and got == extract_prediction(text.rsplit("####", 1)[1])),
               f"{case}: that follows the last ####; grade the first number after the FIRST ####")
        expect("," not in got, f"{case}: thousands commas not removed")
        expect("$" not in got, f"{case}: the '$' not dropped")
        expect(not (len(want.split(".")[0]) > 3 and want.endswith(got)),
               f"{case}: a number written with thousands commas is ONE number")
        expect(not (got.startswith("-") and not want.startswith("-")),
               f"{case}: a minus between two digits (5-3) is an operator, not a sign")
        expect(not (want.startswith("-") and got == want[1:]), f"{case}: the sign is gone")
        expect("." not in want or "." in got, f"{case}: the decimals are gone")
        expect(got.lstrip("+-") == want.lstrip("+-") or not after,
               f"{case}: after '####' read the first number there is")
        raise AssertionError(f"{case}: normalise like the gold answer ('1,000' -> '1000', '$5.00' -> '5', "
                             "'+4' -> '4', '3.' -> '3')")
    return f"the same prediction as extract_prediction on {len(PREDICTION_CASES)} generations"


@functools.lru_cache(maxsize=1)
def _toy_counts() -> tuple[int, int, dict]:
    import json

    import torch

    from ..adapters import apply_method
    from ..llama import Llama, LlamaConfig
    from ..peft import count_parameters
    from ..base import toy_base
    cfg = LlamaConfig.from_hf(json.loads((toy_base(progress=False) / "config.json").read_text()))
    counts = []
    for method in ("lora", "ia3"):
        with torch.device("meta"):
            counts.append(count_parameters(apply_method(Llama(cfg), method))[0])
    return counts[0], counts[1], dict(L=cfg.n_layers, d=cfg.dim, q=cfg.n_heads * cfg.head_dim,
                                      kv=cfg.n_kv_heads * cfg.head_dim, ffn=cfg.ffn_dim)


def exercise_3(trainable_counts) -> str:
    """(LoRA's, (IA)3's) trainable parameters on the toy base with their default targets."""
    lora, ia3, c = _toy_counts()
    expect(isinstance(trainable_counts, (tuple, list)) and len(trainable_counts) == 2,
           "give two integers: (lora_count, ia3_count)")
    got_lora, got_ia3 = (int(v) for v in trainable_counts)
    expect((got_lora, got_ia3) != (ia3, lora), "the two counts are swapped: (LoRA's, (IA)3's)")
    L, d, q, kv, r = c["L"], c["d"], c["q"], c["kv"], 8
    if got_lora != lora:
        expect(got_lora * L != lora, f"LoRA: {got_lora:,} is one layer's count; the toy base has {L} layers")
        expect(got_lora != L * 2 * r * (d + q), "LoRA: v_proj is narrower than q_proj (grouped-query attention: "
                                                "2 key/value heads of width 32, against 4 query heads)")
        expect(got_lora != L * (r * d * q + r * d * kv), "LoRA: A is (r, d_in) and B is (d_out, r): r (d_in + d_out) "
                                                         "numbers per target, not r d_in d_out")
        raise AssertionError(f"LoRA: {got_lora:,} is not it; per layer and target, A (r, d_in) and B (d_out, r)")
    if got_ia3 != ia3:
        expect(got_ia3 * L != ia3, f"(IA)3: {got_ia3:,} is one layer's count; the toy base has {L} layers")
        expect(got_ia3 != L * (kv + kv + d), "(IA)3: down_proj's vector scales its INPUT, the SwiGLU width, not its "
                                             "output")
        raise AssertionError(f"(IA)3: {got_ia3:,} is not it; one number per scaled feature: the outputs of k_proj "
                             "and v_proj, the input of down_proj")
    return f"LoRA trains {lora:,} numbers, (IA)3 {ia3:,} ({lora / ia3:.0f} times fewer)"
