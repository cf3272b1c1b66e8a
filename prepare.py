"""
Prepare a dataset for train.py: text in, memory-mapped token files out.

    python prepare.py shakespeare_char    # tiny Shakespeare (shipped: assets/tinyshakespeare.txt), one token per character
    python prepare.py shakespeare         # the same text as GPT-2 BPE tokens
    python prepare.py openwebtext         # also fineweb-edu (sample-10BT) and c4 (en): pip install datasets
    python prepare.py --input=notes/ --input=more.jsonl --out_dir=data/notes   # your own text
    python prepare.py --input=chat.jsonl --tokenizer=path/to/mpt-7b --out_dir=data/chat   # prompt/response
    python prepare.py hellaswag           # eval.py's task files, not tokens: also lambada (pip install datasets)

--tokenizer is gpt2 (tiktoken's GPT-2 BPE), char, or the path of a Hugging Face model directory (or its
tokenizer.json), read with the `tokenizers` library: the model's own tokenizer, e.g. gpt-neox-20b's for MPT-7B/30B.
Token ids are stored as uint16, so a tokenizer may have at most 65,536 ids (MPT's 50,432 fit); a larger one is
an error. A Hugging Face tokenizer encodes each document whole (its pre-tokenizer may not allow cutting a
document where GPT-2's does) and without its special tokens (a "<|endoftext|>" in the text stays text).

Prompt/response data (llm-foundry's fine-tuning format): .jsonl records {"prompt": ..., "response": ...}. Each
becomes prompt tokens + response tokens + end-of-text, packed back to back; beside each .bin a .mask file holds
one byte per token, 1 on the response tokens and the end-of-text (what the loss counts), 0 on the prompt's.

Tiny Shakespeare (1.1 MB) ships with this repository, so the main job needs no network. The large corpora stream
from the Hugging Face hub; with no network, download them elsewhere and give the local files (.parquet or .jsonl,
or a folder of them) with --input=PATH: a named source given --input reads that local copy instead.
Output in out_dir (default data/<source>):
    train.bin, val.bin  token ids as raw little-endian uint16, nanoGPT's format: np.memmap(path, np.uint16)
    train.mask, val.mask  prompt/response data only: one uint8 per token, 1 where the loss counts
    meta.json           tokenizer, vocab_size, dtype, eot_token, format (text or prompt_response), token and
                        document counts, source, split, seed; for char the vocabulary as `chars`, for a Hugging
                        Face tokenizer its tokenizer_file. Written last: it marks a finished dataset.
One run at a time writes a dataset (a lock beside out_dir names the holder to a second one). It writes into a
folder of its own beside out_dir and swaps it in whole at the end; a run that fails leaves nothing behind.
Settings are --key=value as in the other scripts (values are Python literals); the defaults are below.
"""
import codecs
import collections
import contextlib
import difflib
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from configurator import configure, help_if_asked, settings_in

help_if_asked(__file__, "python prepare.py [SOURCE] [--key=value ...]")  # --help: read from this file's source

import numpy as np
import tiktoken
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# settings: the defaults; the bare word is the source, --key=value overrides one (--input may repeat)
source = ""  # given bare: shakespeare, shakespeare_char, openwebtext, fineweb-edu, c4, or a task (hellaswag, lambada)
# data
input = []  # your files or folders: .txt/.md (one document per file), .jsonl, .parquet
text_field = "text"  # the .jsonl field / .parquet or hub column holding each document's text
out_dir = ""  # empty: data/<source>, where train.py looks
overwrite = False  # replace an out_dir that holds a different dataset
binary_ok = False  # tokenize files that look binary (a NUL byte, or over 1% invalid UTF-8) instead of refusing them
# split
val_fraction = None  # None: 0.1 for small inputs (shakespeare, files < 100 MB), 0.0005 for large ones
seed = 1337  # seeds which documents go to val
# tokenizer (empty: char for shakespeare_char, else gpt2)
tokenizer = ""  # gpt2 (tiktoken's GPT-2 BPE), char, or a Hugging Face model directory / tokenizer.json
# system
num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # tokenizer processes
_defaults = settings_in(globals())


