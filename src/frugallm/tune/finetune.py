"""Fine-tuning open weights on conversations: ``frugallm finetune``.

The training loop is ``train.loop.Trainer``'s (schedule, precision, checkpoints and resume, metrics, cost,
SIGINT handling, torchrun); ``FineTuner`` changes what its hooks do:
    data        ``.jsonl`` rows through ``tune.sft`` (the chat template, loss masks, counted refusals, the
                hash split), packed into ``seq_len``-token rows with segment ids (``packed=False`` pads one
                example to a row instead); the built-in stdlib chat set when no file is given
    model       the base from ``--from`` (``frugallm.rundir``: a Hugging Face directory, the published FP8
                layout, a frugallm run), then LoRA (``tune.lora``: base frozen, adapters train) or every
                parameter (full). An FP8 base keeps its e4m3 weights under LoRA (``fp8_base``).
    balancing   the router is frozen and the bias update is off by default: adapting to a small set must
                not reshuffle which experts the base learned to use. Expert load is logged either way.
                With the router frozen the balance loss would only push the adapters to move routing, so its
                weight defaults to 0.
    forward     ``forward_train`` with labels, segment ids and positions: the loss falls on the trained
                tokens only and no example attends to another packed beside it
    evaluation  the mean loss on the validation rows' trained (assistant) tokens, before training (the
                base) and after
    checkpoint  a LoRA run keeps only its adapters (and the bias when it moves); the frozen base is read
                again from ``--from`` on resume. Full runs keep everything, as ``frugallm train``.
    export      LoRA: ``RUN/adapter`` in the PEFT format (``tune.adapter``); full: ``RUN/model`` as train.

The run directory: config.toml ([model] the base's, [train], [finetune]), tokenizer.json and
tokenizer_config.json (with the chat template used, so serving renders conversations as training did),
sft_report.json, metrics.jsonl, cost.json, checkpoints/, adapter/ or model/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugallm.config import ModelConfig, reject_unknown_fields
from frugallm.errors import CheckpointError, ConfigError, DataError, ResourceError
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer
from frugallm.tune.sft import IGNORE, OVERFLOW, SFTBatch, SFTConfig, load_sft, pack

METHODS = ("lora", "full")
FP8_BASE = ("auto", "keep", "dequantize")
BUILTIN = "builtin:stdlib-chat"  # the data name of the built-in set (also what data = None means)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(kw_only=True)
class FinetuneConfig:
    base: str  # --from: what ``frugallm.rundir`` loads
    data: list[str] | None = None  # .jsonl files; None: the built-in stdlib chat set
    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: the default targets (``frugallm.tune.targets``)
    train_on: str = "assistant"  # assistant | last | all
    overflow: str = "truncate"  # truncate | drop, for rows over seq_len
    packed: bool = True
    val_fraction: float = 0.05
    freeze_router: bool = True
    update_bias: bool = False
    fp8_base: str = "auto"  # auto: keep e4m3 for LoRA over an FP8 checkpoint, dequantize for full
    demo_rows: int = 2000  # rows of the built-in set

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fp8_base not in FP8_BASE:
            raise ConfigError(f"fp8_base must be one of {', '.join(FP8_BASE)}, got {self.fp8_base!r}")
        if self.method == "full" and self.fp8_base == "keep":
            raise ConfigError("fp8_base = 'keep' needs method = 'lora': full fine-tuning updates every weight and "
                              "needs a high-precision master copy of each")
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.data, str):
            self.data = [self.data]
        SFTConfig(train_on=self.train_on)  # validates train_on  # type: ignore[arg-type]

    def lora(self) -> Any:
        from frugallm.tune.lora import LoraConfig

        kw: dict[str, Any] = {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout}
        if self.lora_targets:
            kw["targets"] = tuple(self.lora_targets)
        return LoraConfig(**kw)

    def sft(self, seq_len: int) -> SFTConfig:
        return SFTConfig(max_seq_len=seq_len, overflow=self.overflow, train_on=self.train_on,  # type: ignore[arg-type]
                         val_fraction=self.val_fraction)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        reject_unknown_fields(cls, d, "finetune config")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid finetune config: {e}") from None

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)


def train_defaults(method: str) -> TrainConfig:
    """The training settings fine-tuning starts from (flags override them): a LoRA adapter takes a learning
    rate ~10x a full fine-tune's and no weight decay (decay would pull B back to 0, the base model), short
    warmup, 512-token packed rows, the balance loss off (module doc), and a 9-minute budget, so that the
    whole command (the base's evaluation, training, the final one, the samples) fits in 10."""
    lora = method == "lora"
    return TrainConfig(lr=2e-4 if lora else 2e-5, warmup_steps=10, weight_decay=0.0 if lora else 0.1,
                       batch_size=8, seq_len=512, balance_alpha=0.0, eval_every_s=120.0, eval_windows=64,
                       log_every=5, time_budget_s=540.0)


# ----- where the base comes from ------------------------------------------------------------------------
def base_config(path: str | Path) -> ModelConfig:
    """The base model's configuration, reading no tensor."""
    from frugallm.model.hf import read_config
    from frugallm.rundir import find_model
    from frugallm.train.runconfig import read_run_config

    source = find_model(path)
    if source.kind == "checkpoint":
        return read_run_config(source.root / "config.toml")[0]
    if source.kind == "adapter":
        raise ConfigError(f"--from {path}: a LoRA fine-tuning run; merge it first (frugallm merge {path} --out DIR) "
                          f"and fine-tune the merged directory")
    cfg = read_config(source.path)
    return cfg


def base_is_fp8(path: str | Path) -> bool:
    """Whether the base checkpoint stores weights in e4m3 (the published DeepSeek layout)."""
    from frugallm.rundir import find_model

    source = find_model(path)
    if source.kind == "checkpoint":
        return False
    cfg_file = source.path / "config.json"
    try:
        quant = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return quant.get("quant_method") == "fp8"


def tokenizer_dir(path: str | Path) -> Path:
    """Where the base's tokenizer.json lies: its HF directory, else the run's root."""
    from frugallm.rundir import find_model

    source = find_model(path)
    for d in (source.path, source.root):
        if (d / "tokenizer.json").is_file():
            return d
    raise CheckpointError(f"--from {path}: no tokenizer.json in {source.path} or {source.root}")


def keeps_fp8(ft: FinetuneConfig) -> bool:
    """Whether the base's e4m3 weights stay e4m3 (``fp8_base``: keep, or auto for LoRA over an FP8 checkpoint)."""
    return ft.fp8_base == "keep" or (ft.fp8_base == "auto" and ft.method == "lora" and base_is_fp8(ft.base))


def load_base(ft: FinetuneConfig, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """The base model, with FP8 weights kept in e4m3 where ``fp8_base`` says so."""
    from frugallm.model.hf import from_pretrained
    from frugallm.rundir import find_model, load_model

    keep = keeps_fp8(ft)
    source = find_model(ft.base)
    if keep:
        return from_pretrained(source.path, device=device, dtype=dtype, fp8="keep")
    model, _ = load_model(ft.base, device=device, dtype=dtype)
    return model


# ----- data ---------------------------------------------------------------------------------------------
@dataclass
class SFTCorpus:
    train: SFTBatch
    val: SFTBatch
    report: Any  # tune.sft.SFTReport
    pad_id: int
    val_where: list[str]  # "path:line" of each validation row, in order


def builtin_rows_file(cache: Path, rows: int) -> Path:
    """The built-in stdlib chat set as a .jsonl file under ``cache`` (written once, atomically)."""
    from frugallm import fsio
    from frugallm.tune.sft import stdlib_chat_rows

    path = cache / f"stdlib_chat_{rows}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsio.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stdlib_chat_rows(rows)))
    return path


def data_files(ft: FinetuneConfig, cache: Path) -> list[str]:
    if not ft.data or ft.data == [BUILTIN]:
        return [str(builtin_rows_file(cache, ft.demo_rows))]
    missing = [p for p in ft.data if not Path(p).is_file()]
    if missing:
        raise DataError(f"--data: no such file {missing[0]}")
    return list(ft.data)


def pad_id_of(tokenizer: Any, eos_token: str | None) -> int:
    """Padding never enters a loss or an attention row; any id works, the EOS one reads best in dumps."""
    if eos_token and tokenizer.token_to_id(eos_token) is not None:
        return int(tokenizer.token_to_id(eos_token))
    return 0


def prepare_sft(ft: FinetuneConfig, seq_len: int, tok_dir: Path, cache: Path) -> tuple[SFTCorpus, Any]:
    """Rows -> packed (or padded) train and validation rows, and the chat template used."""
    from frugallm.data.chat import ChatTemplate
    from frugallm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    template = ChatTemplate.from_dir(tok_dir)
    data = load_sft(data_files(ft, cache), tokenizer, template, ft.sft(seq_len))
    if not data.train:
        raise DataError(f"no usable training rows ({data.report.format()})")
    pad = pad_id_of(tokenizer, template.eos_token)
    corpus = SFTCorpus(train=pack(data.train, seq_len, pad, packed=ft.packed),
                       val=pack(data.val, seq_len, pad, packed=ft.packed), report=data.report, pad_id=pad,
                       val_where=[ex.where for ex in data.val])
    return corpus, template


class SFTLoader:
    """Training rows in a seeded order, epoch after epoch; any rank resumes from (epoch, index).

    Epoch e visits the N packed rows in the order of ``data.loader.permute``; a step takes the next G ids
    of that stream (crossing epochs), and rank r keeps rows [r*B, (r+1)*B) of them, as ``TokenLoader``."""

    def __init__(self, rows: SFTBatch, *, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.rows, self.n = rows, len(rows)
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.index = 0

    def next_batch(self) -> SFTBatch:
        from frugallm.data.loader import permute

        ids = []
        while len(ids) < self.global_batch:
            take = min(self.global_batch - len(ids), self.n - self.index)
            ids.extend(permute(np.arange(self.index, self.index + take), self.n, self.seed, self.epoch).tolist())
            self.index += take
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
        per = self.global_batch // self.world_size
        mine = ids[self.rank * per : (self.rank + 1) * per]
        return self.rows.rows(torch.tensor(mine, dtype=torch.long))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "rows": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rows") != self.n:
            raise CheckpointError(f"the checkpoint's data had {state.get('rows')} packed rows, this data has "
                                  f"{self.n}: resume with the same --data, seq_len and packing")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


@torch.no_grad()
def sft_evaluate(model: torch.nn.Module, rows: SFTBatch, *, batch: int, device: torch.device | str,
                 autocast_dtype: torch.dtype | None = None, max_rows: int | None = None) -> dict[str, Any]:
    """Mean next-token loss over the trained (assistant) tokens of ``rows``, the main head only."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    ctx = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    total, count = 0.0, 0
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    try:
        for start in range(0, n, batch):
            b = rows.rows(slice(start, min(start + batch, n))).to(dev)
            with ctx:
                out = model.forward_train(b.input_ids, labels=b.labels, segment_ids=b.segment_ids,
                                          position_ids=b.position_ids, reduction="sum")
            total += float(out.loss)
            count += int((b.labels != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_tokens": 0}
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


# ----- the run ------------------------------------------------------------------------------------------
class FineTuner(Trainer):
    """``Trainer`` with the fine-tuning hooks of the module doc."""

    def __init__(self, ft: FinetuneConfig, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool = True, dist: Any = None, kernel_override: str | None = None):
        self.ft = ft = ft.replace(base=str(Path(ft.base).resolve()), data=_absolute(ft.data))  # as recorded
        self.lora_cfg = ft.lora() if ft.method == "lora" else None
        super().__init__(base_config(ft.base), cfg, run_dir, resume=resume, progress=progress, dist=dist,
                         kernel_override=kernel_override)
        self.trainable = (0, 0)  # (trainable, total) parameters, known once built
        self.before: dict[str, Any] = {}

    @property
    def update_bias(self) -> bool:  # type: ignore[override]
        return self.ft.update_bias

    def check_memory(self, model_cfg: ModelConfig, cfg: TrainConfig, outer: str) -> Any:
        """Full fine-tuning is training (``train.memory``); LoRA holds the frozen base (e4m3 where kept) and
        trains only the adapters (``cost.finetune``)."""
        if self.ft.method == "full":
            return super().check_memory(model_cfg, cfg, outer)
        from frugallm.cost.finetune import finetune_memory
        from frugallm.cost.memory import format_bytes
        from frugallm.train.device import available_memory
        from frugallm.train.memory import MemoryCheck

        keep = keeps_fp8(self.ft)
        world = self.dist.world_size
        mem = finetune_memory(model_cfg, method="lora", base_precision="fp8" if keep else "bf16",
                              lora_rank=self.ft.lora_rank, targets=self.lora_cfg.targets, seq_len=cfg.seq_len,
                              micro_batch=max(1, cfg.batch_size // cfg.grad_accum // world),
                              activation_checkpointing=cfg.activation_checkpointing, adam_moments=cfg.adam_moments,
                              gpus=world)
        d = mem.as_dict()
        if outer == "fp32":  # the base is held in float32 where the device computes in float32 (the CPU)
            d["weights"] += mem.weights_bf16
            d["total"] += mem.weights_bf16
        est = {"weights": d["weights"] + d["gathered_layer"], "grads": d["grads"],
               "optimizer": d["optimizer"], "activations": d["activations"], "step_buffers": d["step_buffers"],
               "trainable": d["trainable_master"], "total": d["total"]}
        available = available_memory(self.device)
        if est["total"] > available:
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items() if v and k != "total")
            raise ResourceError(f"LoRA fine-tuning needs about {format_bytes(est['total'])} but this "
                                f"{self.device.type} device has {format_bytes(available)} ({parts}); shorten "
                                f"--seq-len, lower --batch-size or pass --activation-checkpointing")
        return MemoryCheck(est, available)

    # ----- set-up -------------------------------------------------------------------------------------
    def _check_resume(self) -> None:
        super()._check_resume()
        saved = read_finetune_config(self.run_dir)
        if saved is None:
            raise ConfigError(f"--resume {self.run_dir}: not a fine-tuning run (no [finetune] in its config.toml)")
        keys = ("base", "data", "method", "lora_rank", "lora_alpha", "lora_targets", "train_on", "packed")
        diff = [k for k in keys if getattr(saved, k) != getattr(self.ft, k)]
        if diff:
            raise ConfigError(f"--resume {self.run_dir}: the fine-tuning settings differ from the run's "
                              f"({', '.join(diff)}); resume with the run's own settings")

    def _start(self) -> SFTCorpus:  # type: ignore[override]
        from frugallm.train.runconfig import write_run_config

        self._open_run_dir()
        tok_dir = tokenizer_dir(self.ft.base)
        corpus, template = prepare_sft(self.ft, self.cfg.seq_len, tok_dir, self.run_dir.parent / ".cache" / "sft")
        if corpus.report.tokens and self.model_cfg.vocab_size < _max_id(corpus) + 1:
            raise ConfigError(f"the tokenizer in {tok_dir} produces id {_max_id(corpus)} but the model's "
                              f"vocab_size is {self.model_cfg.vocab_size}")
        if self.dist.is_main:
            write_run_config(self.run_dir / "config.toml", self.model_cfg, self.cfg, finetune=self.ft.to_dict())
            for name in TOKENIZER_FILES:
                if (tok_dir / name).is_file():
                    shutil.copyfile(tok_dir / name, self.run_dir / name)
            template.write(self.run_dir)  # the template training rendered with, for serving
            corpus.report.write(self.run_dir / "sft_report.json")
        self.corpus = corpus
        return corpus

    def _build(self) -> torch.nn.Module:
        dtype = torch.float32
        if self.lora_cfg is not None and self.amp_dtype is not None:
            dtype = self.amp_dtype  # the frozen base needs no fp32 master copy
        model = load_base(self.ft, self.device, dtype)
        self.model_cfg = _same_config(self.model_cfg, model.config)
        from frugallm.kernels import install

        install(model, self.kernels)
        if self.cfg.precision == "fp8":  # FP8 GEMMs for the (frozen or trained) high-precision weights
            from frugallm.precision import Fp8Recipe, convert_to_fp8

            convert_to_fp8(model, Fp8Recipe(fp8_saved_activations=self.cfg.fp8_saved_activations),
                           backend=self.cfg.fp8_backend)
        if self.lora_cfg is not None:
            from frugallm.tune.lora import apply_lora

            apply_lora(model, self.lora_cfg)
        if self.ft.freeze_router:
            for moe in model.moe_layers():
                moe.gate.weight.requires_grad_(False)
        self.model = model  # the unwrapped model, for tests and reports
        params = {id(p): p for p in model.parameters()}.values()
        self.trainable = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        if self.cfg.activation_checkpointing:
            from frugallm.train.distributed import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        return self.dist.parallelize(model)

    # ----- hooks --------------------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, chunk: SFTBatch) -> Any:
        return model(chunk.input_ids, train=True, labels=chunk.labels, segment_ids=chunk.segment_ids,
                     position_ids=chunk.position_ids)

    def make_loader(self, corpus: SFTCorpus) -> SFTLoader:  # type: ignore[override]
        return SFTLoader(corpus.train, global_batch=self.cfg.batch_size, seed=self.cfg.seed, rank=self.dist.rank,
                         world_size=self.dist.world_size)

    def evaluate(self, model: torch.nn.Module, corpus: SFTCorpus, max_windows: int | None) -> dict[str, Any]:  # type: ignore[override]
        return sft_evaluate(model, corpus.val, batch=self.micro, device=self.device,
                            autocast_dtype=self.amp_dtype, max_rows=max_windows)

    def before_training(self, model: torch.nn.Module, corpus: SFTCorpus) -> dict[str, Any]:
        """The base's held-out loss, to compare the result with."""
        self.before = self.evaluate(self.dist.unwrap(model), corpus, None)
        return {f"{k}_before": v for k, v in self.before.items()}

    def flops_per_token(self) -> float | None:
        """LoRA skips the base's weight gradients: about 2/3 of full training (``cost.finetune``)."""
        if self.lora_cfg is None:
            return None
        from frugallm.cost.finetune import finetune_flops_per_token

        return finetune_flops_per_token(self.model_cfg, self.cfg.seq_len, method="lora", lora_rank=self.ft.lora_rank,
                                        targets=self.lora_cfg.targets)

    def checkpoint_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        if self.lora_cfg is None:
            return None
        keep = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if self.update_bias:
            keep.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        return keep

    def _finish(self, clock: Any, model: torch.nn.Module, optimizer: Any, loader: Any, corpus: Any,
                metrics: Any, meter: Any, interrupted: bool) -> Any:
        result = super()._finish(clock, model, optimizer, loader, corpus, metrics, meter, interrupted)
        before = self.before or _logged_before(self.run_dir)
        result.final.update({f"{k}_before": v for k, v in before.items()})
        if not interrupted:
            t, n = self.trainable
            result.final.update(trainable_parameters=t, total_parameters=n)
        return result

    # ----- what the CLI prints ------------------------------------------------------------------------
    def report_lines(self, result: Any) -> str:
        from frugallm.cost.memory import format_bytes

        rep = self.corpus.report
        lines = ["data: " + rep.format().replace("\n", "\n  ")]
        t, n = self.trainable
        if n:
            lines.append(f"trainable parameters: {t:,} of {n:,} ({t / n:.3%})"
                         + (f"  [LoRA r={self.ft.lora_rank}, alpha={self.ft.lora_alpha:g}]" if self.lora_cfg else ""))
        f, c = result.final, result.cost
        if "val_loss" in f:
            before = f.get("val_loss_before")
            lines.append(f"held-out loss on trained tokens ({f.get('val_tokens', 0):,} tokens): "
                         + (f"before {before:.4f}  ->  " if before is not None else "") + f"after {f['val_loss']:.4f}")
        if c:
            lines.append(f"steps {result.step}   {result.elapsed_s:.0f} s   {c.get('tokens_per_second', 0):,.0f} "
                         f"tokens/s   {c.get('device_hours', 0):.4f} {c.get('device_kind')}-hours"
                         + (f"   ${c['cost_usd']:.4f}" if c.get("cost_usd") is not None else ""))
            if c.get("memory_peak_bytes"):
                lines.append(f"memory: measured peak {format_bytes(c['memory_peak_bytes'])} "
                             f"({c['memory_peak_source']})")
        out = self.run_dir / ("adapter" if self.lora_cfg else "model")
        if out.is_dir():
            lines.append(f"wrote {out}" + ("  (PEFT format; frugallm merge for a merged model)" if self.lora_cfg else ""))
        return "\n".join(lines)

    def sample_prompt(self) -> list[dict[str, Any]] | None:
        """The first held-out conversation up to its last assistant turn (None if none is held out)."""
        return first_held_out_prompt(self.corpus)

    def _export(self, model: torch.nn.Module) -> None:
        if self.lora_cfg is None:
            super()._export(model)
            return
        from frugallm.tune.adapter import save_adapter

        inner = self.dist.unwrap(model)
        save_adapter(inner, self.run_dir / "adapter", self.lora_cfg,
                     base_model_name_or_path=str(Path(self.ft.base).resolve()))
        if self.update_bias:  # the PEFT format has no place for a buffer: beside it, read by frugallm only
            from safetensors.torch import save_file

            from frugallm import fsio
            from frugallm.rundir import EXPERT_BIAS_FILE

            bias = {n: b.detach().cpu().contiguous() for n, b in inner.named_buffers()
                    if n.endswith("e_score_correction_bias")}
            with fsio.atomic_path(self.run_dir / EXPERT_BIAS_FILE) as tmp:
                save_file(bias, str(tmp))
            logging.getLogger("frugallm.tune").warning(
                "the experts' balancing bias moved (--update-bias): it is in %s, which peft does not read",
                EXPERT_BIAS_FILE)


def read_finetune_config(run_dir: str | Path) -> FinetuneConfig | None:
    """A fine-tuning run's settings, or None when ``run_dir`` is not one."""
    from frugallm.train.runconfig import read_finetune_table

    path = Path(run_dir) / "config.toml"
    table = read_finetune_table(path) if path.is_file() else None
    if table is None:
        return None
    try:
        return FinetuneConfig.from_dict(table)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _logged_before(run_dir: Path) -> dict[str, Any]:
    """A resumed run's base figures, from its step-0 metrics line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(k.endswith("_before") for k in rec):
            return {k[: -len("_before")]: v for k, v in rec.items() if k.endswith("_before")}
    return {}


def first_held_out_prompt(corpus: SFTCorpus) -> list[dict[str, Any]] | None:
    for where in corpus.val_where:
        path, _, line = where.rpartition(":")
        try:
            with open(path, encoding="utf-8") as f:
                row = json.loads(f.readlines()[int(line) - 1])
        except (OSError, ValueError, IndexError):
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list):
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last:
                return messages[: last + 1]
        elif isinstance(row, dict) and "prompt" in row:
            return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def compare_samples(base: str | Path, run_dir: str | Path, conversation: list[dict[str, Any]] | None, *,
                    max_tokens: int = 96) -> list[str]:
    """The base's and the fine-tuned run's greedy answers to a held-out prompt, rendered with the run's chat
    template, and the reference answer."""
    if not conversation:
        return ["(no held-out conversation to sample)"]
    from frugallm.serve.engine import Engine, EngineConfig
    from frugallm.serve.loading import load_for_serving
    from frugallm.serve.sampling import SamplingParams

    _, codec = load_for_serving(run_dir)
    prompt, reference = conversation[:-1], conversation[-1]["content"]
    ids = codec.encode(codec.render_chat(prompt), add_special_tokens=False)
    # sampled, not greedy: a small model's greedy answer is one line repeated, whoever trained it
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=0, stop=codec.chat_stops)
    lines = ["held-out prompt:", _indent(prompt[-1]["content"]), "reference answer:", _indent(reference)]
    for label, path in (("base", base), ("fine-tuned", run_dir)):
        model, _ = load_for_serving(path)
        text = Engine(model, codec, EngineConfig(speculative=False)).generate([ids], params)[0].text
        lines += [f"{label} answer (temperature 0.7, top-p 0.95, seed 0, {max_tokens} tokens at most):",
                  _indent(text)]
    return lines


def _indent(text: str, limit: int = 20) -> str:
    rows = text.splitlines()
    more = [f"    ... ({len(rows) - limit} more lines)"] if len(rows) > limit else []
    return "\n".join(["    " + r for r in rows[:limit]] + more)


def _absolute(data: list[str] | None) -> list[str] | None:
    """Data paths as the run records them: absolute, so eval and resume find them from any directory."""
    if not data or data == [BUILTIN]:
        return data
    return [str(Path(p).resolve()) for p in data]


def _max_id(corpus: SFTCorpus) -> int:
    return int(corpus.train.input_ids.max())


def _same_config(expected: ModelConfig, loaded: ModelConfig) -> ModelConfig:
    """The loaded model's config (a transformers export may lack the MTP layers the config names)."""
    if expected.replace(num_nextn_predict_layers=loaded.num_nextn_predict_layers) != loaded:
        raise CheckpointError("the base model loaded with another configuration than its config names")
    return loaded


# ----- frugallm eval PATH --data FILE.jsonl -------------------------------------------------------------
def looks_like_sft(paths: list[str]) -> bool:
    """Whether ``paths`` hold chat or prompt/completion rows (their first non-blank row says)."""
    for p in paths:
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                line = next((x for x in f if x.strip()), "")
        except OSError:
            return False
        try:
            row = json.loads(line)
        except ValueError:
            return False
        if not (isinstance(row, dict) and ("messages" in row or "prompt" in row)):
            return False
    return bool(paths)


def evaluate_sft(path: str | Path, data: list[str] | None, *, split: str = "val", val_fraction: float | None = None,
                 seq_len: int | None = None, train_on: str | None = None, batch: int = 8,
                 device: str = "cpu") -> dict[str, Any]:
    """Held-out loss on the trained (assistant) tokens of ``data`` for any model directory: a base, a
    fine-tuning run, a merged directory. ``split`` val: the rows fine-tuning holds out of the same files
    (the hash split; so base and fine-tuned are compared on the same rows); all: every row."""
    from frugallm.rundir import load_model

    if split not in ("val", "all"):
        raise ConfigError(f"--split must be val or all, got {split!r}")
    ft = read_finetune_config(path)
    settings = ft or FinetuneConfig(base=str(path))
    changes: dict[str, Any] = {"data": data} if data else {}
    if val_fraction is not None:
        changes["val_fraction"] = val_fraction
    if train_on is not None:
        changes["train_on"] = train_on
    settings = settings.replace(**changes)
    if split == "all":
        settings = settings.replace(val_fraction=0.0)
    length = seq_len or (train_defaults(settings.method).seq_len if ft is None else _run_seq_len(path))
    tok_dir = Path(path) if (Path(path) / "tokenizer.json").is_file() else tokenizer_dir(path)
    corpus, _ = prepare_sft(settings, length, tok_dir, Path(path).parent / ".cache" / "sft")
    rows = corpus.val if split == "val" else corpus.train
    model, _ = load_model(path, device=device)
    res = sft_evaluate(model, rows, batch=batch, device=device)
    res.update(rows=len(corpus.val_where) if split == "val" else corpus.report.train_rows, split=split,
               seq_len=length, refused=sum(corpus.report.malformed.values()))
    return res


def _run_seq_len(path: str | Path) -> int:
    from frugallm.train.runconfig import read_run_config

    return read_run_config(Path(path) / "config.toml")[1].seq_len
