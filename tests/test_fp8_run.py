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
