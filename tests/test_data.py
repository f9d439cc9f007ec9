import json

import pytest

from tinylora.tasks import load_task
from tinylora.tasks.arithmetic import generate
from tinylora.tasks.gsm8k import load_gsm8k
from tinylora.tasks.jsonl import load_jsonl


def test_arithmetic_is_seeded_and_correct():
    a, b = generate(60, seed=1), generate(60, seed=1)
    assert a == b and a != generate(60, seed=2)
    for p in a:
        lines = [line for line in p.solution.splitlines() if "=" in line]
        for line in lines:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs)  # the worked solution is right
        assert p.solution.endswith(f"#### {p.answer}")
    level3 = generate(9, levels=(3,))
    assert all("boxes" in p.question and p.answer.isdigit() for p in level3)
    train, test = load_task("arithmetic", "train", 60), load_task("arithmetic", "test", 60)
    assert len(train) == 60 and train != test  # held-out problems come from another seed
    assert len({p.question for p in train} & {p.question for p in test}) < 6  # few chance collisions


def test_jsonl_errors_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: missing field\(s\) \['answer'\]"):
        load_jsonl(f)
    f.write_text('{"question": "1+1?", "answer": "2"}\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(f)
    f.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object"):
        load_jsonl(f)
    f.write_text('{"question": "", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: .*non-empty"):
        load_jsonl(f)
    f.write_text("")
    with pytest.raises(ValueError, match="no problems"):
        load_jsonl(f)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "none.jsonl")


def test_jsonl_accepts_gsm8k_style_answers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "3 * 4 = 12\n#### 1,200"}) + "\n"
                 + json.dumps({"question": "r", "answer": 7}) + "\n")
    a, b = load_jsonl(f)
    assert a.answer == "1200" and a.solution.endswith("#### 1,200")
    assert b.answer == "7" and b.solution == ""


def test_gsm8k_from_local_folder(tmp_path, monkeypatch):
    rows = [{"question": "Ann has 3 pens and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
            {"question": "Big?", "answer": "#### 1,000"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probs = load_gsm8k("test", data_dir=str(tmp_path))
    assert [p.answer for p in probs] == ["5", "1000"]
    monkeypatch.setenv("TINYLORA_GSM8K_DIR", str(tmp_path))
    assert load_task("gsm8k", "test", n=1)[0].answer == "5"
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_gsm8k("train")
    with pytest.raises(ValueError, match="splits"):
        load_gsm8k("validation")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu")


def test_training_pools_hold_no_held_out_question_for_every_task(tmp_path):
    from tinylora.api import DataConfig
    # generated: the default pool held 28 problems that are also held out ("What is a + b?" repeats)
    data = DataConfig()
    pool, dropped = data.training_pool(data.n, seed=0)
    held = {p.question for p in data.problems("test", 200)}
    old = data.raw_split("train", data.n, seed=0)
    assert dropped == sum(p.question in held for p in old) > 0 and len(pool) == len(old) - dropped
    assert not {p.question for p in pool} & held
    assert data.problems("test", 200) == data.raw_split("test", 200)  # the evaluation set itself is unchanged
    # GSM8K-shaped folder whose train split repeats a test question
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rows = lambda qs: "".join(json.dumps({"question": q, "answer": f"so #### {i}"}) + "\n" for i, q in enumerate(qs))  # noqa: E731
    (folder / "test.jsonl").write_text(rows(["Q1?", "Q2?"]))
    (folder / "train.jsonl").write_text(rows(["T1?", " Q2? ", "T2?"]))
    gsm = DataConfig(task="gsm8k", gsm8k_dir=str(folder), eval_n=2)
    assert [p.question for p in gsm.problems("train", None)] == ["T1?", "T2?"]
    # a user's file: a training row that repeats a held-out row's question is dropped; repeats among the
    # training rows themselves stay
    user = tmp_path / "mine.jsonl"
    user.write_text(rows(["A?", "B?", "A?", "C?", "B?"]))  # held out (eval_n=2): the last two, "C?" and "B?"
    mine = DataConfig(data=str(user), eval_n=2)
    assert [p.question for p in mine.problems("train", None)] == ["A?", "A?"]
    assert [p.question for p in mine.problems("test", None)] == ["C?", "B?"]
    other = tmp_path / "held.jsonl"
    other.write_text(rows(["A?"]))
    assert [p.question for p in DataConfig(data=str(user), eval_data=str(other)).problems("train", None)] == \
        ["B?", "C?", "B?"]


def test_each_task_owns_its_answer_format_instruction():
    from tinylora.api import DataConfig
    from tinylora.tasks import instruction
    from tinylora.tasks.prompts import DEFAULT_SUFFIX
    # arithmetic, GSM8K and {question, answer} rows are scored by the "####" line, so they ask for it
    assert instruction("arithmetic") == instruction("gsm8k") == instruction("my.jsonl") == DEFAULT_SUFFIX
    assert "####" in DEFAULT_SUFFIX
    # a prompt template is the whole message: nothing appended
    assert instruction("my.jsonl", "Reverse {word}.") == ""
    assert DataConfig(data="words.jsonl", prompt_template="Reverse {word}.").instruction() == ""
    assert DataConfig().instruction() == DEFAULT_SUFFIX
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        instruction("mmlu")
