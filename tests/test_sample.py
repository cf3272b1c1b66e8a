"""Generation (model.generate) and sample.py, against recomputation and transformers' generate."""
import pytest
import torch

from model import MPT, MPTConfig, sample_next


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, d_model=48, n_heads=6, n_layers=2, max_seq_len=32, attn_impl='torch')
    model = MPT(MPTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # sharper distributions than the init's, so greedy choices are not near-ties
        model.transformer.wte.weight.mul_(3)
    return model


def greedy_by_recomputing(model, prompt, n):
    seq = torch.tensor(prompt)
    for _ in range(n):
        logits, _ = model(seq[None])
        seq = torch.cat([seq, logits[0, -1].argmax().view(1)])
    return seq


@pytest.mark.parametrize("kv_n_heads", [None, 2])
def test_cached_greedy_equals_recomputing_every_step(kv_n_heads):
    model = tiny_model(kv_n_heads=kv_n_heads)
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    out = model.generate(prompts, 70, temperature=0, max_len=96)
    for prompt, got in zip(prompts, out):
        assert torch.equal(got, greedy_by_recomputing(model, prompt, 70))
    # a (B, T) tensor of equal-length prompts takes the unpadded path
    batch = torch.tensor([[5, 17, 3], [9, 9, 1]])
    out = model.generate(batch, 64, temperature=0, max_len=96)
    assert out.shape == (2, 67)
    assert torch.equal(out[1], greedy_by_recomputing(model, [9, 9, 1], 64))


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=48, n_heads=6, n_layers=2, max_seq_len=128, vocab_size=97)
    hf = transformers.MptForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ours = MPT.from_hf(tmp_path, attn_impl='torch').eval()
    for prompt in ([3, 14, 15, 92, 65], [7]):
        idx = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(idx, max_new_tokens=64, do_sample=False, min_new_tokens=64,
                              attention_mask=torch.ones_like(idx), pad_token_id=0)
        assert torch.equal(ours.generate(idx, 64, temperature=0), ref)


