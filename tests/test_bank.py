import torch

from tinylora import AdapterConfig, attach, save_adapter
from tinylora.generation.bank import AdapterBank
from tinylora.testing import tiny_model, tiny_model_and_tokenizer

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


def test_the_bank_holds_each_adapter_as_its_v_and_builds_stacks_on_demand():
    from tinylora.generation.bank import R_CACHE
    model, _ = tiny_model_and_tokenizer("llama")
    config = AdapterConfig(u=1, n_tie=4)
    bank = AdapterBank(model, config=config)
    shape = (len(bank.adapter.groups), 1)  # [n_groups, k]
    g = torch.Generator().manual_seed(0)
    vs = {f"user{i}": torch.randn(shape, generator=g) * 0.1 for i in range(2000)}
    for name, v in vs.items():
        bank.add(name, config, v)
    v_bytes = 4 * shape[0] * shape[1]
    # 2,000 v of 16 bytes, in rows grown by doubling (at most 2x), and no stack built yet
    assert len(bank) == 2000 and 2000 * v_bytes <= bank.nbytes <= 2 * 2000 * v_bytes + 16 * v_bytes
    stack_bytes = 4 * len(bank.adapter.targets) * config.r * config.r
    assert stack_bytes > 10 * v_bytes  # what holding stacks would have cost
    # a stack built from v equals the adapter's own R, module by module
    R = bank.get("user7")
    ref = attach(tiny_model_and_tokenizer("llama")[0], config)
    with torch.no_grad():
        ref.v.copy_(vs["user7"])
    torch.testing.assert_close(R, torch.stack([ref.R(i) for i in range(len(ref.targets))]).to(R.dtype))
    assert bank.nbytes - 2000 * v_bytes <= 2 * 2000 * v_bytes + stack_bytes  # one stack cached now
    # replace and remove: the next stack follows, the name goes
    bank.add("user7", config, vs["user8"])
    torch.testing.assert_close(bank.get("user7"), bank.get("user8"))
    bank.remove("user7")
    assert bank.get("user7") is None and "user7" not in bank and len(bank) == 1999
    bank.add("new", config, vs["user9"])  # reuses the freed row
    assert len(bank) == 2000 and torch.equal(bank.get("new"), bank.get("user9"))
    for name in list(vs)[:R_CACHE + 10]:
        bank.get(name) if name in bank else None
    assert bank.nbytes <= 2 * 2000 * v_bytes + 16 * v_bytes + R_CACHE * stack_bytes  # the cache is bounded


def test_a_pack_written_by_another_process_is_served_fresh(tmp_path):
    from tinylora.storage.pack import Pack
    model, _ = tiny_model_and_tokenizer("llama")
    config = AdapterConfig(u=1, n_tie=4)
    probe = AdapterBank(model, config=config)
    shape = probe.v_shape(config)
    Pack.create(tmp_path / "p.pack", like=(config, probe.fingerprint, "tiny", shape)).close()
    probe.adapter.detach()
    with Pack(tmp_path / "p.pack") as writer:
        writer.put({"ann": torch.full(shape, 0.1)})
    bank = AdapterBank(model, pack=Pack(tmp_path / "p.pack"))
    first = bank.get("ann")
    other = Pack(tmp_path / "p.pack")  # another connection: what another process's `pack add` is
    other.put({"ann": torch.full(shape, -0.3)})
    other.close()
    now = bank.get("ann")
    torch.testing.assert_close(now, -3 * first)  # R is linear in v: the new v, not the cached stack


def test_rows_without_an_adapter_cost_no_adapter_work(tmp_path):
    """The engine hands the adapter only the rows that have one: a batch of base rows runs no hook math,
    a mixed batch runs it on its adapted rows alone, and the base rows still equal the plain model."""
    from tinylora.generation.engine import Engine
    paths = make_files(tmp_path, 2, "llama")
    model, tok = tiny_model_and_tokenizer("llama")
    bank = AdapterBank(model, paths)
    seen = []  # batch size of every per-row adapter computation
    down = bank.adapter._down
    bank.adapter._down = lambda i, x: (seen.append(int(x.shape[0] if bank.adapter._row_index is None
                                                         else len(bank.adapter._row_index))), down(i, x))[1]
    engine = Engine(model, tok, bank=bank, weights="hooks")
    prompts = ["t1 t2 t3", "t4 t5", "t6 t7 t8 t9"]
    base = engine.generate(prompts, max_new_tokens=5, greedy=True, adapters=[None, None, None])
    assert seen == []
    mixed = engine.generate(prompts, max_new_tokens=5, greedy=True, adapters=[None, "a1", None])
    assert seen and set(seen) == {1}
    assert mixed.completions[0] == base.completions[0] and mixed.completions[2] == base.completions[2]
    plain, _ = tiny_model_and_tokenizer("llama")
    ref = Engine(plain, tok, weights="merged").generate(prompts, max_new_tokens=5, greedy=True)
    assert base.completions == ref.completions


def test_an_adapted_rows_output_does_not_depend_on_its_neighbours_having_adapters(tmp_path):
    """bf16, where a second rounding shows: a row's logits next to a base row equal those next to an adapted one."""
    from tinylora.generation.engine import Engine
    paths = make_files(tmp_path, 2, "llama")
    model, tok = tiny_model_and_tokenizer("llama")
    model = model.to(torch.bfloat16)
    bank = AdapterBank(model, paths)
    engine = Engine(model, tok, bank=bank, weights="hooks")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    logits = {}
    for other in ("a1", None):
        R = torch.stack([bank.get("a0"), bank.get(other) if other else bank.zeros()])
        with torch.no_grad(), engine.adapters.context(R):
            logits[other] = model(input_ids=ids).logits[0]
    assert torch.equal(logits["a1"], logits[None])
