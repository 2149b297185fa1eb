"""How `frugallm train --precision fp8` sets up a run, and the training-loss parity figure at a size this suite
affords.

The issue's figure (the `tiny` preset, hundreds of steps, the mean relative loss difference over the last 50
steps below 0.25%) is benchmarks/fp8_parity.py at batch 32 x 256 over four seeds: about 3.5 hours on 2 CPU
cores. At the batches a test can afford, two runs drift apart by about 1% from any rounding-sized change, so
the test here holds FP8 to that drift, measured in the same test on four runs in the peer precision.
"""

from __future__ import annotations

import torch

from frugallm.config import preset
from frugallm.train.config import TrainConfig
from frugallm.train.device import resolve_precision
from frugallm.train.loop import Trainer
from shapes import FP8_SHRUNK_TINY


def test_fp8_run_keeps_the_peer_precision_outside_its_gemms(tmp_path) -> None:
    peer = resolve_precision("auto", torch.device("cpu"))
    trainer = Trainer(preset("tiny"), TrainConfig(precision="fp8", device="cpu", max_steps=1), tmp_path / "run",
                      progress=False)
    assert trainer.amp_dtype == (torch.bfloat16 if peer == "bf16" else None)
    assert trainer.outer_precision == peer
    assert trainer.precision_label == f"fp8 (FP8 GEMMs, {peer} elsewhere)"
    fp32 = Trainer(preset("tiny"), TrainConfig(precision="fp32", device="cpu", max_steps=1), tmp_path / "run2",
                   progress=False)
    assert fp32.amp_dtype is None and fp32.precision_label == "fp32"


