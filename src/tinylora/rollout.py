"""Rollouts: prompts → sampled completions (+ the sampler's own log-probs), and log-probs for training.

Generation itself is the Engine's (engine.py), which samples from exactly softmax(logits / T): a
model's own generation defaults (top-k, top-p, repetition penalty) would silently change the
distribution that the policy gradient assumes.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .grpo import token_logprobs

DEFAULT_SYSTEM = "You are a helpful assistant."
# Measured on the default model (64 level-1/2 problems, 48 new tokens, 4 samples each at T=0.7): with this
# suffix 43% of samples show a one-line calculation first (81% of those correct), 29% answer at once
# (15% correct) and 28% ramble past the limit; greedy accuracy is 45%. That mix is what GRPO needs: a
# good behaviour the model already produces sometimes. "Solve it in one or two short lines, then ..."
# gave 78% direct answers and 2% calculations, "think step by step" never finished in time.
DEFAULT_SUFFIX = ("\nShow the calculation in one short line, then give the final answer on the last line as "
                  "\"#### <number>\".")


def chat_prompts(tokenizer, questions: list[str], suffix: str = DEFAULT_SUFFIX,
                 system: str | None = DEFAULT_SYSTEM) -> list[str]:
    """Questions wrapped in the model's chat template (plain text when it has none)."""
    out = []
    for q in questions:
        if tokenizer.chat_template:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                    "content": q + suffix}]
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append(f"Question: {q}{suffix}\nAnswer:")
    return out


@dataclass
class Rollout:
    """A batch of prompts and their completions, as the trainer consumes it."""

    input_ids: torch.Tensor  # [N, P + C] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first end-of-sequence token
    prompt_len: int  # P
    completions: list[str]
    logp_rollout: torch.Tensor | None = None  # [N, C] log-probs under the sampling weights

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]  # [N, C]

    def to(self, device) -> "Rollout":
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return Rollout(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                       self.prompt_len, self.completions, move(self.logp_rollout))


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """[N, C] mask of real completion tokens: everything up to and including the first EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # [N, C]
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # [N, C] strictly after the first EOS
    return (~after_eos).long()


@functools.cache
def _cache_arg(model_class: type) -> str:
    """The forward() argument that takes a KV cache: `cache` in newer transformers, `past_key_values` in older."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict:
    return {_cache_arg(type(model)): cache, "use_cache": True}


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int = 1):
    """Run left-padded prompts [b, P] once and repeat the result for `repeats` rows each.

    Returns the last position's logits [b·repeats, 1, V], the key/value cache, and the attention mask
    and position ids [b·repeats, P] (positions follow the mask, as in generate()). Under autograd the
    cache keeps its graph, so gradients from every repeat flow back through the one prompt pass.
    """
    from transformers import DynamicCache
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P]
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(model, cache),
                   logits_to_keep=1).logits  # [b, 1, V]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        logits, mask, pos = (x.repeat_interleave(repeats, dim=0) for x in (logits, mask, pos))  # [b·repeats, ...]
    return logits, cache, mask, pos


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, seed: int = 0, with_logprobs: bool = True, repeats: int = 1) -> Rollout:
    """`repeats` completions per prompt from the model's weights as they are, through the `Engine`.

    Seeded: same seed, same output. Each prompt is prefilled once and its cache copied for its `repeats`
    samples (GRPO's G); finished rows leave the batch, so the cost follows the mean completion length,
    not the longest; each token's log-prob under the sampling law comes for free (for the importance
    correction).
    """
    from .engine import Engine
    return Engine(model, tokenizer, weights=None).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, seed=seed,
        with_logprobs=with_logprobs, repeats=repeats)


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
