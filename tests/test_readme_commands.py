"""Every command in a ```bash block of README.md and docs/*.md runs as written, in a fresh shell.

Two kinds of check:

* run: README.md's commands that need no download, weights or GPU run one by one, in order, with
  `bash -c` in a fresh copy of the repository, with no virtual environment active (VIRTUAL_ENV unset,
  .venv/bin off PATH), exactly as written but for small step counts added to their flags (SMALL);
* static, for every command of README.md and docs/*.md: a make target must exist (`make -n` prints
  what it would run, and that is checked in turn), a `.venv/bin/python -m minipeft.X` or script's
  flags must parse with its own argparse parser (finetune's `--set` fields too), a path into the
  repository must exist, and a run folder given to --adapter / --resume / RUN= / ADAPTER= must be
  one that finetune makes (`runs/toy/lora`, not `runs/lora`).

The prose follows the same rule: no bare `python -m ...` (it fails with "No module named 'torch'"
unless a virtual environment is active).
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from minipeft.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = ".venv/bin/python"

# README commands that cannot run in a test, and why; they get the static check only
CANNOT_RUN = {"make install": "installs packages", "make test": "is this test suite", "make data": "downloads",
              "~/models": "needs Llama weights", ".venv/bin/pip": "installs packages", ".venv/bin/hf": "downloads",
              ".venv/bin/jupyter": "starts a server"}
# flags added to a command that runs, so that it takes seconds: (command prefix, flags)
SMALL = [("make finetune", "--max-steps 2 --limit 32 --eval-limit 2 --max-new-tokens 8 --no-baseline"),
         ("make resume", ""),  # the settings come from the run folder
         ("make evaluate", "--limit 2 --max-new-tokens 8"),
         ("make compare", "--methods lora --seeds 0 --steps 2 --eval-limit 2 --max-new-tokens 8 --jobs 1"),
         (f"{PYTHON} -m minipeft.generate", "--max-new-tokens 8"),
         (f"{PYTHON} -m minipeft.export", "")]
SLOW = ("make compare", "METHOD=", "--overwrite")  # more runs of finetune: only under `make test-slow`
EXTERNAL = (".venv/bin/pip", ".venv/bin/hf", ".venv/bin/jupyter")  # programs minipeft does not own
REPO_DIRS = ("bench", "data", "docs", "minipeft", "notebooks", "results", "scripts", "tests")
DOWNLOADED = ("data/gsm8k", "data/mmlu", "data/arc_challenge", "data/dolly", "data/cache")  # made by `make data`


# ----------------------------------------------------------------------------- reading the pages

def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M)


def without_comment(line: str) -> str:
    """The line up to its first `#` outside quotes that starts a word (a shell comment)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def block_commands(block: str) -> list[str]:
    """The block's commands as written: continuation lines joined, comments and blank lines dropped,
    `a && b` split in two; a loop's first value stands for its variable (the body is checked once)."""
    names, commands = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        line = without_comment(line).strip()
        words = shlex.split(line)
        if not words or words == ["done"]:
            continue
        if words[0] == "for":  # for X in a b; do  ->  X=a
            names[words[1]] = words[3].rstrip(";")
        elif len(words) == 1 and re.fullmatch(r"\w+=\S+", words[0]):  # CKPT=~/models/...
            key, value = words[0].split("=", 1)
            names[key] = value
        else:
            for key, value in names.items():
                line = re.sub(rf"\${{?{key}\b}}?", value, line)
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def all_commands() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for block in bash_blocks(page)
            for cmd in block_commands(block)]


# ----------------------------------------------------------------------------- the static check

class Parsed(Exception):
    """Raised by the patched parse_args: the command line parsed, nothing ran."""


