"""Issue 12, section 5: generate_text (text in, text out, the tokenizer's stop ids, the chat format),
its CLI, and the clear errors for a prompt passed as a str or as a flat token list."""
import pytest
import torch

from minipeft import Tokenizer, apply_method, generate_text, save_adapter
from minipeft.generate import main as generate_main
from helpers import tiny

TOK = Tokenizer.byte_level()


def test_generate_text_is_generate_on_encoded_prompts_with_the_stop_ids(monkeypatch):
    m = tiny()
    prompts = ["Question: 2 + 3 =", "Hi"]
    seen = {}
    real = m.generate

    def spy(ids, **kw):
        seen.update(ids=ids, **kw)
        return real(ids, **kw)
    monkeypatch.setattr(m, "generate", spy)
    texts = generate_text(m, TOK, prompts, max_new_tokens=4)
    assert seen["ids"] == [TOK.encode(p, bos=True) for p in prompts] and seen["stop_ids"] == TOK.stop_ids
    assert texts == [TOK.decode(o) for o in real(seen["ids"], max_new_tokens=4, stop_ids=TOK.stop_ids)]
    generate_text(m, TOK, ["Why?"], max_new_tokens=2, chat=True)
    assert seen["ids"] == [TOK.encode_dialog_prompt([{"role": "user", "content": "Why?"}])]


class AlwaysSays(torch.nn.Module):
    """An output head whose greedy choice is always `token`."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(x.shape[:-1], self.token), 512).float()


def test_generation_stops_at_the_tokenizers_stop_token():
    m = tiny(tie_embeddings=False)
    m.lm_head = AlwaysSays(TOK.eot_id)
    assert generate_text(m, TOK, ["abc"], max_new_tokens=20) == [""]  # Llama.generate alone: 20 tokens
    assert m.generate([TOK.encode("abc")], max_new_tokens=20) == [[TOK.eot_id] * 20]


@pytest.mark.parametrize("prompts,message", [
    ("one question", r"got one str .*pass \[prompt\]"),
    ([128000, 791, 1234], "flat list of ints"),
    ([[1, 2, 3]], "every prompt must be a str"),
    ([], "non-empty list"),
])
def test_a_prompt_that_is_not_a_list_of_strings_is_named(prompts, message):
    with pytest.raises(TypeError, match=message):
        generate_text(tiny(), TOK, prompts)


def test_generate_cli_with_checkpoint_and_adapter(tmp_path, capsys):
    base = tmp_path / "base"
    tiny().save_pretrained(base)
    TOK.save(base / "tokenizer.model")
    save_adapter(apply_method(tiny(), "lora"), tmp_path / "adapter")
    assert generate_main(["--checkpoint", str(base), "--adapter", str(tmp_path / "adapter"),
                          "--device", "cpu", "--max-new-tokens", "3", "--chat", "hello"]) == 0
    want = generate_text(apply_method(tiny(), "lora"), TOK, ["hello"], max_new_tokens=3, chat=True)
    assert capsys.readouterr().out == want[0] + "\n"


def test_generate_cli_defaults_to_the_toy_base(tmp_path, monkeypatch, capsys):
    import minipeft.base
    base = tmp_path / "toy"
    tiny().save_pretrained(base)
    TOK.save(base / "tokenizer.model")
    monkeypatch.setattr(minipeft.base, "toy_base", lambda progress=True: base)  # not the shipped toy base
    assert generate_main(["--device", "cpu", "--max-new-tokens", "2", "2 + 2 ="]) == 0
    assert capsys.readouterr().out == generate_text(tiny(), TOK, ["2 + 2 ="], max_new_tokens=2)[0] + "\n"


# ----------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("typed,prompt", [
    (r"Question: 2 + 3?\nAnswer:", "Question: 2 + 3?\nAnswer:"),
    (r"a\tb", "a\tb"),
    (r"a\\nb", "a\\nb"),  # an escaped backslash stays one backslash, followed by n
    (r"C:\path\x", "C:\\path\\x"),  # other backslashes stay as they are
])
def test_the_cli_decodes_escapes_in_prompts(typed, prompt, tmp_path, monkeypatch, capsys):
    """A shell passes "...\\nAnswer:" as a backslash and an n; the prompt templates need a newline."""
    import minipeft.generate as gen
    import minipeft.toy
    base = tmp_path / "toy"
    tiny().save_pretrained(base)
    TOK.save(base / "tokenizer.model")
    monkeypatch.setattr(minipeft.toy, "toy_base", lambda progress=True: base)
    seen = []
    monkeypatch.setattr(gen, "generate_text", lambda model, tok, prompts, *a, **kw: seen.extend(prompts) or ["ok"])
    assert generate_main(["--device", "cpu", typed]) == 0
    assert seen == [prompt] and capsys.readouterr().out == "ok\n"
    assert "\\n, \\t and \\\\ in them become" in " ".join(gen.build_parser().format_help().split())  # --help says so


@pytest.mark.parametrize("mistake,named", [
    ("missing adapter", "nope: --adapter folder does not exist"),
    ("not an adapter", "empty: neither a run folder with adapter/"),
    ("missing checkpoint", "gone: checkpoint folder does not exist"),
    ("corrupt run config", "run/config.json: not valid JSON"),
])
def test_cli_mistakes_are_one_error_line_naming_the_file(mistake, named, tmp_path, capsys):
    """The same error style as finetune and evaluate: `error: ...` on stderr, exit status 1, no traceback."""
    base = tmp_path / "base"
    tiny().save_pretrained(base)
    TOK.save(base / "tokenizer.model")
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    flags = {"missing adapter": ["--checkpoint", str(base), "--adapter", str(tmp_path / "nope")],
             "not an adapter": ["--checkpoint", str(base), "--adapter", str(tmp_path / "empty")],
             "missing checkpoint": ["--checkpoint", str(tmp_path / "gone")],
             "corrupt run config": ["--adapter", str(tmp_path / "run")]}[mistake]
    assert generate_main([*flags, "--device", "cpu", "--max-new-tokens", "2", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1, err


def test_python_m_minipeft_generate_prints_no_runpy_warning():
    """minipeft/__init__.py imports generate lazily: runpy would warn that the module it is about to
    run was imported already ("found in sys.modules after import of package")."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "minipeft.generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage:" in done.stdout and done.stderr == "", done.stderr
    import minipeft
    from minipeft import generate_text as lazy
    from minipeft.generate import generate_text as real
    assert lazy is real is minipeft.generate_text
