import torch

from tinylora import AdapterConfig, attach
from tinylora.generation.batch import completion_mask
from tinylora.generation.engine import sample
from tinylora.generation.sampling import sample_categorical
from tinylora.testing import tiny_model_and_tokenizer
from tinylora.training.logprobs import group_logprobs, sequence_logprobs

PROMPTS = ["t20 t21 t22", "t30 ?", "t40 t41 t42 t43 t44", "t50"]


def test_greedy_sampling_equals_transformers_generate(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    ro = sample(model, tok, PROMPTS, max_new_tokens=10, greedy=True)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ref = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    C = ro.completion_ids.shape[1]
    ref_c = ref[:, enc.input_ids.shape[1]:][:, :C]
    assert torch.equal(ro.completion_ids * ro.completion_mask, ref_c * ro.completion_mask)


def test_rollout_logprobs_match_training_logprobs_and_are_seeded():
    model, tok = tiny_model_and_tokenizer("qwen2")
    tok_eos = tok.eos_token_id
    adapter = attach(model, AdapterConfig(u=2, n_tie=3))
    with torch.no_grad():
        adapter.v.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    with adapter.merged_weights():
        ro = sample(model, tok, PROMPTS * 3, max_new_tokens=12, temperature=0.8, seed=5)
    train = sequence_logprobs(model, ro.input_ids, ro.attention_mask, ro.prompt_len, temperature=0.8)
    gap = ((train - ro.logp_rollout).abs() * ro.completion_mask).max()
    assert gap < 1e-4, gap
    again = sample(model, tok, PROMPTS * 3, max_new_tokens=12, temperature=0.8, seed=5)
    assert torch.equal(again.input_ids, ro.input_ids)
    assert not torch.equal(sample(model, tok, PROMPTS * 3, max_new_tokens=12, seed=6).input_ids, ro.input_ids)
    assert tok_eos is not None


def test_sample_categorical_draws_the_given_probabilities():
    # 11 entries in blocks of 4 (one padding entry), zeros at both ends and in the middle
    p = torch.tensor([0.0, 0.05, 0.3, 0.0, 0.15, 0.1, 0.0, 0.0, 0.25, 0.15, 0.0])
    n = 200_000
    draws = sample_categorical(p.expand(n, -1), torch.rand(n, 1, generator=torch.Generator().manual_seed(0)), block=4)
    freq = torch.bincount(draws, minlength=12).double() / n
    assert freq[11] == 0 and (freq[:11][p == 0] == 0).all()  # never padding, never a zero entry
    sigma = (p * (1 - p) / n).sqrt().double()
    assert ((freq[:11] - p).abs() <= 5 * sigma + 1e-12).all(), freq
    edge = torch.zeros(3, 11)
    edge[0, 0] = edge[1, 10] = edge[2, 7] = 1.0  # all mass on one entry, including the last real one
    u = torch.rand(3, 1, generator=torch.Generator().manual_seed(1))
    assert sample_categorical(edge, u, block=4).tolist() == [0, 10, 7]
    a, b = (sample_categorical(p.expand(50, -1), torch.rand(50, 1, generator=torch.Generator().manual_seed(3)), block=4)
            for _ in range(2))
    assert torch.equal(a, b)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_repeats_share_one_prefill_and_equal_repeated_prompts():
    model, tok = tiny_model_and_tokenizer("llama")
    shared = sample(model, tok, PROMPTS, max_new_tokens=8, greedy=True, repeats=3)
    repeated = sample(model, tok, [p for p in PROMPTS for _ in range(3)], max_new_tokens=8, greedy=True)
    assert torch.equal(shared.input_ids, repeated.input_ids)
    assert shared.completions == repeated.completions
    sampled = sample(model, tok, PROMPTS, max_new_tokens=8, repeats=4, seed=1)
    assert sampled.input_ids.shape[0] == 16 and len(set(sampled.completions[:4])) > 1


def test_group_logprobs_equal_full_sequence_logprobs_and_gradients(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    adapter = attach(model, AdapterConfig(u=2, n_tie=3))
    with torch.no_grad():
        adapter.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    ro = sample(model, tok, PROMPTS, max_new_tokens=7, repeats=3, seed=1)
    P, m = ro.prompt_len, ro.completion_mask.bool()
    full = sequence_logprobs(model, ro.input_ids, ro.attention_mask, P, temperature=0.9)
    grouped = group_logprobs(model, ro.input_ids[::3, :P], ro.attention_mask[::3, :P], ro.input_ids[:, P:],
                             ro.attention_mask[:, P:], temperature=0.9)
    assert grouped.shape == full.shape
    torch.testing.assert_close(grouped[m], full[m], atol=1e-5, rtol=0)
    g_full = torch.autograd.grad((full * m).sum(), adapter.v)[0]
    g_grouped = torch.autograd.grad((grouped * m).sum(), adapter.v)[0]
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_grouped, g_full, atol=1e-5, rtol=1e-4)
