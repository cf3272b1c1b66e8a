"""train.py on CPU with gloo: one process against two, exact resume, Lion against the paper's update, the
sampler, bad inputs, SIGTERM, a NaN loss, llm.c shards, Hugging Face init, and learning on tiny Shakespeare.
The data is written here with numpy (no prepare.py); train.py runs as a subprocess, as a user runs it."""
import collections
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import checkpoints
import common
import data
import hf
import train
from lora import is_adapter, is_nf4
from model import MPT, MPTConfig, config_from_hf

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'tinyshakespeare.txt'
TINY = ['--vocab_size=65', '--d_model=32', '--n_heads=4', '--n_layers=2', '--max_seq_len=16', '--batch_size=4',
        '--gradient_accumulation_steps=4', '--eval_interval=3', '--eval_iters=3', '--log_interval=1',
        '--compile=False', '--device=cpu', '--dtype=float32', '--warmup_iters=2', '--lr_decay_iters=6',
        '--learning_rate=1e-3', '--min_lr=1e-4', '--weight_decay=1e-3', '--resid_pdrop=0.1']


def start(args, procs=1):
    """train.py in a subprocess (under torchrun for procs > 1), one thread per process: CI has 2 cores, and
    threads that wait for a busy core spin."""
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}']
    return subprocess.Popen([*launcher, str(ROOT / 'train.py'), *map(str, args)], text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, expect_ok=True):
    """Wait for it; returns (returncode, stdout, stderr)."""
    stdout, stderr = proc.communicate(timeout=300)
    if expect_ok:
        assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    return proc.returncode, stdout, stderr


def run(args, procs=1, expect_ok=True):
    return finish(start(args, procs), expect_ok)


def metrics(out_dir):
    """{iter: train loss} and {iter: val loss} from metrics.jsonl, later lines winning."""
    train_loss, val_loss = {}, {}
    for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        (val_loss if 'val_loss' in r else train_loss)[r['iter']] = r.get('val_loss', r.get('loss'))
    return train_loss, val_loss


def checkpoint_tensors(path, tmp_path):
    """A sharded checkpoint as one {'model': ..., 'lion': ...} dict of full tensors."""
    dcp_to_torch_save(path, tmp_path / 'converted.pt')
    return torch.load(tmp_path / 'converted.pt')


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
    """nanoGPT's shakespeare_char: 65 characters, the first 90% train and the rest val, as uint16."""
    text = SHAKESPEARE.read_text()
    chars = sorted(set(text))
    codes = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
    ids = np.searchsorted(np.array([ord(c) for c in chars]), codes).astype(np.uint16)
    d = tmp_path_factory.mktemp('shakespeare_char')
    n = int(0.9 * len(ids))
    ids[:n].tofile(d / 'train.bin')
    ids[n:].tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(dict(vocab_size=len(chars), tokenizer='char', chars=''.join(chars))))
    return d


@pytest.fixture(scope='module')
def straight(shakespeare, tmp_path_factory):
    """6 steps in one process, with dropout; checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp('straight')
    run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=6'])
    return out


@pytest.fixture(scope='module')
def no_dropout(shakespeare, tmp_path_factory):
    """The same without dropout: the packed-documents test's reference. With sampling_ckpt=False (what the big
    configs set) it writes no ckpt.pt, and its last line says how to sample instead."""
    out = tmp_path_factory.mktemp('no_dropout')
    _, stdout, _ = run([*TINY, '--resid_pdrop=0.0', f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=6',
                        '--sampling_ckpt=False'])
    assert not (out / 'ckpt.pt').exists() and (out / 'ckpt-000006').is_dir()
    assert stdout.splitlines()[-1].endswith(
        f"; {out / 'ckpt-000006'} is the newest checkpoint (sampling_ckpt=False: no ckpt.pt): python export.py "
        f"--out_dir={out} --hf_dir=DIR, then python sample.py --init_from=DIR"), stdout[-500:]
    return out


# ---- one process against two; resume ---------------------------------------------------------------

def test_two_processes_give_the_losses_of_one(straight, shakespeare, tmp_path):
    # the same global batch (4 x 4 sequences): each process does 2 micro-batches instead of 4, with the same
    # dropout masks (seeded by each micro-batch's place in the global batch). Only the order of the float32
    # sums differs (gradients reduce-scattered, losses all-reduced): measured differences are < 1e-6
    run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / "two"}', '--max_iters=6'], procs=2)
    (one, one_val), (two, two_val) = metrics(straight), metrics(tmp_path / 'two')
    assert sorted(one) == sorted(two) == list(range(6)) and sorted(one_val) == [0, 3, 6]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5)
    for it in one_val:
        assert two_val[it] == pytest.approx(one_val[it], rel=1e-5, abs=1e-5)
    assert one[5] < one[0] - 0.3  # it learns something
    a = checkpoint_tensors(straight / 'ckpt-000006', tmp_path)
    b = checkpoint_tensors(tmp_path / 'two' / 'ckpt-000006', tmp_path)
    for group in ('model', 'lion'):
        for name, t in a[group].items():
            assert torch.allclose(b[group][name], t, atol=1e-5), (group, name)


def test_resume_continues_exactly_and_on_two_processes(straight, shakespeare, tmp_path):
    common = [*TINY, f'--data_dir={shakespeare}']
    half = tmp_path / 'half'
    run([*common, f'--out_dir={half}', '--max_iters=3'])
    run([*common, f'--out_dir={half}', '--max_iters=6', '--init_from=resume'])
    full, full_val = metrics(straight)
    resumed, resumed_val = metrics(half)
    assert resumed == full and resumed_val == full_val  # bit for bit, dropout included
    a = checkpoint_tensors(straight / 'ckpt-000006', tmp_path)
    b = checkpoint_tensors(half / 'ckpt-000006', tmp_path)
    for group in ('model', 'lion'):
        assert a[group].keys() == b[group].keys()
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    # a 1-process checkpoint continued by 2 processes: the same batches and dropout masks, so the same losses
    shutil.copytree(straight, tmp_path / 'two')
    shutil.rmtree(tmp_path / 'two' / 'ckpt-000006')
    _, stdout, _ = run([*common, f'--out_dir={tmp_path / "two"}', '--max_iters=6', '--init_from=resume'], procs=2)
    assert 'resuming' in stdout and 'step 3' in stdout
    ref, ref_val = metrics(straight)
    two, two_val = metrics(tmp_path / 'two')
    for it in range(3, 6):
        assert two[it] == pytest.approx(ref[it], rel=1e-5, abs=1e-5)
    assert two_val[6] == pytest.approx(ref_val[6], rel=1e-5, abs=1e-5)


def test_hsdp_gives_the_losses_of_one_process_and_resumes_on_any_mesh(straight, shakespeare, tmp_path):
    # dp_replicate=2 on 4 processes: 2 replicas, each sharded over 2 processes (HSDP); the same global batch and
    # dropout masks as 1 process, so the same losses and checkpoints. Its checkpoint at step 3 then continues on
    # 1 process and on 4 replicas of 1 shard (dp_replicate=4) as the 1-process run did
    common = [*TINY, f'--data_dir={shakespeare}']
    hsdp = tmp_path / 'hsdp'
    run([*common, f'--out_dir={hsdp}', '--max_iters=6', '--dp_replicate=2'], procs=4)
    (one, one_val), (two, two_val) = metrics(straight), metrics(hsdp)
    assert sorted(two) == list(range(6)) and sorted(two_val) == [0, 3, 6]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), it
    for it in one_val:
        assert two_val[it] == pytest.approx(one_val[it], rel=1e-5, abs=1e-5), it
    a = checkpoint_tensors(straight / 'ckpt-000006', tmp_path)
    b = checkpoint_tensors(hsdp / 'ckpt-000006', tmp_path)
    for group in ('model', 'lion'):
        assert a[group].keys() == b[group].keys()
        for name, t in a[group].items():
            assert torch.allclose(b[group][name], t, atol=1e-5), (group, name)
    for name, procs, mesh in (('one', 1, []), ('replicas', 4, ['--dp_replicate=4'])):
        shutil.copytree(hsdp, tmp_path / name)
        shutil.rmtree(tmp_path / name / 'ckpt-000006')
        _, stdout, _ = run([*common, f'--out_dir={tmp_path / name}', '--max_iters=6', '--init_from=resume', *mesh],
                           procs=procs)
        assert 'resuming' in stdout and 'step 3' in stdout
        resumed, resumed_val = metrics(tmp_path / name)
        for it in range(3, 6):
            assert resumed[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), (name, it)
        assert resumed_val[6] == pytest.approx(one_val[6], rel=1e-5, abs=1e-5), name


def test_context_parallel_gives_the_losses_and_weights_of_one_process(no_dropout, shakespeare, tmp_path):
    # each sequence split over 2 and over 4 processes (context.py's ring, zigzag chunks of 4 and 2 tokens): the
    # one-process losses (train and val) within 1e-5, and after 6 steps the same weights and Lion state; resumed
    common = [*TINY, '--resid_pdrop=0.0', f'--data_dir={shakespeare}', '--max_iters=6', '--sampling_ckpt=False']
    runs = [start([*common, f'--out_dir={tmp_path / f"cp{procs}"}', f'--context_parallel={procs}'], procs)
            for procs in (2, 4)]  # both at once: their startups overlap
    [finish(p) for p in runs]
    for procs in (2, 4):
        out = tmp_path / f'cp{procs}'
        (one, one_val), (cp, cp_val) = metrics(no_dropout), metrics(out)
        assert sorted(cp) == sorted(one) and sorted(cp_val) == sorted(one_val) == [0, 3, 6]
        for it in one:
            assert cp[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), (procs, it)
        for it in one_val:
            assert cp_val[it] == pytest.approx(one_val[it], rel=1e-5, abs=1e-5), (procs, it)
        a = checkpoint_tensors(no_dropout / 'ckpt-000006', tmp_path)
        b = checkpoint_tensors(out / 'ckpt-000006', tmp_path)
        for group in ('model', 'lion'):
            for name, t in a[group].items():
                assert torch.allclose(b[group][name], t, atol=1e-5), (procs, group, name)
    # a cp=2 run's checkpoint of step 3 (DCP: any layout) resumes on 1 process and with context_parallel=4
    resumes = {}
    for name, procs in (('on1', 1), ('on4', 4)):
        shutil.copytree(tmp_path / 'cp2', tmp_path / name)
        shutil.rmtree(tmp_path / name / 'ckpt-000006')
        resumes[name] = start([*common, f'--out_dir={tmp_path / name}', '--init_from=resume',
                               f'--context_parallel={procs}'], procs)
    for name, proc in resumes.items():
        assert 'step 3' in finish(proc)[1]
        resumed, resumed_val = metrics(tmp_path / name)
        for it in range(3, 6):
            assert resumed[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), (name, it)
        assert resumed_val[6] == pytest.approx(one_val[6], rel=1e-5, abs=1e-5), name


def test_context_parallel_with_packed_documents_and_hsdp(lines, tmp_path):
    # documents (lines of about 40 characters) cross the chunks and the processes of a 16-token window: on 1
    # process, and on 4 as 2 replicas (dp_replicate=2) of 2 context-parallel processes each, the same losses
    common = [*TINY, '--resid_pdrop=0.0', f'--data_dir={lines}', '--max_iters=3', '--attn_uses_sequence_id=True']
    both = [start([*common, f'--out_dir={tmp_path / "one"}']),
            start([*common, f'--out_dir={tmp_path / "cp"}', '--context_parallel=2', '--dp_replicate=2'], procs=4)]
    [finish(p) for p in both]
    (one, one_val), (cp, cp_val) = metrics(tmp_path / 'one'), metrics(tmp_path / 'cp')
    assert sorted(one) == sorted(cp) == [0, 1, 2] and sorted(one_val) == sorted(cp_val) == [0, 3]
    for it in one:
        assert cp[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), it
    assert cp_val[3] == pytest.approx(one_val[3], rel=1e-5, abs=1e-5)


SHARDS = """
import json, sys
import torch
import train
from lora import is_nf4
from model import MPTConfig, config_from_hf
released, out, dp_replicate, quantize = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rank, world_size, device, mesh = train.init_distributed('cpu', dp_replicate)
config = MPTConfig(**{**config_from_hf(json.load(open(f'{released}/config.json'))), 'init_device': 'meta'})
lora = dict(rank=4, alpha=8.0, dropout=0.0, targets=['Wqkv'], quantize_base=quantize) if quantize != 'full' else None
model = train.setup_model(config, mesh, dtype='float32', lora=lora, init_weights=False)
train.load_hf_weights(model, released)
fields = ('quantized_data', 'quantized_scalers', 'quantization_factor', 'scaler_mean')
torch.save({n: {a: getattr(train._local(p), a) for a in fields} if is_nf4(p) else train._local(p).detach().clone()
            for n, p in model.named_parameters()}, f'{out}/rank{rank}.pt')
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize('quantize', ['full', 'nf4'])
def test_each_process_loads_its_own_rows_of_a_hugging_face_model(released_mpt, quantize, tmp_path):
    # load_hf_weights on an HSDP mesh of 2 x 2: each process holds rows [r * n/2, (r + 1) * n/2) of every weight
    # (r: its place among the 2 processes that shard a replica), as torch.chunk cuts them; its NF4 weights are,
    # code for code, those of torchao's to_nf4 of the whole weight, cut the same way (torchao's split). A LoRA
    # run's frozen embedding and final norm are whole on every process
    (tmp_path / 'shards.py').write_text(SHARDS)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4',
                           str(tmp_path / 'shards.py'), str(released_mpt), str(tmp_path), '2', quantize],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = MPT.from_hf(released_mpt).state_dict()
    for rank in range(4):
        shards = torch.load(tmp_path / f'rank{rank}.pt', weights_only=False)
        nf4 = [n for n, v in shards.items() if isinstance(v, dict)]
        assert len(nf4) == (2 * 4 if quantize == 'nf4' else 0)
        for name, got in shards.items():
            if is_adapter(name):
                continue
            if name in nf4:
                from torchao.quantization import to_nf4
                expected = to_nf4(base[name].float(), 64, 256).chunk(2)[rank % 2]
                for field, value in got.items():
                    assert torch.equal(value, getattr(expected, field)), (rank, name, field)
            elif quantize == 'nf4' and name in ('transformer.wte.weight', 'transformer.norm_f.weight'):
                assert torch.equal(got, base[name]), (rank, name)  # a LoRA run's frozen root: not sharded
            else:
                assert torch.equal(got, base[name].chunk(2)[rank % 2]), (rank, name)


