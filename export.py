"""
Write a training run back out as a Hugging Face model (what llm-foundry's convert_composer_to_hf does):

    python export.py --out_dir=out-mpt-7b-lora --hf_dir=mpt-7b-mine
    python export.py --out_dir=out-mpt-7b-lora --hf_dir=mpt-7b-mine --peft_dir=mpt-7b-mine-adapter

hf_dir gets an MptForCausalLM directory (config.json, model.safetensors) from the newest sharded checkpoint
in out_dir (ckpt-NNNNNN/): a pretraining run's or a full fine-tune's weights as they are; a LoRA run's base
(re-read from the Hugging Face directory it started from) with each adapter merged in, W + (alpha / rank) B A;
a QLoRA run's base as it trained, i.e. each NF4-quantized linear dequantized, with the adapters merged. When the
run started from a Hugging Face model (or its data was tokenized with one) its tokenizer files are copied too,
so `transformers` and `python sample.py --init_from=hf_dir` load it as they load a downloaded MPT.
peft_dir (LoRA runs) gets the adapters alone in PEFT's format (adapter_config.json, adapter_model.safetensors,
Hugging Face MPT module names), for PeftModel.from_pretrained(MptForCausalLM.from_pretrained(base), peft_dir).
For a QLoRA run that base is the unquantized one, on which the adapters compute slightly other logits than
they trained with; hf_dir is the model as trained.
"""
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from configurator import help_if_asked
help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import
import torch

from configurator import configure

# -----------------------------------------------------------------------------
out_dir = 'out'  # the training run: its newest ckpt-NNNNNN/ is exported
hf_dir = ''  # where to write the merged Hugging Face model (required)
peft_dir = ''  # also write the LoRA adapters alone, in PEFT's format, here (LoRA runs only)
dtype = 'float32'  # of the written weights: 'float32' (the training masters) or 'bfloat16' (half the size)
overwrite = False  # replace files in a non-empty hf_dir / peft_dir
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json',
                   'merges.txt', 'added_tokens.json', 'generation_config.json')


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def read_checkpoint(path, group='model'):
    """{name: full tensor} of one group ('model' or 'lion') of a sharded checkpoint, in one process:
    DCP reads every shard, whatever the number of processes that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key.split('.', 1)[1]: torch.empty(m.size, dtype=m.properties.dtype)
             for key, m in metadata.items() if key.startswith(group + '.') and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')
        dcp.load({group: state}, checkpoint_id=path, no_dist=True)
    return state


def run_info(out_dir):
    """(newest checkpoint directory, its train.json)."""
    import train
    if not os.path.isdir(out_dir):
        fail(f"out_dir={out_dir!r}: no such folder; point --out_dir at a training run")
    dirs = train.checkpoint_dirs(out_dir)
    if not dirs:
        fail(f"{out_dir} holds no checkpoint (ckpt-NNNNNN/): train.py writes one every eval_interval steps and "
             f"at the end; export.py exports the newest")
    try:
        with open(os.path.join(dirs[-1], 'train.json')) as f:
            return dirs[-1], json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{dirs[-1]}/train.json is unreadable ({e}): not a checkpoint written by train.py")


def merged_model(ckpt, info):
    """Our MPT holding the run's weights, LoRA merged and NF4 dequantized (fp32)."""
    import train
    from model import MPT, MPTConfig
    config = MPTConfig(**{**info['model'], 'init_device': 'cpu'})
    lora = info.get('lora')
    try:
        state = read_checkpoint(ckpt)
        if lora:  # the checkpoint holds the adapters; the frozen base is where the run started
            base = train.read_base(info['base'])
            state = train.merge_lora(base, state, lora)
        return MPT.from_state_dict(config, {k: v.float() for k, v in state.items()}, source=ckpt), lora
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(str(e))


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


def check_empty(path, what):
    if path.exists() and not path.is_dir():
        fail(f"{what}={path} is a file: give a folder to write the model into")
    if path.exists() and any(path.iterdir()) and not overwrite:
        fail(f"{what}={path} is not empty: choose another folder or add --overwrite")


def write_peft(path, adapters, lora, base_path):
    """adapter_config.json and adapter_model.safetensors as PEFT saves them: module names are Hugging
    Face MPT's (ours are the same), under base_model.model., each as lora_A.weight / lora_B.weight."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{name}.weight": t.float().contiguous()
               for name, t in adapters.items()}
    save_file(tensors, str(path / 'adapter_model.safetensors'), metadata={'format': 'pt'})
    config = dict(peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=str(base_path), r=lora['rank'],
                  lora_alpha=lora['alpha'], lora_dropout=lora['dropout'], target_modules=sorted(lora['targets']),
                  bias='none', fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  modules_to_save=None, use_rslora=False, use_dora=False)
    (path / 'adapter_config.json').write_text(json.dumps(config, indent=2) + '\n')


def main():
    if not hf_dir:
        fail("give --hf_dir=DIR: where to write the Hugging Face model")
    if dtype not in ('float32', 'bfloat16'):
        fail(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
    out, peft_out = Path(hf_dir), Path(peft_dir) if peft_dir else None
    check_empty(out, 'hf_dir')
    if peft_out:
        check_empty(peft_out, 'peft_dir')
    ckpt, info = run_info(out_dir)
    if peft_dir and not info.get('lora'):
        fail(f"--peft_dir: {ckpt} is not a LoRA run (lora_rank=0), so it has no adapters to write; "
             f"its whole model goes to --hf_dir")
    model, lora = merged_model(ckpt, info)
    try:
        model.to(getattr(torch, dtype)).save_hf(out)
    except ValueError as e:
        fail(str(e))
    source = tokenizer_source(info)
    if source:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    config = json.loads((out / 'config.json').read_text())
    eos = json.loads((source / 'config.json').read_text()).get('eos_token_id') \
        if source and (source / 'config.json').is_file() else None
    if eos is not None:
        config['eos_token_id'] = eos
        (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    what = f"LoRA rank {lora['rank']} merged" + (", NF4 base dequantized" if lora['quantize_base'] else '') \
        if lora else "weights as trained"
    print(f"wrote {out}: MptForCausalLM from {ckpt} ({what}; {model.num_params():,} parameters, {dtype})"
          + (f"; tokenizer from {source}" if source else "; no tokenizer files: the run did not start from a "
             "Hugging Face model"))
    if peft_out:
        write_peft(peft_out, read_checkpoint(ckpt), lora, info['base']['path'])
        print(f"wrote {peft_out}: PEFT LoRA adapter (r={lora['rank']}, alpha={lora['alpha']}, targets "
              f"{', '.join(lora['targets'])}) for {info['base']['path']}")


if __name__ == '__main__':
    main()
