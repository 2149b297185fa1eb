"""LoRA adapters in PEFT's format: ``save_adapter`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads onto transformers'
``DeepseekV3ForCausalLM`` (transformers 5, peft 0.21) to compute what our adapted model computes;
``load_adapter`` reads such a directory back onto our model. Read with json and safetensors only.

Symbols as ``frugallm.tune.lora``: r rank, s = alpha / r, E experts, H hidden, I expert width.

Tensor names are ``base_model.model.<module>`` + a suffix, where <module> is our module name, which is
Hugging Face's (``model.layers.N.self_attn.q_a_proj``):
    linear layers          .lora_A.weight [r, K]   .lora_B.weight [N, r]          delta W = s B A
    routed experts, transformers 5 holds them fused: ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``mlp.experts.down_proj [E, H, I]`` (our layout). PEFT adapts 3-D parameters (``target_parameters``)
    with ``lora.ParamWrapper``: for a parameter [E, N, K] its lora_A is [E*r, K] and lora_B [N, E*r], and
    the weight it uses is (``ParamWrapper.get_delta_weight``, ``_LoraFactorsProxy``)
        W_e + s * B_e A_e,   A_e = lora_A[e*r : (e+1)*r],   B_e[:, j] = lora_B[:, j*E + e]
    that is, one rank-r adapter per expert: exactly ours. So
        lora_A = A.reshape(E*r, K)                 our A [E, r, K]
        lora_B = B.permute(1, 2, 0).reshape(N, r*E)  our B [E, N, r]
    Both expert parameters live on one module, so PEFT nests two wrappers, gate_up_proj (registered first)
    inside: its tensors are ``mlp.experts.base_layer.lora_{A,B}.weight``, down_proj's
    ``mlp.experts.lora_{A,B}.weight``. Our fused gate_up adapter is PEFT's adapter on the fused parameter;
    no split into gate and up is involved.

Targets. Attention projections go in ``target_modules`` by full name. On transformers 5, PEFT rewrites any
``target_modules`` entry named ``gate_proj``, ``up_proj``, ``down_proj`` or ``gate`` of a deepseek_v3
model into the routed experts' fused parameters (``peft.utils.transformers_weight_conversion.
_convert_peft_config_moe``, meant for adapters trained on transformers 4's per-expert modules; peft issue
3711), which would drop the dense MLPs' and shared experts' adapters and put new ones on every layer's
routed experts. So those linears are written as ``target_parameters`` (``<module>.weight``, which
ParamWrapper adapts as W + s B A, the same delta) and the rewrite never sees them.

PEFT refuses ``lora_dropout`` != 0 wherever ``target_parameters`` is used (a weight-space delta cannot
drop input features), so an adapter with any such target is written with ``lora_dropout`` 0: dropout is
a training setting and changes nothing an adapter computes once trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from frugallm import fsio
from frugallm.errors import CheckpointError, ConfigError
from frugallm.model.moe import GroupedExperts
from frugallm.tune.lora import (
    MTP_PREFIX,
    LoraConfig,
    LoraExperts,
    apply_lora,
    lora_modules,
    resolve_targets,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# leaf names transformers 5 + peft rewrite into routed-expert targets for deepseek_v3 (module doc)
PEFT_MOE_RENAMED = frozenset({"gate_proj", "up_proj", "down_proj", "gate"})
# PEFT's nesting on the experts module: the parameter registered first is wrapped first (innermost)
EXPERT_SUFFIX = {"gate_up_proj": ".base_layer", "down_proj": ""}

# adapter_config fields read for what they say, whatever their value
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters"}
# fields that do not change what a loaded adapter computes
_INFORMATIONAL = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
                  "auto_mapping", "init_lora_weights", "qalora_group_size", "megatron_core",
                  "ensure_weight_tying"}
# fields supported at PEFT's default value only; any other field is supported only when it is empty
_DEFAULTS: dict[str, Any] = {"bias": "none"}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


# ----- names and layouts ----------------------------------------------------------------------------------
def _entries(name: str, module: nn.Module, r: int) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """PEFT tensor name -> (its shape, our attribute, projection or '') for one adapted module."""
    if isinstance(module, GroupedExperts):  # the base experts (or their LoRA wrapper)
        E, H, Im = module.n_experts, module.hidden, module.intermediate
        dims = {"gate_up_proj": (2 * Im, H), "down_proj": (H, Im)}
        out = {}
        for which, (N, K) in dims.items():
            stem = f"{PREFIX}{name}{EXPERT_SUFFIX[which]}"
            short = "gate_up" if which == "gate_up_proj" else "down"
            out[f"{stem}.lora_A.weight"] = ((E * r, K), f"lora_A_{short}", which)
            out[f"{stem}.lora_B.weight"] = ((N, r * E), f"lora_B_{short}", which)
        return out
    K, N = int(module.in_features), int(module.out_features)
    return {f"{PREFIX}{name}.lora_A.weight": ((r, K), "lora_A", ""),
            f"{PREFIX}{name}.lora_B.weight": ((N, r), "lora_B", "")}


def _to_peft(attr: str, t: torch.Tensor) -> torch.Tensor:
    """Our factor -> PEFT's tensor (module doc: experts flattened, B's columns expert-minor)."""
    if t.dim() == 2:
        return t
    E, rows, cols = t.shape
    if attr.startswith("lora_A"):
        return t.reshape(E * rows, cols)  # [E, r, K] -> [E*r, K]
    return t.permute(1, 2, 0).reshape(rows, cols * E)  # [E, N, r] -> [N, r*E]


def _from_peft(attr: str, t: torch.Tensor, E: int) -> torch.Tensor:
    """PEFT's tensor -> our factor's shape (the inverse of ``_to_peft``)."""
    if attr in ("lora_A", "lora_B"):
        return t
    if attr.startswith("lora_A"):
        return t.reshape(E, -1, t.shape[-1])  # [E*r, K] -> [E, r, K]
    return t.reshape(t.shape[0], -1, E).permute(2, 0, 1)  # [N, r*E] -> [E, N, r]


# ----- saving ---------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | Path, lora_cfg: LoraConfig,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of ``model`` (wrapped by ``apply_lora(model, lora_cfg)``) in PEFT's format.
    Each file appears complete or not at all; the config is written last."""
    modules = lora_modules(model)
    if not modules:
        raise CheckpointError("the model has no LoRA adapters to save (apply_lora first)")
    tensors: dict[str, torch.Tensor] = {}
    target_modules, target_parameters = [], []
    for name, m in modules:
        if name.startswith(MTP_PREFIX):
            raise CheckpointError(f"{name}: adapters on MTP modules have no place in Hugging Face's "
                                  f"DeepseekV3ForCausalLM, which has no MTP layers")
        if (m.rank, m.alpha) != (lora_cfg.rank, lora_cfg.alpha):
            raise ConfigError(f"{name} has rank {m.rank} and alpha {m.alpha}, but lora_cfg says rank "
                              f"{lora_cfg.rank} and alpha {lora_cfg.alpha}")
        for key, (_, attr, _) in _entries(name, m, m.rank).items():
            factor = getattr(m, attr)
            factor = factor.weight if isinstance(factor, nn.Module) else factor
            tensors[key] = _to_peft(attr, factor.detach()).to("cpu").contiguous()
        if isinstance(m, LoraExperts):
            target_parameters += [f"{name}.{which}" for which in m.PROJECTIONS]
        elif name.rpartition(".")[2] in PEFT_MOE_RENAMED:
            target_parameters.append(f"{name}.weight")
        else:
            target_modules.append(name)
    alpha = int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank, "lora_alpha": alpha,
        "lora_dropout": 0.0 if target_parameters else lora_cfg.dropout,  # module doc
        "target_modules": target_modules or None, "target_parameters": target_parameters or None,
        "bias": "none", "use_dora": False, "use_rslora": False, "lora_bias": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(out / WEIGHTS, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    fsio.write_json(out / CONFIG, config)
    return out


# ----- loading --------------------------------------------------------------------------------------------
def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json, refused (``CheckpointError`` naming the fields) where it asks for something this
    loader does not implement."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{Path(directory)}: no {CONFIG} (expected a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only 'LORA' adapters load")
    refused = []
    for key, value in cfg.items():
        if key in _READ or key in _INFORMATIONAL:
            continue
        ok = value == _DEFAULTS[key] if key in _DEFAULTS else _is_empty(value)
        if not ok:
            refused.append(f"{key}={json.dumps(value)}")
    if refused:
        raise CheckpointError(f"{path}: unsupported adapter_config field(s): {', '.join(refused)} "
                              f"(this loader implements plain LoRA: one rank and alpha, no bias, no DoRA "
                              f"or rsLoRA, no per-module patterns or extra modules)")
    return cfg


