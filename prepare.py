"""
Prepare a dataset for train.py: text in, memory-mapped token files out.

    python prepare.py shakespeare_char    # tiny Shakespeare (downloaded), one token per character
    python prepare.py shakespeare         # the same text as GPT-2 BPE tokens
    python prepare.py openwebtext         # also fineweb-edu (sample-10BT) and c4 (en): pip install datasets
    python prepare.py --input=notes/ --input=more.jsonl --out_dir=data/notes   # your own text

A named source given --input=PATH reads that local copy instead of downloading.
Output in out_dir (default data/<source>):
    train.bin, val.bin  token ids as raw little-endian uint16, nanoGPT's format: np.memmap(path, np.uint16)
    meta.json           tokenizer, vocab_size, dtype, eot_token, token and document counts, source, split,
                        seed; for char the vocabulary as `chars`. Written last: it marks a finished dataset.
Settings are --key=value as in the other scripts (values are Python literals); the defaults are below.
"""
import ast
import codecs
import collections
import difflib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
# settings: the defaults, each overridden by --key=value (--input may repeat)
settings = dict(
    # data
    input=[],  # your files or folders: .txt/.md (one document per file), .jsonl, .parquet
    text_field="text",  # the .jsonl field / .parquet or hub column holding each document's text
    out_dir="",  # empty: data/<source>, where train.py looks
    overwrite=False,  # replace an out_dir that holds a different dataset
    # split
    val_fraction=None,  # None: 0.1 for small inputs (shakespeare, files < 100 MB), 0.0005 for large ones
    seed=1337,  # seeds which documents go to val
    # tokenizer
    tokenizer="",  # gpt2 (tiktoken's GPT-2 BPE) or char; empty: char for shakespeare_char, else gpt2
    # system
    num_proc=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),  # tokenizer processes
)
shakespeare_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
hub_sources = {  # Hugging Face datasets, streamed: only the tokens are stored
    "openwebtext": dict(path="Skylion007/openwebtext"),
    "fineweb-edu": dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT"),  # ~10B GPT-2 tokens
    "c4": dict(path="allenai/c4", name="en"),
}
sources = ["shakespeare", "shakespeare_char", *hub_sources]
file_types = (".txt", ".md", ".jsonl", ".parquet")
token_dtype = np.dtype("<u2")  # little-endian uint16, whatever the machine: nanoGPT's .bin files
piece_chars = 1 << 20  # text per tokenizer task: pickling it is cheap next to BPE, and 2+ workers stay busy
small_input = 100 << 20  # files under this many bytes in all default to val_fraction 0.1


