"""README.md and docs/*.md say true things: every command in their fenced shell blocks parses as written from the
repository root of a fresh clone, and every path it reads is there (in the repo, in ../shared/data, or written by a
command above it on the same page); the cheap ones run (--help, the similarity demo, the Python blocks); the README
opens with the file map, which names every module and only modules that exist; each promise points at tests that
exist; the losses table lists the losses train.py knows."""

import argparse
import ast
import importlib.util
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import MODEL_ID, REPO, SHARED_DATA, child_env

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell")
SCRIPTS = ("train.py", "eval.py", "mine.py", "recipes/split_pairs.py")
# What each tool reads (checked to exist) and writes (folders it creates; files whose folder must exist already).
READS = {"eval.py": ("model", "data"), "mine.py": ("model", "data", "corpus"), "recipes/split_pairs.py": ("data",),
         "minilm similarity": ("model",), "minilm encode": ("input", "model"), "minilm search": ("dir", "model")}
WRITES_FOLDER = {"train.py": "out", "recipes/split_pairs.py": "out", "minilm encode": "out"}
WRITES_FILE = {"eval.py": "json", "mine.py": "out"}


@dataclass
class Command:
    page: Path
    line: int
    argv: list
    env: dict
    made_before: list = field(default_factory=list)  # (path, what) the commands above it write: see outputs()

    def __str__(self):
        return f"{self.page.relative_to(REPO)}:{self.line}: {shlex.join(self.argv)}"


def fenced_blocks(page: Path):
    """-> [(language, line of the block's first content line, its lines)]."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if language is None:
                language, start, lines = line[3:].strip() or "text", number + 1, []
            else:
                blocks.append((language, start, lines))
                language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{page}: a fenced block is never closed"
    return blocks


def page_commands(page: Path) -> list:
    """The shell commands of a page in order; `a && b` is two commands, `VAR=value` a leading environment."""
    commands, made = [], []
    for language, start, lines in fenced_blocks(page):
        if language not in SHELL:
            continue
        index = 0
        while index < len(lines):
            number, text = start + index, lines[index]
            while text.endswith("\\"):
                index += 1
                text = text[:-1] + lines[index]
            index += 1
            words = shlex.split(text, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                argv, words = words[:cut], words[cut + 1:]
                env = {}
                while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                    name, value = argv.pop(0).split("=", 1)
                    env[name] = value
                command = Command(page, number, argv, env, list(made))
                commands.append(command)
                made += outputs(command)
    return commands


def flag_value(argv: list, flag: str):
    return argv[argv.index(flag) + 1] if flag in argv else None


def outputs(command: Command) -> list:
    """(path, what) a command writes, read from its words alone so that later commands may name them: "empty" for
    a folder made by mkdir (a file may go there), "written" for what a tool writes (a later command may read it)."""
    if command.argv[:2] == ["mkdir", "-p"]:
        return [(path, "empty") for path in command.argv[2:]]
    return [(value, "written") for value in (flag_value(command.argv, "--out"), flag_value(command.argv, "--json"))
            if value]


COMMANDS = [command for page in PAGES for command in page_commands(page)]


# --- checking one command --------------------------------------------------------------------------------------

class Parsed(BaseException):
    """Raised right after a script's argparse parse, so that nothing after it (loading, training) runs."""

    def __init__(self, namespace):
        super().__init__()
        self.namespace = namespace