def configured(argv):
    """The settings above as argv sets them (configurator.py; a copy, so each run in one process starts afresh)."""
    return configure(dict(_defaults), argv, verbose=False, positional="source", repeated=("input",), prog="prepare.py")


# tiny Shakespeare, shipped: karpathy/char-rnn's input.txt (1,115,394 bytes), the identity meta.json records for it
shakespeare_url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
shakespeare_text = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
hub_sources = {  # Hugging Face datasets, streamed: only the tokens are stored
    "openwebtext": dict(path="Skylion007/openwebtext"),
    "fineweb-edu": dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT"),  # ~10B GPT-2 tokens
    "c4": dict(path="allenai/c4", name="en"),
}
# zero-shot tasks for eval.py: the public validation (test) split, written as the .jsonl that eval.py reads
task_sources = {
    "hellaswag": dict(path="Rowan/hellaswag", split="validation", file="hellaswag_val.jsonl"),
    "lambada": dict(path="EleutherAI/lambada_openai", name="default", split="test", file="lambada_openai.jsonl"),
}
sources = ["shakespeare", "shakespeare_char", *hub_sources, *task_sources]
file_types = (".txt", ".md", ".jsonl", ".parquet")
token_dtype = np.dtype("<u2")  # little-endian uint16, whatever the machine: nanoGPT's .bin files
mask_dtype = np.dtype("u1")  # loss masks: one byte per token
piece_chars = 1 << 20  # text per tokenizer task: pickling it is cheap next to BPE, and 2+ workers stay busy
small_input = 100 << 20  # files under this many bytes in all default to val_fraction 0.1


made = []  # the parent folders of out_dir this run has created, deepest first
staging = []  # the folder this run writes into, beside out_dir, until it swaps it in


def fail(message):
    """Bad input ends the run with one line and exit status 1 (common.fail), never a traceback; what the run
    made goes first: its staging folder, its lock (and out_dir if the lock made it and it is still empty), the
    parent folders it made. Never a folder that another run made or filled."""
    if multiprocessing.parent_process() is None:  # not from a tokenizer worker: the main process owns the folders
        for path in staging:
            shutil.rmtree(path, ignore_errors=True)
        common.release_out_dir()
        for path in made:  # the parents made for out_dir, deepest first (left alone unless empty)
            with contextlib.suppress(OSError):
                path.rmdir()
        made.clear()
    common.fail(message, prog="prepare.py")


def unknown(what, name, valid):
    near = difflib.get_close_matches(name, valid, n=1)
    fail(f"unknown {what} {name}" + (f" (did you mean {near[0]}?)" if near else "") + f"; valid: {', '.join(valid)}")

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
            every = sorted(f for f in path.rglob("*") if not f.is_dir())
            found = [f for f in every if f.suffix.lower() in file_types]
            if not found:
                fail(f"{path}: no {'/'.join(file_types)} files in this folder")
            skipped = [str(f.relative_to(path)) for f in every if f.suffix.lower() not in file_types]
            if skipped:
                print(f"note: {path}: {len(skipped)} file(s) skipped, not {'/'.join(file_types)}: "
                      f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}", file=sys.stderr)
            files += found
        elif not path.exists():
            fail(f"{path}: no such file or folder")
        elif path.suffix.lower() not in file_types:
            fail(f"{path}: unsupported file type; use {', '.join(file_types)} or a folder of them")
        else:
            files.append(path)
    return files


allow_binary = [False]  # prepare()'s cfg["binary_ok"], for read_text


def read_text(path):
    """A .txt/.md file is one document, read a block at a time (newline='': \\r\\n stays as on disk). A file that
    looks binary (a NUL byte, or more than 1% of it invalid UTF-8 once 4096 characters are read) is refused unless
    --binary_ok=True: tokenized, it would train the model on noise."""
    before, chars = replaced[0], 0
    try:
        with open(path, encoding="utf-8", errors="replace_and_count", newline="") as f:
            while block := f.read(piece_chars):
                chars += len(block)
                bad = "\0" in block or chars >= 4096 and replaced[0] - before > 0.01 * chars  # a few in a note: text
                if bad and not allow_binary[0]:
                    what = "a NUL byte" if "\0" in block else f"{replaced[0] - before:,} invalid UTF-8 sequences"
                    fail(f"{path} looks binary ({what} in its first {chars:,} characters), not text: give text "
                         f"files, or --binary_ok=True to tokenize it anyway")
                yield block
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")


