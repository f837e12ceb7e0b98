"""
Command-line overrides for the plain config variables at the top of a script, as in
nanoGPT and llama2.c: `python train.py --batch_size=32 --compile=False`.

Unlike their exec-based configurator, unknown keys and wrongly typed values are a
one-line error, not a silently ignored flag or a stack trace.
"""
import ast
import sys


def parse_value(key, text, default):
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


def configure(config, argv=None, presets=None, ignored=()):
    """A copy of the dict `config` with the `--key=value` arguments applied.
    `--preset=NAME` fills the keys of presets[NAME] first; explicit flags win over it.
    Keys in `ignored` are accepted and dropped: another script's keys that a shared command line
    may carry (e.g. the model shape, which an RL stage takes from its checkpoint)."""
    argv = sys.argv[1:] if argv is None else argv
    config, overrides = dict(config), {}
    try:
        for arg in argv:
            if not arg.startswith("--") or "=" not in arg:
                raise ValueError(f"expected --key=value, got {arg!r}")
            key, text = arg[2:].split("=", 1)
            if key in ignored and key not in config:
                continue
            if key not in config:
                raise ValueError(f"unknown config key --{key}")
            overrides[key] = parse_value(key, text, config[key])
        preset = overrides.get("preset") or config.get("preset")
        if preset:
            if presets is None or preset not in presets:
                raise ValueError(f"unknown --preset={preset}; choose from {', '.join(presets or [])}")
            config.update(presets[preset])
    except ValueError as e:
        sys.exit(f"error: {e}")
    config.update(overrides)
    return config
