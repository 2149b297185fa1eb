"""``frugallm rl``: GRPO over a verifiable task, starting from any model ``frugallm finetune`` starts from.

The loop is the fine-tuning loop (``tune.finetune.FineTuner``, itself ``train.loop.Trainer``): the base and
LoRA (or full) set-up, precision, checkpoints of the adapters and resume, SIGINT handling, metrics.jsonl and
TensorBoard, cost.json, the PEFT export. What one step is changes:
    1. P prompts from the task's training prompts (a seeded, resumable order)
    2. G samples of each from the serving engine over the trained modules (``rl.rollout``), with the
       engine's log-probabilities of every sampled token (pi_old)
    3. rewards (``rl.tasks``; code runs in ``rl.sandbox``), group advantages; groups whose rewards are all
       equal are counted and dropped before any forward
    4. with a KL term, log pi_ref once: LoRA switches its adapters off for it (``tune.lora.adapters_off``),
       so no second copy of the weights exists; full fine-tuning keeps a frozen copy; kl_coef 0 keeps none
    5. K passes (``epochs``), each one optimizer step over the informative sequences in micro-batches
    6. ``Engine.weights_updated()``: the engine's next rollouts see the new weights
Evaluation is greedy accuracy on the held-out prompts, before training (step 0), every ``eval_every_s`` and
at the end. The run directory is a LoRA (or full) fine-tuning run with an ``[rl]`` table: ``frugallm serve``,
``merge`` and ``eval`` read it as they read any fine-tuning run; ``reward.png`` plots reward and accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from frugallm.config import reject_unknown_fields
from frugallm.errors import ConfigError
from frugallm.rl.grpo import AGGREGATIONS, GRPOLossConfig, group_advantages, informative_groups, policy_loss
from frugallm.train.config import TrainConfig
from frugallm.tune.finetune import TOKENIZER_FILES, FinetuneConfig, FineTuner, tokenizer_dir


@dataclass(kw_only=True)
class RLConfig:
    task: str  # a built-in task name or a .jsonl of prompts
    reward: str | None = None  # module:function, for a .jsonl task
    group_size: int = 8  # G
    prompts_per_step: int = 4  # P
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.0  # beta (R1: 0.001); 0 keeps no reference
    clip_low: float = 0.2
    clip_high: float = 0.2  # 0.28: DAPO's clip-higher
    aggregation: str = "token-mean"
    scale_std: bool = True  # False: Dr. GRPO's advantages without the std division
    epochs: int = 1  # K optimisation passes per batch of rollouts
    heldout: int = 64  # held-out prompts scored greedily
    sandbox_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "epochs", "heldout"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (the group's mean is the baseline), got {self.group_size}")
        if not 0 < self.temperature <= 2:
            raise ConfigError(f"temperature must be in (0, 2] (rollouts must sample), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.loss_config()  # validates clip, kl and aggregation

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig(clip_low=self.clip_low, clip_high=self.clip_high, kl_coef=self.kl_coef,
                              aggregation=self.aggregation, scale_std=self.scale_std,
                              max_new_tokens=self.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLConfig:
        reject_unknown_fields(cls, d, "rl config")
        return cls(**d)


def rl_train_defaults(method: str) -> TrainConfig:
    """GRPO's settings: a small constant learning rate after a short warmup, no weight decay for LoRA, no
    balance loss (the router is frozen), an evaluation every two minutes and a 20-minute budget."""
    lora = method == "lora"
    return TrainConfig(lr=1e-4 if lora else 1e-6, warmup_steps=2, weight_decay=0.0 if lora else 0.1, batch_size=8,
                       seq_len=256, balance_alpha=0.0, mtp_lambda=0.0, eval_every_s=120.0, log_every=1,
                       time_budget_s=1200.0, decay_fraction=0.0)


class PromptLoader:
    """The task's training prompts in a seeded order, P per step, reshuffled each pass; resumable."""

    def __init__(self, n: int, per_step: int, seed: int) -> None:
        self.n, self.per_step, self.seed = n, per_step, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


@dataclass
class RLCorpus:
    task: Any  # rl.tasks.Task
    codec: Any  # serve.loading.Codec
    train_ids: list[list[int]]
    heldout_ids: list[list[int]]


