"""
nanoGPT's configurator, as a function. A script defines its settings as module-level globals, then

    configure(globals(), sys.argv[1:])

so that `python train.py config/mpt_1b.py --batch_size=4 --compile=False` works:
- a bare argument is a config file: Python run in the script's globals (it simply assigns settings),
- --key=value overrides one setting; the value is parsed with ast.literal_eval (a bare word stays a
  string) and must have the type of the default (an int where a float is expected is fine; a default
  of None takes anything); a bare --key of a bool setting is --key=True.
A script may instead take one bare argument as a setting (positional: `python prepare.py shakespeare`), and
let a list setting repeat (repeated: each --input=PATH adds one item, as written).
An unknown key, in a file or on the command line, stops the program with the close matches (and the real
name of a nanoGPT one: --lr is learning_rate), because a silently ignored typo (--learning_rat=1e-4) costs a
whole training run.

--help (or -h) prints the script's docstring and its settings, read from the script's own source: each
setting's default as written, its type and the comment beside it, under the comment lines that head its
group. help_if_asked(__file__) at the top of a script does this before the script's heavy imports (torch
takes 10-18 s), which is why the source is read with ast rather than run: some defaults ask torch
(device = 'cuda' if torch.cuda.is_available() else 'cpu'). Only the standard library is imported here.

out_of_range() and device_problem() check settings at start, one line per bad value.
"""

import ast
import difflib
import functools
import io
import os
import sys
import tokenize

SETTING_TYPES = (int, float, bool, str, tuple, list, dict, type(None))
# other projects' names for our settings (nanoGPT's, mostly): an unknown one of these names the real one
ALIASES = {'lr': 'learning_rate', 'bs': 'batch_size', 'micro_batch_size': 'batch_size', 'iters': 'max_iters',
           'max_steps': 'max_iters', 'warmup_steps': 'warmup_iters', 'block_size': 'max_seq_len',
           'seq_len': 'max_seq_len', 'n_embd': 'd_model', 'n_layer': 'n_layers', 'n_head': 'n_heads',
           'n_kv_heads': 'kv_n_heads', 'dropout': 'resid_pdrop', 'new_tokens': 'max_new_tokens'}