def test_eos_stops_and_cuts_rows():
    model = tiny_model()
    free = model.generate([[5, 17, 3], [42, 1]], 20, temperature=0, max_len=64)
    eos = int(free[0][5])  # the third generated token of row 0 becomes the end-of-text token
    out = model.generate([[5, 17, 3], [42, 1]], 20, temperature=0, eos_token=eos, max_len=64)
    first = int((free[0][3:] == eos).nonzero()[0])
    assert torch.equal(out[0], free[0][:3 + first + 1])
    ends = (free[1][2:] == eos).nonzero()
    assert torch.equal(out[1], free[1][:2 + int(ends[0]) + 1] if len(ends) else free[1])


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    a = model.generate([[1, 2, 3]], 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    b = model.generate([[1, 2, 3]], 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    c = model.generate([[1, 2, 3]], 25, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


def test_top_k_and_top_p_never_pick_outside_their_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 2
    probs = torch.softmax(logits, dim=-1)
    top5 = torch.topk(logits, 5).indices
    sorted_p, order = torch.sort(probs, descending=True)
    nucleus = [set(order[r, :int((sorted_p[r].cumsum(0) < 0.6).sum()) + 1].tolist()) for r in range(4)]
    for _ in range(300):
        k = sample_next(logits, 1.5, top_k=5, generator=g)
        assert all(k[r] in top5[r] for r in range(4))
        p = sample_next(logits, 1.0, top_p=0.6, generator=g)
        assert all(int(p[r]) in nucleus[r] for r in range(4))
    assert torch.equal(sample_next(logits, 0), logits.argmax(-1))


def test_generate_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_len=32"):
        model.generate([[1] * 30], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([[1, 200]], 5)
    with pytest.raises(ValueError, match="needs .* GiB but only"):
        model.generate([[1]], 5, max_len=10 ** 12)


# ---- sample.py end to end ---------------------------------------------------

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHARS = "\n !abcdefghijklmnopqrstuvwxyz"


def run_sample(*args):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken")}
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def write_char_checkpoint(tmp_path):
    model = tiny_model(vocab_size=len(CHARS))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": len(CHARS), "chars": CHARS}))
    out = tmp_path / "out"
    out.mkdir()
    # saved as trained on a GPU, attn_impl='triton': on the CPU sample.py falls back (its note must stay off stdout)
    torch.save({"model": model.state_dict(), "config": {**dataclasses.asdict(model.config), "attn_impl": "triton"},
                "settings": {"data_dir": str(data_dir)}, "iter_num": 0}, out / "ckpt.pt")
    return model, out


def test_sample_py_char_checkpoint_greedy_matches_generate(tmp_path):
    model, out = write_char_checkpoint(tmp_path)
    r = run_sample(f"--out_dir={out}", "--start=to be", "--num_samples=1", "--max_new_tokens=20",
                   "--temperature=0", "--device=cpu", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    ids = [CHARS.index(c) for c in "to be"]
    expected = "".join(CHARS[i] for i in model.generate([ids], 20, temperature=0)[0].tolist())
    assert r.stdout.startswith(expected + "\n")
    assert "tokenizer: characters (29)" in r.stderr and "tokens/s" in r.stderr
    assert "using attn_impl='torch' on CPU" in r.stderr


def test_sample_py_hugging_face_directory_with_gpt2_tokenizer(tmp_path):
    model = tiny_model(vocab_size=50304, d_model=32, n_heads=4)
    model.save_hf(tmp_path / "hf")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello, world")
    r = run_sample(f"--init_from={tmp_path / 'hf'}", f"--start=FILE:{prompt}", "--num_samples=2",
                   "--max_new_tokens=8", "--device=cpu", "--dtype=float32", "--top_p=0.9")
    assert r.returncode == 0, r.stderr
    assert "GPT-2 BPE" in r.stderr and r.stdout.count("Hello, world") == 2


def test_sample_py_clear_errors(tmp_path):
    r = run_sample(f"--out_dir={tmp_path}")
    assert r.returncode != 0 and "no checkpoint at" in r.stderr and "Traceback" not in r.stderr
    _, out = write_char_checkpoint(tmp_path)
    r = run_sample(f"--out_dir={out}", "--start=" + "a" * 40, "--device=cpu", "--max_len=32")
    assert r.returncode != 0 and "the prompt is 40 tokens, the context allows 32" in r.stderr
    r = run_sample(f"--out_dir={out}", "--start=ABC", "--device=cpu")
    assert r.returncode != 0 and "outside this model's vocabulary" in r.stderr
    (tmp_path / "data" / "meta.json").unlink()  # the char model now meets the GPT-2 tokenizer
    r = run_sample(f"--out_dir={out}", "--device=cpu")
    assert r.returncode != 0 and "trained with another tokenizer" in r.stderr and "Traceback" not in r.stderr
    # train.py saves ckpt.pt with a CRC-32 of its tensors (checkpoints.state_crc): weights changed since are refused
    ckpt = torch.load(out / "ckpt.pt")
    crc = checkpoints.state_crc(ckpt["model"])
    ckpt["model"]["transformer.wte.weight"][3, 5] += 1
    torch.save({**ckpt, "crc32": crc}, out / "ckpt.pt")
    r = run_sample(f"--out_dir={out}", "--device=cpu")
    assert r.returncode == 1 and "ckpt.pt is damaged: its weights do not match the checksum" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_sample(f"--out_dir={out}", "--device=cpu")
    assert r.returncode != 0 and "is not a checkpoint written by train.py" in r.stderr


def test_sample_py_uses_the_tokenizer_the_run_recorded(tmp_path, tokenizer_dir):
    # a checkpoint whose data prepare.py made with --tokenizer=<a Hugging Face tokenizer>: meta.json's
    # tokenizer_file encodes the prompt and decodes the sample, eot_token ends it
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    model = tiny_model(vocab_size=512)
    meta = {"tokenizer": str(tokenizer_dir), "tokenizer_file": str(tokenizer_dir / "tokenizer.json"),
            "vocab_size": 500, "eot_token": 0}
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "meta": meta,
                "settings": {}, "iter_num": 0}, out / "ckpt.pt")
    prompt = "ROMEO:\nWhat light"
    r = run_sample(f"--out_dir={out}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=12",
                   "--temperature=0", "--device=cpu", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    ids = tok.encode(prompt, add_special_tokens=False).ids
    new = model.generate([ids], 12, temperature=0, eos_token=0)[0][len(ids):].tolist()
    new = new[:-1] if new and new[-1] == 0 else new
    assert r.stdout.startswith(prompt + tok.decode(new) + "\n") and len(new) > 3
    assert f"tokenizer: {tokenizer_dir / 'tokenizer.json'}" in r.stderr
    meta["tokenizer_file"] = str(tmp_path / "gone" / "tokenizer.json")
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.config), "meta": meta,
                "settings": {}, "iter_num": 0}, out / "ckpt.pt")
    r = run_sample(f"--out_dir={out}", "--device=cpu")
    assert r.returncode == 1 and "gone/tokenizer.json, which is not there any more" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1


# ---- settings and messages: one line each, at the right moment ---------------------------------------

OFFLINE = "import socket\ndef _no(*a, **k):\n    raise OSError('no network in this test')\nsocket.socket.connect = _no\n"


def test_sample_py_bad_settings_and_tokenizers_are_one_line_each(tmp_path):
    # all at once (each run is mostly torch's import): settings checked before anything loads, a char-level
    # model exported to a Hugging Face directory (no tokenizer.json, no meta.json), and GPT-2's BPE offline
    model, out = write_char_checkpoint(tmp_path)
    model.save_hf(tmp_path / "char_hf")
    tiktoken_model = tiny_model(vocab_size=50304, d_model=32, n_heads=4)
    tiktoken_model.save_hf(tmp_path / "bpe_hf")
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "sitecustomize.py").write_text(OFFLINE)
    offline = {**os.environ, "PYTHONPATH": str(tmp_path / "offline"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    cuda_line = ("device='gpu': use 'cpu', 'cuda' or 'cuda:N'" if torch.cuda.is_available() else
                 "device='cuda' but this torch (")
    runs = {
        "settings": ([f"--out_dir={tmp_path / 'nowhere'}", "--max_new_tokens=0", "--top_k=0", "--temperature=-1",
                      "--top_p=1.5", "--device=" + ("gpu" if torch.cuda.is_available() else "cuda")], None,
                     ["max_new_tokens=0: use a whole number >= 1 (per sample;", "top_k=0: use a whole number >= 1",
                      "temperature=-1.0: use a number >= 0", "top_p=1.5: use a probability in (0, 1]", cuda_line]),
        "char export": ([f"--init_from={tmp_path / 'char_hf'}", "--device=cpu"], offline,
                        [f"{tmp_path / 'char_hf'} records no tokenizer (no meta.json, no tokenizer.json) and its 29 ids "
                         f"are too few for GPT-2's BPE: it was trained with another tokenizer"]),
        "offline bpe": ([f"--init_from={tmp_path / 'bpe_hf'}", "--device=cpu"], offline,
                        ["GPT-2's BPE (tiktoken r50k_base) cannot be loaded (", "offline, set TIKTOKEN_CACHE_DIR"]),
    }
    procs = {name: subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, text=True, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, env, _) in runs.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if not line.startswith(("override:", "tokenizer:"))]
        expected = runs[name][2]
        assert proc.returncode == 1 and not stdout and "Traceback" not in stderr, (name, stderr)
        if name == "offline bpe":
            assert len(lines) == 1 and all(part in lines[0] for part in expected), stderr
        else:
            assert len(lines) == len(expected), (name, stderr)
            assert all(line.startswith("error: " + e) for line, e in zip(lines, expected)), (name, stderr)


def test_sample_py_notes_come_before_the_sample(tmp_path):
    # the checkpoint says attn_impl='triton'; on the CPU the first forward falls back to 'torch' with a note
    # on stderr. With stdout and stderr in one stream (a terminal), the note comes before the prompt, not in it
    _, out = write_char_checkpoint(tmp_path)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken")}
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--start=to be", "--num_samples=2",
                        "--max_new_tokens=10", "--device=cpu"], cwd=ROOT, text=True, env=env, timeout=120,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    lines = r.stdout.splitlines()
    note = lines.index("note: attn_impl='triton' needs a CUDA device; using attn_impl='torch' on CPU")
    samples = [i for i, line in enumerate(lines) if line.startswith("to be")]
    assert len(samples) == 2 and note < samples[0]
    assert all(line.startswith(("override:", "tokenizer:")) for line in lines[:note])  # nothing of a sample before it


def test_generate_draws_only_the_tokenizers_ids():
    # MPT pads its vocabulary past its tokenizer's (50432 vs 50277): generate(vocab=n) never draws a padding id,
    # which would decode to nothing; a model that favours the padding ids shows it
    model = tiny_model(vocab_size=64, d_model=32, n_heads=4)
    with torch.no_grad():
        model.transformer.wte.weight[48:] *= 50  # the tied head: padding ids 48..63 get the largest logits
    free = model.generate([[1, 2, 3]], 25, temperature=1.0, generator=torch.Generator().manual_seed(0))[0][3:]
    assert (free >= 48).any()
    kept = model.generate([[1, 2, 3]], 25, temperature=1.0, generator=torch.Generator().manual_seed(0), vocab=48)[0][3:]
    assert (kept < 48).all() and len(kept) == 25
