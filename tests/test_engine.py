"""The generation engine: continuous batching, per-row adapters, per-row seeds, cancellation."""

import pytest
import torch

from tinylora import AdapterConfig, attach, load_adapter, save_adapter
from tinylora.generation.bank import AdapterBank
from tinylora.generation.engine import Engine, Sampling, sample
from tinylora.generation.sampling import top_p_filter
from tinylora.testing import tiny_model_and_tokenizer

PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44 t45 t46", "t50", "t60 t61"]
CONFIGS = [AdapterConfig(u=2, n_tie=4), AdapterConfig(u=1, n_tie=3), AdapterConfig(u=3, n_tie=1, seed=7),
           AdapterConfig(method="lora-xs", n_tie=2)]


def adapter_files(tmp_path, arch="llama"):
    """Four adapters with different u / n_tie / seed / method (one bank can hold them all): large v, so
    every adapter changes the greedy output."""
    paths = []
    for k, config in enumerate(CONFIGS):
        model, _ = tiny_model_and_tokenizer(arch)
        ad = attach(model, config, progress=False)
        with torch.no_grad():
            ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(k)) * 2.0)
        paths.append(save_adapter(ad, tmp_path / f"user{k}.safetensors"))
    return paths


def alone(path, prompt, **kw):
    """What one adapter gives on one prompt, loaded the plain way (its own v, the fused no-grad path)."""
    model, tok = tiny_model_and_tokenizer("llama")
    if path is not None:
        load_adapter(model, path)
    return sample(model, tok, [prompt], **kw).completion_ids[0].tolist()


def run_until_idle(engine, schedule):
    """schedule: {step: [(prompt, Sampling, R or None), ...]} added before that step; returns rows by add order."""
    rows, t = [], 0
    with engine.generating():
        while t in schedule or not engine.idle or any(k > t for k in schedule):
            for prompt, sampling, R in schedule.get(t, []):
                rows += engine.add(engine.tokenizer(prompt, add_special_tokens=False).input_ids, sampling, R=R)
            engine.step()
            t += 1
    return rows


def trimmed(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_rows_joining_and_leaving_with_distinct_adapters_match_each_alone(tmp_path):
    paths = adapter_files(tmp_path)
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    engine = Engine(model, tok, bank=bank, max_batch=4)  # fewer slots than requests: some wait their turn
    names = bank.names + [None]
    # rows join at steps 0, 0, 2, 3, 3, 5 with different lengths, so rows leave while others join
    plan = [(0, 0, 9), (0, 1, 4), (2, 2, 12), (3, 3, 3), (3, 4, 7), (5, 0, 6)]
    schedule = {}
    for t, k, n in plan:
        R = bank.get(names[k % 5]) if names[k % 5] else None
        schedule.setdefault(t, []).append((PROMPTS[k % 5], Sampling(max_new_tokens=n, temperature=0), R))
    rows = run_until_idle(engine, schedule)
    for (t, k, n), row in zip(plan, rows):
        path = paths[k % 5] if names[k % 5] else None
        ref = alone(path, PROMPTS[k % 5], max_new_tokens=n, greedy=True)
        assert row.tokens == trimmed(ref, tok.eos_token_id), (t, k)
        assert row.finish_reason == ("stop" if tok.eos_token_id in ref else "length"), (t, k)
    assert engine.cache is None and engine.row_R is None  # all rows left


def hf_greedy(path, prompt, max_new_tokens):
    """The independent reference: transformers' own greedy `model.generate` on the model with the adapter loaded
    as hooks (none: the plain base model), one prompt, no padding; it stops after the end-of-sequence token."""
    model, tok = tiny_model_and_tokenizer("llama")
    if path is not None:
        load_adapter(model, path)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_adapters_change_the_output_and_the_base_row_is_the_base(tmp_path):
    paths = adapter_files(tmp_path)
    _, tok = tiny_model_and_tokenizer("llama")
    for prompt in PROMPTS:
        outs = []
        for p in paths + [None]:
            out = alone(p, prompt, max_new_tokens=10, greedy=True)
            assert trimmed(out, tok.eos_token_id) == hf_greedy(p, prompt, 10), (p, prompt)
            outs.append(out)
        if prompt == PROMPTS[2]:
            assert len({tuple(o) for o in outs}) == 5  # the tests here compare genuinely different rows


def test_a_seeded_row_samples_the_same_alone_and_in_a_crowd(tmp_path):
    paths = adapter_files(tmp_path)
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    engine = Engine(model, tok, bank=bank)
    mine = Sampling(max_new_tokens=12, temperature=1.0, seed=42)
    solo = run_until_idle(engine, {0: [(PROMPTS[0], mine, bank.get("user1"))]})[0].tokens
    crowd = {0: [(PROMPTS[1], Sampling(max_new_tokens=5, temperature=1.0, seed=1), None)],
             1: [(PROMPTS[0], mine, bank.get("user1")), (PROMPTS[2], Sampling(max_new_tokens=9, seed=2), None)]}
    assert run_until_idle(engine, crowd)[1].tokens == solo
    other = run_until_idle(engine, {0: [(PROMPTS[0], Sampling(max_new_tokens=12, seed=43), bank.get("user1"))]})
    assert other[0].tokens != solo


def test_cancelled_rows_leave_and_the_rest_continue():
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Engine(model, tok)
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:3]]
    rows = [engine.add(x, Sampling(max_new_tokens=10, temperature=0))[0] for x in ids]
    waiting = engine.add(ids[0], Sampling(max_new_tokens=10, temperature=0))[0]
    engine.cancel(waiting)  # cancelled before it started: never runs
    with engine.generating():
        engine.step()
        engine.cancel(rows[1], "stop")
        while not engine.idle:
            engine.step()
    assert rows[1].finish_reason == "stop" and len(rows[1].tokens) == 1 and waiting.tokens == []
    for x, row in zip(PROMPTS[:3:2], rows[::2]):
        assert row.tokens == trimmed(alone(None, x, max_new_tokens=10, greedy=True), tok.eos_token_id)


