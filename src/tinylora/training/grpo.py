"""GRPO math: rewards → advantages → clipped, importance-corrected, token-mean policy loss.

Shapes: B prompts, G samples per prompt, N = B·G sequences, C completion tokens (padded).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i − mean_group) / (std_group + eps); without std scaling as in Dr. GRPO.

    rewards [N] ordered group by group (G consecutive samples share a prompt) → advantages [N].
    std is the unbiased sample std (torch's default, as TRL uses). A NaN reward ("no score") is left
    out of its group's mean and std and gets advantage 0.
    """
    r = rewards.view(-1, group_size)  # [B, G]
    scored = ~torch.isnan(r)  # [B, G]
    n = scored.sum(dim=1, keepdim=True)  # [B, 1]
    mean = torch.where(scored, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)  # [B, 1]
    a = torch.where(scored, r - mean, 0.0)  # [B, G]
    if scale_by_std:
        std = ((a * a).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # [B, 1]
        a = a / (std + eps)  # [B, G]
    return a.reshape(-1)  # [N]


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose scored samples all got the same reward: they carry no learning signal."""
    a = group_advantages(rewards, group_size, scale_by_std=False).view(-1, group_size)  # [B, G]
    return (a == 0).all(dim=1).float().mean().item()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) under logits/T. logits [N, C, V], tokens [N, C] → [N, C] (float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, C, V]
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, C]


def truncated_is_weight(logp_train: torch.Tensor, logp_rollout: torch.Tensor, cap: float) -> torch.Tensor:
    """min(π_train / π_rollout, cap) per token, detached: corrects rollouts sampled from merged weights."""
    return torch.exp(logp_train.detach() - logp_rollout).clamp(max=cap)  # [N, C]


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimator k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0; zero when equal."""
    d = logp_ref - logp  # [N, C]
    return torch.exp(d) - d - 1  # [N, C]


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: float = 0.2, is_weight: torch.Tensor | None = None,
                logp_ref: torch.Tensor | None = None, beta: float = 0.0,
                n_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """PPO-clip surrogate with token-mean reduction.

    logp, logp_old, mask, is_weight, logp_ref: [N, C]; advantages [N].
    n_tokens: the denominator of the token mean; pass the global count when the batch is split
    into micro-batches or across ranks, so the sum of the parts equals the whole.
    """
    mask = mask.float()  # [N, C]
    A = advantages.unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logp - logp_old)  # [N, C]
    unclipped = -A * ratio  # [N, C]
    clipped = -A * ratio.clamp(1 - eps_low, 1 + eps_high)  # [N, C]
    per_token = torch.maximum(unclipped, clipped)  # [N, C]
    if is_weight is not None:
        per_token = per_token * is_weight  # [N, C]
    kl = kl_k3(logp, logp_ref) if logp_ref is not None else torch.zeros_like(logp)  # [N, C]
    per_token = per_token + beta * kl  # [N, C]
    denom = n_tokens if n_tokens is not None else mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / denom  # []
    with torch.no_grad():
        m = mask.sum().clamp(min=1)
        # tokens where the clip binds: it only acts against the advantage's direction
        clipped_mask = ((A > 0) & (ratio > 1 + eps_high)) | ((A < 0) & (ratio < 1 - eps_low))  # [N, C]
        stats = {"clip_frac": (clipped_mask.float() * mask).sum().item() / m.item(),
                 "kl": (kl * mask).sum().item() / m.item()}
    return loss, stats


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Token-mean cross-entropy of the gold completion: logp, mask [N, C] → []."""
    mask = mask.float()
    denom = n_tokens if n_tokens is not None else mask.sum().clamp(min=1)
    return -(logp * mask).sum() / denom
