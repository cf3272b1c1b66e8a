"""eval.py against lm-eval (EleutherAI's lm-evaluation-harness, 0.4): the same synthetic items as local lm-eval
tasks (a YAML over each jsonl, found with TaskManager(include_path=...)), run by lm_eval.simple_evaluate with its
'hf' model on a Hugging Face export of a tiny random MPT (MPT.save_hf, the tiny BPE's tokenizer.json). lm-eval's
requests (context, continuation), its per-choice log-likelihoods and its accuracies are the reference; one
module fixture runs lm-eval once (its import and its task index cost seconds)."""
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import eval as ev  # noqa: E402
from checkpoints import file_crc, write_manifest  # noqa: E402
from conftest import SHAKESPEARE  # noqa: E402
from lora import base_fingerprint  # noqa: E402
from model import MPT, MPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ev.attn_impl = 'torch'  # eval.load_model's models: not the Triton kernel, which the tests interpret on the CPU
SEQ = 64  # the model's max_seq_len: the 3-shot contexts are often longer, so lm-eval and we both cut them
SHOTS = 3
TWINS = (10, 26)
WORDS = sorted(set(re.findall(r"[a-z]+", SHAKESPEARE.read_text()[:30000])))
ODD = ["café", "naïve", "Ελλάδα", "日本語", "Ωμέγα", "über"]  # more bytes than characters: acc_norm counts characters


def phrase(rnd, lo, hi, odd=0.0):
    return ' '.join(rnd.choice(ODD if rnd.random() < odd else WORDS) for _ in range(rnd.randint(lo, hi)))


def write_tasks(path):
    """choice.jsonl (llm-foundry's multiple choice: 32 items, one of them twice), completion.jsonl (llm-foundry's
    language modeling, 32) and hellaswag.jsonl (HellaSwag's own fields and its WikiHow marks, 24)."""
    rnd = random.Random(0)
    choice = [dict(query=phrase(rnd, 3, 12) + (' ' if k % 5 == 0 else ''),  # a trailing space moves to the choice
                   choices=[phrase(rnd, 1, 6, odd=0.1) for _ in range(rnd.randint(2, 5))]) for k in range(27)]
    # unlikely letters against a non-ASCII word: by bytes the word would win, by characters (lm-eval) it loses
    choice += [dict(query=phrase(rnd, 3, 8), choices=[rnd.choice(['zqxj', 'xqzvk', 'jxqz']), odd])
               for odd in ODD[2:5]]
    for c in choice:
        c['gold'] = rnd.randrange(len(c['choices']))
    for at in TWINS:  # an item three times: never its own twin's few-shot example either (lm-eval's rule; with
        choice.insert(at, choice[3])  # 3 shots, at these places some draw holds two of the three: the redraw)
    # the continuations: some the greedy continuation of a short context (found below), so that acc is not 0
    completion = [dict(context=phrase(rnd, 2, 10), continuation=rnd.choice(WORDS)) for _ in range(32)]
    hellaswag = []
    for k in range(24):
        a, b = phrase(rnd, 3, 8), phrase(rnd, 0, 4)
        hellaswag.append(dict(ind=k, activity_label=phrase(rnd, 1, 2).title(), ctx_a=a + (' [title]' if k % 4 == 0 else ''),
                              ctx_b=b, ctx=f"{a} {b}", split='val', split_type='indomain', source_id=f'x{k}',
                              endings=[phrase(rnd, 2, 9) + (' [step] ' + phrase(rnd, 1, 3) if j == k % 4 else '')
                                       for j in range(4)], label=rnd.randrange(4)))
    for name, items in (('choice', choice), ('completion', completion), ('hellaswag', hellaswag)):
        (path / f'{name}.jsonl').write_text(''.join(json.dumps(i, ensure_ascii=False) + '\n' for i in items))


