"""
Per-step overhead, side by side with the peers: our train.py against nanoGPT's on the same model, data
and batch, and (--mode=lora) our LoRA against PEFT on transformers' MPT. The two training loops of a pair
run at the same time, each with the same number of threads, so that whatever else loads the machine falls
on both alike; each process's CPU time (/proc/<pid>/stat) and the wall clock are read when it prints its
step log lines, and a step's cost is the difference between two lines, far from start-up and evaluation.

    python bench/vs_nanogpt.py --nanogpt=../nanoGPT            # a nanoGPT checkout you bring
    python bench/vs_nanogpt.py --mode=lora                     # needs transformers and peft
    ... --pairs=5 --steps=400 --json=bench/results/vs_nanogpt.json

train: config/shakespeare_char_cpu.py (characters of tiny Shakespeare, prepared once by our prepare.py;
       nanoGPT reads the same train.bin / val.bin through a meta.pkl written beside them) against
       nanoGPT's train.py at the same size (n_layer, n_head, n_embd, block_size, batch_size), no biases,
       no dropout, compile off, float32. The optimizers differ (Lion, AdamW) as the two projects do; their
       cost per step is a small part of either.
lora:  train.py --init_from=<a small Hugging Face MPT> --lora_rank=8 against bench/peft_lora.py (transformers'
       MptForCausalLM with PEFT's LoraConfig on the same four linear layers, torch's AdamW), same base
       weights, data (that model's own BPE), sequence length and batch.
Nothing of nanoGPT is copied or changed: its train.py runs from its own folder, with our data folder given
as an absolute --dataset and the run written to a temporary out_dir.
"""
import json as json_lib
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import fail  # noqa: E402
from configurator import configure, help_if_asked  # noqa: E402

help_if_asked(__file__)

# -----------------------------------------------------------------------------
mode = 'train'  # 'train': ours vs nanoGPT; 'lora': our LoRA vs PEFT on transformers' MPT
nanogpt = ''  # train mode: the path of a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)
config = 'config/shakespeare_char_cpu.py'  # train mode: the size both train at, and our run's settings
text = ''  # the corpus; '' = prepare.py's shakespeare_char source
pairs = 3  # concurrent pairs run; the ratio reported is their median
steps = 300  # training steps of each run (train mode); lora mode runs lora_steps
skip = 50  # steps not timed at the start: allocator warm-up, first evaluation
threads = 1  # torch threads of each process (OMP_NUM_THREADS)
lora_steps = 100
lora_model = dict(d_model=256, n_heads=4, n_layers=4, max_seq_len=256, vocab_size=4096)  # lora mode's base MPT
lora_batch = 4  # sequences per step in lora mode (seq = lora_model's max_seq_len)
lora_rank = 8
work_dir = ''  # data and runs; '' = a temporary folder, removed at the end
json = ''  # also write the figures here
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

LOG_EVERY = 10
SHAKESPEARE = os.path.join(ROOT, 'assets', 'tinyshakespeare.txt')  # the corpus prepare.py's shakespeare_char reads
STEP_LINE = re.compile(r'^iter (\d+): loss ')  # a step's log line, in both projects' formats
VAL_LINE = re.compile(r'^(?:iter|step) \d+: (?:train loss [0-9.]+, )?val loss ([0-9.]+)')  # ours, nanoGPT's, peft_lora.py's


def cpu_seconds(pid):
    """CPU time (user + system, all threads) a running process has used so far."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def watch(name, cmd, cwd, env, log_path):
    """Start cmd; a thread reads its output line by line and notes (step, wall, CPU seconds) at each step log
    line. Returns (process, thread, notes)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    notes = dict(name=name, steps=[], val_loss=None, lines=[])

    def read():
        with open(log_path, 'w') as log:
            for line in proc.stdout:
                log.write(line)
                notes['lines'] = (notes['lines'] + [line.rstrip()])[-20:]
                m = STEP_LINE.match(line)
                if m:
                    try:
                        notes['steps'].append((int(m.group(1)), time.perf_counter(), cpu_seconds(proc.pid)))
                    except OSError:  # the process just ended
                        pass
                v = VAL_LINE.match(line)
                if v:
                    notes['val_loss'] = float(v.group(1))
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return proc, thread, notes


def per_step(notes, first, last):
    """(wall ms, CPU ms) per step between the log lines of steps first and last."""
    seen = {s: (w, c) for s, w, c in notes['steps']}
    if first not in seen or last not in seen:
        fail(f"{notes['name']} printed no log line for step {first} or {last}: its last lines were\n  "
             + "\n  ".join(notes['lines']))
    (w0, c0), (w1, c1) = seen[first], seen[last]
    return 1e3 * (w1 - w0) / (last - first), 1e3 * (c1 - c0) / (last - first)


