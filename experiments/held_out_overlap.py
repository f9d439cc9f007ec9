"""How many held-out problems the study's runs trained on before training pools left them out.

Until training pools dropped every question of the evaluation set, the arithmetic pool (2,000 problems,
levels 1-2, generated from the run's seed) held some of the 200 held-out questions word for word. This
replays each setting's data order (the trainer's own `step_problems`) over the old pool and counts the
held-out problems a run drew, and the draws.

    python experiments/held_out_overlap.py
"""

from __future__ import annotations

from tinylora.api import DataConfig
from tinylora.training.config import TrainConfig, step_problems

SETTINGS = [(0, 20), (1, 20), (2, 20), (0, 100)]  # (seed, steps) of the study's runs


def main() -> None:
    data = DataConfig()
    held = {p.question for p in data.problems("test", data.eval_n)}
    print("| seed | steps × prompts | held-out questions in the pool | of them drawn in training | draws |")
    print("|---|---|---|---|---|")
    for seed, steps in SETTINGS:
        pool = data.raw_split("train", data.n, seed)  # the pool as it was: nothing left out
        cfg = TrainConfig(steps=steps, seed=seed)
        drawn = [p.question for s in range(steps) for p in step_problems(pool, cfg, s)]
        leaked = [q for q in drawn if q in held]
        in_pool = len({p.question for p in pool} & held)
        print(f"| {seed} | {steps} × {cfg.batch_prompts} | {in_pool} | {len(set(leaked))} | {len(leaked)} |")


if __name__ == "__main__":
    main()
