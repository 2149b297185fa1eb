"""Run metrics: ``metrics.jsonl`` (one JSON record per line, appended and flushed), TensorBoard event
files under ``tb/``, and, at the end, PNG plots of the loss curves and of the per-layer expert load.

Training records carry at least ``step``, ``loss`` (main next-token loss), ``tokens``, ``tokens_per_s`` and
``lr``; validation records carry ``val_loss`` and ``val_bpb``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from frugallm import fsio


def load_stats(loads: torch.Tensor) -> dict[str, Any]:
    """loads [n_moe_layers, E] -> per-layer max/mean load and experts that got no token."""
    loads = loads.float()
    mean = loads.mean(dim=1).clamp(min=1e-9)
    return {"load_max_over_mean": [round(v, 4) for v in (loads.max(dim=1).values / mean).tolist()],
            "dead_experts": (loads == 0).sum(dim=1).tolist()}


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file = open(self.path, "a", buffering=1) if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but a trimmed install still trains
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    return out


def write_plots(run_dir: Path) -> list[Path]:
    """loss.png (train main/MTP loss and validation loss by step) and expert_load.png (heatmap of each MoE
    layer's max/mean load over training). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (main)")
        if any("mtp_loss" in r for r in train):
            ax.plot([r["step"] for r in train if "mtp_loss" in r],
                    [r["mtp_loss"] for r in train if "mtp_loss" in r], label="train (MTP)", alpha=0.7)
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with fsio.atomic_path(run_dir / "loss.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(run_dir / "loss.png")
    with_load = [r for r in train if "load_max_over_mean" in r]
    if with_load:
        grid = torch.tensor([r["load_max_over_mean"] for r in with_load]).T  # [layers, records]
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * grid.shape[0]))
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest",
                       # half a step either side: a run with one record still spans a width
                       extent=(with_load[0]["step"] - 0.5, with_load[-1]["step"] + 0.5, grid.shape[0] - 0.5, -0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("MoE layer")
        ax.set_title("expert load: max / mean (1 = balanced)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        with fsio.atomic_path(run_dir / "expert_load.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
        written.append(run_dir / "expert_load.png")
    return written