PAIR = ("prompt", "response")  # the fields of a prompt/response record


def is_pair(row, field):
    """Whether a .jsonl record is prompt/response rather than plain text."""
    return isinstance(row, dict) and field not in row and any(k in row for k in PAIR)


def data_format(files, field):
    """'prompt_response' when the .jsonl inputs hold prompt/response records (judged by each file's first
    record), else 'text'; one dataset cannot mix the two."""
    formats = {}
    for path in files:
        kind = "text"
        if path.suffix.lower() == ".jsonl":
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    line = next((line for line in f if line.strip()), "")
                kind = "prompt_response" if is_pair(json.loads(line), field) else "text"
            except (OSError, ValueError):
                pass  # the reader reports it, with the line number
        formats.setdefault(kind, path)
    if len(formats) > 1:
        fail(f"{formats['prompt_response']} holds prompt/response records but {formats['text']} plain text: "
            "one dataset is one or the other (prepare them into separate out_dirs)")
    return next(iter(formats), "text")


def read_jsonl(path, field, pairs=False):
    """One document per line: its text in `field`, or (pairs) a (prompt, response) record."""
    try:
        with open(path, encoding="utf-8", errors="replace_and_count") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})")
                has = f"its fields: {', '.join(row)}" if isinstance(row, dict) else f"it is {json_type(row)}"
                if pairs:
                    wrong = [k for k in PAIR if not isinstance(row.get(k) if isinstance(row, dict) else None, str)]
                    if wrong and isinstance(row, dict):
                        fail(f"{path}:{i}: a prompt/response record needs text in 'prompt' and 'response', but "
                            + " and ".join(f"{k!r} is " + ("missing" if k not in row else json_type(row[k]))
                                           for k in wrong) + f" ({has})")
                    elif wrong:
                        fail(f"{path}:{i}: a prompt/response record must be a JSON object with text in 'prompt' and "
                            f"'response' ({has})")
                    yield (row["prompt"], row["response"])
                    continue
                if is_pair(row, field):
                    fail(f"{path}:{i}: a prompt/response record among plain-text records ({has}): one dataset "
                        "is one or the other")
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    fail(f"{path}:{i}: no text field {field!r} ({has}); choose the field with --text_field=NAME")
                yield [row[field]]
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")


def json_type(value):
    """A parsed JSON value's type as JSON names it: null, a boolean, a number, a list, an object, a string."""
    return "null" if value is None else "a boolean" if isinstance(value, bool) else \
        "a number" if isinstance(value, (int, float)) else "a list" if isinstance(value, list) else \
        "an object" if isinstance(value, dict) else "a string"


def read_hub(where, field, **load_args):
    """Documents from Hugging Face datasets, streamed: a hub dataset, or local .parquet/.jsonl by builder name."""
    local = "" if isinstance(where, Path) else \
        f"; or, offline, download it elsewhere and give the files with --input=PATH (.parquet/.jsonl, or a folder)"
    try:
        import datasets  # optional: only these sources need it
    except ImportError:
        fail(f"{where} is read with Hugging Face datasets, which is not installed: pip install datasets{local}")
    try:
        for i, row in enumerate(datasets.load_dataset(**load_args, split="train", streaming=True)):
            if not isinstance(row.get(field), str):
                fail(f"{where}: row {i} has no text in column {field!r} (columns: {', '.join(row)}); "
                    "choose it with --text_field=NAME")
            yield [row[field]]
    except Exception as e:  # network, missing dataset, corrupt file: say so plainly
        fail(f"cannot read {where}: {type(e).__name__}: {e}{local}")


