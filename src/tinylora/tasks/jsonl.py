"""The user's own data: one JSON object per line.

Without a prompt template each row needs "question" and "answer" ("solution" optional); "answer" may be
a bare final answer ("42") or a GSM8K-style solution ending in "#### 42". With a template such as
"Reverse the word {word}." the question is the template filled from the row's columns, and "answer" is
optional (a custom reward reads whatever columns it needs). Every column reaches a custom reward.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tinylora.tasks.problem import Problem
from tinylora.tasks.prompts import DEFAULT_SUFFIX

# {question, answer} rows are scored by the "####" rule, so they ask for it; a prompt template is the whole
# message, so nothing is appended to it
INSTRUCTION, TEMPLATE_INSTRUCTION = DEFAULT_SUFFIX, ""


def template_fields(template: str) -> list[str]:
    """The column names a template uses: "Say {a} then {b}" → ["a", "b"]; a bad template raises."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt template {template!r}: {e}") from None
    if any(not n.isidentifier() for n in names):
        raise ValueError(f"prompt template {template!r}: fields must be column names like {{question}}")
    return names


def json_objects(path: str | Path, what: str = "data file"):
    """(line number, object) for every non-blank line of a JSONL file; a missing file, bad JSON or a line that
    is not an object raises, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def load_jsonl(path: str | Path, prompt_template: str | None = None) -> list[Problem]:
    path = Path(path)
    needed = template_fields(prompt_template) if prompt_template else ["question", "answer"]
    problems = []
    for lineno, row in json_objects(path):
        missing = [k for k in needed if k not in row]
        if missing:
            what = "the prompt template uses" if prompt_template else "each line needs"
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; {what} "
                             + ", ".join(f'"{k}"' for k in needed))
        q = prompt_template.format_map(row) if prompt_template else row["question"]
        a = "" if row.get("answer") is None else str(row["answer"])
        if not isinstance(q, str) or not q.strip() or (not prompt_template and not a.strip()):
            raise ValueError(f"{path}:{lineno}: \"question\" and \"answer\" must be non-empty strings")
        solution = str(row.get("solution") or (a if "####" in a else ""))
        extra = {k: v for k, v in row.items() if k != "question"}  # as written: a custom reward gets them raw
        problems.append(Problem(q, a.split("####")[-1].strip().replace(",", ""), solution, extra))
    if not problems:
        raise ValueError(f"{path}: no problems found (empty file?)")
    return problems
