import math

import pytest
import torch

from tinylora import AdapterConfig, attach


def _set_v(adapter, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.v.copy_(torch.randn(adapter.v.shape, generator=g) * std)


def reference_delta(adapter, config, i) -> torch.Tensor:
    """ΔW of target i in float64 by the paper's formula U Σ (Σ_k v_k P_k / √u) Vᵀ, from the adapter's factors,
    projections and v (checked against an independent SVD in test_delta_matches_reference_einsum)."""
    f = adapter.factors[i]
    v = adapter.v[adapter.group_of[i]].detach().double()
    P = config.method_object.projections(config, adapter.targets[i].name).double()
    R = torch.einsum("k,kij->ij", v, P) / math.sqrt(config.u)
    return f.U.double() @ torch.diag(f.S.double()) @ R @ f.V.double().T


def merged_float64(fresh, adapter, config):
    """`fresh` (the adapted model's base, rebuilt) in float64 with every reference ΔW added to its weights."""
    fresh = fresh.double()
    with torch.no_grad():
        for i, t in enumerate(adapter.targets):
            fresh.get_submodule(t.name).weight += reference_delta(adapter, config, i)
    return fresh


def reference_v_grad(fresh, adapter, config, ids, loss) -> torch.Tensor:
    """dloss/dv by the chain rule through plain torch: the gradient G of each target weight in the merged float64
    model, then dΔW/dv_k = U Σ P_k Vᵀ / √u, so dloss/dv_k = Σ_targets <G, U Σ P_k Vᵀ> / √u."""
    merged = merged_float64(fresh, adapter, config)
    for p in merged.parameters():
        p.requires_grad_(False)
    weights = [merged.get_submodule(t.name).weight.requires_grad_(True) for t in adapter.targets]
    loss(merged(ids).logits).backward()
    grad = torch.zeros(adapter.v.shape, dtype=torch.float64)
    for i, (t, w) in enumerate(zip(adapter.targets, weights)):
        f = adapter.factors[i]
        P = config.method_object.projections(config, t.name).double()
        M = (f.U.double().T @ w.grad @ f.V.double()) * f.S.double()[:, None]  # [r, r]: <G, U Σ P Vᵀ> = Σ M∘P
        grad[adapter.group_of[i]] += torch.einsum("ij,kij->k", M, P) / math.sqrt(config.u)
    return grad


def test_starts_exactly_at_base(model, ids):
    base = model(ids).logits
    attach(model, AdapterConfig(u=3, n_tie=2))
    assert torch.equal(model(ids).logits, base)


def test_delta_matches_reference_einsum(model):
    config = AdapterConfig(u=3, n_tie=4, r=2)
    adapter = attach(model, config)
    _set_v(adapter)
    for i, t in enumerate(adapter.targets):
        W = model.get_submodule(t.name).weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :2], S[:2], Vh[:2].T
        # the adapter picks canonical signs; ΔW = U Σ R Vᵀ changes sign with (u_j, v_j) flips only
        # through R, so compare against our U/V but an independently computed Σ
        f = adapter.factors[i]
        assert torch.allclose(f.S.double(), S, rtol=1e-6)
        assert torch.allclose((f.U.double() @ torch.diag(f.S.double()) @ f.V.double().T),
                              U @ torch.diag(S) @ V.T, atol=1e-5)
        v = adapter.v[adapter.group_of[i]].detach().double()
        P = config.method_object.projections(config, t.name).double()
        R = torch.einsum("k,kij->ij", v, P) / math.sqrt(config.u)
        ref = torch.einsum("or,rs,st,it->oi", f.U.double(), torch.diag(f.S.double()), R, f.V.double())
        assert torch.allclose(adapter.delta_weight(i).double(), ref, atol=1e-6)
        x = torch.randn(5, t.shape[1])
        assert torch.allclose(adapter.delta_output(i, x).double(), x.double() @ ref.T, atol=1e-5)


def test_forward_equals_model_with_delta_added(model, ids):
    adapter = attach(model, AdapterConfig(u=2, n_tie=3))
    _set_v(adapter, std=0.5)
    out = model(ids).logits
    deltas = [adapter.delta_weight(i) for i in range(len(adapter.targets))]
    adapter.detach()
    with torch.no_grad():
        for t, d in zip(adapter.targets, deltas):
            model.get_submodule(t.name).weight += d
    assert torch.allclose(model(ids).logits, out, atol=1e-5)


