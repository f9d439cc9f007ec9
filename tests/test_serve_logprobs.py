"""`logprobs` and `echo` on /v1/completions against an independent reference: log_softmax of a plain forward of
the tiny model (with the adapter attached the plain way for an adapter's requests), and `model.generate` for the
tokens; EleutherAI's lm-evaluation-harness (`local-completions`) end to end; text prompts and their BOS.
(The OpenAPI document: test_serve_openapi.py.)"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from waiting import HANG_GUARD_S

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serving import ServerThread  # noqa: E402

from tinylora import AdapterConfig, attach, load_adapter, save_adapter  # noqa: E402
from tinylora.serve import Limits, build_server  # noqa: E402
from tinylora.testing import ARCHS, tiny_model_and_tokenizer  # noqa: E402

BASE = "tiny-base"
CONFIGS = {"alpha": AdapterConfig(u=2, n_tie=4), "delta": AdapterConfig(method="lora-xs", n_tie=2)}
PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44 t45 t46", "1 + 2 ="]
TOL = 1e-5
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


def model_and_tokenizer(tokenizer=None):
    model, tok = tiny_model_and_tokenizer("llama", initializer_range=0.1)  # peaked enough to differ per adapter
    tok = tokenizer or tok
    tok.chat_template = TEMPLATE
    return model, tok


def reference(adapter: str | None, folder, tokenizer=None):
    """A fresh model with `adapter` alone attached the plain way (None: the base)."""
    model, tok = model_and_tokenizer(tokenizer)
    if adapter is not None:
        load_adapter(model, folder / f"{adapter}.safetensors")
    return model, tok


@torch.no_grad()
def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is log p(· | ids[:i + 1]) from one plain forward."""
    return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0,
                                                                                                     len(ids):].tolist()


class Served(ServerThread):
    """A real uvicorn server in a thread."""

    def __init__(self, folder, tokenizer=None, **kwargs):
        model, tok = model_and_tokenizer(tokenizer)
        self.tok = tok
        super().__init__(build_server(model, tok, name=BASE, adapters=folder, limits=Limits(max_batch=8), **kwargs))

    def post(self, body: dict, route: str = "/completions", status: int = 200) -> dict:
        r = httpx.post(self.url + route, json=body, timeout=HANG_GUARD_S)
        assert r.status_code == status, r.text
        return r.json()


