"""Tasks: where problems come from, one file each (arithmetic, gsm8k, jsonl). A task file owns its problems
(`load`: Problem(question, answer, solution, extra columns)), the answer-format instruction appended to each
question (`INSTRUCTION`), and how its gold answers are read; adding a task is one file and one name in TASKS."""

from __future__ import annotations

import importlib

from tinylora.tasks.problem import Problem

TASKS = ("arithmetic", "gsm8k", "jsonl")


def without_questions(problems: list[Problem], held_out: list[Problem]) -> tuple[list[Problem], int]:
    """(`problems` less those whose question, stripped, is also one of `held_out`'s; how many were dropped)."""
    seen = {p.question.strip() for p in held_out}
    kept = [p for p in problems if p.question.strip() not in seen]
    return kept, len(problems) - len(kept)


def _task_module(name: str):
    """The file that owns a task: its problems (`load`) and the instruction appended to each question."""
    if name.endswith(".jsonl"):
        name = "jsonl"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of 'arithmetic', 'gsm8k', or a path to a .jsonl file")
    return importlib.import_module(f"tinylora.tasks.{name}")


def instruction(name: str, prompt_template: str | None = None) -> str:
    """The answer-format instruction task `name` appends to each question ("" under a prompt template)."""
    task = _task_module(name)
    return task.TEMPLATE_INSTRUCTION if prompt_template else task.INSTRUCTION


def load_task(name: str, split: str = "train", n: int | None = None, seed: int = 0, *,
              prompt_template: str | None = None, **kwargs) -> list[Problem]:
    """Problems of a task: 'arithmetic' (generated offline), 'gsm8k' (hub or local folder), or a .jsonl path
    (`prompt_template`: its question, filled from each row's columns)."""
    task = _task_module(name)
    if task.__name__.endswith(".jsonl"):
        problems = task.load_jsonl(name, prompt_template)
        return problems[:n] if n else problems
    return task.load(split, n, seed, **kwargs)
