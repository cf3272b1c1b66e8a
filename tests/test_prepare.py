"""Tests for prepare.py, with no network: GPT-2 BPE from ../shared/tiktoken, tiny Shakespeare from
../shared/data. References are independent of prepare.py: tiktoken on the raw text, the text itself,
np.fromfile on the .bin files."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import tiktoken

repo = Path(__file__).resolve().parents[1]
shared = Path(__file__).resolve().parents[2] / "shared"
os.environ["TIKTOKEN_CACHE_DIR"] = str(shared / "tiktoken")  # for tiktoken here and in prepare.py's subprocesses
sys.path.insert(0, str(repo))
import common  # noqa: E402
import prepare  # noqa: E402

shakespeare = shared / "data" / "tinyshakespeare.txt"
enc = tiktoken.get_encoding("r50k_base")
EOT = 50256


def run(*args, env=None):
    """prepare.py as users run it."""
    return subprocess.run([sys.executable, str(repo / "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def load(out_dir):
    meta = json.loads((out_dir / "meta.json").read_text())
    train, val = (np.fromfile(out_dir / f"{s}.bin", dtype="<u2") for s in ("train", "val"))
    return meta, train, val


def prepare_here(*args):
    """prepare.py in this process: faster, and settings like piece_chars can be patched."""
    return prepare.prepare(prepare.configured(list(map(str, args))))


def split_documents(tokens):
    """Decode a document-split stream back into its documents (each ends with EOT)."""
    ends = np.flatnonzero(tokens == EOT)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def test_shakespeare_gpt2(tmp_path):
    text = shakespeare.read_text(encoding="utf-8")
    reference = enc.encode_ordinary(text)
    assert len(reference) == 338_025
    r = run("shakespeare", f"--input={shakespeare}", f"--out_dir={tmp_path}", "--num_proc=2")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path)
    # one document, so split by position: nanoGPT's first 90% train, and the EOT ends val
    assert np.concatenate([train, val]).tolist() == reference + [EOT]
    assert len(train) == int(338_026 * 0.9) and val[-1] == EOT
    assert enc.decode(train.tolist()) + enc.decode(val.tolist()) == text + "<|endoftext|>"
    assert meta["tokenizer"] == "gpt2" and meta["encoding"] == "r50k_base"
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (50257, EOT, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert (tmp_path / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    assert (meta["split"], meta["documents"], meta["val_fraction"], meta["source"]) == ("position", 1, 0.1, "shakespeare")
    assert meta["text_bytes"] == shakespeare.stat().st_size
    for name, tokens in (("train", train), ("val", val)):
        assert np.array_equal(np.memmap(tmp_path / f"{name}.bin", dtype=np.uint16, mode="r"), tokens)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert "304,223 tokens" in r.stdout and "bytes/token  3.30" in r.stdout


def test_shakespeare_char(tmp_path):
    text = shakespeare.read_text(encoding="utf-8")
    r = run("shakespeare_char", f"--input={shakespeare}", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path)
    assert meta["chars"] == "".join(sorted(set(text))) and meta["vocab_size"] == 65
    assert meta["tokenizer"] == "char" and meta["eot_token"] is None
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == text
    assert len(train) == int(len(text) * 0.9) == 1_003_854  # nanoGPT's shakespeare_char split
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))


def test_big_document_cut_into_pieces_for_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "piece_chars", 5000)  # ~220 pieces of one document, 2 processes
    prepare_here(f"--input={shakespeare}", f"--out_dir={tmp_path}", "--num_proc=2")
    meta, train, val = load(tmp_path)
    assert np.concatenate([train, val]).tolist() == enc.encode_ordinary(shakespeare.read_text()) + [EOT]


def test_cut_points_keep_bpe_tokens(monkeypatch):
    """prepare.py may only cut a document where encoding the parts gives the tokens of the whole."""
    alphabet = ["a", "Z", "9", " ", "  ", "\n", "\n\n", "\t", "\r\n", ".", "!", ",", "'s", "'ll", "é", "日",
                "\u00a0", "\u3000", "\u2028", "\x85", "\x0b", "\x1c"]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 100)))
        whole = enc.encode_ordinary(text)
        cuts = {m.end() for n in range(len(text) + 1) if (m := prepare.last_cut.match(text, 0, n))}  # every place
        for c in cuts:
            assert enc.encode_ordinary(text[:c]) + enc.encode_ordinary(text[c:]) == whole, (text, c)
        monkeypatch.setattr(prepare, "piece_chars", rng.randint(1, 20))
        parts = list(prepare.pieces([[text]]))
        assert "".join(t for t, _ in parts) == text and [last for _, last in parts] == [False] * (len(parts) - 1) + [True]
        assert sum((enc.encode_ordinary(t) for t, _ in parts), []) == whole


def test_documents_split_by_seeded_draw(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "piece_chars", 500)  # many tasks, so two processes interleave
    rng = random.Random(1)
    words = "the of and to in is was for on that with as by at from".split()
    docs = [f"Document {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    outs = {}
    for name, args in {"a": ("--seed=1", "--num_proc=2"), "b": ("--seed=1", "--num_proc=1"), "c": ("--seed=2",)}.items():
        prepare_here(f"--input={tmp_path / 'docs.jsonl'}", f"--out_dir={tmp_path / name}", "--val_fraction=0.2", *args)
        outs[name] = load(tmp_path / name)
    meta, train, val = outs["a"]
    train_docs, val_docs = split_documents(train), split_documents(val)
    assert sorted(train_docs + val_docs) == sorted(docs)  # every document whole, in exactly one split
    assert train_docs == [d for d in docs if d in set(train_docs)]  # input order kept inside a split
    assert 0.1 < len(val_docs) / len(docs) < 0.3
    assert (meta["split"], meta["documents"], meta["val_documents"]) == ("document", 300, len(val_docs))
    assert np.array_equal(outs["b"][1], train) and np.array_equal(outs["b"][2], val)  # num_proc changes nothing
    assert set(split_documents(outs["c"][2])) != set(val_docs)  # the seed decides


def test_folder_of_text_files(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    files = {"a.txt": "line one\r\nline two\r\n", "sub/b.md": "# Title\n\nSome *markdown*.", "c.txt": "third file"}
    for name, text in files.items():
        (tmp_path / "in" / name).write_text(text, newline="")
    (tmp_path / "in" / "skip.csv").write_text("not,text")
    prepare_here(f"--input={tmp_path / 'in'}", f"--out_dir={tmp_path / 'out'}", "--val_fraction=0.5")
    meta, train, val = load(tmp_path / "out")
    expected = [files["a.txt"], files["c.txt"], files["sub/b.md"]]  # one document per file, sorted by path
    if meta["split"] == "position":
        assert split_documents(np.concatenate([train, val])) == expected
    else:
        assert sorted(split_documents(train) + split_documents(val)) == sorted(expected)
    assert meta["documents"] == 3 and meta["source"] == "files" and len(meta["inputs"]) == 3


def test_invalid_utf8_replaced_and_counted(tmp_path):
    data = b"good \xff\xfe text \xe2\x82 end \xef\xbf\xbd already a replacement char\n"
    (tmp_path / "bad.txt").write_bytes(data)
    r = run(f"--input={tmp_path / 'bad.txt'}", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path / "out")
    text = data.decode("utf-8", "replace")
    assert enc.decode(np.concatenate([train, val]).tolist()) == text + "<|endoftext|>"
    assert meta["utf8_replaced"] == text.count("\ufffd") - data.count(b"\xef\xbf\xbd") == 3
    assert "3 sequences replaced" in r.stdout


def test_datasets_path_on_local_files(tmp_path, capsys):
    pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install datasets)")
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = [f"row {i}: " + "to be or not to be " * (i % 7) for i in range(50)]
    pq.write_table(pa.table({"id": list(range(50)), "body": docs}), tmp_path / "docs.parquet")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    for builder, path in (("parquet", "docs.parquet"), ("json", "docs.jsonl")):
        read = prepare.read_hub(path, "body", path=builder, data_files=str(tmp_path / path))
        assert [text for [text] in read] == docs
    prepare_here(f"--input={tmp_path / 'docs.parquet'}", "--text_field=body", f"--out_dir={tmp_path / 'out'}")
    meta, train, val = load(tmp_path / "out")
    assert (meta["split"], meta["documents"]) == ("document", 50)
    assert sorted(split_documents(train) + split_documents(val)) == sorted(docs)
    with pytest.raises(SystemExit):  # in this process: a datasets import costs seconds
        prepare_here(f"--input={tmp_path / 'docs.parquet'}", f"--out_dir={tmp_path / 'out2'}")
    assert "row 0 has no text in column 'text' (columns: id, body)" in capsys.readouterr().err


def test_missing_datasets_says_how_to_install(tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "datasets.py").write_text("raise ImportError('not installed')\n")
    (tmp_path / "x.parquet").write_bytes(b"")
    r = run(f"--input={tmp_path / 'x.parquet'}", f"--out_dir={tmp_path / 'out'}", env={"PYTHONPATH": str(tmp_path / "fake")})
    assert r.returncode == 1 and "pip install datasets" in r.stderr and "Traceback" not in r.stderr
    # a named corpus, which streams from the hub, also says how to give a local copy instead
    r = run("c4", f"--out_dir={tmp_path / 'out'}", env={"PYTHONPATH": str(tmp_path / "fake")})
    assert r.returncode == 1 and "pip install datasets" in r.stderr and "give the files with --input=PATH" in r.stderr
    assert not (tmp_path / "out").exists()


OFFLINE = "import socket\ndef _no(*a, **k):\n    raise OSError('no network in this test')\nsocket.socket.connect = _no\n"


def test_shakespeare_char_offline_from_the_shipped_text(tmp_path):
    # the README's first command, as a fresh clone runs it: no --input, no --out_dir, and no network (a
    # sitecustomize makes every connection fail). The text is the shipped copy of tiny Shakespeare, checked
    # against ../shared's; a second run is the same dataset again (idempotent), not "a different dataset"
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(OFFLINE)
    offline = {"PYTHONPATH": str(tmp_path / "offline"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    readme = lambda: subprocess.run([sys.executable, str(repo / "prepare.py"), "shakespeare_char"], cwd=tmp_path,
                                    capture_output=True, text=True, env={**os.environ, **offline})
    r = readme()
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "shakespeare_char"
    meta, train, val = load(out)
    text = shakespeare.read_text(encoding="utf-8")
    assert "".join(meta["chars"][i] for i in np.concatenate([train, val])) == text
    assert meta["inputs"] == [prepare.shakespeare_url] and (repo / "assets" / "tinyshakespeare.txt").stat().st_size == 1_115_394
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = readme()
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a file whose read fails instead
        path.unlink()
        path.symlink_to("/proc/self/mem")
    return path


bad_inputs = {  # name: (arguments, with {tmp} for the test folder; the message)
    "missing": (["--input={tmp}/nope.txt"], "nope.txt: no such file or folder"),
    "empty": (["--input={tmp}/empty.txt"], "no text in the input"),
    "empty folder": (["--input={tmp}/nothing"], "no .txt/.md/.jsonl/.parquet files in this folder"),
    "file type": (["--input={tmp}/data.csv"], "unsupported file type"),
    "unreadable": (["--input={tmp}/locked.txt"], "cannot read"),
    "jsonl field": (["--input={tmp}/nofield.jsonl"], "nofield.jsonl:2: no text field 'text' (its fields: content)"),
    "jsonl syntax": (["--input={tmp}/broken.jsonl"], "broken.jsonl:1: not valid JSON"),
    "vocab too big": (["--input={tmp}/manychars.txt", "--tokenizer=char"], "65,537 symbols; uint16 token files hold at most 65,536"),
    "unknown key": (["shakespeare", "--val_fracton=0.1"], "unknown setting --val_fracton (did you mean --val_fraction?)"),
    "unknown source": (["shakespear"], "unknown source shakespear (did you mean shakespeare?)"),
    "bad value": (["shakespeare", "--num_proc=two"], "--num_proc=two: not a Python literal"),
    "no out_dir": (["--input=x.txt"], "give --out_dir=DIR"),
    "tokenizer": (["shakespeare", "--tokenizer=bpe"], "--tokenizer=bpe: use gpt2, char, or the path of a Hugging Face model directory"),
}


@pytest.mark.parametrize("case", bad_inputs)
def test_bad_input_gets_a_message(tmp_path, case):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "data.csv").write_text("a,b\n")
    unreadable_file(tmp_path)
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "unclosed\n')
    (tmp_path / "manychars.txt").write_text("".join(chr(c) for c in range(0x100, 0x100 + 65537 + 2048) if not 0xD800 <= c <= 0xDFFF))
    args = [a.format(tmp=tmp_path) for a in bad_inputs[case][0]]
    if case != "no out_dir":
        args.append(f"--out_dir={tmp_path / 'out'}")
    r = run(*args)
    assert r.returncode == 1
    assert r.stderr.startswith("prepare.py: error: ") and "Traceback" not in r.stderr
    assert bad_inputs[case][1] in r.stderr
    assert not (tmp_path / "out").exists()  # a failed run leaves nothing behind


def test_a_failed_run_removes_the_folders_it_made_and_nothing_else(tmp_path):
    # out_dir and its missing parents go; a folder that was there before stays, with what it held
    (tmp_path / "empty.txt").write_text("")
    r = run(f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'new' / 'deeper' / 'out'}")
    assert r.returncode == 1 and "no text in the input" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    r = run(f"--input={tmp_path / 'empty.txt'}", f"--out_dir={tmp_path / 'mine'}")
    assert r.returncode == 1 and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_tokenizer_vocab_must_fit_uint16(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "gpt2", lambda: types.SimpleNamespace(n_vocab=100_277, eot_token=100_257))
    with pytest.raises(SystemExit) as e:
        prepare_here(f"--input={shakespeare}", f"--out_dir={tmp_path}")
    assert e.value.code == 1 and "100,277 symbols; uint16 token files hold at most 65,536" in capsys.readouterr().err


def test_out_dir_with_another_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first dataset")
    (tmp_path / "b.txt").write_text("second dataset")
    out = tmp_path / "out"
    assert run(f"--input={tmp_path / 'a.txt'}", f"--out_dir={out}").returncode == 0
    assert run(f"--input={tmp_path / 'a.txt'}", f"--out_dir={out}").returncode == 0  # the same one again: rewritten
    r = run(f"--input={tmp_path / 'b.txt'}", f"--out_dir={out}")
    assert r.returncode == 1 and "already holds a different dataset" in r.stderr and "--overwrite" in r.stderr
    assert enc.decode(np.concatenate(load(out)[1:]).tolist()) == "first dataset<|endoftext|>"  # untouched
    assert run(f"--input={tmp_path / 'b.txt'}", f"--out_dir={out}", "--overwrite").returncode == 0
    assert enc.decode(np.concatenate(load(out)[1:]).tolist()) == "second dataset<|endoftext|>"
    (out / "meta.json").unlink()  # e.g. nanoGPT's own .bin files: unknown, so kept
    r = run(f"--input={tmp_path / 'a.txt'}", f"--out_dir={out}")
    assert r.returncode == 1 and "train.bin/val.bin with no meta.json" in r.stderr


# ---- a Hugging Face tokenizer (tests/conftest.py's tiny byte-level BPE), prompt/response data ----------------

def hf_reference(tokenizer_dir):
    """The tokenizer as the `tokenizers` library itself encodes: no special tokens added or parsed."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def test_hugging_face_tokenizer_gives_its_own_tokens(tmp_path, tokenizer_dir):
    encode = hf_reference(tokenizer_dir)
    docs = ["First Citizen:\nBefore we proceed any further, hear me speak.",
            "a literal <|endoftext|> in a document is text", "caf\u00e9 \u65e5\u672c \U0001f600", "x" * 3000]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for args, name in ((f"--tokenizer={tokenizer_dir}", "dir"), (f"--tokenizer={tokenizer_dir / 'tokenizer.json'}", "file")):
        r = run(f"--input={tmp_path / 'docs.jsonl'}", args, f"--out_dir={tmp_path / name}", "--val_fraction=0.5",
                "--num_proc=2")
        assert r.returncode == 0, r.stderr
        meta, train, val = load(tmp_path / name)
        expected = [encode(d) + [0] for d in docs]  # <|endoftext|> is id 0
        assert sorted(split_tokens(train) + split_tokens(val)) == sorted(expected)
        assert (meta["vocab_size"], meta["eot_token"], meta["format"], meta["loss_mask"]) == (500, 0, "text", False)
        assert meta["tokenizer_file"] == str((tokenizer_dir / "tokenizer.json").resolve())
        assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, expected))
        assert not list((tmp_path / name).glob("*.mask"))
    # one big document: tokenized whole (no cuts), split by position
    r = run(f"--input={shakespeare}", f"--tokenizer={tokenizer_dir}", f"--out_dir={tmp_path / 'big'}")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path / "big")
    assert np.concatenate([train, val]).tolist() == encode(shakespeare.read_text()) + [0]


