"""``frugallm merge RUN --out DIR``: a LoRA run's adapters folded into its base, written as a Hugging Face
directory that any DeepSeek-architecture loader reads without peft.

    W' = W + (alpha / r) * B A        per linear, and per expert for the routed experts
The merged model computes what the run computed with its adapters beside the base (``tune.lora``'s merge,
tested to 1e-5 in float32). With ``--fp8`` the merged weights are requantized to the published layout
(e4m3 in 128x128 blocks with float32 ``weight_scale_inv``), the base's own format when it was FP8, and the
requantization error is measured and printed: merging changes every weight of a block, so the blocks of
the base no longer hold exactly and each is rounded again.
"""

from __future__ import annotations

from pathlib import Path

import torch

from frugallm.errors import CheckpointError
from frugallm.tune.finetune import TOKENIZER_FILES, read_finetune_config


def merge_run(run_dir: str | Path, out: str | Path, *, fp8: bool = False) -> list[str]:
    """Write the merged directory; returns the lines to print."""
    from frugallm.model.hf import save_pretrained
    from frugallm.rundir import find_model, load_model

    run = Path(run_dir)
    ft = read_finetune_config(run)
    if ft is None:
        raise CheckpointError(f"{run}: not a fine-tuning run (no config.toml with [finetune])")
    source = find_model(run)
    if not source.kind.startswith("adapter"):
        raise CheckpointError(f"{run}: a full fine-tuning run; its model/ directory is already merged")
    out = Path(out)
    if out.resolve() in (run.resolve(), Path(ft.base).resolve()):
        raise CheckpointError(f"--out {out}: would overwrite the run or its base; choose a new directory")
    model, _ = load_model(run, dtype=torch.float32)
    extra = {name: run / name for name in TOKENIZER_FILES if (run / name).is_file()}
    lines = [f"merged {source.path} into {ft.base}"]
    if fp8:
        from frugallm.model.hf import published_fp8_modules
        from frugallm.precision.frozen import requantization_error

        err = requantization_error(_fp8_weights(model, published_fp8_modules(model)))
        save_pretrained(model, out, extra_files=extra, fp8_blocks=True)
        lines.append(f"requantized {err.elements:,} weights to e4m3 in 128x128 blocks: relative error "
                     f"{err.rel_frobenius:.3e} (Frobenius, all weights), max abs error {err.max_abs:.3e}, worst "
                     f"weight {err.worst} at {err.worst_rel:.3e}")
    else:
        save_pretrained(model, out, dtype=torch.bfloat16 if _base_is_low_precision(ft.base) else None,
                        extra_files=extra)
    lines.append(f"wrote {out}")
    return lines


def _fp8_weights(model: torch.nn.Module, names: list[str]):  # type: ignore[no-untyped-def]
    """(name, float weight) of each module the published layout stores in e4m3, one at a time."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        if hasattr(m, "weight"):
            yield f"{name}.weight", m.weight
        else:  # routed experts: the stacked projections
            for which in m.PROJECTIONS:
                yield f"{name}.{which}", getattr(m, which)


def _base_is_low_precision(base: str) -> bool:
    """Save in bf16 when the base came in bf16 or FP8 (doubling a 671B checkpoint to fp32 helps nobody)."""
    import json

    from frugallm.rundir import find_model

    source = find_model(base)
    cfg = source.path / "config.json"
    if source.kind == "checkpoint" or not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return d.get("torch_dtype", d.get("dtype")) == "bfloat16" or "quantization_config" in d