def parse_with_its_parser(target: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run a module's (minipeft.X) or script's (path.py) __main__ with sys.argv = argv until its own
    parser has parsed it; argparse's refusal (exit 2) fails the test."""
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))
    with monkeypatch.context() as m, warnings.catch_warnings():
        # runpy warns that this process imported the module already: harmless for parsing a command line
        warnings.filterwarnings("ignore", "'minipeft.", RuntimeWarning)
        m.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        m.setattr(sys, "argv", [target, *argv])
        try:
            if target.endswith(".py"):
                m.syspath_prepend(str((ROOT / target).parent))  # as `python path.py` does
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__")
        except Parsed as done:
            return done.args[0]
        except SystemExit as e:  # argparse's error (exit 2), or --help (exit 0)
            assert not e.code, f"{target} {' '.join(argv)}: its parser refused it (exit {e.code})"
            return argparse.Namespace()
    raise AssertionError(f"{target} never parsed its command line")


def check_paths(words: list[str]) -> None:
    for word in words:
        path = word.split("=", 1)[-1]
        first = path.split("/")[0]
        if "/" in path and first in REPO_DIRS and not path.startswith(DOWNLOADED) and "$" not in path:
            assert list(ROOT.glob(path.rstrip("/"))), f"{path}: no such file or folder in the repository"


def looks_like_a_run(path: str, made: set[str]) -> bool:
    """A run folder finetune makes here (--out/RUN of an earlier command), or its default layout:
    runs/<base>/[<task>/]<method>[-...]."""
    parts = path.rstrip("/").split("/")
    return path.rstrip("/") in made or (
        parts[0] == "runs" and len(parts) in (3, 4) and parts[-1].split("-")[0] in METHODS)


def check_python(words: list[str], made: set[str], monkeypatch) -> None:
    if words[0] == "-c":
        return
    if words[0] == "-m":
        module, argv = words[1], words[2:]
        if module == "pytest":
            return check_paths(argv)
        if not module.startswith("minipeft."):  # pip, ipykernel
            return
        args = parse_with_its_parser(module, argv, monkeypatch)
    else:
        script, argv = words[0], words[1:]
        assert (ROOT / script).is_file(), f"{script}: no such script"
        args = parse_with_its_parser(script, argv, monkeypatch)
    check_paths(argv)
    if words[:2] == ["-m", "minipeft.finetune"] and getattr(args, "method", None):
        from minipeft.runs import config_from_args
        if args.resume:
            assert looks_like_a_run(args.resume, made), f"--resume {args.resume}: not a run folder finetune makes"
        elif args.method_args != ["help"]:
            made.add(config_from_args(args).out)  # also checks the --set fields and values
    for flag in ("adapter",):
        value = getattr(args, flag, None)
        if value and value.startswith("runs/"):
            assert looks_like_a_run(value, made), f"--{flag} {value}: not a run folder finetune makes"


def without_prefixes(words: list[str]) -> list[str]:
    """The command without `NAME=value` settings and the wrappers `/usr/bin/time -v` and `nice -n N`."""
    while words:
        if re.fullmatch(r"\w+=\S*", words[0]):
            words = words[1:]
        elif words[:2] == ["/usr/bin/time", "-v"]:
            words = words[2:]
        elif words[:2] == ["nice", "-n"]:
            words = words[3:]
        else:
            return words
    return words


def check_command(command: str, made: set[str], monkeypatch) -> None:
    words = without_prefixes(shlex.split(command))
    assert words, command
    if words[0] == "make":
        dry = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"{command}: {dry.stderr.strip()}"
        for line in dry.stdout.replace("\\\n", " ").splitlines():
            if line.startswith(PYTHON + " "):
                check_python(shlex.split(without_comment(line))[1:], made, monkeypatch)
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key in ("RUN", "ADAPTER") and value.startswith("runs/"):
                assert looks_like_a_run(value, made), f"{word}: not a run folder finetune makes"
        return check_paths(words[1:])
    if words[0] == PYTHON:
        return check_python(words[1:], made, monkeypatch)
    assert words[0] in EXTERNAL, f"{command}: neither a make target nor {PYTHON} (nor one of {EXTERNAL})"
    check_paths(words[1:])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_names_a_target_module_flag_and_path_that_exist(page, monkeypatch, capsys):
    made: set[str] = set()
    for block in bash_blocks(page):
        for command in block_commands(block):
            try:
                check_command(command, made, monkeypatch)
            except AssertionError as e:
                raise AssertionError(f"{page.name}: {command}\n{e}\n{capsys.readouterr().err[-500:]}") from None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_prose_names_commands_that_run_in_a_fresh_shell(page):
    """No bare `python ...` (without .venv active it fails: No module named 'torch'), no issue
    numbers, no run folder that finetune does not make."""
    text = page.read_text()
    bare = [c for c in re.findall(r"(?<![\w/.-])python3?\s+(?:-m\s+\S+|scripts/\S+|bench/\S+)", text)
            if not c.startswith("python3 scripts/gpu_check.py")]  # the GPU machine's system python (gpu.md)
    assert not bare, f"{page.name}: write {PYTHON} (or a make target) for {bare}"
    assert not re.search(r"\bissues?\s*#?\d", text, re.I), f"{page.name}: names an issue number"
    assert not re.search(r"runs/lora\b", text), f"{page.name}: runs/lora is not a run folder (runs/toy/lora is)"