def _targets(cfg: dict[str, Any], model: nn.Module, path: Path) -> tuple[str, ...]:
    """Our target patterns from PEFT's target_modules and target_parameters."""
    targets: list[str] = []
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        targets.append("re:" + tm)  # PEFT: a string is a regex the whole module name must match
    elif isinstance(tm, list):
        targets += [str(t) for t in tm]
    elif tm is not None:
        raise CheckpointError(f"{path}: target_modules must be a list or a string, got {tm!r}")
    modules = dict(model.named_modules())
    experts: dict[str, set[str]] = {}
    for t in cfg.get("target_parameters") or []:
        owner, _, leaf = str(t).rpartition(".")
        hits = [n for n, m in modules.items() if n == owner or n.endswith("." + owner)] if owner else []
        kinds = {isinstance(modules[n], GroupedExperts) for n in hits}
        if hits and kinds == {True} and leaf in GroupedExperts.PROJECTIONS:
            for n in hits:
                experts.setdefault(n, set()).add(leaf)
        elif hits and kinds == {False} and leaf == "weight":
            targets.append(owner)
        else:
            raise CheckpointError(f"{path}: target_parameters entry {t!r} names neither a linear layer's "
                                  f"weight nor a routed-expert projection of this model")
    for n, which in experts.items():
        missing = set(GroupedExperts.PROJECTIONS) - which
        if missing:
            raise CheckpointError(f"{path}: {n} is targeted for {', '.join(sorted(which))} but not for "
                                  f"{', '.join(sorted(missing))}; our routed-expert adapters cover both")
        targets.append(n)
    if not targets:
        raise CheckpointError(f"{path}: neither target_modules nor target_parameters names a module")
    return tuple(targets)


