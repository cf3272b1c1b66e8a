"""
Write a training run back out as a Hugging Face model (what llm-foundry's convert_composer_to_hf does):

    python export.py --out_dir=out-mpt-7b-lora --hf_dir=mpt-7b-mine
    python export.py --out_dir=out-mpt-7b-lora --hf_dir=mpt-7b-mine --peft_dir=mpt-7b-mine-adapter

hf_dir gets an MptForCausalLM directory from the newest sharded checkpoint in out_dir (ckpt-NNNNNN/): config.json
and the weights in Hugging Face's layout, model.safetensors or, past max_shard_size, model-0000k-of-0000n.safetensors
with model.safetensors.index.json, in bf16 as the released MPTs are (--dtype=float32: the fp32 masters as they
are). A pretraining run's or a full fine-tune's weights as trained; a LoRA run's base (re-read from the Hugging
Face directory it started from) with each adapter merged in, W + (alpha / rank) B A; a QLoRA run's base as it
trained, i.e. each NF4-quantized linear dequantized, with the adapters merged. The weights go one at a time:
read, merged, converted and written, so host memory holds about one weight, never the model. When the run started
from a Hugging Face model (or its data was tokenized with one) its tokenizer files are copied too, so
`transformers` and `python sample.py --init_from=hf_dir` load it as they load a downloaded MPT.
peft_dir (LoRA runs) gets the adapters alone in PEFT's format (adapter_config.json, adapter_model.safetensors,
Hugging Face MPT module names), for PeftModel.from_pretrained(MptForCausalLM.from_pretrained(base), peft_dir).
For a QLoRA run that base is the unquantized one, on which the adapters compute slightly other logits than
they trained with; hf_dir is the model as trained.

hf_dir and peft_dir are checked before the run is read, and written as a new folder beside them that takes their
place once complete: a failed export leaves an earlier one as it was. --overwrite replaces a folder that holds
only what export.py writes (config.json, model*.safetensors and their index, tokenizer and adapter files); one
holding anything else (a checkpoint, other files, a subfolder), out_dir or a folder around it, and the Hugging
Face model the run started from are refused, with or without it.
"""
import json
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

from configurator import help_if_asked
help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import
import torch
from torch.distributed.checkpoint.api import CheckpointException

from checkpoints import checkpoint_dirs, verify
from common import fail, swap_folder
from configurator import configure
from lora import merged_weights
from hf import save_hf_weights
from model import MPT, MPTConfig

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run: its newest ckpt-NNNNNN/ is exported
hf_dir = ''  # where to write the merged Hugging Face model (required)
peft_dir = ''  # also write the LoRA adapters alone, in PEFT's format, here (LoRA runs only)
dtype = 'bfloat16'  # of the written weights: 'bfloat16' (as the released MPTs) or 'float32' (the training masters)
max_shard_size = 5_000_000_000  # bytes per weight file at most (Hugging Face's default); more: numbered shards
overwrite = False  # replace an earlier export in hf_dir / peft_dir
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json',
                   'merges.txt', 'added_tokens.json', 'generation_config.json')
# what export.py writes, and so what --overwrite may replace
EXPORT_FILES = re.compile(r'config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|'
                          r'adapter_config\.json|adapter_model\.safetensors|'
                          + '|'.join(map(re.escape, TOKENIZER_FILES)))