def test_two_processes_a_bad_setting_is_the_last_line(shakespeare, tmp_path):
    # torchrun reports a failed worker with its own traceback and a summary; train.py writes its one line into
    # the error file torchrun names, so that summary ends with the line ("traceback : error: ...")
    returncode, _, stderr = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / "out"}',
                                 '--gradient_accumulation_steps=3'], procs=2, expect_ok=False)
    line = ("error: gradient_accumulation_steps=3 (micro-batches per step over all processes) does not divide among 2 "
            "processes: make it a multiple of 2")
    last = stderr.rstrip().splitlines()[-2:]
    assert returncode == 1 and last[0].strip() == f"traceback : {line}" and set(last[1]) == {'='}, stderr
    assert f"\n{line}\n" in stderr and 'train.py", line' not in stderr  # rank 0 printed it once, and no traceback of ours


# ---- settings, Lion, the schedule, the sampler (in process) --------------------------------------------

def test_settings_are_the_issues_and_every_mpt_config_field():
    s = train.default_settings()
    named = ('out_dir data_dir init_from max_iters eval_interval eval_iters log_interval batch_size '
             'gradient_accumulation_steps max_seq_len learning_rate min_lr warmup_iters lr_decay_iters weight_decay '
             'beta1 beta2 grad_clip device dtype compile seed activation_checkpointing wandb_log').split()
    assert set(named) <= set(s) and {f.name for f in dataclasses.fields(MPTConfig)} <= set(s)
    assert s['kv_n_heads'] is None and s['init_device'] == 'auto'  # model.py's defaults, as declared



def lion_paper(p, g, m, lr, beta1, beta2, wd, peak_lr):
    """The Lion paper's update for one parameter, with MPT DecoupledLionW's weight decay."""
    if p.dim() >= 2:
        p = p * (1 - wd * lr / peak_lr)
    c = beta1 * m + (1 - beta1) * g
    return p - lr * torch.sign(c), beta2 * m + (1 - beta2) * g


def test_lion_step_is_the_paper_update():
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    exp_avgs = [torch.zeros(s) for s in shapes]
    ref_p, ref_m = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    for step in range(5):
        lr = 0.01 * (step + 1) / 5
        grads = [torch.randn(s, generator=g) for s in shapes]
        train.lion_step(params, grads, exp_avgs, lr, 0.9, 0.99, 0.1, 0.01)
        for i in range(len(shapes)):
            ref_p[i], ref_m[i] = lion_paper(ref_p[i], grads[i], ref_m[i], lr, 0.9, 0.99, 0.1, 0.01)
    for p, m, rp, rm in zip(params, exp_avgs, ref_p, ref_m):
        assert torch.allclose(p, rp, atol=1e-6) and torch.allclose(m, rm, atol=1e-7)


def test_lion_step_in_pieces_is_the_same_update(monkeypatch):
    # lion_step updates pieces of LION_PIECE values at a time (its temporaries are a piece's, not a copy of the
    # model): bit for bit the update of all at once
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (64,)]
    params, grads, exp_avgs = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    assert list(train.chunks([torch.empty(n) for n in (35, 5, 24, 1, 40, 40, 41)], 40)) == \
        [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]
    results = []
    for piece in (1 << 24, 40):  # all in one piece; in pieces of 40 values or fewer (the 35 of (7, 5)...)
        monkeypatch.setattr(train, 'LION_PIECE', piece)
        p, m = [t.clone() for t in params], [t.clone() for t in exp_avgs]
        train.lion_step(p, grads, m, 0.01, 0.9, 0.99, 0.1, 0.01)
        results.append(p + m)
    assert all(torch.equal(a, b) for a, b in zip(*results))


