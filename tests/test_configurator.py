"""configurator.py: config files and --key=value, with types checked and typos caught."""
import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

import train
from configurator import configure, help_text
from model import MPT, MPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings():
    return dict(batch_size=12, learning_rate=6e-4, compile=True, device='cuda', out_dir='out',
                clip_qkv=None, betas=(0.9, 0.99), os=os)


def test_overrides_parse_and_keep_types():
    s = settings()
    out = configure(s, ['--batch_size=4', '--learning_rate=1', '--compile=False', '--device=cpu',
                        '--out_dir=123', '--clip_qkv=6.0', '--betas=[0.8, 0.9]'], verbose=False)
    assert s['batch_size'] == 4 and type(s['learning_rate']) is float and s['learning_rate'] == 1.0
    assert s['compile'] is False and s['device'] == 'cpu' and s['out_dir'] == '123'
    assert s['clip_qkv'] == 6.0 and s['betas'] == (0.8, 0.9)
    assert 'os' not in out and out['batch_size'] == 4  # modules are not settings


@pytest.mark.parametrize("arg,message", [
    ('--learning_rat=1e-4', "unknown setting 'learning_rat'.*did you mean learning_rate"),
    ('--batch_size=2.5', "batch_size must be int"),
    ('--compile=yes', r"compile must be bool.*True or False"),
    ('--batch_size', "no value"),
    ('config/nope.py', "cannot read config file config/nope.py"),
])
def test_bad_arguments_exit_with_a_clear_message(arg, message):
    with pytest.raises(SystemExit) as e:
        configure(settings(), [arg], verbose=False)
    assert e.value.code != 0
    assert pytest.importorskip('re').search(message, str(e.value.code))


def test_config_file_runs_in_the_settings_and_typos_there_are_caught(tmp_path):
    good = tmp_path / 'good.py'
    good.write_text("import math\n_helper = 3\nbatch_size = _helper * 2\nlearning_rate = math.sqrt(4) * 1e-4\n")
    s = settings()
    configure(s, [str(good), '--batch_size=7'], verbose=False)  # later arguments win
    assert s['batch_size'] == 7 and s['learning_rate'] == pytest.approx(2e-4)
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_sise = 3\n")
    with pytest.raises(SystemExit, match="unknown setting 'batch_sise'.*batch_size"):
        configure(settings(), [str(bad)], verbose=False)
    wrong_type = tmp_path / 'wrong.py'
    wrong_type.write_text("compile = 'no'\n")
    with pytest.raises(SystemExit, match="compile must be bool"):
        configure(settings(), [str(wrong_type)], verbose=False)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))))
def test_every_config_file_builds_its_model(path):
    # the model settings of each config (as train.py has them: every MPTConfig field) make a valid
    # MPTConfig, and the parameter count its first line states is the model's
    s = train.default_settings()  # every setting train.py has, MPTConfig's fields among them (None stays None)
    fields = {f.name for f in dataclasses.fields(MPTConfig)}
    configure(s, [path], verbose=False)
    config = MPTConfig(**{**{f: s[f] for f in fields}, 'init_device': 'meta'})
    n = MPT(config).num_params()
    first_line = open(path).readline()
    assert f"{n:,}" in first_line or f"{n / 1e6:.1f}M" in first_line
    assert s['learning_rate'] < 1.0 and s['gradient_accumulation_steps'] >= 1


def test_nanogpt_names_and_single_dash_arguments():
    s = settings()
    for alias, real in (('lr', 'learning_rate'), ('bs', 'batch_size')):
        with pytest.raises(SystemExit, match=f"unknown setting '{alias}' in --{alias}=abc; did you mean {real}\\?"):
            configure(s, [f'--{alias}=abc'], verbose=False)
    # the model's names: nanoGPT's n_embd, n_layer, n_head, block_size; iters
    s = train.default_settings()
    for alias, real in (('n_embd', 'd_model'), ('n_layer', 'n_layers'), ('n_head', 'n_heads'),
                        ('block_size', 'max_seq_len'), ('iters', 'max_iters')):
        with pytest.raises(SystemExit, match=f"unknown setting '{alias}'.*did you mean {real}\\?"):
            configure(s, [f'--{alias}=4'], verbose=False)
    with pytest.raises(SystemExit, match=r"'-x': settings are given as --key=value \(and --help lists them\)"):
        configure(settings(), ['-x'], verbose=False)