def die(msg):
    """Bad input ends the run with one line and exit status 1, never a traceback."""
    print(f"prepare.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def unknown(what, name, valid):
    near = difflib.get_close_matches(name, valid, n=1)
    die(f"unknown {what} {name}" + (f" (did you mean {near[0]}?)" if near else "") + f"; valid: {', '.join(valid)}")


def parse_args(argv):
    """nanoGPT-style --key=value over the defaults; the one bare word names a source."""
    cfg = dict(settings, input=[], source="")
    for arg in argv:
        if arg in ("-h", "--help"):
            sys.exit(print(__doc__ + "sources: " + ", ".join(sources) + "\nsettings: " + json.dumps(settings)))
        if not arg.startswith("--"):
            if arg not in sources and os.path.exists(arg):
                die(f"your own files go in as --input={arg} (with --out_dir=DIR)")
            if arg not in sources:
                unknown("source", arg, sources)
            if cfg["source"]:
                die(f"one source at a time: got {cfg['source']} and {arg}")
            cfg["source"] = arg
            continue
        key, eq, raw = arg[2:].partition("=")
        if key not in settings:
            unknown("setting", f"--{key}", [f"--{k}" for k in settings])
        default = settings[key]
        if (not eq and not isinstance(default, bool)) or (key == "input" and not raw):
            die(f"--{key} needs a value: --{key}=...")
        if isinstance(default, (str, list)):
            value = raw  # paths and names are taken as written
        elif not eq:
            value = True  # a bare --overwrite
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                die(f"--{key}={raw}: not a Python literal")
            if default is not None and type(value) is not type(default):
                die(f"--{key}={raw}: expected {type(default).__name__}, got {type(value).__name__}")
        if key == "input":
            cfg["input"].append(value)
        else:
            cfg[key] = value
    return cfg

# -----------------------------------------------------------------------------
# reading: each document is an iterator over its text in blocks, so no file is ever read whole

replaced = [0]  # invalid UTF-8 sequences replaced by U+FFFD, counted by this error handler as files decode
def replace_and_count(err):
    replaced[0] += 1
    return "\ufffd", err.end
codecs.register_error("replace_and_count", replace_and_count)


def input_files(paths):
    """The files to read, in order: each path as given, a folder's supported files sorted by path."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in file_types and not f.is_dir())
            if not found:
                die(f"{path}: no {'/'.join(file_types)} files in this folder")
            files += found
        elif not path.exists():
            die(f"{path}: no such file or folder")
        elif path.suffix.lower() not in file_types:
            die(f"{path}: unsupported file type; use {', '.join(file_types)} or a folder of them")
        else:
            files.append(path)
    return files


def read_text(path):
    """A .txt/.md file is one document, read a block at a time (newline='': \\r\\n stays as on disk)."""
    try:
        with open(path, encoding="utf-8", errors="replace_and_count", newline="") as f:
            while block := f.read(piece_chars):
                yield block
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")


def read_jsonl(path, field):
    """One document per line, its text in `field`."""
    try:
        with open(path, encoding="utf-8", errors="replace_and_count") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    die(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})")
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    has = f"its fields: {', '.join(row)}" if isinstance(row, dict) else f"it is a JSON {type(row).__name__}"
                    die(f"{path}:{i}: no text field {field!r} ({has}); choose the field with --text_field=NAME")
                yield [row[field]]
    except OSError as e:
        die(f"cannot read {path}: {e.strerror or e}")


def read_hub(where, field, **load_args):
    """Documents from Hugging Face datasets, streamed: a hub dataset, or local .parquet/.jsonl by builder name."""
    try:
        import datasets  # optional: only these sources need it
    except ImportError:
        die(f"{where} is read with Hugging Face datasets, which is not installed: pip install datasets")
    try:
        for i, row in enumerate(datasets.load_dataset(**load_args, split="train", streaming=True)):
            if not isinstance(row.get(field), str):
                die(f"{where}: row {i} has no text in column {field!r} (columns: {', '.join(row)}); "
                    "choose it with --text_field=NAME")
            yield [row[field]]
    except Exception as e:  # network, missing dataset, corrupt file: say so plainly
        die(f"cannot read {where}: {type(e).__name__}: {e}")


def read_files(files, field):
    for path in files:
        kind = path.suffix.lower()
        if kind == ".jsonl":
            yield from read_jsonl(path, field)
        elif kind == ".parquet":
            yield from read_hub(path, field, path="parquet", data_files=str(path))
        else:
            yield read_text(path)


# Where a document can be cut: just before a space or newline that follows a non-space. No pattern of
# GPT-2's pre-tokenizer carries a word, number or punctuation run on into whitespace, and none looks
# back, so the text after the cut splits into the same pieces alone as in the whole, and BPE works
# within pieces: the tokens are the same. (After "\n\n" is not such a place: "\n\n" is one token at a
# text's end, two before a word.) The greedy .* makes one anchored match find the last place, in linear time.
last_cut = re.compile(r".*\S(?=[\n ])", re.DOTALL)


def pieces(documents):
    """(text, ends_document) pieces of about piece_chars, so one big document still tokenizes in parallel.
    Memory is bounded by piece_chars plus the longest stretch of a document with no place to cut."""
    for blocks in documents:
        text = ""
        for block in blocks:
            text += block
            if len(text) >= piece_chars and (cut := last_cut.match(text)):
                yield text[:cut.end()], False
                text = text[cut.end():]
        if text:  # empty documents are skipped
            yield text, True


def batches(pieces, val_fraction, seed):
    """Tokenizer tasks of about piece_chars: lists of (text, is_val, ends_document). Each document goes
    to val with probability val_fraction, drawn from a seeded generator in document order: a random
    subset (a seeded shuffle's first val_fraction) that needs no document count, so it streams. Inside
    each split documents keep their input order."""
    rng = np.random.default_rng(seed)
    batch, size, new_document = [], 0, True
    for text, last in pieces:
        if new_document:
            is_val = bool(rng.random() < val_fraction)
        batch.append((text, is_val, last))
        size, new_document = size + len(text), last
        if size >= piece_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch

# -----------------------------------------------------------------------------
# tokenizing, in num_proc worker processes

def gpt2():
    try:  # r50k_base is GPT-2's BPE (same ranks, regex, <|endoftext|>), the name tiktoken serves from TIKTOKEN_CACHE_DIR
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        die(f"cannot load the GPT-2 tokenizer (tiktoken r50k_base): {e}; it downloads once, "
            "or set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it")


def init_encoder(tokenizer, chars):
    """Set this process's encoder (text -> uint16 ids) and the ids that end a document."""
    global encode, eot_ids
    if multiprocessing.parent_process():  # a worker: Ctrl-C is for the main process to handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if tokenizer == "gpt2":
        enc = gpt2()
        encode = lambda text: np.array(enc.encode_ordinary(text), dtype=token_dtype)  # text "<|endoftext|>" stays text
        eot_ids = np.array([enc.eot_token], dtype=token_dtype)
    else:  # ids in sorted character order, as nanoGPT's shakespeare_char; no end-of-text symbol
        codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        encode = lambda text: np.searchsorted(codepoints, np.frombuffer(
            text.encode("utf-32-le", "surrogatepass"), dtype="<u4")).astype(token_dtype)
        eot_ids = np.array([], dtype=token_dtype)


def tokenize(batch):
    """One task: returns the (train, val) token arrays, (train, val) documents ended, and text bytes."""
    tokens, documents, nbytes = ([], []), [0, 0], 0
    for text, is_val, last in batch:
        tokens[is_val].append(encode(text))
        if last:
            tokens[is_val].append(eot_ids)
            documents[is_val] += 1
        nbytes += len(text.encode("utf-8", "surrogatepass"))
    return [np.concatenate(t) if t else eot_ids[:0] for t in tokens], documents, nbytes


def tokenize_all(batches, num_proc, initargs):
    """tokenize() over batches, results in order, with at most 2 * num_proc tasks in flight (not
    Pool.imap: it reads its whole input ahead, so memory would grow with the corpus)."""
    if num_proc == 1:
        init_encoder(*initargs)
        yield from map(tokenize, batches)
        return
    with multiprocessing.Pool(num_proc, init_encoder, initargs) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

# -----------------------------------------------------------------------------
# the run

def check_out_dir(out_dir, dataset):
    """Refuse to replace a different dataset; the same one again (source, inputs, tokenizer) is rewritten."""
    try:
        old = json.loads((out_dir / "meta.json").read_text())
        if {k: old.get(k) for k in dataset} == dataset:
            return
        what = f"{old.get('source')} as {old.get('tokenizer')} from {', '.join(old.get('inputs') or [])}"
    except FileNotFoundError:
        if not any(out_dir.glob("*.bin")):
            return
        what = "train.bin/val.bin with no meta.json"
    except (OSError, ValueError) as e:
        what = f"an unreadable meta.json: {e}"
    die(f"{out_dir} already holds a different dataset ({what}); choose another --out_dir or add --overwrite")


def download(url, path):
    if not path.exists():  # else kept from an earlier run
        print(f"downloading {url}")
        try:
            urllib.request.urlretrieve(url, path.with_suffix(".tmp"))
        except OSError as e:
            die(f"cannot download {url} ({e}); give a local copy with --input=PATH")
        os.replace(path.with_suffix(".tmp"), path)
    return path


def split_by_position(tmp, ntok, val_fraction):
    """nanoGPT's split of one long text: the first 1 - val_fraction of the tokens train, the rest val.
    Used when the document split left a side empty (one document, or too few for val_fraction); the
    whole stream is then in one file. The last document's EOT thus ends val."""
    if ntok[0] == 0:
        os.replace(tmp["val"], tmp["train"])
    n_train = int(sum(ntok) * (1 - val_fraction))
    with open(tmp["train"], "rb") as src, open(tmp["val"], "wb") as dst:
        src.seek(n_train * token_dtype.itemsize)
        shutil.copyfileobj(src, dst)
    os.truncate(tmp["train"], n_train * token_dtype.itemsize)
    return [n_train, sum(ntok) - n_train]


def prepare(cfg):
    """Tokenize the configured text into out_dir: train.bin, val.bin, meta.json. Returns the meta."""
    t0 = time.time()
    source, field, files = cfg["source"], cfg["text_field"], []
    if not source and not cfg["input"]:
        die(f"name a source ({', '.join(sources)}) or give your own files with --input=PATH")
    if not source and not cfg["out_dir"]:
        die("give --out_dir=DIR for --input files (train.py reads data/<name>)")
    if cfg["input"]:
        files = input_files(cfg["input"])
    tokenizer = cfg["tokenizer"] or ("char" if source == "shakespeare_char" else "gpt2")
    if tokenizer not in ("gpt2", "char"):
        die(f"--tokenizer={tokenizer}: use gpt2 or char")
    val_fraction = cfg["val_fraction"]
    if val_fraction is None:  # small data needs a big share to measure anything; big data, a sliver
        small = source.startswith("shakespeare") or (files and sum(f.stat().st_size for f in files) < small_input)
        val_fraction = 0.1 if small else 0.0005
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        die(f"--val_fraction={val_fraction}: give a number between 0 and 1")
    if not (isinstance(cfg["num_proc"], int) and cfg["num_proc"] >= 1):
        die(f"--num_proc={cfg['num_proc']}: give a whole number >= 1")

    out_dir = Path(cfg["out_dir"] or Path("data") / source)
    inputs = ([str(f.resolve()) for f in files] if files else
              [shakespeare_url] if source.startswith("shakespeare") else [hub_sources[source]["path"]])
    dataset = dict(source=source or "files", inputs=inputs, tokenizer=tokenizer)
    if not cfg["overwrite"]:
        check_out_dir(out_dir, dataset)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        die(f"cannot create {out_dir}: {e.strerror or e}")
    if source.startswith("shakespeare") and not files:
        files = [download(shakespeare_url, out_dir / "input.txt")]
    if files:
        read = lambda: pieces(read_files(files, field))
    else:
        read = lambda: pieces(read_hub(source, field, **hub_sources[source]))

    if tokenizer == "char":  # the vocabulary comes first, so char reads the text twice: it is for small corpora
        chars = set()
        for text, _ in read():
            chars.update(text)
        chars, vocab_size, eot = "".join(sorted(chars)), len(chars), None
    else:
        enc = gpt2()
        chars, vocab_size, eot = None, enc.n_vocab, enc.eot_token
    if vocab_size > np.iinfo(token_dtype).max + 1:
        die(f"the {tokenizer} vocabulary has {vocab_size:,} symbols; uint16 token files hold at most 65,536")

    tmp = {split: out_dir / f"{split}.bin.tmp" for split in ("train", "val")}  # renamed only when complete
    ntok, ndocs, nbytes, replaced[0] = [0, 0], [0, 0], 0, 0
    try:
        bar = tqdm(desc=f"tokenizing {source or 'files'}", unit=" tokens", unit_scale=True, disable=None)
        with open(tmp["train"], "wb") as train_f, open(tmp["val"], "wb") as val_f:
            tasks = batches(read(), val_fraction, cfg["seed"])
            for tokens, documents, size in tokenize_all(tasks, cfg["num_proc"], (tokenizer, chars)):
                for i, (f, t) in enumerate(zip((train_f, val_f), tokens)):
                    t.tofile(f)
                    ntok[i] += len(t)
                    ndocs[i] += documents[i]
                nbytes += size
                bar.update(len(tokens[0]) + len(tokens[1]))
                bar.set_postfix(documents=sum(ndocs), refresh=False)
        bar.close()
        if sum(ndocs) == 0:
            die(f"no text in the input ({', '.join(inputs)}): the files are empty")
        split = "document"
        if 0 in ntok:
            ntok, split = split_by_position(tmp, ntok, val_fraction), "position"
        if 0 in ntok:
            die(f"too little text to split: {sum(ntok)} tokens")
        (out_dir / "meta.json").unlink(missing_ok=True)  # the old dataset stops looking finished first
        for split_name, path in tmp.items():
            os.replace(path, out_dir / f"{split_name}.bin")
    except OSError as e:  # disk full, no write permission
        die(f"cannot write {out_dir}: {e.strerror or e}")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)

    meta = dict(
        **dataset, text_field=field,
        encoding="r50k_base" if tokenizer == "gpt2" else None, vocab_size=vocab_size, dtype="uint16",
        eot_token=eot, train_tokens=ntok[0], val_tokens=ntok[1],
        documents=sum(ndocs), val_documents=ndocs[1] if split == "document" else None,
        split=split, val_fraction=val_fraction, seed=cfg["seed"], text_bytes=nbytes, utf8_replaced=replaced[0],
    )
    if chars is not None:
        meta["chars"] = chars
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")  # \u escapes: any character survives
    os.replace(out_dir / "meta.json.tmp", out_dir / "meta.json")

    seconds = time.time() - t0
    how = f"{ndocs[1]:,} of them val" if split == "document" else f"split by position: val is the last {val_fraction:.4g}"
    print(f"wrote {out_dir}/train.bin, val.bin, meta.json ({tokenizer}, vocab_size {vocab_size:,})")
    print(f"documents    {sum(ndocs):,} ({how}; val_fraction {val_fraction:.4g}{'' if cfg['val_fraction'] else ', the default for this size'})")
    print(f"train.bin    {ntok[0]:,} tokens")
    print(f"val.bin      {ntok[1]:,} tokens")
    print(f"bytes/token  {nbytes / sum(ntok):.2f}")
    if replaced[0]:
        print(f"invalid UTF-8: {replaced[0]:,} sequences replaced by U+FFFD")
    print(f"time         {seconds:.1f} s ({sum(ntok) / seconds:,.0f} tokens/s, num_proc {cfg['num_proc']})")
    return meta


if __name__ == "__main__":
    try:
        prepare(parse_args(sys.argv[1:]))
    except KeyboardInterrupt:
        die("interrupted; nothing was written")
