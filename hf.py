"""
Hugging Face in and out at scale: each process reads only the rows of its own shards of a save_pretrained
directory (safetensors or .bin, sharded or not), and checks that the data was tokenized with the model's own
tokenizer. It imports model.py, never the other way: model.py keeps the plain whole-model MPT.from_hf / save_hf.
lora.py reads a frozen base through this file; this file knows nothing of LoRA.
"""

import json
import os

import torch
from torch.distributed.tensor import DTensor

from model import hf_tensor_files, read_hf_tensor

# -----------------------------------------------------------------------------
# reading each process's rows

def shard_rows(p):
    """(start, stop, group): the rows [start, stop) of p's whole tensor that this rank's shard of it holds, and
    the processes among which its rows are split. FSDP2 splits dim 0 as torch.chunk does, over the mesh dimension
    that shards (HSDP replicates over the other); a tensor that is not split: all its rows, group None."""
    if not isinstance(p, DTensor):
        return 0, p.shape[0], None
    dim = next(i for i, placement in enumerate(p.placements) if placement.is_shard())
    n, rank, chunk = p.shape[0], p.device_mesh.get_local_rank(dim), -(-p.shape[0] // p.device_mesh.size(dim))
    return min(rank * chunk, n), min(rank * chunk + chunk, n), p.device_mesh.get_group(dim)


def param_rows(path, files, name, p, dtype):
    """(rows, group): this rank's rows of parameter p (name) from a Hugging Face checkpoint (files:
    hf_tensor_files), converted as they are read into dtype, and the processes among which p's rows are split."""
    if name not in files:
        raise ValueError(f"{path}: no tensor {name} in its weight files: not an MPT of this shape")
    start, stop, group = shard_rows(p)
    rows = read_hf_tensor(path, files[name], name, (start, stop), dtype)
    if tuple(rows.shape) != (stop - start, *p.shape[1:]):
        raise ValueError(f"{path}: {name}'s rows {start}..{stop} are {tuple(rows.shape)}, not those of the "
                         f"{tuple(p.shape)} its config.json gives")
    if 'lm_head.weight' in files and name == 'transformer.wte.weight':  # MPT ties them
        if not torch.equal(read_hf_tensor(path, files['lm_head.weight'], 'lm_head.weight', (start, stop), dtype), rows):
            raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight; MPT ties them")
    return rows, group


def load_hf_weights(model, path, skip=lambda name, p: False):
    """The weights of a Hugging Face checkpoint: each rank reads only the rows of its own shards, each tensor
    converted as it is read into its parameter's dtype (fp32 masters, a frozen base's compute dtype), so that
    no process holds the whole model. skip(name, p): parameters left alone (a LoRA model's adapters, which keep
    what init_lora gave them, and its NF4 weights, which lora.load_nf4_weights quantizes from their rows)."""
    files = hf_tensor_files(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not skip(name, p):
                local = p.to_local() if isinstance(p, DTensor) else p
                local.copy_(param_rows(path, files, name, p, local.dtype)[0])


# -----------------------------------------------------------------------------
# the data's tokenizer against the model's

def check_tokenizer(meta, meta_path, base):
    """Fine-tuning a Hugging Face model (base: its directory) on data tokenized otherwise trains it on ids that
    mean other tokens to it, and nothing would say so. (problem, warning), each one line or None: the data's
    meta.json (prepare.py) must record the base's own tokenizer: a tokenizer.json of the same content, giving the
    same vocabulary size and end-of-text id as prepare.py --tokenizer=base would."""
    redo = f"re-run `python prepare.py ... --tokenizer={base}` for this data"
    if not os.path.isfile(os.path.join(base, 'tokenizer.json')):
        return None, (f"warning: {base} has no tokenizer.json, so the data's tokenizer cannot be checked against the "
                      f"model's")
    if not meta:
        return None, (f"warning: {meta_path} does not exist, so the data's tokenizer cannot be checked against the "
                      f"model's: unless the data was prepared with --tokenizer={base}, {redo}")
    if not meta.get('tokenizer'):
        return None, (f"warning: {meta_path} records no tokenizer (an older prepare.py wrote it), so it cannot be "
                      f"checked against the model's: unless the data was prepared with --tokenizer={base}, {redo}")
    if meta['tokenizer'] in ('gpt2', 'char'):
        return (f"{meta_path}: the data was tokenized with {meta['tokenizer']}, not with {base}'s own tokenizer, so "
                f"its token ids mean other tokens to the model: {redo}"), None
    from prepare import hf_tokenizer  # what prepare.py records for --tokenizer=base: its file, vocabulary, end-of-text
    file, vocab_size, eot = hf_tokenizer(base)
    theirs = meta.get('tokenizer_file') or meta['tokenizer']
    theirs = os.path.join(theirs, 'tokenizer.json') if os.path.isdir(theirs) else theirs
    try:
        with open(theirs) as a, open(file) as b:
            same = json.load(a) == json.load(b)  # the content, whatever the formatting
    except (OSError, ValueError):
        same = None  # gone since: only the numbers below can be compared
    differ = [f"{what} {meta.get(key)} vs {value}" for what, key, value in (('vocab_size', 'vocab_size', vocab_size),
                                                                          ('end-of-text id', 'eot_token', eot))
              if meta.get(key) != value]
    if same is False or differ:
        return (f"{meta_path}: the data was tokenized with {theirs}, not with {base}'s own tokenizer "
                f"({', '.join(differ) or 'their tokenizer.json files differ'}): {redo}"), None
    if same is None:
        return None, (f"warning: {meta_path} says the data was tokenized with {theirs}, which is gone, so only its "
                      f"vocabulary size and end-of-text id could be checked against {base}'s tokenizer")
    return None, None
