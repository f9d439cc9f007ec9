"""The user's own data: one JSON object per line with "question" and "answer" ("solution" optional).

"answer" may be a bare final answer ("42") or a GSM8K-style solution ending in "#### 42".
"""

from __future__ import annotations

import json
from pathlib import Path

from . import Problem


def load_jsonl(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    problems = []
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
            missing = [k for k in ("question", "answer") if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; each line needs "
                                 "\"question\" and \"answer\"")
            q, a = row["question"], str(row["answer"])
            if not isinstance(q, str) or not q.strip() or not a.strip():
                raise ValueError(f"{path}:{lineno}: \"question\" and \"answer\" must be non-empty strings")
            solution = row.get("solution") or (a if "####" in a else "")
            problems.append(Problem(q, a.split("####")[-1].strip().replace(",", ""), solution))
    if not problems:
        raise ValueError(f"{path}: no problems found (empty file?)")
    return problems
