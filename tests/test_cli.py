import json

import torch

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.cli.main import build_parser, main
from tinylora.testing import tiny_model


def test_count_json(capsys):
    assert main(["count", "--model", "Qwen/Qwen2.5-7B-Instruct", "--u", "1", "--n-tie", "16", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["trainable_params"] == 13 and c["modules"] == 196 and c["groups"] == 13
    assert c["bytes"] == {"fp32": 52, "bf16": 26, "fp16": 26}
    # with no --n-tie: the paper's tying, the same default as AdapterConfig and `tinylora train`
    assert main(["count", "--model", "Qwen/Qwen2.5-7B-Instruct", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 13


def test_count_table_and_lora(capsys):
    assert main(["count", "--model", "Qwen/Qwen2.5-7B-Instruct", "--method", "lora", "--r", "1"]) == 0
    out = capsys.readouterr().out
    assert "2,523,136" in out and "lora" in out


def test_count_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["count", "--model", "no/such-model"]) == 2
    assert "Known ids" in capsys.readouterr().err
    assert main(["count", "--model", "Qwen/Qwen3-0.6B", "--targets", "zz_proj"]) == 2
    assert "available module names" in capsys.readouterr().err


def test_export_and_merge_load_fp32_on_every_device():
    # `auto` would load bf16 on a GPU, where most of a TinyLoRA update (~1e-3 of each weight) rounds away
    for cmd in ("export", "merge"):
        assert build_parser().parse_args([cmd, "--model", "m", "--adapter", "a", "--out", "o"]).dtype == "fp32"


def test_info_and_export(tmp_path, capsys):
    model = tiny_model("qwen2")
    adapter = attach(model, AdapterConfig(u=1, n_tie=7))
    with torch.no_grad():
        adapter.v[1].fill_(0.25)
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapter.detach()
    adapter = attach(base, AdapterConfig(u=1, n_tie=7))
    with torch.no_grad():
        adapter.v[1].fill_(0.25)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["v"]["v"][1] == [0.25] and info["trainable_params"] == 3
    # export loads model and tokenizer from the folder, so give it a (tiny) tokenizer
    tok_dir = tmp_path / "base"
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            eos_token="<unk>").save_pretrained(tok_dir)
    assert main(["export", "--model", str(tok_dir), "--adapter", str(path), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert main(["merge", "--model", str(tok_dir), "--adapter", str(path), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-5)
