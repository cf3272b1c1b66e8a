"""
Host memory of fine-tuning a released model: builds a Hugging Face MPT (save_pretrained, bf16, one
model.safetensors as a downloaded MPT-7B is), then runs train.py on it for 2 steps (full fine-tuning, LoRA
and QLoRA, on 1 process and on 2 under torchrun) and export.py on the runs, and prints each process's peak
resident memory (/proc/self/status VmHWM): in GB, above what importing torch and the script alone takes, and
that as a multiple of the checkpoint's bytes on disk.

    python bench/memory.py                                   # MPT of 203M parameters (387 MB), about 10 minutes
    python bench/memory.py --d_model=256 --n_layers=2 --runs="['lora1', 'export_lora1']"   # a quick look
    ... --json=memory.json

Each process runs inside this script (`--child=train.py ...`), which writes its VmHWM as it exits: train.py
ends with os._exit, which skips atexit, so os._exit itself is wrapped. A run's settings are train.py's
own, with dtype bfloat16 (the compute dtype of a GPU run, so the frozen base is what it is there), a
micro-batch of 1 x 32 tokens (activations, on a GPU held in its memory, are not what this measures) and no
evaluation; work_dir keeps the model between invocations.
"""
import json as json_module
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vm_hwm():
    """This process's peak resident memory so far, in bytes."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def child(argv):
    """`--child=SCRIPT [--import_only] args...`: run SCRIPT as __main__ (or only import it and torch), then
    write {'hwm': VmHWM} to $MEMORY_REPORT/SCRIPT.RANK.json, however the script ends."""
    script = argv[0].split('=', 1)[1]
    import_only = argv[1:2] == ['--import_only']
    sys.argv = [script, *argv[1 + import_only:]]
    sys.path.insert(0, str(ROOT))
    report = Path(os.environ['MEMORY_REPORT']) / f"{Path(script).stem}.{os.environ.get('RANK', 0)}.json"

    def write():
        report.write_text(json_module.dumps({'hwm': vm_hwm()}))
    exit_now = os._exit

    def _exit(code):
        write()
        exit_now(code)
    os._exit = _exit
    try:
        if import_only:
            import torch  # noqa: F401
            __import__(Path(script).stem)
        else:
            runpy.run_path(str(ROOT / script), run_name='__main__')
    finally:
        write()


if __name__ == '__main__' and sys.argv[1:2] and sys.argv[1].startswith('--child='):
    child(sys.argv[1:])
    sys.exit(0)

sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from configurator import configure  # noqa: E402

# -----------------------------------------------------------------------------
work_dir = os.path.join(tempfile.gettempdir(), 'mpt-memory-bench')  # the model, the data and the runs
d_model = 1024  # the model: 12 x 12.6M block weights + a 51.6M embedding = 203M parameters
n_layers = 12
n_heads = 16
vocab_size = 50432  # MPT-7B's
runs = ['full1', 'full2', 'lora1', 'lora2', 'qlora1', 'qlora2', 'export_full1', 'export_lora1', 'export_qlora1']
lora_rank = 8
malloc_mmap_threshold = 0  # > 0: glibc's MALLOC_MMAP_THRESHOLD_ for the runs, which then hand freed blocks of this
# many bytes and more back at once, as glibc does by itself above 32 MB (a 7B model's tensors are larger; this
# model's are not, and the blocks it keeps for reuse show in RSS); 0: glibc's default
json = ''  # also write the table to this file
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

TRAIN = ['--max_iters=2', '--batch_size=1', '--max_seq_len=32', '--eval_iters=0', '--eval_interval=1000',
         '--log_interval=1', '--compile=False', '--device=cpu', '--dtype=bfloat16', '--warmup_iters=1',
         '--lr_decay_iters=2', '--learning_rate=1e-4', '--min_lr=1e-5']
KINDS = {'full': [], 'lora': [f'--lora_rank={lora_rank}'], 'qlora': [f'--lora_rank={lora_rank}', '--quantize_base=nf4']}


def build(path):
    """The model (a save_pretrained directory, bf16) and random tokens; kept in work_dir when there."""
    if (path / 'model' / 'config.json').is_file() and (path / 'data' / 'val.bin').is_file():
        return
    import numpy as np
    import transformers
    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size,
                                    max_seq_len=2048, expansion_ratio=4, no_bias=True)
    transformers.MptForCausalLM(config).to(torch.bfloat16).save_pretrained(path / 'model')
    (path / 'data').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', 1 << 18), ('val', 1 << 14)):
        rng.integers(0, vocab_size, n).astype(np.uint16).tofile(path / 'data' / f'{split}.bin')


def launch(script, args, procs, report):
    """Run script (1 process, or procs under torchrun) inside child(); returns [VmHWM of each rank]."""
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir(parents=True)
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}']
    cmd = [*launcher, str(Path(__file__).resolve()), f'--child={script}', *args]
    env = {**os.environ, 'MEMORY_REPORT': str(report), 'OMP_NUM_THREADS': '1'}
    if malloc_mmap_threshold:
        env['MALLOC_MMAP_THRESHOLD_'] = str(malloc_mmap_threshold)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return [json_module.loads((report / f'{Path(script).stem}.{rank}.json').read_text())['hwm']
            for rank in range(procs)], r.stdout


def main():
    path = Path(work_dir)
    build(path)
    model = path / 'model'
    ckpt_bytes = sum(f.stat().st_size for f in model.glob('*.safetensors'))
    from safetensors import safe_open
    with safe_open(str(model / 'model.safetensors'), 'pt') as f:
        n_params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    print(f"{model}: {n_params / 1e6:.0f}M parameters, {ckpt_bytes / 1e6:.0f} MB on disk; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; glibc malloc "
          + (f"MALLOC_MMAP_THRESHOLD_={malloc_mmap_threshold}" if malloc_mmap_threshold else "defaults"), flush=True)
    imports = {script: launch(script, ['--import_only'], 1, path / 'report')[0][0]
               for script in ('train.py', 'export.py')}
    print(f"importing torch and train.py: {imports['train.py'] / 1e9:.2f} GB; export.py: "
          f"{imports['export.py'] / 1e9:.2f} GB", flush=True)
    rows = []
    print(f"\n| run | processes | peak RSS per process | above the import | x the checkpoint | seconds |\n"
          f"|---|---|---|---|---|---|", flush=True)
    for name in runs:
        t0 = time.time()
        if name.startswith('export_'):
            run_dir = path / 'runs' / name.removeprefix('export_')
            if not (run_dir / 'ckpt-000002').is_dir():
                sys.exit(f"error: {name} exports {run_dir}, which is not there: put {name.removeprefix('export_')} "
                         f"before it in runs")
            script, procs, args = 'export.py', 1, [f'--out_dir={run_dir}', f'--hf_dir={path / "exports" / name}',
                                                   '--overwrite=True']
            shutil.rmtree(path / 'exports' / name, ignore_errors=True)
        else:
            kind, procs = name.rstrip('12'), int(name[-1])
            run_dir = path / 'runs' / name
            shutil.rmtree(run_dir, ignore_errors=True)
            script, args = 'train.py', [*TRAIN, *KINDS[kind], f'--init_from={model}', f'--data_dir={path / "data"}',
                                        f'--out_dir={run_dir}', f'--gradient_accumulation_steps={procs}']
        hwm, _ = launch(script, args, procs, path / 'report')
        above = [h - imports[script] for h in hwm]
        row = dict(run=name, processes=procs, peak_rss_gb=[h / 1e9 for h in hwm],
                   above_import_gb=[a / 1e9 for a in above], x_checkpoint=[a / ckpt_bytes for a in above],
                   seconds=time.time() - t0)
        rows.append(row)
        fmt = lambda xs, f: ' / '.join(f.format(x) for x in xs)
        print(f"| {name} | {procs} | {fmt(row['peak_rss_gb'], '{:.2f} GB')} | "
              f"{fmt(row['above_import_gb'], '{:.2f} GB')} | {fmt(row['x_checkpoint'], '{:.2f}')} | "
              f"{row['seconds']:.0f} |", flush=True)
    if json:
        Path(json).write_text(json_module.dumps(dict(
            checkpoint_bytes=ckpt_bytes, parameters=n_params, imports=imports, torch=torch.__version__,
            malloc_mmap_threshold=malloc_mmap_threshold, rows=rows), indent=1) + '\n')


if __name__ == '__main__':
    main()
