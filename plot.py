"""
Loss curves and benchmark results as pictures (PNG), with matplotlib (optional: pip install matplotlib).

    python plot.py out-shakespeare-char-cpu                      # -> out-shakespeare-char-cpu/loss.png
    python plot.py out-mpt-125m out-mpt-350m --out=sizes.png     # one line per run
    python plot.py attn.json                                     # a bench.py --json result -> attn.png

A run (a train.py out_dir): train loss (every log_interval steps, thin) and val loss (every eval_interval,
with markers) against the tokens trained on, on a log axis as in the MPT README's compute-optimal curves.
Tokens are steps x batch_size x gradient_accumulation_steps x max_seq_len, the run's own settings (from its
newest ckpt-NNNNNN/train.json; without one the axis is steps). Step 0 has seen no tokens and so is off a log
axis. When the run evaluated at several lengths (eval_seq_lens), a second panel shows val loss against the
evaluation length at its last evaluation (val_loss_by_seq_len in metrics.jsonl). Later lines of metrics.jsonl
win over earlier ones for the same step (a resume logs again the steps after its checkpoint); eval_only
records are left out.

A bench.py --json file: attn mode, TFLOP/s of each implementation for each shape (forward, backward, both);
train mode, tokens/s and MFU of each implementation (several files: one group each); sample mode, decode
tokens/s, ours against transformers', for each batch size.
"""
import glob
import json
import os
import sys

import common
from configurator import configure, help_if_asked, out_of_range

USAGE = "python plot.py OUT_DIR|BENCH.json [...] [--key=value ...]"
help_if_asked(__file__, USAGE)

# -----------------------------------------------------------------------------
out = ''  # the PNG; empty: OUT_DIR/loss.png for one run, BENCH.png beside one bench file, else plot.png
title = ''  # the figure's title; empty: none
dpi = 100  # pixels per inch of the PNG, a figure of 10 x 4 inches
# -----------------------------------------------------------------------------


def fail(message):
    common.fail(message, prog='plot.py')


def read_run(path):
    """One train.py run: {name, x_label, train: (x, loss), val: (x, loss), by_len: {seq_len: loss} or None,
    tasks: {task: {step: accuracy}} (eval_tasks: acc_norm where the task has it, else acc)}."""
    metrics = os.path.join(path, 'metrics.jsonl')
    if not os.path.isfile(metrics):
        fail(f"{path}: no metrics.jsonl: give a train.py out_dir or a bench.py --json file")
    train, val, by_len, tasks = {}, {}, None, {}
    with open(metrics) as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                fail(f"{metrics}:{n}: not a JSON line (is the run still writing it?)")
            if record.get('eval_only'):
                continue
            if 'val_loss' in record:
                val[record['iter']] = record['val_loss']
                by_len = record.get('val_loss_by_seq_len', by_len)
                for task, r in record.get('tasks', {}).items():
                    tasks.setdefault(task, {})[record['iter']] = r.get('acc_norm', r['acc'])
            elif 'loss' in record:
                train[record['iter']] = record['loss']
    if not train and not val:
        fail(f"{metrics} holds no losses yet")
    checkpoints = sorted(glob.glob(os.path.join(path, 'ckpt-*', 'train.json')))
    per_step, x_label = 1, 'steps'
    if checkpoints:
        with open(checkpoints[-1]) as f:
            s = json.load(f)['settings']
        per_step, x_label = s['batch_size'] * s['gradient_accumulation_steps'] * s['max_seq_len'], 'tokens'

    def curve(losses):  # step 0 is off a log axis
        steps = sorted(k for k in losses if k > 0)
        return [k * per_step for k in steps], [losses[k] for k in steps]
    by_len = {int(k): v for k, v in by_len.items()} if by_len else None
    return dict(name=os.path.basename(os.path.normpath(path)), x_label=x_label, train=curve(train), val=curve(val),
                by_len=by_len, tasks={task: curve(acc) for task, acc in tasks.items()})


def plot_runs(runs, plt):
    """Train and val loss against tokens (log-x), one color per run; val loss by eval length if any run has it; the
    eval_tasks' accuracies against tokens if any run has them (one line style per task)."""
    with_lengths, with_tasks = [r for r in runs if r['by_len']], [r for r in runs if r['tasks']]
    fig, axes = plt.subplots(1, 1 + bool(with_lengths) + bool(with_tasks), figsize=(10, 4), squeeze=False)
    ax = axes[0][0]
    for i, run in enumerate(runs):
        color = f"C{i}"
        ax.plot(*run['train'], color=color, alpha=0.35, linewidth=1, label=f"{run['name']} train")
        ax.plot(*run['val'], color=color, marker='o', markersize=3, linewidth=1.5, label=f"{run['name']} val")
    ax.set_xscale('log')
    ax.set_xlabel(runs[0]['x_label'] if len({r['x_label'] for r in runs}) == 1 else 'tokens (steps where unknown)')
    ax.set_ylabel('loss (nats per token)')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    if with_lengths:
        ax = axes[0][1]
        for i, run in enumerate(runs):
            if run['by_len']:
                lengths = sorted(run['by_len'])
                ax.plot(lengths, [run['by_len'][L] for L in lengths], color=f"C{i}", marker='o', label=run['name'])
        ax.set_xscale('log', base=2)
        ax.set_xlabel('evaluation length (tokens)')
        ax.set_ylabel('val loss, last evaluation')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    if with_tasks:
        ax = axes[0][-1]
        for i, run in enumerate(runs):
            for k, (task, points) in enumerate(sorted(run['tasks'].items())):
                ax.plot(*points, color=f"C{i}", linestyle=['-', '--', ':', '-.'][k % 4], marker='o', markersize=3,
                        label=f"{run['name']} {task}")
        ax.set_xscale('log')
        ax.set_xlabel(runs[0]['x_label'])
        ax.set_ylabel('accuracy (acc_norm, or acc)')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    return fig


