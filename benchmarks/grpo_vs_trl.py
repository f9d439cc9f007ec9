"""One GRPO step: tinylora's trainer vs TRL's GRPOTrainer with PEFT's TinyLoRA (issue #4, benchmark 1).

Both get the same model object (the default model unless --model), the same prompts (chat template,
system prompt, answer-format suffix), B prompts × G samples, max new tokens, temperature, β = 0,
ε = 0.2 / 0.4, the same strict reward, and the same trainable count (u=1, r=2, one number per
module). TRL runs without gradient checkpointing (its default is on; we do not checkpoint either).
Each side runs --steps steps; the median step time is reported (the first step is warm-up).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from common import table

from tinylora import AdapterConfig, attach
from tinylora.config import DEFAULT_TARGETS
from tinylora.tasks import load_task
from tinylora.tasks.prompts import DEFAULT_SUFFIX, DEFAULT_SYSTEM
from tinylora.tasks.rewards import strict_reward
from tinylora.training.config import TrainConfig
from tinylora.training.trainer import Trainer


def ours(model, tok, problems, args) -> tuple[list[float], list[float], int]:
    adapter = attach(model, AdapterConfig(u=1, n_tie=1, r=2))
    cfg = TrainConfig(steps=args.steps, batch_prompts=args.batch, group_size=args.group, max_new_tokens=args.new_tokens,
                      temperature=args.temperature, beta=0.0, eps_low=0.2, eps_high=0.4, lr=1e-2, micro_batch=8,
                      rollout_weights="auto")  # the default path (packed fp32 on a CPU)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model, tok, adapter, problems, cfg, d, progress=False)
        metrics = [trainer.train_step(s) for s in range(args.steps)]
    n = adapter.num_trainable()
    adapter.detach()
    return [m["step_time"] for m in metrics], [m["response_len"] for m in metrics], n


def trl(model, tok, problems, args) -> tuple[list[float], list[float], int]:
    from datasets import Dataset
    from peft import TinyLoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "system", "content": DEFAULT_SYSTEM},
                                          {"role": "user", "content": p.question + DEFAULT_SUFFIX}],
                               "answer": p.answer} for p in problems])
    lengths: list[float] = []

    def reward(completions, answer, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        lengths.append(sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts) / len(texts))
        return [strict_reward(t, a) for t, a in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as d:
        cfg = GRPOConfig(output_dir=d, per_device_train_batch_size=args.batch * args.group, num_generations=args.group,
                         max_completion_length=args.new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
                         beta=0.0, epsilon=0.2, epsilon_high=0.4, learning_rate=1e-2, max_steps=args.steps,
                         gradient_checkpointing=False, use_cpu=True, bf16=False, save_strategy="no", report_to=[],
                         logging_steps=1, shuffle_dataset=False, seed=0)
        peft_cfg = TinyLoraConfig(r=2, u=1, weight_tying=0.0, target_modules=list(DEFAULT_TARGETS))
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                              peft_config=peft_cfg, callbacks=[timer])
        n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return timer.times, lengths, n


def bench_trl(args) -> None:
    from tinylora.models import load_model
    model, tok = load_model(args.model)
    problems = load_task("arithmetic", split="train", n=args.batch * args.steps, seed=0)
    t_ours, len_ours, n_ours = ours(model, tok, problems, args)
    for p in model.parameters():
        p.requires_grad_(False)
    t_trl, len_trl, n_trl = trl(model, tok, problems, args)
    med_ours, med_trl = statistics.median(t_ours[1:]), statistics.median(t_trl[1:])
    print(f"\n{args.batch} prompts x {args.group} samples, {args.new_tokens} new tokens, T={args.temperature}, beta=0, "
          f"{args.steps} steps each (median of steps 2..{args.steps})\n")
    table(["trainer", "trainable", "step times (s)", "median step (s)", "mean completion tokens"], [
        ["tinylora (ours)", n_ours, " ".join(f"{t:.1f}" for t in t_ours), f"{med_ours:.1f}",
         f"{statistics.mean(len_ours):.1f}"],
        ["TRL GRPOTrainer + PEFT TinyLoRA", n_trl, " ".join(f"{t:.1f}" for t in t_trl), f"{med_trl:.1f}",
         f"{statistics.mean(len_trl):.1f}"]])
    print(f"\nstep time ratio (ours / TRL): {med_ours / med_trl:.2f}")
    torch.set_grad_enabled(True)
