"""
Hugging Face in and out at scale: each process reads only the rows of its own shards of a save_pretrained
directory (safetensors or .bin, sharded or not), a big model is written weight by weight in sharded safetensors
(export.py), and the data is checked to be tokenized with the model's own tokenizer. It imports model.py, never the other way: model.py keeps the plain whole-model MPT.from_hf / save_hf.
lora.py reads a frozen base through this file; this file knows nothing of LoRA.
"""

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

# Not torch's DCP HuggingFaceStorageReader/Writer: the reader loads into the tensors of a state dict, and a QLoRA
# model's NF4 weights need their rows read as fp32 to be quantized (lora.load_nf4_weights); the writer is handed a
# state dict to write, where export.py makes each weight (LoRA merged, NF4 dequantized) only when its turn comes,
# so that one weight at a time is in memory

# -----------------------------------------------------------------------------
# reading each process's rows

def hf_tensor_files(path):
    """{tensor name: its file} of a save_pretrained directory: model.safetensors, pytorch_model.bin, or the shards
    listed in their *.index.json. Reads only the index, or the one file's header. A damaged index, a shard it
    names that is missing, an unreadable file: one clear line (ValueError, FileNotFoundError) naming the file."""
    path = Path(path)
    for name in ('model.safetensors', 'pytorch_model.bin'):
        index = path / f'{name}.index.json'
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())['weight_map']
                missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index} is damaged ({type(e).__name__}: {e}): download it again") from None
            if missing:
                raise FileNotFoundError(f"{path / missing[0]} is missing ({index.name} names it"
                                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): download "
                                        f"the model again")
            return weight_map
        if (path / name).is_file():
            with _reading(path / name):
                if name.endswith('.safetensors'):
                    from safetensors import safe_open
                    with safe_open(str(path / name), 'pt') as f:
                        return {k: name for k in f.keys()}
                return {k: name for k in torch.load(path / name, map_location='cpu', weights_only=True, mmap=True)}
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or their .index.json")


@contextlib.contextmanager
def _reading(file):
    """A weight file that cannot be read (truncated, another format, damaged) as one line naming it."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (ValueError, FileNotFoundError)) and str(file) in str(e):
            raise
        raise ValueError(f"{file} cannot be read ({type(e).__name__}: {str(e).strip()[:200]}): it is truncated or "
                         f"damaged; download it again") from None


def read_hf_tensor(path, file, name, rows=None, dtype=None):
    """One tensor of a Hugging Face checkpoint's file, or only its rows [start, stop) (rows=(start, stop)), as
    dtype (None: as stored). Only those bytes are read: safetensors' get_slice, a .bin memory-mapped (its zip
    layout, torch.save's since 1.6); the file is closed again, so that nothing else of it stays in memory."""
    start, stop = rows or (None, None)
    with _reading(Path(path) / file):
        if file.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(str(Path(path) / file), 'pt') as f:
                t = f.get_slice(name)[start:stop]  # a copy out of the file
            return t if dtype in (None, t.dtype) else t.to(dtype)
        t = torch.load(Path(path) / file, map_location='cpu', weights_only=True, mmap=True)[name][start:stop]
        return torch.empty(t.shape, dtype=dtype or t.dtype).copy_(t)  # a copy, so that the mapping closes


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
# writing a big model weight by weight (export.py)

SAFETENSORS_DTYPES = {torch.float32: 'F32', torch.bfloat16: 'BF16', torch.float16: 'F16'}


def save_hf_weights(path, specs, tensor, max_shard_size=5_000_000_000):
    """Write weights in Hugging Face's layout: model.safetensors, or model-0000k-of-0000n.safetensors with
    model.safetensors.index.json once they pass max_shard_size bytes (a larger tensor gets a file of its own).
    specs: {name: (shape, dtype)} in the order to write; tensor(name) makes each one when its turn comes and it
    is written at once, so that only one is in memory. Written here rather than with the safetensors package,
    which serializes a whole file from memory (twice over): the format is an 8-byte header length, a JSON
    header of each tensor's dtype, shape and byte range, then the raw little-endian bytes."""
    shards, size = [[]], 0
    for name, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    files = ['model.safetensors'] if len(shards) == 1 else \
        [f'model-{k:05d}-of-{len(shards):05d}.safetensors' for k in range(1, len(shards) + 1)]
    for file, names in zip(files, shards):
        header, offset = {'__metadata__': {'format': 'pt'}}, 0
        for name in names:
            shape, dtype = specs[name]
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {'dtype': SAFETENSORS_DTYPES[dtype], 'shape': list(shape), 'data_offsets': [offset, end]}
            offset = end
        text = json.dumps(header, separators=(',', ':')).encode()
        text += b' ' * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(Path(path) / file, 'wb') as f:
            f.write(len(text).to_bytes(8, 'little') + text)
            for name in names:
                shape, dtype = specs[name]
                t = tensor(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: {tuple(t.shape)}, not the {tuple(shape)} announced")
                t.reshape(-1).view(torch.uint8).numpy().tofile(f)
    if len(files) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())
        (Path(path) / 'model.safetensors.index.json').write_text(
            json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2) + '\n')
    return files


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
