"""The CPU GEMM library: oneDNN's forward and input-gradient GEMMs against torch's (MKL) linear, and the cases
that must stay on torch's. oneDNN runs on any x86 CPU, so these run everywhere; only the policy's choice
depends on AVX-512."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm.errors import ConfigError
from frugallm.kernels import KernelPolicy, choose, gemm
from frugallm.kernels.host import cpu_facts
from frugallm.kernels.policy import auto_prefers_onednn
from frugallm.model.layers import Linear
from frugallm.model.loss import linear_cross_entropy

pytestmark = pytest.mark.skipif(not cpu_facts().onednn, reason="torch built without oneDNN")

ONEDNN, TORCH = KernelPolicy(gemm="onednn"), KernelPolicy(gemm="torch")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(37, 96), (3, 11, 96)])
def test_onednn_linear_matches_torch(shape) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(70, 96, generator=gen, requires_grad=True)
    g = torch.randn(*shape[:-1], 70, generator=gen)
    ref = F.linear(x.double(), w.double())
    ref.backward(g.double())
    want = (ref.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    assert gemm.onednn_applies(x, w, ONEDNN)
    y = gemm.linear(x, w, None, ONEDNN)
    assert y.grad_fn is not None and "OneDnn" in type(y.grad_fn).__name__  # the path under test ran
    y.backward(g)
    for got, ref_t, name in zip((y.detach(), x.grad, w.grad), want, ("y", "dx", "dW"), strict=True):
        assert got.dtype == torch.float32 and got.shape == ref_t.shape, name
        err = _rel(got.double(), ref_t)
        assert err < 1e-6, (name, err)  # float32 accumulation: same order of error as torch's own


def test_onednn_linear_takes_a_transposed_input() -> None:
    x = torch.randn(64, 40).t().requires_grad_()  # [40, 64], not contiguous
    w = torch.randn(24, 64, requires_grad=True)
    y = gemm.linear(x, w, None, ONEDNN)
    assert _rel(y.detach(), F.linear(x.detach(), w.detach())) < 1e-6
    y.sum().backward()
    assert _rel(x.grad, torch.ones(40, 24) @ w.detach()) < 1e-6


def test_torch_path_where_onednn_does_not_apply() -> None:
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with torch.no_grad():  # serving: shapes change with every batch
        assert not gemm.onednn_applies(x, w, ONEDNN)
        assert torch.equal(gemm.linear(x, w, None, ONEDNN), F.linear(x, w))
    assert not gemm.onednn_applies(x.double(), w.double(), ONEDNN)
    assert not gemm.onednn_applies(x.bfloat16(), w.bfloat16(), ONEDNN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.onednn_applies(x, w, ONEDNN)
        assert gemm.linear(x, w, None, ONEDNN).dtype == torch.bfloat16
    assert not gemm.onednn_applies(x[:0], w, ONEDNN)
    assert gemm.onednn_applies(x, w, ONEDNN, training=True)
    assert not gemm.onednn_applies(x, w, TORCH, training=True)
    assert torch.equal(gemm.linear(x, w, None, TORCH), F.linear(x, w))


def test_the_policy_chooses_the_library_by_vector_unit_and_vendor() -> None:
    facts = cpu_facts()
    want = "onednn" if auto_prefers_onednn(facts.capability, facts.vendor) else "torch"
    for precision in ("fp32", "bf16"):  # the float32 GEMMs' library, whatever else computes in bf16
        assert choose("cpu", precision).gemm == want
    assert choose("cuda").gemm == "torch"
    # MKL runs its generic kernel on AMD's AVX-512 (oneDNN is faster there) and its own on Intel's (module doc)
    assert auto_prefers_onednn("AVX512", "AuthenticAMD")
    assert not auto_prefers_onednn("AVX512", "GenuineIntel")
    assert not auto_prefers_onednn("AVX2", "AuthenticAMD")
    assert not auto_prefers_onednn("AVX512", "")  # vendor unknown: torch's default
    assert choose("cpu", override="gemm=onednn").gemm == "onednn"
    assert choose("cpu", override="gemm=torch").gemm == "torch"
    with pytest.raises(ConfigError, match="gemm must be one of torch, onednn"):
        choose("cpu", override="gemm=blas")


def test_linear_module_is_an_nn_linear() -> None:
    a = Linear(8, 4, bias=False)
    b = nn.Linear(8, 4, bias=False)
    assert isinstance(a, nn.Linear) and list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_output_head_on_onednn_matches_mkl(monkeypatch) -> None:
    calls = []
    onednn_nt = gemm.onednn_nt
    monkeypatch.setattr(gemm, "onednn_nt", lambda a, b: calls.append(a.shape) or onednn_nt(a, b))
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(300, 32, generator=gen)
    w = torch.randn(1000, 32, generator=gen) * 0.3
    labels = torch.randint(0, 1000, (300,), generator=gen)
    labels[::7] = -100
    results = {}
    for name, kernels in (("mkl", TORCH), ("onednn", ONEDNN)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, labels, kernels=kernels)
        loss.backward()
        results[name] = (loss.detach(), hh.grad, ww.grad)
    assert len(calls) == 2  # one chunk: its logits and its dh on oneDNN
    for got, want in zip(results["onednn"], results["mkl"], strict=True):
        assert _rel(got, want) < 1e-5


def test_onednn_gets_dense_operands(monkeypatch) -> None:
    """A view cropped from a wider tensor (row stride > width) is copied row-major before oneDNN sees it
    (oneDNN's kernel for other strides is a reference loop, ~1000x slower); transposed views pass as they are."""
    seen = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(a, b, *rest):
            seen.append((a.stride(), b.stride()))
            return real(a, b, *rest)

    monkeypatch.setattr(gemm.torch.ops, "mkldnn", Spy)
    wide = torch.randn(50, 48)
    a = wide[:, :40]  # [50, 40], row stride 48
    b = torch.randn(40, 30).t()  # [30, 40], a transposed view
    got = gemm.nt(a, b, ONEDNN, training=True)
    assert _rel(got, a @ b.t()) < 1e-6
    assert seen == [((40, 1), (1, 30))]