def test_gradients_reach_v_and_nothing_else(model, arch, ids):
    from tinylora.testing import tiny_model
    config = AdapterConfig(u=2, n_tie=5)
    adapter = attach(model, config)
    _set_v(adapter, std=0.1)
    model(ids).logits.square().mean().backward()
    ref = reference_v_grad(tiny_model(arch), adapter, config, ids, lambda logits: logits.square().mean())
    assert (ref.abs().sum(1) > 0).all()  # every group gets a gradient
    assert torch.allclose(adapter.v.grad.double(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert adapter.trainable_parameters() == [adapter.v]


@pytest.mark.parametrize("v_dtype,torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_v_dtype_is_stored_and_trained_in_that_dtype(v_dtype, torch_dtype, ids):
    from tinylora.testing import tiny_model
    config = AdapterConfig(u=4, n_tie="all", v_dtype=v_dtype)
    model = tiny_model("qwen2")
    adapter = attach(model, config)
    assert adapter.v.shape == (1, 4) and adapter.v.dtype == torch_dtype
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model(ids).logits.mean().backward()
    ref = reference_v_grad(tiny_model("qwen2"), adapter, config, ids, lambda logits: logits.mean())
    assert adapter.v.grad.dtype == torch_dtype
    assert torch.allclose(adapter.v.grad.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    opt.step()
    # AdamW's first step from v = 0 (weight decay multiplies 0): each number moves by -lr g / (|g| + eps) = -lr sign(g)
    assert adapter.v.dtype == torch_dtype
    assert torch.allclose(adapter.v.double(), (-1e-2 * ref.sign()).to(torch_dtype).double(), rtol=1e-3)


def test_fp16_v_is_refused_for_training_with_the_reason(tmp_path):
    # AdamW's second moment (0.001 g²) and its eps (1e-8) underflow to 0 in fp16: the first step divides by zero
    from tinylora.tasks import Problem
    from tinylora.testing import tiny_model_and_tokenizer
    from tinylora.training.config import TrainConfig
    from tinylora.training.trainer import Trainer
    model, tok = tiny_model_and_tokenizer("qwen2")
    adapter = attach(model, AdapterConfig(u=4, n_tie="all", v_dtype="fp16"))
    with pytest.raises(ValueError, match="v_dtype='fp16'.*underflow.*fp32 or bf16"):
        Trainer(model, tok, adapter, [Problem("q", "1")], TrainConfig(), tmp_path)


def test_bf16_model_runs(ids):
    from tinylora.testing import tiny_model
    config = AdapterConfig(u=1, n_tie=4)
    model = tiny_model("llama", dtype=torch.bfloat16)
    adapter = attach(model, config)
    _set_v(adapter)
    out = model(ids).logits
    assert out.dtype == torch.bfloat16
    # the same bf16 weights in float64 with ΔW added by plain torch: equal to bf16 rounding (measured max error
    # 0.003), while leaving ΔW out is 0.3 off, so the adapter's effect is what is compared
    plain = tiny_model("llama", dtype=torch.bfloat16)
    ref = merged_float64(plain, adapter, config)(ids).logits
    base = tiny_model("llama", dtype=torch.bfloat16).double()(ids).logits
    assert (base - ref).abs().max() > 0.1
    assert torch.allclose(out.double(), ref, atol=0.02)


def test_lora_xs_trains_full_r_by_r_per_group(ids):
    from tinylora.testing import tiny_model
    model = tiny_model("qwen3")
    adapter = attach(model, AdapterConfig(method="lora-xs", r=3, n_tie=1))
    assert adapter.num_trainable() == 21 * 9 == adapter.v.numel()
    with torch.no_grad():
        adapter.v[0].copy_(torch.arange(9.0))
    f = adapter.factors[0]
    R = torch.arange(9.0).view(3, 3)
    assert torch.allclose(adapter.delta_weight(0), (f.U * f.S) @ R @ f.V.T)


def test_lora_baseline(ids):
    from tinylora.testing import tiny_model
    model = tiny_model("llama")
    base = model(ids).logits
    adapter = attach(model, AdapterConfig(method="lora", r=4))
    assert torch.equal(model(ids).logits, base)  # B starts at zero
    assert adapter.num_trainable() == sum(p.numel() for p in adapter.trainable_parameters())
    model(ids).logits.mean().backward()
    # at B = 0: dloss/dB = s · G Aᵀ and dloss/dA = s · Bᵀ G = 0, G the plain model's weight gradient
    plain = tiny_model("llama").double()
    for p in plain.parameters():
        p.requires_grad_(False)
    weights = [plain.get_submodule(t.name).weight.requires_grad_(True) for t in adapter.targets]
    plain(ids).logits.mean().backward()
    scale = 1.0  # s = lora_alpha / r, and lora_alpha defaults to r
    for A, B, w in zip(adapter.lora_A, adapter.lora_B, weights):
        ref = scale * w.grad @ A.detach().double().T
        assert ref.abs().max() > 0
        assert torch.allclose(B.grad.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
        assert A.grad is None or not A.grad.any()


def test_full_and_frozen(ids):
    from tinylora.testing import tiny_model
    model = tiny_model("qwen2")
    full = attach(model, AdapterConfig(method="full"))
    assert full.num_trainable() == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    model2 = tiny_model("qwen2")
    frozen = attach(model2, AdapterConfig(method="frozen"))
    assert frozen.num_trainable() == 0 and frozen.trainable_parameters() == []
    assert not any(p.requires_grad for p in model2.parameters())


def test_targets_by_name_and_regex():
    from tinylora.testing import tiny_model
    model = tiny_model("qwen2")
    assert len(attach(model, AdapterConfig(targets=["q_proj", "v_proj"])).targets) == 6
    model = tiny_model("qwen2")
    adapter = attach(model, AdapterConfig(targets=r"model\.layers\.[01]\..*_proj"))
    assert {t.layer for t in adapter.targets} == {0, 1} and len(adapter.targets) == 14


def test_unknown_target_names_the_available_modules():
    from tinylora.testing import tiny_model
    with pytest.raises(ValueError, match=r"\['nope'\].*available module names.*q_proj"):
        attach(tiny_model("llama"), AdapterConfig(targets=["q_proj", "nope"]))
    with pytest.raises(ValueError, match="match no linear layer"):
        attach(tiny_model("llama"), AdapterConfig(targets="nothing.*here"))


@pytest.mark.parametrize("field,value", [("method", "dora"), ("tie", "random"), ("r", 0), ("u", -1),
                                         ("n_tie", 0), ("n_tie", "some"), ("v_dtype", "int8"), ("svd", "qr")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"AdapterConfig.{field}="):
        AdapterConfig(**{field: value})


def test_disabled_gives_base_and_detach_restores(model, ids):
    base = model(ids).logits
    adapter = attach(model, AdapterConfig(u=2))
    _set_v(adapter)
    assert not torch.allclose(model(ids).logits, base)
    with adapter.disabled():
        assert torch.equal(model(ids).logits, base)
    adapter.detach()
    assert torch.equal(model(ids).logits, base)


def test_no_grad_fast_path_equals_the_training_path_and_follows_v():
    from tinylora.testing import tiny_model_and_tokenizer
    model, _ = tiny_model_and_tokenizer("qwen2")
    adapter = attach(model, AdapterConfig(u=2, n_tie=3))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for k in range(3):  # every way of changing v must reach the cached fused factors
        with torch.no_grad():
            if k == 0:
                adapter.v.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            elif k == 1:
                adapter.v.data.copy_(torch.randn(adapter.v.shape, generator=torch.Generator().manual_seed(2)))
            else:
                adapter.v.data = adapter.v.data * 0.5
            fast = model(input_ids=ids).logits
        slow = model(input_ids=ids).logits  # grad mode: the unfused path
        torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
        with torch.no_grad(), adapter.disabled():
            assert (model(input_ids=ids).logits - fast).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(2, 7), (7,)], ids=["batch", "2d"])
def test_hook_gradient_equals_gradient_of_merged_weights(shape):
    """The hooks add ΔW x in place into each module's output; v's gradient through them must equal the
    gradient through W + ΔW(v) (torch.func.functional_call), for [batch, seq] and unbatched 2-D inputs."""
    from torch.func import functional_call

    from tinylora.testing import tiny_model
    model = tiny_model("qwen2")
    adapter = attach(model, AdapterConfig(u=2, n_tie=3))
    _set_v(adapter, std=0.3)
    gen = torch.Generator().manual_seed(0)
    if len(shape) == 1:  # one module, called on a 2-D input
        i = 0
        mod = adapter.modules_by_index[i]
        x = torch.randn(shape[0], mod.in_features, generator=gen)
        (g_hook,) = torch.autograd.grad(mod(x).square().sum(), adapter.v)
        with adapter.disabled():
            ref = functional_call(mod, {"weight": mod.weight + adapter.delta_weight(i),
                                        **({"bias": mod.bias} if mod.bias is not None else {})}, (x,))
            (g_ref,) = torch.autograd.grad(ref.square().sum(), adapter.v)
    else:
        ids = torch.randint(0, 100, shape, generator=gen)
        (g_hook,) = torch.autograd.grad(model(input_ids=ids).logits.square().mean(), adapter.v)
        with adapter.disabled():
            weights = {f"{t.name}.weight": adapter.modules_by_index[i].weight + adapter.delta_weight(i)
                       for i, t in enumerate(adapter.targets)}
            logits = functional_call(model, weights, (), {"input_ids": ids}, strict=False).logits
            (g_ref,) = torch.autograd.grad(logits.square().mean(), adapter.v)
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_hook, g_ref, atol=1e-6, rtol=1e-4)
