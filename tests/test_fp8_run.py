"""How `frugallm train --precision fp8` sets up a run, and the training-loss parity figure at a size this suite
affords.

The issue's figure (the `tiny` preset, hundreds of steps, the mean relative loss difference over the last 50
steps below 0.25%) is benchmarks/fp8_parity.py at batch 32 x 256 over four seeds: about 3.5 hours on 2 CPU
cores. At the batches a test can afford, two runs drift apart by about 1% from any rounding-sized change, so
the test here holds FP8 to that drift, measured in the same test by a control run.
"""

from __future__ import annotations

import torch

from frugallm.config import preset
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer, resolve_precision
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


def test_fp8_training_tracks_its_peer_within_a_rounding_control_over_200_steps(tmp_path) -> None:
    """200 AdamW steps of a shrunk `tiny` (MLA, MoE with its bias updates, MTP) on real text, through the
    benchmark's builtin loop: the peer precision, FP8 (emulated), and the peer again from initial weights
    perturbed by 2^-9. FP8's drift from the peer over the last 50 steps must stay within twice the control's
    (measured here: FP8 0.91%, control 1.58%, bf16 peer on an AVX-512 EPYC), and both runs must learn. A wrong
    scale or a dropped gradient in any of the three FP8 GEMMs moves the loss by far more."""
    import argparse

    bench = _bench()
    peer = resolve_precision("auto", torch.device("cpu"))
    cfg = preset("tiny").replace(**FP8_SHRUNK_TINY)
    args = argparse.Namespace(seed=0, backend="emulated", peer=peer, lr=3e-3, batch_size=8, seq_len=64, steps=200,
                              preset="tiny")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(2, threads))
        runs = {name: bench.run_builtin(prec, args, tmp_path / name, perturb=perturb, cfg=cfg)
                for name, prec, perturb in (("peer", peer, 0.0), ("fp8", "fp8", 0.0), ("control", peer, 2**-9))}
    finally:
        torch.set_num_threads(threads)
    fp8 = bench.compare(runs["peer"], runs["fp8"], window=50)
    control = bench.compare(runs["peer"], runs["control"], window=50)
    print(f"\nlast 50 of 200 steps, against {peer}: fp8 {100 * fp8.mean_rel:.3f}% "
          f"(difference of the means {100 * fp8.diff_of_means:.3f}%), control {100 * control.mean_rel:.3f}% "
          f"({100 * control.diff_of_means:.3f}%); loss {runs['peer'][1]:.3f} -> {fp8.peer_mean:.3f} ({peer}), "
          f"{fp8.other_mean:.3f} (fp8)")
    assert fp8.other_mean < 0.6 * runs["fp8"][1] and fp8.peer_mean < 0.6 * runs["peer"][1], "both runs learn"
    assert fp8.mean_rel < 2 * control.mean_rel, "FP8 drifts further from its peer than a rounding-sized change"
    assert fp8.mean_rel < 0.03