def read_files(files, field, pairs=False):
    for path in files:
        kind = path.suffix.lower()
        if kind == ".jsonl":
            yield from read_jsonl(path, field, pairs)
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


def pieces(documents, cut=True):
    """(text, ends_document) pieces of about piece_chars, so one big document still tokenizes in parallel.
    Memory is bounded by piece_chars plus the longest stretch of a document with no place to cut. cut=False
    keeps each document whole; a (prompt, response) record is one piece."""
    for blocks in documents:
        if isinstance(blocks, tuple):
            yield blocks, True
            continue
        text = ""
        for block in blocks:
            text += block
            if cut and len(text) >= piece_chars and (m := last_cut.match(text)):
                yield text[:m.end()], False
                text = text[m.end():]
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
        size, new_document = size + (len(text) if isinstance(text, str) else sum(map(len, text))), last
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
        fail(f"cannot load the GPT-2 tokenizer (tiktoken r50k_base: {type(e).__name__}): tiktoken downloads it once, "
             "and there is no network here; set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds it, or give "
             "--tokenizer=PATH (a Hugging Face model's directory or tokenizer.json)")


def hf_tokenizer(path):
    """(tokenizer.json path, vocab size, end-of-text id) of --tokenizer=PATH: a Hugging Face model directory
    or a tokenizer.json. The end-of-text is <|endoftext|> if the vocabulary has it, else the eos_token of
    tokenizer_config.json (or eos_token_id of config.json) beside it."""
    where, file = Path(path), Path(path) / "tokenizer.json"
    if where.is_file():
        where, file = where.parent, where
    elif not where.exists():
        fail(f"--tokenizer={path}: no such file or folder; use gpt2, char, or a Hugging Face model directory "
            "(or its tokenizer.json)")
    elif not file.is_file():
        fail(f"--tokenizer={path}: no tokenizer.json in this folder; give a Hugging Face model directory that "
            "has one (a downloaded mpt-7b does), or the tokenizer.json itself")
    try:
        from tokenizers import Tokenizer  # optional: only --tokenizer=PATH needs it
    except ImportError:
        fail("--tokenizer=PATH reads Hugging Face tokenizers with the tokenizers package: pip install tokenizers")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:
        fail(f"{file}: not a tokenizer.json that the tokenizers library reads ({type(e).__name__}: {e})")
    eot = tok.token_to_id("<|endoftext|>")
    if eot is None:
        def read(name):
            try:
                return json.loads((where / name).read_text())
            except (OSError, ValueError):
                return {}
        eos = read("tokenizer_config.json").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eot = tok.token_to_id(eos) if isinstance(eos, str) else None
        if eot is None and isinstance(read("config.json").get("eos_token_id"), int):
            eot = read("config.json")["eos_token_id"]
    if eot is None:
        fail(f"{file}: no end-of-text token: the vocabulary has no <|endoftext|>, and no eos_token in "
            f"{where}/tokenizer_config.json (or eos_token_id in config.json) names one")
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids run 0..max
    return str(file.resolve()), vocab_size, eot


def init_encoder(tokenizer, chars, eot=None):
    """Set this process's encoder (text -> uint16 ids) and the ids that end a document."""
    global encode, eot_ids
    if multiprocessing.parent_process():  # a worker: Ctrl-C and SIGTERM are for the main process to handle
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool's own way to end its workers
    if tokenizer not in ("gpt2", "char"):  # a tokenizer.json
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tokenizer)
        tok.encode_special_tokens = True  # a "<|endoftext|>" in the text is text, as with GPT-2 below
        encode = lambda text: np.array(tok.encode(text, add_special_tokens=False).ids, dtype=token_dtype)
        eot_ids = np.array([eot], dtype=token_dtype)
    elif tokenizer == "gpt2":
        enc = gpt2()
        encode = lambda text: np.array(enc.encode_ordinary(text), dtype=token_dtype)  # text "<|endoftext|>" stays text
        eot_ids = np.array([enc.eot_token], dtype=token_dtype)
    else:  # ids in sorted character order, as nanoGPT's shakespeare_char; no end-of-text symbol
        codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        encode = lambda text: np.searchsorted(codepoints, np.frombuffer(
            text.encode("utf-32-le", "surrogatepass"), dtype="<u4")).astype(token_dtype)
        eot_ids = np.array([], dtype=token_dtype)


