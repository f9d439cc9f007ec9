"""Many adapters trained in one batch end where each would have ended alone (training.batched)."""

import pytest
import torch

from tinylora import AdapterConfig, attach
from tinylora.generation.bank import AdapterBank
from tinylora.tasks import Problem
from tinylora.testing import tiny_model_and_tokenizer
from tinylora.training.batched import BatchedTrainer, Member, check_members
from tinylora.training.config import TrainConfig
from tinylora.training.trainer import Trainer

CONFIG = AdapterConfig(u=2, n_tie=4)  # 4 groups of 2 numbers on the tiny model's 14 modules


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    # a signal the tiny random model's samples disagree on, so every group teaches something
    path.write_text("def odd(completions, **kwargs):\n"
                    "    return [float(sum(map(ord, c)) % 2) for c in completions]\n\n"
                    "def third(completions, **kwargs):\n"
                    "    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]\n")
    return path


def members(reward_file, algo="grpo"):
    """Three adapters, each with its own problems, seed, learning rate and reward; two with their own adapter
    config (P's seed, u, n_tie), one with the bank's."""
    def problems(tag):
        return [Problem(f"{tag} question {i} ?", str(i), f"{tag} {i} #### {i}") for i in range(6)]
    shared = dict(algo=algo, steps=3, batch_prompts=2, group_size=4, max_new_tokens=6, micro_batch=4, warmup=0.0,
                  suffix="", system="", rollout_weights="hooks")
    return [Member("alice", problems("a"), TrainConfig(seed=0, lr=0.05, reward=f"{reward_file}:odd", **shared)),
            Member("bob", problems("b"), TrainConfig(seed=1, lr=0.02, reward=f"{reward_file}:third", **shared),
                   AdapterConfig(u=1, n_tie=4, seed=1)),
            Member("carol", problems("c"), TrainConfig(seed=2, lr=0.1, grad_clip=0.01, reward=f"{reward_file}:odd",
                                                       **shared), AdapterConfig(u=2, n_tie=2, seed=2))]


def solo_run(member, tmp_path):
    """The member trained alone by the ordinary Trainer: (v after training, completions of every step)."""
    model, tok = tiny_model_and_tokenizer("qwen2")
    adapter = attach(model, member.adapter or CONFIG, use_cache=False)
    trainer = Trainer(model, tok, adapter, member.problems, member.cfg, tmp_path / member.name, progress=False)
    seen, generate = [], trainer.engine.generate

    def recording(*args, **kwargs):
        ro = generate(*args, **kwargs)
        seen.append(ro.completions)
        return ro
    trainer.engine.generate = recording
    trainer.fit()
    return adapter.v.detach().clone(), seen


# rollout_rows 8: one adapter's B·G rows per generate call, as many calls as adapters
@pytest.mark.parametrize("algo,rollout_rows", [("grpo", 512), ("grpo", 8), ("sft", 512)])
def test_adapters_trained_together_end_where_each_would_alone(tmp_path, reward_file, algo, rollout_rows):
    team = members(reward_file, algo)
    model, tok = tiny_model_and_tokenizer("qwen2")
    bank = AdapterBank(model, config=CONFIG, use_cache=False)
    batched = BatchedTrainer(model, tok, bank, team, tmp_path / "together", progress=False, rollout_rows=rollout_rows)
    seen, rollout = [], batched.rollout

    def recording(step, mine):
        ro, rewards, member = rollout(step, mine)
        seen.append([[c for c, a in zip(ro.completions, member.tolist()) if a == k] for k in range(len(team))])
        return ro, rewards, member
    batched.rollout = recording
    history = batched.fit()
    assert len(history) == 3
    for k, m in enumerate(team):
        v_alone, samples_alone = solo_run(m, tmp_path)
        if algo == "grpo":  # the same samples drawn, step by step
            assert [step[k] for step in seen] == samples_alone
        assert v_alone.abs().min() > 0  # every number moved: the comparison below is not of zeros
        # only the order of float32 sums differs (per-row vs one adapter's path, shared micro-batches)
        torch.testing.assert_close(batched.v[k].detach(), v_alone, rtol=1e-5, atol=1e-7)  # measured: 1e-6 rel
    # the adapters really differ: each followed its own data, reward, seed and rate
    assert not torch.allclose(batched.v[0], batched.v[1]) and batched.v[2].shape != batched.v[0].shape


