"""
Generate text from a trained MPT: a checkpoint of ours (out_dir/ckpt.pt, written by train.py) or a
local Hugging Face MPT directory (e.g. a downloaded mpt-7b).

    python sample.py --out_dir=out-shakespeare-char
    python sample.py --init_from=path/to/mpt-7b --start="FILE:prompt.txt" --max_new_tokens=200
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from configurator import configure, device_problem, help_if_asked, out_of_range

help_if_asked(__file__)  # --help: the settings below, read from this file before torch's slow import

import torch

from checkpoints import state_crc
from model import MPT, MPTConfig, check_attention

# -----------------------------------------------------------------------------
# the model
init_from = 'resume'  # 'resume' = out_dir/ckpt.pt from train.py; or the path of a Hugging Face MPT directory
out_dir = 'out'  # where train.py wrote ckpt.pt
# the samples
start = "\n"  # the prompt; "FILE:prompt.txt" reads it from a file
num_samples = 3  # samples, one after the other
max_new_tokens = 500  # per sample; fewer when the end-of-text token comes first
temperature = 0.8  # 1.0 = the model's own distribution, lower = more conservative, 0 = greedy
top_k = 200  # sample only among the top_k likeliest tokens (None = all)
top_p = None  # sample only among the likeliest tokens holding probability top_p (None = all)
max_len = None  # limit on prompt + new tokens (the KV cache size); None = what they need: ALiBi extrapolates
seed = 1337  # the sampling draws follow from it
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda' or 'cuda:N'
dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if torch.cuda.is_available() else 'float32'
compile = False  # torch.compile the model (pays off only for long generations)
attn_impl = None  # None = the checkpoint's; 'torch' | 'triton' | 'flash'
configure(globals(), sys.argv[1:])
# -----------------------------------------------------------------------------


def setting_problems():
    """The settings' problems, one line each, before the model loads (and long before a sample is half printed)."""
    problems = out_of_range(globals(), __file__, whole=dict(num_samples=1, max_new_tokens=1, top_k=1, max_len=1, seed=0),
                            at_least=dict(temperature=0), choices=dict(dtype=('float32', 'bfloat16', 'float16')))
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        problems.append(f"top_p={top_p!r}: use a probability in (0, 1], or None for all tokens")
    return problems + [p for p in [device_problem(device)] if p]


def load_model():
    """(model, tokenizer name, meta) from init_from; meta is the dataset's meta.json, if known."""
    overrides = {} if attn_impl is None else {'attn_impl': attn_impl}
    if init_from != 'resume':
        return MPT.from_hf(init_from, **overrides), None
    path = Path(out_dir) / 'ckpt.pt'
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py ...), or point "
                                f"--out_dir at it, or use --init_from=<Hugging Face MPT directory>")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        config = MPTConfig(**{**ckpt['config'], **overrides})
    except Exception as e:  # a truncated or foreign file: say which, not torch's unpickling internals
        raise ValueError(f"{path} is not a checkpoint written by train.py ({type(e).__name__}: {e})") from None
    tensors = ckpt.get('adapters', ckpt.get('model'))
    if 'crc32' in ckpt and state_crc(tensors) != ckpt['crc32']:  # train.py's checksum of them, as it saved them
        raise ValueError(f"{path} is damaged: its weights do not match the checksum train.py saved with them; "
                         f"export the run's newest sharded checkpoint instead (python export.py --out_dir={out_dir} "
                         f"--hf_dir=DIR) and sample --init_from=DIR")
    meta = ckpt.get('meta')
    data_dir = ckpt.get('settings', {}).get('data_dir')
    if meta is None and data_dir and (Path(data_dir) / 'meta.json').is_file():
        meta = json.loads((Path(data_dir) / 'meta.json').read_text())
    if 'adapters' in ckpt:  # a LoRA run's: its adapters, merged into the base it trained on (re-read)
        from lora import merged_weights
        weight = merged_weights(ckpt['adapters'], ckpt['lora'], ckpt['base'])
        state = {name: weight(name) for name in MPT(replace(config, init_device='meta')).state_dict()}
        print(f"LoRA adapters (rank {ckpt['lora']['rank']}) merged into {ckpt['base']['path']}"
              + (" (NF4-dequantized, as trained)" if ckpt['lora']['quantize_base'] else ''), file=sys.stderr)
        return MPT.from_state_dict(config, state, source=str(path)), meta
    return MPT.from_state_dict(config, ckpt['model'], source=str(path)), meta


