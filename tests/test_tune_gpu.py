"""Fine-tuning's GPU paths against their CPU-tested twins on the same GPU: the frozen FP8 base on the Hopper
backend against the emulated one, and the routed experts' LoRA adapters through ``torch._grouped_mm``
against the CPU's path (no grouped GEMM) on the same rows. Skipped without a compute capability 9.0 GPU (CI has none;
``benchmarks/gpu_checks.sh`` runs this file on a lent one)."""

from __future__ import annotations

import pytest
import torch

from frugallm.kernels import choose
from frugallm.model.moe import GroupedExperts
from frugallm.precision import Fp8Recipe
from frugallm.precision.backends import hopper_unavailable_reason
from frugallm.precision.frozen import FrozenFp8Linear
from frugallm.tune.lora import LoraExperts

pytestmark = pytest.mark.skipif(hopper_unavailable_reason() is not None,
                                reason="needs a CUDA GPU of compute capability >= 9.0")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_frozen_fp8_linear_hopper_matches_emulated() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(384, 640, device="cuda", generator=gen) * 0.02  # K not a multiple of 128
    x = torch.randn(512, 640, device="cuda", generator=gen)
    dy = torch.randn(512, 384, device="cuda", generator=gen)
    out = {}
    for name in ("emulated", "hopper"):
        lin = FrozenFp8Linear.from_float(w, recipe=Fp8Recipe(backend=name))
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lin(xi)
        y.backward(dy.bfloat16())
        out[name] = (y.detach(), xi.grad)
    assert _rel(out["hopper"][0], out["emulated"][0]) < 1e-2
    assert _rel(out["hopper"][1], out["emulated"][1]) < 1e-2


def test_lora_experts_grouped_mm_matches_per_expert() -> None:
    torch.manual_seed(0)
    E, H, I, r = 8, 256, 128, 8  # r * 2 bytes = 16: grouped_mm's stride alignment holds
    base = GroupedExperts(E, H, I).cuda().bfloat16()
    torch.nn.init.normal_(base.gate_up_proj, std=0.02)
    torch.nn.init.normal_(base.down_proj, std=0.02)
    base.kernels = choose("cuda", "bf16")
    lora = LoraExperts(base, rank=r, alpha=16.0)
    with torch.no_grad():
        lora.lora_B_gate_up.normal_(std=0.02)
        lora.lora_B_down.normal_(std=0.02)
    counts = torch.tensor([40, 0, 17, 90, 3, 60, 11, 35], device="cuda")
    xs = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grouped = lora.run_sorted(xs, counts)
    rows, groups = lora.group(xs, counts)
    assert groups.offs is not None  # the grouped GEMM path really ran
    # the CPU's path on the same rows: no offsets (the dense adapter GEMMs, one base GEMM per expert)
    h = lora.project(rows, "gate_up_proj", groups._replace(offs=None))
    from frugallm.model.layers import swiglu

    per_expert = lora.project(swiglu(h), "down_proj", groups._replace(offs=None))
    assert _rel(grouped, per_expert) < 2e-2
