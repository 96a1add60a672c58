"""The README's library snippet runs as it stands (the one ```python block after "Using the library
directly", on a tiny checkpoint in place of Llama-3.2-1B), and the figures docs/toy-results.md quotes are
the committed results: the compare tables and the toy multiple-choice figures."""
import json
import re
from pathlib import Path

import pytest

from minipeft import Tokenizer
from helpers import tiny

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOY_RESULTS = ROOT / "docs" / "toy-results.md"


def library_snippet() -> str:
    text = README.read_text()
    after = text[text.index("Using the library directly"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_library_snippet_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = library_snippet()
    assert '"~/models/Llama-3.2-1B"' in code and "import torch" in code
    base = tmp_path / "Llama-3.2-1B"
    tiny().save_pretrained(base)
    Tokenizer.byte_level().save(base / "tokenizer.model")
    monkeypatch.setenv("HOME", str(tmp_path))  # so "~/models/..." is ours
    (tmp_path / "models").mkdir()
    base.rename(tmp_path / "models" / "Llama-3.2-1B")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert "trainable params" in capsys.readouterr().out
    assert (tmp_path / "runs" / "my-lora-merged" / "model.safetensors").exists()


def test_compare_tables_are_the_committed_results_at_the_current_recipes():
    """docs/toy-results.md's full-compare table and claims table are the ones in results/toy-compare/ (the
    run that made them), and every row's rate is its method's toy recipe today: a recipe changed without
    rerunning `make compare` (and copying its tables) fails here."""
    from minipeft.compare import parse_entry
    from minipeft.recipes import recipe

    text, results = TOY_RESULTS.read_text(), ROOT / "results" / "toy-compare"
    for name in ("compare.md", "claims.md"):
        table = (results / name).read_text().split("\n\n")[0].strip()
        assert table in text, f"docs/toy-results.md lacks the table of results/toy-compare/{name}"
    lines = (results / "compare.md").read_text().split("\n\n")[0].splitlines()
    lr_column = [c.strip() for c in lines[0].strip("|").split("|")].index("lr")
    for line in lines[3:]:  # after the base row
        cells = [c.strip() for c in line.strip("|").split("|")]
        entry, lr = cells[0], float(cells[lr_column])
        assert lr == float(f"{recipe(parse_entry(entry)[0], 'toy').lr:.3g}"), (entry, lr)


@pytest.mark.parametrize("folder", ["toy-mc", "toy-arc"])
def test_toy_multiple_choice_figures_are_the_committed_results(folder):
    """docs/toy-results.md quotes each (IA)3++-comparison entry on the toy multiple-choice analogues as
    "name mean ± std% (per seed)": those are the numbers in results/<folder>/compare.json."""
    names = {"lora": "LoRA", "ia3": "(IA)³", "ia3pp": "(IA)³++", "ia3pp+use_l_o=false": "without l_o"}
    text = TOY_RESULTS.read_text()
    text = text[text.index("## The toy multiple-choice analogues"):text.index("## Sparse fine-tuning memory")]
    text = text.replace("\n", " ")
    saved = json.loads((ROOT / "results" / folder / "compare.json").read_text())
    for row in saved["rows"][1:]:  # [0] is the base model
        per_seed = ", ".join(f"{100 * r['accuracy']:.0f}" for r in sorted(saved["runs"], key=lambda r: r["seed"])
                             if r["label"] == row["method"])
        quoted = f"{names[row['method']]} {100 * row['accuracy']:.1f} ± {100 * row['accuracy_std']:.1f}% ({per_seed})"
        assert quoted in text.replace("% (per seed ", "% ("), (folder, quoted)
