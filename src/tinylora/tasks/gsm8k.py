"""GSM8K (OpenAI, MIT): from a local folder of train.jsonl/test.jsonl, or from the hub (openai/gsm8k)."""

from __future__ import annotations

import os
from pathlib import Path

from tinylora.tasks.jsonl import load_jsonl
from tinylora.tasks.problem import Problem
from tinylora.tasks.prompts import DEFAULT_SUFFIX

INSTRUCTION = DEFAULT_SUFFIX  # gold answers are GSM8K's "#### <number>" lines: ask for the same

ENV_DIR = "TINYLORA_GSM8K_DIR"


def load(split: str, n: int | None, seed: int = 0, data_dir: str | None = None) -> list[Problem]:
    problems = load_gsm8k(split, data_dir)
    return problems[:n] if n else problems


def gold_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def load_gsm8k(split: str = "test", data_dir: str | None = None) -> list[Problem]:
    """Local folder (argument or $TINYLORA_GSM8K_DIR) if given, else the hub via `datasets`."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K has splits 'train' and 'test', not {split!r}")
    data_dir = data_dir or os.environ.get(ENV_DIR)
    if data_dir:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the GSM8K folder must hold train.jsonl and test.jsonl")
        return load_jsonl(path)
    try:
        from datasets import load_dataset
        rows = load_dataset("openai/gsm8k", "main", split=split)
    except Exception as e:
        raise SystemExit(f"could not load openai/gsm8k from the hub ({e}); offline, pass --gsm8k-dir DIR or set "
                         f"{ENV_DIR} to a folder holding train.jsonl and test.jsonl") from e
    return [Problem(r["question"], gold_answer(r["answer"]), r["answer"]) for r in rows]
