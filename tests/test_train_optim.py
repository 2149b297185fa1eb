"""The optimizer and the memory switches of a run: AdamW with bf16 moments against torch's AdamW, its
checkpoint round trip, the config rules, and the memory estimate a run checks and reports."""

from __future__ import annotations

import io
import json

import pytest
import torch

from frugallm.config import preset
from frugallm.errors import ConfigError, ResourceError
from frugallm.train.config import BF16_MAX_BETA, TrainConfig
from frugallm.train.loop import Trainer
from frugallm.train.metrics import read_metrics
from frugallm.train.optim import AdamWLowPrecisionMoments, build_optimizer
from shapes import MICRO

SHAPES = [(24, 16), (3, 8, 5), (16,)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:  # gradients of very different sizes per tensor, as in a model
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 1, (), generator=g).item()
        opt.step()


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def test_fp32_moments_are_torch_adamw() -> None:
    """With fp32 moments the arithmetic is torch's AdamW (decoupled decay, bias correction, two groups)."""
    ours, ref = _params(), _params()
    _run(AdamWLowPrecisionMoments(_groups(ours), lr=1e-2, betas=(0.9, 0.95), moment_dtype=torch.float32), ours, 30)
    _run(torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False), ref, 30)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_moments_are_stored_in_bf16_and_follow_fp32_adamw() -> None:
    start, ours, ref = _params(), _params(), _params()
    opt = AdamWLowPrecisionMoments(_groups(ours), lr=1e-2, betas=(0.9, 0.95))
    _run(opt, ours, 50)
    _run(torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False), ref, 50)
    for p in ours:
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    # 50 steps of size ~lr move each parameter ~0.1-0.5; bf16 moments (relative step 2^-8) change the
    # path by well under 1% of that
    for s, a, b in zip(start, ours, ref, strict=True):
        moved = (b - s).norm()
        assert moved > 0.05
        assert (a - b).norm() / moved < 1e-2, ((a - b).norm() / moved).item()


def test_bf16_moments_survive_a_checkpoint_round_trip() -> None:
    """torch casts loaded optimizer state to each parameter's dtype; the moments must come back as bf16 or
    a resumed run would go on with fp32 moments and part from the uninterrupted one."""
    full, cut = _params(), _params()
    opt_full = AdamWLowPrecisionMoments(_groups(full), lr=1e-2)
    _run(opt_full, full, 20)
    opt_cut = AdamWLowPrecisionMoments(_groups(cut), lr=1e-2)
    _run(opt_cut, cut, 10)
    buf = io.BytesIO()
    torch.save(opt_cut.state_dict(), buf)
    buf.seek(0)
    resumed = AdamWLowPrecisionMoments(_groups(cut), lr=1e-2)
    resumed.load_state_dict(torch.load(buf))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed.state.values())
    g = torch.Generator().manual_seed(1)  # the gradients of steps 11-20 of the full run
    for _ in range(10):
        for p in cut:
            torch.randn(p.shape, generator=g)
            torch.randint(-4, 1, (), generator=g)
    for _ in range(10):
        for p in cut:
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-4, 1, (), generator=g).item()
        resumed.step()
    for a, b in zip(full, cut, strict=True):
        assert torch.equal(a, b)


def test_bf16_cannot_hold_a_slow_decay() -> None:
    """Why TrainConfig refuses beta >= 1 - 2^-8 with bf16 moments: the decayed moment rounds back to itself."""
    one = torch.ones((), dtype=torch.bfloat16)
    assert (one.float() * 0.999).to(torch.bfloat16) == one  # beta2 = 0.999: never decays
    assert (one.float() * 0.95).to(torch.bfloat16) < one  # DeepSeek-V3's 0.95 does
    assert (one.float() * (BF16_MAX_BETA - 1e-4)).to(torch.bfloat16) < one


def test_optimizer_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="beta2.*0.999"):
        TrainConfig(adam_moments="bf16", beta2=0.999)
    with pytest.raises(ConfigError, match="adam_moments"):
        TrainConfig(adam_moments="fp16")
    with pytest.raises(ConfigError, match="beta1"):
        TrainConfig(beta1=1.0)
    with pytest.raises(ConfigError, match="fp8_saved_activations needs precision"):
        TrainConfig(fp8_saved_activations=True, precision="fp32")
    assert isinstance(build_optimizer(torch.nn.Linear(4, 4), TrainConfig(adam_moments="bf16")),
                      AdamWLowPrecisionMoments)
    assert isinstance(build_optimizer(torch.nn.Linear(4, 4), TrainConfig()), torch.optim.AdamW)


def test_the_memory_estimate_follows_the_switches(tmp_path) -> None:
    def estimate(**kw) -> dict[str, int]:
        cfg = TrainConfig(device="cpu", max_steps=1, batch_size=8, seq_len=128, **kw)
        return Trainer(preset("tiny"), cfg, tmp_path / "r", progress=False).memory_estimate

    fp32, bf16 = estimate(precision="fp32"), estimate(precision="fp32", adam_moments="bf16")
    assert bf16["optimizer"] * 2 == fp32["optimizer"] and bf16["total"] < fp32["total"]
    fp8, fp8_saved = estimate(precision="fp8"), estimate(precision="fp8", fp8_saved_activations=True)
    assert fp8_saved["activations"] < fp8["activations"]
    assert fp8["step_buffers"] != fp32["step_buffers"]  # e4m3 weight copies instead of fused gate/up weights
    # a run that cannot fit is refused before it reads any data, naming the parts
    with pytest.raises(ResourceError, match="activations"):
        Trainer(preset("tiny"), TrainConfig(device="cpu", max_steps=1, batch_size=1 << 16, seq_len=1024),
                tmp_path / "huge", progress=False)


def test_resume_with_bf16_moments_and_fp8_saved_inputs_reproduces_the_run(corpus_dir, tmp_path) -> None:
    def cfg(**kw) -> TrainConfig:
        return TrainConfig(data=[str(corpus_dir)], seq_len=32, batch_size=4, precision="fp8", max_steps=8,
                           time_budget_s=None, warmup_steps=2, log_every=1, eval_every_s=1e9,
                           checkpoint_every_s=1e9, eval_windows=4, val_fraction=0.05, adam_moments="bf16",
                           fp8_saved_activations=True, fp8_backend="emulated", device="cpu", **kw)

    Trainer(MICRO, cfg(), tmp_path / "full", progress=False).run()
    Trainer(MICRO, cfg(), tmp_path / "cut", progress=False).run(stop_after_step=4)
    Trainer(MICRO, cfg(), tmp_path / "cut", resume=True, progress=False).run()
    a, b = ([r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("full", "cut"))
    assert len(a) == len(b) == 8 and a == b, (a, b)
    cost = json.loads((tmp_path / "full" / "cost.json").read_text())
    assert cost["memory_estimate"]["total"] > 0 and cost["memory_peak_bytes"] > 0
