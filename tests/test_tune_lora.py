"""LoRA on a tiny MLA + MoE model (dense layer, shared and routed experts, MTP): the adapted model at init
computes what the base did, merging changes nothing, only the adapters train, FP8 and frozen-FP8 bases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugallm.config import ModelConfig
from frugallm.errors import ConfigError
from frugallm.model import build_model
from frugallm.model.layers import Linear
from frugallm.model.moe import ExpertGroups, GroupedExperts, grouped_linear
from frugallm.precision import Fp8Recipe, convert_to_fp8
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear
from frugallm.train.checkpoint import load_checkpoint, save_checkpoint
from frugallm.train.config import TrainConfig
from frugallm.train.optim import build_optimizer
from frugallm.tune.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    LoraExperts,
    LoraLinear,
    apply_lora,
    lora_modules,
    merge_lora,
    trainable_parameters,
)
from shapes import LORA_TINY

BASE = LORA_TINY  # tests/shapes.py
CASES = {"q-latent-mtp": dict(q_lora_rank=24, num_nextn_predict_layers=1),
         "no-q-latent": dict(q_lora_rank=None)}
MLA_QLATENT = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _model(case: str = "q-latent-mtp", seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(**{**BASE, **CASES[case]}), seed=seed)


def _ids(seq: int = 12) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1))


def _perturb(model: nn.Module, seed: int = 2, scale: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_config_is_validated_naming_the_field():
    for kwargs, field in [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                          ({"targets": ()}, "targets"), ({"targets": ("re:(",)}, "targets"),
                          ({"dtype": "float8"}, "dtype"), ({"rank": True}, "rank")]:
        with pytest.raises(ConfigError, match=field):
            LoraConfig(**kwargs)
    assert LoraConfig(targets=["o_proj"]).targets == ("o_proj",)
    assert LoraConfig(rank=4, alpha=8).scaling == 2.0


@pytest.mark.parametrize("case", list(CASES))
def test_default_targets_and_init_leaves_logits_unchanged(case):
    model = _model(case).eval()
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    report = apply_lora(model, LoraConfig(rank=4))
    wrapped = set(report.wrapped)
    attn = MLA_QLATENT if case == "q-latent-mtp" else ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in attn}
    expected |= {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"model.layers.{i}.mlp.shared_experts.{p}" for i in (1, 2) for p in ("gate_proj", "up_proj",
                                                                                       "down_proj")}
    expected |= {"model.layers.1.mlp.experts", "model.layers.2.mlp.experts"}
    assert wrapped == expected  # no router, norm, embedding, lm_head, MTP module
    assert report.kinds == {"LoraLinear": len(expected) - 2, "LoraExperts": 2}
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    assert report.total == sum(p.numel() for p in model.parameters())
    assert not any(m.training for m in model.modules())  # the wrappers take the model's eval mode
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)  # B = 0: the adapters add exact zeros


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged(case):
    model = _model(case).eval()
    ids = _ids()
    plain_names = list(model.state_dict())
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoraConfig(rank=3, alpha=5.0))
    _perturb(model)
    with torch.no_grad():
        unmerged = model(ids)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters, routed experts' included, do something
    merged_names = merge_lora(model)
    assert len(merged_names) > 0 and not lora_modules(model)
    assert list(model.state_dict()) == plain_names  # plain modules back, original names
    with torch.no_grad():
        merged = model(ids)
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_routed_experts_adapter_alone_matches_merge():
    """Only the routed experts adapted: the per-expert adapter is what W_e + s B_e A_e computes."""
    model = _model().eval()
    ids = _ids()
    report = apply_lora(model, LoraConfig(rank=2, targets=("mlp.experts",)))
    assert report.wrapped == ("model.layers.1.mlp.experts", "model.layers.2.mlp.experts")
    _perturb(model, scale=0.3)
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
    assert (merged - unmerged).abs().max().item() <= 1e-5


def test_only_adapters_get_gradients_and_optimizer_state():
    model = _model().train()
    apply_lora(model, LoraConfig(rank=4))
    _perturb(model)  # B != 0, so A gets a gradient too
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    lora = {id(p) for _, p in trainable_parameters(model)}
    assert in_opt == lora  # build_optimizer takes only parameters that require grad
    out = model.forward_train(_ids(12 + 2))
    (out.loss + sum(out.mtp_losses)).backward()
    opt.step()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, base_before[name]), name
    assert set(opt.state) == {p for _, p in trainable_parameters(model)}


def test_patterns_errors_and_regex():
    model = _model()
    with pytest.raises(ConfigError, match=r"'nope_proj' matches no module.*self_attn\.q_a_proj"):
        apply_lora(model, LoraConfig(targets=("q_a_proj", "nope_proj")))
    with pytest.raises(ConfigError, match=r"'mlp\.gate' matches only .*Router.*not a linear"):
        apply_lora(model, LoraConfig(targets=("mlp.gate",)))
    with pytest.raises(ConfigError, match="lm_head"):
        apply_lora(model, LoraConfig(targets=("lm_head",)))
    with pytest.raises(ConfigError, match="q_proj"):  # outside the default set, a missing name is an error
        apply_lora(model, LoraConfig(targets=("q_proj",)))
    with pytest.raises(ConfigError, match="only MTP modules"):
        apply_lora(model, LoraConfig(targets=("eh_proj",)))
    assert not lora_modules(model)  # refused before anything changed
    assert all(p.requires_grad for p in model.parameters())
    # a suffix matches at a dot boundary only: "proj" is not a suffix of "o_proj"'s last component
    with pytest.raises(ConfigError, match="'proj' matches no module"):
        apply_lora(model, LoraConfig(targets=("proj",)))
    report = apply_lora(model, LoraConfig(targets=(r"re:model\.layers\.0\.self_attn\.(q_a|o)_proj",)))
    assert report.wrapped == ("model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.o_proj")
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    mtp = _model()
    names = apply_lora(mtp, LoraConfig(targets=DEFAULT_TARGETS, mtp=True)).wrapped
    assert "model.mtp.0.self_attn.q_a_proj" in names and "model.mtp.0.mlp.experts" in names


def test_dropout_only_while_training_and_dtype_follows_activation():
    lin = Linear(16, 8, bias=False)
    lora = LoraLinear(lin, rank=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    lora.train()
    torch.manual_seed(0)
    a = lora(x)
    torch.manual_seed(1)
    b = lora(x)
    assert not torch.allclose(a, b)
    lora.eval()
    ref = lin(x) + (x @ lora.lora_A.weight.T) @ lora.lora_B.weight.T
    assert torch.allclose(lora(x), ref, atol=1e-6)
    bf = LoraLinear(Linear(16, 8, bias=False).to(torch.bfloat16), rank=2, alpha=2.0)
    assert bf.lora_A.weight.dtype == torch.float32 and bf(x.bfloat16()).dtype == torch.bfloat16
    # the effective weight, for readers of .weight (the absorbed MLA decode)
    assert torch.allclose(lora.weight, lin.weight + lora.delta_weight(), atol=1e-7)


def _grouped_reference(xs, counts, a, b, scaling):
    """s * (x A_e^T) B_e^T for each expert's rows, one expert at a time."""
    outs, start = [], 0
    for e, m in enumerate(counts.tolist()):
        outs.append(xs[start:start + m] @ a[e].T @ b[e].T * scaling)
        start += m
    return torch.cat(outs)


