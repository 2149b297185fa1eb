"""Fine-grained e4m3 quantization: shapes, scales, the round-trip bound, padding, zeros, outliers, inf.

The bound (frugallm.precision.quant): |dequantize(quantize(x)) - x| <= max(2^-4 |x|, 2^-10 * scale) per
element: half an e4m3 ulp (3 mantissa bits) in the normal range, half the subnormal step (2^-9) below it."""

import pytest
import torch

from frugallm.precision.quant import (
    E4M3,
    E4M3_MAX,
    e4m3_to_float,
    expand_scale,
    quantize,
    quantize_blocks,
    quantize_tiles,
)

REL_BOUND = 2.0**-4
SUBNORMAL_BOUND = 2.0**-10


def _within_bound(x: torch.Tensor, q) -> torch.Tensor:
    """Per element: does the round trip respect the e4m3 bound? (a little FP32 slack for x / scale)"""
    err = (q.dequantize() - x.float()).abs()
    scale = expand_scale(q.scale, q.tile, tuple(x.shape[-2:]))
    bound = torch.maximum(REL_BOUND * x.abs(), SUBNORMAL_BOUND * scale) * (1 + 1e-6)
    return err <= bound


def test_tile_and_block_shapes():
    x = torch.randn(3, 300, 520)  # a batch, as stacked expert weights are
    t = quantize_tiles(x)
    assert t.data.shape == x.shape and t.data.dtype == E4M3
    assert t.scale.shape == (3, 300, 5) and t.scale.dtype == torch.float32  # ceil(520 / 128) = 5
    assert t.tile == (1, 128)
    b = quantize_blocks(x)
    assert b.data.shape == x.shape and b.scale.shape == (3, 3, 5)  # ceil(300/128) x ceil(520/128)
    assert b.tile == (128, 128)
    assert b.t().data.shape == (3, 520, 300) and b.t().scale.shape == (3, 5, 3) and b.t().tile == (128, 128)


def test_scales_are_amax_over_448():
    x = torch.randn(256, 384) * torch.logspace(-3, 3, 256).unsqueeze(1)  # rows of very different magnitude
    t = quantize_tiles(x)
    want = x.abs().view(256, 3, 128).amax(-1) / E4M3_MAX  # [256, 3]
    assert torch.equal(t.scale, want)
    b = quantize_blocks(x)
    want_b = x.abs().view(2, 128, 3, 128).amax(dim=(1, 3)) / E4M3_MAX  # [2, 3]
    assert torch.equal(b.scale, want_b)
    # the largest element of every tile lands on the top of the e4m3 range
    assert torch.equal(t.data.float().abs().view(256, 3, 128).amax(-1), torch.full((256, 3), E4M3_MAX))


def test_pow2_scales():
    x = torch.randn(64, 256) * 3.7
    q = quantize_tiles(x, pow2=True)
    mantissa, _ = torch.frexp(q.scale)
    assert torch.all(mantissa == 0.5), "every scale is a power of two"
    amax = x.abs().view(64, 2, 128).amax(-1)
    assert torch.all(q.scale >= amax / E4M3_MAX) and torch.all(q.scale < 2 * amax / E4M3_MAX)
    assert torch.all(q.data.float().abs() <= E4M3_MAX)
    exact = quantize_tiles(torch.ldexp(torch.ones(4, 128), torch.arange(4).unsqueeze(1)) * 448)  # amax = 448 * 2^k
    assert torch.equal(exact.scale.squeeze(1), torch.tensor([1.0, 2.0, 4.0, 8.0]))


@pytest.mark.parametrize("kind", ["tiles", "blocks"])
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_within_e4m3_bound(kind, pow2):
    x = torch.randn(384, 640) * torch.logspace(-4, 2, 640)  # columns spanning six decades
    q = quantize_tiles(x, pow2=pow2) if kind == "tiles" else quantize_blocks(x, pow2=pow2)
    ok = _within_bound(x, q)
    rel = ((q.dequantize() - x).abs() / x.abs()).flatten()
    print(f"{kind} pow2={pow2}: median relative error {rel.median():.4f}, max (normal range) "
          f"{rel[x.abs().flatten() > 2**-6 * expand_scale(q.scale, q.tile, x.shape).flatten()].max():.4f} "
          f"<= 2^-4 = {REL_BOUND}")
    assert ok.all(), f"{int((~ok).sum())} elements break the e4m3 bound"
    assert rel.median() > 1e-3, "the round trip must actually quantize"


def test_padded_edges():
    x = torch.randn(130, 200)  # 2 row blocks (128 + 2), 2 column tiles (128 + 72)
    t, b = quantize_tiles(x), quantize_blocks(x)
    assert t.scale.shape == (130, 2) and b.scale.shape == (2, 2)
    assert t.dequantize().shape == x.shape == b.dequantize().shape
    # the partial tile and the corner block take their scale from their real elements only
    assert torch.equal(t.scale[:, 1], x[:, 128:].abs().amax(-1) / E4M3_MAX)
    assert torch.equal(b.scale[1, 1], x[128:, 128:].abs().amax() / E4M3_MAX)
    assert _within_bound(x, t).all() and _within_bound(x, b).all()
    # a short dim (fewer than 128) is one partial tile
    small = torch.randn(5, 80)
    assert quantize_tiles(small).scale.shape == (5, 1) and _within_bound(small, quantize_tiles(small)).all()


