"""The statistics evaluation reports, checked against independent references: Wilson intervals against scipy
and hand-computed bounds, pass@k against the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

The library's Wilson interval has no continuity correction (scipy's method='wilson', not 'wilsoncc') and uses
z = 1.96 rather than the exact 97.5% normal quantile 1.959964...; the tests compare like with like: the same z
on both sides, and the printed 4-decimal values hold for either.
pass@k: `evaluate(samples=k)` draws exactly k samples per problem, so its pass_at_k is the estimator with n = k
(a problem counts when any of its k samples is correct), averaged over problems.
"""

import itertools
import math
import re
from types import SimpleNamespace

import pytest
from scipy.stats import binomtest, norm

from tinylora.evaluation.evaluate import evaluate, wilson_interval
from tinylora.generation.engine import Engine
from tinylora.tasks import Problem
from tinylora.testing import tiny_model_and_tokenizer

Z_LIBRARY = 1.96
CONFIDENCE_OF_Z_LIBRARY = 2 * norm.cdf(Z_LIBRARY) - 1  # 0.950004...: the level whose two-sided z is exactly 1.96


def scipy_wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return ci.low, ci.high


@pytest.mark.parametrize("k, n, low, high", [
    # by hand, z = 1.96, z² = 3.8416: for k = 0 the upper bound is z² / (n + z²) = 3.8416 / 13.8416 = 0.27754;
    # for k = n the lower bound is n / (n + z²) = 10 / 13.8416 = 0.72246
    (0, 10, 0.0000, 0.2775),
    (10, 10, 0.7225, 1.0000),
    # 43/100: centre (0.43 + 0.019208) / 1.038416 = 0.43224, half 1.96 * sqrt(0.002451 + 0.00009604) / 1.038416
    # = 0.09526 -> (0.3373, 0.5278)
    (43, 100, 0.3373, 0.5278),
    (1, 2, 0.0945, 0.9055),
])
def test_wilson_interval_matches_hand_computed_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert round(got[0], 4) == low and round(got[1], 4) == high, got
    ref = scipy_wilson(k, n)  # scipy with its own z = 1.959964: the same to 4 decimals
    assert round(ref[0], 4) == low and round(ref[1], 4) == high, ref


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 10), (10, 10), (43, 100), (1, 2), (5, 7), (3, 3), (17, 40),
                                  (200, 1000), (999, 1000), (1, 100_000)])
def test_wilson_interval_matches_scipy(k, n):
    # the default z = 1.96 against scipy at the confidence level whose z is 1.96
    assert wilson_interval(k, n) == pytest.approx(scipy_wilson(k, n, CONFIDENCE_OF_Z_LIBRARY), abs=1e-12)
    # and with scipy's own 95% quantile passed in, the same interval scipy reports at 0.95
    assert wilson_interval(k, n, z=norm.ppf(0.975)) == pytest.approx(scipy_wilson(k, n), abs=1e-12)
    # not the continuity-corrected interval (which is wider): the library's is the plain Wilson score
    cc = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE_OF_Z_LIBRARY, method="wilsoncc")
    assert cc.high - cc.low > wilson_interval(k, n)[1] - wilson_interval(k, n)[0]


def test_wilson_interval_of_no_samples_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator: the chance that k of n samples (c of them correct), drawn without replacement,
    include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 0, 1, 0.0),  # c = 0: never
    (5, 5, 3, 1.0),  # c = n: always
    (5, 3, 3, 1.0),  # n - c = 2 < k = 3: any 3 of 5 include a correct one
    (5, 2, 1, 2 / 5),  # k = 1: c / n
    (5, 2, 2, 7 / 10),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    (10, 3, 5, 11 / 12),  # 1 - C(7, 5) / C(10, 5) = 1 - 21/252
    (4, 1, 4, 1.0),  # n = k: 1 as soon as one is correct
    (4, 0, 4, 0.0),
])
def test_pass_at_k_reference_by_hand_and_by_enumeration(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)
    # enumeration of every k-subset of n samples whose first c are correct
    subsets = list(itertools.combinations(range(n), k))
    assert sum(any(i < c for i in s) for s in subsets) / len(subsets) == pytest.approx(expected, abs=1e-15)


def scripted(monkeypatch, correct_of_problem: dict[int, int]):
    """The engine answers problem `i` ("q{i} ?", gold i) with `correct_of_problem[i]` correct samples first
    (strict and lenient: "#### i") and wrong ones after ("#### 999")."""
    def generate(self, prompts, *, repeats=1, **kwargs):
        out = []
        for p in prompts:
            i = int(re.search(r"q(\d+) \?", p).group(1))
            out += [f"#### {i}" if j < correct_of_problem[i] else "#### 999" for j in range(repeats)]
        return SimpleNamespace(completions=out)
    monkeypatch.setattr(Engine, "generate", generate)


@pytest.mark.parametrize("k", [1, 4])
def test_evaluate_reports_pass_at_k_and_wilson_intervals_against_references(monkeypatch, k):
    model, tok = tiny_model_and_tokenizer("llama")
    counts = [0, 1, k, 2 % (k + 1), k, 0, 3 % (k + 1)]  # c = 0, c = n, and partial counts
    problems = [Problem(f"q{i} ?", str(i)) for i in range(len(counts))]
    scripted(monkeypatch, dict(enumerate(counts)))
    result = evaluate(model, tok, problems, greedy=k == 1, samples=k, batch_size=8, progress=False)
    total = sum(counts)
    n_samples = k * len(problems)
    assert result["n_samples"] == n_samples
    assert result["accuracy"] == pytest.approx(total / n_samples, abs=1e-15)
    assert result["lenient_accuracy"] == pytest.approx(total / n_samples, abs=1e-15)
    ref_ci = scipy_wilson(total, n_samples, CONFIDENCE_OF_Z_LIBRARY)
    assert result["ci95"] == pytest.approx(list(ref_ci), abs=1e-12)
    assert result["lenient_ci95"] == pytest.approx(list(ref_ci), abs=1e-12)
    if k == 1:
        assert "pass_at_k" not in result  # greedy: one sample, nothing beyond accuracy
        return
    expected = sum(pass_at_k(k, c, k) for c in counts) / len(counts)
    assert expected == pytest.approx(5 / 7)  # 5 of the 7 problems have a correct sample
    assert result["pass_at_k"] == pytest.approx(expected, abs=1e-15)
    assert result["lenient_pass_at_k"] == pytest.approx(expected, abs=1e-15)
