"""The README's library snippet runs as it stands (issue 12: it lacked `import torch`): the one
```python block after "Using the library directly", on a tiny checkpoint in place of Llama-3.2-1B."""
import re
from pathlib import Path

from minipeft import Tokenizer
from helpers import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


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
