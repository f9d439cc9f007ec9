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


def test_evaluation_scores_strict_and_lenient_side_by_side():
    from tinylora.evaluation.evaluate import evaluate
    from tinylora.tasks import Problem
    from tinylora.testing import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer("llama")
    problems = [Problem("1 + 1 ?", str(i)) for i in range(6)]
    result = evaluate(model, tok, problems, max_new_tokens=4, progress=False)
    assert {"accuracy", "ci95", "lenient_accuracy", "lenient_ci95"} <= set(result)
    assert result["lenient_ci95"][0] <= result["lenient_accuracy"] <= result["lenient_ci95"][1]