def script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(main, argv: list, monkeypatch, capsys) -> argparse.Namespace:
    """Run main(argv) until its parser has parsed argv; -> the namespace (pytest fails with the parser's message)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        code = main(argv)
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as exit:
        code = exit.code
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    out, err = capsys.readouterr()
    pytest.fail(f"does not parse (exit {code}): {err.strip() or out.strip()}")


def parse_train(argv: list, capsys):
    import train

    try:
        args, _ = train.parse_args(argv)
        if not args.resume:  # a resumed run's flags come from its checkpoint
            train.check_args(args)
    except train.UsageError as error:
        pytest.fail(f"does not parse: {error}")
    return args


def check_reads(command: Command, values: list) -> None:
    for value in values:
        if value is None or value == MODEL_ID:
            continue
        assert not Path(value).is_absolute(), f"{command}: {value} is not on a fresh clone"
        if any(value == made or value.startswith(made.rstrip("/") + "/")
               for made, what in command.made_before if what == "written"):
            continue
        if value.startswith("../shared/data"):
            if not SHARED_DATA.is_dir():
                pytest.skip(f"{SHARED_DATA} is absent: cannot check {value}")
        assert (REPO / value).exists(), f"{command}: {value} is neither in the repo nor written above it"


def check_writes(command: Command, folder=None, file=None) -> None:
    for value in (folder, file):
        if value is not None:
            assert value.startswith("runs/"), f"{command}: {value}: examples write under runs/ (git ignores it)"
    if file is not None:
        parent = str(Path(file).parent)
        assert (REPO / parent).is_dir() or parent in [made for made, _ in command.made_before], \
            f"{command}: the folder of {file} does not exist on a fresh clone (mkdir -p it first)"


def check_python(command: Command, argv: list, monkeypatch, capsys) -> None:
    """argv: what follows `python` (or torchrun's options). A --help command is run, not parsed (below)."""
    if argv[:2] == ["-m", "minilm"]:
        if "--help" in argv:
            return
        from minilm import __main__ as cli

        args = parse(cli.main, argv[2:], monkeypatch, capsys)
        tool = f"minilm {args.command}"
        check_reads(command, [getattr(args, name) for name in READS[tool]])
        check_writes(command, folder=getattr(args, WRITES_FOLDER.get(tool, "-"), None))
        return
    assert argv and argv[0] in SCRIPTS, f"{command}: no check for this command: add one to tests/test_docs.py"
    tool, rest = argv[0], argv[1:]
    if "--help" in rest:
        return
    if tool == "train.py":
        args = parse_train(rest, capsys)
        check_reads(command, [args.recipe, args.model, *(args.data or []), args.eval_data])
        if args.resume:
            check_reads(command, [args.out])
        else:
            check_writes(command, folder=args.out)
        return
    args = parse(script(tool).main, rest, monkeypatch, capsys)
    check_reads(command, [getattr(args, name) for name in READS[tool]])
    check_writes(command, folder=getattr(args, WRITES_FOLDER.get(tool, "-"), None),
                 file=getattr(args, WRITES_FILE.get(tool, "-"), None))


def torchrun_target(command: Command) -> list:
    """torchrun's own options (--name=value) dropped: -> the script or -m module and its arguments."""
    argv = command.argv[1:]
    while argv and argv[0].startswith("--"):
        assert "=" in argv[0], f"{command}: write torchrun's options as --name=value"
        argv = argv[1:]
    return argv


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_documented_command_parses_and_names_real_paths(command, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the commands run from the repository root
    for name, value in command.env.items():
        monkeypatch.setenv(name, value)
    program, argv = command.argv[0], command.argv[1:]
    if program in ("./run.sh", "./test.sh"):
        assert (REPO / program).is_file() and (REPO / program).stat().st_mode & 0o111, command
        if argv:
            assert argv == ["--help"], f"{command}: only --help is checked; say what the rest should do"
    elif program == "mkdir":
        assert argv[0] == "-p" and all(path.startswith("runs") for path in argv[1:]), command
    elif program == "python3":
        assert argv == ["-m", "venv", ".venv"], f"{command}: only making .venv is checked"
    elif program == ".venv/bin/pip":  # torch put in before setup.sh: the version setup.sh pins
        pinned = re.search(r"pip install [^\n]*\b(torch==[\w.]+)", (REPO / "scripts/setup.sh").read_text()).group(1)
        assert argv[:2] == ["install", pinned], f"{command}: setup.sh installs {pinned}"
    elif program == "python":
        check_python(command, argv, monkeypatch, capsys)
    elif program == "torchrun":
        check_python(command, torchrun_target(command), monkeypatch, capsys)
    else:
        pytest.fail(f"{command}: no check for {program!r}: add one to tests/test_docs.py")


# --- running the cheap ones ------------------------------------------------------------------------------------

def cheap(command: Command) -> bool:
    """--help, and python -m minilm's similarity demo (a model load and a handful of sentences)."""
    argv = command.argv
    demo = argv[:3] == ["python", "-m", "minilm"] and argv[3:4] not in (["encode"], ["search"])
    return "--help" in argv or demo


@pytest.mark.parametrize("command", [command for command in COMMANDS if cheap(command)], ids=str)
def test_the_cheap_commands_run_as_written(command, monkeypatch, capsys):
    """--help prints the usage, and the similarity demo prints its matrix, from the repository root."""
    monkeypatch.chdir(REPO)
    if command.argv[0].startswith("./"):
        result = subprocess.run(["bash", *command.argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                                env=child_env(**command.env))
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        for name, value in command.env.items():
            monkeypatch.setenv(name, value)
        if command.argv[1:3] == ["-m", "minilm"]:
            from minilm.__main__ import main
            argv = command.argv[3:]
        else:
            main, argv = script(command.argv[1]).main, command.argv[2:]
        try:
            code = main(argv) or 0
        except SystemExit as exit:
            code = exit.code
        out, err = capsys.readouterr()
    assert code == 0, f"{command}: exit {code}: {err.strip()[-2000:]}"
    if "--help" in command.argv:
        assert "usage:" in out or "bash scripts/setup.sh" in out, out[:500]
    else:
        assert "cosine similarity" in out and "[1]" in out, out


def test_the_python_blocks_run(tmp_path, monkeypatch, capsys):
    """Each ```python block, as a fresh script in an empty folder (what it saves lands there)."""
    blocks = [(page, start, "\n".join(lines)) for page in PAGES for language, start, lines in fenced_blocks(page)
              if language == "python"]
    assert blocks
    monkeypatch.chdir(tmp_path)
    for page, start, code in blocks:
        exec(compile(code, f"{page}:{start}", "exec"), {"__name__": "__main__"})
    assert "tensor(" in capsys.readouterr().out  # the similarity matrices were printed


# --- what the pages say about the code -------------------------------------------------------------------------

def file_map() -> list:
    """The README's first ```text block: a folder line, then its files indented; a line's names (comma-separated)
    come before two spaces and a description. -> paths relative to the repo."""
    language, start, lines = next(block for block in fenced_blocks(README) if block[0] == "text")
    assert start <= 60, "the file map starts within the README's first 60 lines"
    paths, folder = [], ""
    for line in lines:
        names = re.split(r"\s{2,}", line.strip())[0]
        if not line.startswith(" "):
            folder = names if names.endswith("/") else ""
            paths += [name.strip() for name in names.split(",")]
        else:
            paths += [folder + name.strip() for name in names.split(",")]
    return paths


def test_readme_is_short_and_opens_with_the_map_and_the_packed_layout():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md is {len(lines)} lines; move detail to docs/"
    opening = "\n".join(lines[:60])
    assert "./run.sh" in opening and "./test.sh" in opening
    assert "packed layout" in opening and "cu_seqlens" in opening
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in "\n".join(lines), f"README.md does not link docs/{page.name}"


def test_the_file_map_names_every_module_and_only_files_that_exist():
    named = file_map()
    missing = [path for path in named if not (REPO / path).exists()]
    assert not missing, f"the README's file map names files that do not exist: {missing}"
    modules = [str(path.relative_to(REPO)) for folder in ("minilm", "losses") for path in (REPO / folder).glob("*.py")
               if path.name != "__init__.py"] + [path.name for path in REPO.glob("*.py")]
    unnamed = sorted(set(modules) - set(named))
    assert not unnamed, f"the README's file map leaves out {unnamed}"


def test_every_relative_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: broken link {target}"


def test_each_promise_points_at_tests_that_exist():
    text = README.read_text(encoding="utf-8")
    section = text.split("## What minilm will never do", 1)[1].split("\n## ", 1)[0]
    promises = re.split(r"\n- ", "\n" + section.strip())[1:]
    assert len(promises) >= 3, promises
    for promise in promises:
        pointers = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", promise)
        assert pointers, f"no test holds this promise: {promise[:80]}"
        for path, name in pointers:
            tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
            assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, \
                f"{path}::{name} does not exist"


def test_the_losses_table_lists_the_losses_train_py_knows():
    from losses import LOSSES

    text = (REPO / "docs" / "losses.md").read_text(encoding="utf-8")
    assert set(re.findall(r"^\| `([a-z][a-z-]*)` \|", text, flags=re.M)) == set(LOSSES)
