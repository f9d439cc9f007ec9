"""TrainConfig, every setting of a training run, checked when it is made (a bad value names its flag); and what
follows from it alone: each step's learning rate, problems and sampling seed."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from tinylora.generation import weights as cpu_weights
from tinylora.tasks import Problem
from tinylora.tasks.prompts import DEFAULT_SYSTEM
from tinylora.tasks.rewards import REWARDS, load_reward


@dataclass
class TrainConfig:
    algo: str = field(default="grpo", metadata={"help": "'grpo' (reinforcement learning) or 'sft' (gold solutions)",
                                                "choices": ("grpo", "sft")})
    steps: int = field(default=60, metadata={"help": "optimizer steps"})
    batch_prompts: int = field(default=8, metadata={"help": "B: prompts per step (split over ranks)"})
    group_size: int = field(default=4, metadata={"help": "G: samples per prompt (GRPO)"})
    max_new_tokens: int = field(default=32, metadata={"help": "completion length limit"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of rollouts"})
    lr: float = field(default=3e-2, metadata={"help": "AdamW learning rate of v"})
    schedule: str = field(default="constant", metadata={"help": "'constant' or 'cosine' after warmup",
                                                        "choices": ("constant", "cosine")})
    warmup: float = field(default=0.05, metadata={"help": "warmup fraction of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    mini_batches: int = field(default=1, metadata={
        "help": "optimizer updates per rollout batch, each on 1/N of its groups (the paper's code: 2); from the "
                "second update on the policy has moved, so the PPO ratio and its clip act"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    eps_low: float = field(default=0.2, metadata={"help": "PPO clip range below 1 (acts with several updates per "
                                                          "batch)"})
    eps_high: float = field(default=0.4, metadata={"help": "PPO clip range above 1 (the paper: 0.4)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the base model (v = 0); 0 = off"})
    tis_cap: float = field(default=2.0, metadata={"help": "cap of the rollout/train importance weight"})
    std_norm: bool = field(default=True, metadata={"help": "divide advantages by the group std (off: Dr. GRPO)"})
    reward: str = field(default="strict", metadata={
        "help": "'strict' (last #### number), 'boxed' (math-verify), 'lenient' (last number), or your own: "
                "FILE.py:function or module:function, called as reward(completions, prompts, **columns)"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward/backward (memory)"})
    graphs: bool = field(default=False, metadata={
        "help": "GPU: rollout decode steps replayed as CUDA graphs over KV buffers sized to the batch "
                "(generation/graphs.py; SDPA attention; hooks of methods with one v, or merged weights)"})
    rollout_weights: str = field(default="auto", metadata={
        "help": "weights that generate rollouts: 'packed' (CPU, fp32: a copy pre-packed once for oneDNN, adapter "
                "as hooks; exact and faster than merged, one more fp32 copy of the weights), 'merged' (W + ΔW, "
                "exact in fp32), 'hooks' (the model's own weights, adapter as hooks: exact in any dtype, the "
                "GPU choice), 'int8' (CPU: int8 base + fp32 adapter, faster still but approximate), 'auto' "
                "(packed on a CPU with fp32 weights when memory allows, else merged; hooks on a GPU or in "
                "bf16/fp16)",
        "choices": cpu_weights.CHOICES})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "GRPO: train only on groups whose samples disagree, generating more prompts until the step has "
                "B of them or --max-gen-rounds rounds ran (DAPO; at the cap it trains on what it has)"})
    max_gen_rounds: int = field(default=3, metadata={
        "help": "with --dynamic-sampling: at most this many rounds of B prompts per step"})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and the random projections P"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N steps"})
    suffix: str | None = field(default=None, metadata={
        "help": "text appended to every question", "default_help": "the task's answer-format instruction"})
    system: str = field(default=DEFAULT_SYSTEM, metadata={"help": "system prompt ('' for none)"})


    def __post_init__(self):
        checks = [("algo", self.algo in ("grpo", "sft"), "'grpo' or 'sft'"),
                  ("schedule", self.schedule in ("constant", "cosine"), "'constant' or 'cosine'"),
                  ("rollout_weights", self.rollout_weights in cpu_weights.CHOICES, " or ".join(cpu_weights.CHOICES)),
                  ("reward", self.reward in REWARDS or ":" in self.reward,
                   f"one of {', '.join(REWARDS)}, FILE.py:function or module:function")]
        for name in ("steps", "batch_prompts", "group_size", "max_new_tokens", "micro_batch", "mini_batches",
                     "epochs", "save_every", "max_gen_rounds"):
            checks.append((name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1"))
        for name in ("temperature", "lr", "tis_cap"):
            checks.append((name, getattr(self, name) > 0, "> 0"))
        for name in ("weight_decay", "grad_clip", "eps_low", "eps_high", "beta"):
            checks.append((name, getattr(self, name) >= 0, ">= 0"))
        checks.append(("warmup", 0 <= self.warmup <= 1, "a fraction in [0, 1]"))
        checks.append(("dynamic_sampling", self.algo == "grpo" or not self.dynamic_sampling, "GRPO (--algo grpo)"))
        checks.append(("group_size", self.algo == "sft" or self.group_size >= 2, ">= 2 for GRPO (advantages "
                                                                                  "compare samples of one prompt)"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid (--{name.replace('_', '-')}): "
                                 f"expected {expected}")
        load_reward(self.reward)  # your own reward file: a missing file or function fails now, not after loading


def lr_at(cfg: TrainConfig, step: int) -> float:
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr


def step_problems(problems: list[Problem], cfg: TrainConfig, step: int) -> list[Problem]:
    """B problems of step `step`: epochs of seeded permutations, so a resumed run sees the same data."""
    out = []
    for k in range(step * cfg.batch_prompts, (step + 1) * cfg.batch_prompts):
        epoch, i = divmod(k, len(problems))
        order = list(range(len(problems)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        out.append(problems[order[i]])
    return out


def step_seed(seed: int, step: int, rank: int, round_: int = 0) -> int:
    key = f"{seed}/{step}/{rank}" + (f"/{round_}" if round_ else "")  # round 0: plain GRPO's seed
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
