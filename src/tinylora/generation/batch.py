"""A generated batch as the trainer consumes it (`Rollout`, joined by `concat_rollouts`), and the end-of-sequence
bookkeeping of its rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One batch from several: prompts left-padded to the longest prompt, completions right-padded."""
    P = max(r.prompt_len for r in parts)
    C = max(r.input_ids.shape[1] - r.prompt_len for r in parts)
    ids, amask, cmask, logps = [], [], [], []
    for r in parts:
        left, right = P - r.prompt_len, C - (r.input_ids.shape[1] - r.prompt_len)
        pad = torch.nn.functional.pad
        ids.append(pad(r.input_ids, (left, right), value=pad_id))  # [n, P + C]
        amask.append(pad(r.attention_mask, (left, right), value=0))  # [n, P + C]
        cmask.append(pad(r.completion_mask, (0, right), value=0))  # [n, C]
        if r.logp_rollout is not None:
            logps.append(pad(r.logp_rollout, (0, right), value=0.0))  # [n, C]
    return Rollout(torch.cat(ids), torch.cat(amask), torch.cat(cmask), P, [c for r in parts for c in r.completions],
                   torch.cat(logps) if len(logps) == len(parts) else None)


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def completion_mask(completion_ids: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """[N, C] mask of real completion tokens: everything up to and including the first EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # [N, C]
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # [N, C] strictly after the first EOS
    return (~after_eos).long()


def rollout_of(seqs: list, tokenizer, pad: int, eos: set[int], with_logprobs: bool) -> Rollout:
    """Finished rows (the Engine's Sequences: prompt, tokens, logprobs) as one left-padded prompt +
    right-padded completion batch."""
    P = max(len(s.prompt) for s in seqs)
    C = max(len(s.tokens) for s in seqs)
    N = len(seqs)
    prompt_ids = torch.full((N, P), pad, dtype=torch.long)  # [N, P]
    prompt_mask = torch.zeros(N, P, dtype=torch.long)  # [N, P]
    tokens = torch.full((N, C), pad, dtype=torch.long)  # [N, C]
    logps = torch.zeros(N, C)  # [N, C]
    for i, s in enumerate(seqs):
        prompt_ids[i, P - len(s.prompt):] = torch.tensor(s.prompt)
        prompt_mask[i, P - len(s.prompt):] = 1
        tokens[i, :len(s.tokens)] = torch.tensor(s.tokens)
        if s.logprobs:
            logps[i, :len(s.logprobs)] = torch.tensor(s.logprobs)
    cmask = completion_mask(tokens, sorted(eos))  # [N, C]
    texts = tokenizer.batch_decode(tokens.masked_fill(cmask == 0, pad), skip_special_tokens=True)
    return Rollout(input_ids=torch.cat([prompt_ids, tokens], dim=1),
                   attention_mask=torch.cat([prompt_mask, cmask], dim=1), completion_mask=cmask,
                   prompt_len=P, completions=texts, logp_rollout=logps * cmask if with_logprobs else None)
