"""Model behaviour: config validation, parameter counts, balancing, gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from frugallm.config import PRESETS, ModelConfig, preset
from frugallm.cost.params import match_dense_width, param_counts
from frugallm.errors import ConfigError
from frugallm.kernels import KernelPolicy
from frugallm.kernels.policy import bucket_rows
from frugallm.model import build_model
from frugallm.model.attention import GQA, MLA
from frugallm.model.moe import MoE

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
             num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1)


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=8, n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(attention="flash"), "attention"),
    (dict(ffn="sparse"), "ffn"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (dict(attention="gqa", num_key_value_heads=3), "num_key_value_heads"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
])
def test_validation_names_the_field(changes, field) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**SMALL, **changes})


def test_unknown_field_is_named() -> None:
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.from_dict({"n_experts": 4})


@pytest.mark.parametrize("changes", [
    {}, dict(q_lora_rank=None), dict(attention="mha"), dict(attention="gqa", num_key_value_heads=1),
    dict(ffn="dense"), dict(num_nextn_predict_layers=2), dict(tie_word_embeddings=True),
    dict(scoring_func="softmax", n_group=1, topk_group=1),
])
def test_param_counts_equal_numel(changes) -> None:
    cfg = ModelConfig(**{**SMALL, **changes})
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts.total_with_mtp == sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.mtp."))
    assert counts.mtp == mtp


def test_presets_build_on_meta_and_count() -> None:
    for name in PRESETS:
        cfg = preset(name)
        model = build_model(cfg, device="meta")
        assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total_with_mtp
    v3 = param_counts(preset("deepseek-v3"))
    assert abs(v3.total / 671e9 - 1) < 0.005
    assert abs(v3.active / 37e9 - 1) < 0.03
    tiny, dense = param_counts(preset("tiny")), param_counts(preset("tiny-dense"))
    assert 10e6 <= tiny.total <= 30e6
    assert abs(dense.active / tiny.active - 1) < 0.01
    assert preset("tiny-dense").intermediate_size == match_dense_width(preset("tiny"), preset("tiny-dense"))


def test_forward_train_shapes_and_losses() -> None:
    cfg = ModelConfig(**{**SMALL, "num_nextn_predict_layers": 2})
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (3, 20 + 1 + 2))
    out = model.forward_train(tokens)
    assert model(tokens[:, :20]).shape == (3, 20, 64)
    assert len(out.mtp_losses) == 2 and out.loads.shape == (1 + 2, 8)
    assert out.loads.sum(1).tolist() == [3 * 20 * 2] * 3  # no token dropped, k experts each
    # the balance loss is 1 when routing is perfectly uniform; it is positive and finite
    assert torch.isfinite(out.balance_loss) and out.balance_loss > 0
    (out.loss + sum(out.mtp_losses) + out.balance_loss).backward()
    assert model.model.layers[1].mlp.gate.weight.grad is not None


def _skewed_moe(**changes) -> tuple[MoE, torch.Tensor]:
    cfg = ModelConfig(**{**SMALL, "n_routed_experts": 16, "num_experts_per_tok": 2, "n_group": 4,
                         "topk_group": 2, **changes})
    moe = build_model(cfg).model.layers[1].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:3] += 0.5  # three experts attract most tokens
    x = torch.randn(4, 64, 32)
    return moe, x


def test_bias_updates_balance_load_without_changing_gate_values() -> None:
    moe, x = _skewed_moe()
    flat = x.reshape(-1, 32)

    def imbalance() -> float:
        load = moe.load(moe.gate(flat).indices).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(300):
        moe.update_bias(moe.load(moe.gate(flat).indices), gamma=0.01)
    after = imbalance()
    assert before > 2.5, before
    assert after < 0.65 * before, (before, after)  # measured here: 2.94 -> 1.72
    # gates come from the unbiased affinities: for the experts chosen, the gate is s_i / sum_chosen s_j
    route = moe.gate(flat)
    s = route.scores.gather(1, route.indices)
    torch.testing.assert_close(route.gates, s / s.sum(-1, keepdim=True) * moe.gate.scaling)
    assert moe.gate.e_score_correction_bias.abs().max() > 0


def _reference_route(scores: list[float], bias: list[float], n_group: int, k: int) -> set[int]:
    """Node-limited routing with one group kept, token by token in plain Python: the group whose two best
    biased scores sum highest, then its k best biased scores."""
    choice = [s + b for s, b in zip(scores, bias, strict=True)]
    size = len(choice) // n_group
    members = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
    best = max(members, key=lambda m: sum(sorted((choice[e] for e in m), reverse=True)[:2]))
    return set(sorted(best, key=lambda e: choice[e], reverse=True)[:k])


def test_group_limited_routing_picks_the_reference_group_and_experts() -> None:
    """16 experts in 4 groups, one group kept: each token's 2 experts lie in the group a brute-force reference
    picks by the sum of its top-2 biased scores; a bias that changes the choice changes it the same way."""
    cfg = ModelConfig(**{**SMALL, "n_routed_experts": 16, "num_experts_per_tok": 2, "n_group": 4,
                         "topk_group": 1})
    moe = build_model(cfg, dtype=torch.float64, seed=0).model.layers[1].mlp
    x = torch.randn(256, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    scores = torch.sigmoid(x @ moe.gate.weight.T).tolist()
    picked = {}
    for name, bias in (("unbiased", [0.0] * 16), ("biased", [0.0] * 13 + [0.35, 0.0, 0.3])):
        with torch.no_grad():
            moe.gate.e_score_correction_bias.copy_(torch.tensor(bias))
        route = moe.gate(x)
        picked[name] = [set(row.tolist()) for row in route.indices]
        want = [_reference_route(s, bias, 4, 2) for s in scores]
        assert picked[name] == want, name
        assert all(len({e // 4 for e in row}) == 1 for row in picked[name]), name
    changed = sum(a != b for a, b in zip(picked["unbiased"], picked["biased"], strict=True))
    assert changed > 64, changed  # the bias moved a good part of the tokens to group 3
    # the unbiased routing spreads over every group, so the reference is not trivially "group 0"
    assert {min(row) // 4 for row in picked["unbiased"]} == {0, 1, 2, 3}


def test_gradcheck_moe_float64() -> None:
    cfg = ModelConfig(**{**SMALL, "hidden_size": 8, "moe_intermediate_size": 4, "n_routed_experts": 4,
                         "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2, "num_attention_heads": 1})
    moe = build_model(cfg, dtype=torch.float64).model.layers[1].mlp
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    # routing is piecewise constant; gradcheck the smooth parts (gates, experts) at a fixed routing
    assert torch.autograd.gradcheck(lambda t: moe(t)[0], (x,), eps=1e-6, atol=1e-5)
    params = [moe.experts.gate_up_proj, moe.experts.down_proj, moe.gate.weight]
    assert torch.autograd.gradcheck(lambda *ps: _moe_with(moe, ps, x.detach()), params, eps=1e-6, atol=1e-5)


def test_cpu_bf16_experts_run_on_bucketed_rows_with_the_unpadded_results(monkeypatch) -> None:
    """Where the experts' GEMMs run on oneDNN (bf16 on the CPU) the policy pads each expert's rows to a bucket
    size; outputs and gradients are those of the policy without the padding, within bf16 rounding (the
    float64 exactness of the padding is tests/test_kernels.py's)."""
    import frugallm.model.moe as moe_mod

    cfg = ModelConfig(**{**SMALL, "n_routed_experts": 4, "n_group": 1, "topk_group": 1})
    moe = build_model(cfg, dtype=torch.bfloat16, seed=1).model.layers[1].mlp
    assert moe.experts.kernels.expert_row_buckets  # chosen for bf16 on the CPU
    x = torch.randn(3, 37, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    route = _route(moe, x)
    results = {}
    for pad in (True, False):
        moe.experts.kernels = replace(moe.experts.kernels, expert_row_buckets=pad)
        rows: list[int] = []
        with monkeypatch.context() as mp:  # a spy on the experts' GEMMs: the row counts they see
            mp.setattr(moe_mod.F, "linear", lambda a, w, *r, rows=rows, linear=F.linear:
                       rows.append(a.shape[0]) or linear(a, w, *r))
            xi = x.clone().requires_grad_()
            out = moe.experts(xi.view(-1, 32), *route)
            out.backward(torch.ones_like(out))
        results[pad] = (out.detach(), xi.grad, moe.experts.gate_up_proj.grad.clone(), rows)
        moe.zero_grad(set_to_none=True)
    padded, plain = results[True], results[False]
    assert all(r == bucket_rows(r) for r in padded[3]) and sum(padded[3]) > sum(plain[3])
    for a, b in zip(padded[:3], plain[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _route(moe: MoE, x: torch.Tensor):
    route = moe.gate(x.view(-1, x.shape[-1]).detach())
    return route.indices, route.gates.detach()


def _moe_with(moe: MoE, params, x):
    from torch.func import functional_call

    names = ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]
    return functional_call(moe, dict(zip(names, params, strict=True)), (x,))[0]


@pytest.mark.parametrize("attn_cls, changes", [(MLA, {}), (MLA, dict(q_lora_rank=None)),
                                               (GQA, dict(attention="gqa", num_key_value_heads=1))])
def test_gradcheck_attention_float64(attn_cls, changes) -> None:
    cfg = ModelConfig(**{**SMALL, "hidden_size": 8, "kv_lora_rank": 4, "qk_nope_head_dim": 2,
                         "qk_rope_head_dim": 2, "v_head_dim": 2, "q_lora_rank": 4, **changes})
    model = build_model(cfg, dtype=torch.float64)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, attn_cls)
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    rope = model.rope(4)
    assert torch.autograd.gradcheck(lambda t: attn(t, rope), (x,), eps=1e-6, atol=1e-5)


def test_attention_is_causal() -> None:
    model = build_model(ModelConfig(**SMALL))
    ids = torch.randint(0, 64, (1, 12))
    a = model(ids)
    ids2 = ids.clone()
    ids2[0, 8:] = (ids2[0, 8:] + 1) % 64
    b = model(ids2)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("kernels", [KernelPolicy(), KernelPolicy(vocab_block=16)])  # one logits GEMM, or blocks
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_linear_cross_entropy_equals_plain_path(monkeypatch, dtype, tol, kernels) -> None:
    from frugallm.model import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * 50)  # chunks of 3 rows: several, the last partial
    h = torch.randn(2, 7, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, 2] = labels[1, 6] = -100  # ignored positions
    ours = loss_mod.linear_cross_entropy(h, w, labels, kernels=kernels) * 2.5  # scaled: both gradients scale
    ours.backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten()) * 2.5
    plain.backward()
    assert abs(ours.item() - plain.item()) < tol * 10
    assert (dh - h.grad).abs().max() < tol and (dw - w.grad).abs().max() < tol
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(loss_mod.linear_cross_entropy(h, w, labels, kernels=kernels).item() * 2.5
                   - plain.item()) < tol * 10


