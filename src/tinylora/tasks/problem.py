"""A problem of any task: question, gold answer, worked solution and the data file's own columns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the gold final answer, e.g. "42"
    solution: str = ""  # a worked solution ending in "#### <answer>" (used by SFT)
    extra: dict = field(default_factory=dict, compare=False)  # a data file's raw columns (custom rewards)

    @property
    def columns(self) -> dict:
        """Every column of this row, as a reward function receives them (TRL's keyword arguments)."""
        return {"question": self.question, "answer": self.answer, "solution": self.solution, **self.extra,
                "gold": self.answer}  # `gold`: the final answer as the built-in rules compare it
