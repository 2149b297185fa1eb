"""Running a lab: every (arm, seed) a normal run directory ``DIR/arms/ARM-seedN`` trained by the one
training loop (``frugallm.train.loop.Trainer``), all on the same data, tokenizer, held-out split and token
horizon. A finished arm (its ``cost.json`` written) is skipped; an interrupted one resumes from its newest
checkpoint, so a lab started again finishes what is left and reproduces the uninterrupted figures.

The horizon: ``plan`` splits the budget's seconds over the runs by the cost model, assuming the achieved rate
``rate_flops`` (FLOP/s; measured by the first run and written to ``DIR/plan.json`` so that a restarted lab keeps
the same horizon). Every arm trains the same number of tokens (equal tokens); equal-FLOPs figures are read
off each arm's loss curve at the base's FLOPs (``report``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.errors import ConfigError
from frugallm.lab.claims import ARMS, Claim, arm_costs, base_model
from frugallm.train.config import TrainConfig


@dataclass(frozen=True, kw_only=True)
class LabPlan:
    arms: tuple[str, ...]
    seeds: int
    tokens: int  # training tokens of every arm
    seq_len: int
    batch_size: int
    budget_s: float

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be a positive integer, got {self.seeds}")
        if self.tokens < self.seq_len * self.batch_size:
            raise ConfigError(f"the budget gives {self.tokens} tokens per arm, under one step; raise --budget")


def needed_arms(claims: list[Claim]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a for c in claims for a in c.arms))


def make_plan(claims: list[Claim], *, seeds: int, budget_s: float, base: ModelConfig | None = None,
              seq_len: int = 256, batch_size: int = 16, rate_flops: float = 2e11, overhead_s: float = 15.0) -> LabPlan:
    """Tokens per arm so that all runs fit ``budget_s`` at ``rate_flops`` achieved, ``overhead_s`` per run for
    start-up and the final evaluation. The default rate is about what the mtp-off arm of ``tiny`` achieved in
    bf16 on the idle 2-core AMD EPYC (6.6k tokens/s at 28 MFLOP per token = 0.19 TFLOP/s, 2026-12-04); with
    another process on the cores it fell to 0.03. An assumption, not a probe of this machine."""
    arms = needed_arms(claims)
    costs = arm_costs(base or base_model(), seq_len)
    flops_per_token = sum(costs[a]["train_flops_per_token"] for a in arms) * seeds
    train_s = budget_s - overhead_s * len(arms) * seeds
    if train_s <= 0:
        raise ConfigError(f"--budget {budget_s:g}s leaves no training time for {len(arms) * seeds} runs "
                          f"(about {overhead_s:g} s each to start and evaluate); raise --budget or name fewer claims")
    step = seq_len * batch_size
    tokens = max(step, int(train_s * rate_flops / flops_per_token) // step * step)
    return LabPlan(arms=arms, seeds=seeds, tokens=tokens, seq_len=seq_len, batch_size=batch_size, budget_s=budget_s)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """Siblings under ``DIR/arms``, so that they share the training loop's token cache (``arms/.cache``)."""
    return out / "arms" / f"{arm}-seed{seed}"


def is_finished(path: Path) -> bool:
    return (path / "cost.json").is_file()


def train_config(plan: LabPlan, arm: str, seed: int, data: list[str] | None, tokenizer: str | None,
                 extra: dict[str, Any] | None = None) -> TrainConfig:
    base = dict(data=data, tokenizer=tokenizer, seq_len=plan.seq_len, batch_size=plan.batch_size,
                max_tokens=plan.tokens, time_budget_s=None, seed=seed, log_every=5, eval_every_s=1e9,
                checkpoint_every_s=60.0, warmup_steps=min(50, max(1, plan.tokens // (plan.seq_len * plan.batch_size)
                                                                     // 10)))
    base.update(extra or {})
    base.update(ARMS[arm].train)
    return TrainConfig(**base)


def run_lab(plan: LabPlan, out: Path, *, base: ModelConfig | None = None, data: list[str] | None = None,
            curated_data: list[str] | None = None, train_overrides: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
            stop_after_runs: int | None = None) -> list[Path]:
    """Train every (arm, seed) of the plan not finished yet; the run directories in plan order.
    ``base``: the base model (default ``tiny``; the tests' miniature lab shrinks it); ``stop_after_runs``:
    return after training that many (tests interrupt a lab with it)."""
    from frugallm.train.loop import Trainer

    out.mkdir(parents=True, exist_ok=True)
    fsio.write_text(out / "plan.json", json.dumps(plan.__dict__, indent=1))
    runs = [(a, s) for s in range(plan.seeds) for a in plan.arms]
    tokenizer = None
    dirs, trained, t0 = [], 0, time.perf_counter()
    for i, (arm, seed) in enumerate(runs):
        path = run_dir(out, arm, seed)
        dirs.append(path)
        if tokenizer is None and is_finished(run_dir(out, plan.arms[0], 0)):
            tokenizer = str(run_dir(out, plan.arms[0], 0) / "tokenizer.json")
        if is_finished(path):
            continue
        if stop_after_runs is not None and trained >= stop_after_runs:
            break
        left = plan.budget_s - (time.perf_counter() - t0)
        if progress:
            progress(f"[{i + 1}/{len(runs)}] arm {arm} seed {seed}: {plan.tokens:,} tokens; "
                     f"{max(0.0, left):.0f} s left in the budget")
        arm_data = curated_data if ARMS[arm].curated else data
        if ARMS[arm].curated and not curated_data:
            raise ConfigError("the curation claim needs a curated corpus (runner: curated_data)")
        cfg = train_config(plan, arm, seed, arm_data, tokenizer, train_overrides)
        resume = (path / "config.toml").is_file() and (path / "checkpoints").is_dir()
        result = Trainer(ARMS[arm].model_config(base or base_model()), cfg, path, resume=resume,
                         progress=False).run()
        if result.interrupted:  # Ctrl-C or SIGTERM: the arm is checkpointed, and the lab stops with it
            if progress:
                progress(f"interrupted in arm {arm} seed {seed}; run the same command again to resume")
            return dirs
        trained += 1
        if tokenizer is None:  # the first run's tokenizer is every later run's
            tokenizer = str(path / "tokenizer.json")
    return dirs



SERVED = {"mla-vs-mha": False, "mtp": True}  # claims measured through the engine: with speculative decoding


def measure_serving(plan: LabPlan, out: Path, claims: list[Claim], *, context: int = 512, new_tokens: int = 32,
                    progress: Callable[[str], None] | None = None) -> None:
    """Decode figures (``lab.serving``) of seed 0 of every arm of the claims that serve; cached per arm."""
    from frugallm.lab.serving import held_out_prompt, measure

    prompt: list[int] | None = None
    for claim in claims:
        if claim.name not in SERVED:
            continue
        for arm in claim.arms:
            path = run_dir(out, arm, 0)
            if not is_finished(path):
                continue
            if prompt is None:
                prompt = held_out_prompt(path, context)
            if progress:
                progress(f"decoding with {arm} ({len(prompt)}-token context) through the serving engine")
            measure(path, prompt, new_tokens=new_tokens, speculative=SERVED[claim.name])
