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
