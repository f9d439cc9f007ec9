import json

import numpy as np
import pytest
from scipy import stats

from tinylora.cli.main import main
from tinylora.evaluation.paired import bootstrap_diff, compare, mcnemar_exact


def write_eval(path, correct, lenient=None, prompts=None):
    with open(path, "w") as f:
        for i, c in enumerate(correct):
            row = {"index": i, "prompt": (prompts or {}).get(i, f"q{i}"), "gold": str(i), "correct": bool(c)}
            if lenient is not None:
                row["lenient_correct"] = bool(lenient[i])
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("gained,lost", [(8, 10), (8, 26), (0, 5), (3, 0), (0, 0), (40, 41), (1, 12)])
def test_mcnemar_is_scipys_two_sided_binomial_test(gained, lost):
    expected = 1.0 if gained + lost == 0 else stats.binomtest(gained, gained + lost, 0.5).pvalue
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_matches_scipys_paired_percentile_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.random(200) < 0.45
    b = np.where(rng.random(200) < 0.8, a, rng.random(200) < 0.7)
    lo, hi = bootstrap_diff(a, b, seed=0)
    ref = stats.bootstrap((b.astype(float) - a.astype(float),), np.mean, n_resamples=10_000, method="percentile",
                          random_state=1).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)
    assert lo < b.mean() - a.mean() < hi
    assert bootstrap_diff(a, b, seed=0) == (lo, hi)  # seeded: the same interval every time


def test_compare_counts_gained_and_lost_per_rule(tmp_path, capsys):
    #            0  1  2  3  4  5  6  7  8  9
    strict_a = [1, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    strict_b = [1, 0, 1, 1, 1, 1, 0, 1, 1, 0]  # gained 2, 3, 4, 7; lost 1
    lenient_a = [1, 1, 1, 0, 0, 1, 0, 0, 1, 0]
    lenient_b = [1, 1, 1, 1, 0, 1, 0, 0, 1, 0]  # gained 3
    a = write_eval(tmp_path / "a.jsonl", strict_a, lenient_a)
    b = write_eval(tmp_path / "b.jsonl", strict_b, lenient_b)
    c = compare(a, b)
    assert c["n"] == 10
    assert (c["rule"]["gained"], c["rule"]["lost"]) == (4, 1)
    assert c["rule"]["diff"] == pytest.approx(0.3)
    assert c["rule"]["mcnemar_p"] == pytest.approx(stats.binomtest(4, 5).pvalue)
    assert (c["lenient"]["gained"], c["lenient"]["lost"]) == (1, 0)
    assert main(["eval", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "gained 4, lost 1" in out and "gained 1, lost 0" in out and "McNemar" in out


def test_compare_refuses_unpaired_files(tmp_path, capsys):
    a = write_eval(tmp_path / "a.jsonl", [1, 0, 1])
    b = write_eval(tmp_path / "b.jsonl", [1, 0])
    with pytest.raises(ValueError, match="different problems"):
        compare(a, b)
    c = write_eval(tmp_path / "c.jsonl", [1, 0, 1], prompts={1: "another question"})
    with pytest.raises(ValueError, match="problem 1 differs"):
        compare(a, c)
    (tmp_path / "d.jsonl").write_text('{"index": 0, "correct": true}\n{"index": 0, "correct": false}\n')
    assert main(["eval", "--compare", str(a), str(tmp_path / "d.jsonl")]) == 2
    assert "d.jsonl:2: a second row for problem 0" in capsys.readouterr().err