def make_adapters(folder):
    folder.mkdir(exist_ok=True)
    for k, (name, config) in enumerate(CONFIGS.items()):
        model, _ = model_and_tokenizer()
        ad = attach(model, config, progress=False)
        with torch.no_grad():
            ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(k)) * 2.0)
        save_adapter(ad, folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the SVD cache of this module's models: a temporary folder
        mp.setenv("TINYLORA_CACHE", str(tmp_path_factory.mktemp("svd-cache")))
        folder = make_adapters(tmp_path_factory.mktemp("adapters"))
        with Served(folder) as running:
            running.folder = folder
            yield running


def check_scores(lp: dict, model, ids: list[int], first: int, top: int, tok) -> None:
    """`lp` (a choice's logprobs) holds, for ids[first:], the log-probabilities of a plain forward over `ids`."""
    ref = log_softmax(model, ids)  # [L, V]
    got = lp["token_logprobs"]
    assert len(got) == len(ids) - first  # with echo (first = 0), the first token's null included
    for j, t in enumerate(ids[first:], start=first):
        i = j - first
        if j == 0:
            assert got[i] is None and lp["top_logprobs"][i] is None
            continue
        assert abs(got[i] - ref[j - 1, t].item()) < TOL, (j, got[i], ref[j - 1, t].item())
        want = ref[j - 1].topk(top)
        alternatives = lp["top_logprobs"][i]
        assert set(alternatives) >= {tok.decode([w]) for w in want.indices.tolist()}
        assert len(alternatives) in (top, top + 1)  # the top ones, and the chosen token when it is not one of them
        for w, v in zip(want.indices.tolist(), want.values.tolist()):
            assert abs(alternatives[tok.decode([w])] - v) < TOL
        assert alternatives[tok.decode([t])] == got[i]  # the chosen token's own entry: the same number
    assert lp["tokens"] == [tok.decode([t]) for t in ids[first:]]


# ---- generation/scoring.py on its own ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_token_logprobs_of_a_bank_row_equal_the_adapter_alone(arch):
    from tinylora.generation.bank import AdapterBank
    from tinylora.generation.scoring import token_logprobs
    model, tok = tiny_model_and_tokenizer(arch, initializer_range=0.1)
    alone, _ = tiny_model_and_tokenizer(arch, initializer_range=0.1)
    ad = attach(alone, CONFIGS["alpha"], progress=False)
    with torch.no_grad():
        ad.v.copy_(torch.randn(ad.v.shape, generator=torch.Generator().manual_seed(3)) * 2.0)
    bank = AdapterBank(model, config=CONFIGS["alpha"], progress=False)
    R = bank.R_of(CONFIGS["alpha"], ad.v.detach().clone())
    ids = tok(PROMPTS[2] + " t50 t51").input_ids
    for start, top in [(1, 3), (5, 0), (len(ids) - 1, 2), (len(ids), 1)]:
        for R_row, ref_model in [(R, alone), (None, model)]:  # None: the base, the bank's hooks at zero
            got = token_logprobs(model, ids, bank=bank, R=R_row, start=start, top=top, chunk=2)
            ref = log_softmax(ref_model, ids)
            want = [ref[j - 1, ids[j]].item() for j in range(start, len(ids))]
            assert got.logprobs == pytest.approx(want, abs=TOL)
            assert len(got.top_ids) == len(want) and all(len(x) == top for x in got.top_ids)
            for j, (which, values) in enumerate(zip(got.top_ids, got.top_logprobs), start=start):
                assert values == pytest.approx(ref[j - 1].topk(top).values.tolist(), abs=TOL)
                assert [ref[j - 1, w].item() for w in which] == pytest.approx(values, abs=TOL)
    with ad.disabled():
        assert log_softmax(alone, ids).sub(log_softmax(model, ids)).abs().max() < 1e-6  # one base
    assert log_softmax(alone, ids).sub(log_softmax(model, ids)).abs().max() > 1e-2  # the adapter matters


# ---- prompt log-probabilities (echo) -----------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "alpha", "delta"])
def test_echoed_prompt_logprobs_equal_a_plain_forward(served, adapter):
    model, tok = reference(adapter, served.folder)
    out = served.post({"model": adapter or BASE, "prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert len(out["choices"]) == len(PROMPTS)
    for choice, prompt in zip(sorted(out["choices"], key=lambda c: c["index"]), PROMPTS):
        ids = tok(prompt).input_ids
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        check_scores(choice["logprobs"], model, ids, 0, 3, tok)
        assert choice["logprobs"]["text_offset"] == [m.start() for m in re.finditer(r"\S+", prompt)]
    assert out["usage"] == {"prompt_tokens": sum(len(tok(p).input_ids) for p in PROMPTS), "completion_tokens": 0,
                            "total_tokens": sum(len(tok(p).input_ids) for p in PROMPTS)}
    if adapter is not None:  # the adapter changes the numbers the server must return
        base = served.post({"model": BASE, "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0})
        mine = served.post({"model": adapter, "prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0})
        assert all(abs(a - b) > 1e-3 for a, b in zip(base["choices"][0]["logprobs"]["token_logprobs"][1:],
                                                     mine["choices"][0]["logprobs"]["token_logprobs"][1:]))


def test_an_inline_adapter_scores_as_the_same_adapter_loaded(served):
    from tinylora.io import read_adapter_file
    config, _, tensors = read_adapter_file(served.folder / "alpha.safetensors")
    inline = {"config": json.loads(config.to_json()), "v": tensors["v"].tolist()}
    body = {"prompt": PROMPTS[2], "max_tokens": 0, "echo": True, "logprobs": 2}
    a = served.post({**body, "model": BASE, "adapter": inline})["choices"][0]["logprobs"]
    b = served.post({**body, "model": "alpha"})["choices"][0]["logprobs"]
    assert a == b


# ---- generated tokens --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "alpha"])
def test_greedy_tokens_and_their_logprobs_equal_generate_and_a_plain_forward(served, adapter):
    model, tok = reference(adapter, served.folder)
    for prompt in PROMPTS[:3]:
        ids = tok(prompt).input_ids
        ref = hf_greedy(model, ids, 6)
        out = served.post({"model": adapter or BASE, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                           "logprobs": 2})
        choice = out["choices"][0]
        assert choice["text"] == tok.decode(ref, skip_special_tokens=True)
        lp = choice["logprobs"]
        assert lp["tokens"] == [tok.decode([t]) for t in ref]
        check_scores(lp, model, ids + ref, len(ids), 2, tok)
        for got, alternatives in zip(lp["token_logprobs"], lp["top_logprobs"]):  # greedy: each the most likely
            assert got == max(alternatives.values())
        offsets = lp["text_offset"]  # where each token's text starts in the completion's text
        assert offsets[0] == 0 and offsets == sorted(offsets)
        pieces = [choice["text"][a:b] for a, b in zip(offsets, offsets[1:] + [len(choice["text"])])]
        assert [p.strip() for p in pieces] == [tok.decode([t], skip_special_tokens=True) for t in ref]


def test_sampled_tokens_get_the_models_logprobs_at_temperature_one(served):
    """Whatever law drew them (T = 0.7, top_p = 0.8, n = 3, seeded), logprobs are the model's at T = 1."""
    model, tok = reference("delta", served.folder)
    out = served.post({"model": "delta", "prompt": [PROMPTS[1], PROMPTS[3]], "max_tokens": 5, "temperature": 0.7,
                       "top_p": 0.8, "seed": 11, "n": 3, "logprobs": 1, "echo": True})
    assert len(out["choices"]) == 6
    for choice in out["choices"]:
        prompt = [PROMPTS[1], PROMPTS[3]][choice["index"] // 3]
        ids = tok(prompt).input_ids
        tokens = tok.convert_tokens_to_ids(choice["logprobs"]["tokens"])  # word-level: a token's text is its name
        assert tokens[:len(ids)] == ids
        check_scores(choice["logprobs"], model, tokens, 0, 1, tok)
        assert choice["text"].startswith(prompt)
    tails = {tuple(c["logprobs"]["tokens"]) for c in out["choices"]}
    assert len(tails) > 2  # the choices were sampled, not all alike


def test_echo_without_logprobs_and_streamed_echo(served):
    ids = served.tok(PROMPTS[0]).input_ids
    plain = served.post({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
    echoed = served.post({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "echo": True})
    assert echoed["choices"][0]["text"] == PROMPTS[0] + plain["choices"][0]["text"]
    assert echoed["choices"][0]["logprobs"] is None
    by_ids = served.post({"model": "alpha", "prompt": ids, "max_tokens": 5, "temperature": 0, "echo": True})
    assert by_ids["choices"][0]["text"] == served.tok.decode(ids) + plain["choices"][0]["text"]
    with httpx.stream("POST", served.url + "/completions", timeout=HANG_GUARD_S, json={
            "model": "alpha", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "echo": True,
            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["choices"][0]["text"]
    assert chunks[0]["choices"][0]["text"] == PROMPTS[0]


def test_the_requests_of_lm_evaluation_harness(served):
    """Exactly the bodies `local-completions` sends (lm_eval/models/openai_completions.py): log-likelihood
    requests as token ids with max_tokens=1, echo, logprobs=1, temperature 0; read as the harness reads them."""
    model, tok = reference("alpha", served.folder)
    context, continuation = tok("t20 t21 t22").input_ids, tok(" t30 t31").input_ids
    for batch in ([context + continuation], [context + continuation, context]):
        out = served.post({"model": "alpha", "prompt": batch, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                           "seed": 1234, "echo": True})
        choice = sorted(out["choices"], key=lambda c: c["index"])[0]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(context + continuation) + 1  # the prompt, then one new token
        ctxlen = len(context)
        loglik = sum(lp["token_logprobs"][ctxlen:-1])  # the harness's parse_logprobs
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                               lp["top_logprobs"][ctxlen:-1]))
        ref = log_softmax(model, context + continuation)
        want = sum(ref[j - 1, continuation[j - ctxlen]].item() for j in range(ctxlen, ctxlen + len(continuation)))
        assert abs(loglik - want) < TOL
        assert greedy == all(ref[j - 1].argmax().item() == continuation[j - ctxlen]
                             for j in range(ctxlen, ctxlen + len(continuation)))


@pytest.mark.parametrize("body, words", [
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 1, "stream": True}, "not supported"),
    ({"max_tokens": 0}, "echo"),
    ({"top_logprobs": 2}, "not supported"),
])
def test_logprobs_requests_the_server_refuses(served, body, words):
    out = served.post({"model": BASE, "prompt": "t20", **body}, status=400)
    assert words in out["error"]["message"]


def test_chat_logprobs_and_echo_stay_refused(served):
    for extra in ({"logprobs": True}, {"echo": True}):
        out = served.post({"model": BASE, "messages": [{"role": "user", "content": "t20"}], **extra},
                          route="/chat/completions", status=400)
        assert "not supported" in out["error"]["message"]


# ---- text prompts and the BOS token ------------------------------------------------------------------------------
def bos_tokenizer():
    """The tiny word-level tokenizer with a BOS (<s>, id 3) that it adds in front of every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<pad>", "<eos>", "<s>"] + [str(d) for d in range(10)] + ["+", "-", "=", "?"]
    words += [f"t{i}" for i in range(len(words), 128)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<s>")


def test_a_text_prompt_gets_one_bos(tmp_path):
    tok = bos_tokenizer()
    assert tok("t20 t21").input_ids == [3, 20, 21] and tok("<s> t20 t21").input_ids == [3, 3, 20, 21]  # the bug
    model, _ = reference(None, None, tok)
    with Served(make_adapters(tmp_path / "a"), tokenizer=tok) as s:
        cases = [("t20 t21", {}, [3, 20, 21]),  # the tokenizer adds its BOS (vLLM's default for completions)
                 ("<s> t20 t21", {}, [3, 20, 21]),  # already there (a chat template's output): not twice
                 ("<s>t20 t21", {}, [3, 20, 21]),
                 ("t20 t21", {"add_special_tokens": False}, [20, 21])]
        for prompt, extra, ids in cases:
            out = s.post({"model": BASE, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, **extra})
            lp = out["choices"][0]["logprobs"]
            assert out["usage"]["prompt_tokens"] == len(ids)
            assert tok.convert_tokens_to_ids(lp["tokens"]) == ids
            check_scores(lp, model, ids, 0, 1, tok)
            assert out["choices"][0]["text"] == prompt
        greedy = s.post({"model": BASE, "prompt": "<s> t20 t21", "max_tokens": 4, "temperature": 0})
        assert greedy["choices"][0]["text"] == tok.decode(hf_greedy(model, [3, 20, 21], 4), skip_special_tokens=True)
        chat = s.post({"model": BASE, "prompt": [3, 20, 21], "max_tokens": 0, "echo": True})  # ids: as given
        assert chat["usage"]["prompt_tokens"] == 3 and chat["choices"][0]["text"] == "<s> t20 t21"


# ---- the harness itself -----------------------------------------------------------------------------------------
MC_DOCS = [{"question": "t20 t21", "choices": ["t30", "t31 t32", "t40"]},
           {"question": "t50 ?", "choices": ["1", "2", "3 + 4"]},
           {"question": "t60 t61 t62", "choices": ["t70 t71", "t72"]},
           {"question": "1 + 2 =", "choices": ["3", "4", "t99"]}]
GEN_DOCS = [{"question": "t20 t21 t22"}, {"question": "t30 ?"}, {"question": "1 + 2 ="}]


def write_tasks(folder, mc_labels, gen_answers):
    folder.mkdir()
    with open(folder / "mc.jsonl", "w") as f:
        for doc, label in zip(MC_DOCS, mc_labels):
            f.write(json.dumps({**doc, "label": label}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for doc, answer in zip(GEN_DOCS, gen_answers):
            f.write(json.dumps({**doc, "answer": answer}) + "\n")
    cache = folder / "hf-cache"
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {folder / 'mc.jsonl'}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {folder / 'gen.jsonl'}}}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["t113"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


def test_lm_evaluation_harness_local_completions_end_to_end(served, tmp_path, monkeypatch):
    """lm-eval's `local-completions` model against this server: a multiple-choice task scored by log-likelihood
    and a generation task, each answer checked against the tiny model with the adapter attached the plain way."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = reference("alpha", served.folder)
    tok.save_pretrained(tmp_path / "tokenizer")  # the harness counts context tokens with the model's tokenizer

    def loglik(question, choice):  # the harness's split: context, then " " + choice
        ctx, cont = tok(question).input_ids, tok(" " + choice).input_ids
        ref = log_softmax(model, ctx + cont)
        return sum(ref[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))

    scores = [[loglik(d["question"], c) for c in d["choices"]] for d in MC_DOCS]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    labels = [b if i % 2 == 0 else (b + 1) % len(MC_DOCS[i]["choices"]) for i, b in enumerate(best)]  # acc: 1/2
    texts, cut = [], []
    for d in GEN_DOCS:
        text = tok.decode(hf_greedy(model, tok(d["question"]).input_ids, 6), skip_special_tokens=True)
        cut.append("t113" in text)
        texts.append(text[:text.index("t113")] if cut[-1] else text)  # the stop string, cut off
    assert all(texts) and any(cut) and not all(cut), texts  # some stop at the stop string, one runs to the end
    answers = [texts[0], "t0 wrong", texts[2]]  # exact_match: 2/3
    write_tasks(tmp_path / "tasks", labels, answers)

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={served.url}/completions,model=alpha,tokenizer={tmp_path / 'tokenizer'},"
                   "tokenizer_backend=huggingface,max_length=128,num_concurrent=1,max_retries=1",
        tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                                 include_defaults=False),
        log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    by_doc = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    for sample, want in zip(by_doc, scores):
        got = [r[0][0] for r in sample["resps"]]  # (log-likelihood, is_greedy) per choice
        assert all(math.isclose(g, w, abs_tol=1e-4) for g, w in zip(got, want)), (got, want)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(0.5)
    gen = sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen] == texts
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)
