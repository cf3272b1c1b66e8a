"""export.py: a run's newest checkpoint as a Hugging Face MptForCausalLM directory (and a LoRA run's adapters
in PEFT's format), checked against transformers (and peft) loading what it writes. The runs are train.py's on
the tiny "released" MPT of tests/conftest.py."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import train
from lora import add_lora, is_adapter
from model import MPT, MPTConfig
from test_train import checkpoint_tensors, finish, run, start

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['--max_seq_len=32', '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_interval=2',
         '--eval_iters=2', '--log_interval=1', '--compile=False', '--device=cpu', '--dtype=float32',
         '--warmup_iters=1', '--lr_decay_iters=4', '--learning_rate=1e-3', '--min_lr=1e-4', '--weight_decay=0.0']


def export(*args):
    return subprocess.run([sys.executable, str(ROOT / 'export.py'), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)


def hf_logits(path, idx):
    import transformers
    model = transformers.MptForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


def test_export_of_a_full_fine_tune(released_mpt, released_sft, tmp_path):
    out = tmp_path / 'run'
    run([*SMALL, f'--init_from={released_mpt}', f'--data_dir={released_sft}', f'--out_dir={out}', '--max_iters=2'])
    r = export(f'--out_dir={out}', f'--hf_dir={tmp_path / "hf"}', '--dtype=float32')
    assert r.returncode == 0, r.stderr
    # ours: the checkpoint's weights (read back independently of export.py) in model.py's MPT
    state = checkpoint_tensors(out / 'ckpt-000002', tmp_path)['model']
    info = json.loads((out / 'ckpt-000002' / 'train.json').read_text())
    ours = MPT.from_state_dict(MPTConfig(**{**info['model'], 'init_device': 'cpu', 'attn_impl': 'torch'}), state).eval()
    base = MPT.from_hf(released_mpt)
    assert not torch.equal(state['transformer.blocks.0.attn.Wqkv.weight'],
                           base.state_dict()['transformer.blocks.0.attn.Wqkv.weight'])  # it trained
    idx = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours(idx, idx)
    assert torch.allclose(hf_logits(tmp_path / 'hf', idx), expected, atol=1e-4, rtol=0)
    for name in ('tokenizer.json', 'tokenizer_config.json'):  # the released model's tokenizer goes along
        assert (tmp_path / 'hf' / name).read_bytes() == (released_mpt / name).read_bytes()
    assert 'weights as trained' in r.stdout
    r = export(f'--out_dir={out}', f'--hf_dir={tmp_path / "hf2"}', f'--peft_dir={tmp_path / "adapter"}')
    assert r.returncode == 1 and 'is not a LoRA run (lora_rank=0)' in r.stderr and 'Traceback' not in r.stderr
    r = export(f'--out_dir={out}', f'--hf_dir={tmp_path / "hf"}')  # not over an earlier export
    assert r.returncode == 1 and 'is not empty: choose another folder or add --overwrite' in r.stderr
    # by default bf16, as the released MPTs are; past max_shard_size in Hugging Face's numbered shards with their
    # index, each weight the checkpoint's rounded to bf16, which transformers loads as the same model
    from safetensors.torch import load_file
    bf16 = tmp_path / 'bf16'
    r = export(f'--out_dir={out}', f'--hf_dir={bf16}', '--max_shard_size=1000000')
    files = sorted(p.name for p in bf16.glob('*.safetensors'))
    assert r.returncode == 0 and f'bfloat16, {len(files)} weight files' in r.stdout, r.stdout + r.stderr
    n = len(files)
    assert n > 1 and files == [f'model-{k:05d}-of-{n:05d}.safetensors' for k in range(1, n + 1)]
    weight_map = json.loads((bf16 / 'model.safetensors.index.json').read_text())['weight_map']
    assert sorted(weight_map) == sorted(state) and sorted(set(weight_map.values())) == files
    for file in files:
        tensors = load_file(bf16 / file)
        assert (bf16 / file).stat().st_size <= 1_000_000 or len(tensors) == 1
        for name, t in tensors.items():
            assert weight_map[name] == file and torch.equal(t, state[name].to(torch.bfloat16)), name
    assert json.loads((bf16 / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    assert torch.allclose(hf_logits(bf16, idx), expected, atol=0.1, rtol=0)
    # --overwrite replaces an earlier export whole (a stale shard of it goes too); on failure it stays as it was
    (bf16 / 'model-00009-of-00009.safetensors').write_bytes(b'')
    broken = tmp_path / 'broken'
    shutil.copytree(out, broken)
    (broken / 'ckpt-000002' / '__0_0.distcp').unlink()
    before = {p.name: p.read_bytes() for p in bf16.iterdir()}
    r = export(f'--out_dir={broken}', f'--hf_dir={bf16}', '--overwrite=True')
    assert r.returncode == 1 and r.stderr.count('error:') == 1 and 'Traceback' not in r.stderr, r.stderr
    assert 'ckpt-000002 is damaged (__0_0.distcp is missing)' in r.stderr
    assert {p.name: p.read_bytes() for p in bf16.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if 'export-tmp' in p.name] == []
    r = export(f'--out_dir={out}', f'--hf_dir={bf16}', '--overwrite=True')
    assert r.returncode == 0 and sorted(p.name for p in bf16.glob('*.safetensors')) == ['model.safetensors']
    assert not (bf16 / 'model.safetensors.index.json').exists()
    # --overwrite never replaces what export.py did not write, nor the run's out_dir or its base model
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('mine')
    started = tmp_path / 'started'  # the run as if started from a copy of the released model
    shutil.copytree(released_mpt, tmp_path / 'base')
    shutil.copytree(out, started)
    info = json.loads((started / 'ckpt-000002' / 'train.json').read_text())
    (started / 'ckpt-000002' / 'train.json').write_text(json.dumps({**info, 'started_from': str(tmp_path / 'base')}))
    signed = checkpoints.read_manifest(started / 'ckpt-000002')  # re-signed: a train.json changed by hand is damage
    signed['train.json'] = checkpoints.file_crc(started / 'ckpt-000002' / 'train.json')
    checkpoints.write_manifest(started / 'ckpt-000002', signed)
    base_files = {p.name: p.read_bytes() for p in (tmp_path / 'base').iterdir()}
    for run_dir, hf_dir, message in [
            (out, tmp_path / 'mine', r"mine holds notes\.txt, which export\.py does not write: --overwrite replaces"),
            (out, out, r"hf_dir=.*run is the run's out_dir"),
            (out, tmp_path, r"is a folder holding the run's out_dir"),
            (started, tmp_path / 'base', r"is the Hugging Face model the run started from")]:
        r = export(f'--out_dir={run_dir}', f'--hf_dir={hf_dir}', '--overwrite=True')
        assert r.returncode == 1 and r.stderr.count('error:') == 1 and 'Traceback' not in r.stderr, r.stderr
        assert re.search(message, r.stderr), r.stderr
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'mine' and len(checkpoints.checkpoint_dirs(out)) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / 'base').iterdir()} == base_files


@pytest.fixture(scope='module')
def lora_run_dirs(released_mpt, released_sft, tmp_path_factory):
    """A LoRA and a QLoRA run of 2 steps (dropout on the adapters: export must not apply it), side by side."""
    root = tmp_path_factory.mktemp('runs')
    lora = [*SMALL, f'--init_from={released_mpt}', f'--data_dir={released_sft}', '--max_iters=2', '--lora_rank=4',
            '--lora_alpha=8', '--lora_dropout=0.1', "--lora_targets=['Wqkv', 'up_proj', 'down_proj']",
            '--learning_rate=1e-2']
    procs = [start([*lora, f'--out_dir={root / "lora"}']), start([*lora, f'--out_dir={root / "qlora"}', '--quantize_base=nf4'])]
    [finish(p) for p in procs]
    return root


def lora_model(released_mpt, run_dir, tmp_path, quantize):
    """Ours: the released model with train.py's adapters (not merged) holding the run's trained values."""
    info = json.loads((run_dir / 'ckpt-000002' / 'train.json').read_text())
    model = MPT.from_hf(released_mpt, attn_impl='torch', max_seq_len=32).float()
    lora = {**info['lora'], 'quantize_base': 'nf4' if quantize else ''}
    add_lora(model, **lora)
    adapters = checkpoint_tensors(run_dir / 'ckpt-000002', tmp_path)['model']
    assert adapters and all(is_adapter(k) for k in adapters)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and all(not is_adapter(k) for k in missing)
    assert any(adapters[k].abs().max() > 0 for k in adapters if k.endswith('lora_B'))  # they trained
    return model.eval()


@pytest.mark.parametrize('kind', ['lora', 'qlora'])
def test_export_of_a_lora_run_and_its_peft_adapter(released_mpt, lora_run_dirs, kind, tmp_path):
    peft = pytest.importorskip('peft')
    import transformers
    run_dir, hf, adapter = lora_run_dirs / kind, tmp_path / 'hf', tmp_path / 'adapter'
    r = export(f'--out_dir={run_dir}', f'--hf_dir={hf}', f'--peft_dir={adapter}', '--dtype=float32')
    assert r.returncode == 0, r.stderr
    assert 'LoRA rank 4 merged' in r.stdout and ('NF4 base dequantized' in r.stdout) == (kind == 'qlora')
    idx = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    ours = lora_model(released_mpt, run_dir, tmp_path, quantize=kind == 'qlora')
    with torch.no_grad():
        expected = ours(idx, idx)[0]
        base_logits = MPT.from_hf(released_mpt, attn_impl='torch').float().eval()(idx, idx)[0]
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapters matter
    # the merged model, in transformers: the model as it trained (NF4 base dequantized for QLoRA)
    assert torch.allclose(hf_logits(hf, idx), expected, atol=1e-4, rtol=0)
    assert (hf / 'tokenizer.json').read_bytes() == (released_mpt / 'tokenizer.json').read_bytes()
    # the adapter alone, in PEFT's format, on the released base (unquantized, also for QLoRA)
    config = json.loads((adapter / 'adapter_config.json').read_text())
    assert (config['r'], config['lora_alpha'], sorted(config['target_modules'])) == (4, 8.0, ['Wqkv', 'down_proj', 'up_proj'])
    base = transformers.MptForCausalLM.from_pretrained(released_mpt, torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert len([n for n, _ in with_adapter.named_parameters() if 'lora_A' in n]) == 2 * 3
    with torch.no_grad():
        got = with_adapter(input_ids=idx).logits
    reference = ours if kind == 'lora' else lora_model(released_mpt, run_dir, tmp_path, quantize=False)
    with torch.no_grad():
        assert torch.allclose(got, reference(idx, idx)[0], atol=1e-4, rtol=0)


def test_sample_py_samples_a_lora_run_as_its_export(lora_run_dirs, tmp_path):
    # ckpt.pt of a LoRA run holds the adapters: sample.py merges them into the base, as export.py does
    r = export(f'--out_dir={lora_run_dirs / "qlora"}', f'--hf_dir={tmp_path / "hf"}', '--dtype=float32')
    assert r.returncode == 0, r.stderr
    common = ['--start=ROMEO:', '--num_samples=1', '--max_new_tokens=10', '--temperature=0', '--device=cpu',
              '--dtype=float32']
    runs = [subprocess.run([sys.executable, str(ROOT / 'sample.py'), *common, *args], capture_output=True,
                           text=True, timeout=120) for args in ([f'--out_dir={lora_run_dirs / "qlora"}'],
                                                                 [f'--init_from={tmp_path / "hf"}'])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > len('ROMEO:') + 5
    assert 'LoRA adapters (rank 4) merged' in runs[0].stderr and 'tokenizer.json' in runs[1].stderr


def test_export_bad_input(tmp_path):
    (tmp_path / 'empty').mkdir()
    cases = [([f'--out_dir={tmp_path / "empty"}', f'--hf_dir={tmp_path / "hf"}'], r"empty holds no checkpoint"),
             ([f'--out_dir={tmp_path / "nowhere"}', f'--hf_dir={tmp_path / "hf"}'], r"nowhere'?: no such folder"),
             ([f'--out_dir={tmp_path / "empty"}'], r"give --hf_dir=DIR"),
             ([f'--out_dir={tmp_path / "empty"}', f'--hf_dir={tmp_path / "a_file"}'], r"a_file is a file: give a folder"),
             ([f'--out_dir={tmp_path / "empty"}', f'--hf_dir={tmp_path / "a_file" / "hf"}'],
              r"a_file/hf: cannot write there \(Not a directory\)"),
             ([f'--out_dir={tmp_path / "empty"}', f'--hf_dir={tmp_path / "hf"}', '--dtype=float16'],
              r"dtype='float16': use 'bfloat16' or 'float32'")]
    (tmp_path / 'a_file').write_text('')
    for args, message in cases:
        r = export(*args)
        assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.count('error:') == 1, r.stderr
        import re
        assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / 'hf').exists()


def test_a_lora_checkpoint_is_no_stage_to_start_from(released_sft, lora_run_dirs, tmp_path):
    # a LoRA checkpoint holds only adapters: train.py's init_from=<ckpt> says to export it first
    ckpt = lora_run_dirs / 'lora' / 'ckpt-000002'
    code, _, stderr = run([*SMALL, f'--init_from={ckpt}', f'--data_dir={released_sft}', f'--out_dir={tmp_path / "o"}',
                           '--max_iters=1'], expect_ok=False)
    assert code == 1 and 'Traceback' not in stderr and stderr.count('error:') == 1, stderr
    assert "a LoRA run's checkpoint holds only its adapters: export the checkpoint with `python export.py" in stderr


KILL_AT = """
import os, shutil, signal
what = os.environ['KILL_AT']
rename, rmtree = os.rename, shutil.rmtree
def killing_rename(src, dst):
    if what == 'between' and str(src).endswith('.export-tmp'):  # the earlier export is aside, the new one not in
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)
def killing_rmtree(path, *a, **k):
    if what == 'deleting' and str(path).endswith('.export-old'):
        for f in sorted(os.listdir(path))[:1]:  # one file gone, then killed
            os.unlink(os.path.join(path, f))
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *a, **k)
os.rename, shutil.rmtree = killing_rename, killing_rmtree
"""


def test_an_overwrite_killed_during_its_swap_loses_nothing(released_mpt, released_sft, tmp_path):
    # export --overwrite swaps with no gap: killed (SIGKILL) between its two renames, the earlier export is whole
    # aside and the next export puts it back; killed while deleting the earlier one, the new one is whole in place
    # and the next export removes the leftovers. Each leftover is named when it is cleaned up
    run_dir, hf = tmp_path / 'run', tmp_path / 'hf'
    run([*SMALL, f'--init_from={released_mpt}', f'--data_dir={released_sft}', f'--out_dir={run_dir}', '--max_iters=2'])
    assert export(f'--out_dir={run_dir}', f'--hf_dir={hf}').returncode == 0
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}
    first = files(hf)
    (tmp_path / 'kill').mkdir()
    (tmp_path / 'kill' / 'sitecustomize.py').write_text(KILL_AT)
    killed = lambda at, *extra: subprocess.run(
        [sys.executable, str(ROOT / 'export.py'), f'--out_dir={run_dir}', f'--hf_dir={hf}', '--overwrite=True', *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', 'KILL_AT': at,
                                                           'PYTHONPATH': str(tmp_path / 'kill')})
    assert killed('between').returncode == -9
    assert not hf.exists() and files(tmp_path / '.hf.export-old') == first
    r = export(f'--out_dir={tmp_path / "nowhere"}', f'--hf_dir={hf}', '--overwrite=True')  # fails after the clean-up
    assert r.returncode == 1 and f"note: {hf} put back from {tmp_path / '.hf.export-old'}" in r.stderr
    assert f"note: removed {tmp_path / '.hf.export-tmp'}" in r.stderr and files(hf) == first
    assert killed('deleting', '--dtype=float32').returncode == -9
    second = files(hf)
    assert second != first and second.keys() == first.keys() and (tmp_path / '.hf.export-old').is_dir()
    r = export(f'--out_dir={run_dir}', f'--hf_dir={hf}', '--overwrite=True', '--dtype=float32')
    assert r.returncode == 0 and f"note: removed {tmp_path / '.hf.export-old'}" in r.stderr
    assert files(hf) == second and sorted(p.name for p in tmp_path.iterdir()) == ['hf', 'kill', 'run']
