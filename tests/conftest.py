"""Test-wide settings: tests never touch the network."""
import os
from pathlib import Path

# ../shared/tiktoken beside the checkout holds GPT-2's BPE ranks, so tiktoken needs no download
_cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if _cache.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_cache))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
