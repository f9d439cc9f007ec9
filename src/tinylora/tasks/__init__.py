"""Tasks: where problems come from. Each yields Problem(question, answer, solution, extra columns)."""

from __future__ import annotations

from tinylora.tasks.problem import Problem

TASKS = ("arithmetic", "gsm8k", "jsonl")


def without_questions(problems: list[Problem], held_out: list[Problem]) -> tuple[list[Problem], int]:
    """(`problems` less those whose question, stripped, is also one of `held_out`'s; how many were dropped)."""
    seen = {p.question.strip() for p in held_out}
    kept = [p for p in problems if p.question.strip() not in seen]
    return kept, len(problems) - len(kept)


def load_task(name: str, split: str = "train", n: int | None = None, seed: int = 0, *,
              prompt_template: str | None = None, **kwargs) -> list[Problem]:
    """Problems of a task: 'arithmetic' (generated offline), 'gsm8k' (hub or local folder), or a .jsonl path
    (`prompt_template`: its question, filled from each row's columns)."""
    if name == "arithmetic":
        from tinylora.tasks.arithmetic import generate
        return generate(n or 1000, seed=seed + (0 if split == "train" else 10_000), **kwargs)
    if name == "gsm8k":
        from tinylora.tasks.gsm8k import load_gsm8k
        problems = load_gsm8k(split, **kwargs)
    elif name.endswith(".jsonl"):
        from tinylora.tasks.jsonl import load_jsonl
        problems = load_jsonl(name, prompt_template)
    else:
        raise ValueError(f"unknown task {name!r}: expected one of 'arithmetic', 'gsm8k', or a path to a .jsonl file")
    return problems[:n] if n else problems
