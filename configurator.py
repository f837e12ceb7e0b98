"""
The command line of every script, as in nanoGPT and llama2.c: plain defaults, each overridable
as `--key=value`, and recipe files that hold a run's settings:

    python train.py --batch_size=32 --compile=False
    python train.py recipes/length_ppo.conf --max_iters=30   # the recipe, then the flags
    python train.py --help                                   # the keys, their defaults and rules

A script declares its keys as a dict. A default may carry the rule its values obey, as
(default, rule); the rule is one of
    "> 0", ">= 0", "< 1", "<= 1"   a comparison
    "[0, 1]", "(0, 1]", "[1, 4096)"   an interval
    "k1 | k3"                       the choices
and a value that breaks it is a one-line error naming the key, the value and the rule, before
any work starts. A recipe file is `key = value` lines (# comments; values as on the command
line, never executed). Unknown keys and wrongly typed values are one-line errors too, where
nanoGPT's exec-based configurator ignores or crashes.
"""

import ast
import os
import re
import sys

RECIPE_SUFFIX = ".conf"
COMPARISON = re.compile(r"^(>=|<=|>|<) ?(-?[\d.e+-]+)$")
INTERVAL = re.compile(r"^([\[(]) ?(-?[\d.e+-]+), ?(-?[\d.e+-]+) ?([\])])$")


def split(config):
    """A declared config -> its defaults {key: value} and its rules {key: rule}."""
    defaults = {k: v[0] if isinstance(v, tuple) else v for k, v in config.items()}
    return defaults, {k: v[1] for k, v in config.items() if isinstance(v, tuple)}


def parse_value(key, text, default):
    """The text of --key=text as the type of the key's default."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string, e.g. --device=cpu
    if default is None or isinstance(default, str):
        return value if default is None else text
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"--{key} expects True or False, got {text!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ValueError(f"--{key} expects {type(default).__name__}, got {text!r}")
    return value


def satisfies(value, rule):
    """Whether value obeys rule (the notation of the module's docstring)."""
    if m := COMPARISON.match(rule):
        op, bound = m[1], float(m[2])
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    if m := INTERVAL.match(rule):
        lo, hi = float(m[2]), float(m[3])
        return (lo <= value if m[1] == "[" else lo < value) and (value <= hi if m[4] == "]" else value < hi)
    return str(value) in [c.strip() for c in rule.split("|")]


def check(key, value, rule):
    """A ValueError naming the key, the value and the rule, if the value breaks it."""
    if satisfies(value, rule):
        return
    choices = [c.strip() for c in rule.split("|")]
    allowed = f"one of {', '.join(choices)}" if len(choices) > 1 else choices[0]
    if INTERVAL.match(rule):
        allowed = f"in {rule}"
    raise ValueError(f"--{key}={value}: must be {allowed}")


def read_recipe(path):
    """The (key, text, where) assignments of a recipe file."""
    if not os.path.isfile(path):
        raise ValueError(f"no recipe file {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, eq, text = line.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"{path}:{lineno}: expected key = value, got {line!r}")
            out.append((key.strip(), text.strip(), f"{path}:{lineno}"))
    return out


def assignments(argv, positional=()):
    """argv -> the (key, text, where) assignments in order, recipe files expanded where they stand,
    and the values of the positional arguments named in `positional`. A bare --flag is --flag=True."""
    out, values = [], {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            out.append((key, text if eq else "True", "the command line"))
        elif arg.endswith(RECIPE_SUFFIX):
            out += read_recipe(arg)
        elif len(values) < len(positional):
            values[positional[len(values)]] = arg
        else:
            raise ValueError(f"expected --key=value or a {RECIPE_SUFFIX} recipe, got {arg!r}")
    missing = [name for name in positional if name not in values]
    if missing:
        raise ValueError(f"missing the {missing[0]} argument")
    return out, values


def usage(config, positional):
    """The --help text: the script's docstring, then each key with its default and rule."""
    main = sys.modules.get("__main__")
    lines = [(getattr(main, "__doc__", None) or "").strip(), ""]
    lines += [f"  {name.upper()}  (positional)" for name in positional]
    for key, value in config.items():
        default, rule = value if isinstance(value, tuple) else (value, "")
        lines.append(f"  --{key}={default!r}" + (f"  ({rule})" if rule else ""))
    return "\n".join(lines)


def configure(config, argv=None, positional=(), presets=None, ignored=()):
    """The settings of a script: the declared config (see split) with argv's recipes and flags
    applied and every rule checked. Returns (cfg, given): the settings, and {key: value} of what a
    recipe or flag set explicitly, ignored keys included. `positional` names arguments that come bare
    (export.py's output path); they join cfg. `--preset=NAME` fills presets[NAME] first; explicit
    settings win over it. Keys in `ignored` are accepted and dropped: another script's keys that a
    shared command line may carry; a dict of their defaults types their values. Any error exits with
    one line."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage(config, positional))
        sys.exit(0)
    cfg, rules = split(config)
    given = {}
    try:
        found, values = assignments(argv, positional)
        for key, text, where in found:
            if key in ignored and key not in cfg:
                given[key] = parse_value(key, text, ignored[key] if isinstance(ignored, dict) else None)
                continue
            if key not in cfg:
                raise ValueError(
                    f"unknown config key --{key}"
                    if where == "the command line"
                    else f"{where}: unknown config key {key}"
                )
            given[key] = parse_value(key, text, cfg[key])
        preset = given.get("preset") or cfg.get("preset")
        if preset:
            if presets is None or preset not in presets:
                raise ValueError(f"unknown --preset={preset}; choose from {', '.join(presets or [])}")
            cfg.update(presets[preset])
        cfg.update({k: v for k, v in given.items() if k in cfg})
        cfg.update(values)
        for key, rule in rules.items():
            check(key, cfg[key], rule)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return cfg, given