# bench.py --json: what each mode's picture shows. (metric, label) per panel; rows grouped by `group`, one bar
# per `bar` (None: one bar per metric of the panel's list)
BENCH = {
    'attn': dict(group='shape', bar='impl', panels=[[('fwd_tflops', 'forward TFLOP/s')], [('bwd_tflops', 'backward TFLOP/s')],
                                                     [('fwd_bwd_tflops', 'forward + backward TFLOP/s')]]),
    'train': dict(group='file', bar='impl', panels=[[('tokens_per_sec', 'tokens/s')], [('mfu_pct', 'MFU (%)')]]),
    'sample': dict(group='batch', bar=None, panels=[[('ours_tok_s', 'ours'), ('hf_tok_s', 'transformers')]]),
}


def read_bench(path):
    try:
        with open(path) as f:
            result = json.load(f)
        mode, rows = result['mode'], result['rows']
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a bench.py --json result ({type(e).__name__}: {e})")
    if mode not in BENCH:
        fail(f"{path}: bench.py mode={mode!r}; plot.py draws {', '.join(BENCH)}")
    name = os.path.splitext(os.path.basename(path))[0]
    return dict(mode=mode, rows=[{**r, 'file': name} for r in rows], environment=result.get('environment', {}))


def plot_bench(results, plt):
    """Grouped bars: for each panel's metric, a group per shape / file / batch size, a bar per implementation."""
    spec = BENCH[results[0]['mode']]
    rows = [r for result in results for r in result['rows']]
    groups = list(dict.fromkeys(str(r[spec['group']]) for r in rows))
    fig, axes = plt.subplots(1, len(spec['panels']), figsize=(10, 4), squeeze=False)
    for ax, panel in zip(axes[0], spec['panels']):
        if spec['bar']:  # one bar per implementation that has the number
            metric, label = panel[0]
            bars = list(dict.fromkeys(r[spec['bar']] for r in rows if r.get(metric) is not None))
            value = lambda g, b: next((r[metric] for r in rows if str(r[spec['group']]) == g and r[spec['bar']] == b
                                       and r.get(metric) is not None), 0)
            ax.set_ylabel(label)
        else:
            bars = [label for _, label in panel]
            names = dict((label, metric) for metric, label in panel)
            value = lambda g, b: next((r.get(names[b]) or 0 for r in rows if str(r[spec['group']]) == g), 0)
            ax.set_ylabel('tokens/s')
        width = 0.8 / max(1, len(bars))
        for i, b in enumerate(bars):
            ax.bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(groups))],
                   [value(g, b) for g in groups], width, label=b, color=f"C{i}")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_xlabel({'shape': 'B x H x T x D', 'batch': 'batch size', 'file': 'bench file'}[spec['group']])
        ax.grid(True, axis='y', alpha=0.3)
    axes[0][0].legend(fontsize=7)
    env = results[0]['environment']
    fig.suptitle(title or f"bench.py --mode={results[0]['mode']}: {env.get('device', '?')}, torch {env.get('torch', '?')}",
                 fontsize=10)
    return fig


def main(paths):
    if not paths:
        fail(f"nothing to plot: {USAGE}")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        fail(f"{', '.join(missing)}: no such file or folder")
    bench = [p for p in paths if os.path.isfile(p)]
    if bench and len(bench) < len(paths):
        fail("plot runs (folders) and bench.py results (.json files) separately: one kind per picture")
    results = [read_bench(p) for p in bench] if bench else [read_run(p) for p in paths]
    if bench and len({r['mode'] for r in results}) > 1:
        fail(f"these bench results are of different modes ({', '.join(sorted({r['mode'] for r in results}))}): "
             f"one mode per picture")
    try:
        import matplotlib
    except ImportError:
        fail("plot.py draws with matplotlib, which is not installed: pip install matplotlib")
    matplotlib.use('Agg')  # files only, no window
    import matplotlib.pyplot as plt
    fig = plot_bench(results, plt) if bench else plot_runs(results, plt)
    if title and not bench:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out or (os.path.splitext(paths[0])[0] + '.png' if len(paths) == 1 and bench else
                   os.path.join(paths[0], 'loss.png') if len(paths) == 1 else 'plot.png')
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}")
    print(f"wrote {path}")
    return path


if __name__ == '__main__':
    configure(globals(), [a for a in sys.argv[1:] if a.startswith('-')], verbose=False)
    for problem in out_of_range(globals(), __file__, whole=dict(dpi=1)):
        fail(problem)
    main([a for a in sys.argv[1:] if not a.startswith('-')])  # the bare arguments are what to plot
