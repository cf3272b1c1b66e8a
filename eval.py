"""
Zero- and few-shot evaluation on local task files, scored as lm-eval (EleutherAI's lm-evaluation-harness) scores
them, so that the numbers compare with published ones: HellaSwag-style multiple choice and LAMBADA-style completion.

    python eval.py --init_from=out-mpt-125m --tasks=hellaswag_val.jsonl
    python eval.py --init_from=path/to/mpt-7b --tasks=hellaswag_val.jsonl,lambada_openai.jsonl --json=results.json
    torchrun --standalone --nproc_per_node=8 eval.py --init_from=out-mpt-1b/ckpt-010000 --tasks=hellaswag_val.jsonl

init_from is a train.py out_dir (its ckpt.pt, as sample.py reads it; without one its newest ckpt-NNNNNN/), one of
its sharded checkpoints (out_dir/ckpt-NNNNNN, any number of processes having written it; a LoRA run's adapters
merged into its base), or a Hugging Face MPT directory. The text is encoded with the model's own tokenizer: the
one the run recorded in its data's meta.json, or the Hugging Face directory's tokenizer.json.

A task file is JSON lines, in one of three formats (told apart by the first line's keys):
- HellaSwag's own (hellaswag_val.jsonl: ctx or activity_label/ctx_a/ctx_b, endings, label): the context is
  lm-eval's, activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), with its clean-up of WikiHow's [title] and
  [step] marks (see hellaswag_text); so are the endings;
- llm-foundry's multiple choice (query, choices, gold: the index of the right choice);
- llm-foundry's language modeling (context, continuation): right when every token of the continuation is the
  model's greedy choice (LAMBADA's accuracy).
Each choice is scored as the continuation " " + choice after the context (no space added when the choice already
starts with whitespace, and whitespace that ends the context moves to the continuation, as lm-eval does); context +
continuation are encoded whole and the continuation's tokens are those after the context's. acc: the choice of
highest summed log-probability; acc_norm: of highest sum divided by the choice's length in characters (lm-eval's
acc_norm; without the space). All choices of an item go in one forward; a context that does not fit is cut from
the left so that context + continuation fit max_seq_len (+1, the last token being only a target).
num_fewshot solved examples ("context continuation\n\n" each) go before each item, drawn from the same file as
lm-eval draws them when its few-shot split is the one evaluated: one random.Random(fewshot_seed) per task, the
items in file order, each drawing num_fewshot + 1 examples and dropping itself (and its duplicates).
Under torchrun the items are split over the processes and the counts summed: the same numbers on any number.
"""
import os
import random
import re
import sys
import time
from json import dumps, loads
from pathlib import Path

from configurator import configure, device_problem, help_if_asked, out_of_range

help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import

import torch
import torch.distributed as dist

from checkpoints import checkpoint_dirs, is_checkpoint, verify
from common import fail, print0
from model import MPT, MPTConfig, check_attention

# -----------------------------------------------------------------------------
# the model
init_from = 'out'  # a train.py out_dir, one of its ckpt-NNNNNN/, or a Hugging Face MPT directory
# the tasks
tasks = ''  # a task file (.jsonl), or several, comma-separated: --tasks=hellaswag_val.jsonl,lambada_openai.jsonl
num_fewshot = 0  # solved examples before each item, drawn from the same file (never the item itself)
fewshot_seed = 1234  # the draws follow from it (lm-eval's default seed: its draws and ours are the same)
max_seq_len = None  # context + continuation are cut from the left to this; None = the model's max_seq_len
json = ''  # also write {task: {items, acc, acc_norm}} to this file (acc alone for a completion task)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # with torchrun each process takes cuda:LOCAL_RANK
dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if torch.cuda.is_available() else 'float32'
attn_impl = None  # None = the checkpoint's; 'torch' | 'triton' | 'flash'
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# task files -> items: {line, context, choices (the continuations scored), lengths (for acc_norm), gold}