def test_a_positional_setting_and_a_repeated_list():
    # prepare.py's form: `python prepare.py shakespeare --input=a --input=b`; the bare word is a setting, not a
    # config file, and each --input adds one item as written (the first replacing the default)
    s = dict(source='', input=['default.txt'], overwrite=False, num_proc=2)
    out = configure(s, ['shakespeare', '--input=a b.txt', "--input=[1, 2]", '--overwrite', '--num_proc=3'],
                    verbose=False, positional='source', repeated=('input',))
    assert out == dict(source='shakespeare', input=['a b.txt', '[1, 2]'], overwrite=True, num_proc=3)
    assert configure(dict(s, input=[]), ['--source=c4'], verbose=False, positional='source',
                     repeated=('input',))['source'] == 'c4'
    # without them, a bare word is still a config file and a list is replaced whole
    with pytest.raises(SystemExit, match="cannot read config file shakespeare"):
        configure(dict(s), ['shakespeare'], verbose=False)
    assert configure(dict(s), ["--input=['x']"], verbose=False)['input'] == ['x']
    for argv, message in ((['a', 'b'], "prog.py: error: one source at a time: got a and b"),
                          (['--input='], "prog.py: error: '--input=' has no value"),
                          (['--num_proc'], "prog.py: error: '--num_proc' has no value"),
                          (['--num_proc=two'], "prog.py: error: --num_proc=two: not a Python literal; num_proc must be int"),
                          (['--inptu=x'], "prog.py: error: unknown setting --inptu (did you mean --input?); valid: "
                                          "--source, --input, --overwrite, --num_proc")):
        with pytest.raises(SystemExit) as e:
            configure(dict(s), argv, verbose=False, positional='source', repeated=('input',), prog='prog.py')
        assert e.value.code.startswith(message), e.value.code


# ---- --help: each script's settings from its own source, before its heavy imports ----------------------------

