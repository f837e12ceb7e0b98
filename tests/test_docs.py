"""
The commands in README.md and docs/*.md name real things. Every line of a ```bash, ```sh or ```shell
block is read as one or more commands (`&&`, `;` and `|` split them, a trailing backslash continues a
line, `# ...` is a comment, `[...]` marks an optional part, `...` and capitalised words such as N or DIR
are placeholders), and each must hold:

    python X.py ARGS       X.py exists at the top level or in bench/, and every --key is one of its
                           keys: the module's `config` (configurator.py), or for argparse scripts (bench/,
                           tokenizer.py) a flag of its --help; values obey the key's type and rule
    python train.py --rl=NAME (or --ppo=True, or a recipe whose `rl = NAME`)
                           NAME is a method, and the keys are the method's plus train.py's
    recipes/x.conf         the file exists, its keys are keys, its `rl` a method
    torchrun ... X.py      as python X.py
    make TARGET            a target of the Makefile
    ./run ARGS             each -x flag appears in run.c's usage text

And every script answers --help with exit status 0. The scripts run in this process (runpy), so the
whole module costs one import of torch.
"""

import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

import configurator

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, *sorted((ROOT / "reports").glob("*.md"))]  # pages whose relative links must resolve
SCRIPT_DIRS = ("", "bench/")
SCRIPTS = sorted(
    [p.name for p in ROOT.glob("*.py") if '__name__ == "__main__"' in p.read_text()]
    + [f"bench/{p.name}" for p in (ROOT / "bench").glob("*.py")]
)
POSITIONAL = {"tinystories.py": ("stage",), "export.py": ("output path",)}  # bare arguments besides recipes
PYTHON = ("python", "python3", ".venv/bin/python")
EXTERNAL = (  # programs that are not this project's: their arguments are not checked
    "cmake",
    "pip",
    "llama-completion",
    "llama-cli",
    "ollama",
    "wandb",
    "apt-get",
    "git",
    "cd",
    "export",
)
SEPARATORS = ("&&", "||", ";", "|")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$|\.\.\.")


# -----------------------------------------------------------------------------
# reading the docs


def shell_lines(text):
    """(line number, line) of every line in a ```bash, ```sh or ```shell block of a markdown text, a line
    ending in a backslash joined with the next."""
    out, fence, pending = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip() or "text"
            continue
        if stripped.startswith("```"):
            fence = None
            continue
        if fence not in ("bash", "sh", "shell"):
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + stripped)
        else:
            pending = (number, stripped)
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        if pending[1]:
            out.append(pending)
        pending = None
    return out


def commands(line):
    """The commands of one shell line: lists of words, comments, environment assignments and `time`
    dropped, [optional] brackets taken off."""
    words = [w.strip("[]") for w in shlex.split(line, comments=True)]
    out, current = [], []
    for word in words + [";"]:
        if word in SEPARATORS:
            while current and (re.match(r"^[A-Za-z_]\w*=", current[0]) or current[0] == "time"):
                current.pop(0)
            if current:
                out.append(current)
            current = []
        elif word:
            current.append(word)
    return out


def shown(path):
    """A page's path as the failures show it: from the repository's top, where it is inside."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def doc_commands(paths=DOCS):
    """(where, line, command words) of every command in the docs."""
    out = []
    for path in paths:
        for number, line in shell_lines(path.read_text()):
            for words in commands(line):
                out.append((f"{shown(path)}:{number}", line, words))
    return out


# -----------------------------------------------------------------------------
# what the code declares


def run_script(script, argv):
    """(exit status, stdout) of `python script *argv`, run in this process."""
    saved, out = sys.argv, io.StringIO()
    sys.argv = [str(ROOT / script), *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # a script that crashes on --help
        code = f"{type(e).__name__}: {e}"
    finally:
        sys.argv = saved
    return code, out.getvalue()


@lru_cache(maxsize=None)
def help_of(script, *argv):
    return run_script(script, [*argv, "--help"])


@lru_cache(maxsize=None)
def declared(script):
    """The config a script declares ({key: default or (default, rule)}), or None for an argparse script."""
    if script.startswith("bench/"):
        return None
    module = importlib.import_module(script.removesuffix(".py"))
    return getattr(module, "config", None)


@lru_cache(maxsize=None)
def argparse_flags(script):
    code, text = help_of(script)
    if code != 0:
        return None
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", text))


@lru_cache(maxsize=None)
def methods():
    import rl_train

    return tuple(rl_train.methods())


@lru_cache(maxsize=None)
def make_targets():
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)", line)
        if m:
            targets.update(t for t in m[1].split() if "$" not in t and "%" not in t)
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return targets


@lru_cache(maxsize=None)
def run_flags():
    return set(re.findall(r'"\s+(-\w) <', (ROOT / "run.c").read_text()))


# -----------------------------------------------------------------------------
# checking a command


def check_value(key, text, spec):
    """A problem with --key=text under the declared spec (a default or (default, rule)), or None."""
    if PLACEHOLDER.search(text):
        return None
    defaults, rules = configurator.split({key: spec})
    default = defaults[key]
    for alternative in text.split("|") if "|" in text and isinstance(spec, tuple) else [text]:
        try:
            value = configurator.parse_value(key, alternative, default)
            if key in rules:
                configurator.check(key, value, rules[key])
        except ValueError as e:
            return str(e)
    return None


def flags_and_bare(args):
    """(--key, value text) pairs and the bare arguments of a command's arguments."""
    flags, bare = [], []
    for arg in args:
        if arg in ("--help", "-h"):  # every script answers it (test_every_script_answers_help)
            continue
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            flags.append((key, text if eq else "True"))
        elif not PLACEHOLDER.search(arg):
            bare.append(arg)
    return flags, bare


