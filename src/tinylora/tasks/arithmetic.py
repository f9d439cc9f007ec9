"""Seeded arithmetic word problems, generated offline (the default task: no download needed).

Levels: 1 one operation ("a + b"), 2 two operations in a story, 3 a product and a sum in a story.
Every problem has a worked solution in GSM8K's format ("... #### 42") for SFT.
"""

from __future__ import annotations

import random

from tinylora.tasks.problem import Problem
from tinylora.tasks.prompts import DEFAULT_SUFFIX

INSTRUCTION = DEFAULT_SUFFIX  # appended to each question: a short calculation, then "#### <number>"

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mo", "Nia"]
ITEMS = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells", "stamps", "cookies"]


def _level1(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    if rng.random() < 0.5:
        return Problem(f"What is {a} + {b}?", str(a + b), f"{a} + {b} = {a + b}\n#### {a + b}")
    a, b = max(a, b), min(a, b)
    return Problem(f"What is {a} - {b}?", str(a - b), f"{a} - {b} = {a - b}\n#### {a - b}")


def _level2(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    q = f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. How many {item} does {name} have now?"
    s = f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}\n#### {a + b - c}"
    return Problem(q, str(a + b - c), s)


def _level3(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per, extra = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 20)
    q = (f"{name} buys {boxes} boxes of {item} with {per} {item} in each box, and already had {extra} {item}. "
         f"How many {item} does {name} have in total?")
    s = f"{boxes} * {per} = {boxes * per}\n{boxes * per} + {extra} = {boxes * per + extra}\n#### {boxes * per + extra}"
    return Problem(q, str(boxes * per + extra), s)


LEVELS = {1: _level1, 2: _level2, 3: _level3}


def load(split: str, n: int | None, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """`n` problems (default 1,000) of `split`: the test split is drawn from another seed range than train."""
    return generate(n or 1000, seed=seed + (0 if split == "train" else 10_000), levels=levels)


def generate(n: int, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """n problems, cycling through `levels`; the same seed gives the same problems."""
    rng = random.Random(seed)
    return [LEVELS[levels[i % len(levels)]](rng) for i in range(n)]
