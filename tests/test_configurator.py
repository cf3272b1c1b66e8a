"""configurator.py: config files and --key=value, with types checked and typos caught."""
import dataclasses
import glob
import os

import pytest

import train
from configurator import configure
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