class _InfGrad(torch.autograd.Function):
    """Identity forward; the backward sends on an infinite gradient (NaN where it was 0)."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


@pytest.fixture
def group_of_one():
    """A gloo process group of one in this process, as a plain `python train.py` makes; its 1-D mesh."""
    mesh = train.init_distributed('cpu')[3]
    yield mesh
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize('device_decides', [True, False])
def test_a_non_finite_step_changes_nothing(group_of_one, monkeypatch, device_decides):
    # a step with a NaN loss, or a finite loss but an infinite gradient, leaves every weight and every Lion
    # momentum bit for bit as it was, and so does every step after one (healthy). Decided on the device (a GPU's
    # path), the host reads nothing back in train_step; on a CPU the host reads only the verdict (its bool)
    monkeypatch.setattr(train, 'DEVICE_DECIDES', device_decides)
    config = MPTConfig(vocab_size=65, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, attn_impl='torch')
    model = train.setup_model(config, group_of_one, dtype='float32')
    exp_avgs = train.lion_state(model)
    gen = torch.Generator().manual_seed(0)
    batch = lambda: [tuple(torch.randint(0, 65, (2, 16), generator=gen) for _ in range(2))]
    state = lambda: [train._local(t).clone() for t in [*model.parameters(), *exp_avgs.values()]]
    unchanged = lambda before: all(torch.equal(a, b) for a, b in zip(before, state()))

    def step(**kw):
        with monkeypatch.context() as m:  # any read of a device value in train_step fails the test
            for name in ('item', 'tolist', '__float__') + (('__bool__',) if device_decides else ()):
                m.setattr(torch.Tensor, name, no_host_reads)
            return train.train_step(model, exp_avgs, batch(), 1e-2, 1e-2, 1e-2, 0.9, 0.99, 1.0, **kw)

    def no_host_reads(*args, **kwargs):
        raise AssertionError("train_step waited for the device")

    step()  # Lion's momentum is non-zero from here on
    before = state()
    poison = {'nan loss': lambda m, i, out: out * math.nan, 'inf grad': lambda m, i, out: _InfGrad.apply(out)}
    for what, hook in poison.items():
        handle = model.transformer.blocks[1].register_forward_hook(hook)
        packet = step()
        handle.remove()
        loss, norm, ok, stop = packet.tolist()
        assert ok == 0 and stop == 0 and (math.isnan(loss) if what == 'nan loss' else math.isfinite(loss)), what
        assert not math.isfinite(norm) and unchanged(before), what
        assert step(healthy=packet[2] > 0)[2].item() == 0 and unchanged(before), what  # stays skipped
    assert step()[2].item() == 1 and not unchanged(before)  # a good step does change them


def test_lr_schedule():
    lr = lambda it: train.get_lr(it, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11) and lr(10) == 1.0
    assert lr(60) == pytest.approx(0.55) and lr(110) == lr(1000) == 0.1
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))


def test_sampler_is_deterministic_disjoint_and_world_size_free():
    n, G, B = 50, 8, 2  # 50 windows, 8 per step, micro-batches of 2
    steps = [data.sample_windows(7, n, s * G, G) for s in range(13)]  # 104 windows: crosses two epochs
    assert all(np.array_equal(a, data.sample_windows(7, n, s * G, G)) for s, a in enumerate(steps))
    order = np.concatenate(steps)
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))  # epochs
    assert not np.array_equal(order[:n], order[n:2 * n])  # each epoch its own permutation
    assert not np.array_equal(data.sample_windows(8, n, 0, G), steps[0])  # the seed matters
    for s, ids in enumerate(steps):
        if s * G // n == (s * G + G - 1) // n:  # a step within one epoch draws distinct windows
            assert len(set(ids)) == G
        one = data.rank_windows(ids, 0, 1, B)
        assert len(one) == 4 and all(len(mb) == B for mb in one)
        for world in (2, 4):
            parts = [np.concatenate(data.rank_windows(ids, r, world, B)) for r in range(world)]
            assert np.array_equal(np.concatenate(parts), np.concatenate(one))  # the same global batch
            assert all(len(data.rank_windows(ids, r, world, B)) == 4 // world for r in range(world))
            if len(set(ids)) == G:  # so the ranks' slices are disjoint
                assert sum(len(set(p)) for p in parts) == G


def test_windows_across_files(tmp_path):
    # window k of a file is tokens [k*T, k*T + T + 1); a second file's windows follow the first's
    T = 4
    np.arange(0, 13, dtype=np.uint16).tofile(tmp_path / 'a.bin')  # 13 tokens: 3 windows
    np.arange(100, 106, dtype=np.uint16).tofile(tmp_path / 'b.bin')  # 6 tokens: 1 window
    split = data.load_split(str(tmp_path / '*.bin'), 200, T)
    assert list(split[2]) == [0, 3, 4]
    rows = data.read_windows(split, np.array([3, 0, 2]), T, 200)
    assert rows.tolist() == [[100, 101, 102, 103, 104], [0, 1, 2, 3, 4], [8, 9, 10, 11, 12]]


# ---- bad inputs: one clear message, exit status 1, no traceback ----------------------------------------

def write_bad(kind, d):
    rng = np.random.default_rng(0)
    good = lambda n: rng.integers(0, 65, n).astype(np.uint16)
    good(5000).tofile(d / 'val.bin')
    if kind == 'token':  # a bad id past the part checked at startup: found in a batch
        np.concatenate([good(1 << 20), np.full(1 << 20, 70, np.uint16)]).tofile(d / 'train.bin')
    elif kind == 'short':
        good(10).tofile(d / 'train.bin')
    elif kind == 'int32':
        good(5000).astype(np.int32).tofile(d / 'train.bin')
    elif kind == 'odd':
        (d / 'train.bin').write_bytes(good(5000).tobytes() + b'\0')
    elif kind == 'shard':
        header = np.zeros(256, np.int32)
        header[:3] = [20240520, 1, 6000]  # says 6000 tokens, holds 5000
        (d / 'train.bin').write_bytes(header.tobytes() + good(5000).tobytes())
    elif kind == 'early_token':  # found by the check of each file's start
        np.concatenate([np.full(10, 70, np.uint16), good(5000)]).tofile(d / 'train.bin')
    elif kind == 'meta':
        good(5000).tofile(d / 'train.bin')
        (d / 'meta.json').write_text(json.dumps({'vocab_size': 50257, 'tokenizer': 'gpt2'}))
    elif kind == 'corrupt_meta':
        good(5000).tofile(d / 'train.bin')
        (d / 'meta.json').write_text('{"vocab_size": 65, "tok')  # cut short


@pytest.mark.parametrize('kind,message', [
    ('short', r"train\.bin: 10 tokens, fewer than the max_seq_len \+ 1 = 17"),
    ('int32', r"train\.bin: every other uint16 is 0.*int32"),
    ('odd', r"train\.bin: 10,001 bytes is not a whole number of uint16 tokens"),
    ('shard', r"train\.bin: the shard header says 6,000 tokens"),
    ('early_token', r"train\.bin: token id 70 is >= vocab_size=65"),
])
def test_bad_token_file_is_one_clear_message(tmp_path, capsys, kind, message):
    # in process: the same fail() as the runs below end with, without starting one for each file
    write_bad(kind, tmp_path)
    with pytest.raises(SystemExit) as e:
        data.load_split(str(tmp_path / 'train.bin'), 65, 16)
    stderr = capsys.readouterr().err
    assert e.value.code == 1 and re.search(message, stderr) and stderr.count('error:') == 1, stderr


BAD_RUNS = {  # name: (what write_bad writes, extra arguments, the message, a regular expression)
    'missing': ('nothing', [], r"train\.bin not found: run `python prepare\.py"),
    'token': ('token', [], r"train\.bin: token id 70 \(in tokens .*\) is >= vocab_size=65"),
    'meta': ('meta', [], r"meta\.json says vocab_size=50257 but the model has vocab_size=65"),
    'setting': ('nothing', ['--learning_rat=1'], r"unknown setting 'learning_rat'.*did you mean learning_rate"),
    'no_checkpoint': ('nothing', ['--init_from=resume'], r"init_from='resume' but .* holds no checkpoint"),
    'shape': ('straight', ['--init_from=resume', '--d_model=64', '--n_layers=3'],
              r"model differs from the checkpoint's .*\(d_model 32 -> 64, n_layers 2 -> 3\)"),
    'resume_length': ('straight', ['--init_from=resume', '--max_seq_len=32'],
                      r"model differs from the checkpoint's .*\(max_seq_len 16 -> 32\).*--init_from=.*ckpt-000006"),
    'seed': ('straight', ['--init_from=resume', '--seed=7'], r"trained with seed=1337, not 7: resume with --seed=1337"),
    'attention': ('nothing', ['--attn_impl=flash'], r"attn_impl='flash' \(the flash-attn package\) runs on CUDA only"),
    'corrupt_meta': ('corrupt_meta', [], r"meta\.json is unreadable"),
    'eval_len': ('straight', ['--init_from=resume', '--eval_only=True', '--eval_seq_lens=[16, 0]'],
                 r"eval_seq_lens=\[16, 0\]: use positive whole numbers"),
    'eval_too_long': ('straight', ['--init_from=resume', '--eval_only=True', '--eval_seq_lens=[10000000]'],
                      r"eval_seq_lens: 10000000 tokens is longer than a val file"),
    'sequence_id': ('nothing', ['--attn_uses_sequence_id=True'],
                    r"attn_uses_sequence_id=True tells documents apart by their end-of-text token, but .*meta\.json "
                    r"does not exist"),
    'lora_dropout': ('nothing', ['--lora_rank=4', '--lora_dropout=1.5'], r"lora_dropout=1\.5: a probability in \[0, 1\)"),
    'lora_alpha': ('nothing', ['--lora_rank=4', '--lora_alpha=None'], r"lora_alpha=None: a positive number"),
    'init_from': ('nothing', ['--init_from=somewhere'], r"init_from='somewhere': use 'scratch', 'resume', a Hugging Face"),
    'dp_replicate': ('nothing', ['--dp_replicate=3'], r"dp_replicate=3: the 1 processes must split into dp_replicate equal"),
    'context_parallel': ('nothing', ['--context_parallel=3', '--attn_impl=flash'],
                         r"error: context_parallel=3: the 1 processes of each replica do not split into groups of 3\n"
                         r"error: context_parallel=3 cuts each sequence into 6 equal chunks: 16 tokens do not divide; "
                         r"use multiples of 6\nerror: context_parallel=3 needs attn_impl='triton' or 'torch'"),
    # settings out of range: each one line, all of them, before any work
    'ranges': ('nothing', ['--batch_size=0', '--eval_interval=0', '--learning_rate=-1', '--warmup_iters=-5',
                           '--device=gpu'],
               r"\nerror: batch_size=0: use a whole number >= 1 \(micro-batch: sequences per process .*\)\n"
               r"error: eval_interval=0: use a whole number >= 1 .*\nerror: warmup_iters=-5: use a whole number >= 0\n"
               r"error: learning_rate=-1.0: use a number >= 0 \(the peak, after warmup\)\n"
               r"error: device='gpu': use 'cpu', 'cuda' or 'cuda:N' \(the N-th GPU\)\n\Z"),
}


@pytest.fixture(scope='module')
def bad_runs(straight, shakespeare, tmp_path_factory):
    """All the bad-input runs at once: each stops at startup, so together they take about one's time."""
    procs = {}
    for name, (kind, args, _) in BAD_RUNS.items():
        d = tmp_path_factory.mktemp(name)
        write_bad(kind, d)
        data_dir, out_dir = (shakespeare, d / 'out') if kind == 'straight' else (d, d / 'out')
        if kind == 'straight':  # a copy each: one run at a time holds an out_dir
            shutil.copytree(straight, out_dir)
        procs[name] = start([*TINY, f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--max_iters=9', *args])
    return {name: finish(p, expect_ok=False) for name, p in procs.items()}


@pytest.mark.parametrize('name', BAD_RUNS)
def test_bad_run_is_one_clear_message(bad_runs, name):
    returncode, _, stderr = bad_runs[name]
    assert returncode == 1 and 'Traceback' not in stderr, stderr
    assert re.search(BAD_RUNS[name][2], stderr), stderr
    assert stderr.count('error:') == (BAD_RUNS[name][2].count('error: ') or 1)


# ---- faults -------------------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_that_resumes(shakespeare, tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, str(ROOT / 'train.py'), *TINY, f'--data_dir={shakespeare}', f'--out_dir={out}',
           '--max_iters=100000', '--eval_interval=100000']
    proc = subprocess.Popen(cmd, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = out / 'metrics.jsonl'
    while not log.exists() or log.read_text().count('"loss"') < 3:  # a few steps done
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in stderr, stderr
    saved = checkpoints.checkpoint_dirs(out)
    assert len(saved) == 1 and 'SIGTERM: saved' in stdout
    step = int(saved[0].rsplit('-', 1)[1])
    assert step >= 3
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume',
                        f'--max_iters={step + 2}'])
    assert f'step {step}' in stdout
    losses, _ = metrics(out)
    assert {step, step + 1} <= set(losses) and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize('procs', [1, 2])
def test_sigterm_during_an_evaluation_stops_it_at_once(straight, shakespeare, tmp_path, procs):
    # resumed at step 6, the run's last evaluation (step 9) is long; SIGTERM during it: the evaluation stops at
    # once (all processes together), the checkpoint of step 9 (the last finished step) is saved, no step after it
    # is trained, and the run exits 0 with no traceback
    out = tmp_path / 'out'
    shutil.copytree(straight, out)
    proc = start([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume', '--max_iters=9',
                  '--eval_iters=100000'], procs)
    deadline, seen = time.time() + 120, ''
    while 'iter 8: loss' not in seen:  # settle's line for step 8 comes just before the evaluation at step 9
        line = proc.stdout.readline()
        assert line and time.time() < deadline, seen
        seen += line
    time.sleep(1)
    signalled = time.time()
    # under torchrun the workers get it (torchrun itself, signalled, exits 1 with its own traceback whatever its
    # workers do: see the README)
    for pid in [proc.pid] if procs == 1 else _children(proc.pid):
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in stderr, stderr[-3000:]
    assert time.time() - signalled < 20 and 'SIGTERM: saved' in stdout
    assert [Path(d).name for d in checkpoints.checkpoint_dirs(out)][-1] == 'ckpt-000009'
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert not [r for r in rows if r['iter'] >= 9 and 'loss' in r] and not [r for r in rows if r['iter'] == 9 and 'val_loss' in r]


def test_sigterm_to_torchrun_itself_saves_the_last_step(shakespeare, tmp_path):
    # the signal sent to torchrun (a cluster's scheduler may signal only the launcher): it forwards SIGTERM to the
    # workers and waits for them; they save the last finished step, which resumes. torchrun itself then exits 1
    # with its own SignalException traceback (torch.distributed.launcher.api re-raises it; nothing a worker can
    # change), which is why this test checks the saved state, not torchrun's exit status
    out = tmp_path / 'out'
    proc = start([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=100000',
                  '--eval_interval=100000'], 2)
    deadline, log = time.time() + 180, out / 'metrics.jsonl'
    while not log.exists() or log.read_text().count('"loss"') < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert 'SIGTERM: saved' in stdout, stderr[-3000:]
    saved = checkpoints.checkpoint_dirs(out)
    assert len(saved) == 1 and not list(out.glob('*.tmp'))
    step = int(saved[0].rsplit('-', 1)[1])
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume',
                        f'--max_iters={step + 2}'])
    assert f'step {step}' in stdout


def _children(pid):
    """The pids of a process's children (torchrun's workers), from /proc."""
    found = []
    for d in os.listdir('/proc'):
        try:
            if d.isdigit() and open(f'/proc/{d}/stat').read().rsplit(')', 1)[1].split()[1] == str(pid):
                found.append(int(d))
        except OSError:
            pass
    return found


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(straight, shakespeare, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(straight, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.glob('ckpt-*/**/*') if p.is_file()}
    # Lion moves every weight by lr each step: the loss explodes
    returncode, _, stderr = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume',
                                 '--max_iters=20', '--learning_rate=1e9', '--min_lr=1e9'], expect_ok=False)
    assert returncode == 1 and 'Traceback' not in stderr
    assert re.search(r"iter \d+: the loss is (nan|inf).*last good one", stderr), stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.glob('ckpt-*/**/*') if p.is_file()}
    assert after == before and [Path(d).name for d in checkpoints.checkpoint_dirs(out)] == ['ckpt-000003', 'ckpt-000006']


# ---- nothing lost, nothing silently wrong: one run per out_dir, checked checkpoints, a full disk, Ctrl-C ----------

def files_of(out, pattern='ckpt-*/*'):
    """{relative path: bytes} of the files under out that match pattern."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(Path(out).glob(pattern)) if p.is_file()}


def steps_once(out_dir):
    """metrics.jsonl's rows: every line is JSON, and no step has two train rows or two evaluations."""
    rows = [json.loads(line) for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines()]
    keys = [(r['iter'], 'val_loss' in r) for r in rows]
    assert len(keys) == len(set(keys)), keys
    return rows


