"""Rewards: 1.0 if the completion's final answer equals the gold answer, else 0.0. Never raise.

Or your own: `--reward my_rewards.py:brevity` (or `package.module:function`) with TRL's signature,
`reward(completions, prompts, **columns) -> list[float | None]`: the completions of a batch, their
prompts, and every column of the data set as a list per column, as written in the file (`answer`,
`question`, your own), plus `gold`: the final answer as the built-in rules compare it.
None means "no score" for that sample: it gets no advantage and is left out of the reward mean.

strict  — the paper's GSM8K rule: the last "#### <number>" must equal the gold number.
boxed   — the last \\boxed{...}, compared with math-verify (symbolic equality: 1/2 == 0.5).
lenient — the last number anywhere in the completion equals the gold, whatever the format. Every
          evaluation reports it beside the chosen rule: gains that only teach the format shrink under it.

Two controls, for telling a real gain from a side effect (train with them, evaluate with a real rule):
format  — 1.0 whenever the completion ends its answer as "#### <number>", right or wrong.
random  — a fair coin per completion, fixed by a hash of the completion and the gold (so a resumed run
          scores the same), blind to correctness (Qwen models are reported to gain from such rewards).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import logging
import math
import numbers
import re
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_HASH_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """'1,234' → 1234.0, '-3.50' → -3.5; None if it is not a number."""
    try:
        return float(text.replace(",", "").strip().rstrip("."))
    except (ValueError, AttributeError):
        return None


def extract_strict(completion: str) -> str | None:
    matches = _HASH_ANSWER.findall(completion)
    return matches[-1].replace(",", "") if matches else None


def strict_reward(completion: str, gold: str) -> float:
    try:
        return _same_number(extract_strict(completion), gold)
    except Exception as e:  # a reward must never take training down
        log.warning("strict reward failed on %r: %s", str(completion)[-80:], e)
        return 0.0


def extract_boxed(completion: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = completion.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(completion)):
        depth += {"{": 1, "}": -1}.get(completion[j], 0)
        if depth == 0:
            return completion[i:j]
    return None


def boxed_reward(completion: str, gold: str) -> float:
    try:
        from math_verify import parse, verify
        inner = extract_boxed(completion)
        if inner is None:
            return 0.0
        return float(verify(parse(f"${gold}$"), parse(f"$\\boxed{{{inner}}}$")))
    except Exception as e:
        log.warning("boxed reward failed on %r: %s", str(completion)[-80:], e)
        return 0.0


def extract_last_number(completion: str) -> str | None:
    matches = _NUMBER.findall(completion)
    return matches[-1].replace(",", "") if matches else None


def _same_number(got: str | None, gold: str) -> float:
    a, b = parse_number(got or ""), parse_number(gold)
    return float(a is not None and b is not None and abs(a - b) < 1e-9 * max(1.0, abs(b)))


def lenient_reward(completion: str, gold: str) -> float:
    try:
        return _same_number(extract_last_number(completion), gold)
    except Exception as e:
        log.warning("lenient reward failed on %r: %s", str(completion)[-80:], e)
        return 0.0


def format_reward(completion: str, gold: str) -> float:
    return float(extract_strict(completion) is not None)


def random_reward(completion: str, gold: str) -> float:
    return float(hashlib.sha256(f"{gold}\0{completion}".encode()).digest()[0] & 1)


REWARDS = {"strict": (strict_reward, extract_strict), "boxed": (boxed_reward, extract_boxed),
           "lenient": (lenient_reward, extract_last_number),
           "format": (format_reward, extract_strict), "random": (random_reward, None)}


RewardFn = Callable[..., list]  # (completions, prompts, **columns) -> list[float | None]


def pairwise(fn: Callable[[str, str], float]) -> RewardFn:
    """A (completion, gold answer) -> float rule as a batch reward over the `gold` column."""
    def reward(completions, gold, **_):
        return [fn(c, a) for c, a in zip(completions, gold)]
    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


@functools.lru_cache(maxsize=None)
def load_reward(spec: str) -> RewardFn:
    """A built-in rule by name ('strict', 'boxed', 'lenient'), or FILE.py:function / module:function."""
    if spec in REWARDS:
        return pairwise(REWARDS[spec][0])
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward {spec!r}: expected one of {', '.join(REWARDS)}, FILE.py:function or "
                         "module:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"reward file not found: {path}")
        mod_name = f"tinylora_reward_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module  # so pickling-free helpers like dataclasses inside it work
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward file {path} failed to import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


def is_builtin(spec: str) -> bool:
    return spec in REWARDS


def score(reward_fn: RewardFn, completions: list[str], prompts: list[str], columns: list[dict]) -> list:
    """Call a batch reward with TRL's keyword arguments and check what it returns: one float (or None)
    per completion. `columns`: one dict per completion (its problem's columns)."""
    keys = dict.fromkeys(k for c in columns for k in c if k not in ("completions", "prompts"))
    kwargs = {k: [c.get(k) for c in columns] for k in keys}
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    out = reward_fn(completions=completions, prompts=prompts, **kwargs)
    try:
        out = list(out)
    except TypeError:
        raise ValueError(f"reward function {name} returned {type(out).__name__}, expected a list of floats") from None
    if len(out) != len(completions):
        raise ValueError(f"reward function {name} returned {len(out)} values for {len(completions)} completions")
    for x in out:
        if x is not None and (not isinstance(x, numbers.Real) or not math.isfinite(x)):
            raise ValueError(f"reward function {name} returned {x!r}: expected finite floats or None")
    return [None if x is None else float(x) for x in out]
