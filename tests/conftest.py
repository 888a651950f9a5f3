"""Shared pytest setup: import path, offline settings and the tiktoken cache."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Never touch the network from tests; keep transformers quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Point tiktoken at the shared offline cache (../shared/tiktoken_cache) unless already set.
_shared_cache = REPO_ROOT.parent / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _shared_cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared_cache)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, run only with RUN_SLOW=1")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny in-process models gain nothing from intra-op threads, and threads make them crawl on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturb_(module, seed, scale=0.1):
    """Add scale*randn to every parameter (so LayerNorm gains/biases etc. are nontrivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module
