"""Frozen e4m3 base weights (frugallm.precision.frozen) and FP8 checkpoints kept, requantized and written.

Bounds, from e4m3's precision (quant.py's module doc): quantizing a value x in a 1x128 tile with scale s
errs by at most max(2^-4 |x|, 2^-10 s). A GEMM whose only rounded operand is the activation a (the weight
enters as its exact dequantized blocks W) therefore errs, element by element, by at most
    2^-4 (|a| @ |W|^T) + 2^-10 (s_a @ |W|^T) + K 2^-23 (|a| @ |W|^T)
the last term bounding FP32 accumulation over K products (and the float32 dequantization of each operand).
The tests check that bound for the output (a = x, tiles along K) and for the input gradient (a = dy, tiles
along N, against W), and that the error is not zero (the operands really are e4m3).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import CheckpointError, ConfigError
from frugallm.model import build_model
from frugallm.model.hf import (
    FP8_QUANTIZATION_CONFIG,
    build_frozen_fp8_model,
    dequantize_weight_blocks,
    from_pretrained,
    kept_fp8_bytes,
    published_fp8_modules,
    read_config,
    save_pretrained,
)
from frugallm.model.moe import ExpertGroups, GroupedExperts, grouped_linear
from frugallm.precision.frozen import (
    FrozenFp8Experts,
    FrozenFp8Linear,
    block_grid,
    frozen_fp8_modules,
    requantization_error,
    requantize_blocks,
    tensor_bytes_by_dtype,
)
from frugallm.precision.quant import E4M3, E4M3_MAX, expand_scale, quantize_tiles

TILE = 128
ULP = 2.0**-23  # float32's relative step, bounding accumulation and dequantization per product
# in the mean: rounding to nearest errs by at most half a step of 2^-3 relative, so (errors uniform and
# independent) a GEMM output's relative Frobenius error stays below an RMS of 2^-4 / sqrt(3); a systematic
# error of a few per cent (which the element-wise worst case above would let through) does not
RMS_BOUND = 2.0**-4 / 3**0.5


def _gemm_bound(a: torch.Tensor, w_abs_t: torch.Tensor) -> torch.Tensor:
    """Element-wise bound on |Q(a) @ W' - a @ W'| for a [M, K] quantized in 1x128 tiles along K and an exact
    W' [K, N] given as |W'| (module doc)."""
    K = a.shape[-1]
    q = quantize_tiles(a.float(), TILE)
    s = expand_scale(q.scale, q.tile, tuple(a.shape)).double()  # [M, K] each element's tile scale
    a_abs = a.double().abs()
    return (2.0**-4 + K * ULP) * (a_abs @ w_abs_t) + 2.0**-10 * (s @ w_abs_t)


# ----- FrozenFp8Linear --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(384, 256), (200, 300)], ids=["whole-blocks", "partial-blocks"])
def test_linear_forward_and_input_grad_within_the_tile_bound(shape):
    N, K = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.02
    w[: N // 3, : K // 4] *= 40  # one block row of outliers: per-block scales must keep the rest precise
    lin = FrozenFp8Linear.from_float(w)
    assert lin.weight.dtype == E4M3 and tuple(lin.weight_scale_inv.shape) == block_grid(N, K)
    W = lin.dequantize_weight()  # [N, K] float32
    assert W.dtype == torch.float32 and W.shape == (N, K)
    assert torch.equal(W, dequantize_weight_blocks(lin.weight, lin.weight_scale_inv)), "the checkpoint's meaning"

    x = (torch.randn(3, 70, K, generator=gen) * torch.linspace(0.1, 5, K)).requires_grad_()  # M = 210 rows
    y = lin(x)
    ref = F.linear(x.detach().double(), W.double())  # [3, 70, N]
    err = (y.detach().double() - ref).abs()
    bound = _gemm_bound(x.detach().reshape(-1, K), W.double().abs().t()).view_as(ref)
    assert bool((err <= bound).all()), f"forward exceeds the tile bound by {float((err - bound).max()):.3e}"
    assert float(err.max()) > 0, "x was not quantized"
    assert float((y.detach().double() - ref).norm() / ref.norm()) < RMS_BOUND

    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    dref = dy.double() @ W.double()  # [3, 70, K]
    derr = (x.grad.double() - dref).abs()
    dbound = _gemm_bound(dy.reshape(-1, N), W.double().abs()).view_as(dref)
    assert x.grad.dtype == x.dtype
    assert bool((derr <= dbound).all()), f"dx exceeds the tile bound by {float((derr - dbound).max()):.3e}"
    assert float(derr.max()) > 0, "dy was not quantized"
    assert float((x.grad.double() - dref).norm() / dref.norm()) < RMS_BOUND


def test_linear_has_no_weight_gradient_and_saves_nothing_for_backward():
    lin = FrozenFp8Linear.from_float(torch.randn(192, 256) * 0.02)
    assert list(lin.parameters()) == [], "frozen: buffers only"
    assert {k: v.dtype for k, v in lin.state_dict().items()} == {"weight": E4M3, "weight_scale_inv": torch.float32}
    x = torch.randn(4, 33, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert saved == [], "no weight gradient, so nothing of x is kept"
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lin.weight.grad is None and not lin.weight.requires_grad
    with torch.autocast("cpu", torch.bfloat16):
        yb = lin(x)
    assert yb.dtype == torch.bfloat16, "output in the autocast dtype"
    assert lin(x.detach().double()).dtype == torch.float64, "no autocast: the input's dtype"
    assert lin(torch.randn(0, 256)).shape == (0, 192)


class _Adapter(nn.Module):
    """A wrapper of the kind LoRA puts around a base linear: base(x) + B A x with the base frozen."""

    def __init__(self, base: nn.Module, rank: int, trainable: bool):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1, requires_grad=trainable)
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1, requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.A.t() @ self.B.t()


@pytest.mark.parametrize("trainable", [False, True], ids=["x-only", "with-adapter"])
def test_a_wrapping_module_backprops_to_its_input(trainable):
    base = FrozenFp8Linear.from_float(torch.randn(130, 260) * 0.05)
    wrapped = _Adapter(base, 4, trainable)
    x = torch.randn(2, 9, 260, requires_grad=True)
    wrapped(x).sum().backward()
    W = base.dequantize_weight().double()
    want = torch.ones(2, 9, 130, dtype=torch.float64) @ (W + (wrapped.B @ wrapped.A).detach().double())
    assert x.grad is not None
    assert float((x.grad - want).norm() / want.norm()) < 2.0**-4  # dy of ones: exact in e4m3 tiles
    if trainable:
        assert wrapped.A.grad is not None and wrapped.B.grad is not None
    else:
        assert wrapped.A.grad is None
    assert base.weight.grad is None


def test_a_cast_moves_but_never_casts_the_stored_blocks():
    lin = FrozenFp8Linear.from_float(torch.randn(200, 300))
    data, scale = lin.weight.clone(), lin.weight_scale_inv.clone()
    holder = nn.Sequential(nn.Linear(3, 3), lin).to(torch.bfloat16)
    assert holder[0].weight.dtype == torch.bfloat16
    assert lin.weight.dtype == E4M3 and torch.equal(lin.weight.view(torch.uint8), data.view(torch.uint8))
    assert lin.weight_scale_inv.dtype == torch.float32 and torch.equal(lin.weight_scale_inv, scale)
    with torch.device("meta"):
        meta = nn.Sequential(FrozenFp8Linear(300, 200))
    real = meta.to(torch.bfloat16).to_empty(device="cpu")
    assert real[0].weight.dtype == E4M3 and real[0].weight.device.type == "cpu"


# ----- FrozenFp8Experts -------------------------------------------------------------------------------
def _float_experts(E: int, H: int, I: int, seed: int) -> GroupedExperts:
    gen = torch.Generator().manual_seed(seed)
    ex = GroupedExperts(E, H, I)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=gen) * 0.05)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=gen) * 0.05)
    return ex


@pytest.mark.parametrize("H,I", [(256, 128), (160, 136)], ids=["gate-up-stacked", "gate-up-apart"])
def test_experts_match_grouped_experts_on_the_dequantized_weights(H, I):
    E = 4
    frozen = FrozenFp8Experts.from_float(_float_experts(E, H, I, seed=1))
    assert frozen.fused == (I % TILE == 0)
    assert list(frozen.parameters()) == []
    names = {k: (v.dtype, tuple(v.shape)) for k, v in frozen.state_dict().items()}
    if frozen.fused:
        assert names["gate_up_proj"] == (E4M3, (E, 2 * I, H))
        assert names["gate_up_proj_scale_inv"] == (torch.float32, (E, *block_grid(2 * I, H)))
    else:
        assert names["gate_proj"] == names["up_proj"] == (E4M3, (E, I, H))
    assert names["down_proj"] == (E4M3, (E, H, I))
    ref = GroupedExperts(E, H, I)
    with torch.no_grad():
        for which in ref.PROJECTIONS:
            w = frozen.dequantize_weight(which)
            assert w.dtype == torch.float32 and w.shape == getattr(ref, which).shape
            getattr(ref, which).copy_(w)

    counts = torch.tensor([70, 0, 130, 33])  # an expert with no rows; none a multiple of 128
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(int(counts.sum()), H, generator=gen).requires_grad_()
    rows, groups = frozen.group(xs, counts)
    assert rows is xs and groups.sizes == counts.tolist() and groups.dest is None, "no bucket padding"
    # one projection, element by element within the tile bound
    h = frozen.project(xs, "gate_up_proj", groups).detach()
    plain = ExpertGroups(counts.tolist(), None, None)
    W = ref.gate_up_proj.detach().double()
    h_ref = grouped_linear(xs.detach().double(), W, plain)  # [M, 2I]
    q = quantize_tiles(xs.detach(), TILE)
    s = expand_scale(q.scale, q.tile, tuple(xs.shape)).double()
    bound = (2.0**-4 + H * ULP) * grouped_linear(xs.detach().double().abs(), W.abs(), plain) \
        + 2.0**-10 * grouped_linear(s, W.abs(), plain)
    err = (h.double() - h_ref).abs()
    assert bool((err <= bound).all()) and float(err.max()) > 0
    assert float((h.double() - h_ref).norm() / h_ref.norm()) < RMS_BOUND

    # the whole expert MLP and its input gradient: two quantized GEMMs (RMS_BOUND each), silu between
    ys = frozen.run_sorted(xs, counts)
    xr = xs.detach().clone().requires_grad_()
    ys_ref = ref.run_sorted(xr, counts)
    assert float((ys - ys_ref).detach().norm() / ys_ref.detach().norm()) < 2 * RMS_BOUND
    gy = torch.randn(ys.shape, generator=gen)
    ys.backward(gy)
    ys_ref.backward(gy)
    assert float((xs.grad - xr.grad).norm() / xr.grad.norm()) < 2 * RMS_BOUND
    # the experts' order matters: shuffled weights are far off (the comparison above can fail)
    with torch.no_grad():
        ref.gate_up_proj.copy_(ref.gate_up_proj.roll(1, dims=0))
    with torch.no_grad():
        assert float((ref.run_sorted(xr, counts) - ys).norm() / ys.norm()) > 0.3


def test_experts_published_slices_and_the_routed_forward():
    E, H, I = 4, 160, 136
    ex = _float_experts(E, H, I, seed=3)
    frozen = FrozenFp8Experts.from_float(ex)
    for e in range(E):
        for part, w in (("gate_proj", ex.gate_up_proj[e, :I]), ("up_proj", ex.gate_up_proj[e, I:]),
                        ("down_proj", ex.down_proj[e])):
            data, scale = frozen.expert_blocks(e, part)
            q, s = requantize_blocks(w)
            assert torch.equal(data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale, s)
    x = torch.randn(50, H)
    idx = torch.randint(0, E, (50, 2), generator=torch.Generator().manual_seed(4))
    gates = torch.rand(50, 2)
    with torch.no_grad():
        out, want = frozen(x, idx, gates), ex(x, idx, gates)
    assert out.shape == (50, H) and float((out - want).norm() / want.norm()) < 2.0**-3


# ----- requantization ---------------------------------------------------------------------------------
def test_requantize_layout_round_trip_and_error_figures():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=gen) * 0.01
    w[128:256, :128] = 0  # an all-zero block
    q, s = requantize_blocks(w)
    assert q.dtype == E4M3 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (3, 2)
    # the published convention: scale_inv = amax / 448 per block, w ~ e4m3 * scale_inv
    padded = F.pad(w.abs(), (0, 56, 0, 84))
    amax = padded.unflatten(0, (3, 128)).unflatten(2, (2, 128)).amax(dim=(1, 3))  # [3, 2]
    assert torch.equal(s[amax > 0], amax[amax > 0] / E4M3_MAX) and float(s[1, 0]) == 1.0
    back = dequantize_weight_blocks(q, s)
    full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert bool(((back - w).abs() <= torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * full)).all())
    # an e4m3-representable weight (what the checkpoint meant) comes back in the same bytes
    q2, s2 = requantize_blocks(back)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert float(((s2 - s).abs() / s).max()) <= 2 * ULP

    outlier = w.clone()
    outlier[::7, ::7] = 2.0  # in every block: its small values fall into e4m3's subnormals
    report = requantization_error([("plain", w), ("outlier", outlier)])
    diffs = [dequantize_weight_blocks(*requantize_blocks(t)) - t for t in (w, outlier)]
    rels = [float(d.norm() / t.norm()) for d, t in zip(diffs, (w, outlier), strict=True)]
    want_rel = (sum(float(d.square().sum()) for d in diffs) / (float(w.square().sum())
                                                                + float(outlier.square().sum()))) ** 0.5
    assert report.elements == 2 * w.numel()
    assert report.worst == ("plain", "outlier")[rels.index(max(rels))]
    assert report.worst_rel == pytest.approx(max(rels), rel=1e-6)
    assert report.rel_frobenius == pytest.approx(want_rel, rel=1e-6) and 0 < report.rel_frobenius < 2.0**-4
    assert report.max_abs == pytest.approx(max(float(d.abs().max()) for d in diffs))
    exact = requantization_error([("back", back)])
    assert exact.rel_frobenius == 0 and exact.max_abs == 0


# ----- checkpoints ------------------------------------------------------------------------------------
BASE = dict(vocab_size=97, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=True, max_position_embeddings=64,
            initializer_range=0.05, num_nextn_predict_layers=1)
CASES = {  # whole 128-blocks (or one block) per dim; and partial blocks everywhere
    "whole-blocks": dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                         kv_lora_rank=120),  # kv_a_proj_with_mqa: 120 + 8 = 128 rows
    "partial-blocks": dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136, q_lora_rank=None,
                           kv_lora_rank=72),
}


def _write_fp8_checkpoint(tmp_path, case: str):
    """A checkpoint in the published FP8 layout, written here independently of save_pretrained(fp8_blocks):
    every 2-D projection weight (kv_a_proj_with_mqa and eh_proj included) becomes e4m3 + amax/448 block
    scales."""
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    save_pretrained(build_model(cfg, seed=6), tmp_path / "ckpt")
    f = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(f)
    for name in [n for n in state if n.endswith(("proj.weight", "proj_with_mqa.weight")) and state[n].dim() == 2]:
        w = state[name]
        rows, cols = block_grid(*w.shape)
        blocks = F.pad(w.abs(), (0, cols * 128 - w.shape[1], 0, rows * 128 - w.shape[0]))
        scale = blocks.unflatten(0, (rows, 128)).unflatten(2, (cols, 128)).amax(dim=(1, 3)) / 448
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        state[name] = (w / full).to(torch.float8_e4m3fn)
        state[name + "_scale_inv"] = scale
    save_file(state, f)
    cfgj = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfgj["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfgj))
    return cfg, tmp_path / "ckpt", state


def _ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("case", list(CASES))
def test_keep_holds_the_checkpoint_bytes_and_matches_dequantize(case, tmp_path):
    cfg, path, state = _write_fp8_checkpoint(tmp_path, case)
    kept = from_pretrained(path, fp8="keep").eval()
    deq = from_pretrained(path).eval()
    fp8_names = {n for n, t in state.items() if t.dtype == E4M3}
    frozen = frozen_fp8_modules(kept)
    assert any(n.endswith("mlp.experts") for n in frozen) and any(n.endswith("eh_proj") for n in frozen)
    assert any(n.endswith("kv_a_proj_with_mqa") for n in frozen)
    assert not any(n.endswith(("lm_head", "mlp.gate")) for n in frozen)
    # each frozen module means exactly what the dequantized load holds
    deq_state = deq.state_dict()
    for name in frozen:
        m = kept.get_submodule(name)
        if isinstance(m, FrozenFp8Linear):
            assert torch.equal(m.dequantize_weight(), deq_state[name + ".weight"]), name
        else:
            assert isinstance(m, FrozenFp8Experts) and m.fused == (cfg.moe_intermediate_size % 128 == 0)
            for which in m.PROJECTIONS:
                assert torch.equal(m.dequantize_weight(which), deq_state[f"{name}.{which}"]), name
    # logits: every frozen GEMM adds its activation's 1x128 rounding (<= 2^-4 relative per product, a few
    # per cent in the mean); through ~10 GEMMs in series the logits stay within 2^-3
    ids = _ids()
    with torch.no_grad():
        a, b = kept(ids), deq(ids)
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 2.0**-3, rel

    # memory: e4m3 bytes are the checkpoint's; float32 only its scales and the router bias; bf16 the rest
    kept16 = from_pretrained(path, dtype=torch.bfloat16, fp8="keep")
    by_dtype = tensor_bytes_by_dtype(kept16)
    loaded = {n: t for n, t in state.items()
              if not (n.startswith(f"model.layers.{cfg.num_hidden_layers}.")
                      and n.endswith(("embed_tokens.weight", "shared_head.head.weight")))}  # MTP copies
    e4m3 = sum(t.numel() for n, t in loaded.items() if n in fp8_names)
    scales = sum(t.numel() * 4 for n, t in loaded.items() if n.endswith("_scale_inv"))
    bias = sum(t.numel() * 4 for n, t in loaded.items() if n.endswith("e_score_correction_bias"))
    rest = sum(t.numel() * 2 for n, t in loaded.items() if n not in fp8_names and t.dtype == torch.float32
               and not n.endswith(("_scale_inv", "e_score_correction_bias")))
    assert by_dtype == {E4M3: e4m3, torch.float32: scales + bias, torch.bfloat16: rest}, by_dtype
    print(f"\n[{case}] kept model bytes by dtype: {by_dtype}; dequantized (float32) model: "
          f"{tensor_bytes_by_dtype(deq)}")


def test_keep_refuses_what_it_cannot_keep(tmp_path):
    cfg = ModelConfig(**{**BASE, **CASES["partial-blocks"]})
    save_pretrained(build_model(cfg), tmp_path / "float")
    with pytest.raises(CheckpointError, match="no e4m3 weight"):
        from_pretrained(tmp_path / "float", fp8="keep")
    with pytest.raises(ConfigError, match="fp8 must be one of dequantize, keep"):
        from_pretrained(tmp_path / "float", fp8="bf16")
    _, path, state = _write_fp8_checkpoint(tmp_path, "partial-blocks")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    del state[name], state[name + "_scale_inv"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        from_pretrained(path, fp8="keep")


def test_published_fp8_modules_and_a_meta_build_allocate_nothing():
    cfg = ModelConfig(**{**BASE, **CASES["whole-blocks"]})
    meta = build_model(cfg, device="meta")
    names = published_fp8_modules(meta)
    assert "model.layers.0.self_attn.q_a_proj" in names and "model.layers.1.mlp.experts" in names
    assert "model.layers.1.mlp.shared_experts.down_proj" in names and "model.mtp.0.mlp.experts" in names
    assert not any(n.endswith(("eh_proj", "lm_head", "mlp.gate")) for n in names)
    kept = build_frozen_fp8_model(cfg, names, device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta for t in [*kept.parameters(), *kept.buffers()])
    assert sorted(frozen_fp8_modules(kept)) == sorted(names)


@pytest.mark.parametrize("case", list(CASES))
def test_save_fp8_blocks_round_trips_the_bytes(case, tmp_path):
    cfg, path, state = _write_fp8_checkpoint(tmp_path, case)
    kept = from_pretrained(path, fp8="keep")
    deq = from_pretrained(path)
    written = {}
    for label, model in (("kept", kept), ("dequantized", deq)):
        out = save_pretrained(model, tmp_path / label, fp8_blocks=True)
        cfgj = json.loads((out / "config.json").read_text())
        assert cfgj["quantization_config"] == FP8_QUANTIZATION_CONFIG
        assert read_config(out) == read_config(path)  # ModelConfig.from_hf_dict accepts it
        with safe_open(out / "model.safetensors", "pt") as h:
            written[label] = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    published = {n for n in state if n.endswith("_scale_inv")}
    eh = {n for n in published if "eh_proj" in n}  # we write eh_proj in high precision, the test's file had it FP8
    for label, got in written.items():
        assert {n for n in got if n.endswith("_scale_inv")} == (published if label == "kept" else published - eh)
        for n in published - eh:
            w = n.removesuffix("_scale_inv")
            assert got[w].dtype == E4M3 and torch.equal(got[w].view(torch.uint8), state[w].view(torch.uint8)), \
                (label, w)
            if label == "kept":
                assert torch.equal(got[n], state[n]), n  # stored scales, written as they are
            else:
                assert float(((got[n] - state[n]).abs() / state[n]).max()) <= 2 * ULP, n  # requantized
    # both modes read the written file back to the same model
    again = from_pretrained(tmp_path / "kept", fp8="keep")
    for (n1, t1), (n2, t2) in zip(kept.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1.view(torch.uint8) if t1.dtype == E4M3 else t1,
                                        t2.view(torch.uint8) if t2.dtype == E4M3 else t2), n1
    # the published layout's kept bytes, predicted from the configuration alone (on meta)
    published_kept = from_pretrained(tmp_path / "dequantized", dtype=torch.bfloat16, fp8="keep")
    assert tensor_bytes_by_dtype(published_kept) == kept_fp8_bytes(cfg, torch.bfloat16)
    deq_again = from_pretrained(tmp_path / "kept")
    for (n1, t1), (n2, t2) in zip(deq.state_dict().items(), deq_again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1
    # a kept model saved without fp8_blocks is written dequantized: the dequantized load, exactly
    plain = from_pretrained(save_pretrained(kept, tmp_path / "plain"))
    for (n1, t1), (n2, t2) in zip(deq.state_dict().items(), plain.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_transformers_reads_our_fp8_layout_on_the_cpu(tmp_path):
    """transformers' FineGrainedFP8 path on a machine without a GPU dequantizes the e4m3 blocks on load (to
    bf16). It derives the block from the grid (rows // scale rows), so it reads partial blocks right only
    where a dim has one block: the whole-blocks case; at 136 rows it would take 68-row blocks."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg, path, _ = _write_fp8_checkpoint(tmp_path, "whole-blocks")
    ours = from_pretrained(path).eval()
    save_pretrained(ours, tmp_path / "out", fp8_blocks=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits.float()
    assert float((a - b).norm() / a.norm()) < 2.0**-6  # bf16 weights and activations in transformers
