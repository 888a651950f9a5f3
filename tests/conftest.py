"""Shared pytest setup: import path, offline settings and the tiktoken cache."""
import os
import sys
from pathlib import Path

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