def test_two_runs_on_one_out_dir_the_second_is_refused(straight, shakespeare, tmp_path):
    # one run holds out_dir to its end; a second started meanwhile is one line naming it, and every file left is
    # the holder's (its losses are the straight run's: same settings). The holder is paused (SIGSTOP) while the
    # second tries, so that on a busy machine the first cannot have finished before the second starts
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=6']
    first = start(args)
    lock, deadline = out / 'train.lock', time.time() + 120
    while not (lock.exists() and f'{first.pid}' in lock.read_text()):  # the first holds out_dir
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = start(args)
        results = {second.pid: finish(second, expect_ok=False)}
    finally:
        os.kill(first.pid, signal.SIGCONT)
    results[first.pid] = finish(first, expect_ok=False)
    ok = [pid for pid, r in results.items() if r[0] == 0]
    refused = [r for r in results.values() if r[0] == 1]
    assert len(ok) == 1 and len(refused) == 1, results
    stderr = refused[0][2]
    assert 'Traceback' not in stderr and stderr.count('error:') == 1, stderr
    assert re.search(rf"{re.escape(str(out))} is in use by another run \(host {re.escape(os.uname().nodename)}, "
                     rf"pid {ok[0]}, started 20\d\d-.*\): wait for it to end, or choose another out_dir",
                     stderr), stderr
    steps_once(out)
    assert metrics(out) == metrics(straight)
    assert [Path(d).name for d in checkpoints.checkpoint_dirs(out)] == ['ckpt-000003', 'ckpt-000006']
    assert all(checkpoints.verify(d) == (None, True) for d in checkpoints.checkpoint_dirs(out))
    assert not (out / 'train.lock').exists()  # given back at the end


def no_locks(fd, operation):  # flock on a filesystem that has no locks
    raise OSError(errno.ENOLCK, 'No locks available')