def checkpoint_tensors(path, names=None, dtype=None):
    """{name: whole tensor} of the model in a sharded checkpoint (those in names, else all), in one process: DCP
    reads the parts of each from every shard that holds one, whatever the number of processes that wrote them,
    and converts them into dtype as it copies them in (None: as stored)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key.split('.', 1)[1]: torch.empty(m.size, dtype=dtype or m.properties.dtype) for key, m in metadata.items()
             if key.startswith('model.') and isinstance(m, TensorStorageMetadata)
             and (names is None or key.split('.', 1)[1] in names)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')
        dcp.load({'model': state}, checkpoint_id=path, no_dist=True)
    return state


def run_info(out_dir):
    """(newest checkpoint directory, its train.json), the checkpoint checked whole against its manifest."""
    if not os.path.isdir(out_dir):
        fail(f"out_dir={out_dir!r}: no such folder; point --out_dir at a training run")
    dirs = checkpoint_dirs(out_dir)
    if not dirs:
        fail(f"{out_dir} holds no checkpoint (ckpt-NNNNNN/): train.py writes one every eval_interval steps and "
             f"at the end; export.py exports the newest")
    ckpt = Path(dirs[-1])
    problem, _ = verify(ckpt)
    if problem:
        fail(f"{ckpt} is damaged ({problem}): move it out of {out_dir} to export the checkpoint before it")
    try:
        return ckpt, json.loads((ckpt / 'train.json').read_text())
    except (OSError, ValueError) as e:
        fail(f"{ckpt}/train.json is unreadable ({e}): not a checkpoint written by train.py")


def tokenizer_source(info):
    """The folder whose tokenizer files the exported model gets: the Hugging Face model the run started
    from, else that of the tokenizer.json its data was tokenized with (prepare.py --tokenizer), else None."""
    start = (info.get('base') or {}).get('path') or info.get('started_from') or info['settings'].get('init_from')
    if start and start not in ('scratch', 'resume') and (Path(start) / 'tokenizer.json').is_file():
        return Path(start)
    meta = Path(info['settings'].get('data_dir', '')) / 'meta.json'
    try:
        file = json.loads(meta.read_text()).get('tokenizer_file')
    except (OSError, ValueError):
        file = None
    return Path(file).parent if file and Path(file).is_file() else None


def refuse(path, what, keep, why):
    """Fail with one line if path is keep (something the run needs) or a folder holding it."""
    if path.resolve() == keep.resolve() or path.resolve() in keep.resolve().parents:
        fail(f"{what}={path} is {'' if path.resolve() == keep.resolve() else 'a folder holding '}{why}: export into "
             f"another folder")


def check_destination(path, what):
    """Fail with one line unless path can become the export: a new or empty folder, or with --overwrite one that
    holds only what export.py writes; never out_dir or a folder holding it. Returns the empty folder beside it
    that the export is written into, made now, so that a place that cannot be written fails before anything is
    read."""
    if path.exists() and not path.is_dir():
        fail(f"{what}={path} is a file: give a folder to write the model into")
    refuse(path, what, Path(out_dir), f"the run's out_dir ({out_dir})")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            fail(f"{what}={path} is not empty: choose another folder or add --overwrite")
        other = sorted(p.name + ('/' if p.is_dir() else '') for p in path.iterdir()
                       if not (p.is_file() and EXPORT_FILES.fullmatch(p.name)))
        if other:
            fail(f"{what}={path} holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}, which export.py does "
                 f"not write: --overwrite replaces an earlier export only; choose another folder")
    staging, old = path.parent / f'.{path.name}.export-tmp', path.parent / f'.{path.name}.export-old'
    try:
        if old.is_dir():  # an export killed while it swapped (commit): the earlier one back, or its leftovers gone
            if path.exists():
                shutil.rmtree(old)
                print(f"note: removed {old}, an earlier export that a killed export had set aside", file=sys.stderr)
            else:
                os.rename(old, path)
                print(f"note: {path} put back from {old}, where a killed export had set it aside", file=sys.stderr)
        if staging.exists():
            shutil.rmtree(staging)
            print(f"note: removed {staging}, left by an export cut short", file=sys.stderr)
        staging.mkdir(parents=True)
    except OSError as e:
        fail(f"{what}={path}: cannot write there ({e.strerror or e})")
    return staging


def commit(staging, path):
    """The finished export takes path's place (an empty folder, or an earlier export: check_destination) with no
    moment where neither is whole: the earlier one is renamed aside, the new one renamed in, and only then is the
    old one deleted; SIGTERM and Ctrl-C wait for the two renames. Killed between them (SIGKILL), the next export
    puts the earlier one back first; killed while deleting, it removes what is left."""
    old = path.parent / f'.{path.name}.export-old'
    swap_folder(staging, path, old)
    shutil.rmtree(old, ignore_errors=True)


def write_peft(path, adapters, lora, base_path):
    """adapter_config.json and adapter_model.safetensors as PEFT saves them: module names are Hugging
    Face MPT's (ours are the same), under base_model.model., each as lora_A.weight / lora_B.weight."""
    from safetensors.torch import save_file
    tensors = {f"base_model.model.{name}.weight": t.float().contiguous()
               for name, t in adapters.items()}
    save_file(tensors, str(path / 'adapter_model.safetensors'), metadata={'format': 'pt'})
    config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=str(base_path), r=lora['rank'],
                  lora_alpha=lora['alpha'], lora_dropout=lora['dropout'], target_modules=sorted(lora['targets']),
                  bias='none', fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  modules_to_save=None, use_rslora=False, use_dora=False)
    (path / 'adapter_config.json').write_text(json.dumps(config, indent=2) + '\n')


