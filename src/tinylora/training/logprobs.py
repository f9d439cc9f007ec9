"""Training log-probs of completions: every completion token's log π under the current adapter, with autograd.

GRPO groups forward their prompt once for their G samples (`group_logprobs`)."""

from __future__ import annotations

import torch

from ..generation.kv import prefill, with_cache
from .grpo import token_logprobs


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log π(completion token) for every completion position: [N, P + C] → [N, C].

    Position ids follow the attention mask, as in generate(), so left padding does not shift them;
    only the completion's logits are materialised (the prompt's would be thrown away).
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [N, P + C]
    C = input_ids.shape[1] - prompt_len
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=C + 1).logits  # [N, C + 1, V]
    return token_logprobs(logits[:, :-1], input_ids[:, prompt_len:], temperature)  # [N, C]


def group_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                   completion_att: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`sequence_logprobs` for GRPO groups, with each prompt forwarded once instead of G times.

    prompt_ids/prompt_mask [b, P] (left-padded), completion_ids/completion_att [b·G, C] (G rows per
    prompt, in order) → [b·G, C], through `prefill`: gradients from all G flow back through one prompt
    pass. Prompts are most of the tokens in a short-answer task (77 of ~95 on the default one).
    """
    G = completion_ids.shape[0] // prompt_ids.shape[0]
    C = completion_ids.shape[1]
    logits, cache, mask, pos = prefill(model, prompt_ids, prompt_mask, G)  # [N, 1, V] predicts completion token 0
    if C > 1:
        mask = torch.cat([mask, completion_att[:, :-1]], dim=1)  # [N, P + C - 1]
        cpos = pos[:, -1:] + 1 + torch.arange(C - 1, device=pos.device)  # [N, C - 1]
        rest = model(input_ids=completion_ids[:, :-1], attention_mask=mask, position_ids=cpos,
                     **with_cache(model, cache)).logits  # [N, C - 1, V] predict completion tokens 1..C-1
        logits = torch.cat([logits, rest], dim=1)  # [N, C, V]
    return token_logprobs(logits, completion_ids, temperature)  # [N, C]


def completion_logprobs(model, ids: torch.Tensor, amask: torch.Tensor, prompt_len: int, temperature: float,
                        group_size: int = 1) -> torch.Tensor:
    """Training log-probs of the completions [n, C]: rows in whole groups of `group_size` share their prompt's
    forward (GRPO); group_size 1 forwards every row whole (SFT)."""
    if group_size == 1:
        return sequence_logprobs(model, ids, amask, prompt_len, temperature)
    G, P = group_size, prompt_len
    return group_logprobs(model, ids[::G, :P], amask[::G, :P], ids[:, P:], amask[:, P:], temperature)