def test_a_row_cancelled_during_its_chunked_prefill_leaves_without_a_token():
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Engine(model, tok, prefill_chunk=2)
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:3]]
    first = engine.add(ids[0], Sampling(max_new_tokens=8, temperature=0))[0]
    with engine.generating():
        engine.step()
        late = engine.add(ids[2], Sampling(max_new_tokens=8, temperature=0))[0]  # 7 tokens: 4 chunks
        engine.step()
        assert late in engine.live() and late not in engine.running  # part way through its prefill
        engine.cancel(late)
        while not engine.idle:
            engine.step()
    assert late.tokens == [] and late.finish_reason == "abort" and late not in engine.live()
    assert first.tokens == trimmed(alone(None, PROMPTS[0], max_new_tokens=8, greedy=True), tok.eos_token_id)


def test_a_short_prompt_does_not_queue_behind_a_long_one_in_chunks():
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Engine(model, tok, prefill_chunk=2)
    ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:4]]
    first = engine.add(ids[0], Sampling(max_new_tokens=12, temperature=0))[0]
    with engine.generating():
        engine.step()
        long_ = engine.add(ids[2], Sampling(max_new_tokens=4, temperature=0))[0]  # 7 tokens: 4 chunks
        engine.step()
        short = engine.add(ids[3], Sampling(max_new_tokens=4, temperature=0))[0]  # 1 token: one chunk
        engine.step()
        assert len(short.tokens) == 1 and long_.tokens == []  # joined beside the long prompt's chunks
        while not engine.idle:
            engine.step()
    for x, row in ((PROMPTS[0], first), (PROMPTS[2], long_), (PROMPTS[3], short)):
        n = row.sampling.max_new_tokens
        assert row.tokens == trimmed(alone(None, x, max_new_tokens=n, greedy=True), tok.eos_token_id)