class GRPOTrainer(FineTuner):
    """``FineTuner`` whose step is GRPO's (module doc)."""

    def __init__(self, ft: FinetuneConfig, rl: RLConfig, cfg: TrainConfig, run_dir: str | Path, *,
                 resume: bool = False, progress: bool = True, dist: Any = None, kernel_override: str | None = None):
        super().__init__(ft, cfg, run_dir, resume=resume, progress=progress, dist=dist,
                         kernel_override=kernel_override)
        if self.dist.world_size > 1:
            raise ConfigError("frugallm rl runs on one device for now (rollouts and updates share one engine); "
                              "drop --nproc")
        self.rl = rl
        self.loss_cfg = rl.loss_config()
        self.engine: Any = None
        self.ref_model: torch.nn.Module | None = None
        self._step_tokens = 0
        self._stats: dict[str, Any] = {}

    # ----- set-up -------------------------------------------------------------------------------------
    def _check_resume(self) -> None:
        super()._check_resume()
        from frugallm.train.runconfig import read_rl_table

        table = read_rl_table(self.run_dir / "config.toml")
        if table is None:
            raise ConfigError(f"--resume {self.run_dir}: not an RL run (no [rl] in its config.toml)")
        saved = RLConfig.from_dict(table)
        diff = [k for k in ("task", "reward", "group_size", "prompts_per_step", "max_new_tokens")
                if getattr(saved, k) != getattr(self.rl, k)]
        if diff:
            raise ConfigError(f"--resume {self.run_dir}: the RL settings differ from the run's ({', '.join(diff)})")

    def _start(self) -> RLCorpus:  # type: ignore[override]
        from frugallm.data.chat import ChatTemplate
        from frugallm.rl.sandbox import SandboxLimits
        from frugallm.rl.tasks import build_task
        from frugallm.serve.loading import Codec
        from frugallm.train.runconfig import write_run_config

        task = build_task(self.rl.task, reward=self.rl.reward, heldout=self.rl.heldout, seed=self.cfg.seed,
                          sandbox=SandboxLimits(timeout_s=self.rl.sandbox_timeout_s))
        self._open_run_dir()
        tok_dir = tokenizer_dir(self.ft.base)
        codec = Codec.from_dir(tok_dir)
        template = ChatTemplate.from_dir(tok_dir)
        if self.dist.is_main:
            write_run_config(self.run_dir / "config.toml", self.model_cfg, self.cfg, finetune=self.ft.to_dict(),
                             rl=self.rl.to_dict())
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copyfile(tok_dir / name, self.run_dir / name)
            template.write(self.run_dir)

        def encode(rows: list[dict[str, Any]]) -> list[list[int]]:
            return [codec.encode(codec.render_chat(task.messages(r)), add_special_tokens=False) for r in rows]

        corpus = RLCorpus(task, codec, encode(task.train), encode(task.heldout))
        longest = max(len(p) for p in corpus.train_ids + corpus.heldout_ids) + self.rl.max_new_tokens + 1
        if longest > self.model_cfg.max_position_embeddings:
            raise ConfigError(f"a prompt plus max_new_tokens needs {longest} positions but the model has "
                              f"{self.model_cfg.max_position_embeddings}; lower --max-new-tokens")
        self.corpus = corpus
        return corpus

    def _build(self) -> torch.nn.Module:
        model = super()._build()
        from frugallm.rl.rollout import rollout_engine

        inner = self.dist.unwrap(model)
        longest = max(len(p) for p in self.corpus.train_ids + self.corpus.heldout_ids) + self.rl.max_new_tokens + 4
        batch = max(self.rl.prompts_per_step * self.rl.group_size, min(len(self.corpus.heldout_ids), 64))
        self.engine = rollout_engine(inner, self.corpus.codec, sequences=batch, longest=longest)
        if self.rl.kl_coef > 0 and self.lora_cfg is None:  # full fine-tuning: a frozen copy as the reference
            import copy

            self.ref_model = copy.deepcopy(inner).eval().requires_grad_(False)
        model.train()
        return model

    def make_loader(self, corpus: RLCorpus) -> PromptLoader:  # type: ignore[override]
        return PromptLoader(len(corpus.train_ids), self.rl.prompts_per_step, self.cfg.seed)

    def tokens_per_step(self) -> int:
        return self._step_tokens

    # ----- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, corpus: RLCorpus, max_windows: int | None) -> dict[str, Any]:  # type: ignore[override]
        from frugallm.rl.rollout import greedy_answers

        was_training = model.training
        model.eval()
        texts = greedy_answers(self.engine, corpus.heldout_ids, self.rl.max_new_tokens)
        model.train(was_training)
        rewards = corpus.task.rewards(corpus.task.heldout, texts)
        return {"heldout_accuracy": sum(r >= 1.0 for r in rewards) / len(rewards),
                "heldout_reward": sum(rewards) / len(rewards), "heldout_prompts": len(rewards)}

    def before_training(self, model: torch.nn.Module, corpus: RLCorpus) -> dict[str, Any]:  # type: ignore[override]
        self.before = self.evaluate(self.dist.unwrap(model), corpus, None)
        return {f"{k}_before": v for k, v in self.before.items() if k != "heldout_prompts"}

    # ----- the step -----------------------------------------------------------------------------------
    def _step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: PromptLoader, lr: float
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        from frugallm.rl.rollout import policy_batch, sample_groups

        rl, corpus, inner = self.rl, self.corpus, self.dist.unwrap(model)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = loader.next_batch()
        step_seed = self.cfg.seed * 100_003 + loader.epoch * 10_007 + loader.pos
        model.eval()
        rollout = sample_groups(self.engine, [corpus.train_ids[i] for i in idx], rl.group_size,
                                max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                seed=step_seed)
        model.train()
        task = corpus.task
        before = Counter(task.stats)
        rewards = torch.tensor(task.rewards([task.train[idx[g]] for g in rollout.group], rollout.texts)
                               ).view(len(idx), rl.group_size)  # [P, G]
        outcomes = {k: v - before.get(k, 0) for k, v in task.stats.items() if v - before.get(k, 0)}
        adv = group_advantages(rewards, scale_std=rl.scale_std).flatten()  # [B]
        keep_groups = informative_groups(rewards)  # [P]
        rows = [i for i, g in enumerate(rollout.group) if keep_groups[g]]
        lengths = [len(c) for c in rollout.completion_ids]
        stats: dict[str, Any] = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "correct_share": float((rewards >= 1).float().mean()),
            "all_equal_groups": float(1 - keep_groups.float().mean()),
            "response_length": sum(lengths) / len(lengths), **rollout.stats,
            **{f"outcome_{k}": v for k, v in outcomes.items()}}
        losses, clips, kls, norms = [], [], [], []
        self._step_tokens = 0
        if rows:
            batch = policy_batch(rollout, rows)  # padding sits after each sequence: causal, masked
            batch_adv = adv[rows]
            ref = self._reference_logprobs(inner, batch) if rl.kl_coef > 0 else None
            n_tokens, n_seqs = float(batch.mask.sum()), len(rows)
            self._step_tokens = int(n_tokens) * rl.epochs
            for _ in range(rl.epochs):
                loss_sum, clip_sum, kl_sum = 0.0, 0.0, 0.0
                for lo in range(0, len(rows), self.micro):
                    sl = slice(lo, lo + self.micro)
                    parts = self._micro_loss(model, batch, sl, batch_adv[sl], ref, n_tokens, n_seqs)
                    parts.loss.backward()
                    share = float(batch.mask[sl].sum()) / max(n_tokens, 1)
                    loss_sum += float(parts.loss.detach())
                    clip_sum += parts.clip_fraction * share
                    kl_sum += parts.kl * share
                norms.append(float(self.dist.clip_grad_norm(model, self.cfg.grad_clip)))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss_sum)
                clips.append(clip_sum)
                kls.append(kl_sum)
            self.engine.weights_updated()
        stats.update(clip_fraction=sum(clips) / len(clips) if clips else 0.0,
                     kl=sum(kls) / len(kls) if kls else 0.0, trained_sequences=len(rows))
        self._stats = stats
        loss = sum(losses) / len(losses) if losses else 0.0
        return torch.tensor([loss, 0.0, 0.0]), None, sum(norms) / len(norms) if norms else 0.0

    def _forward_logprobs(self, model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor
                          ) -> torch.Tensor:
        from frugallm.rl.grpo import token_logprobs

        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
        with autocast:
            logits = model(input_ids.to(self.device))  # [b, L, V]
        return token_logprobs(logits[:, :-1], targets.to(self.device))  # [b, L-1]

    def _micro_loss(self, model: torch.nn.Module, batch: Any, sl: slice, adv: torch.Tensor,
                    ref: torch.Tensor | None, n_tokens: float, n_seqs: int) -> Any:
        logp = self._forward_logprobs(model, batch.input_ids[sl], batch.targets[sl])
        mask = batch.mask[sl].to(logp.device)
        return policy_loss(logp, batch.old_logprobs[sl].to(logp.device), adv.to(logp.device), mask, self.loss_cfg,
                           ref_logp=None if ref is None else ref[sl].to(logp.device),
                           n_tokens=n_tokens, n_seqs=n_seqs)

    @torch.no_grad()
    def _reference_logprobs(self, inner: torch.nn.Module, batch: Any) -> torch.Tensor:
        out = []
        if self.ref_model is not None:
            ctx, model = nullcontext(), self.ref_model
        else:
            from frugallm.tune.lora import adapters_off

            ctx, model = adapters_off(inner), inner
        with ctx:
            for lo in range(0, batch.input_ids.shape[0], self.micro):
                sl = slice(lo, lo + self.micro)
                out.append(self._forward_logprobs(model, batch.input_ids[sl], batch.targets[sl]).cpu())
        return torch.cat(out)

    def _record(self, clock: Any, lr: float, sums: torch.Tensor, loads: torch.Tensor | None, grad_norm: float,
                meter: Any) -> dict[str, Any]:
        rec = super()._record(clock, lr, sums, loads, grad_norm, meter)
        rec.pop("mtp_loss", None)  # RL trains the main head only
        rec.update({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                    for k, v in self._stats.items()})
        return rec

    def _finish(self, clock: Any, model: torch.nn.Module, optimizer: Any, loader: Any, corpus: Any,
                metrics: Any, meter: Any, interrupted: bool) -> Any:
        result = super()._finish(clock, model, optimizer, loader, corpus, metrics, meter, interrupted)
        if not interrupted and self.dist.is_main:
            from frugallm.rl.plots import write_reward_plot

            write_reward_plot(self.run_dir)
        return result

    def report_lines(self, result: Any) -> str:
        f, c = result.final, result.cost
        lines = [f"task {self.rl.task}: {len(self.corpus.train_ids)} training prompts, "
                 f"{len(self.corpus.heldout_ids)} held out; G={self.rl.group_size}, P={self.rl.prompts_per_step}, "
                 f"K={self.rl.epochs}, loss {self.rl.aggregation}, kl_coef {self.rl.kl_coef:g}"]
        t, n = self.trainable
        if n:
            lines.append(f"trainable parameters: {t:,} of {n:,} ({t / n:.3%})")
        if "heldout_accuracy" in f:
            b = f.get("heldout_accuracy_before")
            lines.append("held-out greedy accuracy: " + (f"before {b:.1%}  ->  " if b is not None else "")
                         + f"after {f['heldout_accuracy']:.1%}  (mean reward "
                         + (f"{f['heldout_reward_before']:.3f} -> " if "heldout_reward_before" in f else "")
                         + f"{f['heldout_reward']:.3f})")
        if c:
            lines.append(f"steps {result.step}   {result.elapsed_s:.0f} s   {c.get('device_hours', 0):.4f} "
                         f"{c.get('device_kind')}-hours" + (f"   ${c['cost_usd']:.4f}" if c.get("cost_usd") is not None
                                                           else ""))
        if self.corpus.task.stats:
            lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.corpus.task.stats.items())))
        out = self.run_dir / ("adapter" if self.lora_cfg else "model")
        if out.is_dir():
            lines.append(f"wrote {out}")
        return "\n".join(lines)


def read_rl_config(run_dir: str | Path) -> RLConfig | None:
    from frugallm.train.runconfig import read_rl_table

    path = Path(run_dir) / "config.toml"
    table = read_rl_table(path) if path.is_file() else None
    return None if table is None else RLConfig.from_dict(table)


__all__ = ["AGGREGATIONS", "GRPOTrainer", "PromptLoader", "RLConfig", "read_rl_config", "rl_train_defaults"]
