"""The kernel policy (``frugallm.kernels``): what ``choose`` picks for a device and precision, the one
override, and the kernels it dispatches to against PyTorch's reference paths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from frugallm.errors import ConfigError
from frugallm.kernels import KernelPolicy, choose, install, override_from_env, probe
from frugallm.kernels import attention as kattention
from frugallm.kernels.experts import bucketed, from_buckets, to_buckets
from frugallm.kernels.policy import KERNELS_ENV, blocked_attention_bytes, bucket_rows
from frugallm.kernels.probe import cpu_peak_flops


def test_choice_by_device_and_precision() -> None:
    cpu32, cpu16, gpu = choose("cpu", "fp32"), choose("cpu", torch.bfloat16), choose("cuda", "bf16")
    assert (cpu32.attention, cpu32.expert_row_buckets, cpu32.grouped_mm, cpu32.vocab_block) == (
        "blocked", False, False, 2048)
    assert (cpu16.attention, cpu16.expert_row_buckets) == ("pad-v", True)
    assert choose("cpu", "fp8") == replace(cpu16, precision="fp8")  # fp8 GEMMs inside bf16 activations
    assert (gpu.attention, gpu.gemm, gpu.expert_row_buckets, gpu.vocab_block) == ("sdpa", "torch", False, None)
    assert choose("meta") == KernelPolicy(device="meta", precision="fp32")  # PyTorch's own kernels
    assert all(why for field, _, why in cpu32.describe())  # every CPU choice says why
    with pytest.raises(ConfigError, match="precision must be"):
        choose("cpu", "int4")


def test_the_one_override() -> None:
    got = choose("cpu", "fp32", override="attention=sdpa, expert-row-buckets=on,vocab_block=none,"
                                          "blocked_max_bytes=4096")
    assert (got.attention, got.expert_row_buckets, got.vocab_block, got.blocked_max_bytes) == (
        "sdpa", True, None, 4096)
    assert dict(got.reasons)["attention"] == f"{KERNELS_ENV} override"
    for bad, match in (("attention=flash", "attention must be one of sdpa, pad-v, blocked"),
                       ("grouped_mm=maybe", "grouped_mm must be on or off"), ("vocab_block=-1", "positive"),
                       ("gemm", "not key=value"), ("speed=max", "not key=value")):
        with pytest.raises(ConfigError, match=match):
            choose("cpu", override=bad)
    assert override_from_env({KERNELS_ENV: "gemm=torch"}) == "gemm=torch"
    assert override_from_env({KERNELS_ENV: ""}) is None and override_from_env({}) is None


def test_the_policy_and_the_memory_model_import_no_torch() -> None:
    """cost/ reads the policy's formulas; neither may pull torch (or model code) in."""
    import subprocess
    import sys

    code = ("import sys, frugallm.kernels.policy, frugallm.cost.memory, frugallm.cost.estimate; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('frugallm.model', "
            "'frugallm.train'))); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_info_prints_the_policy_and_why(monkeypatch, capsys) -> None:
    from frugallm.cli import main

    assert main(["info", "--kernels", "--device", "cpu", "--precision", "bf16", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["attention"] == "pad-v" and shown["expert_row_buckets"] is True and shown["why"]["gemm"]
    monkeypatch.setenv(KERNELS_ENV, "expert_row_buckets=off")  # the override, read at the entry point
    assert main(["info", "--kernels", "--device", "cpu", "--precision", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expert_row_buckets"] is False
    monkeypatch.setenv(KERNELS_ENV, "gemm=blas")
    assert main(["info", "--kernels"]) == 2
    assert capsys.readouterr().err.startswith(f"frugallm: error: {KERNELS_ENV}='gemm=blas': ")


def test_install_reaches_every_layer_that_runs_a_kernel() -> None:
    from frugallm.config import preset
    from frugallm.model import build_model

    mine = KernelPolicy(attention="sdpa", vocab_block=64)
    model = build_model(preset("tiny"), device="meta", kernels=mine)
    holders = [m for m in model.modules() if "kernels" in vars(m)]
    assert model.kernels is mine and len(holders) > 10 and all(m.kernels is mine for m in holders)
    other = KernelPolicy()
    install(model, other)
    assert model.model.layers[0].self_attn.kernels is other and model.lm_head.kernels is other
    assert build_model(preset("tiny"), device="meta").kernels == choose("meta")


def test_bucket_rows_bounds_the_padding_and_the_distinct_shapes() -> None:
    for m in range(0, 5000):
        b = bucket_rows(m)
        assert b >= m and bucket_rows(b) == b
        assert b - m <= (m / 8 if m >= 64 else 7), m
    assert len({bucket_rows(m) for m in range(257, 513)}) == 8  # 8 buckets per octave
    assert len({bucket_rows(m) for m in range(1, 5000)}) < 80


def test_bucketed_rows_give_the_unpadded_results_and_gradients() -> None:
    """Per-expert GEMMs over the bucket-padded rows: the real rows' outputs and every gradient equal the
    unpadded computation's, in float64 (zero rows add nothing)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 70])
    xs = torch.randn(int(counts.sum()), 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 6, dtype=torch.float64, generator=gen, requires_grad=True)

    def experts(rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat([c @ we.T for c, we in zip(rows.split(sizes), w.unbind(0), strict=True)])

    padded, sizes, dest = bucketed(xs, counts)
    assert sizes == [bucket_rows(m) for m in counts.tolist()] and padded.shape[0] == sum(sizes) > xs.shape[0]
    g = torch.randn(xs.shape[0], 3, dtype=torch.float64, generator=gen)
    got = from_buckets(experts(padded, sizes), dest)
    (dx, dw) = torch.autograd.grad(got, (xs, w), g)
    want = experts(xs, counts.tolist())
    (rx, rw) = torch.autograd.grad(want, (xs, w), g)
    for a, b in ((got, want), (dx, rx), (dw, rw)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the policy pads bf16 and fp16 only, and only where it says so
    on = KernelPolicy(expert_row_buckets=True)
    assert to_buckets(xs, counts, on)[2] is None
    assert to_buckets(xs.detach().bfloat16(), counts, on)[2] is not None
    assert to_buckets(xs.detach().bfloat16(), counts, KernelPolicy())[2] is None


@pytest.mark.parametrize("S", [1, 7, 32])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_blocked_causal_attention_equals_sdpa(S, dtype, tol) -> None:
    """The CPU's blocked training path: output and the three gradients equal SDPA's causal attention
    (computed in float64), for an odd length, one token, and v narrower than q and k."""
    gen = torch.Generator().manual_seed(S)
    q, k = (torch.randn(2, 3, S, 12, generator=gen, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, S, 8, generator=gen, dtype=dtype, requires_grad=True)
    dout = torch.randn(2, 3, S, 8, generator=gen, dtype=dtype)
    out = kattention._BlockedCausal.apply(q, k, v, 0.3)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, scale=0.3)
    ref.backward(dout.double())
    assert out.dtype == dtype
    for got, want in zip([out, q.grad, k.grad, v.grad], [ref] + [t.grad for t in ref_in], strict=True):
        assert (got.double() - want).abs().max() <= tol * max(want.abs().max().item(), 1.0)


def test_blocked_causal_attention_gradcheck_and_dispatch(monkeypatch) -> None:
    q, k = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: kattention._BlockedCausal.apply(*t, 0.5), (q, k, v))
    calls = []
    real = kattention._BlockedCausal.apply
    monkeypatch.setattr(kattention._BlockedCausal, "apply", lambda *a: calls.append(1) or real(*a))  # a spy
    cpu32 = choose("cpu", "fp32")
    x32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    kattention.causal_attention(*x32, 0.5, cpu32)  # training, float32, small: blocked
    assert len(calls) == 1
    with torch.no_grad():  # inference keeps SDPA (nothing to save for a backward)
        kattention.causal_attention(*x32, 0.5, cpu32)
    bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    kattention.causal_attention(*bf16, 0.5, cpu32)  # bf16: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: SDPA, which autocast runs in bf16
        kattention.causal_attention(*x32, 0.5, cpu32)
    kattention.causal_attention(x32[0], x32[1][..., :3, :], x32[2][..., :3, :], 0.5, cpu32)  # S != T
    kattention.causal_attention(*x32, 0.5, replace(cpu32, attention="pad-v"))  # the policy says SDPA
    tight = replace(cpu32, blocked_max_bytes=blocked_attention_bytes(1, 2, 5) - 1)
    kattention.causal_attention(*x32, 0.5, tight)  # probabilities over the budget: SDPA
    assert len(calls) == 1
    # the probabilities kept: query blocks [0, 2) and [2, 5) attend 2 and 5 keys, per head
    assert blocked_attention_bytes(1, 2, 5) == 4 * 2 * (2 * 2 + 3 * 5)


def test_padded_v_equals_plain_sdpa() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 9, 12, generator=gen) for _ in range(2))
    v = torch.randn(2, 3, 9, 8, generator=gen)
    with torch.no_grad():
        got = kattention.causal_attention(q, k, v, 0.3, KernelPolicy(attention="pad-v"))
        want = kattention.causal_attention(q, k, v, 0.3, KernelPolicy())
    assert got.shape == want.shape == (2, 3, 9, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_peak_is_probed_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(probe.CACHE_ENV, str(tmp_path))
    flops = cpu_peak_flops("fp32")
    assert flops > 1e8  # any CPU that runs the tests does more than 0.1 GFLOP/s
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    (key,) = cache
    assert key.endswith("| fp32") and "threads=" in key and "torch=" in key and "gemm=" in key

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(probe, "_probe", no_probe)
    assert cpu_peak_flops("float32") == flops  # the cached figure, same key
    with pytest.raises(AssertionError, match="probed again"):
        cpu_peak_flops("bf16")  # another dtype is another measurement
    other = "torch" if choose("cpu").gemm == "onednn" else "onednn"
    with pytest.raises(AssertionError, match="probed again"):
        cpu_peak_flops("fp32", kernels=KernelPolicy(gemm=other))  # so is another float32 GEMM library
    with pytest.raises(ConfigError, match="CPU probe"):
        cpu_peak_flops("fp8")