def check_configured(script, args, config):
    """The problems of `python script args` for a script whose keys are `config` (configurator.py)."""
    problems = []
    flags, bare = flags_and_bare(args)
    recipes = [a for a in bare if a.endswith(configurator.RECIPE_SUFFIX)]
    bare = [a for a in bare if a not in recipes]
    assignments = list(flags)
    for recipe in recipes:
        try:
            assignments += [(key, text) for key, text, _ in configurator.read_recipe(str(ROOT / recipe))]
        except ValueError as e:
            problems.append(str(e))
    keys = dict(config)
    if script == "train.py":
        given = dict(assignments)
        method = given.get("rl") or ("ppo" if given.get("ppo") == "True" else "")
        if method and not PLACEHOLDER.search(method):
            if method not in methods():
                return problems + [f"--rl={method} is not a method (methods: {', '.join(methods())})"]
            keys.update(importlib.import_module(method).config)
        elif method:  # --rl=NAME: any method's keys
            for name in methods():
                keys.update(importlib.import_module(name).config)
    for key, text in assignments:
        if key not in keys:
            problems.append(f"--{key} is not a key of {script}")
        elif problem := check_value(key, text, keys[key]):
            problems.append(problem)
    expected = POSITIONAL.get(script, ())
    if len(bare) != len(expected):
        problems.append(f"{script} takes {len(expected)} bare argument(s) {expected}, got {bare}")
    elif script == "tinystories.py" and bare[0] not in stages():
        problems.append(f"{bare[0]} is not a stage of tinystories.py ({', '.join(stages())})")
    return problems


def stages():
    return importlib.import_module("tinystories").STAGES


def check_python(args):
    """The problems of `python args`."""
    if args[:2] == ["-m", "pytest"]:
        return [
            f"no test file {a}" for a in args[2:] if not a.startswith("-") and not (ROOT / a.split("::")[0]).exists()
        ]
    if not args or not args[0].endswith(".py"):
        return [f"expected a script after python, got {args[:1]}"]
    script, rest = args[0], args[1:]
    if not (ROOT / script).is_file() or not any(script == d + Path(script).name for d in SCRIPT_DIRS):
        return [f"no script {script} at the top level or in bench/"]
    config = declared(script)
    if config is not None:
        return check_configured(script, rest, config)
    known = argparse_flags(script)
    if known is None:
        return [f"{script} --help fails, so its flags cannot be checked"]
    flags, bare = flags_and_bare(rest)
    problems = [f"--{key} is not a flag of {script}" for key, _ in flags if f"--{key}" not in known]
    return problems + [f"{script} takes no bare argument, got {a!r}" for a in bare]


def check_run(args):
    """The problems of `./run args`: a flag (-x) that run.c's usage text does not list."""
    flags = [a for a in args if re.match(r"^-[A-Za-z]$", a) or (a.startswith("-") and not re.match(r"^-[\d.]", a))]
    return [
        f"./run has no flag {a} (run.c's usage: {', '.join(sorted(run_flags()))})"
        for a in flags
        if a not in run_flags()
    ]


def problems_of(words):
    """What is wrong with one command (a list of words): [] when it names only real things."""
    program, args = words[0], words[1:]
    if program in PYTHON:
        return check_python(args)
    if program == "torchrun":
        scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
        return check_python(args[scripts[0] :]) if scripts else ["torchrun without a script"]
    if program == "make":
        return [
            f"no make target {a}" for a in args if not a.startswith("-") and "=" not in a and a not in make_targets()
        ]
    if program == "./run":
        return check_run(args)
    if program in EXTERNAL:
        return []
    return [f"unknown program {program}: name one of this project's, or add it to EXTERNAL"]


