"""FP8 on a Hopper GPU: the real blockwise ``scaled_mm`` against the emulated reference on the same device,
and a converted model's training step on each. Skipped without a compute capability 9.0 GPU (CI has none;
``benchmarks/gpu_checks.sh`` runs this file on a lent one). The CPU twins of everything but the cuBLAS
call are in test_fp8_backends.py."""

from __future__ import annotations

import copy

import pytest
import torch

from frugallm.config import preset
from frugallm.model import build_model
from frugallm.precision import Fp8Recipe, convert_to_fp8, select_backend
from frugallm.precision.backends import EmulatedBackend, hopper_unavailable_reason
from frugallm.precision.fp8_linear import _Fp8GemmFn

pytestmark = pytest.mark.skipif(hopper_unavailable_reason() is not None,
                                reason="needs a CUDA GPU of compute capability >= 9.0")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("sizes", [None, [300, 0, 137, 587]], ids=["linear", "experts"])
def test_hopper_gemms_match_emulated_on_the_gpu(sizes) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1024, 640, device="cuda", generator=gen)  # K not a multiple of 128: padding
    shape = (384, 640) if sizes is None else (4, 384, 640)
    w = torch.randn(*shape, device="cuda", generator=gen) * 0.02
    dy = torch.randn(1024, 384, device="cuda", generator=gen)
    results = {}
    for name in ("emulated", "hopper"):
        backend = select_backend(name, "cuda")
        assert backend.name == name
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _Fp8GemmFn.apply(xi, wi, sizes, Fp8Recipe(backend=name), backend, torch.bfloat16)
        y.backward(dy.bfloat16())
        results[name] = (y.detach(), xi.grad, wi.grad)
    for what, got, want in zip(("output", "input grad", "weight grad"), results["hopper"], results["emulated"],
                               strict=True):
        assert _rel(got, want) < 1e-2, what  # same e4m3 operands; bf16 outputs and accumulation order only


def test_converted_model_trains_on_hopper_as_emulated() -> None:
    cfg = preset("tiny")
    base = build_model(cfg, device="cuda", seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 258), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1))
    losses, grads = {}, {}
    for name in ("emulated", "hopper"):
        model = convert_to_fp8(copy.deepcopy(base), Fp8Recipe(backend=name))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_train(tokens)
        out.loss.backward()
        losses[name] = out.loss.item()
        grads[name] = model.model.layers[1].self_attn.q_b_proj.weight.grad
    assert abs(losses["hopper"] - losses["emulated"]) / losses["emulated"] < 1e-3
    assert _rel(grads["hopper"], grads["emulated"]) < 5e-2
    assert isinstance(select_backend("auto", "cuda"), type(select_backend("hopper", "cuda")))
    assert not isinstance(select_backend("auto", "cuda"), EmulatedBackend)