def greedy_continuations(model, encode, decode, path):
    """Make half the completions the model's own greedy next word, so that some are right."""
    items = [json.loads(line) for line in path.read_text().splitlines()]
    for item in items[::2]:
        ids = encode(item['context'])
        out = model.generate([ids], 3, temperature=0)[0][len(ids):].tolist()
        word = decode(out).split()
        if word:
            item['continuation'] = word[0]
    path.write_text(''.join(json.dumps(i) + '\n' for i in items))


def yaml(task, file, kind, shots, cache):
    common = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\n"
              f"  cache_dir: {cache}\ntest_split: test\nfewshot_split: test\nnum_fewshot: {shots}\n")
    if kind == 'completion':  # lambada_openai's form: the space is the target's, the delimiter empty
        return common + ("output_type: loglikelihood\ndoc_to_text: context\n"
                         "doc_to_target: \"{{' ' + continuation}}\"\ntarget_delimiter: \"\"\n"
                         "metric_list:\n  - metric: acc\n")
    if kind == 'hellaswag':  # lm-eval's own hellaswag task, over our file: its process_docs (utils.py below)
        return common + ("output_type: multiple_choice\nprocess_docs: !function utils.process_docs\n"
                         "doc_to_text: \"{{query}}\"\ndoc_to_target: \"{{label}}\"\ndoc_to_choice: choices\n"
                         "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return common + ("output_type: multiple_choice\ndoc_to_text: query\ndoc_to_target: gold\n"
                     "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


@pytest.fixture(scope='module')
def lm_eval_run(tmp_path_factory, tokenizer_dir):
    """(the Hugging Face directory, the task files' folder, lm-eval's results, its samples by task)."""
    root = tmp_path_factory.mktemp('eval')
    hf = root / 'hf'
    hf.mkdir()
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        shutil.copy(tokenizer_dir / name, hf / name)
    torch.manual_seed(0)
    model = MPT(MPTConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=2, max_seq_len=SEQ, attn_impl='torch'))
    model.save_hf(hf)
    data = root / 'data'
    data.mkdir()
    write_tasks(data)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(hf / 'tokenizer.json'))
    greedy_continuations(model.eval(), lambda s: tok.encode(s).ids, tok.decode, data / 'completion.jsonl')
    specs = root / 'tasks'
    specs.mkdir()
    (specs / 'utils.py').write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    for kind in ('choice', 'completion', 'hellaswag'):
        for shots in (0, SHOTS):
            (specs / f'{kind}{shots}.yaml').write_text(yaml(f'{kind}{shots}', data / f'{kind}.jsonl', kind, shots,
                                                            root / 'cache'))
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(
        model='hf', model_args=f'pretrained={hf},dtype=float32,max_length={SEQ}', device='cpu', batch_size=8,
        tasks=[f'{kind}{shots}' for kind in ('choice', 'completion', 'hellaswag') for shots in (0, SHOTS)],
        task_manager=TaskManager(include_path=str(specs)), log_samples=True)
    return hf, data, out['results'], {t: sorted(s, key=lambda s: s['doc_id']) for t, s in out['samples'].items()}


def ours(hf, data, kind, shots):
    """Our model (model.py's MPT from the Hugging Face directory) and the task as eval.py reads it."""
    model, encode, eot, _ = ev.load_model(str(hf))
    return model.eval(), ev.load_tasks([data / f'{kind}.jsonl'], encode, SEQ, shots, 1234, eot)[0]


