"""Personalization: simulated users, each with a preferred answer style, one tiny adapter each, trained together.

Every user asks arithmetic questions (levels 1-2, their own seed) and likes one of two styles:
  worked: the calculation, then the answer line ("17 + 5 = 22" then "#### 22"),
  direct: the answer line alone ("#### 22").
Each question carries one instruction that allows both (INSTRUCTION: "You may show the calculation first"),
so nothing in the prompt says which the user wants: the adapter has to learn it. The base model answers
directly about 4 times in 5 and shows the calculation about 1 in 5, so both kinds of user have something to
move toward. The reward is 1 for a "#### <number>" answer line in the user's style, else 0; the number is
not checked (the preference is about form: correctness is the arithmetic task's own reward).

    python experiments/personalization.py data runs/users.jsonl --users 200
    tinylora train --data runs/users.jsonl --adapter-column user --suffix '' \
        --reward experiments/personalization.py:liked --eval-n 4 --steps 6 --batch-prompts 2 --group-size 4 \
        --lr 0.1 --out runs/personalization
    tinylora serve --adapters runs/personalization/adapters.pack       # "model": "user0007"
    python experiments/personalization.py report runs/personalization  # reward by style, before and after

README ("One adapter per user") reports a run of it: reward before and after per user, bytes per user, wall.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tinylora.tasks.arithmetic import generate
from tinylora.tasks.rewards import format_reward

STYLES = ("worked", "direct")
INSTRUCTION = ("\nYou may show the calculation first. Give the final answer on the last line as "
               "\"#### <number>\".")


def in_style(completion: str, style: str) -> bool:
    """worked: an "=" before the first "####" (a calculation shown); direct: none. A simulated user's
    preference, checked loosely: text after the answer line is not looked at."""
    shown = "=" in completion.split("####")[0]
    return shown if style == "worked" else not shown


def liked(completions, answer, style, **columns) -> list[float]:
    """The reward: an answer line ("#### <number>") in the user's style."""
    return [float(format_reward(c, a) == 1.0 and in_style(c, s)) for c, a, s in zip(completions, answer, style)]


def write_users(path: Path, users: int, rows: int, seed: int) -> None:
    """`users` users of alternating styles, `rows` problems each, every row tagged with its user and style."""
    lines = []
    for u in range(users):
        style = STYLES[u % len(STYLES)]
        for p in generate(rows, seed=seed * 100_003 + u, levels=(1, 2)):
            lines.append({"user": f"user{u:04d}", "style": style, "question": p.question + INSTRUCTION,
                          "answer": p.answer})
    random.Random(seed).shuffle(lines)  # users' rows interleaved, as a log would have them
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"{path}: {users} users x {rows} rows ({', '.join(STYLES)} alternating)")


def report(run: Path) -> None:
    """Reward before and after, over all users and by style (from the run's eval_*.json and its data)."""
    summary = json.loads((run / "summary.json").read_text())
    base, final = (json.loads((run / f"eval_{k}.json").read_text()) for k in ("base", "final"))
    style = {}
    for line in Path(summary["data"]).read_text().splitlines():
        row = json.loads(line)
        style[row["user"]] = row["style"]
    for s in (None, *STYLES):
        users = [u for u in final if s is None or style[u] == s]
        if not users:
            continue
        b = sum(base[u] for u in users) / len(users)
        f = sum(final[u] for u in users) / len(users)
        better = sum(final[u] > base[u] for u in users)
        worse = sum(final[u] < base[u] for u in users)
        print(f"{s or 'all':>7}: {len(users)} users, reward {b:.3f} -> {f:.3f} ({better} better, {worse} worse)")
    print(f"pack: {summary['pack_bytes']:,} bytes, {summary['bytes_per_adapter']:.0f} per user; "
          f"wall {summary['wall_seconds'] / 60:.1f} min ({summary['steps']} steps)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    d = sub.add_parser("data", help="write the users' JSONL")
    d.add_argument("out", type=Path)
    d.add_argument("--users", type=int, default=256)
    d.add_argument("--rows", type=int, default=24, help="problems per user (the last --eval-n are held out)")
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="reward by style from a finished run")
    r.add_argument("run", type=Path)
    args = p.parse_args()
    if args.action == "data":
        write_users(args.out, args.users, args.rows, args.seed)
    else:
        report(args.run)


if __name__ == "__main__":
    main()
