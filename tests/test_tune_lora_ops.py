"""LoRA's hand-written autograd ops (``frugallm.tune.lora_ops``) against autograd through the plain formula,
alone and inside a model: the same loss and every adapter gradient in float32, no gradient for the base,
the fused projections (MLA's q_a + kv_a, gate + up) used where they apply and the composite path where
they do not (dropout, mixed module kinds, autocast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frugallm.tune.lora as lora_mod
from frugallm.config import ModelConfig
from frugallm.kernels import KernelPolicy
from frugallm.model import build_model
from frugallm.model.layers import project_together
from frugallm.tune.lora import (
    LoraConfig,
    LoraExperts,
    LoraLinear,
    apply_lora,
    merge_lora,
    trainable_parameters,
)
from frugallm.tune.lora_ops import expert_adapter, lora_linear
from shapes import LORA_TINY

BASE = LORA_TINY  # tests/shapes.py
CASES = {"q-latent": dict(q_lora_rank=24, num_nextn_predict_layers=1), "no-q-latent": dict(q_lora_rank=None)}
RTOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal within rtol of the reference's largest magnitude (float32 GEMMs in another summation order)."""
    scale = b.abs().max().clamp_min(1e-30)
    assert ((a - b).abs().max() / scale).item() <= rtol, ((a - b).abs().max() / scale).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("frozen_b", [False, True])
def test_lora_linear_equals_autograd_through_the_formula(n: int, frozen_b: bool):
    g = _gen(0)
    M, K, r = 10, 24, 4
    outs = [16, 9][:n]
    x = torch.randn(2, M // 2, K, generator=g, requires_grad=True)
    ws = [torch.randn(N, K, generator=g) for N in outs]
    factors = [(torch.randn(r, K, generator=g).requires_grad_(), torch.randn(N, r, generator=g).requires_grad_(not frozen_b))
               for N in outs]
    scalings = [2.0, 0.5][:n]
    y = lora_linear(x, torch.cat(ws), factors, scalings, KernelPolicy())
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x] + [t for ab in factors for t in ab if t.requires_grad], gy)

    ref = torch.cat([F.linear(x, w) + s * F.linear(F.linear(x, a), b)
                     for w, (a, b), s in zip(ws, factors, scalings, strict=True)], dim=-1)
    ref_grads = torch.autograd.grad(ref, [x] + [t for ab in factors for t in ab if t.requires_grad], gy)
    _close(y, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)


def test_expert_adapter_equals_a_loop_over_experts():
    g = _gen(1)
    E, K, N, r = 5, 12, 7, 3
    sizes = [4, 0, 9, 1, 6]  # an expert without rows, and unequal counts (padding)
    xs = torch.randn(sum(sizes), K, generator=g, requires_grad=True)
    a = torch.randn(E, r, K, generator=g, requires_grad=True)
    b = torch.randn(E, N, r, generator=g, requires_grad=True)
    y = expert_adapter(xs, a, b, sizes, 1.5)
    ref = torch.cat([1.5 * (chunk @ a[e].t()) @ b[e].t() for e, chunk in enumerate(xs.split(sizes))])
    gy = torch.randn(y.shape, generator=g)
    for got, want in zip(torch.autograd.grad(y, [xs, a, b], gy), torch.autograd.grad(ref, [xs, a, b], gy),
                         strict=True):
        _close(got, want)
    _close(y, ref)


def _reference_experts(xs, a, b, sizes, scaling):  # type: ignore[no-untyped-def]
    """The composite expert adapter: one autograd GEMM pair per expert."""
    outs = [scaling * F.linear(F.linear(chunk, a[e].to(xs.dtype)), b[e].to(xs.dtype))
            for e, chunk in enumerate(xs.split(sizes))]
    return torch.cat(outs)