def test_a_lock_is_taken_over_only_from_a_run_that_ended(tmp_path, monkeypatch):
    # in process: lock_out_dir against a live holder (a process holding the flock), a dead one of this host,
    # one of another host, and on a filesystem without locks
    out = tmp_path / 'out'
    out.mkdir()
    lock = out / 'train.lock'
    holder = subprocess.Popen([sys.executable, '-c', (
        "import fcntl, json, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, json.dumps(dict(host=os.uname().nodename, pid=os.getpid(), started='then')).encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        problem, note = common.lock_out_dir(str(out))
        assert problem == (f"{out} is in use by another run (host {os.uname().nodename}, pid {holder.pid}, started "
                           f"then): wait for it to end, or choose another out_dir") and note is None
        # no locks on this filesystem: the file alone tells, and it names a live process of this host
        monkeypatch.setattr(common.fcntl, 'flock', no_locks)
        assert 'is in use by another run' in common.lock_out_dir(str(out))[0]
        monkeypatch.undo()
    finally:
        holder.communicate('')
    assert lock.exists() and common._lock is None  # the holder died without removing it: the kernel lock is gone
    problem, note = common.lock_out_dir(str(out))
    assert problem is None and re.fullmatch(rf"note: {re.escape(str(lock))} was left by a run that has ended \(host "
                                            rf".*, pid {holder.pid}, started then\); this run takes it over", note)
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    common.release_out_dir()
    assert not lock.exists() and out.is_dir()  # out_dir was there before: it stays
    lock.write_text(json.dumps(dict(host='node-7', pid=1, started='then')))  # another host's: it may live
    problem, _ = common.lock_out_dir(str(out))
    assert problem == (f"{out} is in use by another run (host node-7, pid 1, started then): if that run has ended, "
                       f"delete {lock}, or choose another out_dir")
    lock.write_text(json.dumps(dict(host=os.uname().nodename, pid=holder.pid, started='then')))  # without locks
    monkeypatch.setattr(common.fcntl, 'flock', no_locks)
    problem, note = common.lock_out_dir(str(out))
    assert problem is None and 'this run takes it over' in note
    common.release_out_dir()
    new = tmp_path / 'new'  # an out_dir the run made, and left empty: removed with the lock
    assert common.lock_out_dir(str(new)) == (None, None) and new.is_dir()
    common.release_out_dir()
    assert not new.exists()


def damage(kind, ckpt):
    """Damage a copy of a checkpoint as a disk, a copy cut short or a careless hand would."""
    shard, meta = ckpt / '__0_0.distcp', ckpt / '.metadata'
    if kind == 'truncated':
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    elif kind == 'overwritten':  # the same size, 64 bytes of zeros in the middle
        b = bytearray(shard.read_bytes())
        b[len(b) // 2:len(b) // 2 + 64] = bytes(64)
        shard.write_bytes(b)
    elif kind == 'metadata':
        b = bytearray(meta.read_bytes())
        b[100] ^= 0xFF
        meta.write_bytes(b)
    elif kind == 'train_json':
        (ckpt / 'train.json').write_text('{"iter_num": 6, "data_po')
    elif kind == 'no_train_json':
        (ckpt / 'train.json').unlink()
    elif kind == 'manifest':
        m = json.loads((ckpt / 'manifest.json').read_text())
        m['files']['__0_0.distcp'][0] += 1
        (ckpt / 'manifest.json').write_text(json.dumps(m))
    else:
        raise ValueError(kind)


DAMAGED = {  # kind: what the line says is wrong with ckpt-000006
    'truncated': r"__0_0\.distcp has [\d,]+ bytes, not the [\d,]+ it was written with \(truncated\)",
    'overwritten': r"__0_0\.distcp does not match its checksum: its bytes changed after it was written",
    'metadata': r"\.metadata does not match its checksum: its bytes changed after it was written",
    'train_json': r"train\.json has [\d,]+ bytes, not the [\d,]+ it was written with \(truncated\)",
    'no_train_json': r"train\.json is missing",
    'manifest': r"manifest\.json is damaged \(it does not match its own checksum\)",
}


def damaged_line(out, kind):
    return (rf"error: {re.escape(str(out / 'ckpt-000006'))} cannot be resumed: {DAMAGED[kind]}\. The newest complete "
            rf"checkpoint is {re.escape(str(out / 'ckpt-000003'))}: resume it with --init_from=resume --resume_step=3 "
            rf"\(the checkpoints after it are then moved into {re.escape(str(out))}/superseded/\)\n")


@pytest.mark.parametrize('kind', DAMAGED)
def test_a_damaged_checkpoint_is_one_line_that_names_the_newest_complete_one(straight, group_of_one, tmp_path,
                                                                             capsys, kind):
    # in process, choose_resume (what init_from=resume runs first) on each kind of damage; fault_runs below shows
    # two of them in a whole run
    out = tmp_path / 'out'
    shutil.copytree(straight, out)
    damage(kind, out / 'ckpt-000006')
    before = files_of(out)
    with pytest.raises(SystemExit) as e:
        checkpoints.choose_resume(str(out), -1)
    stderr = capsys.readouterr().err
    assert e.value.code == 1 and stderr.count('error:') == 1 and re.fullmatch(damaged_line(out, kind), stderr), stderr
    assert files_of(out) == before  # nothing touched, the damaged one included
    assert checkpoints.choose_resume(str(out), 3)[0] == str(out / 'ckpt-000003')


@pytest.fixture(scope='module')
def fault_runs(straight, shakespeare, released_mpt, released_sft, tmp_path_factory):
    """Whole runs that end at startup or soon after, all at once: a truncated and an overwritten newest checkpoint,
    a checkpoint from before manifests that then meets a NaN, and data tokenized otherwise than the Hugging Face
    base is. {name: (out_dir, its checkpoints' files before the run, (returncode, stdout, stderr))}"""
    root = tmp_path_factory.mktemp('faults')
    procs = {}
    for kind in ('truncated', 'overwritten'):
        out = root / kind
        shutil.copytree(straight, out)
        damage(kind, out / 'ckpt-000006')
        procs[kind] = out, [*TINY, f'--data_dir={shakespeare}', '--init_from=resume', '--max_iters=9']
    out = root / 'legacy'  # no manifests: loaded unverified, so a NaN after it does not call it good
    shutil.copytree(straight, out)
    for m in out.glob('ckpt-*/manifest.json'):
        m.unlink()
    procs['legacy'] = out, [*TINY, f'--data_dir={shakespeare}', '--init_from=resume', '--max_iters=20',
                            '--learning_rate=1e9', '--min_lr=1e9']
    # the tiny "released" MPT fully fine-tuned on characters, and with LoRA on GPT-2's ids (which fit its 512)
    gpt2 = root / 'data_gpt2'
    gpt2.mkdir()
    for f in ('train.bin', 'val.bin'):
        shutil.copy(released_sft / f, gpt2 / f)
    (gpt2 / 'meta.json').write_text(json.dumps(dict(tokenizer='gpt2', vocab_size=50257, eot_token=50256)))
    for name, data, extra in (('char', shakespeare, []), ('gpt2', gpt2, ['--lora_rank=4'])):
        procs[name] = root / f'out_{name}', [*LORA[:-2], f'--init_from={released_mpt}', f'--data_dir={data}',
                                             '--max_iters=2', *extra]
    started = {name: (out, files_of(out), start([*args, f'--out_dir={out}'])) for name, (out, args) in procs.items()}
    return {name: (out, before, finish(p, expect_ok=False)) for name, (out, before, p) in started.items()}


@pytest.mark.parametrize('kind', ['truncated', 'overwritten'])
def test_a_run_on_a_damaged_checkpoint_is_one_line(fault_runs, kind):
    out, before, (returncode, _, stderr) = fault_runs[kind]
    assert returncode == 1 and 'Traceback' not in stderr and stderr.count('error:') == 1, stderr
    assert re.search(damaged_line(out, kind), stderr), stderr
    assert files_of(out) == before


def test_resume_step_continues_an_older_checkpoint_exactly(fault_runs, straight, shakespeare):
    # the run whose ckpt-000006 was overwritten goes on from ckpt-000003: the damaged checkpoint, the ckpt.pt and
    # the metrics rows of after step 3 move into superseded/, and the run then ends as the straight one did
    out, before, _ = fault_runs['overwritten']
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume',
                        '--resume_step=3', '--max_iters=6'])
    assert re.search(r"verified .*ckpt-000003: 3 files, .* kB, checksums read in [\d.]+ s", stdout), stdout
    assert re.search(r"moved what .* held after step 3 \(checkpoints, metrics\) into .*superseded/\d{8}-\d{6}", stdout)
    [aside] = (out / 'superseded').iterdir()
    assert files_of(aside, 'ckpt-000006/*') == {k: v for k, v in before.items() if k.parts[0] == 'ckpt-000006'}
    assert (aside / 'ckpt.pt').is_file() and sorted(json.loads(line)['iter'] for line in
                                                    (aside / 'metrics.jsonl').read_text().splitlines()) == [3, 4, 5, 6]
    steps_once(out)
    assert metrics(out) == metrics(straight)  # exactly as if nothing had happened
    shard = 'ckpt-000006/__0_0.distcp'
    assert files_of(out, shard) == files_of(straight, shard) and checkpoints.verify(out / 'ckpt-000006') == (None, True)


def test_a_nan_after_an_unverified_checkpoint_does_not_call_it_good(fault_runs):
    out, before, (returncode, stdout, stderr) = fault_runs['legacy']
    assert returncode == 1 and 'Traceback' not in stderr and stderr.count('error:') == 1, stderr
    assert re.search(r"warning: .*ckpt-000006 was written before checkpoints carried checksums: it is loaded "
                     r"unverified", stdout), stdout
    assert re.search(r"iter \d+: the loss is (nan|inf); the step was skipped and the run stops without saving\. No "
                     r"checkpoint is known to be good: .*ckpt-000006 was written before checkpoints carried checksums",
                     stderr), stderr
    assert 'last good one' not in stderr and files_of(out) == before


@pytest.mark.parametrize('name', ['char', 'gpt2'])
def test_a_run_on_data_in_another_tokenizer_than_the_bases_is_one_line(fault_runs, released_mpt, name):
    # before, both trained (loss ~10 on the GPT-2 ids), and export shipped the base's tokenizer with the result
    out, _, (returncode, _, stderr) = fault_runs[name]
    assert returncode == 1 and 'Traceback' not in stderr and stderr.count('error:') == 1, stderr
    base = re.escape(str(released_mpt))
    assert re.search(rf"error: .*meta\.json: the data was tokenized with {name}, not with {base}'s own tokenizer, so "
                     rf"its token ids mean other tokens to the model: re-run `python prepare\.py \.\.\. "
                     rf"--tokenizer={base}` for this data\n", stderr), stderr
    assert not out.exists()  # the run made out_dir, and took it away again with nothing in it


def test_check_tokenizer_compares_content_vocabulary_and_end_of_text(released_mpt, released_sft, tmp_path):
    # in process, the check that init_from=<Hugging Face dir> runs (full, LoRA and QLoRA alike) on each case
    base, meta_path = str(released_mpt), str(released_sft / 'meta.json')
    meta = json.loads((released_sft / 'meta.json').read_text())
    assert hf.check_tokenizer(meta, meta_path, base) == (None, None)  # prepared with --tokenizer=base
    redo = f"re-run `python prepare.py ... --tokenizer={base}` for this data"
    tok = json.loads((released_mpt / 'tokenizer.json').read_text())
    tok['model']['merges'] = tok['model']['merges'][:-1]  # another BPE of the same vocabulary
    (tmp_path / 'tokenizer.json').write_text(json.dumps(tok))
    other = {**meta, 'tokenizer': str(tmp_path), 'tokenizer_file': str(tmp_path / 'tokenizer.json')}
    assert hf.check_tokenizer(other, meta_path, base) == (
        f"{meta_path}: the data was tokenized with {tmp_path / 'tokenizer.json'}, not with {base}'s own tokenizer "
        f"(their tokenizer.json files differ): {redo}", None)
    copy = tmp_path / 'copy'  # the same tokenizer elsewhere, formatted otherwise: the same
    copy.mkdir()
    original = json.loads((released_mpt / 'tokenizer.json').read_text())
    (copy / 'tokenizer.json').write_text(json.dumps(original, indent=4))
    same = {**meta, 'tokenizer_file': str(copy / 'tokenizer.json')}
    assert hf.check_tokenizer(same, meta_path, base) == (None, None)
    problem, _ = hf.check_tokenizer({**meta, 'eot_token': 3}, meta_path, base)
    assert problem.endswith("own tokenizer (end-of-text id 3 vs 0): " + redo)
    gone = {**meta, 'tokenizer_file': str(tmp_path / 'gone' / 'tokenizer.json')}
    assert hf.check_tokenizer(gone, meta_path, base)[1].startswith(
        f"warning: {meta_path} says the data was tokenized with {gone['tokenizer_file']}, which is gone")
    problem, _ = hf.check_tokenizer({**gone, 'vocab_size': 600}, meta_path, base)
    assert "(vocab_size 600 vs 500)" in problem
    old = {k: v for k, v in meta.items() if k not in ('tokenizer', 'tokenizer_file')}  # an older prepare.py's
    assert hf.check_tokenizer(old, meta_path, base) == (None, (
        f"warning: {meta_path} records no tokenizer (an older prepare.py wrote it), so it cannot be checked against "
        f"the model's: unless the data was prepared with --tokenizer={base}, {redo}"))
    assert hf.check_tokenizer({}, meta_path, base)[1].startswith(f"warning: {meta_path} does not exist")
    assert hf.check_tokenizer(meta, meta_path, str(tmp_path / 'gone'))[1] == (
        f"warning: {tmp_path / 'gone'} has no tokenizer.json, so the data's tokenizer cannot be checked against the "
        f"model's")


def test_a_killed_run_resumes_with_each_step_once_in_metrics(straight, shakespeare, tmp_path):
    # kill -9 a few steps after its checkpoint at 3 (and leave a line cut short): the resume redoes those steps,
    # and metrics.jsonl ends with each step once, as the straight run's; the dead run's lock is taken over
    out = tmp_path / 'out'
    proc = start([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=100000'])
    deadline = time.time() + 120
    while not (out / 'metrics.jsonl').exists() or '"iter": 4, "loss"' not in (out / 'metrics.jsonl').read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    assert (out / 'train.lock').exists()
    with open(out / 'metrics.jsonl', 'a') as f:
        f.write('{"iter": 5, "lo')
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--init_from=resume', '--max_iters=6'])
    assert re.search(r"note: .*train\.lock was left by a run that has ended \(host .*, pid \d+, started .*\); this run "
                     r"takes it over", stdout), stdout
    assert '1 unreadable line(s) dropped' in stdout
    steps_once(out)
    assert metrics(out) == metrics(straight)


def test_a_full_disk_during_a_save_removes_it_and_keeps_the_others(group_of_one, tmp_path, monkeypatch, capsys):
    # in process, a writer that fails half-way as torch's does on a full disk ("unexpected pos", no errno): one
    # line naming the folder, the free space and the size; the partial save removed; the checkpoint before intact
    config = MPTConfig(vocab_size=65, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, attn_impl='torch')
    model = train.setup_model(config, group_of_one, dtype='float32')
    exp_avgs = train.lion_state(model)
    out = tmp_path / 'out'
    out.mkdir()
    info = lambda step: dict(iter_num=step)
    checkpoints.save_checkpoint(str(out), model, exp_avgs, info(1), keep=3)
    before = files_of(out)
    real_save = checkpoints.dcp.save
    usage = collections.namedtuple('usage', 'total used free')

    def full_disk_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        shard = Path(checkpoint_id) / '__0_0.distcp'
        shard.write_bytes(shard.read_bytes()[:1000])
        monkeypatch.setattr(checkpoints.shutil, 'disk_usage', lambda path: usage(10 ** 9, 10 ** 9, 4096))
        error = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
        raise checkpoints.dcp.CheckpointException('write', {0: (error, None)})
    monkeypatch.setattr(checkpoints.dcp, 'save', full_disk_save)
    with pytest.raises(SystemExit) as e:
        checkpoints.save_checkpoint(str(out), model, exp_avgs, info(2), keep=3)
    stderr = capsys.readouterr().err
    assert e.value.code == 1 and stderr.count('error:') == 1, stderr
    assert re.fullmatch(rf"error: disk full while writing checkpoint ckpt-000002: {re.escape(str(out))} has 4\.1 kB "
                        rf"free with the partial save removed, and it needs more than [\d.]+ kB; "
                        rf"{re.escape(str(out / 'ckpt-000001'))} and the checkpoints before it are intact: free some "
                        rf"space, then continue with --init_from=resume\n", stderr), stderr
    assert sorted(p.name for p in out.iterdir()) == ['ckpt-000001'] and files_of(out) == before
    # ckpt.pt likewise (written through a file object, a full disk is an OSError there), and it carries the CRC
    # of its tensors
    monkeypatch.undo()
    checkpoints.save_for_sampling(str(out / 'ckpt.pt'), model, dict(iter_num=1))
    good = (out / 'ckpt.pt').read_bytes()
    saved = torch.load(out / 'ckpt.pt')
    assert saved['crc32'] == checkpoints.state_crc(saved['model']) != checkpoints.state_crc(
        {k: v + (k == 'transformer.wte.weight') for k, v in saved['model'].items()})

    def full_disk_torch_save(obj, f):
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(checkpoints.torch, 'save', full_disk_torch_save)
    with pytest.raises(SystemExit):
        checkpoints.save_for_sampling(str(out / 'ckpt.pt'), model, dict(iter_num=2))
    stderr = capsys.readouterr().err
    assert re.fullmatch(rf"error: disk full while writing {re.escape(str(out / 'ckpt.pt'))}: .* has [\d.]+ [kMGT]B "
                        rf"free with the partial save removed, and it needs more than [\d.]+ [kMGT]B; .*ckpt-000001 "
                        rf"and the checkpoints before it are intact: free some space, then continue with "
                        rf"--init_from=resume\n",
                        stderr), stderr
    assert sorted(p.name for p in out.iterdir()) == ['ckpt-000001', 'ckpt.pt']
    assert (out / 'ckpt.pt').read_bytes() == good


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs filesystems (size in kB) under tmp_path: a real full disk. Needs root (CI may not be)."""
    mounted = []

    def mount(name, kb):
        path = tmp_path / name
        path.mkdir()
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={kb}k', 'tmpfs', str(path)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(['umount', str(path)])


def test_a_full_disk_is_one_line_and_loses_nothing(straight, shakespeare, tmpfs):
    # a checkpoint of this model holds 214.5 kB of tensors and takes 270 kB. 'during': 236 kB, room for the
    # tensors but not the checkpoint, so its first save fails half-way; 'before': 600 kB, where ckpt-000003 and
    # ckpt.pt fit and ckpt-000006 cannot, as ckpt-000003's size says before anything is written
    during, before = tmpfs('during', 236), tmpfs('before', 600)
    args = [*TINY, f'--data_dir={shakespeare}', '--max_iters=6']
    procs = [start([*args, f'--out_dir={d / "out"}']) for d in (during, before)]
    (rc1, _, err1), (rc2, _, err2) = [finish(p, expect_ok=False) for p in procs]
    assert rc1 == 1 and 'Traceback' not in err1 and err1.count('error:') == 1, err1
    assert re.search(rf"error: disk full while writing checkpoint ckpt-000003: {re.escape(str(during / 'out'))} has "
                     rf"2\d\d\.\d kB free with the partial save removed, and it needs more than 2\d\d\.\d kB; there "
                     rf"is no earlier checkpoint: free some space, then start the run again\n", err1), err1
    assert sorted(p.name for p in (during / 'out').iterdir()) == ['metrics.jsonl']  # the partial save is gone
    assert rc2 == 1 and 'Traceback' not in err2 and err2.count('error:') == 1, err2
    assert re.search(rf"error: disk full: {re.escape(str(before / 'out'))} has 2\d\d\.\d kB free, and checkpoint "
                     rf"ckpt-000006 needs about 270\.\d kB: nothing was written, {re.escape(str(before / 'out'))}/"
                     rf"ckpt-000003 and the checkpoints before it are intact; free some space, then continue with "
                     rf"--init_from=resume\n", err2), err2
    assert sorted(p.name for p in (before / 'out').iterdir()) == ['ckpt-000003', 'ckpt.pt', 'metrics.jsonl']
    assert checkpoints.verify(before / 'out' / 'ckpt-000003') == (None, True)
    shard = 'ckpt-000003/__0_0.distcp'
    assert files_of(before / 'out', shard) == files_of(straight, shard)  # the straight run's very weights
    # with room again the run goes on, as if nothing had happened
    subprocess.run(['mount', '-o', 'remount,size=2m', str(before)], check=True)
    run([*args, f'--out_dir={before / "out"}', '--init_from=resume'])
    steps_once(before / 'out')
    assert metrics(before / 'out') == metrics(straight)


def test_ctrl_c_saves_as_sigterm_does_and_a_second_aborts_at_once(shakespeare, tmp_path):
    out = tmp_path / 'out'
    args = [*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', '--max_iters=100000', '--eval_interval=100000',
            '--batch_size=16']  # steps of ~0.3 s: the second Ctrl-C below comes while the first is honoured

    def started(extra=()):
        """train.py once it has logged two steps, stdout to a file (a pipe nobody reads would fill)."""
        rows = (out / 'metrics.jsonl').read_text().count('"loss"') if (out / 'metrics.jsonl').exists() else 0
        with open(tmp_path / 'stdout', 'w') as stdout:
            proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args, *extra], text=True, stdout=stdout,
                                    env={**os.environ, 'OMP_NUM_THREADS': '1'}, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (out / 'metrics.jsonl').exists() or (out / 'metrics.jsonl').read_text().count('"loss"') < rows + 2:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        return proc

    proc = started()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stdout = (tmp_path / 'stdout').read_text()
    assert proc.returncode == 0 and 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr
    assert 'Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts at once' in stderr
    [saved] = checkpoints.checkpoint_dirs(out)
    assert re.search(rf"Ctrl-C: saved {re.escape(saved)}; continue with --init_from=resume", stdout), stdout
    assert checkpoints.verify(saved) == (None, True) and not (out / 'train.lock').exists()
    before = files_of(out, 'ckpt-??????/*')
    # resumed, and a second Ctrl-C while the first is being honoured: the process ends at once (killed by SIGINT,
    # nothing saved), and the checkpoint before stays as it was
    proc = started(['--init_from=resume'])
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:
        if 'Ctrl-C again aborts' in line:
            break
    proc.send_signal(signal.SIGSTOP)  # held still, the second Ctrl-C waits for it to move again: no race
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert files_of(out, 'ckpt-??????/*') == before and checkpoints.checkpoint_dirs(out) == [saved]


# ---- other inputs -------------------------------------------------------------------------------------

def test_llmc_shards_give_the_windows_of_one_file(shakespeare, tmp_path):
    # 2m windows of one file = m windows in each of two shards that share the boundary token
    T, m = 16, 500
    tokens = np.fromfile(shakespeare / 'train.bin', dtype=np.uint16)[:2 * m * T + 1]
    (tmp_path / 'raw').mkdir()
    tokens.tofile(tmp_path / 'raw' / 'train.bin')
    shutil.copy(shakespeare / 'val.bin', tmp_path / 'raw' / 'val.bin')
    for i, part in enumerate([tokens[:m * T + 1], tokens[m * T:]]):
        header = np.zeros(256, np.int32)
        header[:3] = [20240520, 1, len(part)]
        (tmp_path / f'data_train_{i:06d}.bin').write_bytes(header.tobytes() + part.tobytes())
    header[:3] = [20240520, 1, 5000]
    val = np.fromfile(shakespeare / 'val.bin', dtype=np.uint16)
    (tmp_path / 'data_val_000000.bin').write_bytes(header.tobytes() + val[:5000].tobytes())
    common = [*TINY, '--max_iters=2', '--eval_interval=100']
    both = [start([*common, f'--data_dir={tmp_path / "raw"}', f'--out_dir={tmp_path / "out_raw"}']),
            start([*common, f'--train_files={tmp_path}/data_train_*.bin', f'--val_files={tmp_path}/data_val_*.bin',
                   f'--data_dir={tmp_path / "nowhere"}', f'--out_dir={tmp_path / "out_shards"}'])]
    [finish(p) for p in both]
    raw, _ = metrics(tmp_path / 'out_raw')
    shards, _ = metrics(tmp_path / 'out_shards')
    assert raw == shards and len(raw) == 2


def test_init_from_hugging_face_directory(shakespeare, tmp_path):
    # a save_hf directory: train.py's first evaluation must be this model's loss on the fixed val windows
    torch.manual_seed(3)
    model = MPT(MPTConfig(vocab_size=65, d_model=32, n_heads=4, n_layers=2, max_seq_len=16)).eval()
    model.save_hf(tmp_path / 'hf')
    split = data.load_split(str(shakespeare / 'val.bin'), 65, 16)
    ids = data.sample_windows(0, int(split[2][-1]), 0, 3 * 4)
    # an alibi_bias_max given explicitly wins over the checkpoint's (MPT-7B-StoryWriter's 8 -> 16)
    steeper = MPT(dataclasses.replace(model.config, alibi_bias_max=16)).eval()
    steeper.load_state_dict(model.state_dict())
    for m, args, out in ((model, [], 'out'), (steeper, ['--alibi_bias_max=16'], 'out16')):
        with torch.no_grad():
            expected = np.mean([m(*data.to_device(data.read_windows(split, ids[i:i + 4], 16, 65),
                                                   torch.device('cpu')))[1].item() for i in range(0, 12, 4)])
        run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / out}', f'--init_from={tmp_path / "hf"}',
             '--max_iters=0', '--vocab_size=99', '--d_model=8', *args])  # the shape comes from the checkpoint
        _, val = metrics(tmp_path / out)
        assert val[0] == pytest.approx(expected, rel=1e-5), args


# ---- stages and evaluation at several lengths ----------------------------------------------------------

def test_a_stage_starts_from_a_checkpoints_weights(straight, shakespeare, tmp_path):
    # init_from=ckpt-NNNNNN: a new run (step 0, fresh Lion state and schedule) on those weights. With the same
    # length its first evaluation is stage 1's last, exactly; a stage may also change max_seq_len and
    # alibi_bias_max (the 65k StoryWriter recipe), while the shape comes from the checkpoint
    ckpt = straight / 'ckpt-000006'
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / "same"}', f'--init_from={ckpt}',
                        '--max_iters=2', '--eval_interval=2'])
    assert "Lion's state, the step count, the data order and the schedule start afresh" in stdout
    (_, stage1), (losses, stage2) = metrics(straight), metrics(tmp_path / 'same')
    assert stage2[0] == stage1[6] and sorted(losses) == [0, 1]
    run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / "longer"}', f'--init_from={ckpt}',
         '--max_iters=2', '--eval_interval=2', '--max_seq_len=32', '--alibi_bias_max=16'])
    info = json.loads((tmp_path / 'longer' / 'ckpt-000002' / 'train.json').read_text())
    assert info['model']['max_seq_len'] == 32 and info['model']['alibi_bias_max'] == 16
    assert info['model']['d_model'] == 32 and info['iter_num'] == 2
    # a resume keeps the stage's alibi_bias_max when it is not given again (and refuses another one)
    run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={tmp_path / "longer"}', '--init_from=resume',
         '--max_iters=3', '--eval_interval=3', '--max_seq_len=32'])
    info = json.loads((tmp_path / 'longer' / 'ckpt-000003' / 'train.json').read_text())
    assert info['model']['alibi_bias_max'] == 16 and info['iter_num'] == 3


def test_a_stage_refuses_an_architecture_it_would_ignore(straight):
    # (in process: train.py runs setting_problems first, before anything else)
    stage = {**train.default_settings(), 'device': 'cpu', 'init_from': str(straight / 'ckpt-000006'),
             'vocab_size': 65, 'd_model': 32, 'n_heads': 4, 'n_layers': 2}  # the checkpoint's: fine
    assert train.setting_problems({**stage, 'max_seq_len': 64, 'alibi_bias_max': 16}) == []
    assert train.setting_problems({**stage, 'd_model': 64, 'n_layers': 3}) == [
        f"init_from={straight / 'ckpt-000006'} starts a stage, which keeps the checkpoint's architecture: d_model=64 "
        f"(the checkpoint's is 32), n_layers=3 (the checkpoint's is 2) would be ignored; drop them (a stage may change "
        f"max_seq_len, alibi_bias_max, dropout, attn_impl)"]


def test_eval_only_at_several_lengths(straight, shakespeare, tmp_path):
    # every length gets its own fixed windows (as many tokens as at max_seq_len); each loss must be the
    # model's mean loss over them, computed here from the checkpoint's tensors; nothing is saved
    out = tmp_path / 'eval'
    _, stdout, _ = run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', f'--init_from={straight / "ckpt-000006"}',
                        '--eval_only=True', '--eval_seq_lens=[8, 16, 40]'])
    record = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])
    assert record['eval_only'] and record['iter'] == 6 and not checkpoints.checkpoint_dirs(out)
    assert sorted(record['val_loss_by_seq_len']) == ['16', '40', '8']
    assert record['val_loss'] == record['val_loss_by_seq_len']['16'] == metrics(straight)[1][6]
    assert re.search(r"seq_len\s+val loss\n\s+8\s+[\d.]+\n\s+16\s+[\d.]+\s+\(trained\)\n\s+40\s+[\d.]+", stdout)
    model = MPT(MPTConfig(vocab_size=65, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, attn_impl='torch')).eval()
    model.load_state_dict(checkpoint_tensors(straight / 'ckpt-000006', tmp_path)['model'])
    for L, per_batch in ((8, 8), (40, 1)):  # 3 x 4 x 16 tokens: 24 windows of 8, 4 of 40 (micro-batches of 64 tokens)
        split = data.load_split(str(shakespeare / 'val.bin'), 65, L)
        ids = data.sample_windows(0, int(split[2][-1]), 0, 3 * 4 * 16 // L)
        with torch.no_grad():
            losses = [model(*data.to_device(data.read_windows(split, ids[i:i + per_batch], L, 65),
                                             torch.device('cpu')))[1].item() for i in range(0, len(ids), per_batch)]
        assert record['val_loss_by_seq_len'][str(L)] == pytest.approx(np.mean(losses), rel=1e-5), L



def test_eval_only_at_long_lengths_over_context_parallel_processes(straight, shakespeare, tmp_path):
    # the long-context evaluation: a checkpoint scored at 32 and 64 tokens (2 and 4 times its training length) on
    # 4 processes that each hold 1/4 of every sequence gives the losses of one process holding it whole
    losses = {}
    for procs in (1, 4):
        out = tmp_path / f'eval{procs}'
        run([*TINY, f'--data_dir={shakespeare}', f'--out_dir={out}', f'--init_from={straight / "ckpt-000006"}',
             '--eval_only=True', '--eval_seq_lens=[32, 64]', f'--context_parallel={procs}'], procs=procs)
        losses[procs] = json.loads((out / 'metrics.jsonl').read_text().splitlines()[-1])['val_loss_by_seq_len']
    assert sorted(losses[4]) == ['16', '32', '64']
    for L, loss in losses[1].items():
        assert losses[4][L] == pytest.approx(loss, rel=1e-5), L


# ---- packed documents (attn_uses_sequence_id) ---------------------------------------------------------

def test_document_ids_count_the_end_of_texts_before_each_token():
    eot = 9
    rows = np.array([[1, 2, 9, 3, 9, 9, 4, 5, 6], [9, 1, 1, 1, 1, 1, 1, 1, 9]])
    assert data.document_ids(rows[:, :-1], eot).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    x, y, sequence_id = data.to_device(rows, torch.device('cpu'), eot_token=eot)
    assert torch.equal(x, torch.from_numpy(rows[:, :-1])) and torch.equal(y, torch.from_numpy(rows[:, 1:]))
    assert torch.equal(sequence_id, torch.from_numpy(data.document_ids(rows[:, :-1], eot)))
    assert len(data.to_device(rows, torch.device('cpu'))) == 2  # without: (x, y) as before


@pytest.fixture(scope='module')
def lines(shakespeare, tmp_path_factory):
    """tiny Shakespeare's characters again, each line a document: '\\n' is the end-of-text (about 40 per line)"""
    d = tmp_path_factory.mktemp('lines')
    for name in ('train.bin', 'val.bin'):
        shutil.copy(shakespeare / name, d / name)
    meta = json.loads((shakespeare / 'meta.json').read_text())
    (d / 'meta.json').write_text(json.dumps({**meta, 'eot_token': meta['chars'].index('\n')}))
    return d


def test_packed_documents_train_alike_on_one_and_two_processes(lines, no_dropout, tmp_path):
    # windows of 16 characters hold several lines: each attends within itself only, on 1 and 2 processes alike;
    # the same data and settings without sequence ids (no_dropout) give other losses
    common = [*TINY, '--resid_pdrop=0.0', f'--data_dir={lines}', '--max_iters=3', '--attn_uses_sequence_id=True']
    both = [start([*common, f'--out_dir={tmp_path / "one"}']), start([*common, f'--out_dir={tmp_path / "two"}'], procs=2)]
    [finish(p) for p in both]
    (one, one_val), (two, two_val), (plain, plain_val) = metrics(tmp_path / 'one'), metrics(tmp_path / 'two'), \
        metrics(no_dropout)
    assert sorted(one) == sorted(two) == [0, 1, 2] and sorted(one_val) == sorted(two_val) == [0, 3]
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5)
    assert two_val[3] == pytest.approx(one_val[3], rel=1e-5, abs=1e-5)
    assert abs(one[0] - plain[0]) > 1e-3 and abs(one_val[0] - plain_val[0]) > 1e-3


# ---- learning -----------------------------------------------------------------------------------------

def test_shakespeare_char_cpu_learns(shakespeare, tmp_path):
    # config/shakespeare_char_cpu.py, 200 of its 2000 steps (about 30 s on one core): the val loss must fall
    # far below the 3.31 nats of predicting each character by its frequency alone. Measured: 2.31.
    counts = np.bincount(np.fromfile(shakespeare / 'train.bin', dtype=np.uint16), minlength=65)
    p = counts[counts > 0] / counts.sum()
    entropy = -(p * np.log(p)).sum()
    assert 3.2 < entropy < 3.4
    run([ROOT / 'config' / 'shakespeare_char_cpu.py', f'--data_dir={shakespeare}', f'--out_dir={tmp_path}',
         '--max_iters=200', '--lr_decay_iters=200', '--warmup_iters=20', '--eval_interval=200',
         '--log_interval=50'])
    _, val = metrics(tmp_path)
    assert val[200] < entropy - 0.7, (val, entropy)
    ckpt = torch.load(tmp_path / 'ckpt.pt')  # what sample.py reads
    assert ckpt['config']['d_model'] == 128 and ckpt['meta']['tokenizer'] == 'char' and ckpt['iter_num'] == 200
    model = MPT(MPTConfig(**ckpt['config']))
    model.load_state_dict(ckpt['model'])


# ---- loss masks, LoRA and QLoRA on the tiny "released" MPT (tests/conftest.py) ----------------------------

LORA = ['--max_seq_len=32', '--batch_size=4', '--gradient_accumulation_steps=4', '--eval_interval=3', '--eval_iters=2',
        '--log_interval=1', '--compile=False', '--device=cpu', '--dtype=float32', '--warmup_iters=1',
        '--lr_decay_iters=6', '--learning_rate=3e-3', '--min_lr=3e-4', '--weight_decay=1e-2', '--lora_rank=4',
        '--lora_alpha=8']
QLORA = [*LORA, '--quantize_base=nf4']


def test_loss_masks_turn_prompt_targets_into_ignored(released_sft):
    split = data.load_split(str(released_sft / 'train.bin'), 512, 32)
    ids = np.array([0, 5, 17])
    rows, masks = data.read_windows(split, ids, 32, 512), data.read_masks(split, ids, 32)
    tokens = np.fromfile(released_sft / 'train.bin', dtype=np.uint16)
    mask = np.fromfile(released_sft / 'train.mask', dtype=np.uint8)
    x, y = data.to_device(rows, torch.device('cpu'), masks)
    for r, k in enumerate(ids):  # window k: tokens [32k, 32k + 33); target j is token 32k + j + 1
        assert x[r].tolist() == tokens[32 * k:32 * k + 32].tolist()
        expected = [int(t) if m else -1 for t, m in zip(tokens[32 * k + 1:32 * k + 33], mask[32 * k + 1:32 * k + 33])]
        assert y[r].tolist() == expected
    assert (y == -1).any() and (y != -1).any()


@pytest.fixture(scope='module')
def lora_runs(released_mpt, released_sft, tmp_path_factory):
    """LoRA and QLoRA, 6 steps each on 1 process and on 2; each also stopped at 3 and resumed (LoRA on 2
    processes from 1, QLoRA on 1 from 2 and on 1 from 1). Two runs at a time: CI has 2 cores."""
    root = tmp_path_factory.mktemp('lora')
    common = [f'--init_from={released_mpt}', f'--data_dir={released_sft}']
    plan = {  # name: (settings, processes, max_iters, resumes: [(processes, max_iters)])
        'lora1': (LORA, 1, 6, []), 'lora2': (LORA, 2, 6, []), 'lora_half': (LORA, 1, 3, [(2, 6)]),
        'qlora1': (QLORA, 1, 6, []), 'qlora2_half': (QLORA, 2, 3, [(1, 6)]),
        'qlora_half': (QLORA, 1, 3, [(1, 6)]),
    }
    names = list(plan)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):
        procs = [start([*plan[n][0], *common, f'--out_dir={root / n}', f'--max_iters={plan[n][2]}'], plan[n][1])
                 for n in pair]
        [finish(p) for p in procs]
        resumes = [start([*plan[n][0], *common, f'--out_dir={root / n}', f'--max_iters={iters}', '--init_from=resume'],
                         procs) for n in pair for procs, iters in plan[n][3]]
        [finish(p) for p in resumes]
    return root


def adapters_and_lion(path, tmp_path):
    c = checkpoint_tensors(path, tmp_path)
    return c['model'], c['lion']


@pytest.mark.parametrize('kind', ['lora', 'qlora'])
def test_lora_learns_and_agrees_across_world_sizes_and_resumes(lora_runs, kind, tmp_path):
    one, one_val = metrics(lora_runs / f'{kind}1')
    assert sorted(one) == list(range(6)) and sorted(one_val) == [0, 3, 6]
    assert one_val[6] < one_val[0] - 0.1 and one[5] < one[0] - 0.1  # it learns (measured: 6.23 -> 6.04)
    others = ['lora2', 'lora_half'] if kind == 'lora' else ['qlora2_half', 'qlora_half']
    ref_model, ref_lion = adapters_and_lion(lora_runs / f'{kind}1' / 'ckpt-000006', tmp_path)
    # only the adapters train, and only they have Lion state and go in checkpoints
    assert sorted(ref_model) == sorted(ref_lion) and all(is_adapter(k) for k in ref_model)
    assert len(ref_model) == 2 * 4 * 2  # A and B for 4 layers in 2 blocks
    for other in others:
        losses, val = metrics(lora_runs / other)
        assert sorted(losses) == list(range(6)) and sorted(val) == [0, 3, 6], other
        for it in losses:
            assert losses[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), (other, it)
        for it in val:
            assert val[it] == pytest.approx(one_val[it], rel=1e-5, abs=1e-5), (other, it)
        model, lion = adapters_and_lion(lora_runs / other / 'ckpt-000006', tmp_path)
        for name in ref_model:
            assert torch.allclose(model[name], ref_model[name], atol=1e-5), (other, name)
            assert torch.allclose(lion[name], ref_lion[name], atol=1e-6), (other, name)
    if kind == 'qlora':  # stopped and resumed on the same single process: bit for bit
        assert metrics(lora_runs / 'qlora_half') == (one, one_val)
        model, lion = adapters_and_lion(lora_runs / 'qlora_half' / 'ckpt-000006', tmp_path)
        assert all(torch.equal(model[k], ref_model[k]) and torch.equal(lion[k], ref_lion[k]) for k in ref_model)
    info = json.loads((lora_runs / f'{kind}1' / 'ckpt-000006' / 'train.json').read_text())
    assert info['lora'] == dict(rank=4, alpha=8.0, dropout=0.0, targets=['Wqkv', 'out_proj', 'up_proj', 'down_proj'],
                                quantize_base='nf4' if kind == 'qlora' else '')
    assert info['base']['path'] and 'config.json' not in info['base']['files']


def test_context_parallel_lora_and_qlora_with_loss_masks(lora_runs, released_mpt, released_sft, tmp_path):
    # LoRA (with activation checkpointing) and QLoRA on SFT data (loss masks: prompt targets ignored, so the
    # processes of a sequence count different numbers of targets), each sequence over 2 processes: the losses,
    # adapters and Lion state of the 1-process runs
    common = [f'--init_from={released_mpt}', f'--data_dir={released_sft}', '--max_iters=6', '--context_parallel=2']
    procs = {kind: start([*settings, *common, f'--out_dir={tmp_path / kind}', *extra], 2)
             for kind, settings, extra in (('lora', LORA, ['--activation_checkpointing=True']), ('qlora', QLORA, []))}
    [finish(p) for p in procs.values()]
    for kind in procs:
        (one, one_val), (cp, cp_val) = metrics(lora_runs / f'{kind}1'), metrics(tmp_path / kind)
        assert sorted(cp) == sorted(one) and sorted(cp_val) == sorted(one_val), kind
        for it in one:
            assert cp[it] == pytest.approx(one[it], rel=1e-5, abs=1e-5), (kind, it)
        for it in one_val:
            assert cp_val[it] == pytest.approx(one_val[it], rel=1e-5, abs=1e-5), (kind, it)
        ref_model, ref_lion = adapters_and_lion(lora_runs / f'{kind}1' / 'ckpt-000006', tmp_path)
        model, lion = adapters_and_lion(tmp_path / kind / 'ckpt-000006', tmp_path)
        for name in ref_model:
            assert torch.allclose(model[name], ref_model[name], atol=1e-5), (kind, name)
            assert torch.allclose(lion[name], ref_lion[name], atol=1e-6), (kind, name)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('quantize', ['', 'nf4'])
def test_lora_freezes_the_base_bit_for_bit(group_of_one, released_mpt, quantize, dtype):
    # in process: the base weights (every linear, the embedding, the norms) are exactly the released ones
    # after training steps with weight decay, while the adapters move; at the start the model is the base.
    # The frozen base is kept in the compute dtype (bf16: the released weights rounded to bf16, no fp32 copy);
    # the adapters, which train, are fp32 masters either way
    config = MPTConfig(**{**config_from_hf(json.loads((released_mpt / 'config.json').read_text())),
                          'attn_impl': 'torch', 'init_device': 'meta'})
    lora = dict(rank=4, alpha=8.0, dropout=0.0, targets=['Wqkv', 'out_proj', 'up_proj', 'down_proj'], quantize_base=quantize)
    base = MPT.from_hf(released_mpt).state_dict()
    model = train.setup_model(config, group_of_one, dtype=dtype, lora=lora, init_weights=False)
    train.load_hf_weights(model, released_mpt)
    exp_avgs = train.lion_state(model)
    assert sorted(exp_avgs) == sorted(n for n, _ in model.named_parameters() if is_adapter(n))
    assert {p.dtype for n, p in model.named_parameters() if not is_adapter(n) and not is_nf4(p)} == {getattr(torch, dtype)}
    assert {p.dtype for n, p in model.named_parameters() if is_adapter(n)} == {torch.float32}
    def frozen():  # every frozen tensor; of an NF4 weight its 4-bit codes, scales and scale factors
        out = {}
        for n, p in model.named_parameters():
            t = train._local(p).detach()
            if type(t).__name__ == 'NF4Tensor':
                out.update({f'{n}.{a}': getattr(t, a).clone() for a in ('quantized_data', 'quantized_scalers',
                                                                          'quantization_factor')})
            elif not is_adapter(n):
                out[n] = t.clone()
        return out
    before = frozen()
    nf4 = len(before) - len([n for n, _ in model.named_parameters() if not is_adapter(n)])
    assert nf4 == (2 * 4 * 2 if quantize else 0)  # 3 tensors for each of the 8 linear layers
    reference = base
    if quantize:  # the base as torchao's NF4 round trip gives it, independently of train.py
        from torchao.quantization import to_nf4
        reference = {k: to_nf4(v, 64, 256).get_original_weight() if k.endswith(('Wqkv.weight', 'proj.weight')) else v
                     for k, v in base.items()}
    reference = MPT.from_state_dict(dataclasses.replace(config), dict(reference)).eval()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 500, (2, 32), generator=gen)
    with torch.no_grad():
        expected, got = reference(idx, idx)[0], model(idx, idx)[0]
    # B = 0: the adapters start as nothing (bf16: the matmuls round to 8 bits of mantissa)
    assert torch.allclose(got.float(), expected, atol=1e-5 if dtype == 'float32' else 3e-2)
    for n, t in before.items():
        if n in base:
            assert torch.equal(t, base[n].to(getattr(torch, dtype))), n  # the unquantized base loaded exactly
    adapters = {n: train._local(p).detach().clone() for n, p in model.named_parameters() if is_adapter(n)}
    for _ in range(3):
        batch = [tuple(torch.randint(0, 500, (2, 32), generator=gen) for _ in range(2))]
        packet = train.train_step(model, exp_avgs, batch, 1e-2, 1e-2, 0.1, 0.9, 0.99, 1.0)
        assert packet[2].item() == 1
    after = frozen()
    assert all(torch.equal(before[n], after[n]) for n in before)
    moved = [n for n, p in model.named_parameters() if is_adapter(n) and not torch.equal(train._local(p), adapters[n])]
    assert len(moved) == len(adapters)


def lora_bad(kind, released_mpt, released_sft, lora_runs, d):
    """(arguments, environment) of one bad LoRA run."""
    common = [*LORA, f'--init_from={released_mpt}', f'--data_dir={released_sft}', f'--out_dir={d / "out"}', '--max_iters=2']
    if kind == 'targets':
        return [*common, "--lora_targets=['qkv', 'out_proj']"], {}
    if kind == 'no_torchao':
        (d / 'fake' / 'torchao').mkdir(parents=True)
        (d / 'fake' / 'torchao' / '__init__.py').write_text("raise ImportError('not installed')\n")
        return [*common, '--quantize_base=nf4'], {'PYTHONPATH': str(d / 'fake')}
    if kind == 'scratch':
        return [*common, '--init_from=scratch'], {}
    if kind == 'nf4_alone':
        return [*common, '--lora_rank=0', '--quantize_base=nf4'], {}
    if kind == 'other_lora':
        shutil.copytree(lora_runs / 'lora1', d / 'out')
        return [*common, '--init_from=resume', '--max_iters=8', '--lora_rank=8'], {}
    if kind == 'base_changed':
        shutil.copytree(released_mpt, d / 'base')
        run_dir = d / 'out'
        shutil.copytree(lora_runs / 'lora1', run_dir)
        for ckpt in checkpoints.checkpoint_dirs(run_dir):  # the run's base is now d/base, which then changes
            info = json.loads((Path(ckpt) / 'train.json').read_text())
            info['base']['path'] = str(d / 'base')
            (Path(ckpt) / 'train.json').write_text(json.dumps(info))
            files = checkpoints.read_manifest(ckpt)  # re-signed: a train.json changed by hand is damage otherwise
            checkpoints.write_manifest(ckpt, {**files, 'train.json': checkpoints.file_crc(Path(ckpt) / 'train.json')})
        (d / 'base' / 'model.safetensors').write_bytes((d / 'base' / 'model.safetensors').read_bytes() + b'\0')
        return [*common, '--init_from=resume', '--max_iters=8'], {}
    raise ValueError(kind)


LORA_BAD = {
    'targets': r"lora_targets=\['qkv', 'out_proj'\]: qkv matches no linear layer of MPT; its linear layers are "
               r"Wqkv, out_proj, up_proj, down_proj",
    'no_torchao': r"quantize_base='nf4' needs torchao \(its NF4 tensors\): pip install torchao",
    'scratch': r"lora_rank=4 trains adapters on a pretrained model: set init_from to a Hugging Face MPT directory",
    'nf4_alone': r"quantize_base='nf4' keeps a LoRA run's frozen base in 4 bits: set lora_rank > 0",
    'other_lora': r"trained with lora_rank=4, .* not lora_rank=8, .*: resume with the settings it was trained with",
    'base_changed': r"base model .*base has changed since the run started",
}


@pytest.fixture(scope='module')
def lora_bad_runs(released_mpt, released_sft, lora_runs, tmp_path_factory):
    results = {}
    for name in LORA_BAD:
        d = tmp_path_factory.mktemp(name)
        args, env = lora_bad(name, released_mpt, released_sft, lora_runs, d)
        proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, 'OMP_NUM_THREADS': '1', **env})
        results[name] = proc
    return {name: finish(p, expect_ok=False) for name, p in results.items()}