@pytest.mark.parametrize('shots', [0, SHOTS])
@pytest.mark.parametrize('kind', ['choice', 'completion', 'hellaswag'])
def test_the_same_requests_log_likelihoods_and_accuracies_as_lm_eval(lm_eval_run, kind, shots):
    hf, data, results, samples = lm_eval_run
    model, task = ours(hf, data, kind, shots)
    theirs = samples[f'{kind}{shots}']
    assert len(theirs) == len(task['items']) == {'choice': 32, 'completion': 32, 'hellaswag': 24}[kind]
    cut = by_bytes = 0
    for item, sample in zip(task['items'], theirs):
        # the same text scored: few-shot examples drawn alike, HellaSwag's clean-up, the " " before each choice
        assert [tuple(a) for a in sample['arguments']] == [(item['context'], c) for c in item['choices']]
        ll, greedy = ev.score(model, item['rows'], 'cpu')
        assert ll == pytest.approx([r[0] for r in sample['filtered_resps']], abs=1e-4, rel=0)
        assert greedy == [r[1] for r in sample['filtered_resps']]
        cut += len(item['rows'][0][0]) == SEQ + 1
        if kind != 'completion':
            chars = max(range(len(ll)), key=lambda k: ll[k] / len(item['choices'][k][1:]))
            nbytes = max(range(len(ll)), key=lambda k: ll[k] / len(item['choices'][k][1:].encode()))
            by_bytes += chars != nbytes
    assert cut > 0 or not shots  # some few-shot contexts are cut to max_seq_len, by both alike
    got = ev.evaluate_tasks(model, [task], 'cpu')[task['name']]
    want = results[f'{kind}{shots}']
    assert got['items'] == len(theirs) and got['acc'] == pytest.approx(want['acc,none'], abs=1e-9)
    assert 0 < got['acc'] < 1
    if kind == 'completion':
        assert 'acc_norm' not in got
    else:
        assert got['acc_norm'] == pytest.approx(want['acc_norm,none'], abs=1e-9)
    if kind == 'choice' and shots == 0:
        assert by_bytes > 0  # these items tell lm-eval's acc_norm (characters) from one by bytes


def test_two_processes_give_what_one_gives(lm_eval_run, tmp_path):
    """eval.py itself under torchrun (gloo, 2 processes): its table and JSON equal lm-eval's numbers."""
    hf, data, results, _ = lm_eval_run
    files = ','.join(str(data / f'{k}.jsonl') for k in ('choice', 'completion', 'hellaswag'))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(ROOT / 'eval.py'), f'--init_from={hf}', f'--tasks={files}', f'--num_fewshot={SHOTS}',
                        '--device=cpu', f'--json={tmp_path / "r.json"}'], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / 'r.json').read_text())
    for kind in ('choice', 'completion', 'hellaswag'):
        want = results[f'{kind}{SHOTS}']
        assert got[kind]['items'] == want['sample_len']
        assert got[kind]['acc'] == pytest.approx(want['acc,none'], abs=1e-9)
        assert got[kind].get('acc_norm') == (None if kind == 'completion' else pytest.approx(want['acc_norm,none'],
                                                                                             abs=1e-9))
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[-4][:4] == ['task', 'items', 'acc', 'acc_norm']
    assert rows[-2][:4] == ['completion', '32', f"{got['completion']['acc']:.4f}", '-']


def write_dcp(path, state, info):
    """A sharded checkpoint as train.py lays one out: DCP's files of {'model': state}, train.json, manifest.json."""
    import torch.distributed.checkpoint as dcp
    dcp.save({'model': state}, checkpoint_id=str(path), no_dist=True)
    (path / 'train.json').write_text(json.dumps(info))
    write_manifest(path, {f.name: file_crc(f) for f in path.iterdir()})