def settings_in(namespace):
    """The settings among a script's globals: plain values (not modules, functions, _private names, CONSTANTS)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not k.isupper()
            and isinstance(v, SETTING_TYPES)}


def configure(settings, argv, verbose=True, positional=None, repeated=(), prog=None):
    """Apply config files and --key=value arguments to `settings` (a script's globals()), in order.
    Returns {name: value} of all settings, for logging and checkpoints.
    positional: the setting a bare argument gives, instead of naming a config file (one such argument at most).
    repeated: list settings that each --key=value adds one item to, as written (a string); the first replaces
    the default. prog: the script's name, to start each error line with as argparse does ("prepare.py: error:
    ..."), the settings written as flags."""
    keys, bare, added = list(settings_in(settings)), None, set()
    for arg in argv:
        if arg in ('-h', '--help'):  # a script without help_if_asked at its top: the same help, after its imports
            print(help_text(settings['__file__']) if '__file__' in settings else __doc__)
            sys.exit(0)
        if arg.startswith('-') and not arg.startswith('--'):
            _error(f"'{arg}': settings are given as --key=value (and --help lists them)", prog)
        if not arg.startswith('--') and positional:
            if bare is not None:
                _error(f"one {positional} at a time: got {bare} and {arg}", prog)
            settings[positional] = bare = arg
            continue
        if not arg.startswith('--'):
            _apply_file(settings, keys, arg, verbose, prog)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq and isinstance(settings.get(key), bool) and key in keys:
            eq, text = '=', 'True'  # a bare --overwrite
        if not eq or (key in repeated and not text):
            _error(f"'{arg}' has no value: write --key=value", prog)
        _check_known(key, keys, arg, prog)
        if key in repeated:  # the first replaces the default, the rest add to it
            value = (settings[key] if key in added else []) + [text]
            added.add(key)
        else:
            value = _parse(key, text, settings[key], prog)
        if verbose:
            print(f"override: {key} = {value!r}", file=sys.stderr)
        settings[key] = value
    return {k: settings[k] for k in keys}


def _error(message, prog=None):
    sys.exit(f"{prog}: error: {message}" if prog else f"error: {message}")


def _apply_file(settings, keys, path, verbose, prog=None):
    try:
        source = open(path).read()
    except OSError as e:
        _error(f"cannot read config file {path}: {e.strerror}. Settings are given as --key=value; a bare argument "
               f"must be a config file such as config/mpt_125m.py", prog)
    before = dict(settings)
    if verbose:
        print(f"config: {path}", file=sys.stderr)
    exec(compile(source, path, 'exec'), settings)
    for key, value in settings.items():
        if key.startswith('_') or key.isupper() or not isinstance(value, SETTING_TYPES):
            continue  # helper names (_x), CONSTANTS, imported modules and functions are not settings (settings_in)
        if key not in keys:
            _check_known(key, keys, f"{path}: {key} = ...", prog)
        elif before[key] is not None and value is not None:
            settings[key] = _coerce(key, value, before[key], f"{path}: {key} = {value!r}:", prog)


def _check_known(key, keys, where, prog=None):
    if key in keys:
        return
    real = ALIASES.get(key) if ALIASES.get(key) in keys else None
    close = [real] if real else difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if prog:  # as flags: "unknown setting --val_fracton (did you mean --val_fraction?); valid: --input, ..."
        _error(f"unknown setting --{key}" + (f" (did you mean --{close[0]}?)" if close else "")
               + f"; valid: {', '.join('--' + k for k in keys)}", prog)
    if real:
        hint = f"; did you mean {real}? (its name here)"
    else:
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; the settings are the variables at the top of the script (--help lists them)"
    _error(f"unknown setting '{key}' in {where}{hint}")


def _parse(key, text, default, prog=None):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if not isinstance(default, (str, type(None))):  # --num_proc=two
            _coerce(key, text, default, f"--{key}={text}: not a Python literal;", prog)
        value = text  # a bare word, like --device=cuda or --init_from=resume
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # --out_dir=123 means the string '123'
    return _coerce(key, value, default, f"--{key}={text}:", prog)


def _coerce(key, value, default, where, prog=None):
    """value, converted to the type of default when that loses nothing; else a clear error."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    hint = " (write True or False)" if isinstance(default, bool) else ""
    _error(f"{where} {key} must be {type(default).__name__} like its default {default!r}, got "
           f"{type(value).__name__}{hint}", prog)


# -----------------------------------------------------------------------------
# --help: the settings as the script's source has them

def help_if_asked(path, usage=None, dict_name=None, argv=None):
    """If -h or --help is among the arguments of the script at path (run as the main program), print its help
    and exit. Call it before the script's heavy imports; it imports nothing beyond the standard library."""
    argv = sys.argv if argv is None else argv
    if argv and os.path.abspath(argv[0]) == os.path.abspath(path) and {'-h', '--help'} & set(argv[1:]):
        try:
            print(help_text(path, usage, dict_name), flush=True)
        except BrokenPipeError:  # --help | head
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


@functools.lru_cache(maxsize=8)
def _lines(source):
    return [line.encode() for line in source.splitlines(keepends=True)]


def _segment(source, node):
    """ast.get_source_segment, without splitting the whole source into lines again for each node (which made
    train.py --help take a second). Offsets are in UTF-8 bytes, as ast gives them."""
    lines, first, last = _lines(source), node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset:node.end_col_offset].decode()
    return (lines[first][node.col_offset:] + b''.join(lines[first + 1:last])
            + lines[last][:node.end_col_offset]).decode()