def split_tokens(tokens, eot=0):
    """A stream's documents as token lists, each ending with its end-of-text."""
    ends = np.flatnonzero(tokens == eot)
    return [tokens[s:e + 1].tolist() for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]


def test_prompt_response_tokens_and_loss_masks(tmp_path, tokenizer_dir):
    encode = hf_reference(tokenizer_dir)
    lines = [line for line in shakespeare.read_text().splitlines() if line.strip()][:600]
    records = [{"prompt": f"Line {i}: {a}\nNext:", "response": f" {b}"} for i, (a, b) in enumerate(zip(lines[::2], lines[1::2]))]
    records[3]["response"] = ""  # only the end-of-text is learned
    records[5]["prompt"] = "a <|endoftext|> in a prompt is text: "
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = run(f"--input={tmp_path / 'sft.jsonl'}", f"--tokenizer={tokenizer_dir}", f"--out_dir={tmp_path / 'out'}",
            "--val_fraction=0.2", "--num_proc=2")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path / "out")
    masks = [np.fromfile(tmp_path / "out" / f"{s}.mask", dtype=np.uint8) for s in ("train", "val")]
    assert len(masks[0]) == len(train) and len(masks[1]) == len(val)
    # each record, in input order, is next in train or in val: its prompt tokens unmasked, then its response
    # tokens and the end-of-text masked in
    streams, at = [(train, masks[0]), (val, masks[1])], [0, 0]
    for rec in records:
        p, q = encode(rec["prompt"]), encode(rec["response"])
        tokens, mask = p + q + [0], [0] * len(p) + [1] * (len(q) + 1)
        side = [s for s in (0, 1) if streams[s][0][at[s]:at[s] + len(tokens)].tolist() == tokens]
        assert len(side) == 1, rec
        assert streams[side[0]][1][at[side[0]]:at[side[0]] + len(tokens)].tolist() == mask
        at[side[0]] += len(tokens)
    assert at == [len(train), len(val)] and 0 < len(val) < len(train)
    assert (meta["format"], meta["loss_mask"], meta["documents"]) == ("prompt_response", True, len(records))
    assert meta["train_loss_tokens"] + meta["val_loss_tokens"] == sum(len(encode(r["response"])) + 1 for r in records)
    assert meta["train_loss_tokens"] == int(masks[0].sum())
    # too few records for a document split: tokens and masks are cut at the same place
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    r = run(f"--input={tmp_path / 'two.jsonl'}", f"--tokenizer={tokenizer_dir}", f"--out_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stderr
    meta, train, val = load(tmp_path / "two")
    mask = np.concatenate([np.fromfile(tmp_path / "two" / f"{s}.mask", dtype=np.uint8) for s in ("train", "val")])
    p, q = encode(records[0]["prompt"]), encode(records[0]["response"])
    assert meta["split"] == "position" and mask[:len(p) + len(q) + 1].tolist() == [0] * len(p) + [1] * (len(q) + 1)
    assert len(mask) == len(train) + len(val) and mask.sum() == meta["train_loss_tokens"] + meta["val_loss_tokens"]
    # the same out_dir rewritten as plain text loses its masks
    (tmp_path / "plain.txt").write_text("just text")
    assert run(f"--input={tmp_path / 'plain.txt'}", f"--out_dir={tmp_path / 'two'}", "--overwrite").returncode == 0
    assert not list((tmp_path / "two").glob("*.mask"))


@pytest.mark.parametrize("case,files,args,message", [
    ("no response", {"a.jsonl": '{"prompt": "p", "response": "r"}\n{"prompt": "only a prompt"}\n'}, [],
     "a.jsonl:2: a prompt/response record needs text in 'prompt' and 'response', but 'response' is missing "
     "(its fields: prompt)"),
    ("null response", {"a.jsonl": '{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": null}\n'}, [],
     "a.jsonl:2: a prompt/response record needs text in 'prompt' and 'response', but 'response' is null "
     "(its fields: prompt, response)"),
    ("number prompt", {"a.jsonl": '{"prompt": "p", "response": "r"}\n{"prompt": 7, "response": "r"}\n'}, [],
     "a.jsonl:2: a prompt/response record needs text in 'prompt' and 'response', but 'prompt' is a number"),
    ("pair among text", {"a.jsonl": '{"text": "t"}\n{"prompt": "p", "response": "r"}\n'}, [],
     "a.jsonl:2: a prompt/response record among plain-text records"),
    ("text among pairs", {"a.jsonl": '{"prompt": "p", "response": "r"}\n{"text": "t"}\n'}, [],
     "a.jsonl:2: a prompt/response record needs text in 'prompt' and 'response', but 'prompt' is missing and "
     "'response' is missing (its fields: text)"),
    ("mixed files", {"a.jsonl": '{"prompt": "p", "response": "r"}\n', "b.txt": "plain"}, [],
     "a.jsonl holds prompt/response records but"),
    ("no tokenizer.json", {"a.txt": "x"}, ["--tokenizer={tmp}/notok"], "notok: no tokenizer.json in this folder"),
    ("no tokenizer path", {"a.txt": "x"}, ["--tokenizer={tmp}/nowhere/mpt-7b"], "mpt-7b: no such file or folder"),
    ("broken tokenizer.json", {"a.txt": "x"}, ["--tokenizer={tmp}/bad.json"], "bad.json: not a tokenizer.json"),
    ("char pairs", {"a.jsonl": '{"prompt": "p", "response": "r"}\n'}, ["--tokenizer=char"],
     "prompt/response data needs an end-of-text token"),
    ("vocab past uint16", {"a.txt": "x"}, ["--tokenizer={tmp}/big.json"],
     "vocabulary has 70,000 symbols; uint16 token files hold at most 65,536"),
])
def test_prompt_response_and_tokenizer_bad_input(tmp_path, tokenizer_dir, case, files, args, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text("{}")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    if case == "vocab past uint16":  # a word-level tokenizer with 70,000 ids, <|endoftext|> the last
        from tokenizers import Tokenizer, models
        vocab = {f"w{i}": i for i in range(69_999)} | {"<|endoftext|>": 69_999}
        Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    for name, text in files.items():
        (tmp_path / "in" / name).write_text(text)
    tok = [a.format(tmp=tmp_path) for a in args] or [f"--tokenizer={tokenizer_dir}"]
    r = run(f"--input={tmp_path / 'in'}", *tok, f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 1 and r.stderr.startswith("prepare.py: error: ") and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


FAKE_TASKS = '''
def load_dataset(path, name=None, split=None):
    if path == "Rowan/hellaswag" and split == "validation":
        return [dict(activity_label="Baking", ctx_a="A man mixes flour.", ctx_b="he", ctx="A man mixes flour. he",
                     endings=["bakes bread.", "swims.", "sings.", "flies."], label="0")]
    if path == "EleutherAI/lambada_openai" and split == "test":
        return [dict(text="the cat sat on the mat")]
    raise ConnectionError("no network in this test")
'''


@pytest.mark.parametrize("task", ["hellaswag", "lambada"])
def test_task_sources_write_what_eval_py_reads(tmp_path, task):
    # prepare.py hellaswag|lambada: the public split (here a fake datasets module) as eval.py's .jsonl, read back by
    # eval.py's own reader; offline, one line that says how to give a local copy
    import eval as ev
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "datasets.py").write_text(FAKE_TASKS)
    r = run(task, f"--out_dir={tmp_path / 'tasks'}", env={"PYTHONPATH": str(tmp_path / "fake")})
    assert r.returncode == 0, r.stderr
    (written,) = (tmp_path / "tasks").iterdir()
    items = ev.read_task(str(written))["items"]
    if task == "hellaswag":
        assert [i["gold"] for i in items] == [0] and items[0]["context"] == "Baking: A man mixes flour. He"
    else:
        assert items[0]["context"] == "the cat sat on the" and items[0]["choices"] == [" mat"]
    (tmp_path / "fake" / "datasets.py").write_text("def load_dataset(*a, **k):\n    raise ConnectionError('offline')\n")
    r = run(task, f"--out_dir={tmp_path / 'again'}", env={"PYTHONPATH": str(tmp_path / "fake")})
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "give it to eval.py as --tasks=" in r.stderr and not (tmp_path / "again").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_leaves_nothing(tmp_path, sig, code):
    # SIGTERM as Ctrl-C: one line, the usual exit status (128 + the signal), and nothing left of the run: not its
    # token files' .tmp, not the out_dir it made
    text = shakespeare.read_text(encoding="utf-8")
    (tmp_path / "big.txt").write_text(text * 40)  # ~45 MB: long enough to be caught mid-run
    out = tmp_path / "new" / "out"
    proc = subprocess.Popen([sys.executable, str(repo / "prepare.py"), f"--input={tmp_path / 'big.txt'}",
                             f"--out_dir={out}", "--num_proc=1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    partial = out.parent / ".out.prepare-tmp" / "train.bin.tmp"  # written beside out_dir, swapped in at the end
    while not partial.exists() or partial.stat().st_size < 1 << 20:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in stderr, stderr[-2000:]
    assert [line for line in stderr.splitlines() if "error" in line] == [
        f"prepare.py: error: {'SIGTERM' if sig == signal.SIGTERM else 'interrupted (Ctrl-C)'}; nothing was written"]
    assert not (tmp_path / "new").exists()


def test_binary_input_a_folders_skipped_files_and_an_offline_gpt2_are_one_line(tmp_path, monkeypatch):
    # an ELF binary named .txt, or text with over 1% invalid UTF-8: refused (one line) unless --binary_ok=True;
    # a folder input names what it skipped; offline with the default GPT-2 BPE: one line saying what to do
    elf = tmp_path / "tool.txt"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\0" + bytes(range(256)) * 40)
    r = run(f"--input={elf}", f"--out_dir={tmp_path / 'out'}", "--tokenizer=char")
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{elf} looks binary (a NUL byte" in r.stderr and "--binary_ok=True" in r.stderr
    assert not (tmp_path / "out").exists()
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("é à ü ".encode("latin-1") * 2000)
    r = run(f"--input={latin}", f"--out_dir={tmp_path / 'out'}", "--tokenizer=char")
    assert r.returncode == 1 and "invalid UTF-8 sequences" in r.stderr and "looks binary" in r.stderr, r.stderr
    r = run(f"--input={elf}", f"--out_dir={tmp_path / 'out'}", "--tokenizer=char", "--binary_ok=True")
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(shakespeare.read_text()[:20_000])
    (folder / "sub" / "slides.pdf").write_bytes(b"%PDF")
    (folder / "logo.png").write_bytes(b"\x89PNG")
    r = run(f"--input={folder}", f"--out_dir={tmp_path / 'notes_out'}", "--tokenizer=char")
    assert r.returncode == 0, r.stderr
    assert f"note: {folder}: 2 file(s) skipped, not .txt/.md/.jsonl/.parquet: logo.png, sub/slides.pdf" in r.stderr
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(OFFLINE)
    r = run(f"--input={folder / 'a.txt'}", f"--out_dir={tmp_path / 'gpt2'}",
            env={"PYTHONPATH": str(tmp_path / "offline"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "set TIKTOKEN_CACHE_DIR to a tiktoken cache" in r.stderr and "--tokenizer=PATH" in r.stderr
    assert len(r.stderr) < 400 and not (tmp_path / "gpt2").exists()


def test_a_full_disk_is_one_line_that_says_so(tmp_path, monkeypatch, capsys):
    # numpy's tofile on a full disk says only "N requested and M written": the line says the disk is full, where,
    # and how much is free; nothing of the run is left
    (tmp_path / "a.txt").write_text(shakespeare.read_text()[:50_000])
    # the tokenizer's output as train/val token arrays whose tofile fails
    monkeypatch.setattr(prepare, "tokenize_all", lambda *a, **k: iter([([FullArray([1, 2]), FullArray([3])], None,
                                                                         [1, 0], 3)]))
    with pytest.raises(SystemExit):
        prepare.prepare(prepare.configured([f"--input={tmp_path / 'a.txt'}", f"--out_dir={tmp_path / 'out'}",
                                            "--tokenizer=char"]))
    err = capsys.readouterr().err
    assert re.fullmatch(rf"prepare\.py: error: disk full while writing {re.escape(str(tmp_path / 'out'))}: [\d.]+ "
                        rf"[kMGT]?B(ytes)? free with the partial files removed; nothing was written: free some space.*\n",
                        err), err
    assert not (tmp_path / "out").exists()


class FullArray:
    """Token ids whose tofile fails as numpy's does on a full disk."""
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def tofile(self, f):
        raise OSError("635418 requested and 622177 written")


def race_setup(tmp_path, existing):
    """The racing runs' command (a 13 MB input, --overwrite=True) and out_dir; with existing, out_dir already
    holds a dataset and the user's own notes.txt."""
    text = shakespeare.read_text(encoding="utf-8")
    (tmp_path / "big.txt").write_text(text * 12)
    out = tmp_path / "out"
    cmd = [sys.executable, str(repo / "prepare.py"), f"--input={tmp_path / 'big.txt'}", f"--out_dir={out}",
           "--num_proc=1", "--overwrite=True"]
    if existing:
        (tmp_path / "small.txt").write_text(text[:50_000])
        assert run(f"--input={tmp_path / 'small.txt'}", f"--out_dir={out}").returncode == 0
        (out / "notes.txt").write_text("mine")  # the user's own file in the dataset's folder
    return cmd, out


def assert_whole_and_alone(tmp_path, out, existing):
    """out_dir's dataset agrees with its meta.json, and nothing else is left beside it or in it."""
    meta, train, val = load(out)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert all(common.file_crc(out / name) == v for name, v in meta["files"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.txt", "out"] + ["small.txt"] * existing)
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json", "train.bin", "val.bin"] + ["notes.txt"] * existing)


@pytest.mark.parametrize("existing", [False, True])
def test_two_prepares_into_one_out_dir(tmp_path, existing):
    # the same command started twice on one out_dir (two nodes over a shared filesystem, say), fresh or holding a
    # dataset (--overwrite): the second, started while the first writes, is refused in one line naming the
    # first's pid; the first's dataset is whole (its files agree with meta.json) and nothing else is left beside it
    cmd, out = race_setup(tmp_path, existing)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial, deadline = tmp_path / ".out.prepare-tmp" / "train.bin.tmp", time.time() + 120
    while not partial.exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.02)
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"{out} is in use by another run (host " in second.stderr and f"pid {first.pid}," in second.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_whole_and_alone(tmp_path, out, existing)


@pytest.mark.parametrize("existing", [False, True])
def test_two_prepares_started_at_once_by_threads(tmp_path, existing):
    # the race at its tightest: two threads start the same command at the same instant (a barrier), so neither
    # is yet writing when the other starts. One run takes out_dir; the other is refused in one line, or (had the
    # first already finished) redoes it whole; either way the dataset agrees with meta.json and nothing is left
    cmd, out = race_setup(tmp_path, existing)
    barrier, results = threading.Barrier(2), [None, None]

    def race(i):
        barrier.wait()
        results[i] = subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.returncode for r in results) in ([0, 1], [0, 0]), [r.stderr for r in results]
    for r in results:
        if r.returncode:
            assert len(r.stderr.strip().splitlines()) == 1 and f"{out} is in use by another run (host " in r.stderr
    assert_whole_and_alone(tmp_path, out, existing)
