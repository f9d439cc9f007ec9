"""The Engine and the server against an independent reference: plain Hugging Face `model.generate` (greedy).

tests/test_engine.py and tests/test_serve.py compare the Engine with the Engine (one row alone against the same
row in a crowd); here every expected token comes from `model.generate(..., do_sample=False)` on one prompt alone,
unpadded, so neither a padding bug nor a shared bug of both Engine modes can hide. Adapters are TinyLoRA's own
forward hooks inside `generate` (and, once, ΔW merged into a float64 copy of the weights), a bank row is checked
against `generate` with that row's adapter alone attached, and the server's text against the tokenizer's decoding
of `generate`'s ids for the prompt the server builds (completions: the text as given; chat: the chat template).

Every run also ends some rows at an end-of-sequence token: a tiny random model rarely emits `<eos>`, so a token
it does emit mid-sequence is added to the model's `eos_token_id` list (both sides read it), chosen so that some
row stops early and another runs to max_new_tokens (`stopping_tokens`).
"""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch
from fixed_steps import DecodeSteps
from serving import ServerThread
from waiting import HANG_GUARD_S

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.generation import kv
from tinylora.generation import weights as cpu_weights
from tinylora.generation.bank import AdapterBank
from tinylora.generation.engine import Engine, Sampling
from tinylora.testing import ARCHS, tiny_model_and_tokenizer

PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44 t45 t46", "t50", "t60 t61", "1 + 2 ="]  # 1 to 7 tokens
N = 12  # new tokens
# Adapters that one bank can hold together (same r, targets, svd) but that differ in everything else.
CONFIGS = {"alpha": AdapterConfig(u=2, n_tie=4), "beta": AdapterConfig(u=1, n_tie=3),
           "gamma": AdapterConfig(u=3, n_tie=1, seed=7), "delta": AdapterConfig(method="lora-xs", n_tie=2)}
FULL_ATTENTION = [a for a in ARCHS if a != "gemma3_text"]  # continuous batching edits full-attention caches only
# Weights 5× the default init: at 0.02 attention is near uniform and a tiny llama's greedy tokens barely depend on
# positions, so a row whose positions skip one (a joining bug) still matched `generate`; at 0.1 they do not.
INIT = dict(initializer_range=0.1)


# ---- the reference -----------------------------------------------------------------------------------------
def ids_of(tok, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=False).input_ids


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """`model.generate`'s greedy new tokens for one prompt alone (no padding): up to and including an EOS."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)
    return out[0, x.shape[1]:].tolist()


def eos_list(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def set_eos(model, extra: list[int] | tuple[int, ...] = ()) -> None:
    """The model's end-of-sequence tokens: the tokenizer's <eos> (2), plus `extra`."""
    model.generation_config.eos_token_id = [2, *extra]


def both_ends(rows: list[list[int]], eos: set[int], n: int) -> bool:
    """With `eos` ending rows, one of these n-token greedy rows would stop early and another run to n tokens."""
    return any(eos & set(r[:n - 1]) for r in rows) and any(not eos & set(r) for r in rows)


def stopping_tokens(groups: list[list[list[int]]], n: int) -> list[int]:
    """Tokens that, added to the end-of-sequence tokens, end some row of every group (greedy rows of n tokens)
    before n tokens while another row of that group never produces them (so it still runs to n tokens)."""
    extra = []
    for rows in groups:
        for t in [t for r in rows for t in r[1:n - 1]]:  # the first token stopping the row would make it trivial
            if both_ends(rows, {2, *extra}, n):
                break
            eos = {2, *extra, t}
            if both_ends(rows, eos, n) and all(any(not eos & set(r) for r in g) for g in groups):
                extra.append(t)
    assert all(both_ends(g, {2, *extra}, n) for g in groups), f"no tokens of {groups} end rows early and leave others"
    return extra


def check_ends(refs: list[list[int]], model, n: int) -> None:
    """The reference itself has rows that stop at an EOS and rows that run to n: both cases are compared."""
    eos = set(eos_list(model))
    assert any(len(r) < n and r[-1] in eos for r in refs), refs
    assert any(len(r) == n and not eos & set(r) for r in refs), refs


def base_model(arch: str = "llama"):
    model, tok = tiny_model_and_tokenizer(arch, **INIT)
    set_eos(model)
    return model, tok


def with_adapter(arch: str, name: str):
    """A fresh tiny model with adapter `name` attached, its v seeded and large enough to change the output."""
    model, tok = base_model(arch)
    ad = attach(model, CONFIGS[name], progress=False)
    with torch.no_grad():
        seed = list(CONFIGS).index(name)
        ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(seed)) * 2.0)
    return model, tok, ad


def rows_of(rollout) -> list[list[int]]:
    """Each row's completion up to and including its first EOS, as the Rollout masks it."""
    n = rollout.completion_mask.sum(dim=1).tolist()
    return [rollout.completion_ids[i, :n[i]].tolist() for i in range(len(n))]


