"""experiments/gain_by_size.py: the fraction of rank-1 LoRA's gain each count of trained numbers recovers."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "gain_by_size", Path(__file__).resolve().parent.parent / "experiments" / "gain_by_size.py")
gain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gain)


def run(numbers, acc, lenient, lr="0.03", method="tinylora", r="", sweep="curve", **kw):
    return {"status": "done", "seed": "0", "steps": "20", "algo": "grpo", "method": method, "r": r, "lr": lr,
            "trainable_params": str(numbers), "final_acc": str(acc), "final_lenient": str(lenient),
            "base_acc": "0.4", "base_lenient": "0.5", "sweep": sweep, **kw}


def test_the_best_rate_of_each_size_against_lora_r1_by_hand():
    rows = [run(13, 0.55, 0.60), run(13, 0.70, 0.65, lr="0.01"),  # the best of two rates: 0.70
            run(549888, 0.90, 0.75, lr="0.0003", method="lora", r="1"),
            run(13, 0.99, 0.99, reward="random"), run(13, 0.99, 0.99, seed="1"),  # a control, another seed: left out
            run(13, 0.45, 0.55, sweep="scale")]  # another sweep (another pool): its own line
    lines = {(t["numbers"], t["sweep"]): t for t in gain.table(gain.best_runs(rows))}
    assert set(lines) == {(13, "curve"), (549888, "curve"), (13, "scale")}
    assert lines[13, "curve"]["lr"] == "0.01"
    assert lines[13, "curve"]["strict_of_ref"] == pytest.approx((0.70 - 0.4) / (0.90 - 0.4))  # 60%
    assert lines[13, "curve"]["lenient_of_ref"] == pytest.approx((0.65 - 0.5) / (0.75 - 0.5))  # 60%
    assert lines[13, "scale"]["strict_of_ref"] == pytest.approx(0.1)
    assert lines[549888, "curve"]["strict_of_ref"] == 1


def test_no_reference_or_no_reference_gain_gives_no_fraction():
    assert gain.fraction(0.6, 0.5, 0.5) is None
    lines = gain.table(gain.best_runs([run(13, 0.7, 0.7, model="embedded:other")]))
    assert lines[0]["strict_of_ref"] is None and lines[0]["model"] == "embedded:other"


def test_the_largest_per_module_run_of_the_same_sweep_is_the_second_reference():
    rows = [run(13, 0.60, 0.60, **{"n-tie": "16"}),
            run(196, 0.80, 0.70, **{"n-tie": "1"}), run(196, 0.90, 0.75, lr="0.01", **{"n-tie": "1"}),  # best: 0.90
            run(784, 0.99, 0.99, u="4", **{"n-tie": "1"}),  # u = 4: not the per-module run
            run(13, 0.50, 0.55, sweep="scale", **{"n-tie": "16"})]  # no n_tie = 1 run in its sweep
    lines = {(t["numbers"], t["sweep"]): t for t in gain.table(gain.best_runs(rows))}
    assert lines[13, "curve"]["strict_of_top"] == pytest.approx((0.60 - 0.4) / (0.90 - 0.4))  # 40%
    assert lines[13, "curve"]["lenient_of_top"] == pytest.approx((0.60 - 0.5) / (0.75 - 0.5))  # 40%
    assert lines[784, "curve"]["strict_of_top"] == pytest.approx((0.99 - 0.4) / 0.5)
    assert lines[13, "scale"]["strict_of_top"] is None and lines[13, "curve"]["strict_of_ref"] is None


def test_sweeps_on_one_pool_are_compared_as_one(tmp_path):
    import csv
    for name, rows in {"scale": [run(13, 0.62, 0.62, name="n-tie=16", **{"n-tie": "16"})],
                       "scale_curve": [run(196, 0.86, 0.86, name="n-tie=1", **{"n-tie": "1"})]}.items():
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "sweep"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    paths = [tmp_path / "scale.csv", tmp_path / "scale_curve.csv"]
    apart = {t["numbers"]: t for t in gain.table(gain.best_runs(gain.read_sweeps(paths)))}
    assert apart[13]["sweep"] == "scale" and apart[13]["strict_of_top"] is None
    pooled = {t["numbers"]: t for t in gain.table(gain.best_runs(gain.read_sweeps(paths, [["scale", "scale_curve"]])))}
    assert pooled[13]["sweep"] == "scale+scale_curve"
    assert pooled[13]["strict_of_top"] == pytest.approx((0.62 - 0.4) / (0.86 - 0.4))
