"""The engine's detours around slow CPU paths: decode attention against attention written out by hand, the output
head's contiguous input."""

import math

import pytest
import torch
from transformers.integrations import sdpa_attention

from tinylora.generation import cpu_kernels
from tinylora.generation.engine import Engine, Sampling
from tinylora.testing import tiny_model_and_tokenizer


def by_hand(query, key, value, mask=None):
    """softmax(q·kᵀ/√d + mask)·v with each key/value head repeated for its group of query heads: [n, q, heads, d]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # [n, heads, L, d]
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])  # [n, heads, q, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ value).transpose(1, 2)  # [n, q, heads, d]


class Grouped(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_an_unmasked_decode_step_matches_attention_by_hand_and_never_asks_sdpa_for_grouped_heads(monkeypatch):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(4, 6, 1, 8, generator=g)  # [n, heads, 1, d]: 2 key/value heads of 3 query heads each
    key, value = torch.randn(4, 2, 37, 8, generator=g), torch.randn(4, 2, 37, 8, generator=g)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(cpu_kernels.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or sdpa(*a, **k))
    out, weights = cpu_kernels.decode_sdpa(Grouped(), query, key, value, None, scaling=8 ** -0.5)
    assert weights is None and out.shape == (4, 1, 6, 8)
    torch.testing.assert_close(out, by_hand(query, key, value), rtol=1e-5, atol=1e-6)
    assert calls and not any(k.get("enable_gqa") for k in calls)


@pytest.mark.parametrize("q, masked", [(5, False), (1, True)])
def test_prefill_and_masked_steps_are_transformers_sdpa_unchanged(monkeypatch, q, masked):
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 6, q, 8, generator=g)
    key, value = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = torch.ones(2, 1, q, 9, dtype=torch.bool)
    mask[0, ..., :3] = False  # row 0 is left-padded
    delegated = []
    original = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(cpu_kernels, "sdpa_attention_forward", lambda *a, **k: delegated.append(1) or original(*a, **k))
    out, _ = cpu_kernels.decode_sdpa(Grouped(), query, key, value, mask if masked else None, scaling=8 ** -0.5,
                                   is_causal=False)
    assert delegated == [1]
    torch.testing.assert_close(out, by_hand(query, key, value, mask if masked else None), rtol=1e-5, atol=1e-6)


def test_the_engine_decodes_through_it_and_gives_the_model_back_as_it_was(monkeypatch):
    model, tok = tiny_model_and_tokenizer()  # 4 query heads over 2 key/value heads
    calls, head_inputs = [], []
    original = cpu_kernels.decode_sdpa
    monkeypatch.setitem(cpu_kernels.ALL_ATTENTION_FUNCTIONS._global_mapping, cpu_kernels.NAME,
                        lambda module, query, *a, **k: calls.append(query.shape[2]) or original(module, query, *a, **k))
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(args[0]))
    prompts = [tok(text, add_special_tokens=False).input_ids for text in ("a b c d", "d c b a")]  # equal lengths
    engine = Engine(model, tok)
    with engine.generating():
        rows = [engine.add(p, Sampling(max_new_tokens=4, temperature=0, ignore_eos=True))[0] for p in prompts]
        while not engine.idle:
            engine.step()
    assert model.config._attn_implementation == "sdpa" and not model.get_output_embeddings()._forward_pre_hooks
    assert calls.count(1) == 3 * model.config.num_hidden_layers  # every decode step after the first token
    assert all(x.is_contiguous() for x in head_inputs)  # the prefill's [2, 1, d] view of [2, P, d] included
    for prompt, row in zip(prompts, rows):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
        assert row.tokens == expected[0, len(prompt):].tolist()


def test_generate_keeps_the_attention_its_recorded_results_were_computed_with(monkeypatch):
    model, tok = tiny_model_and_tokenizer()
    calls = []
    monkeypatch.setitem(cpu_kernels.ALL_ATTENTION_FUNCTIONS._global_mapping, cpu_kernels.NAME,
                        lambda *a, **k: calls.append(1) or cpu_kernels.decode_sdpa(*a, **k))
    Engine(model, tok).generate(["a b c d", "d c b a"], max_new_tokens=4, greedy=True)  # equal lengths: no mask
    assert calls == [] and model.config._attn_implementation == "sdpa"