def test_a_resumed_batched_run_matches_an_uninterrupted_one(tmp_path, reward_file):
    def run(out, steps, resume=False):
        team = members(reward_file)
        for m in team:
            m.cfg.steps = steps
        model, tok = tiny_model_and_tokenizer("qwen2")
        trainer = BatchedTrainer(model, tok, AdapterBank(model, config=CONFIG, use_cache=False), team, out,
                                 progress=False)
        trainer.fit(resume=resume)
        return trainer
    whole = run(tmp_path / "whole", 3)
    run(tmp_path / "cut", 2)
    resumed = run(tmp_path / "cut", 3, resume=True)
    for a, b in zip(whole.v, resumed.v):
        assert torch.equal(a, b)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_members_must_share_the_batch_settings(reward_file):
    team = members(reward_file)
    team[1].cfg.max_new_tokens = 7
    with pytest.raises(ValueError, match="max_new_tokens=7 of 'bob' differs"):
        check_members(team)
    team = members(reward_file)
    team[2].name = "alice"
    with pytest.raises(ValueError, match="distinct"):
        check_members(team)
    team = members(reward_file)
    for m in team:
        m.cfg.epochs = 2
    with pytest.raises(ValueError, match="epochs=2"):
        check_members(team)


def test_train_with_an_adapter_column_writes_one_pack_of_per_user_adapters(tmp_path, reward_file):
    import json

    from tinylora.cli.main import main
    from tinylora.io import load_adapter
    from tinylora.storage.pack import Pack
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    users = ["ann", "ben", "cy"]
    rows = [{"user": u, "question": f"{u} asks {i} ?", "answer": str(i)} for i in range(7) for u in users]
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tmp_path / "m"), "--device", "cpu", "--data", str(tmp_path / "users.jsonl"),
               "--adapter-column", "user", "--eval-n", "2", "--steps", "2", "--batch-prompts", "2",
               "--group-size", "4", "--max-new-tokens", "6", "--reward", f"{reward_file}:odd", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapters"] == 3 and summary["steps"] == 2
    assert summary["base_reward"]["n"] == 3 and summary["final_reward"]["n"] == 3
    base, final = json.loads((out / "eval_base.json").read_text()), json.loads((out / "eval_final.json").read_text())
    assert set(base) == set(final) == set(users)
    with Pack(out / "adapters.pack") as pack:
        assert pack.names() == users
        v = {u: pack.get(u) for u in users}
    assert summary["bytes_per_adapter"] == round((out / "adapters.pack").stat().st_size / 3, 1)
    # each user's adapter loads from the pack as a file would, and the users' adapters differ
    m2, _ = tiny_model_and_tokenizer("llama")
    adapter = load_adapter(m2, f"{out / 'adapters.pack'}::ben")
    assert torch.equal(adapter.v.detach(), v["ben"]) and v["ben"].abs().max() > 0
    # the pack holds what each adapter ended with, as the last step's metrics record it
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(step["adapters"]) == set(users)
    for u in users:
        assert v[u].flatten().tolist() == step["adapters"][u]["v"]


def test_adapter_column_errors_name_the_row_and_the_user(tmp_path):
    import json

    from tinylora.api import DataConfig
    from tinylora.training.per_adapter import per_adapter_problems
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"user": "a", "question": "q?", "answer": "1"}) + "\n"
                    + json.dumps({"question": "q2?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="row 2 has no 'user' column"):
        per_adapter_problems(DataConfig(data=str(path), adapter_column="user", eval_n=0))
    path.write_text("".join(json.dumps({"user": "a", "question": f"q{i}?", "answer": "1"}) + "\n" for i in range(2)))
    with pytest.raises(ValueError, match="'a' has 2 rows, none left to train on"):
        per_adapter_problems(DataConfig(data=str(path), adapter_column="user", eval_n=2))
    with pytest.raises(ValueError, match="adapter_column"):
        DataConfig(adapter_column="user")


def test_a_step_where_no_group_has_a_signal_makes_no_update(tmp_path, reward_file):
    reward = tmp_path / "same.py"
    reward.write_text("def one(completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    team = members(reward_file)
    for m in team:
        m.cfg.reward = f"{reward}:one"  # every sample agrees: no advantage anywhere, as when all users are done
    model, tok = tiny_model_and_tokenizer("qwen2")
    trainer = BatchedTrainer(model, tok, AdapterBank(model, config=CONFIG, use_cache=False), team, tmp_path / "o",
                             progress=False)
    history = trainer.fit()
    assert len(history) == 3
    assert all(float(v.detach().abs().max()) == 0.0 for v in trainer.v)  # AdamW never stepped
    assert all(h["adapters"][m.name]["reward_mean"] == 1.0 and h["adapters"][m.name]["zero_std_frac"] == 1.0
               for h in history for m in team)
