import torch

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.generation.bank import AdapterBank
from tinylora.testing import tiny_model

CONFIG = AdapterConfig(u=2, n_tie=4)


def make_files(tmp_path, n, arch="qwen2"):
    paths = []
    for k in range(n):
        model = tiny_model(arch)
        adapter = attach(model, CONFIG, use_cache=True)
        with torch.no_grad():
            adapter.v.copy_(torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(k)) * 0.5)
        paths.append(save_adapter(adapter, tmp_path / f"a{k}.safetensors"))
    return paths


def alone(path, ids, arch="qwen2", **gen):
    from tinylora import load_adapter
    model = tiny_model(arch)
    load_adapter(model, path)
    if gen:
        return model.generate(ids, **gen)
    return model(ids).logits


def test_each_row_equals_its_adapter_alone(tmp_path):
    paths = make_files(tmp_path, 3)
    model = tiny_model("qwen2")
    bank = AdapterBank(model, paths)
    ids = torch.randint(0, 100, (5, 6), generator=torch.Generator().manual_seed(0))
    which = [2, 0, 1, 2, 0]
    with bank.rows(which):
        mixed = model(ids).logits
    for b, k in enumerate(which):
        assert torch.allclose(mixed[b], alone(paths[k], ids[b:b + 1])[0], atol=1e-5)
    assert bank.adapter._row_R is None  # the context cleans up


def test_generate_with_mixed_adapters(tmp_path):
    paths = make_files(tmp_path, 2, "llama")
    model = tiny_model("llama")
    bank = AdapterBank(model, paths)
    ids = torch.randint(0, 100, (4, 5), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with bank.rows([1, 0, 0, 1]):
        out = model.generate(ids, **gen)
    for b, k in enumerate([1, 0, 0, 1]):
        assert torch.equal(out[b], alone(paths[k], ids[b:b + 1], "llama", **gen)[0])


def test_bank_rejects_mixed_configs_and_bad_ids(tmp_path):
    import pytest
    paths = make_files(tmp_path, 1)
    model = tiny_model("qwen2")
    other = attach(tiny_model("qwen2"), AdapterConfig(r=1))  # another rank: other U, Σ, V
    odd = save_adapter(other, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="r=1 differs"):
        AdapterBank(model, paths + [odd])
    bank = AdapterBank(tiny_model("qwen2"), paths)
    with pytest.raises(IndexError):
        with bank.rows([0, 1]):
            pass
