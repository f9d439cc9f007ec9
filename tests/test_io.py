import json

import pytest
import torch

from tinylora import AdapterConfig, attach, load_adapter, read_adapter_file, save_adapter
from tinylora.testing import tiny_model


def trained(arch="qwen2", config=None, seed=0):
    model = tiny_model(arch)
    adapter = attach(model, config or AdapterConfig(u=1, n_tie=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    return model, adapter


@pytest.mark.parametrize("v_dtype", ["fp32", "bf16", "fp16"])
def test_round_trip(tmp_path, ids, v_dtype):
    model, adapter = trained(config=AdapterConfig(u=2, n_tie=3, v_dtype=v_dtype, tie="structured", seed=7))
    out = model(ids).logits
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    fresh = tiny_model("qwen2")
    loaded = load_adapter(fresh, path)
    assert loaded.config == adapter.config
    assert loaded.v.dtype == adapter.v.dtype and torch.equal(loaded.v, adapter.v)
    assert torch.equal(fresh(ids).logits, out)


@pytest.mark.parametrize("method", ["lora", "lora-xs"])
def test_round_trip_other_methods(tmp_path, ids, method):
    model, adapter = trained(config=AdapterConfig(method=method, r=2))
    out = model(ids).logits
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    fresh = tiny_model("qwen2")
    load_adapter(fresh, path)
    assert torch.equal(fresh(ids).logits, out)


def test_thirteen_fp32_parameters_fit_in_under_1kb(tmp_path):
    # 28 layers x 7 modules = 196, as in Qwen2.5-7B: u=1, n_tie=16 -> 13 numbers
    model = tiny_model("qwen2", num_hidden_layers=28, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                       num_key_value_heads=1)
    adapter = attach(model, AdapterConfig(u=1, n_tie=16))
    assert adapter.num_trainable() == 13
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    size = path.stat().st_size
    assert size < 1024, size
    config, meta, tensors = read_adapter_file(path)
    assert sum(t.numel() for t in tensors.values()) == 13
    assert meta["tinylora"] and meta["fingerprint"]["n"] == 196


def test_wrong_base_is_a_clear_error(tmp_path):
    _, adapter = trained("qwen2")
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"does not fit.*q_proj: file expects shape"):
        load_adapter(tiny_model("qwen2", hidden_size=48), path)
    with pytest.raises(ValueError, match=r"does not fit.*3 target modules|21 target modules"):
        load_adapter(tiny_model("qwen2", num_hidden_layers=2), path)
    with pytest.raises(ValueError, match="targeted weights differ"):
        load_adapter(tiny_model("qwen2", seed=123), path)  # same shapes, other weights
    with pytest.warns(UserWarning, match="targeted weights differ"):
        load_adapter(tiny_model("qwen2", seed=123), path, strict=False)


def test_same_base_in_another_dtype_loads(tmp_path):
    import warnings
    _, adapter = trained("llama")
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    model = tiny_model("llama").to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: the values are the same model's
        load_adapter(model, path)


def test_a_base_that_differs_in_one_module_is_another_model(tmp_path):
    _, adapter = trained("llama")
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    model = tiny_model("llama")
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w[0, 0] += 0.05 * w.abs().max()  # one entry of one targeted module
    with pytest.raises(ValueError, match="targeted weights differ"):
        load_adapter(model, path)


def test_flipped_bytes_of_v_fail_the_checksum(tmp_path):
    _, adapter = trained("llama")
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # the last bytes of the file are v's
    damaged = tmp_path / "d.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_adapter_file(damaged)


def test_a_second_adapter_on_the_same_model_is_refused(tmp_path):
    model = tiny_model("llama")
    first = attach(model, AdapterConfig())
    with pytest.raises(ValueError, match="already has a tinylora adapter"):
        attach(model, AdapterConfig(n_tie="all"))
    first.detach()
    attach(model, AdapterConfig(n_tie="all"))  # after detach() it is the plain model again
    assert not any("_tinylora_adapter" in n for n, _ in model.named_modules())


def test_truncated_and_corrupted_files(tmp_path):
    _, adapter = trained()
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_adapter_file(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_adapter_file(tmp_path / "g.safetensors")
    with pytest.raises(FileNotFoundError):
        read_adapter_file(tmp_path / "missing.safetensors")


def test_foreign_and_damaged_metadata(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "peft.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a tinylora adapter"):
        read_adapter_file(tmp_path / "peft.safetensors")
    meta = {"format": "tinylora-adapter", "format_version": "1", "config": json.dumps({"method": "x"}),
            "fingerprint": "{}"}
    save_file({"v.0": torch.zeros(1)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="metadata is damaged.*method"):
        read_adapter_file(tmp_path / "bad.safetensors")
    meta["config"] = AdapterConfig().to_json()
    save_file({"v.0": torch.tensor([float("nan")])}, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        read_adapter_file(tmp_path / "nan.safetensors")


def test_no_pickle_in_package():
    import pathlib

    import tinylora
    src = pathlib.Path(tinylora.__file__).parent
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, f


def test_saving_while_merged_writes_the_base_fingerprint(tmp_path):
    _, adapter = trained()
    plain = save_adapter(adapter, tmp_path / "a.safetensors")
    adapter.merge()
    merged = save_adapter(adapter, tmp_path / "b.safetensors")
    assert read_adapter_file(plain)[1]["fingerprint"] == read_adapter_file(merged)[1]["fingerprint"]


def test_file_names_no_local_path_and_is_the_same_on_any_machine(tmp_path, monkeypatch):
    """The same v, config and base give byte-identical files wherever the base sits: an embedded model (its
    cache folder differs per user) is named by its hub id, a local folder by its own name, never its path."""
    from tinylora import embedded, models
    from tinylora.testing import tiny_tokenizer
    entry = embedded.CATALOGUE[embedded.DEFAULT_MODEL]
    files = []
    for machine in ("alice", "bob"):
        cache = tmp_path / machine / ".cache"
        folder = cache / "models" / entry.name  # where ensure_embedded would have converted it
        tiny_model("qwen2").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        monkeypatch.setattr(embedded, "ensure_embedded", lambda name, f=folder: f)
        model, _ = models.load_model(embedded.DEFAULT_MODEL, "fp32", "cpu")
        adapter = attach(model, AdapterConfig(u=1, n_tie=2))
        with torch.no_grad():
            adapter.v.fill_(0.25)
        files.append(save_adapter(adapter, tmp_path / machine / "a.safetensors").read_bytes())
        _, meta, _ = read_adapter_file(tmp_path / machine / "a.safetensors")
        assert meta["base"] == entry.hub_id
        plain, _ = models.load_model(str(folder), "fp32", "cpu")  # a local folder: its name only
        plain_adapter = attach(plain, AdapterConfig(u=1, n_tie=2))
        save_adapter(plain_adapter, tmp_path / machine / "b.safetensors")
        _, meta, _ = read_adapter_file(tmp_path / machine / "b.safetensors")
        assert meta["base"] == entry.name
    assert files[0] == files[1]
    assert b"alice" not in files[0] and str(tmp_path).encode() not in files[0]
