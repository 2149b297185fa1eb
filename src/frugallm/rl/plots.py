"""``reward.png`` of an RL run: the rollouts' mean reward per step and the held-out greedy accuracy."""

from __future__ import annotations

from pathlib import Path

from frugallm import fsio
from frugallm.train.metrics import read_metrics


def write_reward_plot(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "heldout_accuracy" in r]
    before = next((r for r in records if "heldout_accuracy_before" in r), None)
    if not steps and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label="rollout reward (mean)",
                alpha=0.8)
    points = ([(0, before["heldout_accuracy_before"])] if before else []) + \
        [(r["step"], r["heldout_accuracy"]) for r in evals]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="held-out greedy accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "reward.png"
    with fsio.atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out