def hellaswag_text(text):
    """lm-eval's clean-up of HellaSwag's text: WikiHow's ' [title]' becomes '. ', the other [bracketed] marks go,
    a double space becomes one."""
    text = text.strip().replace(' [title]', '. ')
    return re.sub(r'\[.*?\]', '', text).replace('  ', ' ')


def read_lines(path):
    """[(line number, JSON object)] of a .jsonl file; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as e:
        fail(f"task file {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except ValueError as e:
            fail(f"{path}:{n}: not a JSON line ({e})")
        if not isinstance(record, dict):
            fail(f"{path}:{n}: a JSON object is expected, got {type(record).__name__}")
        records.append((n, record))
    if not records:
        fail(f"{path}: no items (the file is empty)")
    return records


FORMATS = {  # keys that tell a format -> (kind, the keys each line must have)
    'hellaswag': ('choice', ('endings', 'label')),
    'choice': ('choice', ('query', 'choices', 'gold')),
    'completion': ('completion', ('context', 'continuation')),
}


def file_format(path, record):
    if 'endings' in record:
        return 'hellaswag'
    if 'choices' in record:
        return 'choice'
    if 'continuation' in record:
        return 'completion'
    fail(f"{path}:1: not a task format this reads (keys {sorted(record)[:6]}): HellaSwag's (ctx, endings, label), "
         f"multiple choice (query, choices, gold) or completion (context, continuation)")


def parse(path, n, record, form):
    """(context, choices, gold) of one line; the choices as the file gives them (HellaSwag's cleaned up)."""
    missing = [k for k in FORMATS[form][1] if k not in record]
    if form == 'hellaswag' and not ('ctx' in record or ('ctx_a' in record and 'ctx_b' in record)):
        missing.insert(0, 'ctx')
    if missing:
        fail(f"{path}:{n}: no {' or '.join(repr(k) for k in missing)}"
             + (" (HellaSwag's test file has no labels: use hellaswag_val.jsonl)" if missing == ['label'] else ''))
    if form == 'completion':
        context, choices, gold = record['context'], [record['continuation']], 0
    elif form == 'choice':
        context, choices, gold = record['query'], record['choices'], record['gold']
    else:
        ctx = (record['ctx_a'] + ' ' + record['ctx_b'].capitalize()) if 'ctx_a' in record else record['ctx']
        label = record.get('activity_label')
        context = hellaswag_text(f"{label}: {ctx}" if isinstance(label, str) and isinstance(ctx, str) else ctx)
        choices, gold = record['endings'], record['label']
        if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
            choices = [hellaswag_text(c) for c in choices]
        if isinstance(gold, str) and gold.isdigit():  # Hugging Face's copy of HellaSwag has "3"
            gold = int(gold)
    if not isinstance(context, str):
        fail(f"{path}:{n}: the context is {type(context).__name__}, not text")
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        fail(f"{path}:{n}: the {'continuation' if form == 'completion' else 'choices'} must be "
             f"{'non-empty text' if form == 'completion' else 'a list of non-empty texts'}, got {choices!r:.80}")
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
        fail(f"{path}:{n}: the label {gold!r} is not the index of one of its {len(choices)} choices (0 to "
             f"{len(choices) - 1})")
    return context, choices, gold


def continuation(choice):
    """What is scored after the context: " " + the choice, unless it starts with whitespace."""
    return choice if choice[:1].isspace() else ' ' + choice


def read_task(path, num_fewshot=0, seed=1234):
    """A task file as {name, path, kind ('choice' | 'completion'), items}; each item {line, context, choices (the
    continuations scored), lengths (each choice's characters, for acc_norm), gold}, its context led by num_fewshot
    solved examples of the same file (the module docstring says how they are drawn). Bad input: one line, exit 1."""
    records = read_lines(path)
    form = file_format(path, records[0][1])
    parsed = [parse(path, n, record, form) for n, record in records]
    rnd, pool = random.Random(seed), [record for _, record in records]
    if num_fewshot and len(pool) <= num_fewshot:
        fail(f"{path}: {len(pool)} items, too few to draw num_fewshot={num_fewshot} examples for each from the others")
    items = []
    for (n, record), (context, choices, gold) in zip(records, parsed):
        shots = []
        if num_fewshot:  # as lm-eval's ContextSampler with the evaluated split as its few-shot split
            shots = [r for r in rnd.sample(pool, num_fewshot + 1) if r != record][:num_fewshot]
            if len(shots) < num_fewshot:  # the item's duplicates were drawn too
                shots = rnd.sample([r for r in pool if r != record], num_fewshot)
        prefix = ''
        for shot in shots:
            c, options, g = parsed[pool.index(shot)]
            prefix += c + continuation(options[g]) + '\n\n'
        items.append(dict(line=n, context=prefix + context, choices=[continuation(c) for c in choices],
                          lengths=[len(c) for c in choices], gold=gold))
    return dict(name=Path(path).stem, path=str(path), kind=FORMATS[form][0], items=items)


def encode_task(task, encode, max_seq_len, eot=None):
    """The task with each item's 'rows': for each choice (tokens, n), context and continuation tokens cut from the
    left to max_seq_len + 1, the last n of them the continuation's (lm-eval's split: context + continuation
    encoded whole, the continuation's tokens those after the context's). An empty context is eot (lm-eval's
    prefix token). A continuation longer than max_seq_len tokens: one line, exit 1. Returns (task, the number
    of items whose context was cut)."""
    cut = 0
    for item in task['items']:
        rows, context = [], item['context']
        for k, choice in enumerate(item['choices']):
            text = context.rstrip()
            choice = context[len(text):] + choice  # whitespace ending the context goes with the continuation
            if text:
                head = encode(text)
                tail = encode(text + choice)[len(head):]
            elif eot is not None:
                head, tail = [eot], encode(choice)
            else:
                fail(f"{task['path']}:{item['line']}: the context is empty and this tokenizer has no end-of-text "
                     f"token to stand for it")
            if not tail:
                fail(f"{task['path']}:{item['line']}: choice {k} ({choice!r:.40}) gives no tokens after the context")
            if len(tail) > max_seq_len:
                fail(f"{task['path']}:{item['line']}: the item is longer than the context: choice {k} alone is "
                     f"{len(tail)} tokens, the model reads {max_seq_len} (max_seq_len)")
            cut += len(head) + len(tail) > max_seq_len + 1 and k == 0
            rows.append(((head + tail)[-(max_seq_len + 1):], len(tail)))
        item['rows'] = rows
    return task, cut


def load_tasks(paths, encode, max_seq_len, num_fewshot=0, seed=1234, eot=None):
    """read_task + encode_task of each path, for evaluate_tasks (train.py: once, before training, so a bad file
    fails at the start, not at the first evaluation). A note for each task some of whose contexts are cut."""
    out = []
    for path in paths:
        task, cut = encode_task(read_task(path, num_fewshot, seed), encode, max_seq_len, eot)
        if cut:
            print0(f"note: {task['name']}: the context of {cut} of {len(task['items'])} items is cut from the left "
                   f"to {max_seq_len} tokens")
        out.append(task)
    names = [t['name'] for t in out]
    for t in out:  # two files of the same name: the path tells them apart
        t['name'] = t['path'] if names.count(t['name']) > 1 else t['name']
    return out


# -----------------------------------------------------------------------------
# scoring

@torch.no_grad()
def score(model, rows, device):
    """([log-likelihood], [greedy]) of each row's continuation, all rows in one forward (right-padded): rows are
    encode_task's (tokens, n); greedy: every continuation token is the model's likeliest."""
    T = max(len(tokens) for tokens, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (tokens, n) in enumerate(rows):
        x[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        y[r, len(tokens) - 1 - n:len(tokens) - 1] = torch.tensor(tokens[-n:])
    x, y = x.to(device), y.to(device)
    logits, nll = model(x, y, reduction='none')  # fp32 cross-entropy: -log p of each target, 0 where ignored
    greedy = ((logits.argmax(-1) == y) | (y == -1)).all(1)
    return (-nll.view(len(rows), T).sum(1)).tolist(), greedy.tolist()


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # the first of equals, as numpy's


def evaluate_tasks(model, tasks, device, rank=0, world_size=1):
    """{task name: {items, acc, acc_norm}} ({items, acc} for a completion task) of load_tasks' tasks. Item j goes
    to rank j % world_size and the counts are summed over the ranks (torch.distributed, initialized by the caller);
    every rank runs the same number of forwards (an FSDP-sharded model all-gathers its weights in each), the short
    ones repeating their last item, weighted 0. The model is put in eval mode and back."""
    training = model.training
    model.eval()
    results = {}
    for task in tasks:
        items = task['items']
        counts = torch.zeros(3, dtype=torch.float64)  # items, right by acc, right by acc_norm
        for k in range(-(-len(items) // world_size)):
            j = k * world_size + rank
            item = items[min(j, len(items) - 1)]
            ll, greedy = score(model, item['rows'], device)
            if task['kind'] == 'completion':
                right = [greedy[0], greedy[0]]
            else:
                right = [argmax(ll) == item['gold'],
                         argmax([v / n for v, n in zip(ll, item['lengths'])]) == item['gold']]
            counts += torch.tensor([1.0, *map(float, right)], dtype=torch.float64) * (j < len(items))
        if world_size > 1:
            counts = counts.to(device)
            dist.all_reduce(counts)
        n, acc, acc_norm = counts.tolist()
        results[task['name']] = dict(items=int(n), acc=acc / n, **({} if task['kind'] == 'completion' else
                                                                    dict(acc_norm=acc_norm / n)))
    model.train(training)
    return results


# -----------------------------------------------------------------------------
# the command line: the model, its tokenizer, the processes, the table

def script(name):
    """sample.py's or export.py's functions: a script reads its settings from the command line when imported, so
    it is imported with none (its defaults), not with ours."""
    import importlib
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return importlib.import_module(name)
    finally:
        sys.argv = argv


def read_meta(data_dir):
    path = Path(data_dir or '') / 'meta.json'
    return loads(path.read_text()) if data_dir and path.is_file() else None


def load_checkpoint(path, overrides):
    """(model, meta) of one sharded checkpoint, checked whole against its manifest first, read in this process
    (export.py's checkpoint_tensors); a LoRA run's adapters merged into its base (lora.merged_weights)."""
    from dataclasses import replace
    from torch.distributed.checkpoint.api import CheckpointException
    problem, _ = verify(path)
    if problem:
        fail(f"{path} is damaged ({problem}): evaluate the checkpoint before it")
    try:
        info = loads((path / 'train.json').read_text())
    except (OSError, ValueError) as e:
        fail(f"{path}/train.json is unreadable ({e}): not a checkpoint written by train.py")
    checkpoint_tensors = script('export').checkpoint_tensors
    config = MPTConfig(**{**info['model'], 'init_device': 'cpu', **overrides})
    try:
        if info.get('lora'):
            from lora import merged_weights
            weight = merged_weights(checkpoint_tensors(path), info['lora'], info['base'])
            state = {name: weight(name) for name in MPT(replace(config, init_device='meta')).state_dict()}
            print0(f"LoRA adapters (rank {info['lora']['rank']}) merged into {info['base']['path']}")
        else:
            state = checkpoint_tensors(path)
    except CheckpointException as e:  # DCP's, for a checkpoint from before manifests: each rank's exception
        cause = next(iter(e.failures.values()))[0]
        fail(f"{path} cannot be read ({type(cause).__name__}: {cause}): it is damaged; evaluate the one before it")
    return MPT.from_state_dict(config, state, source=str(path)), read_meta(info.get('settings', {}).get('data_dir'))


def run_tasks(paths, model, meta, max_seq_len, num_fewshot=0, seed=1234):
    """load_tasks for a training run (train.py's eval_tasks): encoded with the tokenizer of the run's data (its
    meta.json, as sample.py reads it), cut to the run's max_seq_len. Every problem is one line, at the start."""
    sample = script('sample')
    sample.init_from = 'resume'
    try:
        encode, _, eot, _, _ = sample.load_tokenizer(model, meta or None)
    except (ValueError, FileNotFoundError) as e:
        fail(f"eval_tasks: {e}")
    return load_tasks(paths, encode, max_seq_len, num_fewshot, seed, eot)


def load_model(init_from):
    """(model, encode, eot, what it is) of init_from, the tokenizer sample.py would use for it."""
    sample = script('sample')
    path, overrides = Path(init_from), {} if attn_impl is None else {'attn_impl': attn_impl}
    sample.attn_impl, sample.init_from = attn_impl, 'resume'
    if not path.is_dir():
        fail(f"init_from={init_from!r}: no such folder; give a train.py out_dir, one of its ckpt-NNNNNN/, or a "
             f"Hugging Face MPT directory")
    try:
        if (path / 'config.json').is_file():
            sample.init_from = str(path)
            model, meta, what = MPT.from_hf(path, **overrides), None, f"{path} (Hugging Face)"
        elif is_checkpoint(path):
            (model, meta), what = load_checkpoint(path, overrides), str(path)
        elif (path / 'ckpt.pt').is_file():
            sample.out_dir = str(path)
            (model, meta), what = sample.load_model(), str(path / 'ckpt.pt')
        elif checkpoint_dirs(path):
            newest = Path(checkpoint_dirs(path)[-1])
            (model, meta), what = load_checkpoint(newest, overrides), f"{newest} (the newest; {path} has no ckpt.pt)"
        else:
            fail(f"init_from={init_from}: no ckpt.pt, ckpt-NNNNNN/ or config.json there; give a train.py out_dir, "
                 f"one of its ckpt-NNNNNN/, or a Hugging Face MPT directory")
        encode, _, eot, tokenizer, _ = sample.load_tokenizer(model, meta)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    return model, encode, eot, f"{what}; tokenizer: {tokenizer}"


def main():
    configure(globals(), sys.argv[1:], verbose=int(os.environ.get('RANK', 0)) == 0)
    problems = out_of_range(globals(), __file__, whole=dict(num_fewshot=0, fewshot_seed=0, max_seq_len=1),
                            choices=dict(dtype=('float32', 'bfloat16', 'float16')))
    paths = [p.strip() for p in tasks.split(',') if p.strip()]
    if not paths:
        problems.append("give --tasks=FILE.jsonl (or several, comma-separated): the items to evaluate")
    problems += [p for p in [device_problem(device)] if p]
    if problems:
        fail('\nerror: '.join(problems))
    rank, world_size, where = 0, 1, torch.device(device)
    if 'RANK' in os.environ:  # torchrun: the items split over the processes
        if where.type == 'cuda':
            where = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(where)
        dist.init_process_group('nccl' if where.type == 'cuda' else 'gloo')
        rank, world_size = dist.get_rank(), dist.get_world_size()
    model, encode, eot, what = load_model(init_from)
    print0(f"evaluating {what}")
    try:
        check_attention(model.config, where, getattr(torch, dtype))
    except ValueError as e:
        fail(str(e))
    model.to(device=where, dtype=getattr(torch, dtype))
    read = load_tasks(paths, encode, max_seq_len or model.config.max_seq_len, num_fewshot, fewshot_seed, eot)
    results, width = {}, max(len(t['name']) for t in read)
    print0(f"{'task':<{width}}  {'items':>7}  {'acc':>7}  {'acc_norm':>8}  {'seconds':>8}")
    for task in read:
        t0 = time.time()
        results.update(evaluate_tasks(model, [task], where, rank, world_size))
        r = results[task['name']]
        norm = f"{r['acc_norm']:.4f}" if 'acc_norm' in r else '-'
        print0(f"{task['name']:<{width}}  {r['items']:>7}  {r['acc']:>7.4f}  {norm:>8}  {time.time() - t0:>8.1f}")
    if json and rank == 0:
        Path(json).write_text(dumps(results, indent=2) + '\n')
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
