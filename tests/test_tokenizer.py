"""Tests for minipeft.tokenizer: both file formats, round trips, special ids, chat format, errors.

No downloads: every vocabulary is built here. The small one is the 256 single bytes plus a few
hand-listed words and every number below 1000 (each with all its prefixes, so tiktoken's
merges always reach the whole word), written both as Meta's tokenizer.model and as a Hugging
Face tokenizer.json. One test builds a 128,000-rank file to pin the real special ids.
"""

import base64
import itertools
import json
import random
import re
import time

import numpy as np
import pytest

from minipeft.tokenizer import Tokenizer, _split_long_runs

# Meta's Llama 3.1 names, written out here rather than imported, so that the test pins them.
META_NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
              "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
              *(f"<|reserved_special_token_{i}|>" for i in range(2, 247))]
WORDS = [" the", "the", "ing", " and", " to", "Hello", " world", "\n\n", "    ", " token", "izer",
         "'s", " 🦙", "你好", "é", *(str(n) for n in range(1000))]
TEXTS = ["", "Hello world", "the tokenizer's job and the thing", "emoji 🤗🦙 and CJK 你好世界",
         "12345678901 and 3.14159", "a  b   c\t\td    e", "line1\n\nline2\r\n  \n\n\n",
         "   leading and trailing   ", "über naïve café", "text with <|eot_id|> inside"]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's encoder.py table, transcribed independently of the module under test."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_ranks(words: list[str]) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for word in words:
        data = word.encode()
        for end in range(2, len(data) + 1):
            ranks.setdefault(data[:end], len(ranks))
    return ranks


