"""Reading a trained model from a directory: a frugallm run directory or a Hugging Face DeepSeek-V3 directory.
The one reader behind serving (``serve.loading``), ``frugallm eval`` and the end-of-training sample
(``train.sample``); neither train nor serve owns it.

A run directory, as ``train.loop`` writes it:
    config.toml                  the resolved [model] and [train] tables
    tokenizer.json
    model/                       the final Hugging Face export (config.json, *.safetensors, tokenizer.json);
                                 absent until the run ends, and for configs HF cannot express
    checkpoints/step_NNNNNN/     model.safetensors (our names) + state.json (``train.checkpoint``)

Where the weights come from, for PATH (``find_model``), first match:
    export       PATH/model/config.json
    hf           PATH/config.json: PATH is itself an HF directory (a run's model/ among them)
    adapter      PATH is a LoRA fine-tuning run (config.toml has [finetune] with method lora): its base (where
                 [finetune] base points) with PATH/adapter merged in, else with the adapters of its newest
                 checkpoint (kind adapter-checkpoint)
    checkpoint   PATH/config.toml and a complete checkpoint: the newest one, with a warning that says so
    otherwise    one CheckpointError saying what was looked for
A full fine-tuning run is read as any training run (its export, else its checkpoints hold every weight).
Reading an adapter run needs ``frugallm.tune`` (imported then, and only then: it stands above this module).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from frugallm.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from frugallm.model.transformer import DeepseekV3LM

log = logging.getLogger("frugallm.rundir")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # export | hf | adapter | adapter-checkpoint | checkpoint
    path: Path  # the HF directory, or the checkpoint directory
    root: Path  # the directory given: a run's root or the HF directory, where tokenizer.json is also looked for

    @property
    def note(self) -> str:
        if self.kind in ("checkpoint", "adapter-checkpoint"):
            return (f"{self.root} has no final export (model/); loading its newest checkpoint, "
                    f"{self.path.relative_to(self.root)}")
        return f"loading {self.path}"


def find_model(path: str | Path) -> ModelSource:
    """Which weights PATH holds (the module docstring's order); reads no tensor."""
    from frugallm.train.checkpoint import latest_checkpoint

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"model directory not found: {root}")
    if (root / "model" / "config.json").is_file():
        return ModelSource(kind="export", path=root / "model", root=root)
    if (root / "config.json").is_file():
        return ModelSource(kind="hf", path=root, root=root)
    ckpt = latest_checkpoint(root)
    if (root / "config.toml").is_file() and _is_lora_run(root):
        if (root / "adapter" / "adapter_config.json").is_file():
            return ModelSource(kind="adapter", path=root / "adapter", root=root)
        if ckpt is None:
            raise CheckpointError(f"{root}: a LoRA fine-tuning run with neither its adapter (adapter/) nor a "
                                  f"complete checkpoint yet")
        return ModelSource(kind="adapter-checkpoint", path=ckpt, root=root)
    if (root / "config.toml").is_file():
        if ckpt is None:
            raise CheckpointError(f"{root}: a frugallm run directory with neither a final export (model/) nor a "
                                  f"complete checkpoint (checkpoints/step_*/) yet")
        return ModelSource(kind="checkpoint", path=ckpt, root=root)
    found = " (it has checkpoints/ but no config.toml to build the model from)" if ckpt else ""
    raise CheckpointError(f"{root} is neither a frugallm run directory (model/config.json, or config.toml and "
                          f"checkpoints/) nor a Hugging Face model directory (config.json){found}")


def _is_lora_run(root: Path) -> bool:
    from frugallm.train.runconfig import read_finetune_table

    table = read_finetune_table(root / "config.toml")
    return table is not None and table.get("method", "lora") == "lora"


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[DeepseekV3LM, ModelSource]:
    """The model PATH holds, in ``dtype`` (default float32), and where it came from."""
    import torch

    from frugallm.model import build_model
    from frugallm.model.hf import from_pretrained

    source = find_model(path)
    dtype = dtype or torch.float32
    if source.kind.startswith("adapter"):
        if source.kind == "adapter-checkpoint":
            log.warning("%s", source.note)
        return _load_lora_run(source, device=device, dtype=dtype), source
    if source.kind != "checkpoint":
        return from_pretrained(source.path, device=device, dtype=dtype), source
    from frugallm.train.checkpoint import load_checkpoint
    from frugallm.train.runconfig import read_run_config

    log.warning("%s", source.note)
    model_cfg, _ = read_run_config(source.root / "config.toml")
    model = build_model(model_cfg, device=device, dtype=dtype, init=False)
    with torch.random.fork_rng():  # a checkpoint restores the run's RNG states; loading one keeps ours
        load_checkpoint(source.path, model, None)
    return model, source


def _load_lora_run(source: ModelSource, device: str | torch.device, dtype: torch.dtype) -> DeepseekV3LM:
    """A LoRA run as one plain model: its base with the adapters merged in, so that serving and evaluation
    run the base's kernels (the absorbed MLA decode included) at no adapter cost."""
    import torch

    from frugallm.train.checkpoint import load_checkpoint
    from frugallm.train.runconfig import read_finetune_table
    from frugallm.tune.lora import LoraConfig, apply_lora, merge_lora

    ft = read_finetune_table(source.root / "config.toml") or {}
    base = ft.get("base")
    if not base or not Path(base).exists():
        raise CheckpointError(f"{source.root}: its base model {base} (config.toml [finetune] base) is not there; "
                              f"put it back, or edit base to where it is now")
    model, _ = load_model(base, device=device, dtype=torch.float32)
    if source.kind == "adapter":
        from frugallm.tune.adapter import load_adapter

        load_adapter(model, source.path)
    else:
        kw = {"rank": ft.get("lora_rank"), "alpha": ft.get("lora_alpha"), "dropout": ft.get("lora_dropout")}
        if ft.get("lora_targets"):
            kw["targets"] = tuple(ft["lora_targets"])
        apply_lora(model, LoraConfig(**{k: v for k, v in kw.items() if v is not None}))
        keep = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if ft.get("update_bias"):
            keep.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        with torch.random.fork_rng():
            load_checkpoint(source.path, model, None, tensors=keep)
    if source.kind == "adapter" and ft.get("update_bias"):
        _load_expert_bias(model, source.root)
    merge_lora(model)
    return model.to(dtype)


EXPERT_BIAS_FILE = "expert_bias.safetensors"  # a LoRA run's moved balancing bias (the PEFT format has no place)


def _load_expert_bias(model: DeepseekV3LM, root: Path) -> None:
    from safetensors.torch import load_file

    path = root / EXPERT_BIAS_FILE
    if not path.is_file():
        return
    own = dict(model.named_buffers())
    for name, t in load_file(str(path)).items():
        if name not in own or own[name].shape != t.shape:
            raise CheckpointError(f"{path}: {name} does not fit the model (shape {tuple(t.shape)})")
        own[name].copy_(t)