def test_generate_uses_the_bank_per_prompt(tmp_path):
    paths = adapter_files(tmp_path)
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    ro = Engine(model, tok, bank=bank).generate(PROMPTS[:3], max_new_tokens=8, greedy=True,
                                                adapters=["user3", None, "user0"])
    for i, path in enumerate([paths[3], None, paths[0]]):
        ref = alone(path, PROMPTS[i], max_new_tokens=8, greedy=True)
        assert ro.completion_ids[i].tolist()[:len(ref)] == ref


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = top_p_filter(probs, torch.tensor([[0.7], [0.1]]))
    assert torch.equal(out, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0]]))
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Engine(model, tok)
    row = engine.add(tok(PROMPTS[0], add_special_tokens=False).input_ids,
                     Sampling(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))[0]
    with engine.generating():
        while not engine.idle:
            engine.step()
    assert row.tokens == trimmed(alone(None, PROMPTS[0], max_new_tokens=8, greedy=True), tok.eos_token_id)


def test_bank_rejects_what_does_not_share_the_factors(tmp_path):
    paths = adapter_files(tmp_path)
    model, _ = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    with pytest.raises(ValueError, match="r=4 differs"):
        bank.R_of(AdapterConfig(r=4), [[0.0]])
    with pytest.raises(ValueError, match="shape"):
        bank.R_of(AdapterConfig(u=1, n_tie=4), [[0.1, 0.2]])
    with pytest.raises(ValueError, match="NaN"):
        bank.R_of(AdapterConfig(u=1, n_tie="all"), [[float("nan")]])
    with pytest.raises(ValueError, match="lora"):
        bank.R_of(AdapterConfig(method="lora"), [[0.0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_continuous_batching_with_per_row_adapters(tmp_path, dtype, graphs):
    """On CUDA: rows joining and leaving with distinct adapters; fp32 matches each adapter alone token for
    token, bf16 (hooks, no merge) must agree on most tokens and run without error; with `graphs`, the decode
    steps replay captured CUDA graphs."""
    paths = adapter_files(tmp_path)
    model, tok = tiny_model_and_tokenizer("llama")
    model = model.to("cuda", dtype)
    bank = AdapterBank(model, paths)
    engine = Engine(model, tok, bank=bank, max_batch=3, graphs=graphs)
    assert str(engine.weights).startswith("the model's own weights")
    plan = [(0, 0, 9), (0, 1, 4), (2, 2, 12), (3, 3, 3), (3, 4, 7)]
    schedule = {}
    for t, k, n in plan:
        R = bank.get(bank.names[k]) if k < 4 else None
        schedule.setdefault(t, []).append((PROMPTS[k], Sampling(max_new_tokens=n, temperature=0), R))
    rows = run_until_idle(engine, schedule)
    same = total = 0
    for (t, k, n), row in zip(plan, rows):
        ref_model, _ = tiny_model_and_tokenizer("llama")
        ref_model = ref_model.to("cuda", dtype)
        if k < 4:
            load_adapter(ref_model, paths[k])
        ref = trimmed(sample(ref_model, tok, [PROMPTS[k]], max_new_tokens=n, greedy=True).completion_ids[0].tolist(),
                      tok.eos_token_id)
        same += sum(a == b for a, b in zip(row.tokens, ref))
        total += len(ref)
        if dtype == torch.float32:
            assert row.tokens == ref, (t, k)
    assert same >= 0.8 * total
    seeded = Sampling(max_new_tokens=10, temperature=1.0, seed=3)
    a = run_until_idle(engine, {0: [(PROMPTS[0], seeded, bank.get(bank.names[1]))]})[0].tokens
    b = run_until_idle(engine, {0: [(PROMPTS[2], Sampling(max_new_tokens=6, seed=9), None),
                                    (PROMPTS[0], seeded, bank.get(bank.names[1]))]})[1].tokens
    if dtype == torch.float32:
        assert a == b
    if graphs:  # the steps replayed captured graphs, and a replay computes what the same step run eagerly does
        assert engine.fixed.capture and all(g is not None for g in engine.fixed.graphs.values())
        warmed = Engine(model, tok, bank=bank, max_batch=3, graphs=True)
        assert warmed.captures_graphs and warmed.warm_up() == 2 * (3 + 1)  # a server's start records them all
        assert {k[0] for k in warmed.fixed.graphs} == {1, 2, 3} and all(warmed.fixed.graphs.values())
        if dtype == torch.float32:
            assert [r.tokens for r in run_until_idle(warmed, schedule)] == [r.tokens for r in rows]
        eager = Engine(model, tok, bank=bank, max_batch=3, graphs=True)
        eager.fixed.capture = False
        sampled = {t: [(p, Sampling(max_new_tokens=s.max_new_tokens, temperature=1.0, seed=t), R)
                       for p, s, R in rows_at] for t, rows_at in schedule.items()}
        replayed, ran = run_until_idle(engine, sampled), run_until_idle(eager, sampled)
        if dtype == torch.float32:  # (cuBLAS may pick other kernels inside a capture: not bit for bit)
            assert [r.tokens for r in replayed] == [r.tokens for r in ran]
            for a, b in zip(replayed, ran):
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-5)
        else:
            pairs = [(x, y) for a, b in zip(replayed, ran) for x, y in zip(a.tokens, b.tokens)]
            assert sum(x == y for x, y in pairs) >= 0.9 * len(pairs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
@pytest.mark.parametrize("weights", ["hooks", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graphs_of_a_training_runs_rollouts_follow_its_v(dtype, weights):
    """On CUDA, a training run's engine (its own adapter, as hooks or merged) replaying captured graphs samples
    what the same fixed-shape steps run eagerly sample, before and after an in-place change of v (an optimizer
    step), and no capture fell back to eager."""
    model, tok = tiny_model_and_tokenizer("llama")
    model = model.to("cuda", dtype)
    ad = attach(model, AdapterConfig(u=2, n_tie=4), progress=False)
    with torch.no_grad():
        ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(0)).to(ad.v) * 2.0)
    engines = [Engine(model, tok, adapter=ad, weights=weights, graphs=True) for _ in range(2)]
    engines[1].fixed.capture = False
    for _ in range(2):
        a, b = (e.generate(PROMPTS, max_new_tokens=10, repeats=2, seed=5) for e in engines)
        if dtype == torch.float32:
            assert a.completion_ids.tolist() == b.completion_ids.tolist()
            torch.testing.assert_close(a.logp_rollout, b.logp_rollout, rtol=1e-4, atol=1e-5)
        else:
            assert (a.completion_ids == b.completion_ids).float().mean() >= 0.9
        with torch.no_grad():
            ad.v.mul_(-1)
    assert engines[0].fixed.graphs and all(g is not None for g in engines[0].fixed.graphs.values())


def test_ignore_eos_runs_to_max_new_tokens():
    model, tok = tiny_model_and_tokenizer("llama")
    engine = Engine(model, tok)
    ids = tok(PROMPTS[0], add_special_tokens=False).input_ids
    first = run_until_idle(engine, {0: [(PROMPTS[0], Sampling(max_new_tokens=6, temperature=0), None)]})[0].tokens[0]
    engine.eos = {first}  # the greedy first token now ends the row...
    short, full = (engine.add(ids, Sampling(max_new_tokens=6, temperature=0, ignore_eos=flag))[0] for flag in (0, 1))
    with engine.generating():
        while not engine.idle:
            engine.step()
    assert short.tokens == [first] and short.finish_reason == "stop"
    assert len(full.tokens) == 6 and full.finish_reason == "length"  # ...unless EOS is ignored


@pytest.mark.parametrize("graphs", [False, True])
def test_a_row_with_non_finite_logits_fails_alone(tmp_path, graphs):
    paths = adapter_files(tmp_path)
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    engine = Engine(model, tok, bank=bank, graphs=graphs)
    broken = torch.full_like(bank.get("user0"), float("nan"))
    rows = run_until_idle(engine, {0: [(PROMPTS[0], Sampling(max_new_tokens=8, temperature=1.0, seed=1), broken),
                                       (PROMPTS[1], Sampling(max_new_tokens=8, temperature=0), bank.get("user2"))]})
    assert rows[0].finish_reason == "error" and rows[0].tokens == []
    assert rows[1].tokens == trimmed(alone(paths[2], PROMPTS[1], max_new_tokens=8, greedy=True), tok.eos_token_id)