def test_linear_cross_entropy_under_bf16_autocast_tracks_the_float32_path(monkeypatch) -> None:
    """Under bf16 autocast the head's GEMMs run in bf16 through buffers every chunk reuses (logits and dz,
    the weight gradient before and after widening); several chunks, the last partial: loss and gradients
    within bf16 rounding of the float32 plain path."""
    from frugallm.model import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 3 * 50)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[1, 3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_mod.linear_cross_entropy(h, w, labels)
    ours.backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    plain = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten())
    plain.backward()
    assert ours.dtype == torch.float32 and abs(ours.item() - plain.item()) < 0.02 * plain.item()
    for got, want in ((dh, h.grad), (dw, w.grad)):
        assert got.dtype == torch.float32 and (got - want).norm() < 0.02 * want.norm()


def test_linear_cross_entropy_rows_whose_label_probability_underflows() -> None:
    """The CPU path takes the loss as -log softmax[label]; where that probability is below the smallest
    normal float32 (a loss above 87) the row's log-sum-exp comes from its logits: loss and gradients still
    equal the plain path, finite."""
    from frugallm.model import loss as loss_mod

    torch.manual_seed(0)
    w = torch.randn(40, 8, requires_grad=True)
    h = torch.randn(6, 8)
    labels = torch.randint(0, 40, (6,))
    h[2] = w[labels[2]].detach() * -40.0  # row 2 scores its own label far below the others
    h.requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(h @ w.T, labels, reduction="none")
    assert plain[2] > 200 and plain.isfinite().all()  # p[label] = exp(-plain) underflows to 0 in float32
    plain.mean().backward()
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ours = loss_mod.linear_cross_entropy(h, w, labels)
    ours.backward()
    torch.testing.assert_close(ours, plain.mean().detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, dw, rtol=1e-5, atol=1e-6)


