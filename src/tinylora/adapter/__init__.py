"""The adapter: which layers it adapts and how they are tied (plan), their frozen SVD factors (svd), and the
forward hooks that add each method's ΔW x to the base model (model)."""

from .model import Adapter, Factors, attach

__all__ = ["Adapter", "Factors", "attach"]
