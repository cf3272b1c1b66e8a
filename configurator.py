"""
nanoGPT's configurator, as a function. A script defines its settings as module-level globals, then

    configure(globals(), sys.argv[1:])

so that `python train.py config/mpt_1b.py --batch_size=4 --compile=False` works:
- a bare argument is a config file: Python run in the script's globals (it simply assigns settings),
- --key=value overrides one setting; the value is parsed with ast.literal_eval (a bare word stays a
  string) and must have the type of the default (an int where a float is expected is fine; a default
  of None takes anything).
An unknown key, in a file or on the command line, stops the program with the close matches, because
a silently ignored typo (--learning_rat=1e-4) costs a whole training run.
"""

import ast
import difflib
import sys

SETTING_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


def settings_in(namespace):
    """The settings among a script's globals: plain values (not modules, functions, or _private names)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and isinstance(v, SETTING_TYPES)}


def configure(settings, argv, verbose=True):
    """Apply config files and --key=value arguments to `settings` (a script's globals()), in order.
    Returns {name: value} of all settings, for logging and checkpoints."""
    keys = list(settings_in(settings))
    for arg in argv:
        if not arg.startswith('--'):
            _apply_file(settings, keys, arg, verbose)
            continue
        if '=' not in arg:
            sys.exit(f"error: '{arg}' has no value: write --key=value")
        key, text = arg[2:].split('=', 1)
        _check_known(key, keys, arg)
        value = _parse(key, text, settings[key])
        if verbose:
            print(f"override: {key} = {value!r}", file=sys.stderr)
        settings[key] = value
    return {k: settings[k] for k in keys}


def _apply_file(settings, keys, path, verbose):
    try:
        source = open(path).read()
    except OSError as e:
        sys.exit(f"error: cannot read config file {path}: {e.strerror}. Settings are given as "
                 f"--key=value; a bare argument must be a config file such as config/mpt_125m.py")
    before = dict(settings)
    if verbose:
        print(f"config: {path}", file=sys.stderr)
    exec(compile(source, path, 'exec'), settings)
    for key, value in settings.items():
        if key.startswith('_') or not isinstance(value, SETTING_TYPES):
            continue  # helper names (_x), imported modules and functions are not settings
        if key not in keys:
            _check_known(key, keys, f"{path}: {key} = ...")
        elif before[key] is not None and value is not None:
            settings[key] = _coerce(key, value, before[key], f"{path}: {key} = {value!r}")


def _check_known(key, keys, where):
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; the settings are the variables at the top of the script"
        sys.exit(f"error: unknown setting '{key}' in {where}{hint}")


def _parse(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word, like --device=cuda or --init_from=resume
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # --out_dir=123 means the string '123'
    return _coerce(key, value, default, f"--{key}={text}")


def _coerce(key, value, default, where):
    """value, converted to the type of default when that loses nothing; else a clear error."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    hint = " (write True or False)" if isinstance(default, bool) else ""
    sys.exit(f"error: {where}: {key} must be {type(default).__name__} like its default "
             f"{default!r}, got {type(value).__name__}{hint}")