def help_text(path, usage=None, dict_name=None):
    """The script's docstring as written, then its settings: grouped as in the file, each with its default, type
    and comment."""
    name, source = os.path.basename(path), open(path).read()
    body, doc = ast.parse(source).body, ''
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
            isinstance(body[0].value.value, str):  # the docstring as written (its backslashes too), quotes removed
        text = _segment(source, body[0]).lstrip('rRuU')
        quote = 3 if text[:3] in ('"""', "'''") else 1
        doc = text[quote:-quote].strip('\n')
    lines = [f"usage: {usage or f'python {name} [config.py ...] [--key=value ...]'}", "", doc, "",
             "settings (default, type, what it is); a config file (Python) and --key=value override them, in order:"]
    items = settings_doc(path, dict_name)
    width = min(36, max((len(f"--{i[1]}={i[2]}") for i in items if i[0] == 'setting'), default=0))
    previous = None
    for kind, *rest in items:
        if kind == 'note':
            lines.append(("\n" if previous != 'note' else "") + f"  {rest[0]}")
        elif kind == 'see':
            lines.append(f"    {rest[0]}")
        else:
            key, default, type_name, comment = rest
            arg = f"--{key}={default}"
            if len(arg) > width:  # a long default: the rest on the next line
                lines.append(f"    {arg}")
                arg = ''
            lines.append(f"    {arg:<{width}}  {type_name:<5}  {comment}".rstrip())
        previous = kind
    return "\n".join(lines)


def settings_doc(path, dict_name=None):
    """The settings block of a script, read from its source: a list of ('note', comment line) for the comment
    lines that head a group, ('setting', name, default as written, type, comment beside it), and ('see', text)
    for settings taken from elsewhere. The block is the module-level assignments from the first one to the
    first def, class, `if` or configure() call; `globals().update(...MPTConfig...)` stands for MPTConfig's
    fields (model.py). With dict_name, the settings are instead the keywords of `dict_name = dict(...)`."""
    source = open(path).read()
    tree = ast.parse(source)
    comments = _comments(source)
    if dict_name:
        i = next(i for i, s in enumerate(tree.body) if isinstance(s, ast.Assign) and
                 getattr(s.targets[0], 'id', None) == dict_name)
        return _block(source, comments, [(k.value.lineno, k.value.end_lineno, k.arg, k.value, None)
                                         for k in tree.body[i].value.keywords], tree.body[i - 1].end_lineno + 1)
    block, started, reassigned, prev_end = [], False, set(), 0
    for stmt in tree.body:
        update = isinstance(stmt, ast.Expr) and 'globals().update' in _segment(source, stmt)
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.If)) or \
                (started and 'configure(' in _segment(source, stmt)):
            break
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or (isinstance(stmt, ast.Expr) and not started and not update):
            prev_end = stmt.end_lineno
            continue
        started = True
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            reassigned.add(stmt.targets[0].id)
            if not stmt.targets[0].id.startswith('_') and not stmt.targets[0].id.isupper():  # not a CONSTANT
                block.append((stmt.lineno, stmt.end_lineno, stmt.targets[0].id, stmt.value, None))
        elif update:
            block.append((stmt.lineno, stmt.end_lineno, None, stmt.value, None))
    items = _block(source, comments, block, prev_end + 1)
    out = []
    for item in items:  # expand globals().update(...)
        if item[0] != 'update':
            out.append(item)
        elif 'MPTConfig' in item[1]:
            model = os.path.join(os.path.dirname(os.path.abspath(path)), 'model.py')
            out += [i for i in _dataclass_doc(model, 'MPTConfig') if i[0] != 'setting' or i[1] not in reassigned]
        else:
            module = item[1].split('globals().update(', 1)[1].split('.', 1)[0]
            out.append(('see', f"({module}.py's settings: python {module}.py --help)"))
    return out


