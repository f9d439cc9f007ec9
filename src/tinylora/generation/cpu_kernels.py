"""Two detours around slow PyTorch CPU paths at the engine's shapes.

- Decode attention. transformers' SDPA path hands an unmasked decode step (no row padded: the usual case for a
  long-lived batch) to `scaled_dot_product_attention(..., enable_gqa=True)`, which CUDA runs well; PyTorch's CPU
  kernel then attends one query head at a time, reading every row's keys and values once per query head (7 times
  on the default model). With a mask, transformers already folds a decode step's query heads into their key/value
  head, [n, kv_heads·groups, 1, d] -> [n, kv_heads, groups, d]: one pass over the keys and values. `decode_sdpa`
  takes that path with or without a mask; everything else is transformers' SDPA unchanged. The same computation
  in another summation order: the engine takes it in its step API (the server), not in `generate` (rollouts and
  evaluation keep the order their recorded results were computed in).
- The output head. A prefill keeps the last position's hidden state, hidden[:, -1:, :]: a [rows, 1, d] view
  that `F.linear` cannot fold into one matrix product, so it runs a batched product over the head's weight
  expanded per row, which the CPU kernel copies first in bf16: 32 rows of the default model's 151,936 × 896
  head is an 8.7 GB copy, 30 s, against 0.15 s for a contiguous input (fp32: 0.8 s). The head's input is made
  contiguous, everywhere: packed fp32 weights (the default on a CPU) compute the same bits either way.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "tinylora_decode_sdpa"


def decode_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """query [n, heads, q, d], key and value [n, kv_heads, L, d] -> ([n, q, heads, d], None), as transformers'
    attention functions; one query per row on a CPU with grouped heads and no mask runs folded."""
    groups = getattr(module, "num_key_value_groups", 1)
    n, heads, q, d = query.shape
    if q != 1 or groups == 1 or attention_mask is not None or query.device.type != "cpu" or kwargs.get(
            "position_bias") is not None or kwargs.get("softcap") is not None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    folded = query.reshape(n, heads // groups, groups, d)  # [n, kv_heads, groups, d]: a group's queries share K, V
    out = F.scaled_dot_product_attention(folded, key, value, scale=scaling)  # [n, kv_heads, groups, d]
    return out.reshape(n, 1, heads, d), None  # heads in the order kv_head·groups + group, as the model's


ALL_ATTENTION_FUNCTIONS.register(NAME, decode_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks SDPA takes


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])  # [rows, 1, d]: a copy of d numbers per row


@contextlib.contextmanager
def contiguous_head(model):
    """Inside: on a CPU, the output head's input made contiguous (bit for bit what packed weights compute)."""
    head = model.get_output_embeddings()
    if head is None or next(model.parameters()).device.type != "cpu":
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous_input)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def folded_decode(model):
    """Inside: on a CPU, a model whose attention is SDPA runs `decode_sdpa`; restored after."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
