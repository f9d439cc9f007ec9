"""tinylora: fine-tune language models by training a handful of numbers (TinyLoRA, arXiv 2602.04118)."""

from .adapter import Adapter, attach
from .config import DEFAULT_TARGETS, AdapterConfig
from .io import load_adapter, read_adapter_file, save_adapter
from .version import __version__

__all__ = ["Adapter", "AdapterConfig", "DEFAULT_TARGETS", "attach", "load_adapter", "read_adapter_file",
           "save_adapter", "__version__"]