def _comments(source):
    """{line: (comment text, whether the comment is the line's only content)}."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = (tok.string.lstrip('#').strip(), not tok.line[:tok.start[1]].strip())
    return found


def _block(source, comments, entries, first_line):
    """Items for (first line, last line, name, value node, annotation) entries, with the comment lines between."""
    items, line = [], first_line
    for start, end, name, value, annotation in entries:
        for n in range(line, start):
            text, alone = comments.get(n, ('', False))
            if alone and text.strip('-'):  # a line of dashes only separates
                items.append(('note', text))
        line = end + 1
        segment = _segment(source, value)
        if name is None:
            items.append(('update', segment))
            continue
        comment = next((comments[n][0] for n in range(start, end + 1) if n in comments and not comments[n][1]), '')
        items.append(('setting', name, segment, annotation or _type_name(value), comment))
    return items


def _dataclass_doc(path, class_name):
    source = open(path).read()
    cls = next(s for s in ast.parse(source).body if isinstance(s, ast.ClassDef) and s.name == class_name)
    fields = [(s.lineno, s.end_lineno, s.target.id, s.value, _segment(source, s.annotation))
              for s in cls.body if isinstance(s, ast.AnnAssign) and s.value is not None]
    return [('note', f"{class_name} ({os.path.basename(path)}):")] + _block(source, _comments(source), fields, cls.lineno + 1)


def _type_name(node):
    """The type of a default as written: a literal's, both branches' of `a if test else b`, len()'s int."""
    if isinstance(node, ast.IfExp):
        names = [n for n in (_type_name(node.body), _type_name(node.orelse)) if n]
        return names[0] if len(set(names)) == 1 else ' or '.join(dict.fromkeys(names))
    if isinstance(node, ast.Call) and getattr(node.func, 'id', None) in ('len', 'int', 'float', 'str', 'bool'):
        return 'int' if node.func.id == 'len' else node.func.id
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return ''
    return 'any' if value is None else type(value).__name__


# -----------------------------------------------------------------------------
# checks at start: one line per bad value, before any work

def out_of_range(settings, path, whole=None, at_least=None, positive=(), fraction=(), choices=None):
    """The settings outside their range, one line each, with what the setting is (the comment beside it in
    path). whole: {name: minimum} for whole numbers (sizes >= 1, counts >= 0); at_least: {name: minimum} for
    numbers (rates >= 0); positive: numbers > 0; fraction: numbers in [0, 1); choices: {name: allowed values}.
    None passes the number checks: where a setting may be None, its default is."""
    doc = {i[1]: i[4] for i in settings_doc(path) if i[0] == 'setting'}

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    rules = [(name, lambda v, low=low: isinstance(v, int) and number(v) and v >= low, f"a whole number >= {low}")
             for name, low in (whole or {}).items()]
    rules += [(name, lambda v, low=low: number(v) and v >= low, f"a number >= {low}")
              for name, low in (at_least or {}).items()]
    rules += [(name, lambda v: number(v) and v > 0, "a number > 0") for name in positive]
    rules += [(name, lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)") for name in fraction]
    problems = [f"{name}={settings[name]!r}: use {what}" + (f" ({doc[name]})" if doc.get(name) else "")
                for name, ok, what in rules if settings[name] is not None and not ok(settings[name])]
    for name, allowed in (choices or {}).items():
        if settings[name] not in allowed:
            problems.append(f"{name}={settings[name]!r}: use one of {', '.join(map(repr, allowed))}"
                            + (f" ({doc[name]})" if doc.get(name) else ""))
    return problems


def device_problem(device, kinds=('cpu', 'cuda')):
    """What is wrong with a device setting ('cpu', 'cuda', 'cuda:N'), as one line, or None. Imports torch."""
    import torch
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in kinds:
        return f"device={device!r}: use {', '.join(repr(k) for k in kinds)} or 'cuda:N' (the N-th GPU)"
    if kind == 'cuda' and not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None else \
            f"torch sees no CUDA GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        return f"device={device!r} but {why}: use --device=cpu, or a CUDA build of torch on a machine with a GPU"
    index = torch.device(device).index
    if kind == 'cuda' and index is not None and index >= torch.cuda.device_count():
        return f"device={device!r} but there are {torch.cuda.device_count()} GPUs (cuda:0 ...)"
    return None