@pytest.mark.parametrize('name', LORA_BAD)
def test_bad_lora_run_is_one_clear_message(lora_bad_runs, name):
    returncode, _, stderr = lora_bad_runs[name]
    assert returncode == 1 and 'Traceback' not in stderr, stderr
    assert re.search(LORA_BAD[name], stderr), stderr
    assert stderr.count('error:') == 1


def test_masked_loss_is_the_mean_over_counted_targets(group_of_one, released_sft):
    # train_step with loss_tokens: the mean cross-entropy over the targets the masks keep, each weighing the
    # same whichever micro-batch holds it; a micro-batch with none adds nothing (no 0/0). evaluate likewise.
    config = MPTConfig(vocab_size=512, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, attn_impl='torch')
    model = train.setup_model(config, group_of_one, dtype='float32')
    exp_avgs = train.lion_state(model)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 512, (2, 16), generator=gen) for _ in range(3)]
    ys = [torch.randint(0, 512, (2, 16), generator=gen) for _ in range(3)]
    ys[0][0, :10] = -1
    ys[1][:] = -1  # nothing counted in this micro-batch
    ys[2][1, 3:] = -1
    with torch.no_grad():  # the reference: -log p(target) averaged over the counted targets, token by token
        nll = [-torch.log_softmax(model(x, y.clamp(min=0))[0], -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
               for x, y in zip(xs, ys)]
        counted = torch.cat([n[y != -1] for n, y in zip(nll, ys)])
    tokens = sum(int((y != -1).sum()) for y in ys)
    packet = train.train_step(model, exp_avgs, list(zip(xs, ys)), 1e-3, 1e-3, 0.0, 0.9, 0.99, 1.0, loss_tokens=tokens)
    loss, norm, ok, _ = packet.tolist()
    assert ok == 1 and math.isfinite(norm) and loss == pytest.approx(counted.mean().item(), rel=1e-5)
    # evaluate on prepare.py's prompt/response val split: the mean over the response targets
    split = data.load_split(str(released_sft / 'val.bin'), 512, 16)
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4])]
    with torch.no_grad():
        total = count = 0.0
        for ids in batches:
            x, y = data.to_device(data.read_windows(split, ids, 16, 512), torch.device('cpu'), data.read_masks(split, ids, 16))
            logp = torch.log_softmax(model.eval()(x, y.clamp(min=0))[0], -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
            total, count = total - logp[y != -1].sum().item(), count + int((y != -1).sum())
    model.train()
    assert 0 < count < 5 * 16 and train.evaluate(model, split, batches, 16, 512, torch.device('cpu')) == pytest.approx(total / count, rel=1e-5)


def broken_hf(kind, released, d):
    """A copy of a Hugging Face MPT directory, broken one way: config.json not JSON, model.safetensors cut short,
    or sharded with a shard that its index names gone. Returns (the directory, the file the line must name)."""
    hf = d / 'hf'
    shutil.copytree(released, hf)
    if kind == 'config':
        (hf / 'config.json').write_text('{"model_type": "mpt",\n')
        return hf, hf / 'config.json'
    weights = hf / 'model.safetensors'
    if kind == 'truncated':
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
        return hf, weights
    names = sorted(MPT.from_hf(released).state_dict())
    (hf / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': {
        n: f'model-0000{1 + (i % 2)}-of-00002.safetensors' for i, n in enumerate(names)}}))
    weights.rename(hf / 'model-00001-of-00002.safetensors')
    return hf, hf / 'model-00002-of-00002.safetensors'


