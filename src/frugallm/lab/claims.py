"""The claims ``frugallm lab`` tests and the arms of each: what differs from the shared base arm.

Every arm is the base (``tiny``: MLA, DeepSeekMoE with auxiliary-loss-free bias balancing, MTP depth 1,
auto precision, the embedded corpus raw) with one change, so that one base run serves every claim:

    moe-vs-dense  base | dense-active (dense MHA, tiny's active parameters: the ``tiny-dense`` preset)
                       | dense-total (dense MHA, tiny's total parameters, ``cost.params.dense_width_for_params``)
    mla-vs-mha    base | mha (full query projection, per-head K and V cached) | gqa (2 key/value heads)
    balancing     base | aux-loss (bias frozen, the batch-wise auxiliary loss, alpha AUX_ALPHA) | no-balancing
    mtp           base | mtp-off
    fp8           base | fp8 (precision fp8: FP8 GEMMs, the existing recipe)
    curation      base | curated (``frugallm curate``'s default recipe, the base's tokenizer)

The published figure each claim tests is in ``claims.toml`` with its source and date. FLOPs per token come
from the cost model (``cost.flops.train_flops_per_token``), so equal-FLOPs horizons are computed, not guessed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from frugallm.config import ModelConfig, preset
from frugallm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Switch Transformer's coefficient (arXiv 2101.03961, section 2.2: alpha = 1e-2); with the expert-level
# normalisation (frugallm.model.moe) the loss is 1 at a uniform load, as Switch's is
AUX_ALPHA = 1e-2


@dataclass(frozen=True, kw_only=True)
class Arm:
    name: str
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig changes from the base
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig changes from the base
    curated: bool = False  # trains on the curated corpus
    note: str = ""

    def model_config(self, base: ModelConfig) -> ModelConfig:
        return _resolve(base, self.model)


def _resolve(base: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
    from frugallm.cost.params import dense_width_for_params, param_counts

    changes = dict(changes)
    if changes.pop("match_total", False):  # dense width for the base's total parameters
        dense = base.replace(**changes)
        changes["intermediate_size"] = dense_width_for_params(dense, param_counts(base).total)
    elif changes.pop("match_active", False):
        from frugallm.cost.params import match_dense_width

        changes["intermediate_size"] = match_dense_width(base, base.replace(**changes))
    return base.replace(**changes)


_DENSE = dict(attention="mha", ffn="dense", q_lora_rank=None, num_nextn_predict_layers=0)
BASE = Arm(name="base", note="tiny: MLA, MoE, bias balancing, MTP, raw data")
ARMS: dict[str, Arm] = {a.name: a for a in (
    BASE,
    Arm(name="dense-active", model={**_DENSE, "match_active": True}, note="dense MHA, the base's active params"),
    Arm(name="dense-total", model={**_DENSE, "match_total": True}, note="dense MHA, the base's total params"),
    Arm(name="mha", model=dict(attention="mha", q_lora_rank=None), note="MHA attention, MoE as the base"),
    Arm(name="gqa", model=dict(attention="gqa", num_key_value_heads=2, q_lora_rank=None),
        note="GQA (2 KV heads), MoE as the base"),
    Arm(name="aux-loss", train=dict(bias_gamma=0.0, balance_alpha=0.0, aux_loss_alpha=AUX_ALPHA),
        note=f"batch-wise auxiliary loss, alpha {AUX_ALPHA:g}, no bias"),
    Arm(name="no-balancing", train=dict(bias_gamma=0.0, balance_alpha=0.0), note="no balancing at all"),
    Arm(name="mtp-off", model=dict(num_nextn_predict_layers=0), note="no MTP module"),
    Arm(name="fp8", train=dict(precision="fp8"), note="FP8 GEMMs (emulated on a CPU)"),
    Arm(name="curated", curated=True, note="curated corpus, the base's tokenizer"),
)}


@dataclass(frozen=True, kw_only=True)
class Claim:
    name: str
    arms: tuple[str, ...]  # the first is the claim's own arm measured against the others
    metric: str  # the figure the verdict is drawn on
    published: dict[str, str]


def _published() -> dict[str, dict[str, str]]:
    return tomllib.loads(resources.files("frugallm.lab").joinpath("claims.toml").read_text(encoding="utf-8"))


def claims() -> dict[str, Claim]:
    pub = _published()
    spec = {
        "moe-vs-dense": (("base", "dense-active", "dense-total"), "val_loss"),
        "mla-vs-mha": (("base", "mha", "gqa"), "val_loss"),
        "balancing": (("base", "aux-loss", "no-balancing"), "val_loss"),
        "mtp": (("base", "mtp-off"), "val_loss"),
        "fp8": (("fp8", "base"), "val_loss"),
        "curation": (("curated", "base"), "val_loss"),
    }
    return {name: Claim(name=name, arms=arms, metric=metric, published=pub[name])
            for name, (arms, metric) in spec.items()}


def select(names: list[str] | None) -> list[Claim]:
    """The claims asked for (all when none), refusing an unknown name with the allowed ones."""
    table = claims()
    if not names:
        return list(table.values())
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ConfigError(f"unknown claim(s) {', '.join(unknown)}; allowed: {', '.join(table)}")
    return [table[n] for n in dict.fromkeys(names)]


def arm_costs(base: ModelConfig, seq_len: int) -> dict[str, dict[str, float]]:
    """Per arm: parameters (total, active) and training FLOPs per token, from the cost model."""
    from frugallm.cost.flops import train_flops_per_token
    from frugallm.cost.params import param_counts

    out = {}
    for name, arm in ARMS.items():
        cfg = arm.model_config(base)
        counts = param_counts(cfg)
        out[name] = {"params_total": counts.total, "params_active": counts.active,
                     "train_flops_per_token": train_flops_per_token(cfg, seq_len)}
    return out


def base_model() -> ModelConfig:
    return preset("tiny")