def write_model(ranks: dict[bytes, int], path) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def write_json(ranks: dict[bytes, int], path, names: list[str] = META_NAMES) -> None:
    to_text = gpt2_bytes_to_unicode()
    spell = lambda token: "".join(to_text[b] for b in token)  # noqa: E731
    added = [{"id": len(ranks) + i, "content": name, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for i, name in enumerate(names)]
    merges = [f"{spell(t[:-1])} {spell(t[-1:])}" for t in ranks if len(t) > 1]
    bpe = {"type": "BPE", "byte_fallback": False, "ignore_merges": True,
           "vocab": {spell(t): r for t, r in ranks.items()}, "merges": merges}
    path.write_text(json.dumps({"version": "1.0", "added_tokens": added, "model": bpe}, indent=1))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(ranks, tokenizer from tokenizer.model, tokenizer from tokenizer.json)."""
    root = tmp_path_factory.mktemp("small")
    ranks = build_ranks(WORDS)
    write_model(ranks, root / "tokenizer.model")
    write_json(ranks, root / "tokenizer.json")
    return ranks, Tokenizer.from_file(root / "tokenizer.model"), Tokenizer.from_file(root / "tokenizer.json")


def test_gpt2_table_spells_space_and_newline_as_hf_does():
    table = gpt2_bytes_to_unicode()
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")]) == ("Ġ", "Ċ", "a")
    assert len(set(table.values())) == 256


def test_both_formats_give_identical_ids(small):
    ranks, from_model, from_json = small
    assert from_model.vocab_size == from_json.vocab_size == len(ranks) + 256
    assert from_model.special_tokens == from_json.special_tokens
    for text in TEXTS:
        assert from_model.encode(text, bos=True, eos=True) == from_json.encode(text, bos=True, eos=True)


def test_merges_and_the_llama3_split_pattern(small):
    ranks, tok, _ = small
    assert tok.encode("Hello world") == [ranks[b"Hello"], ranks[b" world"]]
    assert tok.encode(" the") == [ranks[b" the"]]
    # digits go in groups of at most three, even though "1234" is in the vocabulary
    assert tok.encode("1234567") == [ranks[b"123"], ranks[b"456"], ranks[b"7"]]
    assert tok.encode("你好") == [ranks["你好".encode()]]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(small, text):
    _, from_model, from_json = small
    for tok in (from_model, from_json, Tokenizer.byte_level()):
        assert tok.decode(tok.encode(text)) == text


def test_special_ids_follow_the_ranks(small):
    ranks, tok, _ = small
    base = len(ranks)
    assert list(tok.special_tokens) == META_NAMES and len(META_NAMES) == 256
    assert tok.special_tokens == {name: base + i for i, name in enumerate(META_NAMES)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base, base + 1, base + 4)
    assert (tok.start_header_id, tok.end_header_id) == (base + 6, base + 7)
    assert (tok.eom_id, tok.eot_id) == (base + 8, base + 9)
    assert tok.stop_ids == {base + 1, base + 8, base + 9}
    assert tok.encode("hi", bos=True, eos=True) == [base, ranks[b"h"], ranks[b"i"], base + 1]


def test_real_llama3_special_ids_with_128000_ranks(tmp_path):
    start = time.perf_counter()
    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    triples = (bytes(t) for t in itertools.product(range(97, 123), range(256), range(256)))
    tokens = [*(bytes([b]) for b in range(256)), *pairs, *itertools.islice(triples, 128_000 - 256 - 65_536)]
    ranks = {t: r for r, t in enumerate(tokens)}
    write_model(ranks, tmp_path / "tokenizer.model")
    write_json(ranks, tmp_path / "tokenizer.json")
    for path in (tmp_path / "tokenizer.model", tmp_path / "tokenizer.json"):
        tok = Tokenizer.from_file(path)
        assert tok.vocab_size == 128_256
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
        assert (tok.start_header_id, tok.end_header_id) == (128006, 128007)
        assert (tok.eom_id, tok.eot_id) == (128008, 128009)
        assert tok.special_tokens["<|start_header_id|>"] == 128006
        assert tok.special_tokens["<|reserved_special_token_246|>"] == 128255
        assert tok.decode(tok.encode("the brown 🦊", bos=True)) == "<|begin_of_text|>the brown 🦊"
    assert time.perf_counter() - start < 8.0


def test_special_text_is_plain_text_unless_allowed(small):
    ranks, tok, _ = small
    plain = tok.encode("<|eot_id|><|begin_of_text|>")
    assert all(i < len(ranks) for i in plain) and tok.decode(plain) == "<|eot_id|><|begin_of_text|>"
    assert tok.encode("<|eot_id|><|begin_of_text|>", allowed_special="all") == [tok.eot_id, tok.bos_id]
    only_eot = tok.encode("<|eot_id|><|begin_of_text|>", allowed_special={"<|eot_id|>"})
    assert only_eot[0] == tok.eot_id and max(only_eot[1:]) < len(ranks)


def test_chat_format_byte_level_ids_assembled_by_hand():
    tok = Tokenizer.byte_level()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?\n"}]
    expected = ([256, 262, *b"system", 263, *b"\n\n", *b"Be brief.", 265]
                + [262, *b"user", 263, *b"\n\n", *b"2+2?", 265])
    assert tok.encode_dialog_prompt(messages, add_generation_prompt=False) == expected
    assert tok.encode_dialog_prompt(messages) == expected + [262, *b"assistant", 263, *b"\n\n"]
    four = [262, *b"assistant", 263, 10, 10, 52, 265]  # "\n" is byte 10, "4" is byte 52
    assert tok.encode_message({"role": "assistant", "content": "4"}) == four


def test_chat_format_with_merges(small):
    ranks, tok, _ = small
    got = tok.encode_dialog_prompt([{"role": "user", "content": "Hello world"}])
    base = len(ranks)
    expected = [base, base + 6, *tok.encode("user"), base + 7, ranks[b"\n\n"],
                ranks[b"Hello"], ranks[b" world"], base + 9,
                base + 6, *tok.encode("assistant"), base + 7, ranks[b"\n\n"]]
    assert got == expected


@pytest.mark.parametrize("message", [{"role": "robot", "content": "hi"}, {"content": "hi"}, {"role": "user"},
                                     {"role": "user", "content": 3}])
def test_chat_format_rejects_bad_messages(message):
    with pytest.raises(ValueError, match="role|content"):
        Tokenizer.byte_level().encode_dialog_prompt([message])


def test_byte_level_tokenizer():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 512 and tok.encode("hé") == [104, 195, 169]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eom_id, tok.eot_id) == (256, 257, 260, 264, 265)
    assert tok.stop_ids == {257, 264, 265} and tok.special_tokens["<|reserved_special_token_246|>"] == 511
    assert tok.decode(np.array([256, 104, 105, 265])) == "<|begin_of_text|>hi<|eot_id|>"
    with pytest.raises(ValueError, match="512"):
        tok.decode([512])


def test_save_then_load_and_directory_preference(small, tmp_path):
    _, tok, _ = small
    Tokenizer.byte_level().save(tmp_path / "tokenizer.model")
    write_json(tok.mergeable_ranks, tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path).vocab_size == 512  # tokenizer.model wins
    (tmp_path / "tokenizer.model").unlink()
    assert Tokenizer.from_file(tmp_path).encode(TEXTS[2]) == tok.encode(TEXTS[2])
    tok.save(tmp_path / "saved.model")
    assert Tokenizer.from_file(tmp_path / "saved.model").mergeable_ranks == tok.mergeable_ranks


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Tokenizer.from_file(tmp_path)


def reference_split(s: str, limit: int) -> list[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces` loop, transcribed as the oracle."""
    pieces, start, run, is_space = [], 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                pieces.append(s[start:i])
                start, run = i, 1
    return pieces + [s[start:]]


def test_long_run_cuts_match_meta():
    rng = random.Random(0)
    for _ in range(300):
        s = "".join(rng.choice("ab \n") * rng.randint(1, 9) for _ in range(rng.randint(0, 8)))
        assert _split_long_runs(s, 3) == reference_split(s, 3), repr(s)


def test_very_long_inputs_round_trip_fast(small):
    _, tok, _ = small
    start = time.perf_counter()
    for text in ("a" * 60_000 + " " * 60_000 + "b", "the 12 " * 70_000):  # the second is 490,000 chars
        assert tok.decode(tok.encode(text)) == text
    assert time.perf_counter() - start < 5.0


def lines_with(line: str, at: int) -> str:
    """The 256-byte vocabulary in tokenizer.model format with line `at` (1-based) replaced."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    lines[at - 1] = line
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("line, at, reason", [
    ("!!notbase64 7", 8, "base64"), ("YQ== 1.5", 98, "integer"), ("YQ== -3", 98, "integer"),
    ("YQ== 5", 98, "duplicate rank 5"), ("Bw== 97", 98, "duplicate token"), ("YQ==", 98, "expected"),
])
def test_malformed_tokenizer_model_names_file_and_line(tmp_path, line, at, reason):
    path = tmp_path / "tokenizer.model"
    path.write_text(lines_with(line, at))
    with pytest.raises(ValueError, match=reason) as err:
        Tokenizer.from_file(path)
    assert f"{path}:{at}:" in str(err.value)


@pytest.mark.parametrize("line, reason", [("YWI= 0", "byte 0 has no token"),
                                          ("YWI= 300", "rank 0 is missing")])
def test_bad_rank_sets_name_the_file(tmp_path, line, reason):
    path = tmp_path / "tokenizer.model"
    path.write_text(lines_with(line, 1))
    with pytest.raises(ValueError, match=reason) as err:
        Tokenizer.from_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("doc, reason", [
    ({"model": {"type": "BPE"}}, "'model.vocab'"), ({"added_tokens": []}, "'model.vocab'"),
    ({"model": {"type": "WordPiece", "vocab": {}}}, "'model.type' 'WordPiece'"),
    ({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}}}, "byte_fallback=True"),
    ({"model": {"type": "BPE", "vocab": {"▁the": 0}}}, "'model.vocab' entry '▁the'"),
    ({"model": {"type": "BPE", "vocab": {"a": "0"}}}, "'model.vocab' entry 'a'"),
])
def test_malformed_tokenizer_json_names_file_and_key(tmp_path, doc, reason):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=reason) as err:
        Tokenizer.from_file(path)
    assert str(path) in str(err.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{\n "model": {\n  "vocab": {,}\n }\n}')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("new_ids, keep, reason", [
    ({8: 265, 9: 264}, 256, "<\\|eom_id\\|> at id 265; Llama 3 puts it at 264"),  # eom, eot swapped
    ({0: 600}, 256, "no gaps"),                                                     # a hole at 256
    ({}, 5, "at least 11"),                                                         # too few specials
])
def test_added_tokens_must_sit_where_llama3_puts_them(tmp_path, new_ids, keep, reason):
    path = tmp_path / "tokenizer.json"
    write_json(build_ranks([]), path)
    doc = json.loads(path.read_text())
    for i, new_id in new_ids.items():
        doc["added_tokens"][i]["id"] = new_id
    doc["added_tokens"] = doc["added_tokens"][:keep]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=reason) as err:
        Tokenizer.from_file(path)
    assert str(path) in str(err.value) and "'added_tokens'" in str(err.value)


def test_hf_llama30_names_keep_positional_ids(tmp_path):
    """HF's Llama 3.0 file names +4 and +8 as reserved tokens; the ids stay where Meta puts them."""
    names = [*META_NAMES]
    names[4], names[5], names[8] = (f"<|reserved_special_token_{i}|>" for i in (2, 3, 4))
    names[10:] = [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    path = tmp_path / "tokenizer.json"
    write_json(build_ranks([]), path, names=names)
    tok = Tokenizer.from_file(path)
    assert tok.special_tokens["<|reserved_special_token_4|>"] == tok.eom_id == 264 and tok.eot_id == 265
    assert tok.encode("<|eot_id|>", allowed_special="all") == [265]
