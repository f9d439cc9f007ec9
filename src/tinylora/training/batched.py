"""Many adapters trained in one run: every step's batch carries the rows of all of them.

Each adapter (a `Member`) has its own problems, reward, seed (its data order and its own sampling stream) and
its own optimizer state, learning rate and gradient clip; the model, the rollouts and the training forward are
shared. A row runs with its adapter's s·R (the bank's per-row path, differentiable here), and the loss is the
sum of the adapters' own token means, so each adapter's gradient is what its run alone would compute:

    loss = Σ_a  Σ_{tokens of a's rows} ℓ / T_a        (T_a: the completion tokens of a's rows with a signal)

Everything an adapter sees — its problems, its samples (one seeded stream per adapter in the engine), its
advantages, its gradient, its AdamW step — is what `Trainer` would do with that adapter alone; only the
order of floating-point sums differs (tests/test_batched.py measures by how much).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tinylora.atomic import atomic_write_text
from tinylora.config import AdapterConfig
from tinylora.generation.batch import concat_rollouts
from tinylora.generation.engine import Engine
from tinylora.models import DTYPES
from tinylora.tasks import Problem
from tinylora.tasks.prompts import chat_prompts
from tinylora.tasks.rewards import load_reward, score
from tinylora.training import dist
from tinylora.training.checkpoint import load_checkpoint, save_checkpoint
from tinylora.training.config import TrainConfig, lr_at, step_problems, step_seed
from tinylora.training.grpo import group_advantages, policy_loss, sft_loss, truncated_is_weight, zero_std_fraction
from tinylora.training.logprobs import completion_logprobs
from tinylora.training.trainer import check_problems, check_v_dtype, sft_batch

# the TrainConfig settings each adapter of a batched run has its own; all others are shared (the batch's shape,
# the loss), and a member that differs in one is refused by name
PER_ADAPTER_SETTINGS = ("seed", "lr", "schedule", "warmup", "weight_decay", "grad_clip", "reward")


@dataclass
class Member:
    """One adapter of a batched run: its name, its training problems, its settings and its adapter config
    (None: the bank's; another may differ in u, n_tie, tying, seed or v dtype, not in r, targets or svd)."""
    name: str
    problems: list[Problem]
    cfg: TrainConfig
    adapter: AdapterConfig | None = None


def check_members(members: list[Member]) -> TrainConfig:
    """The shared settings (the first member's), after checking that every member agrees on them and that a
    batched run supports them; a mismatch names the setting and the members."""
    if not members:
        raise ValueError("a batched run needs at least one adapter")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be distinct: {sorted(n for n in set(names) if names.count(n) > 1)}")
    cfg = members[0].cfg
    shared = [f.name for f in fields(TrainConfig) if f.name not in PER_ADAPTER_SETTINGS]
    for m in members[1:]:
        for f in shared:
            if getattr(m.cfg, f) != getattr(cfg, f):
                raise ValueError(f"{f}={getattr(m.cfg, f)!r} of {m.name!r} differs from {getattr(cfg, f)!r} of "
                                 f"{members[0].name!r}: adapters trained in one batch differ only in "
                                 + ", ".join(PER_ADAPTER_SETTINGS))
    supported = (("mini_batches", cfg.mini_batches == 1), ("epochs", cfg.epochs == 1),
                 ("dynamic_sampling", not cfg.dynamic_sampling), ("beta", cfg.beta == 0))
    for f, ok in supported:
        if not ok:
            raise ValueError(f"{f}={getattr(cfg, f)!r}: a batched run makes one update per step with no KL term and "
                             "no dynamic sampling; train this one alone")
    return cfg


class BatchedTrainer:
    def __init__(self, model, tokenizer, bank, members: list[Member], out: Path, progress: bool = True,
                 rollout_rows: int = 512):
        """`bank`: an AdapterBank over `model` (its adapter holds the shared factors and hooks; its own v stays 0).
        `rollout_rows`: the most rows one generate call holds (memory: KV cache and logits per row); whole
        adapters go together, and the samples do not depend on how they are split."""
        self.rollout_rows = rollout_rows
        self.cfg = check_members(members)
        self.configs = [m.adapter or bank.config for m in members]
        for c in self.configs:
            check_v_dtype(c)
        if dist.init(next(model.parameters()).device.type)[1] != 1:
            raise ValueError("a batched run runs in one process (launch it without torchrun)")
        self.model, self.tok, self.bank, self.members, self.out = model, tokenizer, bank, members, Path(out)
        self.progress = progress
        # [n_groups, k] each, zero at start, in its config's v dtype
        self.v = [nn.Parameter(torch.zeros(bank.v_shape(c), dtype=DTYPES[c.v_dtype], device=bank.device))
                  for c in self.configs]
        self.opt = torch.optim.AdamW([{"params": [v], "lr": m.cfg.lr, "weight_decay": m.cfg.weight_decay}
                                      for v, m in zip(self.v, members)], betas=(0.9, 0.999))
        for m in members:
            check_problems(m.cfg, m.problems, where=f"adapter {m.name!r}: ")
        self.rewards = [load_reward(m.cfg.reward) for m in members]
        self.engine = Engine(model, tokenizer, weights=self.cfg.rollout_weights, bank=bank, graphs=self.cfg.graphs)
        self.stop_requested = False

    # ---- one step ---------------------------------------------------------------------------
    def prompts(self, problems: list[Problem]) -> list[str]:
        return chat_prompts(self.tok, [p.question for p in problems], self.cfg.suffix, self.cfg.system or None)

    def publish(self) -> None:
        """Put every adapter's current v into the bank, where generation reads it."""
        for m, c, v in zip(self.members, self.configs, self.v):
            self.bank.add(m.name, c, v.detach())

    def rollout(self, step: int, mine: list[list[Problem]]):
        """Every adapter's B prompts × G samples, each adapter from its own seeded stream, in generate calls of
        at most `rollout_rows` rows: (rollout [N_all, ...], rewards [N_all], member of each row [N_all])."""
        cfg, G = self.cfg, self.cfg.group_size
        self.publish()
        per_call = max(1, self.rollout_rows // (cfg.batch_prompts * G))  # adapters per generate call
        parts, rewards = [], []
        for first in range(0, len(self.members), per_call):
            team = range(first, min(first + per_call, len(self.members)))
            prompts = {a: self.prompts(mine[a]) for a in team}
            owner = [a for a in team for _ in prompts[a]]  # the member of each prompt
            parts.append(self.engine.generate(
                [x for a in team for x in prompts[a]], max_new_tokens=cfg.max_new_tokens, repeats=G,
                temperature=cfg.temperature, streams=[a - first for a in owner],
                seed=[step_seed(self.members[a].cfg.seed, step, 0) for a in team],
                adapters=[self.members[a].name for a in owner]))
            row = 0
            for a in team:
                n = len(mine[a]) * G
                got = score(self.rewards[a], parts[-1].completions[row:row + n],
                            [x for x in prompts[a] for _ in range(G)], [p.columns for p in mine[a] for _ in range(G)])
                rewards += [float("nan") if x is None else x for x in got]
                row += n
        member = torch.arange(len(self.members)).repeat_interleave(cfg.batch_prompts * G)  # [N_all]
        return concat_rollouts(parts, self.engine.pad), torch.tensor(rewards), member

    def train_step(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.time()
        for group, m in zip(self.opt.param_groups, self.members):
            group["lr"] = lr_at(m.cfg, step)
        mine = [step_problems(m.problems, m.cfg, step) for m in self.members]
        per = [{"lr": lr_at(m.cfg, step)} for m in self.members]
        if cfg.algo == "grpo":
            G = cfg.group_size
            ro, rewards, member = self.rollout(step, mine)
            t_gen = time.time() - t0
            adv = torch.cat([group_advantages(r, G, cfg.std_norm) for r in rewards.split(cfg.batch_prompts * G)])
            batch = dict(ids=ro.input_ids, amask=ro.attention_mask, cmask=ro.completion_mask, P=ro.prompt_len,
                         adv=adv.to(ro.input_ids.device), logp_roll=ro.logp_rollout)
            live = adv.view(-1, G).ne(0).any(dim=1)  # [groups]: a group whose samples agree adds nothing
            groups = torch.nonzero(live).flatten()[:, None] * G + torch.arange(G)  # [b_live, G]
            for a, r in enumerate(rewards.split(cfg.batch_prompts * G)):
                scored = ~torch.isnan(r)
                mean = r[scored].mean().item() if scored.any() else 0.0  # none scored: 0, as Trainer reports
                per[a].update(reward_mean=mean, accuracy=mean, unscored=int((~scored).sum()),
                              zero_std_frac=zero_std_fraction(r, G))
            metrics = {"gen_time": t_gen, "rollouts": len(rewards),
                       "tokens_per_s": float(ro.completion_mask.sum()) / max(t_gen, 1e-9)}
        else:
            G = 1
            ids, amask, cmask, P = sft_batch(self.tok, [p for ps in mine for p in ps], cfg.suffix,
                                             cfg.system or None, self.model.device)
            batch = dict(ids=ids, amask=amask, cmask=cmask, P=P, adv=None, logp_roll=None)
            member = torch.arange(len(mine)).repeat_interleave(torch.tensor([len(x) for x in mine]))
            groups = torch.arange(ids.shape[0])[:, None]  # [N, 1]
            metrics = {}
        self._update(groups, member, batch, per)
        metrics.update(step=step, step_time=time.time() - t0, adapters={
            m.name: {**p, "v": v.detach().float().flatten().tolist()} for m, p, v in zip(self.members, per, self.v)})
        return metrics

    def _update(self, groups: torch.Tensor, member: torch.Tensor, batch: dict, per: list[dict]) -> None:
        """One optimizer update on whole `groups` [b, G] of rows: Σ over adapters of each one's token mean."""
        cfg, P = self.cfg, batch["P"]
        ids, amask, cmask = batch["ids"], batch["amask"], batch["cmask"]
        rows = groups.flatten()
        n_tokens = torch.zeros(len(self.members))  # [members] T_a over the rows that train
        n_tokens.index_add_(0, member[rows], cmask[rows.to(cmask.device)].sum(dim=1).float().cpu())
        self.opt.zero_grad(set_to_none=True)
        losses = [0.0] * len(self.members)
        G = groups.shape[1]
        lengths = cmask.sum(dim=1).cpu()
        order = lengths[groups].max(dim=1).values.argsort(stable=True)  # short groups with short ones
        for mb in groups[order].split(max(cfg.micro_batch // G, 1)) if len(groups) else []:
            mb = mb.flatten()  # [n] whole groups
            cols = amask[mb].nonzero()[:, 1]
            first, last = min(int(cols.min()), P - 1), int(cols.max()) + 1
            present, slot = member[mb].unique(return_inverse=True)  # the adapters in this micro-batch
            R = torch.stack([self.bank.stack_of(self.v[a], self.configs[a]) for a in present.tolist()])[slot]
            with self.bank.adapter.per_row(R[::G]):  # GRPO: one R per prompt; its G rows repeat it
                logp = completion_logprobs(self.model, ids[mb, first:last], amask[mb, first:last], P - first,
                                           cfg.temperature, G)  # [n, C']
            mask = cmask[mb, :last - P]  # [n, C']
            loss = 0.0
            for a in present.tolist():
                k = (member[mb] == a).nonzero().flatten()  # this adapter's rows in the micro-batch
                if cfg.algo == "sft":
                    mine = sft_loss(logp[k], mask[k], float(n_tokens[a]))
                else:
                    lp, sampled = logp[k], batch["logp_roll"][mb][k, :last - P]  # [n_a, C'] train, rollout
                    # one update per batch: π_old is the policy itself (ratio 1, as in Trainer)
                    mine, _ = policy_loss(lp, lp.detach(), batch["adv"][mb][k], mask[k], eps_low=cfg.eps_low,
                                          eps_high=cfg.eps_high, n_tokens=float(n_tokens[a]),
                                          is_weight=truncated_is_weight(lp.detach(), sampled, cfg.tis_cap))
                losses[a] += mine.item()
                loss = loss + mine
            loss.backward()
        for a, (m, v) in enumerate(zip(self.members, self.v)):
            per[a].update(loss=losses[a], grad_norm=0.0, skipped=False)
            if n_tokens[a] == 0:  # no row with a signal: no update (AdamW would still move v by its momentum)
                v.grad = None
                continue
            if v.grad is None:  # as Trainer: a zero gradient still steps (AdamW's momentum)
                v.grad = torch.zeros_like(v)
            finite = bool(torch.isfinite(v.grad).all()) and math.isfinite(losses[a])
            per[a]["grad_norm"] = torch.nn.utils.clip_grad_norm_([v], m.cfg.grad_clip or float("inf")).item()
            if not finite:
                v.grad, per[a]["skipped"] = None, True
                tqdm.write(f"{m.name}: non-finite loss or gradient: update skipped (v unchanged)")
        self.opt.step()  # adapters whose grad is None keep their v and their AdamW state

    def attach_member(self, k: int):
        """Adapter k as an ordinary Adapter on the model (once the bank's own is detached): its file and its
        evaluations then go exactly as a run of it alone would have them."""
        from tinylora.adapter import attach
        adapter = attach(self.model, self.configs[k], progress=False)
        with torch.no_grad():
            adapter.v.copy_(self.v[k])
        return adapter

    # ---- the loop ---------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {m.name: v.detach() for m, v in zip(self.members, self.v)}

    def _on_sigint(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("Ctrl-C: finishing this step, saving a checkpoint (Ctrl-C again to stop at once)")

    def fit(self, resume: bool = False) -> list[dict]:
        """Train from step 0 (or the checkpoint's): OUT/checkpoint.safetensors after every `save_every` steps,
        one line per step in OUT/metrics.jsonl (shared numbers, and each adapter's under "adapters")."""
        cfg, ckpt, metrics_path = self.cfg, self.out / "checkpoint.safetensors", self.out / "metrics.jsonl"
        start, history = 0, []
        if resume and ckpt.is_file():
            start, params, extra = load_checkpoint(ckpt, self.opt)
            if extra.get("adapters") != [m.name for m in self.members]:
                raise ValueError(f"{ckpt} holds other adapters than this run; use another --out")
            with torch.no_grad():
                for m, v in zip(self.members, self.v):
                    v.copy_(params[m.name])
            if metrics_path.is_file():
                history = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
                history = [h for h in history if h["step"] < start]
            tqdm.write(f"resuming from {ckpt} at step {start}")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
        old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.algo} x{len(self.v)}",
                       disable=not self.progress)
            for step in bar:
                m = self.train_step(step)
                history.append(m)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or self.stop_requested:
                    save_checkpoint(ckpt, step + 1, self.trainable_state(), self.opt,
                                    {"adapters": [x.name for x in self.members], "config": asdict(cfg)})
                if self.stop_requested:
                    break
        finally:
            signal.signal(signal.SIGINT, old_handler)
        self.publish()  # the bank serves the trained adapters from here on
        return history
