"""The training loop: task → rollout (merged or int8 weights) → reward → advantage → loss (fp32, unmerged) → v.

One step: B prompts × G samples are generated with the adapter merged into the fp32 weights (default)
or with an int8 base + the adapter's fp32 hooks (`rollout_weights`); rewards become group-normalised
advantages; the PPO-clip loss, corrected by truncated importance weights between the sampling and
training policies, is averaged over tokens and back-propagated into v. Each group's prompt is
forwarded once for its G samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dist, int8
from .checkpoint import load_checkpoint, save_checkpoint
from .grpo import group_advantages, policy_loss, sft_loss, truncated_is_weight, zero_std_fraction
from .rewards import REWARDS
from .rollout import DEFAULT_SUFFIX, DEFAULT_SYSTEM, chat_prompts, group_logprobs, sample, sequence_logprobs
from .tasks import Problem


@dataclass
class TrainConfig:
    algo: str = field(default="grpo", metadata={"help": "'grpo' (reinforcement learning) or 'sft' (gold solutions)"})
    steps: int = field(default=20, metadata={"help": "optimizer steps"})
    batch_prompts: int = field(default=8, metadata={"help": "B: prompts per step (split over ranks)"})
    group_size: int = field(default=4, metadata={"help": "G: samples per prompt (GRPO)"})
    max_new_tokens: int = field(default=32, metadata={"help": "completion length limit"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of rollouts"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate of v"})
    schedule: str = field(default="constant", metadata={"help": "'constant' or 'cosine' after warmup"})
    warmup: float = field(default=0.05, metadata={"help": "warmup fraction of the steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    eps_low: float = field(default=0.2, metadata={"help": "PPO clip range below 1"})
    eps_high: float = field(default=0.4, metadata={"help": "PPO clip range above 1 (the paper: 0.4)"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient to the base model (v = 0); 0 = off"})
    tis_cap: float = field(default=2.0, metadata={"help": "cap of the rollout/train importance weight"})
    std_norm: bool = field(default=True, metadata={"help": "divide advantages by the group std (off: Dr. GRPO)"})
    reward: str = field(default="strict", metadata={"help": "'strict' (last #### number) or 'boxed' (math-verify)"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward/backward (memory)"})
    # merged is the default: over two seed-0 pairs on the default run, int8 rollouts ended 8 and 26.5 points
    # lower on held-out accuracy than fp32 ones (BENCHMARKS.md), though they make rollouts 3× faster
    rollout_weights: str = field(default="merged", metadata={
        "help": "weights that generate rollouts: 'merged' (fp32 W + ΔW, exact; default), 'int8' (int8 base + "
                "fp32 adapter, 3.2–3.6× faster rollouts on an AVX2 CPU, but lower accuracy after training in our "
                "runs), 'auto' (int8 on CPU when available, else merged)"})
    seed: int = field(default=0, metadata={"help": "seed of data order and sampling"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N steps"})
    suffix: str = field(default=DEFAULT_SUFFIX, metadata={"help": "text appended to every question"})
    system: str = field(default=DEFAULT_SYSTEM, metadata={"help": "system prompt ('' for none)"})


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


def step_seed(seed: int, step: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:4], "little")


class Trainer:
    def __init__(self, model, tokenizer, adapter, problems: list[Problem], cfg: TrainConfig, out: Path,
                 progress: bool = True):
        self.model, self.tok, self.adapter, self.problems, self.cfg, self.out = model, tokenizer, adapter, \
            problems, cfg, Path(out)
        self.rank, self.world = dist.init()
        if cfg.batch_prompts % self.world:
            raise ValueError(f"batch_prompts={cfg.batch_prompts} must be divisible by the {self.world} ranks")
        if cfg.algo not in ("grpo", "sft"):
            raise ValueError(f"algo={cfg.algo!r}: expected 'grpo' or 'sft'")
        self.reward_fn = REWARDS[cfg.reward][0]
        self.params = adapter.trainable_parameters()
        if not self.params:
            raise ValueError(f"method {adapter.config.method!r} has nothing to train")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.progress = progress and self.rank == 0
        self.int8 = self._int8_weights() if cfg.algo == "grpo" else None
        self.stop_requested = False

    def _int8_weights(self):
        choice, method = self.cfg.rollout_weights, self.adapter.config.method
        if choice not in ("auto", "int8", "merged"):
            raise ValueError(f"rollout_weights={choice!r}: expected 'auto', 'int8' or 'merged'")
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        if choice == "merged" or (choice == "auto" and not (on_cpu and int8.available() and method != "full")):
            return None
        if method == "full":  # the int8 copy is taken once; full fine-tuning changes the weights it copies
            raise ValueError("rollout_weights='int8' needs an adapter method; full fine-tuning uses 'merged'")
        return int8.Int8Weights(self.model)

    # ---- one step ---------------------------------------------------------------------------
    def rollout(self, step: int, problems: list[Problem]):
        cfg = self.cfg
        prompts = chat_prompts(self.tok, [p.question for p in problems], cfg.suffix, cfg.system or None)
        # int8 base + adapter hooks, or the adapter merged into the fp32 weights
        weights = self.int8.active() if self.int8 is not None else self.adapter.merged_weights(exact=True)
        with weights:  # N = B·G rows, group by group
            ro = sample(self.model, self.tok, prompts, max_new_tokens=cfg.max_new_tokens, repeats=cfg.group_size,
                        temperature=cfg.temperature, seed=step_seed(cfg.seed, step, self.rank))
        golds = [p.answer for p in problems for _ in range(cfg.group_size)]
        rewards = torch.tensor([self.reward_fn(c, g) for c, g in zip(ro.completions, golds)])  # [N]
        return ro, rewards

    def sft_batch(self, problems: list[Problem]):
        """Prompt + gold solution + EOS, as a Rollout-shaped batch."""
        prompts = chat_prompts(self.tok, [p.question for p in problems], self.cfg.suffix, self.cfg.system or None)
        eos = self.tok.eos_token or ""
        texts = [pr + (p.solution or f"#### {p.answer}") + eos for pr, p in zip(prompts, problems)]
        self.tok.padding_side = "left"
        P_enc = self.tok(prompts, add_special_tokens=False)
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        # right-align: every row's completion starts after its own prompt; mask prompt tokens out
        lens = enc.attention_mask.sum(1)  # [N]
        plen = torch.tensor([len(x) for x in P_enc.input_ids])  # [N]
        T = enc.input_ids.shape[1]
        pos = torch.arange(T)[None]  # [1, T]
        start = T - lens + plen  # [N] first completion position
        target = (pos >= start[:, None]).long()  # [N, T]
        P = int(start.min())
        return enc.input_ids, enc.attention_mask, target[:, P:], P

    def micro_batches(self, rows: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Row indices per forward/backward. GRPO keeps groups whole so their prompt is shared, and
        orders groups by their longest completion so short ones are not padded to long ones."""
        size = self.cfg.micro_batch
        if self.cfg.algo == "grpo" and len(rows):
            G = self.cfg.group_size
            size = max(size // G, 1) * G
            groups = rows.view(-1, G)  # [b, G]
            order = lengths[groups].max(dim=1).values.argsort(stable=True)  # [b]
            rows = groups[order].flatten()
        return [mb for mb in rows.split(size) if len(mb)]

    def logprobs(self, ids: torch.Tensor, amask: torch.Tensor, P: int) -> torch.Tensor:
        """Training log-probs of the completions [n, C]; GRPO rows come in whole groups."""
        T = self.cfg.temperature
        if self.cfg.algo == "sft":
            return sequence_logprobs(self.model, ids, amask, P, T)
        G = self.cfg.group_size
        return group_logprobs(self.model, ids[::G, :P], amask[::G, :P], ids[:, P:], amask[:, P:], T)

    def train_step(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.time()
        mine = step_problems(self.problems, cfg, step)[self.rank::self.world]
        lr = lr_at(cfg, step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        metrics: dict = {"step": step, "lr": lr}
        if cfg.algo == "grpo":
            ro, rewards = self.rollout(step, mine)
            t_gen = time.time() - t0
            adv = group_advantages(rewards, cfg.group_size, cfg.std_norm)  # [N]
            ids, amask, cmask, P, logp_roll = ro.input_ids, ro.attention_mask, ro.completion_mask, ro.prompt_len, \
                ro.logp_rollout
            gen_tokens = float(cmask.sum())
            # groups with zero advantage add nothing to the loss when there is no KL term: skip their compute
            G = cfg.group_size
            live = adv.view(-1, G).ne(0).any(dim=1) if cfg.beta == 0 else torch.ones(len(adv) // G, dtype=torch.bool)
            rows = (torch.nonzero(live).flatten()[:, None] * G + torch.arange(G)).flatten()  # whole groups
        else:
            ids, amask, cmask, P = self.sft_batch(mine)
            adv, logp_roll, rewards, t_gen, gen_tokens = None, None, None, 0.0, 0.0
            rows = torch.arange(ids.shape[0])
        # every rank joins every collective, even one with no rows to train on this step
        n_tokens = max(float(dist.all_sum(cmask[rows].sum().float().reshape(1)).item()), 1.0)
        loss_sum, gaps, stats = 0.0, [], {"clip_frac": 0.0, "kl": 0.0}
        for mb in self.micro_batches(rows, cmask.sum(dim=1)):
            # trim columns that are padding for every row of this micro-batch (left of the prompts, right of
            # the completions)
            cols = amask[mb].nonzero()[:, 1]
            first, last = min(int(cols.min()), P - 1), int(cols.max()) + 1
            logp = self.logprobs(ids[mb, first:last], amask[mb, first:last], P - first)  # [n, C']
            m = cmask[mb, :last - P]  # [n, C']
            if cfg.algo == "sft":
                loss = sft_loss(logp, m, n_tokens)
            else:
                lr_ = logp_roll[mb, :last - P]  # [n, C']
                ref = None
                if cfg.beta > 0:
                    with torch.no_grad(), self.adapter.disabled():
                        ref = self.logprobs(ids[mb, first:last], amask[mb, first:last], P - first)
                loss, st = policy_loss(logp, logp.detach(), adv[mb], m, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                       is_weight=truncated_is_weight(logp, lr_, cfg.tis_cap), logp_ref=ref,
                                       beta=cfg.beta, n_tokens=n_tokens)
                for k in stats:
                    stats[k] += st[k] * len(mb) / max(len(rows), 1)
                gaps.append(((logp.detach() - lr_).abs() * m).sum().item() / max(m.sum().item(), 1))
            loss.backward()
            loss_sum += loss.item()
        for p in self.params:  # every rank all-reduces every tensor, even with nothing to contribute
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dist.all_sum_grads(self.params)
        grads = [p.grad for p in self.params]
        finite = all(torch.isfinite(g).all() for g in grads) and math.isfinite(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip or float("inf")).item()
        if finite:
            self.opt.step()
        metrics.update(loss=loss_sum, grad_norm=grad_norm, skipped=not finite, step_time=time.time() - t0)
        if not finite:
            tqdm.write(f"step {step}: non-finite loss or gradient, step skipped (v unchanged)")
        if cfg.algo == "grpo":
            totals = dist.all_sum(torch.tensor([rewards.sum().item(), len(rewards), gen_tokens,
                                                zero_std_fraction(rewards, cfg.group_size) * len(mine)]))
            mean_reward = totals[0].item() / totals[1].item()
            metrics.update(reward_mean=mean_reward, accuracy=mean_reward,
                           zero_std_frac=totals[3].item() / cfg.batch_prompts,
                           response_len=totals[2].item() / totals[1].item(), gen_time=t_gen,
                           tokens_per_s=totals[2].item() / max(t_gen, 1e-9) / self.world,
                           logp_gap=sum(gaps) / len(gaps) if gaps else 0.0, **stats)
        if self.adapter.config.method in ("tinylora", "lora-xs"):
            metrics["v"] = self.adapter.v.detach().float().flatten().tolist()
        return metrics

    # ---- the loop ---------------------------------------------------------------------------
    def _on_sigint(self, signum, frame):
        if self.stop_requested:  # second Ctrl-C: stop now; the last checkpoint is complete
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to stop at once)")

    def fit(self, resume: bool = False, on_step=None) -> list[dict]:
        cfg, ckpt, metrics_path = self.cfg, self.out / "checkpoint.safetensors", self.out / "metrics.jsonl"
        start, history = 0, []
        if resume and ckpt.is_file():
            start, params, _ = load_checkpoint(ckpt, self.opt)
            self.adapter.load_trainable_state(params)
            if metrics_path.is_file():
                history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
                history = [m for m in history if m["step"] < start]
            if self.rank == 0:
                tqdm.write(f"resuming from {ckpt} at step {start}")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if self.rank == 0 else None
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.algo, disable=not self.progress)
        try:
            for step in bar:
                m = self.train_step(step)
                history.append(m)
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(m) + "\n")
                    if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or self.stop_requested:
                        save_checkpoint(ckpt, step + 1, self.adapter.trainable_state(), self.opt,
                                        {"config": asdict(cfg)})
                    bar.set_postfix({k: f"{m[k]:.3g}" for k in ("reward_mean", "loss", "step_time") if k in m})
                if on_step is not None:
                    on_step(m)
                if self.stop_requested:
                    break
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        return history