def test_parity_benchmark_reuses_only_a_matching_finished_run(tmp_path, capsys) -> None:
    """`fp8_parity.py --reuse` re-reads a finished run instead of training it again, and only when its
    config.toml is the one this command would write: another batch size, or too few steps, trains again."""
    import argparse
    import json

    from frugallm.train.runconfig import write_run_config

    bench = _bench()
    run = tmp_path / "fp8"
    run.mkdir()
    write_run_config(run / "config.toml", preset("tiny"),
                     TrainConfig(precision="fp8", seed=0, max_steps=3, batch_size=8, seq_len=64))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0 - s}) + "\n" for s in (1, 2, 3))
                                       + json.dumps({"step": 3, "val_loss": 7.0}) + "\n")
    args = argparse.Namespace(reuse=True, preset="tiny", seed=0, steps=3, batch_size=8, seq_len=64, threads=None,
                              lr=None)
    assert bench.reusable("fp8", args, run) == {1: 8.0, 2: 7.0, 3: 6.0}
    assert bench.reusable("fp32", args, run) is None  # another precision
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "batch_size": 16}), run) is None
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "steps": 4}), run) is None
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "preset": "tiny-dense"}), run) is None
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "reuse": False}), run) is None
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "lr": 1e-3}), run) is None  # default 3e-3
    assert bench.reusable("fp8", argparse.Namespace(**{**vars(args), "lr": 3e-3}), run) is not None
    out = capsys.readouterr().out
    assert "batch_size=8 (want 16)" in out and "3 of 4 steps logged" in out
    (run / "config.toml").write_text("[train\n")  # a damaged config: named, then it trains again
    assert bench.reusable("fp8", args, run) is None
    assert "config.toml is unreadable" in capsys.readouterr().out


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_parity.py"
    spec = importlib.util.spec_from_file_location("fp8_parity_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_parity_figures_per_seed_and_on_seed_averaged_curves() -> None:
    """The window figure is the mean per-step |other - peer| / peer; averaging seeds whose differences have
    opposite signs cancels them in the averaged curves' figure, not in the per-seed ones."""
    import argparse

    import pytest

    bench = _bench()
    peer = {s: 4.0 for s in range(1, 11)}
    up = {s: 4.0 * (1.01 if s > 5 else 1.0) for s in range(1, 11)}  # +1% over the last 5 steps
    down = {s: 4.0 * (0.99 if s > 5 else 1.0) for s in range(1, 12)}  # -1%, and one step more
    c = bench.compare(peer, up, window=5)
    assert c.steps == list(range(1, 11)) and c.mean_rel == pytest.approx(0.01)
    assert c.diff_of_means == pytest.approx(0.01) and c.blocks(5) == "1-5: +0.00  6-10: +1.00"
    assert bench.compare(peer, up, window=10).mean_rel == pytest.approx(0.005)
    avg = bench.mean_curve([up, down])
    assert sorted(avg) == list(range(1, 11))  # only the steps every seed logged
    assert bench.compare(peer, avg, window=5).mean_rel == pytest.approx(0.0)
    with pytest.raises(SystemExit, match="need at least --window 20"):
        bench.compare(peer, up, window=20)
    ns = argparse.Namespace
    assert bench.control_kind(ns(control=None, loop="cli", peer="bf16")) is None
    assert bench.control_kind(ns(control="auto", loop="cli", peer="bf16")) == "fp32"
    assert bench.control_kind(ns(control="auto", loop="cli", peer="fp32")) == "threads"
    assert bench.control_kind(ns(control="threads", loop="builtin", peer="bf16")) == "perturb"


def test_fp8_training_stays_within_its_peers_rounding_spread_over_200_steps(tmp_path) -> None:
    """200 AdamW steps of a shrunk `tiny` (MLA, MoE with its bias updates, MTP) on real text, through the
    benchmark's builtin loop. Four runs in the peer precision, one from the seed's initial weights and three
    from those weights perturbed by 2^-9 (each with its own noise), show how far rounding-sized changes alone
    move a run at this scale: the spread is each member's mean relative loss difference, over the last 50
    steps, from the mean curve of the other three, averaged over the members. FP8 (emulated, from the
    unperturbed weights) against the same four leave-one-out means must stay within 2.5x that spread, and
    every run must learn.

    Measured on an Intel Xeon with AMX (bf16 peer): FP8 0.72% against a spread of 0.75% (0.96x) for seed 0
    (this test). With the emulation's float32 products on oneDNN instead of MKL, which changes only their
    summation order, FP8 was 1.22% (1.6x) for seed 0 and 1.70% against 0.99% (1.7x) for seed 1. Runs that
    round differently at every step land above the spread, which comes from one perturbation at the start:
    fp32 against the same means was 0.71% (0.9x) and 1.47% (1.5x), and e4m3 rounds every GEMM operand to
    3 mantissa bits. One peer against one control, the test's earlier form, was too noisy a yardstick: FP8
    1.84% against a control of 0.57% on that Xeon, 0.91% against 1.58% on an AMD EPYC. A wrong scale fails by far (the input gradient doubled: 26%). A dropped gradient
    is for tests/test_fp8_linear.py's gradient checks: with the routed experts' weight gradient dropped this
    figure only rose to 1.7%, since the shared experts and the dense layer learn in their place."""
    import argparse

    bench = _bench()
    peer = resolve_precision("auto", torch.device("cpu"))
    cfg = preset("tiny").replace(**FP8_SHRUNK_TINY)
    args = argparse.Namespace(seed=0, backend="emulated", peer=peer, lr=3e-3, batch_size=8, seq_len=64, steps=200,
                              preset="tiny")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(2, threads))
        members = [bench.run_builtin(peer, args, tmp_path / f"peer{k}", perturb=2**-9 if k else 0.0, cfg=cfg,
                                     perturb_seed=k) for k in range(4)]
        fp8 = bench.run_builtin("fp8", args, tmp_path / "fp8", cfg=cfg)
    finally:
        torch.set_num_threads(threads)
    first = [m[1] for m in members] + [fp8[1]]
    spread, drift = [], []
    for k, member in enumerate(members):
        others = bench.mean_curve([m for j, m in enumerate(members) if j != k])
        spread.append(bench.compare(others, member, window=50))
        drift.append(bench.compare(others, fp8, window=50))
    spread_pct = 100 * sum(c.mean_rel for c in spread) / len(spread)
    drift_pct = 100 * sum(c.mean_rel for c in drift) / len(drift)
    print(f"\nlast 50 of 200 steps, against the leave-one-out means of four {peer} runs: fp8 {drift_pct:.3f}%, "
          f"the {peer} runs' spread {spread_pct:.3f}% ({drift_pct / spread_pct:.2f}x); last-50 mean loss "
          f"{drift[0].other_mean:.3f} (fp8), " + ", ".join(f"{c.other_mean:.3f}" for c in spread) + f" ({peer})")
    last = [c.other_mean for c in spread] + [drift[0].other_mean]
    assert all(end < 0.6 * start for start, end in zip(first, last, strict=True)), "every run learns"
    assert drift_pct < 2.5 * spread_pct, "FP8 drifts further from its peers than rounding-sized changes explain"
    assert drift_pct < 3.0
