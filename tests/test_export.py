"""export.py: a run's newest checkpoint as a Hugging Face MptForCausalLM directory (and a LoRA run's adapters
in PEFT's format), checked against transformers (and peft) loading what it writes. The runs are train.py's on
the tiny "released" MPT of tests/conftest.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import MPT, MPTConfig
from test_train import checkpoint_tensors, run

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
    r = export(f'--out_dir={out}', f'--hf_dir={tmp_path / "hf"}')
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


def test_export_bad_input(tmp_path):
    (tmp_path / 'empty').mkdir()
    cases = [([f'--out_dir={tmp_path / "empty"}', f'--hf_dir={tmp_path / "hf"}'], r"empty holds no checkpoint"),
             ([f'--out_dir={tmp_path / "nowhere"}', f'--hf_dir={tmp_path / "hf"}'], r"nowhere'?: no such folder"),
             ([f'--out_dir={tmp_path / "empty"}'], r"give --hf_dir=DIR")]
    for args, message in cases:
        r = export(*args)
        assert r.returncode == 1 and 'Traceback' not in r.stderr and r.stderr.count('error:') == 1, r.stderr
        import re
        assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / 'hf').exists()