def run_pair(runs, n_steps, work):
    """Both runs at once; {name: (wall ms/step, CPU ms/step, val loss)}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    started = [watch(name, cmd, cwd, env, os.path.join(work, f'{name.split()[0]}.log'))
               for name, cmd, cwd in runs]
    results = {}
    for proc, thread, notes in started:
        proc.wait()
        thread.join()
        if proc.returncode != 0:
            fail(f"{notes['name']} exited with status {proc.returncode}; its last lines were\n  "
                 + "\n  ".join(notes['lines']))
        # the last timed line stays a log interval before the end: both evaluate (and we save) there
        first = -(-skip // LOG_EVERY) * LOG_EVERY
        results[notes['name']] = (*per_step(notes, first, n_steps - LOG_EVERY), notes['val_loss'])
    return results


def read_config(path):
    """A config file's settings, as train.py would see them (it simply assigns them)."""
    values = {}
    exec(compile(open(os.path.join(ROOT, path)).read(), path, 'exec'), values)
    return values


def prepare_chars(work):
    """The characters of the corpus as our prepare.py writes them, plus the meta.pkl nanoGPT reads."""
    data = os.path.join(work, 'shakespeare_char')
    cmd = [sys.executable, os.path.join(ROOT, 'prepare.py'), 'shakespeare_char', f'--out_dir={data}']
    if text:
        cmd.append(f'--input={text}')
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        fail(f"prepare.py failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    with open(os.path.join(data, 'meta.json')) as f:
        meta = json_lib.load(f)
    with open(os.path.join(data, 'meta.pkl'), 'wb') as f:  # nanoGPT's vocab_size comes from here
        pickle.dump(dict(vocab_size=meta['vocab_size']), f)
    return data


def train_runs(work, data, k):
    c = read_config(config)
    warmup = min(c['warmup_iters'], steps // 5)  # a short run still decays after its warmup
    ours = [sys.executable, os.path.join(ROOT, 'train.py'), os.path.join(ROOT, config), f'--data_dir={data}',
            f'--out_dir={os.path.join(work, f"ours-{k}")}', f'--max_iters={steps}', f'--lr_decay_iters={steps}',
            f'--eval_interval={steps}', f'--log_interval={LOG_EVERY}', f'--warmup_iters={warmup}', '--device=cpu']
    peer = [sys.executable, 'train.py', f'--dataset={data}', f'--out_dir={os.path.join(work, f"nanogpt-{k}")}',
            '--device=cpu', '--compile=False', '--dtype=float32', '--bias=False', '--dropout=0.0',
            f"--n_layer={c['n_layers']}", f"--n_head={c['n_heads']}", f"--n_embd={c['d_model']}",
            f"--block_size={c['max_seq_len']}", f"--batch_size={c['batch_size']}",
            f"--gradient_accumulation_steps={c['gradient_accumulation_steps']}", f'--max_iters={steps}',
            f'--lr_decay_iters={steps}', f'--eval_interval={steps}', f"--eval_iters={c['eval_iters']}",
            f'--log_interval={LOG_EVERY}', '--always_save_checkpoint=False',
            # nanoGPT's own shakespeare_char recipe for AdamW (its config/train_shakespeare_char.py)
            '--learning_rate=1e-3', '--min_lr=1e-4', '--beta2=0.99', f'--warmup_iters={warmup}']
    return [('ours (train.py)', ours, ROOT), ('nanoGPT (train.py)', peer, os.path.abspath(nanogpt))]


def prepare_lora(work):
    """A small Hugging Face MPT (random weights, seed 0) with its own byte-level BPE trained on the corpus,
    and the corpus prepared with that tokenizer: what fine-tuning a released MPT looks like, small."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = text or SHAKESPEARE
    base = os.path.join(work, 'base')
    os.makedirs(base, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus], trainers.BpeTrainer(vocab_size=lora_model['vocab_size'], special_tokens=['<|endoftext|>'],
                                            show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(base, 'tokenizer.json'))
    with open(os.path.join(base, 'tokenizer_config.json'), 'w') as f:
        json_lib.dump({'eos_token': '<|endoftext|>', 'tokenizer_class': 'GPTNeoXTokenizer'}, f)
    torch.manual_seed(0)
    hf = transformers.MptConfig(**lora_model, expansion_ratio=4, no_bias=True, eos_token_id=0)
    transformers.MptForCausalLM(hf).save_pretrained(base)
    data = os.path.join(work, 'lora_data')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), f'--input={corpus}', f'--tokenizer={base}',
                        f'--out_dir={data}', '--num_proc=1'], capture_output=True, text=True)
    if r.returncode:
        fail(f"prepare.py failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return base, data


def lora_runs(work, base, data, k):
    T = lora_model['max_seq_len']
    common = dict(steps=lora_steps, eval_interval=lora_steps, batch_size=lora_batch, seq_len=T, eval_iters=20,
                  log_interval=LOG_EVERY, learning_rate=1e-3, lora_rank=lora_rank, lora_alpha=16.0)
    ours = [sys.executable, os.path.join(ROOT, 'train.py'), f'--init_from={base}', f'--data_dir={data}',
            f'--out_dir={os.path.join(work, f"ours-lora-{k}")}', f'--lora_rank={lora_rank}', '--lora_alpha=16.0',
            f'--max_seq_len={T}', f'--batch_size={lora_batch}', '--gradient_accumulation_steps=1',
            f'--max_iters={lora_steps}', f'--lr_decay_iters={lora_steps}', f'--eval_interval={lora_steps}',
            '--eval_iters=20', f'--log_interval={LOG_EVERY}', '--warmup_iters=10', '--learning_rate=1e-3',
            '--min_lr=1e-4', '--device=cpu', '--dtype=float32', '--compile=False']
    peer = [sys.executable, os.path.join(ROOT, 'bench', 'peft_lora.py'), f'--base={base}', f'--data_dir={data}',
            *[f'--{key}={value}' for key, value in common.items()]]
    return [('ours (train.py, LoRA)', ours, ROOT), ('PEFT on transformers MPT', peer, ROOT)]


def environment():
    import torch
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               cpus=os.cpu_count(), threads=threads)
    try:
        with open('/proc/cpuinfo') as f:
            env['cpu'] = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    commit = lambda path: subprocess.run(['git', '-C', path, 'rev-parse', 'HEAD'], capture_output=True,
                                         text=True).stdout.strip() or 'unknown'
    env['commit'] = commit(ROOT)
    if mode == 'train':
        env['nanogpt_commit'] = commit(nanogpt)
    else:
        import peft
        import transformers
        env.update(transformers=transformers.__version__, peft=peft.__version__)
    return env


def main():
    if mode not in ('train', 'lora'):
        fail(f"mode={mode!r}: use 'train' (ours vs nanoGPT) or 'lora' (ours vs PEFT)")
    if mode == 'train' and not os.path.isfile(os.path.join(nanogpt, 'train.py')):
        fail(f"--nanogpt={nanogpt!r} is not a nanoGPT checkout (no train.py there): "
             f"git clone https://github.com/karpathy/nanoGPT and pass its path")
    if mode == 'lora':
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            fail(f"--mode=lora compares against PEFT on transformers' MPT: pip install transformers peft ({e})")
    if pairs < 1 or threads < 1 or skip < 0:
        fail("pairs and threads must be >= 1, skip >= 0")
    n_steps = steps if mode == 'train' else lora_steps
    if n_steps - LOG_EVERY <= -(-skip // LOG_EVERY) * LOG_EVERY:
        fail(f"{n_steps} steps leave nothing to time after skip={skip}: give more steps")
    work = work_dir or tempfile.mkdtemp(prefix='vs_nanogpt-')
    os.makedirs(work, exist_ok=True)
    env = environment()
    print(f"{mode} | {env.get('cpu', platform.processor())} | {env['cpus']} CPUs, {threads} thread(s) per run | "
          f"torch {env['torch']} | logs in {work}", flush=True)
    if mode == 'train':
        data = prepare_chars(work)
    else:
        base, data = prepare_lora(work)
    rows, runs_dir = [], tempfile.mkdtemp(dir=work, prefix='runs-')  # a fresh out_dir for every run
    for k in range(pairs):
        runs = train_runs(runs_dir, data, k) if mode == 'train' else lora_runs(runs_dir, base, data, k)
        results = run_pair(runs, n_steps, runs_dir)
        (ours, o), (peer, p) = results.items()
        rows.append(dict(pair=k, ours=ours, peer=peer, ours_wall_ms=o[0], ours_cpu_ms=o[1], ours_val_loss=o[2],
                         peer_wall_ms=p[0], peer_cpu_ms=p[1], peer_val_loss=p[2], cpu_ratio=o[1] / p[1],
                         wall_ratio=o[0] / p[0]))
        print(f"pair {k}: {ours} {o[1]:.1f} CPU-ms/step ({o[0]:.1f} wall), val {o[2]} | {peer} {p[1]:.1f} CPU-ms/step "
              f"({p[0]:.1f} wall), val {p[2]} | ours/peer {o[1] / p[1]:.3f} (CPU), {o[0] / p[0]:.3f} (wall)", flush=True)
    summary = dict(cpu_ratio=statistics.median(r['cpu_ratio'] for r in rows),
                   wall_ratio=statistics.median(r['wall_ratio'] for r in rows),
                   ours_cpu_ms=statistics.median(r['ours_cpu_ms'] for r in rows),
                   peer_cpu_ms=statistics.median(r['peer_cpu_ms'] for r in rows))
    print(f"median of {pairs} pair(s): ours {summary['ours_cpu_ms']:.1f} vs {rows[0]['peer']} "
          f"{summary['peer_cpu_ms']:.1f} CPU-ms/step: ours/peer {summary['cpu_ratio']:.3f} (CPU time), "
          f"{summary['wall_ratio']:.3f} (wall)")
    if json:
        with open(json, 'w') as f:
            json_lib.dump(dict(mode=mode, environment=env, command=' '.join(['python', *sys.argv]), rows=rows,
                               summary=summary, date=time.strftime('%Y-%m-%d')), f, indent=2)
        print(f"wrote {json}")
    if not work_dir:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
