"""Rewards: 1.0 if the completion's final answer equals the gold answer, else 0.0. Never raise.

strict  — the paper's GSM8K rule: the last "#### <number>" must equal the gold number.
boxed   — the last \\boxed{...}, compared with math-verify (symbolic equality: 1/2 == 0.5).
lenient — the last number anywhere in the completion equals the gold, whatever the format. Every
          evaluation reports it beside the chosen rule: gains that only teach the format shrink under it.
"""

from __future__ import annotations

import logging
import re

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


REWARDS = {"strict": (strict_reward, extract_strict), "boxed": (boxed_reward, extract_boxed),
           "lenient": (lenient_reward, extract_last_number)}