def test_forward_train_loss_equals_cross_entropy_of_logits() -> None:
    model = build_model(ModelConfig(**SMALL))
    tokens = torch.randint(0, 64, (2, 12))
    expected = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(model.forward_train(tokens).loss.item() - expected.item()) < 1e-5


def test_fused_gate_up_matches_the_separate_linears() -> None:
    """Training runs an MLP's gate and up projections as one GEMM over their concatenated weights: output
    and gradients equal the separate linears; no_grad (serving) does not fuse, so it copies no weights."""
    from frugallm.model.layers import fuse_linears

    cfg = ModelConfig(**SMALL)
    mlp = build_model(cfg, dtype=torch.float64).model.layers[0].mlp  # first_k_dense_replace=1: dense
    x = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64)
    assert fuse_linears(mlp.gate_proj, mlp.up_proj)
    with torch.no_grad():
        assert not fuse_linears(mlp.gate_proj, mlp.up_proj)
        y_nograd = mlp(x)
    w = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    y = mlp(x)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y_nograd, ref.detach())
    for a, b in zip(torch.autograd.grad(y.sum(), w), torch.autograd.grad(ref.sum(), w), strict=True):
        torch.testing.assert_close(a, b)


def test_written_out_norm_and_swiglu_backward_equal_autograd() -> None:
    """RMSNorm and SwiGLU have hand-written backwards (fewer passes over the activation): in float64 they
    pass gradcheck and equal autograd through the composite formulas, for inputs and the norm's weight."""
    from frugallm.model.layers import RMSNorm, swiglu

    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w: norm(t), (x, norm.weight))
    ref = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    g = torch.randn_like(x)
    ours = norm(x)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (x, norm.weight), g),
                    torch.autograd.grad(ref, (x, norm.weight), g), strict=True):
        torch.testing.assert_close(a, b)

    h = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    gate, up = h.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    g = torch.randn_like(ref)
    torch.testing.assert_close(swiglu(h), ref)
    torch.testing.assert_close(torch.autograd.grad(swiglu(h), h, g)[0], torch.autograd.grad(ref, h, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_without_backward_equals_the_autograd_function(dtype) -> None:
    """Under no_grad RMSNorm runs torch's fused rms_norm; with a backward its own Function: same values."""
    from frugallm.model.layers import RMSNorm

    norm = RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    with_grad = norm(x.clone().requires_grad_())
    with torch.no_grad():
        fast = norm(x)
    assert fast.dtype == with_grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(fast.float(), with_grad.detach().float(), atol=tol, rtol=tol)


# ----- the classic batch-wise auxiliary balance loss (``MoE.batch_balance_loss``) ------------------------
def _aux_loss_of(moe: MoE, weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    route = torch.func.functional_call(moe.gate, {"weight": weight}, (flat,))
    return moe.batch_balance_loss(route, moe.load(route.indices))


def test_aux_loss_values_uniform_one_and_switch_for_top1() -> None:
    """1 at a perfectly uniform load, and for k = 1 Switch Transformer's E * sum_i frac_i * P_i."""
    cfg = ModelConfig(**{**SMALL, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 1})
    moe = build_model(cfg, dtype=torch.float64, seed=0).model.layers[1].mlp
    flat = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    route = moe.gate(flat)
    load = moe.load(route.indices)
    probs = route.scores / route.scores.sum(-1, keepdim=True)
    switch = 8 * ((load.float() / 64) * probs.mean(0)).sum()  # the router scores in float32
    torch.testing.assert_close(moe.batch_balance_loss(route, load), switch)
    uniform = route._replace(scores=torch.ones_like(route.scores))
    torch.testing.assert_close(moe.batch_balance_loss(uniform, torch.full((8,), 8)), torch.tensor(1.0))
    # counted tokens only: the loss of half the batch is the loss of that half alone
    keep = torch.arange(64) < 32
    half = moe.gate(flat[:32])
    torch.testing.assert_close(moe.batch_balance_loss(route, moe.load(route.indices, keep), keep),
                               moe.batch_balance_loss(half, moe.load(half.indices)))


def test_aux_loss_gradient_matches_finite_differences() -> None:
    """The router's gradient of the auxiliary loss against central differences along random directions, at a
    fixed routing (top-k is piecewise constant: the gradient flows through P only). The router scores in
    float32 whatever the model's dtype, so the differences are taken in float32 with a wide step."""
    cfg = ModelConfig(**{**SMALL, "hidden_size": 8, "n_routed_experts": 4, "n_group": 2, "topk_group": 1,
                         "num_experts_per_tok": 2, "num_attention_heads": 1})
    moe = build_model(cfg, seed=0).model.layers[1].mlp
    gen = torch.Generator().manual_seed(2)
    flat = torch.randn(12, 8, generator=gen)
    w = moe.gate.weight.detach().clone().requires_grad_(True)
    g, = torch.autograd.grad(_aux_loss_of(moe, w, flat), w)
    assert g.abs().sum() > 0
    eps = 1e-3
    for _ in range(4):
        v = torch.randn(w.shape, generator=gen)
        v /= v.norm()
        plus, minus = w.detach() + eps * v, w.detach() - eps * v
        routes = [torch.func.functional_call(moe.gate, {"weight": t}, (flat,)).indices for t in (plus, minus)]
        assert torch.equal(routes[0].sort(-1).values, routes[1].sort(-1).values)  # the same selections
        numeric = (_aux_loss_of(moe, plus, flat) - _aux_loss_of(moe, minus, flat)) / (2 * eps)
        torch.testing.assert_close(numeric, (g * v).sum(), rtol=2e-2, atol=2e-4)


def test_aux_loss_lowers_the_imbalance_of_a_skewed_router() -> None:
    """Gradient steps on the auxiliary loss alone (bias frozen at zero) spread a router that sends most
    tokens to three experts. Softmax scores, the loss's classic setting (Switch, GShard, DeepSeek-V2): with
    V3's sigmoid scores the loss can also fall by shrinking P without moving the selections."""
    moe, x = _skewed_moe(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)
    flat = x.reshape(-1, 32)

    def imbalance() -> float:
        load = moe.load(moe.gate(flat).indices).float()
        return (load.max() / load.mean()).item()

    before = imbalance()
    opt = torch.optim.Adam([moe.gate.weight], lr=3e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = _aux_loss_of(moe, moe.gate.weight, flat)
        loss.backward()
        opt.step()
    after = imbalance()
    assert moe.gate.e_score_correction_bias.abs().max() == 0
    assert before > 2.5, before
    assert after < 0.65 * before, (before, after)
