"""The golden loss curve: 30 steps of the real training loop (``Trainer``: data preparation, tokenizer, loader,
AdamW, warmup-stable-decay, MTP and balancing) on ``shapes.MICRO`` from a fixed seed, whose per-step losses
``tests/data/golden_loss.json`` holds with the configuration that produced them. A change that moves the
numerics of training (an init, the optimizer, the loss, the router, the data order) fails it.

The run is in float64, so the curve does not depend on the host. Hosts differ between sessions (AMD EPYC with
AVX2 or AVX-512, Intel Xeon with AMX), and float32 GEMMs go to MKL or oneDNN by vendor and by
the kernel policy (``FRUGALLM_KERNELS=gemm=...``); their roundings differ at about 1e-7 relative and a few dozen steps amplify that. In
float64 those differences are about 1e-16; what stays float32 by design (the router's logits, RoPE's angles)
rounds identically wherever IEEE float32 is. ``TOLERANCE`` is set from measured spreads (below it).

Regenerating is a deliberate act, for a change meant to move the numerics, said so in its commit:

    PYTHONPATH=src python tests/test_train_golden.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from corpus import write_corpus
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer
from frugallm.train.metrics import read_metrics
from shapes import MICRO

GOLDEN = Path(__file__).with_name("data") / "golden_loss.json"
TRAIN = dict(seq_len=32, batch_size=4, max_steps=30, time_budget_s=None, seed=0, lr=3e-3, warmup_steps=2,
             precision="fp32", log_every=1, eval_every_s=1e9, checkpoint_every_s=1e9, val_fraction=0.05)
# The loop records each loss as a float32 (its step sums are float32), one unit in the last place (ulp) being
# 2.4e-7 to 4.8e-7 at these losses (2 to 8). Measured here (EPYC, AVX-512) between processes: float64 runs with
# MKL against oneDNN float32 GEMMs and 1 against 2 threads differ by 0 in every step; float32 runs by 1 ulp.
# The tolerance allows 2 ulps, so a float64 difference that flips a rounding passes, while a learning rate
# 1e-5 (relative) off moves the curve by 2e-5, twenty times over it.
TOLERANCE = 1e-6


class Float64Trainer(Trainer):
    """The loop unchanged, its model in float64 (the model supports it; ``precision`` offers no such option)."""

    def _build(self):  # type: ignore[no-untyped-def]
        return super()._build().to(torch.float64)


def config() -> dict:
    return {"model": MICRO.to_dict(), "train": TRAIN, "dtype": "float64", "corpus": "corpus.write_corpus()"}


def run(workdir: Path) -> list[float]:
    corpus = write_corpus(workdir / "corpus")
    cfg = TrainConfig(data=[str(corpus)], **TRAIN)
    Float64Trainer(MICRO, cfg, workdir / "run", progress=False).run()
    return [r["loss"] for r in read_metrics(workdir / "run") if "loss" in r]


def test_the_loss_curve_matches_the_golden_one(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == json.loads(json.dumps(config())), \
        "the golden run's configuration changed: regenerate it deliberately (see the module docstring)"
    losses = run(tmp_path)
    want = golden["losses"]
    assert len(losses) == len(want) == TRAIN["max_steps"]
    worst = max(range(len(want)), key=lambda i: abs(losses[i] - want[i]))
    assert abs(losses[worst] - want[worst]) <= TOLERANCE, \
        f"step {worst + 1}: loss {losses[worst]!r}, golden {want[worst]!r} (tolerance {TOLERANCE})"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: PYTHONPATH=src python {sys.argv[0]} --write  (rewrites {GOLDEN})")
    with tempfile.TemporaryDirectory() as d:
        curve = run(Path(d))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"config": config(), "losses": curve}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(curve)} losses, {curve[0]:.6f} -> {curve[-1]:.6f}")