def tokenize(batch):
    """One task: returns the (train, val) token arrays, their (train, val) loss masks (None for plain
    text), (train, val) documents ended, and text bytes. A (prompt, response) record is prompt tokens +
    response tokens + end-of-text, its mask 0 on the prompt and 1 on the rest."""
    tokens, masks, documents, nbytes = ([], []), ([], []), [0, 0], 0
    for text, is_val, last in batch:
        if isinstance(text, tuple):
            prompt, response = map(encode, text)
            tokens[is_val].extend([prompt, response])
            masks[is_val].extend([np.zeros(len(prompt), mask_dtype), np.ones(len(response) + len(eot_ids), mask_dtype)])
            text = "".join(text)
        else:
            tokens[is_val].append(encode(text))
        if last:
            tokens[is_val].append(eot_ids)
            documents[is_val] += 1
        nbytes += len(text.encode("utf-8", "surrogatepass"))
    join = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)
    tokens = [join(t, token_dtype) for t in tokens]
    masks = [join(m, mask_dtype) for m in masks] if any(isinstance(t, tuple) for t, _, _ in batch) else None
    return tokens, masks, documents, nbytes


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
    fail(f"{out_dir} already holds a different dataset ({what}); choose another --out_dir or add --overwrite")


def hold(out_dir):
    """One writer per dataset: the lock of out_dir (common.lock_out_dir, as train.py takes its out_dir's), refused
    in one line naming the holder. The lock file lives in a folder beside out_dir (.NAME.prepare/), which the swap
    (swap_in) never moves. Then what a killed run left is named and cleaned up: its staging folder, and an
    out_dir it had set aside while swapping, put back. Returns the staging folder, made empty."""
    lock = out_dir.parent / f".{out_dir.name}.prepare"
    aside, stage = out_dir.parent / f".{out_dir.name}.prepare-old", out_dir.parent / f".{out_dir.name}.prepare-tmp"
    made[:] = [p for p in out_dir.parents if not p.exists()]
    problem, note = common.lock_out_dir(str(lock))
    if problem:
        made.clear()  # the holder's folders, not ours
        fail(problem.replace(str(lock), str(out_dir)).replace("another out_dir", "another --out_dir"))
    if note:
        print(note, file=sys.stderr)
    if aside.is_dir() and not out_dir.exists():
        os.rename(aside, out_dir)
        print(f"note: {out_dir} put back from {aside}, where a killed prepare.py had set it aside", file=sys.stderr)
    for left, what in ((aside, "an earlier dataset a killed prepare.py had set aside"),
                       (stage, "the partial output of a prepare.py that was killed")):
        if left.exists():
            shutil.rmtree(left)
            print(f"note: removed {left}, {what}", file=sys.stderr)
    stage.mkdir()
    staging[:] = [stage]
    return stage


OUTPUTS = re.compile(r"(train|val)\.(bin|mask)(\.tmp)?|meta\.json(\.tmp)?")  # what a dataset folder's files are


def swap_in(stage, out_dir):
    """The finished dataset takes out_dir's place whole, with no moment where neither is: what else out_dir holds
    (the user's own files) moves into the new one first; then out_dir is renamed aside, the new one renamed in
    (SIGTERM and Ctrl-C wait for the two renames), and only then the old dataset is deleted. Killed between the
    renames, the next run puts the old one back (hold)."""
    aside = out_dir.parent / f".{out_dir.name}.prepare-old"
    for f in os.listdir(out_dir) if out_dir.exists() else []:
        if not OUTPUTS.fullmatch(f):
            os.rename(out_dir / f, stage / f)
    common.swap_folder(stage, out_dir, aside)
    staging.clear()
    shutil.rmtree(aside, ignore_errors=True)