def hf_tokenizer(file, eot, what):
    """(encode, decode, eot, description, vocabulary size) of a tokenizer.json, as prepare.py encodes."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError(f"{what} uses its own tokenizer ({file}; GPT-2's would give the wrong tokens): "
                         f"pip install tokenizers") from None
    if not Path(file).is_file():
        raise ValueError(f"{what} was trained with the tokenizer {file}, which is not there any more: "
                         f"put it back (or a copy of that model directory) at that path") from None
    tok = Tokenizer.from_file(str(file))
    eot = eot if isinstance(eot, int) else tok.token_to_id('<|endoftext|>')
    return (lambda text: tok.encode(text, add_special_tokens=False).ids, lambda ids: tok.decode(list(ids)), eot,
            str(file), max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def load_tokenizer(model, meta):
    """(encode, decode, eot id, description, number of ids): the tokenizer the run recorded in its meta.json (prepare.py
    --tokenizer: characters, GPT-2 BPE or a Hugging Face tokenizer.json); a Hugging Face directory's own
    tokenizer.json (with the `tokenizers` package); else GPT-2 BPE."""
    vocab_size = model.config.vocab_size
    if meta is not None and meta.get('tokenizer_file'):
        *tokenizer, n_vocab = hf_tokenizer(meta['tokenizer_file'], meta.get('eot_token'), "this run's data")
    elif meta is not None and meta.get('tokenizer') == 'char':
        chars = meta['chars']
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(text):
            unknown = sorted(set(text) - stoi.keys())
            if unknown:
                raise ValueError(f"the prompt has characters outside this model's vocabulary: {unknown[:10]}")
            return [stoi[c] for c in text]
        tokenizer = (encode, lambda ids: ''.join(chars[i] for i in ids), None, f"characters ({len(chars)})")
        n_vocab = len(chars)
    elif init_from != 'resume' and (Path(init_from) / 'tokenizer.json').is_file():
        eot = json.loads((Path(init_from) / 'config.json').read_text()).get('eos_token_id')
        *tokenizer, n_vocab = hf_tokenizer(Path(init_from) / 'tokenizer.json', eot, init_from)
    else:
        if vocab_size < 50257:  # GPT-2's BPE, the fallback, cannot be this model's: fail before a download
            raise ValueError(f"{'the checkpoint' if init_from == 'resume' else init_from} records no tokenizer (no "
                             f"meta.json{'' if init_from == 'resume' else ', no tokenizer.json'}) and its {vocab_size} "
                             f"ids are too few for GPT-2's BPE: it was trained with another tokenizer (a character-level "
                             f"run? sample the run itself, --out_dir=RUN, whose data_dir/meta.json holds the characters)")
        import tiktoken
        try:
            enc = tiktoken.get_encoding('r50k_base')  # GPT-2's BPE; r50k_base is what tiktoken caches offline
        except Exception as e:  # offline: tiktoken's download fails deep inside requests
            raise ValueError(f"GPT-2's BPE (tiktoken r50k_base) cannot be loaded ({type(e).__name__}): it is downloaded "
                             f"once; offline, set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it") from None
        tokenizer = (lambda text: enc.encode(text, allowed_special={'<|endoftext|>'}), enc.decode, enc.eot_token,
                     "GPT-2 BPE (tiktoken r50k_base)")
        n_vocab = enc.n_vocab
    encode, decode, eot, name = tokenizer
    if n_vocab > vocab_size:
        raise ValueError(f"the tokenizer ({name}) has {n_vocab} tokens but the model only {vocab_size}: "
                         f"this checkpoint was trained with another tokenizer (is its data_dir/meta.json there?)")

    return encode, decode, eot, name, n_vocab  # n_vocab: generate draws only these ids (MPT pads its vocabulary)


def printer(decode, eot, head):
    """A stream callback for generate: decodes the whole continuation each step and prints what is
    new, holding back a trailing partial UTF-8 character. Works for any tokenizer; the O(n^2)
    decoding is negligible next to the model. The end-of-text token itself is not printed. head (the
    prompt) is printed with the first new token, after the first forward: a note that forward prints on
    stderr (the attention falling back on CPU) then comes before the sample's text, not inside it."""
    ids, shown, waiting = [], 0, [head]

    def stream(tokens):
        nonlocal shown
        if waiting:
            print(waiting.pop(), end='', flush=True)
        if int(tokens[0]) == eot:
            return
        ids.append(int(tokens[0]))
        text = decode(ids).rstrip('\ufffd')
        print(text[shown:], end='', flush=True)
        shown = max(shown, len(text))
    return stream


def main():
    problems = setting_problems()
    if problems:
        sys.exit('error: ' + '\nerror: '.join(problems))
    torch.manual_seed(seed)
    model, meta = load_model()
    encode, decode, eot, name, n_vocab = load_tokenizer(model, meta)
    print(f"tokenizer: {name}", file=sys.stderr)
    check_attention(model.config, device, getattr(torch, dtype))
    model.eval().to(device=device, dtype=getattr(torch, dtype))
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)  # the KV cache grows every step
    prompt = Path(start[5:]).read_text() if start.startswith('FILE:') else start
    ids = encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty: give --start=... (the default is a newline)")
    limit = max_len or len(ids) + max_new_tokens
    if len(ids) >= limit:
        raise ValueError(f"the prompt is {len(ids)} tokens, the context allows {limit}: shorten it or raise --max_len")
    new_tokens = min(max_new_tokens, limit - len(ids))
    if new_tokens < max_new_tokens:
        print(f"note: {new_tokens} new tokens fit in max_len={limit} after the prompt", file=sys.stderr)
    if limit > model.config.max_seq_len:
        print(f"note: samples run past the {model.config.max_seq_len} tokens the model was trained on "
              f"(ALiBi extrapolates; --max_len={model.config.max_seq_len} stops there)", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)
    made, t0 = 0, time.time()
    for _ in range(num_samples):
        out = model.generate([ids], new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token=eot,
                             max_len=limit, generator=generator, stream=printer(decode, eot, prompt),
                             vocab=n_vocab)
        made += len(out[0]) - len(ids)
        print('\n---------------')
    dt = time.time() - t0
    print(f"{made} tokens in {dt:.2f} s: {made / dt:.1f} tokens/s ({device}, {dtype})", file=sys.stderr)


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
