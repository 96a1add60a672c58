"""Lab 07's checks catch a student's typical mistakes, each with a hint (planted in the solution's cells)."""
import pytest

from lab_cells import assert_caught

LAB = "07_finetune_gsm8k_format"
MASK = "targets = [IGNORE] * (len(prompt) - 1) + completion\n    return input_ids, targets"
TAIL = 'tail = answer.rsplit("####", 1)[1].strip()'
CHAT_END = 'completion = tok.encode(example["answer"].strip()) + [tok.eot_id]'


@pytest.mark.parametrize("plant, hint", [
    # build 1: the answer-only mask
    pytest.param([(MASK, "targets = tokens[1:]\n    return input_ids, targets")],
                 "no target is masked: the prompt's tokens are in the loss", id="prompt-in-the-loss"),
    pytest.param([(MASK, "targets = [IGNORE] * len(prompt) + completion[1:]\n    return input_ids, targets")],
                 "one too many", id="mask-one-too-many"),
    pytest.param([(MASK, "n_prompt = len(tok.encode(question))  # BOS left out of the count\n"
                         "    targets = [IGNORE] * (n_prompt - 1) + tokens[n_prompt:]\n"
                         "    return input_ids, targets")],
                 "one too few.*counting <\\|begin_of_text\\|>", id="mask-bos-not-counted"),
    pytest.param([(MASK, "targets = [IGNORE] * len(prompt) + completion\n    return input_ids, targets")],
                 "the BOS is read, never predicted", id="bos-as-a-target"),
    pytest.param([(MASK, "targets = [IGNORE] * (len(prompt) - 1) + tokens[len(prompt) - 1:-1]\n"
                         "    return input_ids, targets")],
                 "not shifted", id="targets-not-shifted"),
    pytest.param([(MASK, "targets = tokens[1:len(prompt)] + [IGNORE] * len(completion)\n"
                         "    return input_ids, targets")],
                 "the other way round", id="mask-inverted"),
    pytest.param([("prompt = tok.encode(question, bos=True)", "prompt = tok.encode(question)")],
                 "not <\\|begin_of_text\\|>", id="no-bos"),
    pytest.param([('tok.encode(" " + example["answer"].strip()) + [tok.eos_id]',
                   'tok.encode(example["answer"].strip()) + [tok.eos_id]')],
                 "no leading space", id="no-leading-space"),
    pytest.param([("input_ids = tokens[:-1] ", "input_ids = tokens ")], "the whole sequence", id="reads-eos"),
    pytest.param([('tok.encode(" " + example["answer"].strip()) + [tok.eos_id]',
                   'tok.encode(" " + example["answer"].strip())')], "one token short: the completion ends with <.end_of_text.>", id="no-eos"),
    # build 2: the gold answer
    pytest.param([(TAIL, 'tail = answer.split("####")[1].strip()')], "two .####.: which one", id="gold-first-####"),
    pytest.param([(TAIL, 'tail = re.findall(r"[\\d.]+", answer)[-1]')], "last run of digits",
                 id="gold-last-number"),
    pytest.param([('Decimal(tail.replace(",", "").replace("$", ""))', 'Decimal(tail.replace("$", ""))')],
                 "thousands comma", id="gold-commas-kept"),
    pytest.param([('Decimal(tail.replace(",", "").replace("$", ""))', 'Decimal(tail.replace(",", ""))')],
                 "'\\$' left in", id="gold-dollar-kept"),
    pytest.param([("return str(int(number))  ", "return format(number, 'f')  ")],
                 "without decimals", id="gold-5.00"),
    pytest.param([('return format(number.normalize(), "f")', 'return format(number, "f")')],
                 "trailing zeros", id="gold-7.50"),
    pytest.param([('return format(number.normalize(), "f")', 'return str(int(number))')],
                 "decimals are gone", id="gold-decimals-dropped"),
    # exercise 1: the chat mask
    pytest.param([(CHAT_END, 'completion = tok.encode(example["answer"].strip()) + [tok.eos_id]')],
                 "<\\|eot_id\\|>", id="chat-eos-not-eot"),
    pytest.param([(CHAT_END, 'completion = tok.encode(" " + example["answer"].strip()) + [tok.eot_id]')],
                 "starts with a space", id="chat-leading-space"),
    # exercise 2: grading a generation
    pytest.param([("match = NUMBER.search(tail) if sep else None", "match = None")], "last number of the text",
                 id="prediction-last-number"),
    pytest.param([("(?<![\\d.])", "")], "operator, not a sign", id="prediction-minus-as-sign"),
    pytest.param([("(?:\\d{1,3}(?:,\\d{3})+|\\d+)", "\\d+")], "ONE number", id="prediction-commas-split"),
    pytest.param([("    if match is None:\n        return None\n", "")], "there is no number|NoneType",
                 id="prediction-none"),
    # exercise 3: counting
    pytest.param([("trainable_counts = (L * (r * (d + q_out) + r * (d + kv_out)),",
                   "trainable_counts = ((r * (d + q_out) + r * (d + kv_out)),")], "one layer's count",
                 id="count-one-layer"),
    pytest.param([("r * (d + kv_out)),", "r * (d + q_out)),")], "narrower", id="count-v-as-wide-as-q"),
    pytest.param([("L * (kv_out + kv_out + ffn))", "L * (kv_out + kv_out + d))")], "INPUT", id="count-ia3-down-out"),
])
def test_a_planted_mistake_is_caught_with_a_hint(plant, hint):
    assert_caught(LAB, plant, hint)