# ----------------------------------------------------------------------------- running the README's commands

def fresh_shell_env() -> dict:
    """The environment of a new terminal: no virtual environment active, one thread (a shared CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith(("MAKE", "MFLAGS", "PYTEST"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return dict(env, OMP_NUM_THREADS="1")


def with_small_steps(command: str) -> str:
    """The command with SMALL's flags for it: inside ARGS="..." for make, at the end otherwise."""
    flags = next((f for prefix, f in SMALL if command.startswith(prefix)), None)
    assert flags is not None, f"{command}: add its small-step flags to SMALL (or CANNOT_RUN)"
    if not flags:
        return command
    if not command.startswith("make"):
        return f"{command} {flags}"
    found = re.search(r"ARGS=(\"[^\"]*\"|'[^']*'|\S+)", command)
    if not found:
        return f'{command} ARGS="{flags}"'
    return command.replace(found.group(0), f'ARGS="{shlex.split(found.group(1))[0]} {flags}"')


def runnable_readme_commands() -> list:
    found = [cmd for page, cmd in all_commands() if page == "README.md"
             and not any(marker in cmd for marker in CANNOT_RUN)]
    return [pytest.param(cmd, id=cmd[:60], marks=[pytest.mark.slow] if any(s in cmd for s in SLOW) else [])
            for cmd in found if cmd != "make finetune"]  # the quick start runs in the fixture


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, str]:
    """A fresh copy of the repository (its .venv linked) in which the quick start, `make finetune`, ran;
    and what that printed."""
    dest = tmp_path_factory.mktemp("clone") / "minipeft"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode == 0:  # what a clone holds, with this checkout's uncommitted edits
        for name in listed.stdout.splitlines():
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # not a git checkout
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "merged", "__pycache__", ".pytest_cache", "*.egg-info", "cache"))
    (dest / ".venv").symlink_to(ROOT / ".venv")
    done = run_in(dest, with_small_steps("make finetune"))
    return dest, done.stdout


def run_in(folder: Path, command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", command], cwd=folder, env=fresh_shell_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def test_the_quick_start_runs_and_prints_its_run_folder_first_and_last(clone):
    assert "make finetune" in [cmd for _, cmd in all_commands()[:4]], "the quick start is make finetune"
    lines = [line for line in clone[1].splitlines() if not line.startswith((".venv", "  "))]
    assert lines[0].startswith("recipe: lora on toy: lr 0.01 ") and lines[1] == "run folder: runs/toy/lora"
    assert lines[-1].startswith("run folder: runs/toy/lora (summary.json")
    assert (clone[0] / "runs" / "toy" / "lora" / "summary.json").is_file()


@pytest.mark.parametrize("command", runnable_readme_commands())
def test_readme_command_runs_as_written_in_a_fresh_shell(clone, command):
    run_in(clone[0], with_small_steps(command))


@pytest.mark.slow
def test_make_finetune_can_resume_with_the_flags_it_adds(clone):
    """`make finetune ARGS="--resume RUN"` passes --method too: equal to the run's, so it resumes."""
    done = run_in(clone[0], 'make finetune ARGS="--resume runs/toy/lora"')
    assert "run folder: runs/toy/lora (resuming)" in done.stdout
