"""Backend selection, the errors a user sees, and the Hopper backend's CPU-testable twin: its operand and
scale layouts (everything but the cuBLAS call) reproduce the emulated GEMMs."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm.errors import ConfigError, DeviceError
from frugallm.precision import Fp8Recipe, convert_to_fp8, select_backend
from frugallm.precision.backends import EmulatedBackend, HopperBackend, ScaledMMArgs, _backend_for
from frugallm.precision.fp8_linear import _Fp8GemmFn
from frugallm.precision.quant import E4M3, quantize_blocks, quantize_tiles

NO_HOPPER = not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0))


def _cublas_semantics(args: ScaledMMArgs) -> torch.Tensor:
    """What cuBLAS computes from blockwise-scaled operands, written from its documented layouts, independently
    of ``scaled_mm_args``: out[m, n] = sum_k A[m, k] sa[m, k/128] * B[k, n] sb(k, n)."""
    A, B = args.mat_a.float(), args.mat_b.float()  # [Mp, Kp], [Kp, Np]
    Kp, Np = B.shape
    k_tile, n_tile = torch.arange(Kp) // 128, torch.arange(Np) // 128
    A = A * args.scale_a[:, k_tile]  # scale_a [Mp, Kp/128]
    if args.recipe_b == "128x128":
        B = B * args.scale_b[k_tile][:, n_tile]  # scale_b [L4, Np/128]
    else:
        B = B * args.scale_b[:, k_tile].t()  # scale_b [Np, Kp/128]
    M, N = args.out_shape
    return (A @ B)[:M, :N]


def _three_gemms() -> dict:
    x, w, dy = torch.randn(300, 520), torch.randn(200, 520) * 0.02, torch.randn(300, 200)
    return {"forward": (quantize_tiles(x), quantize_blocks(w)),
            "dgrad": (quantize_tiles(dy), quantize_blocks(w).t()),
            "wgrad": (quantize_tiles(dy.t()), quantize_tiles(x.t()))}


@pytest.mark.parametrize("gemm", ["forward", "dgrad", "wgrad"])
def test_hopper_layouts_match_emulated(gemm):
    a, b = _three_gemms()[gemm]
    args = HopperBackend.scaled_mm_args(a, b)
    Mp, Kp = args.mat_a.shape
    Np = args.mat_b.shape[1]
    # cuBLAS's requirements: e4m3 operands padded to 128, A row-major, B column-major, scales outer-dim-major
    assert args.mat_a.dtype == args.mat_b.dtype == E4M3 and Mp % 128 == Kp % 128 == Np % 128 == 0
    assert args.mat_a.is_contiguous() and args.mat_b.t().is_contiguous()
    assert args.scale_a.shape == (Mp, Kp // 128) and args.scale_a.stride() == (1, Mp)
    if gemm == "wgrad":
        assert args.recipe_b == "1x128"
        assert args.scale_b.shape == (Np, Kp // 128) and args.scale_b.stride() == (1, Np)
    else:
        L4 = args.scale_b.shape[0]
        assert args.recipe_b == "128x128" and L4 % 4 == 0 and L4 >= Kp // 128
        assert args.scale_b.shape == (L4, Np // 128) and args.scale_b.stride() == (1, L4)
    got, want = _cublas_semantics(args), EmulatedBackend().gemm_nt(a, b, torch.float32)
    assert got.shape == want.shape
    assert float((got - want).norm() / want.norm()) < 1e-6


def _fake_scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16):
    names = {F.ScalingType.BlockWise1x128: "1x128", F.ScalingType.BlockWise128x128: "128x128"}
    args = ScaledMMArgs(mat_a, mat_b, scale_a, names[recipe_a], scale_b, names[recipe_b],
                        (mat_a.shape[0], mat_b.shape[1]))
    return _cublas_semantics(args).to(output_dtype)


def _hopper_on_cpu(monkeypatch) -> HopperBackend:
    """The Hopper backend with only the cuBLAS call replaced by its documented semantics."""
    monkeypatch.setattr(F, "scaled_mm", _fake_scaled_mm)
    hopper = object.__new__(HopperBackend)  # skip the GPU check
    hopper.device = torch.device("cpu")
    return hopper


@pytest.mark.parametrize("sizes", [None, [100, 0, 37, 163]], ids=["linear", "experts"])
def test_hopper_path_end_to_end_matches_emulated(monkeypatch, sizes):
    hopper = _hopper_on_cpu(monkeypatch)
    x = torch.randn(300, 520)
    w = torch.randn(200, 520) * 0.02 if sizes is None else torch.randn(4, 200, 520) * 0.02
    dy = torch.randn(300, 200)
    results = []
    for backend in (EmulatedBackend(), hopper):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _Fp8GemmFn.apply(xi, wi, sizes, Fp8Recipe(), backend, torch.bfloat16)
        y.backward(dy.bfloat16())
        results.append((y.detach().float(), xi.grad, wi.grad))
    for name, got, want in zip(("output", "input grad", "weight grad"), results[1], results[0], strict=True):
        assert float((got - want).norm() / want.norm()) < 1e-2, name  # bf16 output rounding only


def test_hopper_probe_catches_a_wrong_layout(monkeypatch):
    hopper = _hopper_on_cpu(monkeypatch)
    hopper._probe()  # the right semantics pass

    def ignores_b_scales(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype=torch.bfloat16):
        return _fake_scaled_mm(mat_a, mat_b, scale_a, recipe_a, torch.ones_like(scale_b), recipe_b, output_dtype)

    monkeypatch.setattr(F, "scaled_mm", ignores_b_scales)
    with pytest.raises(DeviceError, match="disagrees"):
        hopper._probe()


@pytest.mark.skipif(not NO_HOPPER, reason="a compute capability 9.0 GPU is present")
def test_hopper_without_a_capable_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"compute capability >= 9\.0"):
        select_backend("hopper", "cpu")
    with pytest.raises(DeviceError, match="'emulated'"):
        convert_to_fp8(nn.Sequential(nn.Linear(8, 8)), Fp8Recipe(backend="hopper"))
    assert isinstance(select_backend("emulated", "cpu"), EmulatedBackend), "emulated stays available"


@pytest.mark.skipif(not NO_HOPPER, reason="a compute capability 9.0 GPU is present")
def test_training_with_hopper_and_no_capable_gpu_fails_before_reading_data(tmp_path):
    """The refusal comes from the Trainer's set-up, with the memory check, not after the corpus is tokenized
    (a missing corpus would be the error otherwise)."""
    from frugallm.config import preset
    from frugallm.train.config import TrainConfig
    from frugallm.train.loop import Trainer

    cfg = TrainConfig(precision="fp8", fp8_backend="hopper", device="cpu", max_steps=1,
                      data=[str(tmp_path / "no-such-corpus")])
    with pytest.raises(DeviceError, match="fp8 backend 'hopper' is not available"):
        Trainer(preset("tiny"), cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_picks_emulated_on_cpu_and_logs_it(caplog):
    _backend_for.cache_clear()
    with caplog.at_level(logging.INFO, logger="frugallm.precision"):
        backend = select_backend("auto", "cpu")
    assert backend.name == "emulated"
    assert "fp8 backend: emulated on cpu" in caplog.text
    assert select_backend("auto", "cpu") is backend, "built once per device"


def test_recipe_validation_names_the_field():
    with pytest.raises(ConfigError, match="tile"):
        Fp8Recipe(tile=100)
    with pytest.raises(ConfigError, match="backend must be one of auto, emulated, hopper"):
        Fp8Recipe(backend="tpu")
    with pytest.raises(ConfigError, match="hopper"):
        Fp8Recipe(backend="hopper", tile=64)
    with pytest.raises(ConfigError, match="unknown fp8 field"):
        Fp8Recipe.from_dict({"tiles": 128})
    assert Fp8Recipe.from_dict(Fp8Recipe(pow2_scales=True).to_dict()) == Fp8Recipe(pow2_scales=True)
    assert select_backend("auto", "cpu", tile=64).name == "emulated", "other tiles exist only in emulation"
