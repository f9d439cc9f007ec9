"""tinylora: fine-tune language models by training a handful of numbers (TinyLoRA, arXiv 2602.04118)."""

__version__ = "0.1.0"

from .adapter import Adapter, attach  # noqa: E402
from .config import DEFAULT_TARGETS, AdapterConfig  # noqa: E402
from .io import load_adapter, read_adapter_file, save_adapter  # noqa: E402

__all__ = ["Adapter", "AdapterConfig", "DEFAULT_TARGETS", "attach", "load_adapter", "read_adapter_file",
           "save_adapter", "__version__"]
