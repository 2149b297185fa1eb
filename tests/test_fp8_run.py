"""How `frugallm train --precision fp8` sets up a run: FP8 GEMMs inside the device's fast high precision.

The training-loss parity figure itself (the `tiny` preset through the real loop for hundreds of steps against
its peer) is benchmarks/fp8_parity.py: at a few minutes per hundred steps on 2 CPU cores it is too long for
this suite, and at the small batches that would fit, two runs drift apart by more than the figure measures.
"""

from __future__ import annotations

import torch

from frugallm.config import preset
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer, resolve_precision


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