def test_all_zero_tensor():
    z = torch.zeros(64, 300)
    for q in (quantize_tiles(z), quantize_blocks(z), quantize_tiles(z, pow2=True)):
        assert torch.all(q.scale == 1.0), "a zero tile gets scale 1, not 0 (no 0/0)"
        assert torch.equal(q.dequantize(), z)
    # a zero tile next to a non-zero one is unaffected by it
    x = torch.randn(4, 256)
    x[:, :128] = 0
    q = quantize_tiles(x)
    assert torch.equal(q.dequantize()[:, :128], x[:, :128]) and _within_bound(x, q).all()


def test_outlier_costs_only_its_tile():
    x = torch.randn(256, 512)
    x[5, 300] = 1e6  # row 5, column tile 2 (256..383)
    q = quantize_tiles(x)
    ok = _within_bound(x, q)
    in_tile = torch.zeros_like(ok)
    in_tile[5, 256:384] = True
    assert ok[~in_tile].all(), "every other tile keeps full e4m3 precision"
    rel = ((q.dequantize() - x).abs() / x.abs())
    neighbours = rel[5, 256:384][torch.arange(256, 384) != 300]
    print(f"outlier tile: mean relative error of its other 127 elements {neighbours.mean():.3f}; "
          f"rest of the tensor {rel[~in_tile].mean():.4f}")
    assert neighbours.mean() > 0.5, "values 1e6 below the tile's amax fall below e4m3's range"
    # one scale for the whole tensor would lose every element the same way
    whole = quantize(x, (256, 512))
    assert (((whole.dequantize() - x).abs() / x.abs()) > 0.5).float().mean() > 0.9

    w = torch.randn(256, 384) * 0.02
    w[10, 200] = 1e4  # block (0, 1)
    qb = quantize_blocks(w)
    okb = _within_bound(w, qb)
    in_block = torch.zeros_like(okb)
    in_block[:128, 128:256] = True
    assert okb[~in_block].all(), "every other weight block keeps full e4m3 precision"
    assert ((qb.dequantize() - w).abs() / w.abs())[in_block].mean() > 0.5


def test_infinities_and_nan():
    x = torch.randn(2, 256)
    x[0, 3], x[0, 7], x[1, 200] = float("inf"), float("-inf"), float("nan")
    q = quantize_tiles(x)
    deq = q.dequantize()
    bad = ~torch.isfinite(x)
    assert torch.isnan(deq[bad]).all(), "non-finite values stay visible (NaN: e4m3 has no inf)"
    assert torch.equal(q.scale[0, 0], x[0, :128][torch.isfinite(x[0, :128])].abs().max() / E4M3_MAX)
    err = (deq - x).abs()[~bad]
    assert (err <= REL_BOUND * x.abs()[~bad] + SUBNORMAL_BOUND * 1.0).all(), "finite neighbours keep precision"


@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_finite_fast_path_equals_masked_path(tile):
    """A finite tensor takes the amax without masking; a non-finite element anywhere sends the whole tensor
    through the masked path. Groups are independent, so the groups without it must come out the same."""
    x = torch.randn(300, 260) * 5
    x[:128, :128] = 0.0  # an all-zero group (scale 1), and -0.0 in another
    x[130, 140] = -0.0
    y = torch.cat([x, torch.full((128, 260), float("inf"))])  # one more row of groups, all inf
    for pow2 in (False, True):
        fast, masked = quantize(x, tile, pow2), quantize(y, tile, pow2)
        assert torch.equal(fast.scale, masked.scale[: fast.scale.shape[0]])
        assert torch.equal(fast.data.float(), masked.data[:300].float())  # as values: -0.0 == +0.0
        assert torch.isnan(masked.data[300:].float()).all()


def test_transpose_is_exact():
    w = torch.randn(300, 200)
    q = quantize_blocks(w)
    assert torch.equal(q.t().dequantize(), q.dequantize().t())


def test_e4m3_to_float_is_the_exact_conversion():
    """The CPU table lookup gives PyTorch's own conversion for all 256 codes (NaN where it gives NaN), on
    strided views and batches too."""
    codes = torch.arange(256, dtype=torch.uint8).view(E4M3)
    fast, ref = e4m3_to_float(codes), codes.float()
    assert torch.equal(fast.isnan(), ref.isnan())
    assert torch.equal(fast[~fast.isnan()], ref[~ref.isnan()])
    x = (torch.randn(3, 300, 260) * 50).clamp(-448, 448).to(E4M3).transpose(-2, -1)  # [3, 260, 300] view
    out = e4m3_to_float(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.equal(out, x.float())
