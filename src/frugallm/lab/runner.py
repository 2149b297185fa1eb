"""Running a lab: every (arm, seed) a normal run directory ``DIR/arms/ARM-seedN`` trained by the one
training loop (``frugallm.train.loop.Trainer``), all on the same data, tokenizer, held-out split and token
horizon. A finished arm (its ``cost.json`` written) is skipped; an interrupted one resumes from its newest
checkpoint, so a lab started again finishes what is left and reproduces the uninterrupted figures.

Two matchings, both trained:
- equal tokens: every arm trains ``plan.tokens``;
- equal FLOPs: an arm whose training FLOPs per token (the cost model's) differ from the base's by more than
  ``FLOPS_TOLERANCE`` also trains a twin ``DIR/arms/ARM@flops-seedN`` on ``plan.tokens * base / arm`` tokens,
  with its own learning-rate schedule, so both runs end their schedules at the FLOPs the base spent. Within
  the tolerance the equal-tokens run is the equal-FLOPs run.

The horizon: ``probe`` times a few training steps of every distinct arm on this machine (tokens per second,
and the start-up plus full evaluation seconds of a run), and ``make_plan`` picks the token horizon at which
all runs fit the budget at those rates. The plan is written to ``DIR/plan.json`` before any arm trains, so
that a restarted lab keeps the same horizon without probing again.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.errors import ConfigError
from frugallm.lab.claims import ARMS, Claim, arm_costs, base_model
from frugallm.train.config import TrainConfig

SERVED = {"mla-vs-mha": False, "mtp": True}  # claims measured through the engine: with speculative decoding
SERVING_S = 5.0  # seconds set aside per served arm for its decode measurement (an allowance, not a probe)
FLOPS_TOLERANCE = 0.05  # relative FLOPs-per-token difference under which equal tokens is equal FLOPs
TWIN = "@flops"  # the suffix of an equal-FLOPs twin's arm name


@dataclass(frozen=True, kw_only=True)
class LabPlan:
    arms: tuple[str, ...]  # equal-token arms, then the equal-FLOPs twins (``ARM@flops``)
    seeds: int
    tokens: int  # training tokens of every equal-token arm
    seq_len: int
    batch_size: int
    budget_s: float
    twin_tokens: dict[str, int] = field(default_factory=dict)  # ARM@flops -> its tokens
    rates: dict[str, float] = field(default_factory=dict)  # arm -> probed training tokens/s (empty: assumed)
    overhead_s: float = 15.0  # start-up and final evaluation of one run
    reserved_s: float = 0.0  # the budget's seconds outside training: probe, curation, decode measurements
    base: dict[str, Any] = field(default_factory=dict)  # the base arm's ModelConfig (empty: the tiny preset)
    nproc: int = 1  # processes training each run (torch's elastic launcher when above 1)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be a positive integer, got {self.seeds}")
        if self.tokens < self.seq_len * self.batch_size:
            raise ConfigError(f"the budget gives {self.tokens} tokens per arm, under one step; raise --budget")
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be a positive integer, got {self.nproc}")
        if self.batch_size % self.nproc:
            raise ConfigError(f"--batch-size {self.batch_size} must divide by --nproc {self.nproc} (the batch is "
                              "global, split over the processes)")

    def base_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.base) if self.base else base_model()

    def tokens_of(self, arm: str) -> int:
        return self.twin_tokens.get(arm, self.tokens)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.__dict__))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabPlan:
        return cls(**{**d, "arms": tuple(d["arms"])})


def arm_of(run_arm: str) -> str:
    """The arm an (equal-FLOPs twin) run trains: ``dense-total@flops`` -> ``dense-total``."""
    return run_arm.removesuffix(TWIN)


def needed_arms(claims: list[Claim]) -> tuple[str, ...]:
    """The claims' arms, each once; the curated arms last, since they reuse an earlier run's tokenizer."""
    arms = list(dict.fromkeys(a for c in claims for a in c.arms))
    return tuple(sorted(arms, key=lambda a: ARMS[a].curated))


def flops_twins(claims: list[Claim], base: ModelConfig, seq_len: int) -> dict[str, float]:
    """Arm -> the ratio (its claim's head arm's FLOPs per token) / (its own), for arms outside the tolerance."""
    costs = arm_costs(base, seq_len)
    twins: dict[str, float] = {}
    for c in claims:
        head = costs[c.arms[0]]["train_flops_per_token"]
        for a in c.arms[1:]:
            ratio = head / costs[a]["train_flops_per_token"]
            if abs(ratio - 1) > FLOPS_TOLERANCE:
                twins[a] = ratio
    return twins


def make_plan(claims: list[Claim], *, seeds: int, budget_s: float, base: ModelConfig | None = None,
              seq_len: int = 256, batch_size: int = 16, rates: dict[str, float] | None = None,
              overhead_s: float = 15.0, reserved_s: float = 0.0, assumed_flops_per_s: float = 2e11,
              nproc: int = 1) -> LabPlan:
    """The token horizon at which every run (equal-token arms and equal-FLOPs twins, all seeds) fits
    ``budget_s``: each arm at its probed ``rates`` (training tokens per second), plus ``overhead_s`` per run,
    less ``reserved_s`` (the probe and curation already spent, the serving measurements to come).
    Without ``rates`` every arm is assumed to achieve ``assumed_flops_per_s`` (0.2 TFLOP/s is about what
    ``tiny`` trained at in bf16 on an idle 2-core AMD EPYC, 2026-12-04)."""
    base = base or base_model()
    arms = needed_arms(claims)
    costs = arm_costs(base, seq_len)
    twins = flops_twins(claims, base, seq_len)
    rates = dict(rates or {})

    def seconds_per_token(arm: str) -> float:
        if arm in rates:
            return 1.0 / rates[arm]
        return costs[arm]["train_flops_per_token"] / assumed_flops_per_s

    # seconds for one token of horizon, over every run: an arm trains T tokens, its twin T * ratio
    per_token = sum(seconds_per_token(a) for a in arms) + sum(seconds_per_token(a) * r for a, r in twins.items())
    runs = len(arms) + len(twins)
    train_s = budget_s - reserved_s - overhead_s * runs * seeds
    if train_s <= 0:
        raise ConfigError(f"--budget {budget_s:g}s leaves no training time for {runs * seeds} runs "
                          f"(about {overhead_s:.0f} s each to start and evaluate, {reserved_s:.0f} s to probe, "
                          "curate and measure decoding); raise --budget or name fewer claims")
    step = seq_len * batch_size
    tokens = max(step, int(train_s / (per_token * seeds)) // step * step)
    twin_tokens = {a + TWIN: max(step, round(tokens * r / step) * step) for a, r in twins.items()}
    return LabPlan(arms=arms + tuple(twin_tokens), seeds=seeds, tokens=tokens, seq_len=seq_len,
                   batch_size=batch_size, budget_s=budget_s, twin_tokens=twin_tokens,
                   rates={a: round(r, 1) for a, r in rates.items()}, overhead_s=round(overhead_s, 1),
                   reserved_s=round(reserved_s, 1), base=base.to_dict(), nproc=nproc)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """Siblings under ``DIR/arms``, so that they share the training loop's token cache (``arms/.cache``)."""
    return out / "arms" / f"{arm}-seed{seed}"


