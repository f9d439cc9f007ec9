"""Evaluation: accuracy with a 95% Wilson interval, and one JSONL row per sample."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tinylora.atomic import atomic_write_text
from tinylora.evaluation.config import EVAL_DEFAULTS
from tinylora.generation.engine import Engine
from tinylora.generation.weights import for_generation
from tinylora.tasks import Problem
from tinylora.tasks.prompts import DEFAULT_SYSTEM, chat_prompts
from tinylora.tasks.rewards import (
    REWARDS,
    extract_last_number,
    is_builtin,
    lenient_reward,
    load_reward,
    parse_number,
    score,
)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean (for rewards that are not 0/1)."""
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 1.0)
    m = sum(values) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))
    return m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n)


def evaluate(model, tokenizer, problems: list[Problem], *, adapter=None, samples: int = 1, greedy: bool = True,
             max_new_tokens: int = EVAL_DEFAULTS.max_new_tokens, temperature: float = EVAL_DEFAULTS.temperature,
             batch_size: int = EVAL_DEFAULTS.batch_size, reward: str = "strict",
             suffix: str | None = None, system: str | None = DEFAULT_SYSTEM, seed: int = 0,
             out_jsonl: str | Path | None = None, progress: bool = True, desc: str = "eval", weights="merged",
             exact: bool = False) -> dict:
    """Score `problems` (greedy, or `samples` sampled completions each) by the `reward` rule, and, where
    every gold answer is a number, by the lenient rule beside it (the last number in the completion equals
    the gold): `accuracy`/`ci95` and `lenient_accuracy`/`lenient_ci95`, both verdicts on every JSONL row.

    `reward` is a built-in rule's name or FILE.py:function / module:function (see `rewards`): `accuracy`
    is then the mean reward over the scored samples (the fraction correct for a 0/1 reward), its interval
    Wilson's for 0/1 rewards and the normal approximation otherwise.
    The model generates with `weights`: a GenerationWeights, or a choice for `for_generation` (default
    merged: the adapter folded into the weights; `exact`: restored bit for bit after, as training that goes
    on after the evaluation needs).

    With `out_jsonl`, rows go to `out_jsonl`.partial batch by batch, so a killed evaluation resumes: a
    call with the same settings, model state and problems reuses the whole batches there (generation is
    seeded per batch, so the result is the same) and generates only the rest.
    """
    if isinstance(weights, str):
        weights = for_generation(model, weights, trains_base=adapter is not None and adapter.method.trains_base,
                                 exact=exact)
    reward_fn = load_reward(reward)
    extract = REWARDS[reward][1] if is_builtin(reward) else None
    lenient = all(parse_number(p.answer) is not None for p in problems)
    k = 1 if greedy else samples
    per_batch = max(1, batch_size // k)  # problems per batch; each is prefilled once for its k samples
    partial = Path(str(out_jsonl) + ".partial") if out_jsonl else None
    resume_key = partial and _resume_key(model, adapter, dict(  # only with a file: full FT hashes GBs
        reward=reward, k=k, greedy=greedy, temperature=None if greedy else temperature, max_new_tokens=max_new_tokens,
        per_batch=per_batch, suffix=suffix, system=system, seed=seed, weights=weights.label, exact=weights.exact,
        problems=[(p.question, p.answer) for p in problems]))
    rows = _resumable_rows(partial, resume_key, per_batch * k, len(problems) * k)
    starts = range(len(rows) // k, len(problems), per_batch)
    if rows:
        print(f"{desc}: resuming after {len(rows) // k} of {len(problems)} problems ({partial})", flush=True)
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w") as f:  # rewritten: drops a line a kill cut short
            f.writelines(json.dumps(r) + "\n" for r in [{"resume_key": resume_key}, *rows])
    engine = Engine(model, tokenizer, weights=weights, adapter=adapter)
    with engine.generating():  # entered once: a merge is not redone for every batch
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            chunk = problems[start:start + per_batch]
            prompts = chat_prompts(tokenizer, [p.question for p in chunk], suffix, system)
            ro = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                                 seed=seed + start, with_logprobs=False, repeats=k)
            scores = score(reward_fn, ro.completions, [pr for pr in prompts for _ in range(k)],
                           [p.columns for p in chunk for _ in range(k)])
            for j, (completion, r) in enumerate(zip(ro.completions, scores)):  # problem by problem, k each
                i, p, prompt = start + j // k, chunk[j // k], prompts[j // k]
                row = {"index": i, "prompt": prompt, "completion": completion, "gold": p.answer, "reward": r,
                       "correct": r is not None and r >= 1.0}
                if extract is not None:
                    row["extracted"] = extract(completion)
                if lenient:
                    row["lenient_extracted"] = extract_last_number(completion)
                    row["lenient_correct"] = bool(lenient_reward(completion, p.answer))
                rows.append(row)
            if partial:
                with open(partial, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows[-len(ro.completions):])
    result = {"n_problems": len(problems), "n_samples": len(rows), "samples_per_problem": k, "greedy": greedy,
              "reward": reward}
    values = [r["reward"] for r in rows if r["reward"] is not None]
    binary = all(x in (0.0, 1.0) for x in values)
    result["accuracy"] = sum(values) / max(len(values), 1)
    result["ci95"] = list(wilson_interval(sum(values), len(values)) if binary else mean_interval(values))
    if len(values) < len(rows):
        result["unscored"] = len(rows) - len(values)
    for prefix, key in (("", "correct"), ("lenient_", "lenient_correct")):
        if prefix and not lenient:
            continue
        if prefix:
            correct = sum(r[key] for r in rows)
            result[prefix + "accuracy"] = correct / max(len(rows), 1)
            result[prefix + "ci95"] = list(wilson_interval(correct, len(rows)))
        if k > 1:
            solved = {r["index"] for r in rows if r[key]}
            result[prefix + "pass_at_k"] = len(solved) / max(len(problems), 1)
    if out_jsonl:
        atomic_write_text(out_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        partial.unlink()
    return result


def _resume_key(model, adapter, settings: dict) -> str:
    """What an evaluation's rows depend on: its settings and problems, the model, and the adapter's
    trained numbers (none: the base model)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)).encode())
    if adapter is not None:
        h.update(adapter.config.to_json().encode())
        for name, t in sorted(adapter.trainable_state().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resumable_rows(partial: Path | None, key: str, batch_rows: int, all_rows: int) -> list[dict]:
    """The whole batches of rows a killed evaluation with the same `key` left in `partial`."""
    if partial is None or not partial.is_file():
        return []
    rows = []
    with open(partial) as f:
        try:
            if json.loads(next(f, "{}")).get("resume_key") != key:
                return []  # another model state or other settings: start over
            for line in f:
                rows.append(json.loads(line))
        except ValueError:  # a line cut short by the kill, and anything after it
            pass
    return rows if len(rows) >= all_rows else rows[:len(rows) // batch_rows * batch_rows]


def accuracy_line(e: dict, rule: str) -> str:
    """'43.0% [95% CI 36.3%–49.9%] (strict, n=200), 54.0% [...] (lenient: the last number)': how every command
    prints an evaluation."""
    def one(prefix: str) -> str:
        lo, hi = e[prefix + "ci95"]
        return f"{e[prefix + 'accuracy']:.1%} [95% CI {lo:.1%}–{hi:.1%}]"
    text = f"{one('')} ({rule}, n={e['n_samples']})"
    if "lenient_accuracy" in e:
        text += f", {one('lenient_')} (lenient: the last number)"
    return text