SCRIPTS = {  # script: what its help must show (regular expressions, each on one line)
    'train.py': [r"^usage: python train\.py \[config\.py \.\.\.\] \[--key=value \.\.\.\]$",
                 r"^Train an MPT \(model\.py\) on the token files prepare\.py writes",
                 r"^  I/O$", r"^    --batch_size=16 +int +micro-batch: sequences per process in one forward/backward$",
                 r"^  MPTConfig \(model\.py\):$", r"^    --d_model=768 +int$",
                 r"^    --clip_qkv=None +float \| None +clamp q, k, v to",
                 r"^    --init_device='auto' +str +'cpu', 'meta', or 'auto': meta above 1B params$",  # train.py's, not model.py's
                 r"^    --device='cuda' if torch\.cuda\.is_available\(\) else 'cpu'$",
                 r"^ +str +with torchrun each process takes cuda:LOCAL_RANK$",
                 r"^  learning rate: linear warmup, then cosine decay"],
    'sample.py': [r"^usage: python sample\.py", r"^    --max_new_tokens=500 +int +per sample",
                  r"^    --top_p=None +any +sample only among"],
    'bench.py': [r"^    --mode='train' +str", r"^    \(train\.py's settings: python train\.py --help\)$"],
    'export.py': [r"^    --hf_dir='' +str +where to write the merged Hugging Face model"],
    'prepare.py': [r"^usage: python prepare\.py \[SOURCE\] \[--key=value \.\.\.\]$", r"^  tokenizer \(empty: char",
                   r"^    --num_proc=len\(os\.sched_getaffinity\(0\)\)", r"^ +int +tokenizer processes$",
                   r"^    --val_fraction=None +any +None: 0\.1 for small inputs"],
    'bench_prepare.py': [r"^    --mb=24\.0 +float +megabytes of text"],
    'plot.py': [r"^usage: python plot\.py OUT_DIR\|BENCH\.json", r"^    --out='' +str +the PNG"],
}


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_lists_the_settings_before_the_heavy_imports(script, tmp_path):
    # a torch that cannot be imported: the help must come before the script imports it
    (tmp_path / 'torch').mkdir()
    (tmp_path / 'torch' / '__init__.py').write_text("raise ImportError('torch was imported before --help')\n")
    env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
    for flag in ('--help', '-h'):
        r = subprocess.run([sys.executable, script, 'config/shakespeare_char_cpu.py', flag], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and not r.stderr, r.stderr
        for pattern in SCRIPTS[script]:
            assert re.search(pattern, r.stdout, re.MULTILINE), (pattern, r.stdout)


def test_help_reads_groups_settings_and_comments(tmp_path):
    # the settings block: module-level assignments up to configure(); comment lines head groups, a comment
    # beside a setting is its description; a default that is an expression is shown as written
    path = tmp_path / 'script.py'
    path.write_text('"""A script.\n\nIt does things."""\nimport sys\n\n# ------\n# data\nsize = 3  # how many\n'
                    'name = "x"\n# system\nwhere = "a" if sys.platform else "b"  # place\nratio = None\n_hidden = 1\n'
                    'configure(globals(), sys.argv[1:])\nafter = 2\n')
    text = help_text(str(path))
    assert text.splitlines()[:4] == ["usage: python script.py [config.py ...] [--key=value ...]", "",
                                      "A script.", ""]
    assert re.search(r"\n\n  data\n    --size=3 +int +how many\n    --name=\"x\" +str\n\n  system\n"
                     r"    --where=\"a\" if sys\.platform else \"b\" +str +place\n    --ratio=None +any\Z", text), text


# ---- checks at start: one line per bad value -------------------------------------------------------------

BAD_SETTINGS = {  # train.py: overrides -> the line
    'batch_size': (dict(batch_size=0), "batch_size=0: use a whole number >= 1 (micro-batch: sequences per process in "
                                       "one forward/backward)"),
    'batch_size_negative': (dict(batch_size=-1), "batch_size=-1: use a whole number >= 1"),
    'eval_interval': (dict(eval_interval=0), "eval_interval=0: use a whole number >= 1"),
    'accumulation': (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0: use a whole number >= 1"),
    'max_seq_len': (dict(max_seq_len=0), "max_seq_len=0: use a whole number >= 1 (training context"),
    'learning_rate': (dict(learning_rate=-1.0), "learning_rate=-1.0: use a number >= 0 (the peak, after warmup)"),
    'warmup': (dict(warmup_iters=-5), "warmup_iters=-5: use a whole number >= 0"),
    'kv_n_heads': (dict(kv_n_heads=0), "kv_n_heads=0: use a whole number >= 1"),
    'dropout': (dict(resid_pdrop=1.0), "resid_pdrop=1.0: use a number in [0, 1)"),
    'clip_qkv': (dict(clip_qkv=0.0), "clip_qkv=0.0: use a number > 0"),
    'init_device': (dict(init_device='gpu'), "init_device='gpu': use one of 'auto', 'cpu', 'meta'"),
    'device': (dict(device='gpu'), "device='gpu': use 'cpu', 'cuda' or 'cuda:N' (the N-th GPU)"),
}


@pytest.mark.parametrize('case', BAD_SETTINGS)
def test_each_bad_setting_is_one_line(case):
    overrides, line = BAD_SETTINGS[case]
    problems = train.setting_problems({**train.default_settings(), 'device': 'cpu', **overrides})
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_good_settings_and_every_config_pass():
    assert train.setting_problems({**train.default_settings(), 'device': 'cpu'}) == []
    for path in sorted(glob.glob(os.path.join(ROOT, 'config', '*.py'))):
        s = train.default_settings()
        configure(s, [path], verbose=False)
        assert train.setting_problems({**s, 'device': 'cpu', 'init_from': 'scratch'}) == [], path


def test_world_size_and_cuda_without_cuda():
    s = {**train.default_settings(), 'device': 'cpu', 'gradient_accumulation_steps': 3}
    assert train.setting_problems(s, world_size=2) == [
        "gradient_accumulation_steps=3 (micro-batches per step over all processes) does not divide among 2 processes: "
        "make it a multiple of 2"]
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    (problem,) = train.setting_problems({**s, 'gradient_accumulation_steps': 4, 'device': 'cuda'})
    assert problem.startswith("device='cuda' but this torch (") and problem.endswith(
        "use --device=cpu, or a CUDA build of torch on a machine with a GPU")


def test_help_renders_each_setting_as_itself():
    # every `--key=` row of a script's --help is one of its settings (a module CONSTANT such as plot.py's USAGE is
    # not), and a comment continued on the lines below a setting does not become the next group's header
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ('train.py', 'plot.py', 'sample.py', 'export.py', 'eval.py', 'prepare.py'):
        text = help_text(os.path.join(ROOT, script))
        keys = re.findall(r'^    --(\w+)=', text, re.M)
        assert keys and not [k for k in keys if k.isupper()], (script, keys)
    assert set(re.findall(r'^    --(\w+)=', help_text(os.path.join(ROOT, 'train.py')), re.M)) == set(train.default_settings())
    rows = help_text(os.path.join(ROOT, 'train.py')).splitlines()
    row = next(r for r in rows if r.startswith('    --dp_replicate=1'))
    assert "FSDP over all" in row and not any(r.startswith('  the model sharded') for r in rows)


def test_wandb_missing_is_a_setting_problem(monkeypatch):
    # checked with the other settings before any work (not in train.py's __main__), whether or not wandb is here
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    s = {**train.default_settings(), 'device': 'cpu', 'wandb_log': True}
    assert train.setting_problems(s) == ["wandb_log=True needs wandb: pip install wandb (or --wandb_log=False)"]