def is_finished(path: Path) -> bool:
    return (path / "cost.json").is_file()


def train_config(plan: LabPlan, arm: str, seed: int, data: list[str] | None, tokenizer: str | None,
                 extra: dict[str, Any] | None = None, tokens: int | None = None) -> TrainConfig:
    tokens = tokens or plan.tokens_of(arm)
    steps = tokens // (plan.seq_len * plan.batch_size)
    base = dict(data=data, tokenizer=tokenizer, seq_len=plan.seq_len, batch_size=plan.batch_size,
                max_tokens=tokens, time_budget_s=None, seed=seed, log_every=5, eval_every_s=1e9,
                checkpoint_every_s=60.0, warmup_steps=min(50, max(1, steps // 10)))
    base.update(extra or {})
    base.update(ARMS[arm_of(arm)].train)
    return TrainConfig(**base)


def train_run(model_cfg: ModelConfig, cfg: TrainConfig, path: Path, *, resume: bool, nproc: int = 1,
              label: str | None = None, deadline: float | None = None) -> bool:
    """Train one run to its horizon; True when it was interrupted (Ctrl-C, SIGTERM) and checkpointed.
    ``label``/``deadline``: the training loop's live progress line (None: no line). With ``nproc`` above 1 the
    run is ``frugallm train`` under torch's elastic launcher on this machine (data parallel over the
    processes, the same global batch), from a config the lab writes to ``arms/.launch``."""
    if nproc <= 1:
        from frugallm.train.loop import Trainer

        return Trainer(model_cfg, cfg, path, resume=resume, progress=label is not None, progress_label=label,
                       deadline=deadline).run().interrupted
    import os
    import subprocess

    from frugallm.errors import FrugalError
    from frugallm.train.cli import PROGRESS_DEADLINE_ENV, PROGRESS_LABEL_ENV, launcher_command
    from frugallm.train.runconfig import write_run_config

    if resume:
        argv = ["train", "--resume", str(path)]
    else:
        conf = path.parent / ".launch" / f"{path.name}.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        write_run_config(conf, model_cfg, cfg)
        argv = ["train", "--config", str(conf), "--out", str(path)]
    env = dict(os.environ)
    if label:  # the launched run's live line, labelled and counting down as the lab's own would
        env[PROGRESS_LABEL_ENV] = label
        if deadline is not None:
            env[PROGRESS_DEADLINE_ENV] = repr(deadline)
    proc = subprocess.Popen(launcher_command(nproc, argv + ([] if label else ["--no-progress"])), env=env)
    interrupted = False
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the launcher's processes got the same signal and checkpoint: wait for them
            interrupted = True
    if is_finished(path):
        return False
    if interrupted or rc in (0, -2, 130):  # 0 unfinished: the run stopped on a signal and checkpointed
        return True
    raise FrugalError(f"the run {path} failed under torch's launcher (exit code {rc}); its error is above. "
                      "Run the same lab command again to resume it")


# ----- the probe ----------------------------------------------------------------------------------------
PROBE_STEPS = 4  # the first step is not timed (allocation, kernel choice)


def probe_groups(arms: tuple[str, ...]) -> dict[str, str]:
    """Arm -> the arm whose probe stands for it: arms with the base's model and precision share its rate
    (balancing and curation change the loss or the data, not the step's work)."""
    out = {}
    for a in dict.fromkeys(arm_of(x) for x in arms):
        arm = ARMS[a]
        same_step = not arm.model and arm.train.get("precision") is None
        out[a] = "base" if same_step and "base" in out else a
    return out


def probe(out: Path, arms: tuple[str, ...], *, base: ModelConfig, seq_len: int, batch_size: int,
          data: list[str] | None, train_overrides: dict[str, Any] | None = None, nproc: int = 1,
          progress: Callable[[str], None] | None = None) -> tuple[dict[str, float], float]:
    """Training tokens per second of every arm on this machine and the start-up plus final-evaluation
    seconds of a run: ``PROBE_STEPS`` steps of each distinct arm in ``DIR/probe``. The overhead is the median
    over the probes after the first, whose start-up also prepared the corpus (a one-time cost)."""
    groups = probe_groups(arms)
    step_tokens = seq_len * batch_size
    rates: dict[str, float] = {}
    overheads: list[float] = []
    tokenizer = None
    root = out / "probe"
    for a in dict.fromkeys(groups.values()):
        if ARMS[a].curated:
            continue
        if progress:
            progress(f"probing arm {a}: {PROBE_STEPS} steps")
        path = root / a
        shutil.rmtree(path, ignore_errors=True)
        cfg = train_config(LabPlan(arms=(a,), seeds=1, tokens=step_tokens * PROBE_STEPS, seq_len=seq_len,
                                   batch_size=batch_size, budget_s=1.0, nproc=nproc), a, 0, data, tokenizer,
                           {**(train_overrides or {}), "log_every": 1, "checkpoint_every_s": 1e9})
        t0 = time.perf_counter()
        train_run(ARMS[a].model_config(base), cfg, path, resume=False, nproc=nproc)
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        steps = [r for r in recs if "loss" in r and "elapsed_s" in r]
        first, last = steps[0], steps[-1]
        timed = last["elapsed_s"] - first["elapsed_s"]
        rates[a] = (last["tokens"] - first["tokens"]) / timed if timed > 0 else float(step_tokens) / max(wall, 1e-3)
        overheads.append(wall - last["elapsed_s"])  # everything but the training steps
        tokenizer = tokenizer or str(path / "tokenizer.json")
    rates = {a: rates[g] for a, g in groups.items() if g in rates}
    if "base" in rates:
        rates.update({a: rates["base"] for a, g in groups.items() if g not in rates})
    later = overheads[1:] or overheads
    return rates, statistics.median(later) if later else 15.0


def prepare_plan(out: Path, claims: list[Claim], *, seeds: int, budget_s: float, base: ModelConfig | None = None,
                 data: list[str] | None = None, seq_len: int = 256, batch_size: int = 16,
                 train_overrides: dict[str, Any] | None = None, calibrate: bool = True, nproc: int = 1,
                 progress: Callable[[str], None] | None = None) -> LabPlan:
    """The saved plan of a lab started again (refusing another lab's), else a new one from a probe of this
    machine (``calibrate``) or from the assumed rate, written to ``DIR/plan.json`` before anything trains."""
    base = base or base_model()
    saved = out / "plan.json"
    arms = needed_arms(claims)
    if saved.is_file():
        old = LabPlan.from_dict(json.loads(saved.read_text(encoding="utf-8")))
        differ = [name for name, a, b in (("claims", set(arm_of(x) for x in old.arms), set(arms)),
                                          ("--seeds", old.seeds, seeds), ("--budget", old.budget_s, budget_s),
                                          ("--seq-len/--batch-size", (old.seq_len, old.batch_size),
                                           (seq_len, batch_size)),
                                          ("model (--preset/--config)", old.base_config(), base),
                                          ("--nproc", old.nproc, nproc))
                  if a != b]
        if differ:
            raise ConfigError(f"{out} holds a lab with another plan ({', '.join(differ)} differ); rerun it with "
                              f"the same claims and options, or choose another --out")
        return old
    t0 = time.time()
    if any(ARMS[a].curated for a in arms):  # curated once, before the plan: its seconds are the budget's
        curated_corpus(out, data, progress)
    rates, overhead = (probe(out, arms, base=base, seq_len=seq_len, batch_size=batch_size, data=data,
                             train_overrides=train_overrides, nproc=nproc, progress=progress)
                       if calibrate else ({}, 15.0))
    before = time.time() - t0
    serving = SERVING_S * sum(len(c.arms) for c in claims if c.name in SERVED)
    plan = make_plan(claims, seeds=seeds, budget_s=budget_s, base=base, seq_len=seq_len, batch_size=batch_size,
                     rates=rates, overhead_s=overhead, reserved_s=before + serving, nproc=nproc)
    out.mkdir(parents=True, exist_ok=True)
    fsio.write_text(saved, json.dumps(plan.as_dict(), indent=1))
    _spend(out, before)
    return plan


# ----- training -----------------------------------------------------------------------------------------
def curated_corpus(out: Path, data: list[str] | None, progress: Callable[[str], None] | None = None) -> list[str]:
    """``frugallm curate``'s default recipe over the lab's corpus, into ``DIR/curated`` (resumable)."""
    from frugallm.data.curate.pipeline import curate

    target = out / "curated"
    report = curate(data, target, workers=None,
                    progress=(lambda name, msg: progress(f"curate {msg}")) if progress else None)
    if progress:
        progress(f"curated corpus: {report['output']['documents']:,} of {report['source']['documents']:,} documents")
    return [str(target)]


def run_lab(plan: LabPlan, out: Path, *, base: ModelConfig | None = None, data: list[str] | None = None,
            train_overrides: dict[str, Any] | None = None, progress: Callable[[str], None] | None = None,
            live: bool = False, stop_after_runs: int | None = None) -> list[Path]:
    """Train every (arm, seed) of the plan not finished yet; the run directories in plan order.
    ``base``: the base model (default: the plan's); ``live``: the training
    loop's progress line, labelled with the run and the time left in the budget; ``stop_after_runs``: return
    after training that many (tests interrupt a lab with it)."""
    out.mkdir(parents=True, exist_ok=True)
    base = base or plan.base_config()
    if not (out / "plan.json").is_file():
        fsio.write_text(out / "plan.json", json.dumps(plan.as_dict(), indent=1))
    runs = [(a, s) for s in range(plan.seeds) for a in plan.arms]
    tokenizer = None
    curated = None
    dirs, trained = [], 0
    deadline = time.time() + _budget_left(out, plan)
    for i, (arm, seed) in enumerate(runs):
        path = run_dir(out, arm, seed)
        dirs.append(path)
        spec = ARMS[arm_of(arm)]
        if tokenizer is None:  # the first finished non-curated run's tokenizer is every later run's
            done = [run_dir(out, a, 0) for a in plan.arms if not ARMS[arm_of(a)].curated]
            tokenizer = next((str(p / "tokenizer.json") for p in done if is_finished(p)), None)
        if is_finished(path):
            if spec.curated:
                evaluate_on_raw(path, data)
            continue
        if stop_after_runs is not None and trained >= stop_after_runs:
            break
        label = f"[{i + 1}/{len(runs)}] {arm} seed {seed}"
        if progress:
            progress(f"{label}: {plan.tokens_of(arm):,} tokens; {max(0.0, deadline - time.time()):.0f} s left "
                     "in the budget")
        if spec.curated and curated is None:
            curated = curated_corpus(out, data, progress)
        cfg = train_config(plan, arm, seed, curated if spec.curated else data, tokenizer, train_overrides)
        resume = (path / "config.toml").is_file() and (path / "checkpoints").is_dir()
        t0 = time.time()
        interrupted = train_run(spec.model_config(base), cfg, path, resume=resume, nproc=plan.nproc,
                                label=f"lab {label}" if live else None, deadline=deadline)
        _spend(out, time.time() - t0)
        if interrupted:  # Ctrl-C or SIGTERM: the arm is checkpointed, and the lab stops with it
            if progress:
                progress(f"interrupted in arm {arm} seed {seed}; run the same command again to resume")
            return dirs
        if spec.curated:
            evaluate_on_raw(path, data)
        trained += 1
        if tokenizer is None and not spec.curated:
            tokenizer = str(path / "tokenizer.json")
    return dirs


def _budget_left(out: Path, plan: LabPlan) -> float:
    spent = out / "spent.json"
    used = json.loads(spent.read_text(encoding="utf-8"))["seconds"] if spent.is_file() else 0.0
    return plan.budget_s - used


def _spend(out: Path, seconds: float) -> None:
    """Training seconds spent so far, over restarts: the progress line's time left in the budget."""
    spent = out / "spent.json"
    used = json.loads(spent.read_text(encoding="utf-8"))["seconds"] if spent.is_file() else 0.0
    fsio.write_text(spent, json.dumps({"seconds": used + seconds}))


def evaluate_on_raw(path: Path, data: list[str] | None) -> dict[str, Any]:
    """A curated arm's validation figures on the raw corpus's held-out split (``raw_eval.json``, cached), so
    that it is judged on the same text as the base. Documents are assigned to the split by the hash of their
    text, so a curated document that kept its text is held out on both sides, and neither arm trained on any
    of it. Evaluated as the training loop evaluates (whole split, the run's autocast)."""
    cache = path / "raw_eval.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    import torch

    from frugallm.data.pack import prepare_corpus
    from frugallm.rundir import load_model
    from frugallm.train.evaluate import evaluate
    from frugallm.train.runconfig import read_run_config

    model_cfg, cfg = read_run_config(path / "config.toml")
    corpus = prepare_corpus(data, vocab_size=model_cfg.vocab_size, tokenizer_path=path / "tokenizer.json",
                            text_field=cfg.text_field, val_fraction=cfg.val_fraction, progress=False,
                            cache_dir=path.parent / ".cache" / "data")
    model = load_model(path)[0]
    res = evaluate(model, corpus, seq_len=cfg.seq_len, batch=cfg.batch_size // cfg.grad_accum,
                   autocast_dtype=None if cfg.precision == "fp32" else torch.bfloat16)
    fsio.write_text(cache, json.dumps(res, indent=1))
    return res




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
