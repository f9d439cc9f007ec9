"""The Python API: `train` (evaluate the base, train, evaluate again, save) and `evaluate`, from dataclass configs.

    from tinylora import AdapterConfig
    from tinylora.api import DataConfig, ModelConfig, RunConfig, TrainConfig, evaluate, train

    summary = train(ModelConfig(), DataConfig(), AdapterConfig(n_tie=16), TrainConfig(steps=20),
                    RunConfig(out="runs/mine"))
    result = evaluate(ModelConfig(), DataConfig(), adapter="runs/mine/adapter.safetensors")

`tinylora train` and `tinylora eval` only turn their flags into these configs. Every config checks its
values when it is made, so a bad value fails at once with a message naming the option.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tinylora.config import AdapterConfig
from tinylora.embedded import DEFAULT_MODEL, listing
from tinylora.evaluation.config import EVAL_DEFAULTS
from tinylora.evaluation.evaluate import accuracy_line
from tinylora.generation import weights as cpu_weights
from tinylora.methods import SINGLE_V
from tinylora.models import DEVICES, DTYPES
from tinylora.tasks import Problem
from tinylora.tasks.prompts import DEFAULT_SYSTEM
from tinylora.training import dist
from tinylora.training.config import TrainConfig

__all__ = ["AdapterConfig", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "evaluate", "train"]
REPORT_TO = ("none", "tensorboard", "wandb")
HELD_OUT_GUARD = 200  # training never sees the first 200 test problems, whatever --eval-n says


def _bad(name: str, value, expected: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid (--{name.replace('_', '-')}): expected {expected}")


@dataclass
class ModelConfig:
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "model folder, hub id, or an embedded model (offline): " + listing()})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else MPS, else CPU), cpu, cuda, "
                                                          "cuda:N or mps"})

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, "auto, " + ", ".join(DTYPES))
        if self.device.split(":")[0] not in DEVICES:
            raise _bad("device", self.device, ", ".join(DEVICES) + " or cuda:N")


@dataclass
class DataConfig:
    task: str = field(default="arithmetic", metadata={
        "help": "'arithmetic' (generated offline), 'gsm8k', or a .jsonl file"})
    data: str | None = field(default=None, metadata={
        "help": "your own .jsonl file: {question, answer} rows, or any columns with --prompt-template; its last "
                "--eval-n rows are held out for evaluation unless --eval-data is given"})
    eval_data: str | None = field(default=None, metadata={
        "help": "a separate .jsonl file of held-out rows (with --data): then all of --data trains"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "the whole user message, filled from each row's columns, e.g. 'Reverse the word {word}.' "
                "(replaces question + --suffix)"})
    gsm8k_dir: str | None = field(default=None, metadata={
        "help": "folder with GSM8K train.jsonl/test.jsonl (else $TINYLORA_GSM8K_DIR, else the hub)"})
    levels: tuple[int, ...] | str = field(default=(1, 2), metadata={"help": "arithmetic difficulty levels 1-3"})
    n: int = field(default=2000, metadata={"help": "training problems"})
    eval_n: int = field(default=200, metadata={
        "help": "held-out problems evaluated before and after training, the same set for every seed (0: skip); "
                "with --adapter-column, held-out rows per adapter"})
    adapter_column: str | None = field(default=None, metadata={
        "help": "train one adapter per distinct value of this column of --data, each on its own rows, all in one "
                "batched run, into OUT/adapters.pack (per-user adapters)"})

    def __post_init__(self):
        if isinstance(self.levels, str):
            try:
                self.levels = tuple(int(x) for x in self.levels.split(","))
            except ValueError:
                raise _bad("levels", self.levels, "comma-separated levels such as 1,2") from None
        self.levels = tuple(self.levels)
        if not self.levels or not all(x in (1, 2, 3) for x in self.levels):
            raise _bad("levels", self.levels, "levels from 1, 2, 3")
        if not (self.task in ("arithmetic", "gsm8k") or self.task.endswith(".jsonl")):
            raise _bad("task", self.task, "'arithmetic', 'gsm8k' or a path to a .jsonl file")
        for name in ("data", "eval_data"):
            if getattr(self, name) is not None and not getattr(self, name).endswith(".jsonl"):
                raise _bad(name, getattr(self, name), "a .jsonl file")
        if self.eval_data and not self.source.endswith(".jsonl"):
            raise _bad("eval_data", self.eval_data, "to come with --data FILE.jsonl")
        if self.adapter_column is not None and not (self.data or "").endswith(".jsonl"):
            raise _bad("adapter_column", self.adapter_column, "to come with --data FILE.jsonl")
        if self.prompt_template is not None:
            from tinylora.tasks.jsonl import template_fields
            template_fields(self.prompt_template)
            if not self.source.endswith(".jsonl"):
                raise _bad("prompt_template", self.prompt_template, "a .jsonl data file to fill it")
        if not isinstance(self.n, int) or self.n < 1:
            raise _bad("n", self.n, "an integer >= 1")
        if not isinstance(self.eval_n, int) or self.eval_n < 0:
            raise _bad("eval_n", self.eval_n, "an integer >= 0")

    @property
    def source(self) -> str:
        return self.data or self.task

    def instruction(self) -> str:
        """The answer-format instruction the task appends to each question (none under a prompt template)."""
        from tinylora.tasks import instruction
        return instruction(self.source, self.prompt_template)

    def problems(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        """`n` problems of `split`; the training split never holds a question of the held-out set (see
        `training_pool`)."""
        if split == "train":
            return self.training_pool(n, seed)[0]
        return self.raw_split(split, n, seed)

    def training_pool(self, n: int | None, seed: int = 0) -> tuple[list[Problem], int]:
        """(training problems, how many were dropped): the first `n` training problems less every one whose
        question is also held out, word for word. Held out: the first max(eval_n, 200) test problems (200: the
        default evaluation, so `tinylora eval` later scores unseen problems too), --eval-data's rows, or a data
        file's last eval_n rows. Repeats inside the training rows themselves are kept: they are the file's
        weighting."""
        from tinylora.tasks import without_questions
        pool = self.raw_split("train", n, seed)
        if self.source.endswith(".jsonl") and not self.eval_data:
            held = self.raw_split("test", None) if self.eval_n else []
        else:
            held = self.raw_split("test", None if self.eval_data else max(self.eval_n, HELD_OUT_GUARD))
        return without_questions(pool, held)

    def raw_split(self, split: str, n: int | None, seed: int = 0) -> list[Problem]:
        """`n` problems of `split` as the task lays them out. A data file has no splits: the held-out rows are
        --eval-data, or else the last eval_n rows of the file, which training then leaves out (eval_n = 0: the
        whole file for both)."""
        from tinylora.tasks import load_task
        if self.source.endswith(".jsonl"):
            if self.eval_data:
                rows = load_task(self.eval_data if split == "test" else self.source,
                                 prompt_template=self.prompt_template)
            else:
                rows = load_task(self.source, prompt_template=self.prompt_template)
                held = self.eval_n  # 0: nothing held out (no evaluation, or `tinylora eval` of the whole file)
                if held >= len(rows):
                    raise ValueError(f"{self.source}: {len(rows)} rows leave none to train on after holding out "
                                     f"--eval-n {self.eval_n}; lower --eval-n or pass --eval-data FILE")
                if held:
                    rows = rows[len(rows) - held:] if split == "test" else rows[:len(rows) - held]
            return rows[:n] if n else rows
        kwargs = {}
        if self.source == "arithmetic":
            kwargs["levels"] = self.levels
        elif self.source == "gsm8k":
            kwargs["data_dir"] = self.gsm8k_dir
        return load_task(self.source, split=split, n=n, seed=seed, **kwargs)


@dataclass
class RunConfig:
    out: str = field(default="runs/default", metadata={"help": "output folder"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.safetensors"})
    eval_batch_size: int = field(default=EVAL_DEFAULTS.batch_size,
                                 metadata={"help": "sequences generated together in evaluation"})
    eval_every: int = field(default=0, metadata={
        "help": "also score the --eval-n held-out problems every N steps (0: only before and after training): "
                "a learning curve in metrics.jsonl, summary.json and the plot"})
    eval_reward: str | None = field(default=None, metadata={
        "help": "the rule that scores the held-out evaluations (default: --reward; set it when training with a "
                "control reward such as 'random' or 'format')"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    report_to: str = field(default="none", metadata={
        "help": "also log metrics to 'tensorboard' (OUT/tensorboard) or 'wandb' (offline unless WANDB_API_KEY or "
                "WANDB_MODE is set); metrics.jsonl is always written"})

    def __post_init__(self):
        if self.report_to not in REPORT_TO:
            raise _bad("report_to", self.report_to, " or ".join(REPORT_TO))
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise _bad("eval_batch_size", self.eval_batch_size, "an integer >= 1")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise _bad("eval_every", self.eval_every, "an integer >= 0")
        if self.eval_reward is not None:
            from tinylora.tasks.rewards import load_reward
            try:
                load_reward(self.eval_reward)
            except (ValueError, FileNotFoundError) as e:
                raise _bad("eval_reward", self.eval_reward, f"a reward rule ({e})") from None


def train(model: ModelConfig | None = None, data: DataConfig | None = None, adapter: AdapterConfig | None = None,
          training: TrainConfig | None = None, run: RunConfig | None = None) -> dict:
    """Evaluate the base model, train, evaluate again; write adapter, summary, metrics and plots to run.out.

    Returns the summary (also in OUT/summary.json). Resumable: run.resume continues from the last step.
    """
    from tinylora.io import save_adapter
    from tinylora.models import resolve_device
    from tinylora.training.plots import plot_run
    from tinylora.training.run import HeldOut, TimeSpent, report, summarize
    from tinylora.training.tracking import make_tracker

    model, data, adapter = model or ModelConfig(), data or DataConfig(), adapter or AdapterConfig()
    cfg, run = training or TrainConfig(), run or RunConfig()
    if cfg.suffix is None:
        cfg = replace(cfg, suffix=data.instruction())
    from tinylora.training.trainer import check_v_dtype
    check_v_dtype(adapter)  # before the model loads
    if cfg.graphs and not resolve_device(model.device).startswith("cuda"):
        raise ValueError(f"graphs=True (--graphs) replays CUDA graphs; the model runs on "
                         f"{resolve_device(model.device)}: use --device cuda, or leave --graphs off")
    if data.adapter_column is not None:
        from tinylora.training.per_adapter import train_per_adapter
        return train_per_adapter(model, data, adapter, cfg, run)
    t_start, out = time.time(), Path(run.out)
    rank, _ = dist.init(resolve_device(model.device).split(":")[0])
    say = print if rank == 0 else (lambda *a, **k: None)
    label = os.environ.get("TINYLORA_PROGRESS_LABEL", "")  # set by `tinylora sweep`
    trainer, eval_problems = _trainer(model, data, adapter, cfg, run, out, label, say, show=run.progress and rank == 0)
    net, ad = trainer.model, trainer.adapter
    rule = run.eval_reward or cfg.reward
    tracker = make_tracker(run.report_to, out, {"model": asdict(model), "data": asdict(data),
                                                 "adapter": asdict(adapter), "train": asdict(cfg)}) \
        if rank == 0 else None
    held_out = HeldOut(net, trainer.tok, ad, eval_problems, trainer.engine.weights, rule, out,
                       max_new_tokens=cfg.max_new_tokens, batch_size=run.eval_batch_size, suffix=cfg.suffix,
                       system=cfg.system or None, progress=run.progress and rank == 0, label=label, tracker=tracker)
    base, base_reused = None, False
    if eval_problems and rank == 0:
        base, base_reused = held_out.base(run.resume)
        say(f"base accuracy {accuracy_line(base, rule)}")

    spent = TimeSpent(out, run.resume, t_start)

    def on_step(m: dict) -> None:
        if rank == 0:
            spent.save()
        if tracker:
            tracker.log(m)

    history = trainer.fit(resume=run.resume, on_step=on_step, eval_every=run.eval_every,
                          on_eval=held_out.during if eval_problems and rank == 0 else None)
    spent.training_done()
    if rank != 0:
        dist.shutdown()
        return {}
    adapter_path = save_adapter(ad, out / "adapter.safetensors")
    final = None
    if eval_problems and not trainer.stop_requested:  # stopped early: the resumed run evaluates at its end
        final = held_out.final(len(history))
    summary = summarize(model=model.model, task=data.source, algo=cfg.algo, adapter=ad, adapter_path=adapter_path,
                        history=history, base=base, final=final, base_reused=base_reused, spent=spent.totals(),
                        stopped_early=trainer.stop_requested)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if tracker:
        tracker.close()
    if history:
        plot_run(history, [e for e in (base, *summary["evals_during"], final) if e], out)
    report(summary, rule, out, say)
    dist.shutdown()
    return summary


def _trainer(model: ModelConfig, data: DataConfig, adapter: AdapterConfig, cfg: TrainConfig, run: RunConfig,
             out: Path, label: str, say, show: bool):
    """Load the model, attach the adapter, draw the problems: (the Trainer, the held-out problems)."""
    from tinylora.adapter import attach
    from tinylora.models import load_model
    from tinylora.training.trainer import Trainer
    net, tokenizer = load_model(model.model, model.dtype, model.device)
    ad = attach(net, adapter, progress=show)
    train_problems, dropped = data.training_pool(data.n, seed=cfg.seed)
    # the held-out set does not move with the seed: runs with different seeds are scored on the same problems
    eval_problems = data.problems("test", data.eval_n) if data.eval_n else []
    say(f"model {model.model} on {next(net.parameters()).device} ({next(net.parameters()).dtype}): "
        f"{ad.num_trainable():,} trainable parameters ({ad.config.method}, {len(ad.targets)} modules, "
        f"{len(ad.groups)} groups); {len(train_problems)} training problems"
        + (f" ({dropped} left out: also held out)" if dropped else ""))
    trainer = Trainer(net, tokenizer, ad, train_problems, cfg, out, progress=run.progress, label=label)
    if cfg.algo == "grpo":
        say(f"rollout weights: {trainer.engine.weights}")
    return trainer, eval_problems


def evaluate(model: ModelConfig | None = None, data: DataConfig | None = None, *, adapter: str | None = None,
             split: str = "test", n: int | None = 100, samples: int | None = None,
             temperature: float = EVAL_DEFAULTS.temperature, max_new_tokens: int = EVAL_DEFAULTS.max_new_tokens,
             batch_size: int = EVAL_DEFAULTS.batch_size, reward: str = "strict", seed: int = 0,
             weights: str = "auto", suffix: str | None = None, system: str | None = DEFAULT_SYSTEM,
             out: str | None = None, strict: bool = True, progress: bool = True,
             random_direction: int | None = None) -> dict:
    """Accuracy (95% CI) of the base model, or of it with the adapter file `adapter`, on `n` problems of
    `split`: greedy, or `samples` sampled completions each (pass@k too). Scored by `reward` and leniently.
    `random_direction` (a seed): a control that replaces the adapter's v by a random vector of the same norm.
    """
    from tinylora.evaluation.evaluate import evaluate as score_problems
    from tinylora.io import load_adapter
    from tinylora.models import load_model
    model, data = model or ModelConfig(), data or DataConfig()
    checks = [("split", split in ("train", "test"), "'train' or 'test'"),
              ("samples", samples is None or samples >= 1, "an integer >= 1"),
              ("temperature", samples is None or temperature > 0, "> 0 when sampling"),
              ("n", n is None or n >= 1, "an integer >= 1"),
              ("max_new_tokens", max_new_tokens >= 1, "an integer >= 1"),
              ("batch_size", batch_size >= 1, "an integer >= 1")]
    for name, ok, expected in checks:
        if not ok:
            raise _bad(name, locals()[name], expected)
    if weights not in cpu_weights.CHOICES:
        raise ValueError(f"weights={weights!r} is invalid (--weights): expected {', '.join(cpu_weights.CHOICES)}")
    if suffix is None:
        suffix = data.instruction()
    net, tokenizer = load_model(model.model, model.dtype, model.device)
    ad = load_adapter(net, adapter, strict=strict) if adapter else None
    if random_direction is not None:
        _randomize_direction(ad, random_direction)
    problems = data.problems(split, n)
    result = score_problems(net, tokenizer, problems, adapter=ad, weights=weights, greedy=samples is None,
                            samples=samples or 1, max_new_tokens=max_new_tokens, temperature=temperature,
                            batch_size=batch_size, reward=reward, out_jsonl=out, seed=seed, suffix=suffix,
                            system=system, progress=progress)
    result.update(model=model.model, adapter=adapter, task=data.source, split=split)
    if random_direction is not None:
        result.update(random_direction=random_direction, v_norm=float(ad.v.detach().double().norm()))
    return result


def _randomize_direction(ad, seed: int) -> None:
    """v ← a seeded random direction scaled to v's norm: is a gain the trained direction, or any nudge this big?"""
    if ad is None or not ad.method.single_v:
        raise _bad("random_direction", seed, f"an --adapter of method {' or '.join(SINGLE_V)} to take the norm of")
    with torch.no_grad():
        d = torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ad.v.copy_((d / d.norm() * ad.v.double().norm()).to(ad.v.dtype))
