"""Rollouts: prompts → sampled completions (+ the sampler's own log-probs), and log-probs for training.

Generation runs on whatever weights the model has (the trainer merges the adapter first) and samples
from exactly softmax(logits / T): a model's own generation defaults (top-k, top-p, repetition
penalty) would silently change the distribution that the policy gradient assumes.
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
    input_ids: torch.Tensor  # [N, P + C] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor  # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first end-of-sequence token
    prompt_len: int  # P
    completions: list[str]
    logp_rollout: torch.Tensor | None = None  # [N, C] log-probs under the sampling weights

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]  # [N, C]


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


def sample_categorical(probs: torch.Tensor, gen: torch.Generator, block: int = 1024) -> torch.Tensor:
    """One draw per row from probs [n, V] (rows sum to ~1) by inverse CDF, in two levels: a block of
    `block` entries, then an entry inside it. Same law as torch.multinomial, far faster at a large vocab.

    torch.multinomial draws an exponential variate for every entry (32 × 152k per decode step, on one
    thread); this draws one uniform per row, and two short cumsums stand in for one 152k-long serial one.
    Zero-probability entries (and the padding) are never drawn.
    """
    n, V = probs.shape
    blocks = torch.nn.functional.pad(probs.float(), (0, -V % block)).view(n, -1, block)  # [n, nb, block]
    cdf = blocks.sum(-1).cumsum(-1)  # [n, nb]
    u = torch.rand(n, 1, generator=gen, device=probs.device) * cdf[:, -1:]  # [n, 1]
    b = torch.searchsorted(cdf, _below(u, cdf), right=True)  # [n, 1] first block whose cdf exceeds u
    u = u - torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)), 0.0)  # [n, 1] offset into the block
    inner = blocks[torch.arange(n, device=probs.device), b.squeeze(1)].cumsum(-1)  # [n, block]
    i = torch.searchsorted(inner, _below(u, inner), right=True)  # [n, 1]
    return (b * block + i).squeeze(1)  # [n]


def _below(u: torch.Tensor, cdf: torch.Tensor) -> torch.Tensor:
    """u [n, 1] clamped into [0, total) of cdf [n, m], against rounding: searchsorted(right=True) then
    lands on an entry with positive mass."""
    return torch.minimum(u.clamp(min=0), torch.nextafter(cdf[:, -1:], torch.zeros_like(u)))


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 1.0,
           greedy: bool = False, seed: int = 0, with_logprobs: bool = True, repeats: int = 1) -> Rollout:
    """`repeats` completions per prompt, rows ordered prompt by prompt. Seeded: same seed, same output.

    A plain sampling loop over a KV cache rather than `generate()`, for three savings that matter on a
    CPU: each prompt is prefilled once and its cache copied for its `repeats` samples (GRPO's G);
    rows that have produced their end-of-sequence token leave the batch, so the cost follows the mean
    completion length, not the longest; and each token's log-prob under the sampling weights comes
    for free (for the importance correction).
    """
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    eos = torch.tensor(eos_ids(model, tokenizer), device=model.device)
    pad = tokenizer.pad_token_id
    P = enc.input_ids.shape[1]
    N = len(prompts) * repeats
    tokens = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=model.device)  # [N, C]
    logps = torch.zeros(N, max_new_tokens, device=model.device)  # [N, C]
    gen = torch.Generator(device=model.device).manual_seed(seed)
    rows = torch.arange(N, device=model.device)  # [n] batch rows still generating
    logits, cache, mask, pos = prefill(model, enc.input_ids, enc.attention_mask, repeats)  # G samples, one prefill
    logits = logits[:, -1]  # [n, V]; mask [n, P + t]
    next_pos = pos[:, -1] + 1  # [n]
    length = 0
    for t in range(max_new_tokens):
        if greedy:
            tok = logits.argmax(-1)  # [n]
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)  # [n, V]
            tok = sample_categorical(probs, gen)  # [n]
            logps[rows, t] = probs.gather(1, tok[:, None]).squeeze(1).log()
        tokens[rows, t] = tok
        length = t + 1
        alive = ~torch.isin(tok, eos)  # [n]
        if t == max_new_tokens - 1 or not alive.any():
            break
        if not alive.all():  # finished rows leave the batch
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # [n, P + t + 1]
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       **with_cache(model, cache)).logits[:, -1]  # [n, V]
        next_pos = next_pos + 1
    completion = tokens[:, :length]  # [N, C]
    cmask = completion_mask(completion, eos.tolist())  # [N, C]
    texts = tokenizer.batch_decode(completion.masked_fill(cmask == 0, pad), skip_special_tokens=True)
    prompt_ids = enc.input_ids.repeat_interleave(repeats, dim=0)  # [N, P]
    prompt_mask = enc.attention_mask.repeat_interleave(repeats, dim=0)  # [N, P]
    return Rollout(input_ids=torch.cat([prompt_ids, completion], dim=1),
                   attention_mask=torch.cat([prompt_mask, cmask], dim=1), completion_mask=cmask,
                   prompt_len=P, completions=texts,
                   logp_rollout=logps[:, :length] * cmask if with_logprobs and not greedy else None)


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