def _composite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LoRA module on the autograd path: no fast linear, no fusion, experts one GEMM pair each."""
    monkeypatch.setattr(LoraLinear, "_fast_weight", lambda self, x: None)
    monkeypatch.setattr(LoraExperts, "_cpu_grouped", lambda self, rows: False)
    monkeypatch.setattr(lora_mod, "expert_adapter", _reference_experts)


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = model.forward_train(ids).loss
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen base weights got gradients: {frozen[:3]}"
    return loss.detach(), {n: p.grad.clone() for n, p in trainable_parameters(model)}


def _assert_matches_composite(model: nn.Module, ids: torch.Tensor, loss: torch.Tensor,
                              grads: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as mp:
        _composite(mp)
        ref_loss, ref_grads = _loss_and_grads(model, ids)
    _close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _close(grads[name], ref_grads[name])


def _adapted(case: str, **lora: object) -> nn.Module:
    model = build_model(ModelConfig(**{**BASE, **CASES[case]}), seed=0)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, **lora), generator=_gen(3))  # type: ignore[arg-type]
    gen = _gen(4)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # B non-zero, so every path matters
    return model.train()


def _count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = lora_mod.lora_linear

    def counting(x, weight, factors, scalings, kernels):  # type: ignore[no-untyped-def]
        calls.append(len(factors))
        return real(x, weight, factors, scalings, kernels)

    monkeypatch.setattr(lora_mod, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_fast_model_step_equals_the_composite_one(case: str, monkeypatch: pytest.MonkeyPatch):
    model = _adapted(case)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=_gen(1))
    grouped: list[bool] = []
    real_group = LoraExperts.group

    def recording_group(self, xs, counts):  # type: ignore[no-untyped-def]
        rows, groups = real_group(self, xs, counts)
        grouped.append(groups.offs is not None)
        return rows, groups

    with monkeypatch.context() as mp:
        calls = _count_fused(mp)
        mp.setattr(LoraExperts, "group", recording_group)
        loss, grads = _loss_and_grads(model, ids)
    assert grouped and all(grouped)  # float32 on the CPU: the experts' grouped GEMMs
    # per layer: q_a/q_proj + kv_a fused, gate + up fused (dense MLP or shared experts); the rest alone
    layers = BASE["num_hidden_layers"] + 1  # and the MTP block's, or none
    assert calls.count(2) >= 2 * BASE["num_hidden_layers"] and calls.count(2) <= 2 * layers
    assert calls.count(1) >= 3 * BASE["num_hidden_layers"]
    assert any("experts.lora_A" in n for n in grads)
    _assert_matches_composite(model, ids, loss, grads, monkeypatch)


def test_dropout_takes_the_composite_linear_path_and_still_matches(monkeypatch: pytest.MonkeyPatch):
    model = _adapted("q-latent", dropout=0.25)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=_gen(1))
    with monkeypatch.context() as mp:
        calls = _count_fused(mp)
        loss, grads = _loss_and_grads(model, ids)
    assert calls == []  # dropout changes the adapters' input: no linear fuses
    _assert_matches_composite(model, ids, loss, grads, monkeypatch)
    model.eval()  # no dropout in eval mode: the fast path again (with grad)
    with monkeypatch.context() as mp:
        calls = _count_fused(mp)
        model.forward_train(ids).loss.backward()
    assert calls.count(2) > 0


def test_mixed_kinds_do_not_fuse(monkeypatch: pytest.MonkeyPatch):
    """q_a_proj adapted, kv_a_proj_with_mqa plain: project_together declines, each runs its own way."""
    targets = ("q_a_proj", "q_b_proj", "kv_b_proj", "o_proj", "down_proj", "mlp.experts")
    model = _adapted("q-latent", targets=targets)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, BASE["hidden_size"], generator=_gen(2))
    assert project_together(x, attn.q_a_proj, attn.kv_a_proj_with_mqa) is None
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=_gen(1))
    loss, grads = _loss_and_grads(model, ids)
    _assert_matches_composite(model, ids, loss, grads, monkeypatch)


def test_autocast_takes_the_composite_path(monkeypatch: pytest.MonkeyPatch):
    model = _adapted("q-latent")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=_gen(1))
    with monkeypatch.context() as mp:
        calls = _count_fused(mp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.forward_train(ids).loss.backward()
    assert calls == []


def test_fused_base_cache_follows_in_place_changes_and_merge_equals_unmerged(monkeypatch: pytest.MonkeyPatch):
    model = _adapted("q-latent")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=_gen(1))
    _loss_and_grads(model, ids)  # builds the fused base weights
    with torch.no_grad():
        model.model.layers[1].self_attn.kv_a_proj_with_mqa.base.weight.mul_(1.5)  # an in-place change
        model.model.layers[0].mlp.up_proj.base.weight.add_(0.01)
    loss, _ = _loss_and_grads(model, ids)
    with monkeypatch.context() as mp:
        _composite(mp)
        ref_loss, _ = _loss_and_grads(model, ids)
    _close(loss, ref_loss)
    merge_lora(model)
    model.requires_grad_(False)
    with torch.no_grad():
        merged = model.forward_train(ids).loss
    _close(merged, loss, 1e-5)


def test_fused_base_weights_moving_between_steps_are_concatenated_per_step():
    """A base whose storage moves (FSDP re-gathering it) is not kept: the next steps concatenate afresh."""
    model = _adapted("q-latent")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, BASE["hidden_size"], generator=_gen(2))
    project_together(x, mlp.gate_proj, mlp.up_proj)
    assert isinstance(mlp.gate_proj.__dict__["_fused_base"], tuple)  # kept while the weights stay put
    with torch.no_grad():
        mlp.up_proj.base.weight = nn.Parameter(mlp.up_proj.base.weight * 2, requires_grad=False)  # moved
    got = project_together(x, mlp.gate_proj, mlp.up_proj)
    assert mlp.gate_proj.__dict__["_fused_base"] == "per-step"
    want = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
    _close(got, want)