def test_lora_on_fp8_bases():
    recipe = Fp8Recipe(backend="emulated")
    lin = convert_to_fp8(nn.Sequential(nn.Linear(40, 24, bias=False)), recipe)[0]
    assert isinstance(lin, Fp8Linear)
    lora = LoraLinear(lin, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(5, 40, requires_grad=True)
    y = lora(x)
    assert torch.allclose(y - lin(x), (x @ lora.lora_A.weight.T) @ lora.lora_B.weight.T * 2.0, atol=1e-5)
    y.sum().backward()
    assert lora.lora_A.weight.grad is not None and x.grad is not None

    experts = GroupedExperts(4, 32, 16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    fp8 = Fp8GroupedExperts.from_experts(experts, recipe)
    lx = LoraExperts(fp8, rank=2, alpha=4.0)
    with torch.no_grad():
        lx.lora_B_gate_up.normal_()
        lx.lora_B_down.normal_()
    counts = torch.tensor([3, 0, 5, 2])
    xs = torch.randn(10, 32)
    rows, groups = lx.group(xs, counts)
    assert groups.offs is None  # FP8 experts' own layout
    for which, k in (("gate_up_proj", 32), ("down_proj", 16)):
        inp = xs if k == 32 else torch.randn(10, 16)
        a, b = lx.factors(which)
        got = lx.project(inp, which, groups) - fp8.project(inp, which, groups)
        assert torch.allclose(got, _grouped_reference(inp, counts, a, b, 2.0), atol=1e-5), which
    # the whole MoE path, with gradients for the adapters only
    model = convert_to_fp8(_model(), recipe)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, LoraConfig(rank=2))
    kinds = {type(m.base).__name__ for _, m in lora_modules(model)}
    assert kinds == {"Fp8Linear", "Fp8GroupedExperts"}
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    _perturb(model)
    model.forward_train(_ids(14)).loss.backward()
    assert all(p.grad is not None for _, p in trainable_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


class _FrozenFp8Linear(nn.Module):
    """What a frozen FP8 linear offers LoRA: e4m3 weight and scale as buffers, in/out features, forward,
    dequantize_weight()."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax() / 448
        self.register_buffer("weight_e4m3", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("scale", scale.reshape(1))

    def dequantize_weight(self) -> torch.Tensor:
        return self.weight_e4m3.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype))


class _FrozenFp8Experts(GroupedExperts):
    def __init__(self, experts: GroupedExperts):
        nn.Module.__init__(self)
        self.n_experts, self.intermediate, self._hidden = experts.n_experts, experts.intermediate, experts.hidden
        for which in self.PROJECTIONS:
            w = getattr(experts, which).detach()
            scale = w.abs().amax() / 448
            self.register_buffer(which + "_e4m3", (w / scale).to(torch.float8_e4m3fn))
            self.register_buffer(which + "_scale", scale.reshape(1))

    @property
    def hidden(self) -> int:
        return self._hidden

    def dequantize_weight(self, which: str) -> torch.Tensor:
        return getattr(self, which + "_e4m3").float() * getattr(self, which + "_scale")

    def project(self, xs: torch.Tensor, which: str, groups: ExpertGroups) -> torch.Tensor:
        return grouped_linear(xs, self.dequantize_weight(which).to(xs.dtype), groups)


def test_frozen_fp8_bases_merge_into_plain_float_modules():
    torch.manual_seed(0)
    frozen = _FrozenFp8Linear(torch.randn(24, 40) * 0.1)
    lora = LoraLinear(frozen, rank=3, alpha=3.0)
    assert lora.lora_A.weight.dtype == torch.float32  # not the base's e4m3
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(6, 40)
    with torch.no_grad():
        y = lora(x)
        merged = lora.merged()
    assert type(merged) is Linear and merged.weight.dtype == torch.float32 and not merged.weight.requires_grad
    assert torch.allclose(merged(x), y, atol=1e-5)

    experts = GroupedExperts(4, 32, 16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    lx = LoraExperts(_FrozenFp8Experts(experts), rank=2, alpha=4.0)
    with torch.no_grad():
        lx.lora_B_gate_up.normal_()
        lx.lora_B_down.normal_()
    xt = torch.randn(7, 32)
    indices = torch.randint(0, 4, (7, 2), generator=torch.Generator().manual_seed(3))
    gates = torch.rand(7, 2)
    with torch.no_grad():
        y = lx(xt, indices, gates)
        plain = lx.merged()
        assert type(plain) is GroupedExperts
        assert torch.allclose(plain(xt, indices, gates), y, atol=1e-5)


def test_checkpoint_round_trip_with_our_checkpoint_module(tmp_path):
    model = _model()
    apply_lora(model, LoraConfig(rank=2))
    _perturb(model)
    names = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_a_proj.base.weight", "model.layers.0.self_attn.q_a_proj.lora_A.weight",
            "model.layers.0.self_attn.q_a_proj.lora_B.weight", "model.layers.1.mlp.experts.base.gate_up_proj",
            "model.layers.1.mlp.experts.lora_A_gate_up", "model.layers.1.mlp.experts.lora_B_down"} <= names
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    path = save_checkpoint(tmp_path, 1, model, opt, {"tokens": 0})
    again = _model(seed=7)
    apply_lora(again, LoraConfig(rank=2))
    load_checkpoint(path, again, build_optimizer(again, TrainConfig(lr=1e-3)))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), again.eval()(ids))