def export(ckpt, info, out, peft_out):
    """Write the run's model into out (and its adapters into peft_out); returns what to report."""
    model = MPT(MPTConfig(**{**info['model'], 'init_device': 'meta'}))  # the layout, no memory
    config = model.hf_config()  # refuses what transformers' MPT cannot compute
    config['torch_dtype'] = dtype
    lora = info.get('lora')
    if lora:  # the checkpoint holds the adapters; the frozen base is where the run started
        adapters = checkpoint_tensors(ckpt)
        weight = merged_weights(adapters, lora, info['base'])
    else:
        weight = lambda name: checkpoint_tensors(ckpt, [name], getattr(torch, dtype))[name]
    specs = {name: (p.shape, getattr(torch, dtype)) for name, p in model.state_dict().items()}
    files = save_hf_weights(out, specs, weight, max_shard_size)
    source = tokenizer_source(info)
    if source:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    if source and (source / 'config.json').is_file():
        eos = json.loads((source / 'config.json').read_text()).get('eos_token_id')
        config.update({} if eos is None else {'eos_token_id': eos})
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    if peft_out:
        write_peft(peft_out, adapters, lora, info['base']['path'])
    return model.num_params(), files, source


def main():
    if not hf_dir:
        fail("give --hf_dir=DIR: where to write the Hugging Face model")
    if dtype not in ('float32', 'bfloat16'):
        fail(f"dtype={dtype!r}: use 'bfloat16' or 'float32'")
    if not (isinstance(max_shard_size, int) and max_shard_size > 0):
        fail(f"max_shard_size={max_shard_size!r}: bytes per weight file, e.g. 5_000_000_000")
    out, peft_out = Path(hf_dir), Path(peft_dir) if peft_dir else None
    staging = [check_destination(out, 'hf_dir')]
    try:
        if peft_out:
            staging.append(check_destination(peft_out, 'peft_dir'))
        ckpt, info = run_info(out_dir)
        if peft_dir and not info.get('lora'):
            fail(f"--peft_dir: {ckpt} is not a LoRA run (lora_rank=0), so it has no adapters to write; "
                 f"its whole model goes to --hf_dir")
        base = (info.get('base') or {}).get('path') or info.get('started_from')
        if base and os.path.isdir(base):  # the downloaded mpt-7b a LoRA run needs looks like an export
            for path, what in ((out, 'hf_dir'), (peft_out, 'peft_dir')):
                if path:
                    refuse(path, what, Path(base), f"the Hugging Face model the run started from ({base})")
        try:
            n_params, files, source = export(ckpt, info, staging[0], staging[1] if peft_out else None)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            fail(str(e))
        except CheckpointException as e:  # DCP's (a checkpoint from before manifests): each rank's exception
            cause = next(iter(e.failures.values()))[0]
            fail(f"{ckpt} cannot be read ({type(cause).__name__}: {cause}): it is damaged; move it out of "
                 f"{out_dir} to export the checkpoint before it")
        for path, done in zip((out, peft_out), staging):
            commit(done, path)
    finally:
        for path in staging:
            shutil.rmtree(path, ignore_errors=True)
    lora = info.get('lora')
    what = f"LoRA rank {lora['rank']} merged" + (", NF4 base dequantized" if lora['quantize_base'] else '') \
        if lora else "weights as trained"
    print(f"wrote {out}: MptForCausalLM from {ckpt} ({what}; {n_params:,} parameters, {dtype}, "
          f"{len(files)} weight file{'s' * (len(files) > 1)})"
          + (f"; tokenizer from {source}" if source else "; no tokenizer files: the run did not start from a "
             "Hugging Face model"))
    if peft_out:
        print(f"wrote {peft_out}: PEFT LoRA adapter (r={lora['rank']}, alpha={lora['alpha']}, targets "
              f"{', '.join(lora['targets'])}) for {info['base']['path']}")


if __name__ == '__main__':
    # SIGTERM as Ctrl-C: the staging folder is removed on the way out (main's finally), not left behind
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    main()
