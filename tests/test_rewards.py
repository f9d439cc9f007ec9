import pytest

from tinylora.tasks.rewards import boxed_reward, extract_boxed, extract_strict, strict_reward


@pytest.mark.parametrize("completion,gold,expected", [
    ("so 3 + 4 = 7\n#### 7", "7", 1.0),
    ("#### 7.", "7", 1.0),
    ("####7", "7", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("#### 1234", "1,234", 1.0),
    ("#### -5", "-5", 1.0),
    ("#### -5", "5", 0.0),
    ("#### 3.50", "3.5", 1.0),
    ("#### 0.5", "1/2", 0.0),  # strict compares numbers; fractions are for the boxed rule
    ("#### $12", "12", 1.0),
    ("#### 3\nwait, no\n#### 4", "4", 1.0),  # the last one counts
    ("#### 3\nwait, no\n#### 4", "3", 0.0),
    ("The answer is 7", "7", 0.0),  # no #### -> 0 under the strict rule
    ("", "7", 0.0),
    ("#### seven", "7", 0.0),
    ("#### 7", "not a number", 0.0),
])
def test_strict(completion, gold, expected):
    assert strict_reward(completion, gold) == expected


def test_strict_never_raises():
    for bad in [None, 12, b"#### 1", "#### " + "9" * 5000]:
        assert strict_reward(bad, "1") in (0.0, 1.0)
    assert extract_strict("a #### 1,000 b") == "1000"


@pytest.mark.parametrize("completion,gold,expected", [
    ("so \\boxed{7}", "7", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{2}{4}", 1.0),
    ("\\boxed{3} then \\boxed{4}", "4", 1.0),
    ("\\boxed{-2}", "2", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("no box 7", "7", 0.0),
    ("\\boxed{\\frac{1}{", "0.5", 0.0),
])
def test_boxed(completion, gold, expected):
    assert boxed_reward(completion, gold) == expected


def test_boxed_nested_and_never_raises():
    assert extract_boxed("x \\boxed{\\sqrt{\\frac{1}{4}}} y") == "\\sqrt{\\frac{1}{4}}"
    for bad in [None, 5, "\\boxed{}}}}", "\\boxed{\\undefinedmacro{x}}"]:
        assert boxed_reward(bad, "1") in (0.0, 1.0)


@pytest.mark.parametrize("completion,gold,expected", [
    ("The answer is 7", "7", 1.0),  # no format needed
    ("3 + 4 = 7\n#### 7", "7", 1.0),
    ("#### 7 because 3 + 4 makes 8", "7", 0.0),  # the last number counts, whatever the format says
    ("so she has 1,234 apples.", "1234", 1.0),
    ("a loss of -5", "-5", 1.0),
    ("it costs $3.50.", "3.5", 1.0),
    ("seven", "7", 0.0),
    ("", "7", 0.0),
])
def test_lenient_reward_takes_the_last_number(completion, gold, expected):
    from tinylora.tasks.rewards import lenient_reward
    assert lenient_reward(completion, gold) == expected


# (completion, gold, strict verdict, lenient verdict), the verdicts by hand
SIDE_BY_SIDE = [
    ("3 + 4 = 7\n#### 7", "7", True, True),
    ("The answer is 7", "7", False, True),  # no ####
    ("#### 7 because 3 + 4 makes 8", "7", True, False),  # the last number is 8
    ("#### 5", "6", False, False),
    ("so she has 1,234 apples.\n#### 1,234", "1234", True, True),
    ("seven", "7", False, False),
    ("it costs $3.50.", "3.5", False, True),
]


def test_evaluation_scores_strict_and_lenient_side_by_side(monkeypatch, tmp_path):
    import json
    import re
    from types import SimpleNamespace

    from scipy.stats import binomtest, norm

    from tinylora.evaluation.evaluate import evaluate
    from tinylora.generation.engine import Engine
    from tinylora.tasks import Problem
    from tinylora.testing import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("llama")
    problems = [Problem(f"q{i} ?", gold) for i, (_, gold, _, _) in enumerate(SIDE_BY_SIDE)]

    def generate(self, prompts, **kwargs):  # the model "answers" question i with completion i
        return SimpleNamespace(completions=[SIDE_BY_SIDE[int(re.search(r"q(\d+) \?", p)[1])][0] for p in prompts])
    monkeypatch.setattr(Engine, "generate", generate)
    result = evaluate(model, tok, problems, max_new_tokens=4, batch_size=3, progress=False,
                      out_jsonl=tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["correct"], r["lenient_correct"]) for r in rows] == \
        [(c, strict, lenient) for c, _, strict, lenient in SIDE_BY_SIDE]
    assert result["accuracy"] == pytest.approx(3 / 7) and result["lenient_accuracy"] == pytest.approx(4 / 7)

    def wilson(k, n):  # scipy's Wilson score interval (no continuity correction) at the level of z = 1.96
        ci = binomtest(k, n).proportion_ci(confidence_level=2 * norm.cdf(1.96) - 1, method="wilson")
        return [ci.low, ci.high]
    assert result["ci95"] == pytest.approx(wilson(3, 7), abs=1e-12)
    assert result["lenient_ci95"] == pytest.approx(wilson(4, 7), abs=1e-12)