def test_our_checkpoints_evaluate_as_the_model_they_hold(lm_eval_run, tmp_path, capsys):
    """ckpt.pt (as sample.py reads it), a ckpt-NNNNNN/ (export.py's reading), a LoRA run's (merged) and its out_dir
    give the model they hold, with the run's tokenizer (its data's meta.json)."""
    hf, data, _, _ = lm_eval_run
    base, task = ours(hf, data, 'choice', 0)
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    (data_dir / 'meta.json').write_text(json.dumps({'tokenizer': str(hf), 'tokenizer_file': str(hf / 'tokenizer.json'),
                                                    'eot_token': 0, 'vocab_size': 500}))
    config = dataclasses.asdict(base.config)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    run = tmp_path / 'run'
    run.mkdir()
    torch.save({'model': state, 'config': config, 'settings': {'data_dir': str(data_dir)}}, run / 'ckpt.pt')
    (run / 'ckpt-000004').mkdir()
    write_dcp(run / 'ckpt-000004', state, {'model': config, 'settings': {'data_dir': str(data_dir)}})
    torch.manual_seed(1)  # a LoRA run's: its adapters only, on the Hugging Face base it started from
    name = 'transformer.blocks.1.attn.Wqkv'
    adapters = {f'{name}.lora_A': torch.randn(2, 64), f'{name}.lora_B': torch.randn(192, 2)}
    lora_run = tmp_path / 'lora'
    (lora_run / 'ckpt-000002').mkdir(parents=True)
    write_dcp(lora_run / 'ckpt-000002', adapters, {
        'model': config, 'settings': {'data_dir': str(data_dir)}, 'base': base_fingerprint(hf),
        'lora': dict(rank=2, alpha=4.0, dropout=0.0, targets=['Wqkv'], quantize_base='')})
    item = task['items'][0]['rows']
    want = ev.score(base, item, 'cpu')[0]
    for path in (run, run / 'ckpt-000004'):
        model, encode, eot, what = ev.load_model(str(path))
        assert 'tokenizer.json' in what and eot == 0
        assert ev.score(model.eval(), item, 'cpu')[0] == pytest.approx(want, abs=1e-5)
    os.remove(run / 'ckpt.pt')  # an out_dir without ckpt.pt: its newest ckpt-NNNNNN/
    assert 'ckpt-000004 (the newest' in ev.load_model(str(run))[3]
    merged = MPT.from_state_dict(MPTConfig(**config), {**state, f'{name}.weight': state[f'{name}.weight']
                                                       + 2.0 * adapters[f'{name}.lora_B'] @ adapters[f'{name}.lora_A']})
    model = ev.load_model(str(lora_run))[0].eval()
    assert ev.score(model, item, 'cpu')[0] == pytest.approx(ev.score(merged.eval(), item, 'cpu')[0], abs=1e-4)
    assert ev.score(model, item, 'cpu')[0] != pytest.approx(want, abs=1e-2)
    shard = next((run / 'ckpt-000004').glob('*.distcp'))  # a damaged checkpoint: one line, before it is read
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))
    fails(capsys, lambda: ev.load_model(str(run / 'ckpt-000004')), 'ckpt-000004 is damaged', shard.name)