@pytest.mark.parametrize('kind', ['config', 'truncated', 'missing_shard'])
def test_broken_hugging_face_inputs_are_one_line_naming_the_file(released_mpt, released_sft, tmp_path, kind):
    # train.py (full fine-tune and a LoRA run's base) and sample.py on a broken Hugging Face directory: one line,
    # naming the file, no traceback
    hf, culprit = broken_hf(kind, released_mpt, tmp_path)
    runs = {'train': [sys.executable, str(ROOT / 'train.py'), f'--init_from={hf}', f'--data_dir={released_sft}',
                      f'--out_dir={tmp_path / "out"}', '--max_iters=1', '--batch_size=2', '--gradient_accumulation_steps=1',
                      '--eval_iters=1', '--compile=False', '--device=cpu', '--dtype=float32'],
            'sample': [sys.executable, str(ROOT / 'sample.py'), f'--init_from={hf}', '--max_new_tokens=2',
                       '--device=cpu', '--dtype=float32', '--compile=False']}
    runs['lora'] = [*runs['train'][:4], f'--out_dir={tmp_path / "out_lora"}', *runs['train'][5:], '--lora_rank=4']
    for name, cmd in runs.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
        assert r.returncode == 1 and 'Traceback' not in r.stderr and len(errors) == 1, (name, r.stderr[-2000:])
        assert str(culprit) in errors[0], (name, errors[0])


