"""The package layout issue's promises: methods live in minipeft/methods/, the table of methods is the
only thing in its __init__, imports go one way (adapters -> hf_peft -> methods -> peft), and every
method config selects modules with `targets`."""

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

import minipeft
from minipeft.adapters import apply_method, method_module
from minipeft.methods import METHODS
from helpers import tiny

PACKAGE = Path(minipeft.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The minipeft modules a file imports, resolved to dotted names."""
    tree, here = ast.parse(path.read_text()), path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(module)
                found.add(f"{module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("minipeft")}


def test_every_method_module_lives_in_methods_and_is_in_the_table():
    files = sorted(p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem != "__init__")
    assert sorted(m.rsplit(".", 1)[-1] for m, _ in METHODS.values()) == files
    for name, (module_name, _) in METHODS.items():
        assert module_name == f"minipeft.methods.{name}"
        module, config_cls = method_module(name)
        assert config_cls.method == name and callable(module.apply)
    assert not any((PACKAGE / f"{name}.py").exists() for name in METHODS)  # no copy left at the top


def test_methods_init_holds_only_the_table():
    tree = ast.parse((PACKAGE / "methods" / "__init__.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.Assign) and body[0].targets[0].id == "METHODS"


def test_no_import_circle_between_adapters_and_hf_peft():
    assert not any(m.startswith("minipeft.adapters") for m in imported_modules(PACKAGE / "hf_peft.py"))
    for path in (PACKAGE / "methods").glob("*.py"):  # methods sit below both saving modules
        bad = {m for m in imported_modules(path) if m.startswith(("minipeft.adapters", "minipeft.hf_peft"))}
        assert not bad, f"{path.name} imports {bad}"
    assert not any(m.startswith(("minipeft.adapters", "minipeft.hf_peft", "minipeft.methods"))
                   for m in imported_modules(PACKAGE / "peft.py"))


def test_top_level_exports_still_work():
    from minipeft import IA3Config, Llama, LoRAConfig, apply_method, lora, trainable_report  # noqa: F401
    assert minipeft.lora is importlib.import_module("minipeft.methods.lora")


def test_every_config_that_selects_modules_calls_the_field_targets():
    for name in METHODS:
        _, config_cls = method_module(name)
        names = {f.name for f in dataclasses.fields(config_cls)}
        assert not names & {"target_modules", "linear_targets", "feedforward_modules"}, name
        selects = [n for n in names if "target" in n or "modules" in n]
        assert all(n == "targets" or n.endswith("_targets") for n in selects), (name, selects)


@pytest.mark.parametrize("method,field,ours", [
    ("lora", "target_modules", "targets"), ("lora", "lora_alpha", "alpha"), ("dora", "lora_dropout", "dropout"),
    ("ia3", "target_modules", "targets"), ("ia3", "feedforward_modules", "feedforward_targets"),
])
def test_hugging_face_field_names_get_a_pointer_to_ours(method, field, ours):
    with pytest.raises(TypeError, match=f"'{field}' is Hugging Face PEFT's name, minipeft's is '{ours}'"):
        apply_method(tiny(), method, **{field: ("q_proj",)})


# The package's layers, bottom up: a module may import modules of its own layer or below, never above,
# and no import (at the top or inside a function) closes a circle. The job files (finetune, evaluate,
# compare, ...) load their model through base.py and their data through tasks.py, never through each other.
LAYERS = [
    ("the files", {"safetensors_io", "meta_layout", "tokenizer", "loss", "sparse_attention"}),
    ("the model", {"masks", "llama", "quant"}),
    ("PEFT", {"peft", "methods", "hf_peft", "adapters"}),
    ("data, tasks and the base model", {"data", "tasks", "base", "recipes"}),
    ("scoring", {"scoring"}),
    ("the toy base, run folders and plots", {"toy", "runs", "plots"}),
    ("training", {"finetune", "distributed"}),
    ("the job's command lines and the labs", {"evaluate", "compare", "generate", "export", "grade", "lab",
                                              "lm_eval_model"}),
]


def module_graph() -> dict[str, set[str]]:
    """{module: the minipeft modules it imports}, dotted names relative to the package; a package's
    modules (methods.lora, lab.lab02) are counted as the package (methods, lab)."""
    files = {p: ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    files = {p: name.removesuffix(".__init__") for p, name in files.items() if name != "__init__"}
    top = lambda name: name.split(".")[0]
    graph = {}
    for path, name in files.items():
        found = set()
        for dotted in imported_modules(path):
            parts = dotted.split(".")[1:]  # without "minipeft"
            if parts:
                found.add(top(".".join(parts)))
        graph.setdefault(top(name), set()).update(found - {top(name)})
    return graph


def test_no_import_circle_in_the_package():
    graph, state, path = module_graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_go_down_the_layers():
    level = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
    graph = module_graph()
    assert set(graph) <= set(level), f"modules missing from LAYERS: {sorted(set(graph) - set(level))}"
    for module, imports in graph.items():
        for other in imports:
            assert level[other] <= level[module], (
                f"minipeft/{module} ({LAYERS[level[module]][0]}) imports minipeft/{other}, a higher layer "
                f"({LAYERS[level[other]][0]})")
