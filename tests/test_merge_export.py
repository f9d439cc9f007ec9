import pytest
import torch

from tinylora import AdapterConfig, attach
from tinylora.export import export_merged, export_peft
from tinylora.testing import tiny_model


def trained(arch, method="tinylora", **kw):
    model = tiny_model(arch)
    adapter = attach(model, AdapterConfig(method=method, **kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, adapter


def test_merge_unmerge_logits(arch, ids):
    model, adapter = trained(arch, u=2, n_tie=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids).logits
    adapter.merge()
    assert adapter.merged
    merged = model(ids).logits
    assert torch.allclose(merged, before, atol=1e-5)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.get_parameter(q), weights[q])
    adapter.unmerge()
    after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, weights[k], atol=1e-6), k
    with adapter.merged_weights():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    assert not adapter.merged


def test_exact_merge_restores_weights_bit_for_bit(ids):
    model, adapter = trained("qwen2", u=2, n_tie=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(5):  # a training loop merges for every rollout
        with adapter.merged_weights(exact=True):
            pass
        with torch.no_grad():
            adapter.v.add_(0.1)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,kw", [("tinylora", dict(u=3, n_tie=4)), ("lora-xs", {}), ("lora", dict(r=3))])
def test_peft_export_gives_equal_logits(arch, ids, tmp_path, method, kw):
    peft = pytest.importorskip("peft")  # installed by the test extra; CI has it
    model, adapter = trained(arch, method, **kw)
    ours = model(ids).logits
    export_peft(adapter, tmp_path / "peft")
    base = tiny_model(arch)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    theirs = peft_model(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def test_merged_export_loads_as_plain_model(ids, tmp_path):
    from transformers import AutoModelForCausalLM
    model, adapter = trained("llama", u=1, n_tie=3)
    ours = model(ids).logits
    export_merged(adapter, tmp_path / "merged")
    assert not adapter.merged
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert torch.allclose(plain(ids).logits, ours, atol=1e-5)
    assert torch.allclose(model(ids).logits, ours, atol=1e-6)  # unmerged again, up to one rounding