def check_rollout(rollout, refs, tok) -> None:
    assert rows_of(rollout) == refs
    C = rollout.completion_ids.shape[1]
    for i, ref in enumerate(refs):  # after the EOS: padding only
        assert rollout.completion_ids[i, len(ref):].tolist() == [tok.pad_token_id] * (C - len(ref))
    assert rollout.completions == [tok.decode(r, skip_special_tokens=True) for r in refs]


def weight_choices() -> list[str]:
    return ["hooks", "merged"] + (["packed"] if cpu_weights.packed_available() else [])


def count_bucketed(monkeypatch) -> list[int]:
    """Counts the prefills split into groups of similar length (kv.Prefill._whole_in_buckets): [calls]."""
    calls, split = [0], kv.Prefill._whole_in_buckets

    def counted(self, *args):
        calls[0] += 1
        return split(self, *args)
    monkeypatch.setattr(kv.Prefill, "_whole_in_buckets", counted)
    return calls


# ---- 1. the base model, prompts of different lengths in one batch ---------------------------------------------
@pytest.mark.parametrize("weights", ["hooks", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bucket_cost", [None, 0])
def test_base_batch_equals_generate_per_prompt(arch, weights, bucket_cost, monkeypatch):
    """bucket_cost=0: `generate` still prefills one batch (its rollouts keep their summation order); the server's
    step API groups prompts by length (test_rows_joining_and_leaving_a_running_batch_equal_generate)."""
    if weights == "packed" and not cpu_weights.packed_available():
        pytest.skip("no oneDNN packed linear in this PyTorch build")
    if bucket_cost is not None:
        monkeypatch.setattr(kv, "BUCKET_COST", bucket_cost)
    bucketed = count_bucketed(monkeypatch)
    model, tok = base_model(arch)
    ids = [ids_of(tok, p) for p in PROMPTS]
    set_eos(model, stopping_tokens([[hf_greedy(model, x, N) for x in ids]], N))
    refs = [hf_greedy(model, x, N) for x in ids]
    check_ends(refs, model, N)
    engine = Engine(model, tok, weights=weights)  # reads the EOS list now
    check_rollout(engine.generate(PROMPTS, max_new_tokens=N, greedy=True), refs, tok)
    # twice each prompt in one batch (rows that share a prompt, as GRPO's repeats do): still the same
    twice = engine.generate(PROMPTS, max_new_tokens=N, greedy=True, repeats=2)
    assert rows_of(twice) == [r for r in refs for _ in range(2)]
    assert bucketed == [0]  # one padded batch, even where groups would cost less


@pytest.mark.parametrize("max_len", [8, 4096])
def test_fixed_shape_steps_of_the_plain_model_equal_generate_and_fall_back_when_the_buffers_are_outgrown(max_len):
    """graphs=True on the plain model: prompts of 1 to 7 tokens + 12 new ones outgrow 8 columns mid-way (those
    steps then run the ordinary way); 12 rows (each prompt twice) grow the buffers sized for 6."""
    model, tok = base_model("qwen2")
    ids = [ids_of(tok, p) for p in PROMPTS]
    set_eos(model, stopping_tokens([[hf_greedy(model, x, N) for x in ids]], N))
    refs = [hf_greedy(model, x, N) for x in ids]
    check_ends(refs, model, N)
    engine = Engine(model, tok, weights="hooks", graphs=True, max_batch=len(PROMPTS), max_len=max_len)
    steps = DecodeSteps(model)
    check_rollout(engine.generate(PROMPTS, max_new_tokens=N, greedy=True), refs, tok)
    for repeats in (1, 2):
        steps.fixed = steps.ordinary = 0
        rows = rows_of(engine.generate(PROMPTS, max_new_tokens=N, greedy=True, repeats=repeats))
        assert rows == [r for r in refs for _ in range(repeats)] and steps.fixed + steps.ordinary == N - 1
        assert 0 < steps.fixed < N - 1 if max_len == 8 else steps.ordinary == 0


# ---- 2. one attached adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("weights", weight_choices() + ["auto"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_adapter_equals_generate_with_its_hooks(arch, weights):
    model, tok, ad = with_adapter(arch, "alpha")
    ids = [ids_of(tok, p) for p in PROMPTS]
    with ad.disabled():
        base = [hf_greedy(model, x, N) for x in ids]
    adapted = [hf_greedy(model, x, N) for x in ids]  # the adapter's hooks run inside generate
    assert all(a != b for a, b in zip(adapted, base)), "the adapter must change every prompt's greedy output"
    set_eos(model, stopping_tokens([adapted], N))
    refs = [hf_greedy(model, x, N) for x in ids]
    check_ends(refs, model, N)
    engine = Engine(model, tok, adapter=ad, weights=weights)
    check_rollout(engine.generate(PROMPTS, max_new_tokens=N, greedy=True), refs, tok)
    assert [hf_greedy(model, x, N) for x in ids] == refs  # the engine left the model as it found it (merge undone)


@torch.no_grad()
def test_one_adapter_equals_generate_on_float64_weights_with_delta_w_merged():
    """The reference without the adapter's hooks: W + ΔW written into a float64 copy of the base model."""
    model, tok, ad = with_adapter("llama", "alpha")
    ids = [ids_of(tok, p) for p in PROMPTS]
    ref_model, _ = base_model("llama")  # same seed: the same base weights
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), name
    ref_model.double()
    for i, t in enumerate(ad.targets):
        ref_model.get_submodule(t.name).weight += ad.delta_weight(i).double()
    assert not hasattr(ref_model, "_tinylora_adapter")  # no hooks: only the weights carry the adapter
    set_eos(ref_model, stopping_tokens([[hf_greedy(ref_model, x, N) for x in ids]], N))
    refs = [hf_greedy(ref_model, x, N) for x in ids]
    check_ends(refs, ref_model, N)
    with ad.disabled():
        assert [hf_greedy(model, x, N) for x in ids] != refs  # the adapter matters on these prompts
    model.generation_config.eos_token_id = ref_model.generation_config.eos_token_id
    for weights in weight_choices():
        engine = Engine(model, tok, adapter=ad, weights=weights)
        assert rows_of(engine.generate(PROMPTS, max_new_tokens=N, greedy=True)) == refs, weights


# ---- 3. a bank: a different adapter in every row ----------------------------------------------------------
def bank_and_references(arch: str):
    """A bank over one model holding every adapter of CONFIGS (v as `with_adapter` gives them), and for each
    adapter (None: the base) a separate model with that adapter alone attached the plain way."""
    model, tok = base_model(arch)
    bank = AdapterBank(model, config=CONFIGS["alpha"], progress=False)
    alone = {None: base_model(arch)[0]}
    for name, config in CONFIGS.items():
        alone[name], _, ad = with_adapter(arch, name)
        bank.add(name, config, ad.v.detach().clone())
    return model, tok, bank, alone


def set_eos_everywhere(models, extra: list[int]) -> None:
    for m in models:
        set_eos(m, extra)


@pytest.mark.parametrize("graphs,bucket_cost", [(False, None), (True, None), (False, 0)])
@pytest.mark.parametrize("arch", ARCHS)
def test_bank_rows_each_equal_generate_with_their_adapter_alone(arch, graphs, bucket_cost, monkeypatch):
    """bucket_cost=0: as in test_base_batch_equals_generate_per_prompt, `generate` keeps one batch."""
    if bucket_cost is not None:
        monkeypatch.setattr(kv, "BUCKET_COST", bucket_cost)
    bucketed = count_bucketed(monkeypatch)
    model, tok, bank, alone = bank_and_references(arch)
    which = ["beta", None, "delta", "alpha", "gamma", "beta"]  # one per prompt, the base among them
    ids = [ids_of(tok, p) for p in PROMPTS]
    plain = [hf_greedy(alone[w], x, N) for w, x in zip(which, ids)]
    assert len({tuple(hf_greedy(m, ids[2], N)) for m in alone.values()}) == len(alone)  # the adapters all differ
    set_eos_everywhere([model, *alone.values()], stopping_tokens([plain], N))
    refs = [hf_greedy(alone[w], x, N) for w, x in zip(which, ids)]
    check_ends(refs, model, N)
    engine = Engine(model, tok, bank=bank, graphs=graphs)
    steps = DecodeSteps(model)
    check_rollout(engine.generate(PROMPTS, max_new_tokens=N, greedy=True, adapters=which), refs, tok)
    if graphs and arch in FULL_ATTENTION:
        assert steps.fixed == N - 1 and steps.ordinary == 0
    else:  # sliding windows: the ordinary way
        assert steps.fixed == 0
    assert bucketed == [0]  # `generate` keeps one padded batch


def greedy_schedule(plan, ids, bank) -> dict:
    """plan: [(step it arrives, prompt index, adapter name or None, max_new_tokens)] → run_schedule's schedule."""
    schedule = {}
    for t, k, w, n in plan:
        schedule.setdefault(t, []).append((ids[k], Sampling(max_new_tokens=n, temperature=0),
                                           None if w is None else bank.get(w)))
    return schedule


def run_schedule(engine, schedule: dict[int, list[tuple[list[int], Sampling, torch.Tensor | None]]]):
    """schedule: {step: [(prompt ids, Sampling, R or None), ...]} added before that step; the rows in add order."""
    rows, t = [], 0
    with engine.generating():
        while t <= max(schedule) or not engine.idle:
            for ids, sampling, R in schedule.get(t, []):
                rows += engine.add(ids, sampling, R=R)
            engine.step()
            t += 1
    return rows


@pytest.mark.parametrize("chunk,graphs,bucket_cost", [(None, False, None), (2, False, None), (2, True, None),
                                                    (None, False, 0), (8, True, 0)])
@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_rows_joining_and_leaving_a_running_batch_equal_generate(arch, chunk, graphs, bucket_cost, monkeypatch):
    """The server's way: rows with their own adapters join between decode steps (left-padding the shorter KV
    cache), leave when done (the cache trimmed), and wait for a slot (max_batch=3); with `chunk`, joining
    prompts go through the model 2 columns per step while the running rows decode; with `graphs`, every decode
    step runs at fixed shapes in fixed KV buffers (padding rows and masked columns: the GPU's CUDA-graph step,
    run eagerly here). bucket_cost=0: prompts joining together are prefilled one forward per length (whole
    prompts, as a chunk of 8 columns holds them), beside the running rows."""
    if bucket_cost is not None:
        monkeypatch.setattr(kv, "BUCKET_COST", bucket_cost)
    bucketed = count_bucketed(monkeypatch)
    model, tok, bank, alone = bank_and_references(arch)
    # (step it arrives, prompt, adapter, max_new_tokens)
    plan = [(0, 2, "alpha", 10), (0, 3, None, 4), (1, 0, "delta", 12), (2, 1, "gamma", 3), (2, 5, "beta", 9),
            (4, 4, None, 11), (6, 2, "gamma", 6), (6, 3, "alpha", 12)]
    ids = [ids_of(tok, p) for p in PROMPTS]
    plain = [hf_greedy(alone[w], ids[k], N) for _, k, w, _ in plan]
    set_eos_everywhere([model, *alone.values()], stopping_tokens([plain], N))
    refs = [hf_greedy(alone[w], ids[k], n) for _, k, w, n in plan]
    eos = set(eos_list(model))
    assert any(r[-1] in eos for r in refs) and any(not eos & set(r) for r in refs), refs
    engine = Engine(model, tok, bank=bank, max_batch=3, prefill_chunk=chunk, graphs=graphs)
    steps = DecodeSteps(model)
    rows = run_schedule(engine, greedy_schedule(plan, ids, bank))
    assert [r.tokens for r in rows] == refs
    for row, ref in zip(rows, refs):
        assert row.finish_reason == ("stop" if ref[-1] in eos else "length")
    if bucket_cost == 0:
        assert bucketed[0] > 0  # the step API did prefill joining prompts in groups
    assert engine.cache is None and engine.row_R is None  # every row has left
    if graphs:  # every decode step took the fixed path, with no host sync inside
        assert steps.fixed >= max(n for *_, n in plan) - 1 and steps.ordinary == 0 and not engine.fixed.capture
    else:
        assert steps.fixed == 0 and steps.ordinary > 0


# ---- 4. the OpenAI-compatible server ---------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}t99 {% endif %}")
BASE = "tiny-base"
CHAT = [{"role": "system", "content": "t10 t11"}, {"role": "user", "content": "t30 t31 ?"}]


class Served(ServerThread):
    """A real uvicorn server in a thread over the tiny llama, every adapter of CONFIGS loaded from files."""

    def __init__(self, folder):
        from tinylora.serve import Limits, build_server
        folder.mkdir(exist_ok=True)
        self.alone = {None: base_model()[0]}
        self.v = {}
        for name in CONFIGS:
            self.alone[name], _, ad = with_adapter("llama", name)
            self.v[name] = ad.v.detach().clone()
            save_adapter(ad, folder / f"{name}.safetensors")
        model, self.tok = base_model()
        self.tok.chat_template = TEMPLATE
        # every adapter's prompts, and its chat prompt: some stop at an EOS, others run to max_tokens
        prompts = [ids_of(self.tok, p) for p in PROMPTS]
        prompts += [ids_of(self.tok, self.tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))]
        self.extra_eos = stopping_tokens([[hf_greedy(m, x, N) for x in prompts] for m in self.alone.values()], N)
        set_eos_everywhere([model, *self.alone.values()], self.extra_eos)  # before the server's engine reads it
        super().__init__(build_server(model, self.tok, name=BASE, adapters=folder, limits=Limits(max_batch=8)))

    def post(self, route: str, body: dict) -> dict:
        import httpx
        r = httpx.post(self.url + route, json=body, timeout=HANG_GUARD_S)
        assert r.status_code == 200, r.text
        return r.json()

    def expected(self, adapter: str | None, ids: list[int], n: int) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) that `generate` gives for these prompt ids."""
        ref = hf_greedy(self.alone[adapter], ids, n)
        finish = "stop" if ref[-1] in (2, *self.extra_eos) else "length"
        return self.tok.decode(ref, skip_special_tokens=True), finish, len(ref)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with pytest.MonkeyPatch.context() as mp:  # the SVD cache of this module's models: a temporary folder
        mp.setenv("TINYLORA_CACHE", str(tmp_path_factory.mktemp("svd-cache")))
        with Served(tmp_path_factory.mktemp("adapters")) as running:
            yield running


def got(choice: dict, usage_tokens: int | None = None) -> tuple[str, str, int | None]:
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"], usage_tokens


@pytest.mark.parametrize("adapter", [None, "alpha", "delta"])
def test_server_completions_equal_generate(served, adapter):
    """Several prompts of different lengths in one request (they share the engine's batch)."""
    out = served.post("/completions", {"model": adapter or BASE, "prompt": PROMPTS, "max_tokens": N,
                                       "temperature": 0})
    want = [served.expected(adapter, served.tok(p).input_ids, N) for p in PROMPTS]
    assert [got(c)[:2] for c in sorted(out["choices"], key=lambda c: c["index"])] == [w[:2] for w in want]
    assert out["usage"]["completion_tokens"] == sum(w[2] for w in want)
    assert {w[1] for w in want} == {"stop", "length"}  # both ends are compared
    if adapter is not None:
        base = [served.expected(None, served.tok(p).input_ids, N)[0] for p in PROMPTS]
        assert [w[0] for w in want] != base  # the adapter changes the text the server must return


@pytest.mark.parametrize("adapter", [None, "gamma"])
def test_server_chat_equals_generate_on_the_chat_template(served, adapter):
    text = served.tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "system t10 t11 user t30 t31 ? t99 "  # the template as the tokenizer applies it
    ids = served.tok(text, add_special_tokens=False).input_ids
    out = served.post("/chat/completions", {"model": adapter or BASE, "messages": CHAT,
                                            "max_tokens": N, "temperature": 0})
    assert got(out["choices"][0], out["usage"]["completion_tokens"]) == served.expected(adapter, ids, N)
    assert out["usage"]["prompt_tokens"] == len(ids)


def test_server_concurrent_requests_and_an_inline_adapter_equal_generate(served):
    """Requests from several clients at once, each with its own adapter (one inline), batched by the server."""
    jobs = [(k % len(PROMPTS), [None, *CONFIGS][k % 5], 4 + (2 * k) % 9) for k in range(10)]

    def one(job):
        k, adapter, n = job
        body = {"model": adapter or BASE, "prompt": PROMPTS[k], "max_tokens": n, "temperature": 0}
        if adapter == "beta":  # sent inline rather than named
            body.update(model=BASE, adapter={"config": json.loads(CONFIGS["beta"].to_json()),
                                             "v": served.v["beta"].tolist()})
        out = served.post("/completions", body)
        return got(out["choices"][0], out["usage"]["completion_tokens"])

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [served.expected(a, served.tok(PROMPTS[k]).input_ids, n) for k, a, n in jobs]


def test_a_long_prompt_joins_in_chunks_without_stalling_the_running_rows():
    """A 7-token prompt joining with prefill_chunk=2 takes 4 steps to join; every running row gets a token in
    each of them; and every row's tokens are still generate's."""
    model, tok = base_model("llama")
    short, long_ = ids_of(tok, PROMPTS[3]), ids_of(tok, PROMPTS[2])
    assert len(long_) == 7
    refs = [hf_greedy(model, short, N), hf_greedy(model, long_, 5)]
    engine = Engine(model, tok, weights="hooks", prefill_chunk=2)
    with engine.generating():
        first = engine.add(short, Sampling(max_new_tokens=N, temperature=0))[0]
        engine.step()
        late = engine.add(long_, Sampling(max_new_tokens=5, temperature=0))[0]
        counts = []
        while not late.tokens:
            engine.step()
            counts.append(len(first.tokens))
        while not engine.idle:
            engine.step()
    assert counts == [2, 3, 4, 5]  # 4 chunks of the 7 columns; the first row got a token each step
    assert [first.tokens, late.tokens] == refs