def link_targets(path):
    """(link, file, anchor) of every relative markdown link in a page."""
    out = []
    for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"^[a-z]+:", link):
            continue
        file, _, anchor = link.partition("#")
        out.append((link, (path.parent / file).resolve() if file else path, anchor))
    return out


def anchors(path):
    """GitHub's anchors of a markdown page's headings."""
    out = set()
    for line in path.read_text().splitlines():
        if m := re.match(r"^#+\s+(.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-"))
    return out


# -----------------------------------------------------------------------------
# the docs as they are

DOC_COMMANDS = doc_commands()


@pytest.mark.parametrize("where, line, words", DOC_COMMANDS, ids=[w for w, _, _ in DOC_COMMANDS])
def test_every_command_in_the_docs_names_real_scripts_keys_and_targets(where, line, words):
    assert problems_of(words) == [], f"{where}: {line}"


def test_the_docs_hold_commands_for_every_page_and_readme_opens_with_make_demo_and_make_test():
    pages = {where.split(":")[0] for where, _, _ in DOC_COMMANDS}
    assert pages == {shown(p) for p in DOCS}, "a page without commands, or one not read"
    readme = [words for where, _, words in DOC_COMMANDS if where.startswith("README.md:")]
    assert readme[:2] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("page", LINKED, ids=[shown(p) for p in LINKED])
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    for link, file, anchor in link_targets(page):
        assert file.exists(), f"{shown(page)}: {link}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{shown(page)}: {link}: no such heading"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    code, text = help_of(script)
    assert code == 0 and text.strip(), (code, text[-500:])


@pytest.mark.parametrize("method", methods())
def test_every_rl_method_answers_help_through_train_py(method):
    code, text = help_of("train.py", f"--rl={method}")
    assert code == 0 and "--learning_rate=" in text, (code, text[-500:])


# -----------------------------------------------------------------------------
# the checks themselves, on a page written here

PAGE = """
Text, and a block in another language that is not read:

```python
python nothing.py --at=all
```

```bash
make demo   # a comment
python train.py --batch_size=32 \\
    --compile=True
OMP_NUM_THREADS=1 ./run out/model.bin -z data/tok512.bin -t 0.8 && python sample.py --num_samples=2
python export.py out/model.bin --checkpoint=out/ckpt.pt [--version=2]
python train.py --rl=grpo --group_size=4 --preset=15M
```
"""


def test_shell_blocks_are_read_line_by_line_with_continuations_comments_and_environment():
    lines = shell_lines(PAGE)
    assert [n for n, _ in lines] == [9, 10, 12, 13, 14]
    assert [words for _, line in lines for words in commands(line)] == [
        ["make", "demo"],
        ["python", "train.py", "--batch_size=32", "--compile=True"],
        ["./run", "out/model.bin", "-z", "data/tok512.bin", "-t", "0.8"],
        ["python", "sample.py", "--num_samples=2"],
        ["python", "export.py", "out/model.bin", "--checkpoint=out/ckpt.pt", "--version=2"],
        ["python", "train.py", "--rl=grpo", "--group_size=4", "--preset=15M"],
    ]
    assert all(problems_of(words) == [] for _, line in lines for words in commands(line))


@pytest.mark.parametrize(
    "line, problem",
    [
        ("python nosuch.py --x=1", "no script nosuch.py"),
        ("python train.py --no_such_key=1", "--no_such_key is not a key of train.py"),
        ("python train.py --batch_size=many", "--batch_size expects int"),
        ("python train.py --batch_size=0", "must be > 0"),
        ("python train.py --rl=nosuch", "--rl=nosuch is not a method"),
        ("python train.py --rl=dpo --group_size=4", "--group_size is not a key of train.py"),
        ("python train.py recipes/nosuch.conf", "no recipe file"),
        ("python tinystories.py tokenize --vocab_size=512", "tokenize is not a stage"),
        ("python export.py --checkpoint=out/ckpt.pt", "takes 1 bare argument"),
        ("python export.py out/m.bin --version=3", "must be one of -1, 0, 1, 2"),
        ("python bench/run_speed.py --no_such_flag=1", "--no_such_flag is not a flag of bench/run_speed.py"),
        ("torchrun --nproc_per_node=2 train.py --nosuch", "--nosuch is not a key of train.py"),
        ("make nosuch", "no make target nosuch"),
        ("./run out/model.bin -q 1", "./run has no flag -q"),
        ("frobnicate --all", "unknown program frobnicate"),
    ],
)
def test_a_doc_naming_a_missing_script_key_value_target_or_flag_fails_the_check(line, problem, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# A page\n\n```bash\nmake demo\n{line}\n```\n")
    found = [problems_of(words) for _, _, words in doc_commands([page.resolve()]) if words != ["make", "demo"]]
    assert len(found) == 1 and any(problem in p for p in found[0]), found
