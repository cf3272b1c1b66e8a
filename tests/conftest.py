"""Test-wide settings: no network, and the Triton kernels run on the CPU."""
import os
from pathlib import Path

import torch

# ../shared/tiktoken beside the checkout holds GPT-2's BPE ranks, so tiktoken needs no download
_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when @triton.jit runs, i.e. when triton and model.py are
    # imported, so the variable must be set before the first import. Then the setting moves from the
    # environment into Triton's knob (read again at launch), so that the scripts the tests start
    # (train.py, sample.py) do not inherit it and take their fast CPU fallback, attn_impl='torch'.
    os.environ["TRITON_INTERPRET"] = "1"
    import triton  # noqa: E402
    import model  # noqa: F401,E402
    triton.knobs.runtime.interpret = True
    del os.environ["TRITON_INTERPRET"]


# ---- a tiny "released" MPT, standing in for mpt-7b: transformers' MptForCausalLM and its own BPE -----------

import json  # noqa: E402

import pytest  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
RELEASED = dict(tokenizer_vocab=500, vocab_size=512, d_model=256, n_heads=4, n_layers=2, max_seq_len=64)


def build_tokenizer(path, vocab_size=RELEASED["tokenizer_vocab"]):
    """A byte-level BPE as gpt-neox-20b's (MPT's) is, trained here on tiny Shakespeare, with
    <|endoftext|> as id 0 and the eos: a tokenizer.json that prepare.py and sample.py read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(SHAKESPEARE)], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "tokenizer_class": "GPTNeoXTokenizer"}))
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A folder holding just the tiny BPE's tokenizer.json and tokenizer_config.json."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def released_mpt(tmp_path_factory):
    """A save_pretrained directory as a downloaded MPT is: config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json. The model's vocab (512) is padded past the tokenizer's (500), as MPT-7B's
    50,432 is past gpt-neox's 50,277; d_model 256 so that NF4's 64-value blocks and 256-block scales
    split evenly over 2 processes."""
    import transformers
    path = tmp_path_factory.mktemp("released_mpt")
    build_tokenizer(path)
    torch.manual_seed(0)
    cfg = {k: v for k, v in RELEASED.items() if k != "tokenizer_vocab"}
    config = transformers.MptConfig(**cfg, expansion_ratio=4, no_bias=True, eos_token_id=0)
    transformers.MptForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def released_sft(released_mpt, tmp_path_factory):
    """prepare.py's prompt/response dataset in the released model's tokenizer: each record asks for the
    line of tiny Shakespeare that follows another. Returns the data_dir."""
    import subprocess
    import sys
    path = tmp_path_factory.mktemp("released_sft")
    lines = [line for line in SHAKESPEARE.read_text().splitlines() if line.strip()][:4000]
    records = [{"prompt": f"{a}\n", "response": b} for a, b in zip(lines[::2], lines[1::2])]
    (path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "prepare.py"),
                        f"--input={path / 'sft.jsonl'}", f"--tokenizer={released_mpt}", f"--out_dir={path / 'data'}",
                        "--num_proc=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return path / "data"