def split_by_position(tmp, ntok, val_fraction, itemsize=token_dtype.itemsize):
    """nanoGPT's split of one long text: the first 1 - val_fraction of the tokens train, the rest val.
    Used when the document split left a side empty (one document, or too few for val_fraction); the
    whole stream is then in one file. The last document's EOT thus ends val. (Loss masks split alike.)"""
    if ntok[0] == 0:
        os.replace(tmp["val"], tmp["train"])
    n_train = int(sum(ntok) * (1 - val_fraction))
    with open(tmp["train"], "rb") as src, open(tmp["val"], "wb") as dst:
        src.seek(n_train * itemsize)
        shutil.copyfileobj(src, dst)
    os.truncate(tmp["train"], n_train * itemsize)
    return [n_train, sum(ntok) - n_train]


def task_record(source, row):
    """A row of a task's split as eval.py reads it: HellaSwag's own fields; LAMBADA's text as a context and its last
    word (eval.py puts the space back before it, as lm-eval's lambada does)."""
    if source == "hellaswag":
        return {k: row[k] for k in ("activity_label", "ctx_a", "ctx_b", "ctx", "endings")} | {"label": int(row["label"])}
    context, word = row["text"].rsplit(" ", 1)
    return {"context": context, "continuation": word}


def prepare_task(source, out_dir):
    """python prepare.py hellaswag|lambada: the task's public split (Hugging Face datasets) as out_dir/FILE.jsonl."""
    spec = task_sources[source]
    out = Path(out_dir or Path("data") / "tasks") / spec["file"]
    local = (f"; or, offline, download {spec['file']} elsewhere and give it to eval.py as "
             f"--tasks=PATH/{spec['file']}")
    try:
        import datasets  # optional: only these sources need it
    except ImportError:
        fail(f"{source} is read with Hugging Face datasets, which is not installed: pip install datasets{local}")
    try:
        rows = [task_record(source, row) for row in datasets.load_dataset(
            spec["path"], **({"name": spec["name"]} if "name" in spec else {}), split=spec["split"])]
    except Exception as e:  # network, missing dataset, a changed layout: say so plainly
        fail(f"cannot read {source} ({spec['path']}): {type(e).__name__}: {e}{local}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".tmp", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(str(out) + ".tmp", out)
    print(f"wrote {out}: {len(rows):,} items; evaluate with python eval.py --init_from=OUT_DIR --tasks={out}")


def prepare(cfg):
    """Tokenize the configured text into out_dir: train.bin, val.bin, meta.json. Returns the meta."""
    t0 = time.time()
    source, field, files = cfg["source"], cfg["text_field"], []
    allow_binary[0] = cfg["binary_ok"]
    if source in task_sources:
        return prepare_task(source, cfg["out_dir"])
    if source and source not in sources:
        if os.path.exists(source):
            fail(f"your own files go in as --input={source} (with --out_dir=DIR)")
        unknown("source", source, sources)
    if not source and not cfg["input"]:
        fail(f"name a source ({', '.join(sources)}) or give your own files with --input=PATH")
    if not source and not cfg["out_dir"]:
        fail("give --out_dir=DIR for --input files (train.py reads data/<name>)")
    if cfg["input"]:
        files = input_files(cfg["input"])
    tokenizer = cfg["tokenizer"] or ("char" if source == "shakespeare_char" else "gpt2")
    tokenizer_file = None
    if tokenizer not in ("gpt2", "char"):
        if not (os.sep in tokenizer or Path(tokenizer).exists() or tokenizer.endswith(".json")):
            fail(f"--tokenizer={tokenizer}: use gpt2, char, or the path of a Hugging Face model directory "
                "(or its tokenizer.json)")
        tokenizer_file, hf_vocab, hf_eot = hf_tokenizer(tokenizer)
        tokenizer = str(Path(tokenizer).resolve())
    pairs = data_format(files, field) == "prompt_response"
    if pairs and tokenizer == "char":
        fail("prompt/response data needs an end-of-text token after each response; --tokenizer=char has none")
    val_fraction = cfg["val_fraction"]
    if val_fraction is None:  # small data needs a big share to measure anything; big data, a sliver
        small = source.startswith("shakespeare") or (files and sum(f.stat().st_size for f in files) < small_input)
        val_fraction = 0.1 if small else 0.0005
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        fail(f"--val_fraction={val_fraction}: give a number between 0 and 1")
    if not (isinstance(cfg["num_proc"], int) and cfg["num_proc"] >= 1):
        fail(f"--num_proc={cfg['num_proc']}: give a whole number >= 1")

    out_dir = Path(cfg["out_dir"] or Path("data") / source)
    inputs = ([str(f.resolve()) for f in files] if files else
              [shakespeare_url] if source.startswith("shakespeare") else [hub_sources[source]["path"]])
    dataset = dict(source=source or "files", inputs=inputs, tokenizer=tokenizer)
    stage = hold(out_dir)  # from here to the end, no other prepare.py (or train.py) writes into out_dir
    if not cfg["overwrite"]:
        check_out_dir(out_dir, dataset)
    if source.startswith("shakespeare") and not files:
        if not shakespeare_text.is_file():
            fail(f"{shakespeare_text} is missing (it ships with this repository): restore it with `git checkout "
                f"assets`, or give a copy of {shakespeare_url} with --input=PATH")
        files = [shakespeare_text]
    if files:  # a Hugging Face tokenizer's documents stay whole (see the top)
        read = lambda: pieces(read_files(files, field, pairs), cut=tokenizer_file is None)
    else:
        read = lambda: pieces(read_hub(source, field, **hub_sources[source]), cut=tokenizer_file is None)

    if tokenizer == "char":  # the vocabulary comes first, so char reads the text twice: it is for small corpora
        chars = set()
        for text, _ in read():
            chars.update(text)
        chars, vocab_size, eot = "".join(sorted(chars)), len(chars), None
    elif tokenizer_file:
        chars, vocab_size, eot = None, hf_vocab, hf_eot
    else:
        enc = gpt2()
        chars, vocab_size, eot = None, enc.n_vocab, enc.eot_token
    if vocab_size > np.iinfo(token_dtype).max + 1:
        fail(f"the {tokenizer} vocabulary has {vocab_size:,} symbols; uint16 token files hold at most 65,536")

    # written into the staging folder, renamed only when complete; the folder is swapped in at the end
    tmp = {split: stage / f"{split}.bin.tmp" for split in ("train", "val")}
    tmp_mask = {split: stage / f"{split}.mask.tmp" for split in ("train", "val")}
    ntok, ndocs, nbytes, nloss, replaced[0] = [0, 0], [0, 0], 0, [0, 0], 0
    try:
        bar = tqdm(desc=f"tokenizing {source or 'files'}", unit=" tokens", unit_scale=True, disable=None)
        with open(tmp["train"], "wb") as train_f, open(tmp["val"], "wb") as val_f, \
                contextlib.ExitStack() as stack:
            mask_f = [stack.enter_context(open(tmp_mask[s], "wb")) for s in ("train", "val")] if pairs else None
            tasks = batches(read(), val_fraction, cfg["seed"])
            for tokens, masks, documents, size in tokenize_all(tasks, cfg["num_proc"], (tokenizer_file or tokenizer, chars, eot)):
                for i, (f, t) in enumerate(zip((train_f, val_f), tokens)):
                    t.tofile(f)
                    ntok[i] += len(t)
                    ndocs[i] += documents[i]
                    if pairs:
                        masks[i].tofile(mask_f[i])
                        nloss[i] += int(masks[i].sum())
                nbytes += size
                bar.update(len(tokens[0]) + len(tokens[1]))
                bar.set_postfix(documents=sum(ndocs), refresh=False)
        bar.close()
        if sum(ndocs) == 0:
            fail(f"no text in the input ({', '.join(inputs)}): the files are empty")
        split = "document"
        if 0 in ntok:
            if pairs:
                split_by_position(tmp_mask, ntok, val_fraction, mask_dtype.itemsize)
            ntok, split = split_by_position(tmp, ntok, val_fraction), "position"
            if pairs:
                nloss = [int(np.fromfile(tmp_mask[s], mask_dtype).sum()) for s in ("train", "val")]
        if 0 in ntok:
            fail(f"too little text to split: {sum(ntok)} tokens")
        for split_name, path in tmp.items():
            os.replace(path, stage / f"{split_name}.bin")
            if pairs:
                os.replace(tmp_mask[split_name], stage / f"{split_name}.mask")
    except OSError as e:  # disk full (numpy's tofile says only "N requested and M written"), no write permission
        free = shutil.disk_usage(out_dir.parent).free
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or free < 1 << 20 or "requested and" in str(e):
            fail(f"disk full while writing {out_dir}: {common.human(free)} free with the partial files removed; "
                 f"nothing was written: free some space (the tokens take about 2 bytes each), then run again")
        fail(f"cannot write {out_dir}: {e.strerror or e}")
    finally:
        for path in [*tmp.values(), *tmp_mask.values()]:
            path.unlink(missing_ok=True)

    meta = dict(
        **dataset, text_field=field, tokenizer_file=tokenizer_file,
        encoding="r50k_base" if tokenizer == "gpt2" else None, vocab_size=vocab_size, dtype="uint16",
        eot_token=eot, format="prompt_response" if pairs else "text", loss_mask=pairs,
        train_tokens=ntok[0], val_tokens=ntok[1],
        train_loss_tokens=nloss[0] if pairs else None, val_loss_tokens=nloss[1] if pairs else None,
        documents=sum(ndocs), val_documents=ndocs[1] if split == "document" else None,
        split=split, val_fraction=val_fraction, seed=cfg["seed"], text_bytes=nbytes, utf8_replaced=replaced[0],
    )
    if chars is not None:
        meta["chars"] = chars
    # what proves the files are these: each one's size and CRC-32s (common.file_crc, as checkpoints' manifests),
    # checked by train.py before it trains on them
    names = ["train.bin", "val.bin"] + (["train.mask", "val.mask"] if pairs else [])
    meta["files"] = {name: common.file_crc(stage / name) for name in names}
    try:
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # \u escapes: any character survives
        swap_in(stage, out_dir)
    except OSError as e:
        fail(f"cannot write {out_dir}: {e.strerror or e}")
    made.clear()  # done: the folders stay
    common.release_out_dir()

    seconds = time.time() - t0
    how = f"{ndocs[1]:,} of them val" if split == "document" else f"split by position: val is the last {val_fraction:.4g}"
    print(f"wrote {out_dir}/train.bin, val.bin, {'train.mask, val.mask, ' if pairs else ''}meta.json "
          f"({tokenizer}, vocab_size {vocab_size:,}{', prompt/response' if pairs else ''})")
    print(f"documents    {sum(ndocs):,} ({how}; val_fraction {val_fraction:.4g}{'' if cfg['val_fraction'] else ', the default for this size'})")
    print(f"train.bin    {ntok[0]:,} tokens" + (f", {nloss[0]:,} of them in the loss (train.mask)" if pairs else ""))
    print(f"val.bin      {ntok[1]:,} tokens" + (f", {nloss[1]:,} of them in the loss (val.mask)" if pairs else ""))
    print(f"bytes/token  {nbytes / sum(ntok):.2f}")
    if replaced[0]:
        print(f"invalid UTF-8: {replaced[0]:,} sequences replaced by U+FFFD")
    print(f"time         {seconds:.1f} s ({sum(ntok) / seconds:,.0f} tokens/s, num_proc {cfg['num_proc']})")
    return meta


def interrupted(signum, frame):
    raise KeyboardInterrupt(signum)  # SIGTERM as Ctrl-C: what the run made goes on the way out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    try:
        prepare(configured(sys.argv[1:]))
    except KeyboardInterrupt as e:
        term = e.args == (signal.SIGTERM,)
        try:
            fail(f"{'SIGTERM' if term else 'interrupted (Ctrl-C)'}; nothing was written")
        except SystemExit:
            sys.exit(143 if term else 130)  # the shell's 128 + the signal's number
