"""Where tinylora keeps what it derives from a base model (SVD factors, converted embedded models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """tinylora's cache folder: $TINYLORA_CACHE, else ~/.cache/tinylora."""
    return Path(os.environ.get("TINYLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinylora"))
