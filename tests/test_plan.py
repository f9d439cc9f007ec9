import math

import pytest

from tinylora import AdapterConfig
from tinylora.adapter.plan import Target, tie_groups
from tinylora.count import count

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fake_targets(layers=4):
    return [Target(f"model.layers.{i}.x.{k}", k, i, (8, 8)) for i in range(layers) for k in KINDS]


def test_tiled_groups_consecutive_modules_in_depth_order():
    groups = tie_groups(fake_targets(), 3)
    assert groups[0] == [0, 1, 2] and groups[1] == [3, 4, 5] and groups[-1] == [27]
    assert len(groups) == math.ceil(28 / 3)


def test_structured_groups_one_type_across_consecutive_layers():
    t = fake_targets()
    groups = tie_groups(t, 2, "structured")
    assert len(groups) == 14
    for g in groups:
        assert len({t[i].kind for i in g}) == 1
        assert [t[i].layer for i in g] in ([0, 1], [2, 3])


def test_structured_uneven_tie_spans_the_seam_but_keeps_the_count():
    t = fake_targets()
    groups = tie_groups(t, 3, "structured")
    assert len(groups) == math.ceil(28 / 3)
    assert [(t[i].kind, t[i].layer) for i in groups[1]] == [("q_proj", 3), ("k_proj", 0), ("k_proj", 1)]


@pytest.mark.parametrize("tie", ["tiled", "structured"])
@pytest.mark.parametrize("n_tie", [1, 2, 5, 16, 28, 100, "all"])
def test_groups_partition_all_modules(tie, n_tie):
    t = fake_targets()
    config = AdapterConfig(n_tie=n_tie, tie=tie, u=3)
    groups = tie_groups(t, n_tie, tie)
    assert sorted(i for g in groups for i in g) == list(range(28))
    assert config.method_object.groups(t, config) == groups
    assert config.method_object.count(t, config) == len(groups) * 3


@pytest.mark.parametrize("u,n_tie,expected", [(1, 16, 13), (1, 4, 49), (1, 1, 196), (2, 1, 392),
                                              (32, 1, 6272), (512, 1, 100352)])
def test_paper_counts_qwen25_7b(u, n_tie, expected):
    c = count("Qwen/Qwen2.5-7B-Instruct", AdapterConfig(u=u, n_tie=n_tie))
    assert c["trainable_params"] == expected and c["modules"] == 196
    assert c["bytes"]["bf16"] == 2 * expected


def test_other_counts():
    assert count("Qwen/Qwen2.5-7B-Instruct", AdapterConfig(u=1, n_tie="all"))["trainable_params"] == 1
    lora = count("Qwen/Qwen2.5-7B-Instruct", AdapterConfig(method="lora", r=1))["trainable_params"]
    assert lora == 2_523_136  # the paper's "~2.5M" for rank-1 LoRA on all 7 projections
    assert count("Qwen/Qwen2.5-7B-Instruct", AdapterConfig(method="lora-xs", n_tie=1))["trainable_params"] == 196 * 4
    assert count("meta-llama/Llama-3.1-8B", AdapterConfig(method="full"))["trainable_params"] == 8_030_261_248


def test_unknown_model_lists_catalogue(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Known ids:.*Qwen/Qwen2.5-7B-Instruct"):
        count("nobody/nothing", AdapterConfig())


def test_count_from_local_config(tmp_path):
    from tinylora.testing import tiny_config
    tiny_config("llama").save_pretrained(tmp_path)
    assert count(str(tmp_path), AdapterConfig(n_tie=2))["trainable_params"] == math.ceil(21 / 2)
    assert count(str(tmp_path / "config.json"), AdapterConfig())["modules"] == 21
