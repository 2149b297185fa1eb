"""The training loop: data -> model -> AdamW with the DeepSeek-V3 objectives -> checkpoints, metrics, cost.

One optimizer step:
    for each of grad_accum micro-batches of [b, seq_len + 1 + D] tokens:
        out = model.forward_train(tokens)                      (bf16 autocast unless precision = fp32)
        L = out.loss + mtp_lambda * mean(out.mtp_losses) + balance_alpha * out.balance_loss
            (+ aux_loss_alpha * out.aux_loss: the classic batch-wise balance loss, off by default)
        (L / grad_accum).backward();  loads += out.loads
    clip the gradient norm to grad_clip; AdamW step at the warmup-stable-decay learning rate
    model.update_expert_bias(loads, bias_gamma)               (auxiliary-loss-free balancing, no autograd)

The run directory holds config.toml (the resolved model and train configs), tokenizer.json, checkpoints/,
metrics.jsonl, tb/, loss.png, expert_load.png, cost.json and model/ (the final Hugging Face export).
SIGINT and SIGTERM finish the current step, write a checkpoint and return; ``resume=True`` continues
from the newest checkpoint and, on the CPU in float32, reproduces the uninterrupted loss sequence.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frugallm.config import ModelConfig
from frugallm.errors import CheckpointError, ConfigError, ResourceError
from frugallm.kernels import choose
from frugallm.model import build_model
from frugallm.model.transformer import DeepseekV3LM
from frugallm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from frugallm.train.config import TrainConfig
from frugallm.train.device import peak_memory, pick_device, resolve_precision
from frugallm.train.memory import check_memory
from frugallm.train.metrics import MetricsWriter, load_stats, write_plots
from frugallm.train.optim import build_optimizer, wsd_lr
from frugallm.train.progress import ProgressLine
from frugallm.train.runconfig import read_run_config, write_run_config


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    interrupted: bool
    final: dict[str, Any] = field(default_factory=dict)  # val_loss, val_bpb, ...
    cost: dict[str, Any] = field(default_factory=dict)


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class _Clock:
    """Where a run stands: steps and tokens done, and its training time, counted across resumptions."""

    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # seconds trained before this process (a resumed run's)
    start: float = 0.0  # perf_counter() at ``begin``
    last_eval: float = 0.0
    last_ckpt: float = 0.0

    def begin(self) -> None:
        """Start the clock (and the eval and checkpoint intervals) as the first step begins."""
        self.start = self.last_eval = self.last_ckpt = time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + (time.perf_counter() if now is None else now) - self.start


class Trainer:
    """One training run (module doc). Chooses the device, the precision and the kernel policy once, checks
    the memory, then ``run`` trains. ``kernel_override``: ``FRUGALLM_KERNELS``'s syntax over the policy
    chosen for the device and precision (the CLI passes the environment's)."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True, dist: Any = None, kernel_override: str | None = None,
                 progress_label: str | None = None, deadline: float | None = None):
        from frugallm.train.distributed import Dist

        self.model_cfg, self.cfg = model_cfg, cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.progress_label, self.deadline = progress_label, deadline  # the lab's run label and budget end
        self.dist = dist or Dist.from_env(dp=cfg.dp, ep=cfg.ep)
        self.dist.check(model_cfg, cfg.batch_size, cfg.grad_accum)
        self.device = self.dist.device if self.dist.world_size > 1 else pick_device(cfg.device)
        if self.device.type == "cpu" and cfg.threads:
            torch.set_num_threads(cfg.threads)
        cfg = self.cfg = cfg.replace(precision=resolve_precision(cfg.precision, self.device))
        # fp8: FP8 GEMMs inside the device's fast high precision, bf16 autocast where bf16 is native, fp32
        # on CPUs that only emulate bf16 (there fp8 keeps fp32 everywhere but its GEMM operands)
        outer = resolve_precision("auto", self.device) if cfg.precision == "fp8" else cfg.precision
        self.outer_precision = outer
        self.amp_dtype = None if outer == "fp32" else torch.bfloat16
        self.precision_label = cfg.precision + (f" (FP8 GEMMs, {outer} elsewhere)" if cfg.precision == "fp8" else "")
        self.kernels = choose(self.device, outer, kernel_override)  # what the model's layers run
        self.depth = model_cfg.num_nextn_predict_layers
        self.micro = cfg.batch_size // cfg.grad_accum // self.dist.world_size  # sequences per forward
        if cfg.precision == "fp8" and cfg.fp8_backend == "hopper":  # before any data is read, as memory is
            from frugallm.precision.backends import require_hopper

            require_hopper(self.device)
        # before any data is read: a run that cannot fit fails in a second
        self.memory = self.check_memory(model_cfg, cfg, outer)
        self.memory_estimate, self.memory_available = self.memory.estimate, self.memory.available

    def check_memory(self, model_cfg: ModelConfig, cfg: TrainConfig, outer: str) -> Any:
        """The per-device memory estimate (``train.memory``), raising when it cannot fit."""
        return check_memory(model_cfg, cfg, self.device, outer_precision=outer, kernels=self.kernels,
                            world_size=self.dist.world_size)

    def memory_summary(self) -> str:
        return self.memory.summary(self.cfg)

    # ----- set-up -------------------------------------------------------------------------------------
    def _check_resume(self) -> None:
        if not (self.run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {self.run_dir}: no config.toml there; not a frugallm run directory")
        saved_model, _ = read_run_config(self.run_dir / "config.toml")
        if saved_model != self.model_cfg:
            diff = [k for k, v in saved_model.to_dict().items() if self.model_cfg.to_dict()[k] != v]
            raise ConfigError(f"--resume {self.run_dir}: the model configuration differs from the run's "
                              f"({', '.join(diff)}); resume with the run's own config")

    def _prepare_data(self):  # type: ignore[no-untyped-def]
        from frugallm.data.pack import prepare_corpus

        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 builds the shared cache first; the others then read it
        corpus = prepare_corpus(self.cfg.data, vocab_size=self.model_cfg.vocab_size,
                                tokenizer_path=self.cfg.tokenizer, text_field=self.cfg.text_field,
                                val_fraction=self.cfg.val_fraction, progress=self.progress and self.dist.is_main,
                                cache_dir=self.run_dir.parent / ".cache" / "data")
        if self.dist.is_main:
            self.dist.barrier()
        if corpus.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {corpus.vocab_size} tokens but the model's vocab_size is "
                              f"{self.model_cfg.vocab_size}; raise vocab_size")
        return corpus

    def _open_run_dir(self) -> None:
        """Check a resumed run's settings, or refuse to train over another run's checkpoints; then create
        the directory and seed."""
        if self.resume:
            self._check_resume()
        elif self.dist.is_main and (self.run_dir / "checkpoints").is_dir() and latest_checkpoint(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume {self.run_dir} to "
                              f"continue it, or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)

    def _start(self):  # type: ignore[no-untyped-def]
        """The run directory (``_open_run_dir``) and the corpus."""
        self._open_run_dir()
        corpus = self._prepare_data()
        if self.dist.is_main:
            write_run_config(self.run_dir / "config.toml", self.model_cfg, self.cfg)
            shutil.copyfile(corpus.tokenizer_path, self.run_dir / "tokenizer.json")
        return corpus

    def _build(self) -> DeepseekV3LM:
        model = build_model(self.model_cfg, device=self.device, seed=self.cfg.seed, kernels=self.kernels)
        if self.cfg.precision == "fp8":
            from frugallm.precision import Fp8Recipe, convert_to_fp8

            convert_to_fp8(model, Fp8Recipe(fp8_saved_activations=self.cfg.fp8_saved_activations),
                           backend=self.cfg.fp8_backend)
        if self.cfg.activation_checkpointing:
            from frugallm.train.distributed import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return self.dist.parallelize(model)

    def _restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any) -> _Clock:
        """The newest checkpoint's state into model, optimizer and loader when resuming; where the run stands."""
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is None:
            return _Clock()
        if self.dist.world_size > 1:  # into the shards, from a checkpoint of any layout
            from frugallm.train.dist_checkpoint import load_any_checkpoint

            state = load_any_checkpoint(ckpt, model, optimizer)
        else:
            inner = self.dist.unwrap(model)
            state = load_checkpoint(ckpt, inner, optimizer, tensors=self.checkpoint_tensors(inner))
        loader.load_state_dict(state["loader"])
        return _Clock(step=state["step"], tokens=state["tokens"], elapsed_before=state["elapsed_s"])

    # ----- the loop ---------------------------------------------------------------------------------------
    def _progress_fraction(self, step: int, tokens: int, elapsed: float) -> float:
        c = self.cfg
        if c.max_steps:
            return step / c.max_steps
        if c.max_tokens:
            return tokens / c.max_tokens
        return elapsed / c.time_budget_s  # type: ignore[operator]

    def _done(self, step: int, tokens: int, elapsed: float) -> bool:
        c = self.cfg
        return bool((c.max_steps and step >= c.max_steps) or (c.max_tokens and tokens >= c.max_tokens)
                    or (c.time_budget_s and elapsed >= c.time_budget_s))

    def _step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, lr: float
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """One optimizer step over grad_accum micro-batches (module doc): the mean (main, mtp, balance)
        losses over the ranks, the experts' loads summed over micro-batches and ranks, the gradient norm."""
        cfg = self.cfg
        for group in optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        batch = loader.next_batch().to(self.device, non_blocking=True)  # [B/ws, window]
        loads = None
        sums = torch.zeros(4, device=self.device)  # main, mtp, balance, auxiliary
        for chunk in batch.split(self.micro):
            with autocast:
                out = self.forward(model, chunk)
            mtp = torch.stack(out.mtp_losses).mean() if out.mtp_losses else out.loss.new_zeros(())
            total = out.loss + cfg.mtp_lambda * mtp + cfg.balance_alpha * out.balance_loss
            aux = out.aux_loss if cfg.aux_loss_alpha and getattr(out, "aux_loss", None) is not None else None
            if aux is not None:
                total = total + cfg.aux_loss_alpha * aux
            (total / cfg.grad_accum).backward()
            sums += torch.stack([out.loss.detach(), mtp.detach(), out.balance_loss.detach(),
                                 (aux if aux is not None else out.loss.new_zeros(())).detach()]).float()
            if out.loads is not None:
                loads = out.loads if loads is None else loads + out.loads
        sums /= cfg.grad_accum
        grad_norm = self.dist.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if loads is not None:
            loads = self.dist.all_reduce_sum(loads)  # every rank applies the same bias update
            if self.update_bias:
                self.dist.unwrap(model).update_expert_bias(loads, cfg.bias_gamma)
        return self.dist.all_reduce_mean(sums), loads, float(grad_norm)

    # ----- what a subclass (``frugallm.tune.finetune``) changes -------------------------------------------
    update_bias = True  # auxiliary-loss-free balancing: the loop moves the experts' bias after every step

    def forward(self, model: torch.nn.Module, chunk: Any) -> Any:
        """One micro-batch's ``TrainOutput``: here token windows [b, seq_len + 1 + D]."""
        return model(chunk, train=True)

    def make_loader(self, corpus: Any) -> Any:
        """The training batches: ``next_batch()`` (something with ``.to(device)`` and ``.split(rows)``),
        ``tokens_in(batch)``, ``state_dict()`` and ``load_state_dict()``."""
        from frugallm.data.loader import TokenLoader

        return TokenLoader(corpus, "train", global_batch=self.cfg.batch_size,
                           window=self.cfg.seq_len + 1 + self.depth, seed=self.cfg.seed, rank=self.dist.rank,
                           world_size=self.dist.world_size)

    def evaluate(self, model: torch.nn.Module, corpus: Any, max_windows: int | None) -> dict[str, Any]:
        """Validation figures (``val_loss`` at least) of the unwrapped model; None windows: all of them."""
        from frugallm.train.evaluate import evaluate

        return evaluate(model, corpus, seq_len=self.cfg.seq_len, batch=self.micro, max_windows=max_windows,
                        device=self.device, autocast_dtype=self.amp_dtype)

    def before_training(self, model: torch.nn.Module, corpus: Any) -> dict[str, Any]:
        """Figures of the starting model for the metrics (step 0), e.g. a fine-tuning base's loss."""
        return {}

    def checkpoint_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """What a checkpoint keeps of the (unwrapped) model: None for its whole state dict."""
        return None

    def flops_per_token(self) -> float | None:
        """FLOPs one trained token costs; None: pretraining's (``cost.flops.train_flops_per_token``)."""
        return None

    def tokens_per_step(self) -> int:
        """Tokens the step just taken trained on."""
        return self.cfg.batch_size * self.cfg.seq_len

    def _record(self, clock: _Clock, lr: float, sums: torch.Tensor, loads: torch.Tensor | None,
                grad_norm: float, meter: Any) -> dict[str, Any]:
        """The metrics line of this step."""
        elapsed = clock.elapsed()
        rec = {"step": clock.step, "loss": sums[0].item(), "tokens": clock.tokens, "lr": lr,
               "grad_norm": grad_norm, "elapsed_s": round(elapsed, 3), **meter.snapshot(elapsed)}
        if self.depth:
            rec["mtp_loss"] = sums[1].item()
        if loads is not None:
            rec["balance_loss"] = sums[2].item()
            if self.cfg.aux_loss_alpha:
                rec["aux_loss"] = sums[3].item()
            rec.update(load_stats(loads))
        return rec

    def run(self, stop_after_step: int | None = None) -> RunResult:
        """Train to the configured horizon. ``stop_after_step`` behaves as a SIGINT arriving during that
        step (a checkpoint, then return): tests use it to interrupt a run at a known point."""
        from frugallm.train.rate import RateMeter

        cfg, is_main = self.cfg, self.dist.is_main
        corpus = self._start()
        model = self._build()
        optimizer = build_optimizer(model, cfg)
        loader = self.make_loader(corpus)
        clock = self._restore(model, optimizer, loader)
        metrics = MetricsWriter(self.run_dir, enabled=is_main)
        if clock.step == 0:
            before = self.before_training(model, corpus)
            if before:
                metrics.write({"step": 0, "tokens": 0, **before})
        meter = RateMeter(self.model_cfg, cfg, self.device, world_size=self.dist.world_size,
                          compute=self.outer_precision, kernels=self.kernels, flops_per_token=self.flops_per_token())
        interrupted = False
        ui = ProgressLine(enabled=self.progress and is_main, label=self.progress_label, deadline=self.deadline)
        ui.start(cfg.max_steps, clock.step)
        model.train()
        clock.begin()
        with _Stop() as stop:
            # clock- and signal-driven decisions are agreed by all ranks (Dist.any), or their collectives part ways
            while not self.dist.any(self._done(clock.step, clock.tokens, clock.elapsed())):
                t0 = time.perf_counter()
                lr = wsd_lr(cfg, clock.step, self._progress_fraction(clock.step, clock.tokens, clock.elapsed(t0)))
                sums, loads, grad_norm = self._step(model, optimizer, loader, lr)
                tokens_per_step = self.tokens_per_step()  # after the step: RL's depends on its rollouts
                clock.step += 1
                clock.tokens += tokens_per_step
                meter.update(tokens_per_step, time.perf_counter() - t0)
                if not all(math.isfinite(v) for v in sums.tolist()):
                    raise ResourceError(f"the loss became non-finite at step {clock.step} (lr {lr:.2e}); lower "
                                        f"lr or use precision fp32; the last checkpoint is intact")
                if clock.step % cfg.log_every == 0 or clock.step == 1:
                    rec = self._record(clock, lr, sums, loads, grad_norm, meter)
                    metrics.write(rec)
                    ui.update(clock.step, rec)
                if stop_after_step is not None and clock.step >= stop_after_step:
                    stop.requested = True
                stop.requested = self._between_steps(clock, model, optimizer, loader, corpus, metrics, ui,
                                                     stop.requested)
                if stop.requested:
                    interrupted = True
                    break
        ui.stop()
        return self._finish(clock, model, optimizer, loader, corpus, metrics, meter, interrupted)

    def _between_steps(self, clock: _Clock, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       loader: Any, corpus: Any, metrics: MetricsWriter, ui: ProgressLine, stop: bool) -> bool:
        """Evaluate and checkpoint when due (and checkpoint before stopping); whether all ranks stop."""
        cfg, now = self.cfg, time.perf_counter()
        eval_due, ckpt_due, stop = self.dist.any_each(now - clock.last_eval >= cfg.eval_every_s,
                                                      now - clock.last_ckpt >= cfg.checkpoint_every_s, stop)
        if eval_due:
            ev = self.evaluate(self.dist.unwrap(model), corpus, cfg.eval_windows)
            metrics.write({"step": clock.step, "tokens": clock.tokens, **ev})
            ui.note(f"step {clock.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()
                                                       if k in ("val_loss", "val_bpb")))
            clock.last_eval = time.perf_counter()
        if stop or ckpt_due:
            self._checkpoint(clock.step, clock.tokens, clock.elapsed(now), model, optimizer, loader)
            clock.last_ckpt = time.perf_counter()
        return stop

    def _finish(self, clock: _Clock, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                corpus: Any, metrics: MetricsWriter, meter: Any, interrupted: bool) -> RunResult:
        """The last checkpoint; unless interrupted, the final evaluation, cost.json, plots and the export."""
        elapsed = clock.elapsed()
        self._checkpoint(clock.step, clock.tokens, elapsed, model, optimizer, loader)
        result = RunResult(self.run_dir, clock.step, clock.tokens, elapsed, interrupted)
        if interrupted:
            metrics.close()
            return result
        final = self.evaluate(self.dist.unwrap(model), corpus, None)
        metrics.write({"step": clock.step, "tokens": clock.tokens, "final": True, **final})
        metrics.close()
        result.final = final
        result.cost = {**meter.cost_record(clock.tokens, elapsed), "memory_estimate": self.memory_estimate,
                       **peak_memory(self.device)}
        export = self.dist.gather_model(model)  # collective; the full model on rank 0 only
        if self.dist.is_main:
            from frugallm.cost.report import write_cost_json

            write_cost_json(self.run_dir, result.cost)
            write_plots(self.run_dir)
            self._export(export)
        self.dist.barrier()
        return result

    def _checkpoint(self, step: int, tokens: int, elapsed: float, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, loader: Any) -> None:
        if step == 0:
            return
        if self.dist.world_size > 1:  # every rank writes its shards
            from frugallm.train.dist_checkpoint import save_sharded_checkpoint

            save_sharded_checkpoint(self.run_dir, step, model, optimizer,
                                    {"tokens": tokens, "elapsed_s": elapsed, "loader": loader.state_dict()},
                                    self.dist, keep=self.cfg.keep_checkpoints)
            return
        if not self.dist.is_main:
            return
        inner = self.dist.unwrap(model)
        save_checkpoint(self.run_dir, step, inner, optimizer,
                        {"tokens": tokens, "elapsed_s": elapsed, "loader": loader.state_dict()},
                        keep=self.cfg.keep_checkpoints, tensors=self.checkpoint_tensors(inner))

    def _export(self, model: torch.nn.Module) -> None:
        inner = self.dist.unwrap(model)
        if self.model_cfg.hf_export_problem() is not None:
            return  # baselines have no Hugging Face DeepSeek equivalent
        from frugallm.model.hf import save_pretrained

        export = inner
        if self.cfg.precision == "fp8":
            export = build_model(self.model_cfg, device="cpu", init=False)
            export.load_state_dict({k: v.float().cpu() for k, v in inner.state_dict().items()}, strict=False)
        try:
            save_pretrained(export, self.run_dir / "model",
                            extra_files={"tokenizer.json": self.run_dir / "tokenizer.json"})
        except CheckpointError as e:  # e.g. V2 routing whose balancing bias moved: no V2 equivalent
            logging.getLogger("frugallm.train").warning(
                "no Hugging Face export (%s); the run's checkpoints still serve and resume", e)
