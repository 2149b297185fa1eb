"""The FP8 linear and FP8 grouped experts against float64 references: all three GEMMs (output, input
gradient, weight gradient) within a relative Frobenius error of 5e-2, gradients in the FP32 master weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm.model.moe import GroupedExperts
from frugallm.precision import Fp8Recipe, convert_to_fp8
from frugallm.precision.backends import EmulatedBackend
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear, _Fp8GemmFn

BOUND = 5e-2


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref.detach()).norm() / ref.detach().norm())


def _fp8_linear(weight: torch.Tensor, recipe: Fp8Recipe) -> Fp8Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return convert_to_fp8(nn.Sequential(lin), recipe)[0]


@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe(pow2_scales=True), Fp8Recipe(fp8_saved_activations=True)],
                         ids=["default", "pow2", "fp8-saved-inputs"])
def test_fp8_linear_three_gemms_vs_float64(recipe):
    B, S, K, N = 3, 100, 520, 200  # M = 300 tokens; no dim a multiple of 128
    x = torch.randn(B, S, K, dtype=torch.float64)
    w = torch.randn(N, K, dtype=torch.float64) * 0.02
    dy = torch.randn(B, S, N, dtype=torch.float64)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    (x_ref @ w_ref.T).backward(dy)

    lin = _fp8_linear(w.float(), recipe)
    xf = x.float().requires_grad_()
    y = lin(xf)
    y.backward(dy.float())
    errs = {"output": _rel(y, x_ref.detach() @ w_ref.detach().T), "input grad": _rel(xf.grad, x_ref.grad),
            "weight grad": _rel(lin.weight.grad, w_ref.grad)}
    print(f"\n[{recipe.describe()}] relative Frobenius error vs float64: "
          + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    for name, err in errs.items():
        assert 1e-3 < err < BOUND, f"{name}: {err:.4f}"  # > 1e-3: the operands really are e4m3


def test_gradients_reach_fp32_master_weights_under_autocast():
    lin = _fp8_linear(torch.randn(192, 256) * 0.02, Fp8Recipe())
    lin.bias = nn.Parameter(torch.zeros(192))
    x = torch.randn(4, 50, 256, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16, "output in the autocast dtype"
    y.float().square().mean().backward()
    assert lin.weight.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32, "input gradient in the input's dtype"
    assert lin.weight.grad.abs().sum() > 0 and lin.bias.grad.abs().sum() > 0
    before = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight -= 1e-3 * lin.weight.grad.sign()  # an SGD-like step on the master weight
    assert not torch.equal(before, lin.weight), "the update lands in the FP32 master weight"
    assert lin(torch.randn(3, 256)).dtype == torch.float32, "no autocast: the input's dtype"


@pytest.mark.parametrize("saved_fp8", [False, True])
def test_saved_activation_bytes(saved_fp8):
    """The switch's memory effect: the linear's input is kept for backward in e4m3 (1 + 4/128 bytes per
    element) instead of the compute dtype (2 bytes under bf16 autocast)."""
    M, K = 512, 384
    lin = _fp8_linear(torch.randn(256, K) * 0.02, Fp8Recipe(fp8_saved_activations=saved_fp8))
    x = torch.randn(M, K, requires_grad=True)
    saved = []

    def pack(t):
        if t.shape not in ((256, K), (2, 3)):  # not the weight, nor its e4m3 blocks [256, K] and scales [2, 3]
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        y = lin(x)
    nbytes = sum(t.numel() * t.element_size() for t in saved)
    want = M * K * (1 + 4 / 128) if saved_fp8 else M * K * 2
    print(f"\nsaved for backward: {nbytes / (M * K):.3f} bytes per input element")
    assert nbytes == want
    assert any(t.dtype == torch.float8_e4m3fn for t in saved) == saved_fp8
    y.float().sum().backward()
    assert lin.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("sizes", [None, [150, 0, 7, 200]], ids=["linear", "grouped"])
def test_weight_copies_off_gives_the_same_numbers_and_keeps_no_e4m3_weight(sizes):
    """cache_weights=False (sharded runs) quantizes the weight again in the backward: the same blocks, so the
    same output and gradients to the bit, and no e4m3 weight copy held from forward to backward."""
    torch.manual_seed(0)
    M, K, N = sum(sizes or [300]), 300, 260
    w = torch.randn(*([len(sizes)] if sizes else []), N, K) * 0.02
    x, dy = torch.randn(M, K), torch.randn(M, N)
    out = {}
    for cache in (True, False):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        kept: list[torch.dtype] = []

        def pack(t, kept=kept):
            kept.append(t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = _Fp8GemmFn.apply(xi, wi, sizes, Fp8Recipe(cache_weights=cache), EmulatedBackend(), torch.float32)
        y.backward(dy)
        out[cache] = (y, xi.grad, wi.grad)
        assert (torch.float8_e4m3fn in kept) == cache
    for a, b in zip(out[True], out[False], strict=True):
        assert torch.equal(a, b)


def test_zero_input_gives_zero_output_and_finite_grads():
    lin = _fp8_linear(torch.randn(64, 200), Fp8Recipe())
    x = torch.zeros(10, 200, requires_grad=True)
    y = lin(x)
    assert torch.equal(y, torch.zeros(10, 64))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(lin.weight.grad, torch.zeros(64, 200))


@pytest.mark.parametrize("saved_fp8", [False, True], ids=["saved-as-is", "saved-e4m3"])
def test_grouped_fp8_gemm_vs_float64_per_expert(saved_fp8):
    E, K, N = 4, 300, 260
    sizes = [150, 0, 7, 200]  # an expert without tokens, slices not multiples of 128
    M = sum(sizes)
    x = torch.randn(M, K, dtype=torch.float64)
    w = torch.randn(E, N, K, dtype=torch.float64) * 0.02
    dy = torch.randn(M, N, dtype=torch.float64)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = torch.cat([xe @ w_ref[e].T for e, xe in enumerate(x_ref.split(sizes))])
    y_ref.backward(dy)

    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    recipe = Fp8Recipe(fp8_saved_activations=saved_fp8)
    y = _Fp8GemmFn.apply(xf, wf, sizes, recipe, EmulatedBackend(), torch.float32)
    y.backward(dy.float())
    errs = {"output": _rel(y, y_ref.detach()), "input grad": _rel(xf.grad, x_ref.grad),
            "weight grad": _rel(wf.grad, w_ref.grad)}
    print(f"\n[grouped experts, saved inputs {'e4m3' if saved_fp8 else 'as-is'}] relative Frobenius error vs float64: "
          + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
    for name, err in errs.items():
        assert 1e-3 < err < BOUND, f"{name}: {err:.4f}"
    assert torch.equal(wf.grad[1], torch.zeros(N, K)), "an expert with no tokens gets a zero gradient"


def test_fp8_grouped_experts_match_swiglu_reference():
    E, H, I = 4, 256, 192
    experts = GroupedExperts(E, H, I)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    counts = torch.tensor([40, 0, 90, 30])
    xs = torch.randn(int(counts.sum()), H)
    ref = experts.double().run_sorted(xs.double(), counts)
    experts.float()
    fp8 = Fp8GroupedExperts.from_experts(experts, Fp8Recipe())
    assert fp8.gate_up_proj is experts.gate_up_proj, "the parameters are shared, not copied"
    out = fp8.run_sorted(xs, counts)
    err = _rel(out, ref)
    print(f"\n[SwiGLU experts, two FP8 GEMMs] relative error {err:.4f}")
    assert 1e-3 < err < 2 * BOUND  # two chained FP8 GEMMs
    out.square().sum().backward()
    assert fp8.gate_up_proj.grad is not None and fp8.down_proj.grad.abs().sum() > 0
    assert torch.equal(fp8.down_proj.grad[1], torch.zeros(H, I))


def test_converted_linear_keeps_state_dict():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_fp8(model, Fp8Recipe())
    assert isinstance(model[0], Fp8Linear) and isinstance(model[2], Fp8Linear)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    model.load_state_dict(before)
    assert F.mse_loss(model(torch.randn(5, 64)), torch.zeros(5, 8)).isfinite()
