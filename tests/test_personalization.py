"""experiments/personalization.py: the simulated users' data and the reward that checks their style."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "personalization", Path(__file__).resolve().parent.parent / "experiments" / "personalization.py")
personalization = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(personalization)


def test_the_reward_wants_an_answer_line_in_the_users_style():
    worked, direct, other_number = "17 + 5 = 22\n#### 22", "#### 22", "17 + 5 = 21\n#### 21"
    got = personalization.liked([worked, direct, other_number, worked, direct, "22", "22 = 22"], ["22"] * 7,
                                ["worked", "worked", "worked", "direct", "direct", "direct", "worked"])
    # the number is not checked; "22" alone has no "####" line: not an answer
    assert got == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_users_data_tags_every_row_with_its_user_and_style(tmp_path):
    path = tmp_path / "users.jsonl"
    personalization.write_users(path, users=6, rows=5, seed=3)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 30
    assert all(r["question"].endswith(personalization.INSTRUCTION) for r in rows)  # one instruction for all
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user"], set()).add(r["style"])
    assert sorted(by_user) == [f"user{u:04d}" for u in range(6)]
    assert all(len(s) == 1 for s in by_user.values())  # one style per user
    assert [next(iter(by_user[f"user{u:04d}"])) for u in range(6)] == ["worked", "direct"] * 3
    personalization.write_users(tmp_path / "again.jsonl", users=6, rows=5, seed=3)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()  # seeded