def test_data_that_disagrees_with_its_meta_json_is_refused(tmp_path):
    # prepare.py's meta.json records each file's size and CRC-32s: a train.bin of another length is refused at the
    # start, one of the same length with other bytes before the first step; a resume on data other than the
    # checkpoint's is refused unless --data_changed=ok; each one line, nothing saved
    def prepare(text, out):
        (tmp_path / 'text.txt').write_text(text)
        r = subprocess.run([sys.executable, str(ROOT / 'prepare.py'), f'--input={tmp_path / "text.txt"}',
                            '--tokenizer=char', f'--out_dir={out}', '--overwrite=True'], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return json.loads((out / 'meta.json').read_text())
    text = SHAKESPEARE.read_text()
    data = tmp_path / 'data'
    meta = prepare(text[:300_000], data)
    assert meta['files']['train.bin'][0] == (data / 'train.bin').stat().st_size
    args = lambda out, *extra: [*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=3', *extra]
    good = (data / 'train.bin').read_bytes()
    (data / 'train.bin').write_bytes(good + b'\0\0')
    returncode, _, stderr = run(args(tmp_path / 'a'), expect_ok=False)
    assert returncode == 1 and re.search(rf"error: {re.escape(str(data / 'train.bin'))} has {len(good) + 2:,} bytes, "
                                         rf"but .*meta\.json records {len(good):,}: it changed after prepare\.py", stderr)
    (data / 'train.bin').write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    returncode, _, stderr = run(args(tmp_path / 'b'), expect_ok=False)
    assert returncode == 1 and 'does not match the CRC-32' in stderr and 'Traceback' not in stderr, stderr
    assert not checkpoints.checkpoint_dirs(tmp_path / 'b')
    (data / 'train.bin').write_bytes(good)
    run(args(tmp_path / 'c'))  # a good run: checkpoint at step 3 records the data
    assert json.loads((tmp_path / 'c' / 'ckpt-000003' / 'train.json').read_text())['data'] == {
        'train.bin': meta['files']['train.bin']}
    prepare(text[:300_000] + text[:1000], data)  # another dataset in its place (the same characters)
    returncode, _, stderr = run(args(tmp_path / 'c', '--init_from=resume', '--max_iters=5'), expect_ok=False)
    assert returncode == 1 and 'is not what the checkpoint trained on' in stderr and '--data_changed=ok' in stderr
    assert stderr.count('error:') == 1
    run(args(tmp_path / 'c', '--init_from=resume', '--max_iters=5', '--data_changed=ok'))
    assert checkpoints.checkpoint_dirs(tmp_path / 'c')[-1].endswith('ckpt-000005')
