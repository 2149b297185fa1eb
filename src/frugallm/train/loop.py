"""The training loop: data -> model -> AdamW with the DeepSeek-V3 objectives -> checkpoints, metrics, cost.

One optimizer step:
    for each of grad_accum micro-batches of [b, seq_len + 1 + D] tokens:
        out = model.forward_train(tokens)                      (bf16 autocast unless precision = fp32)
        L = out.loss + mtp_lambda * mean(out.mtp_losses) + balance_alpha * out.balance_loss
        (L / grad_accum).backward();  loads += out.loads
    clip the gradient norm to grad_clip; AdamW step at the warmup-stable-decay learning rate
    model.update_expert_bias(loads, bias_gamma)               (auxiliary-loss-free balancing, no autograd)

The run directory holds config.toml (the resolved model and train configs), tokenizer.json, checkpoints/,
metrics.jsonl, tb/, loss.png, expert_load.png, cost.json and model/ (the final Hugging Face export).
SIGINT and SIGTERM finish the current step, write a checkpoint and return; ``resume=True`` continues
from the newest checkpoint and, on the CPU in float32, reproduces the uninterrupted loss sequence.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frugallm.config import ModelConfig
from frugallm.errors import ConfigError, ResourceError
from frugallm.model import build_model
from frugallm.model.transformer import DeepseekV3LM
from frugallm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from frugallm.train.config import TrainConfig
from frugallm.train.metrics import MetricsWriter, load_stats, write_plots
from frugallm.train.optim import build_optimizer, wsd_lr
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from frugallm.errors import DeviceError

        raise DeviceError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it faster than fp32, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    fast = cpu_has_native_bf16()
    if fast is None:  # no feature flags to read: compare the cached matmul probes
        from frugallm.cost.hardware import cpu_peak_flops

        fast = cpu_peak_flops("bf16") > 1.3 * cpu_peak_flops("fp32")
    return "bf16" if fast else "fp32"


def cpu_has_native_bf16() -> bool | None:
    """True where the CPU has bf16 matmul instructions (x86 AVX512-BF16 or AMX, Arm BF16), False where it
    has none (bf16 is then emulated, about 10x slower than fp32 on an AVX2 EPYC, measured here), None if
    /proc/cpuinfo is not there to tell."""
    from frugallm.cost.hardware import cpuinfo_field

    flags = cpuinfo_field("flags", "Features")
    return None if flags is None else bool(set(flags.split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The measured peak to set against the estimate: on a GPU the allocator's peak of live tensors (what the
    estimate models); on a CPU the process's peak resident set, which adds Python, the libraries and the
    data loader, so it sits above the estimate."""
    if device.type == "cuda":
        return {"memory_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "memory_peak_source": "torch.cuda.max_memory_allocated"}
    import resource
    import sys

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return {"memory_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * unit,
            "memory_peak_source": "process peak resident set (ru_maxrss)"}


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True, dist: Any = None):
        from frugallm.train.distributed import Dist

        self.model_cfg, self.cfg = model_cfg, cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
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
        self.depth = model_cfg.num_nextn_predict_layers
        if cfg.precision == "fp8" and cfg.fp8_backend == "hopper":  # before any data is read, as memory is
            from frugallm.precision.backends import require_hopper

            require_hopper(self.device)
        self._check_memory()  # before any data is read: a run that cannot fit fails in a second

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

    def _check_memory(self) -> None:
        from frugallm.cost.memory import require_fits, training_memory
        from frugallm.model.attention import CPU_FLASH_PAD_V, cpu_blocked_attention
        from frugallm.model.moe import pads_expert_rows

        micro = self.cfg.batch_size // self.cfg.grad_accum // self.dist.world_size
        cpu = self.device.type == "cpu"
        blocked = (cpu and self.outer_precision == "fp32"
                   and cpu_blocked_attention(micro, self.model_cfg.num_attention_heads, self.cfg.seq_len))
        # under bf16 autocast the fp32 parameters are the master copy and the bf16 casts the working weights
        mem = training_memory(self.model_cfg, micro * self.cfg.seq_len, seq_len=self.cfg.seq_len,
                              precision=self.outer_precision, moments=self.cfg.adam_moments,
                              fp8_gemms=self.cfg.precision == "fp8",
                              fp8_saved_activations=self.cfg.fp8_saved_activations,
                              recompute=self.cfg.activation_checkpointing,
                              pad_v=CPU_FLASH_PAD_V and cpu, blocked_attention=blocked,
                              padded_expert_rows=self.amp_dtype is not None
                              and pads_expert_rows(self.device.type, self.amp_dtype),
                              shards=self.dist.world_size)
        self.memory_available = available_memory(self.device)
        require_fits(mem, self.memory_available, where=f"this {self.device.type} device")
        self.memory_estimate = mem.as_dict()

    def memory_summary(self) -> str:
        """One line: the estimate per device by part, with the switches that shrink it."""
        from frugallm.cost.memory import format_bytes

        m = self.memory_estimate
        parts = [f"weights {format_bytes(m['weights'])}", f"grads {format_bytes(m['grads'])}",
                 f"AdamW moments ({self.cfg.adam_moments}) {format_bytes(m['optimizer'])}",
                 f"activations{' (fp8 linear inputs)' if self.cfg.fp8_saved_activations else ''} "
                 f"{format_bytes(m['activations'])}"]
        if m["step_buffers"]:
            parts.append(f"per-step buffers {format_bytes(m['step_buffers'])}")
        avail = "" if self.memory_available >= 1 << 62 else f" of {format_bytes(self.memory_available)} available"
        return f"memory estimate: {format_bytes(m['total'])} per device{avail} ({', '.join(parts)})"

    def _build(self) -> DeepseekV3LM:
        model = build_model(self.model_cfg, device=self.device, seed=self.cfg.seed)
        if self.cfg.precision == "fp8":
            from frugallm.precision import Fp8Recipe, convert_to_fp8

            convert_to_fp8(model, Fp8Recipe(fp8_saved_activations=self.cfg.fp8_saved_activations),
                           backend=self.cfg.fp8_backend)
        if self.cfg.activation_checkpointing:
            from frugallm.train.distributed import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return self.dist.parallelize(model)

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

    def run(self, stop_after_step: int | None = None) -> RunResult:
        """Train to the configured horizon. ``stop_after_step`` behaves as a SIGINT arriving during that
        step (a checkpoint, then return): tests use it to interrupt a run at a known point."""
        from frugallm.data.loader import TokenLoader
        from frugallm.train.evaluate import evaluate
        from frugallm.train.rate import RateMeter

        cfg, is_main = self.cfg, self.dist.is_main
        if self.resume:
            self._check_resume()
        elif is_main and (self.run_dir / "checkpoints").is_dir() and latest_checkpoint(self.run_dir):
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume {self.run_dir} to "
                              f"continue it, or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        corpus = self._prepare_data()
        if is_main:
            write_run_config(self.run_dir / "config.toml", self.model_cfg, cfg)
            shutil.copyfile(corpus.tokenizer_path, self.run_dir / "tokenizer.json")
        model = self._build()
        optimizer = build_optimizer(model, cfg)
        window = cfg.seq_len + 1 + self.depth
        loader = TokenLoader(corpus, "train", global_batch=cfg.batch_size, window=window, seed=cfg.seed,
                             rank=self.dist.rank, world_size=self.dist.world_size)
        step, tokens, elapsed_before = 0, 0, 0.0
        if self.resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is not None:
                if self.dist.world_size > 1:  # into the shards, from a checkpoint of any layout
                    from frugallm.train.dist_checkpoint import load_any_checkpoint

                    state = load_any_checkpoint(ckpt, model, optimizer)
                else:
                    state = load_checkpoint(ckpt, self.dist.unwrap(model), optimizer)
                loader.load_state_dict(state["loader"])
                step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        metrics = MetricsWriter(self.run_dir, enabled=is_main)
        meter = RateMeter(self.model_cfg, cfg, self.device, world_size=self.dist.world_size,
                          compute=self.outer_precision)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext())
        micro = cfg.batch_size // cfg.grad_accum // self.dist.world_size
        tokens_per_step = cfg.batch_size * cfg.seq_len
        start = time.perf_counter()
        last_eval = last_ckpt = start
        interrupted = False
        ui = _ProgressLine(enabled=self.progress and is_main)
        bar_total = cfg.max_steps
        ui.start(bar_total, step)
        model.train()
        with _Stop() as stop:
            # clock- and signal-driven decisions are agreed by all ranks (Dist.any), or their collectives part ways
            while not self.dist.any(self._done(step, tokens, elapsed_before + time.perf_counter() - start)):
                t0 = time.perf_counter()
                elapsed = elapsed_before + t0 - start
                lr = wsd_lr(cfg, step, self._progress_fraction(step, tokens, elapsed))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = loader.next_batch().to(self.device, non_blocking=True)  # [B/ws, window]
                loads = None
                sums = torch.zeros(3, device=self.device)  # main, mtp, balance
                for chunk in batch.split(micro):
                    with autocast:
                        out = model(chunk, train=True)
                    mtp = torch.stack(out.mtp_losses).mean() if out.mtp_losses else out.loss.new_zeros(())
                    total = out.loss + cfg.mtp_lambda * mtp + cfg.balance_alpha * out.balance_loss
                    (total / cfg.grad_accum).backward()
                    sums += torch.stack([out.loss.detach(), mtp.detach(), out.balance_loss.detach()]).float()
                    if out.loads is not None:
                        loads = out.loads if loads is None else loads + out.loads
                sums /= cfg.grad_accum
                grad_norm = self.dist.clip_grad_norm(model, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if loads is not None:
                    loads = self.dist.all_reduce_sum(loads)  # every rank applies the same bias update
                    self.dist.unwrap(model).update_expert_bias(loads, cfg.bias_gamma)
                sums = self.dist.all_reduce_mean(sums)
                step += 1
                tokens += tokens_per_step
                step_s = time.perf_counter() - t0
                meter.update(tokens_per_step, step_s)
                if not all(math.isfinite(v) for v in sums.tolist()):
                    raise ResourceError(f"the loss became non-finite at step {step} (lr {lr:.2e}); lower lr "
                                        f"or use precision fp32; the last checkpoint is intact")
                if step % cfg.log_every == 0 or step == 1:
                    elapsed = elapsed_before + time.perf_counter() - start
                    rec = {"step": step, "loss": sums[0].item(), "tokens": tokens, "lr": lr,
                           "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 3),
                           **meter.snapshot(elapsed)}
                    if self.depth:
                        rec["mtp_loss"] = sums[1].item()
                    if loads is not None:
                        rec["balance_loss"] = sums[2].item()
                        rec.update(load_stats(loads))
                    metrics.write(rec)
                    ui.update(step, rec)
                now = time.perf_counter()
                if stop_after_step is not None and step >= stop_after_step:
                    stop.requested = True
                eval_due, ckpt_due, stop.requested = self.dist.any_each(
                    now - last_eval >= cfg.eval_every_s, now - last_ckpt >= cfg.checkpoint_every_s, stop.requested)
                if eval_due:
                    ev = evaluate(self.dist.unwrap(model), corpus, seq_len=cfg.seq_len, batch=micro,
                                  max_windows=cfg.eval_windows, device=self.device, autocast_dtype=self.amp_dtype)
                    metrics.write({"step": step, "tokens": tokens, **ev})
                    ui.note(f"step {step}: val_loss {ev['val_loss']:.4f}  val_bpb {ev['val_bpb']:.3f}")
                    last_eval = time.perf_counter()
                if stop.requested or ckpt_due:
                    self._checkpoint(step, tokens, elapsed_before + now - start, model, optimizer, loader)
                    last_ckpt = time.perf_counter()
                if stop.requested:
                    interrupted = True
                    break
        ui.stop()
        elapsed = elapsed_before + time.perf_counter() - start
        self._checkpoint(step, tokens, elapsed, model, optimizer, loader)
        result = RunResult(self.run_dir, step, tokens, elapsed, interrupted)
        if interrupted:
            metrics.close()
            return result
        final = evaluate(self.dist.unwrap(model), corpus, seq_len=cfg.seq_len, batch=micro, device=self.device,
                         autocast_dtype=self.amp_dtype)
        metrics.write({"step": step, "tokens": tokens, "final": True, **final})
        metrics.close()
        result.final = final
        result.cost = {**meter.cost_record(tokens, elapsed), "memory_estimate": self.memory_estimate,
                       **peak_memory(self.device)}
        export = self.dist.gather_model(model)  # collective; the full model on rank 0 only
        if is_main:
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
        save_checkpoint(self.run_dir, step, self.dist.unwrap(model), optimizer,
                        {"tokens": tokens, "elapsed_s": elapsed, "loader": loader.state_dict()},
                        keep=self.cfg.keep_checkpoints)

    def _export(self, model: torch.nn.Module) -> None:
        inner = self.dist.unwrap(model)
        if self.model_cfg.hf_export_problem() is not None:
            return  # baselines have no Hugging Face DeepSeek equivalent
        from frugallm.model.hf import save_pretrained

        export = inner
        if self.cfg.precision == "fp8":
            export = build_model(self.model_cfg, device="cpu", init=False)
            export.load_state_dict({k: v.float().cpu() for k, v in inner.state_dict().items()}, strict=False)
        save_pretrained(export, self.run_dir / "model",
                        extra_files={"tokenizer.json": self.run_dir / "tokenizer.json"})


class _ProgressLine:
    """A live line (rich) with step, loss, throughput, MFU and dollars so far."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and os.environ.get("FRUGALLM_NO_PROGRESS") is None
        self._progress = None

    def start(self, total: int | None, step: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("starting", total=total, completed=step)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self._progress is None:
            return
        desc = (f"step {step}  loss {rec['loss']:.3f}  lr {rec['lr']:.1e}  "
                f"{rec.get('tokens_per_s', 0):,.0f} tok/s")
        if rec.get("mfu") is not None:
            desc += f"  MFU {rec['mfu'] * 100:.1f}%"
        if "load_max_over_mean" in rec:
            desc += f"  load max/mean {max(rec['load_max_over_mean']):.2f}"
        if rec.get("cost_usd") is not None:
            desc += f"  ${rec['cost_usd']:.4f}"
        self._progress.update(self._task, completed=step, description=desc)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
