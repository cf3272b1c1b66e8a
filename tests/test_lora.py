"""lora.py: per-shard NF4 against torchao's quantization of the whole weight, merging against the unmerged model,
and quiet torchao imports. train.py's LoRA runs are tests/test_train.py's; export.py's, tests/test_export.py's."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora

ROOT = Path(__file__).resolve().parents[1]


def nf4_fields(q):
    return {name: getattr(q, name)
            for name in ('quantized_data', 'quantized_scalers', 'quantization_factor', 'scaler_mean')}


@pytest.mark.parametrize('shards', [1, 2, 4])
def test_quantize_of_a_shard_is_the_whole_weights_code_for_code(shards):
    # each process quantizes only its rows; with the other shards' block scales (an all-gather in train.py) its
    # codes, scales, factors and scales' mean are bit for bit those of torchao's to_nf4 of the whole weight as
    # FSDP splits it. Rows of very different magnitudes make each shard's own scale mean differ from the whole's
    to_nf4 = pytest.importorskip('torchao.quantization').to_nf4
    g = torch.Generator().manual_seed(0)
    W = torch.randn(512, 256, generator=g) * torch.logspace(-2, 1, 512)[:, None]
    whole = to_nf4(W, 64, 256)
    parts = W.chunk(shards)
    scales = [p.reshape(-1, 64).abs().amax(dim=1) for p in parts]  # what each process contributes
    for rank, (rows, expected) in enumerate(zip(parts, whole.chunk(shards))):  # torch.chunk: torchao's nf4_split
        q = lora.quantize(rows, (lambda own: torch.cat(scales)) if shards > 1 else None)
        for name, value in nf4_fields(expected).items():
            assert torch.equal(nf4_fields(q)[name], value), (shards, rank, name)
        assert torch.equal(q.get_original_weight(), whole.get_original_weight()[rows.shape[0] * rank:][:rows.shape[0]])
        if shards > 1:  # quantized alone, a shard's scales would come out otherwise
            alone = to_nf4(rows, 64, 256)
            assert not torch.equal(alone.quantized_scalers, expected.quantized_scalers)


def test_merged_weights_are_the_base_plus_the_scaled_adapters(released_mpt):
    # one weight at a time, as export.py and sample.py take them: W + (alpha / rank) B A for an adapted layer,
    # the base's own weight otherwise; a base that changed since the run is refused
    from model import MPT
    base = lora.base_fingerprint(released_mpt)
    state = MPT.from_hf(released_mpt).state_dict()
    g = torch.Generator().manual_seed(1)
    name = 'transformer.blocks.1.ffn.up_proj'
    adapters = {f'{name}.lora_A': torch.randn(4, 256, generator=g), f'{name}.lora_B': torch.randn(1024, 4, generator=g)}
    settings = dict(rank=4, alpha=8.0, dropout=0.0, targets=['up_proj'], quantize_base='')
    weight = lora.merged_weights(adapters, settings, base)
    A, B = adapters[f'{name}.lora_A'].double(), adapters[f'{name}.lora_B'].double()
    expected = state[f'{name}.weight'].double() + 2.0 * (B @ A)
    assert torch.allclose(weight(f'{name}.weight').double(), expected, atol=1e-5)
    assert torch.equal(weight('transformer.wte.weight'), state['transformer.wte.weight'].float())
    with pytest.raises(ValueError, match='has changed since the run started'):
        lora.merged_weights(adapters, settings, {**base, 'files': {'model.safetensors': 1}})


def test_torchao_imports_quietly():
    # torchao logs that its CUDA extensions (_C_mxfp8.so, ...) do not load and a deprecation of torch's; NF4
    # needs neither, so quantize_base='nf4' runs print nothing of it
    pytest.importorskip('torchao')
    r = subprocess.run([sys.executable, '-c', 'import lora; assert lora.to_nf4() is not None'], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r.stderr


def test_the_base_fingerprint_sees_weights_changed_in_place(released_mpt, tmp_path):
    # a base whose weights changed at the same file size (the same tensors, other values) is refused; a
    # fingerprint from before the CRCs (sizes alone) still passes for the same files
    import shutil
    from safetensors.torch import load_file, save_file
    base_dir = tmp_path / 'base'
    shutil.copytree(released_mpt, base_dir)
    base = lora.base_fingerprint(base_dir)
    lora.check_base(base)
    lora.check_base({**base, 'files': {f: v[0] for f, v in base['files'].items()}})
    weights = base_dir / 'model.safetensors'
    size = weights.stat().st_size
    save_file({k: v + 1 for k, v in load_file(weights).items()}, weights, metadata={'format': 'pt'})
    assert weights.stat().st_size == size
    with pytest.raises(ValueError, match='has changed since the run started'):
        lora.check_base(base)