def load_adapter(model: nn.Module, directory: str | Path) -> LoraConfig:
    """Apply LoRA to ``model`` (which has no adapters yet) with the configuration in ``directory`` and load
    its weights. Unknown tensor names, missing or mis-shaped tensors and unsupported config fields are
    ``CheckpointError``s naming them; the model is changed only once everything has been checked."""
    path = Path(directory)
    cfg = read_adapter_config(path)
    try:
        lora_cfg = LoraConfig(rank=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8),
                              dropout=cfg.get("lora_dropout") or 0.0, targets=_targets(cfg, model, path))
        names = resolve_targets(model, lora_cfg)
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    expected: dict[str, tuple[tuple[int, ...], str, str, str]] = {}  # key -> (shape, module, attr, which)
    for name in names:
        module = model.get_submodule(name)
        for key, (shape, attr, which) in _entries(name, module, lora_cfg.rank).items():
            expected[key] = (shape, name, attr, which)
    file = path / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS}")
    try:
        with safe_open(str(file), "pt") as handle:
            keys = set(handle.keys())  # noqa: SIM118 (safe_open has no __iter__)
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys & set(expected)}
            unknown = sorted(keys - set(expected))
            missing = sorted(set(expected) - keys)
            if unknown or missing or any(shapes[k] != expected[k][0] for k in shapes):
                tensors = {}
            else:
                tensors = {k: handle.get_tensor(k) for k in expected}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if unknown:
        raise CheckpointError(f"{file}: unknown tensor(s) {', '.join(unknown[:3])}"
                              f"{f' (and {len(unknown) - 3} more)' if len(unknown) > 3 else ''}: "
                              f"adapter_config.json targets no such module")
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    for key, got in sorted(shapes.items()):
        if got != expected[key][0]:
            raise CheckpointError(f"{file}: {key} has shape {got}, expected {expected[key][0]} for rank "
                                  f"{lora_cfg.rank} on this model")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: {key} is {t.dtype}, expected a floating-point tensor")
    apply_lora(model, lora_cfg)
    with torch.no_grad():
        for key, (_, name, attr, _) in expected.items():
            m = model.get_submodule(name)
            dst = getattr(m, attr)
            dst = dst.weight if isinstance(dst, nn.Module) else dst
            E = m.n_experts if isinstance(m, LoraExperts) else 1
            dst.copy_(_from_peft(attr, tensors[key], E).to(dst.dtype))
    return lora_cfg