def fails(capsys, call, *expected):
    """call() ends with exit status 1 and one line on stderr holding each of expected."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count('\n') == 1 and err.startswith('error: '), err
    for text in expected:
        assert text in err, err


def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    f = tmp_path / 't.jsonl'
    fails(capsys, lambda: ev.read_task(tmp_path / 'none.jsonl'), 'none.jsonl', 'No such file')
    good = json.dumps(dict(query='a b', choices=['c', 'd'], gold=1))
    for lines, expected in [
        ([good, '{"query": "x", "choices": ["c"], "gold": 0', good], f'{f}:2: not a JSON line'),
        ([good, good, json.dumps(dict(query='a', choices=['c', 'd'], gold=2))], f'{f}:3: the label 2 is not the index'),
        ([good, json.dumps(dict(query='a', choices=['c', 'd']))], f"{f}:2: no 'gold'"),
        ([good, json.dumps(dict(query='a', choices=[], gold=0))], f'{f}:2: the choices must be'),
        ([json.dumps(dict(text='a'))], f'{f}:1: not a task format'),
        ([json.dumps(dict(ctx='a', endings=['b', 'c']))], f"{f}:1: no 'label' (HellaSwag's test file"),
        (['[1, 2]'], f'{f}:1: a JSON object is expected'),
        ([''], f'{f}: no items'),
    ]:
        f.write_text('\n'.join(lines) + '\n')
        fails(capsys, lambda: ev.read_task(f), expected)
    f.write_text(good + '\n' + good + '\n')
    fails(capsys, lambda: ev.read_task(f, num_fewshot=2), 'too few to draw num_fewshot=2')
    words = lambda text: list(range(len(text.split())))  # noqa: E731  one token a word
    f.write_text(json.dumps(dict(context='a', continuation='b')) + '\n'
                 + json.dumps(dict(context='a b c', continuation='b ' * 9)) + '\n')
    fails(capsys, lambda: ev.load_tasks([f], words, 8), f'{f}:2: the item is longer than the context',
          '9 tokens', 'reads 8')
    assert ev.load_tasks([f], words, 9)[0]['items'][1]['rows'][0] == (list(range(2, 12)), 9)  # the context cut to 'c'


def test_the_text_scored():
    """" " + the choice unless it starts with whitespace; whitespace ending the context goes with the choice
    (lm-eval's _encode_pair); HellaSwag's clean-up, lm-eval's."""
    assert ev.continuation('dog') == ' dog' and ev.continuation(' dog') == ' dog' and ev.continuation('\ndog') == '\ndog'
    seen = []
    encode = lambda text: seen.append(text) or list(range(len(text)))  # noqa: E731  one token a character
    task = dict(path='t', items=[dict(line=1, context='a cat ', choices=[' dog'], lengths=[3], gold=0)])
    ev.encode_task(task, encode, 100)
    assert seen == ['a cat', 'a cat  dog'] and task['items'][0]['rows'] == [(list(range(10)), 5)]
    from lm_eval.tasks.hellaswag.utils import preprocess
    for text in (' Making tea [title] Boil water. [step] Pour it.  ', 'a [header] b [substeps] c', 'plain text'):
        assert ev.hellaswag_text(text) == preprocess(text)
    assert ev.hellaswag_text(' Making tea [title] Boil water. [step] Pour it.  ') == 'Making tea. Boil water. Pour it.'


def test_eval_tasks_in_train_py_equal_eval_py_on_the_saved_checkpoint(tmp_path):
    # train.py --eval_tasks scores its live model with each evaluation; eval.py on the checkpoint saved at that step
    # gives the same numbers (the same items, tokenizer and scoring)
    from test_train import TINY, run
    text = SHAKESPEARE.read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.int16).numpy().astype('uint16')
    data = tmp_path / 'data'
    data.mkdir()
    ids[:900_000].tofile(data / 'train.bin')
    ids[900_000:].tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps(dict(vocab_size=len(chars), tokenizer='char', chars=''.join(chars))))
    rng = random.Random(0)
    starts = [rng.randrange(len(text) - 40) for _ in range(12)]
    (tmp_path / 'mc.jsonl').write_text(''.join(json.dumps(dict(
        query=text[s:s + 24], choices=[text[s + 24:s + 30], text[s + 124:s + 130], text[s + 224:s + 230]],
        gold=0)) + '\n' for s in starts))
    (tmp_path / 'lm.jsonl').write_text(''.join(json.dumps(dict(
        context=text[s:s + 24], continuation=text[s + 24:s + 26])) + '\n' for s in starts))
    tasks = [str(tmp_path / 'mc.jsonl'), str(tmp_path / 'lm.jsonl')]
    out = tmp_path / 'out'
    run([*TINY, f'--data_dir={data}', f'--out_dir={out}', '--max_iters=6', '--resid_pdrop=0.0', f'--eval_tasks={tasks}'])
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    in_train = next(r for r in reversed(rows) if 'tasks' in r and r['iter'] == 6)['tasks']
    assert set(in_train) == {'mc', 'lm'} and in_train['mc']['items'] == 12 and 'acc_norm' not in in_train['lm']
    r = subprocess.run([sys.executable, str(ROOT / 'eval.py'), f'--init_from={out / "ckpt-000006"}',
                        f'--tasks={",".join(tasks)}', f'--json={tmp_path / "eval.json"}'],
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / 'eval.json').read_text())
    assert got.keys() == in_train.keys() and all(got[k] == pytest.approx(in_train[k], abs=1e-9) for k in got)
