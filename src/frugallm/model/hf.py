"""Hugging Face checkpoint interchange: ``from_pretrained(dir)`` and ``save_pretrained(model, dir)``.

Layouts read:
- the published DeepSeek-V3 one: per-expert ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``,
  ``mlp.gate.weight`` and ``mlp.gate.e_score_correction_bias``, MTP modules as layer indices from
  ``num_hidden_layers`` on (each also holding copies of the embedding and output head), FP8 e4m3 weights
  with ``weight_scale_inv`` 128x128 block scales (dequantized on load), sharded through
  ``model.safetensors.index.json``;
- stacked experts ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` as transformers holds them.

Names map onto ours one to one (our modules carry Hugging Face's names) except: per-expert tensors fill a
slice of the stacked ``gate_up_proj [E, 2*I_m, H]`` (gate rows first, then up) or ``down_proj [E, H, I_m]``;
layer ``num_hidden_layers + d`` maps to ``model.mtp.d``.

Loading streams tensor by tensor into a model allocated once (built on the meta device), so the weights are
never held twice. ``save_pretrained`` writes the published layout (what transformers' own
``save_pretrained`` writes too) to a temporary directory and renames it into place.

FP8 weights, both ways:
- ``from_pretrained(..., fp8="dequantize")`` (the default) turns every e4m3 weight into ``dtype``;
  ``fp8="keep"`` keeps each module whose weights are stored in e4m3 with ``weight_scale_inv`` frozen in e4m3
  (``frugallm.precision.frozen``: ``FrozenFp8Linear`` for a linear, ``FrozenFp8Experts`` for a layer's routed
  experts), the base LoRA trains over. What the checkpoint decides is followed tensor by tensor: the model is
  built on the meta device, those modules are swapped for frozen ones still on meta, and only then is
  anything allocated, so the resident bytes are the checkpoint's e4m3 bytes, its float32 scales and the other
  tensors (norms, embedding, router, head) in ``dtype``; no float copy of a frozen weight ever exists.
  A checkpoint without e4m3 weights is refused with ``fp8="keep"`` (a ``CheckpointError``) rather than
  silently loaded in floats: whoever asks to keep FP8 is counting on its memory.
- ``save_pretrained(..., fp8_blocks=True)`` writes the attention projections, dense and shared-expert MLPs and
  routed experts (per expert) as e4m3 + ``weight_scale_inv`` in the published 128x128 blocks
  (``published_fp8_modules``), frozen modules as they are stored (byte for byte), float ones requantized
  (``frugallm.precision.frozen.requantize_blocks``), and puts the published ``quantization_config`` into
  config.json. Without ``fp8_blocks`` a model holding frozen modules is written dequantized.
The precision package depends on this one (``precision.fp8_linear`` subclasses the model's experts), so the
frozen modules are imported inside the functions that need them, not at the top.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.errors import CheckpointError, ConfigError
from frugallm.kernels import choose, install
from frugallm.model.layers import Linear
from frugallm.model.moe import GroupedExperts
from frugallm.model.transformer import DeepseekV3LM, build_model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_BIAS = "mlp.gate.e_score_correction_bias"
FP8_BLOCK = 128  # the published checkpoints' weight blocks (config.json quantization_config.weight_block_size)
FP8_MODES = ("dequantize", "keep")
# what DeepSeek's FP8 checkpoints carry in config.json, and what ModelConfig.from_hf_dict accepts
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
_PUBLISHED_FP8 = re.compile(r"^model\.(layers|mtp)\.\d+\.(self_attn|mlp)\.")  # decoder blocks' GEMMs


def dequantize_weight_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [out, in] in float8, scale_inv [ceil(out/block), ceil(in/block)]: w * scale per block, as the
    published checkpoint stores its FP8 weights (``weight_scale_inv``). float8 -> float32 is exact."""
    out_f, in_f = w.shape
    expected = (-(-out_f // block), -(-in_f // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"in {block}x{block} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (w.float() * scale).to(dtype)


# ----- reading ------------------------------------------------------------------------------------------
def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _read(files: dict[str, Path], handles: dict[Path, object], name: str) -> torch.Tensor:
    f = files[name]
    if f not in handles:
        handles[f] = safe_open(f, "pt")
    return handles[f].get_tensor(name)  # type: ignore[attr-defined]


def _target(cfg: ModelConfig, name: str) -> tuple[str, int | None, str | None] | None:
    """HF name -> (our parameter or buffer name, expert index, part); None for tensors we skip."""
    m = _LAYER.match(name)
    if m is None:
        return name, None, None
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= cfg.num_hidden_layers:
        if rest in _MTP_SHARED_COPIES:
            return None  # MTP modules share the main embedding and head
        prefix = f"model.mtp.{layer - cfg.num_hidden_layers}."
    else:
        prefix = f"model.layers.{layer}."
    e = _EXPERT.match(rest)
    if e:
        return prefix + ("mlp.experts.down_proj" if e.group(2) == "down_proj" else "mlp.experts.gate_up_proj"), \
            int(e.group(1)), e.group(2)
    return prefix + rest, None, None


def _mtp_depth_present(cfg: ModelConfig, names: set[str]) -> int:
    depth = 0
    while any(n.startswith(f"model.layers.{cfg.num_hidden_layers + depth}.") for n in names):
        depth += 1
    return depth


def read_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: no config.json (expected a Hugging Face DeepSeek-V3 directory)")
    try:
        return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def from_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, *, fp8: str = "dequantize") -> DeepseekV3LM:
    """Load a Hugging Face DeepSeek-V3 directory (``config.json`` + ``*.safetensors``). ``fp8``: what becomes
    of e4m3 weights stored with ``weight_scale_inv``: 'dequantize' into ``dtype``, or 'keep' them frozen in
    e4m3 (the module doc); every other tensor loads in ``dtype`` either way."""
    if fp8 not in FP8_MODES:
        raise ConfigError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {fp8!r}")
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    cfg = read_config(p)
    files = _tensor_files(p)
    names = set(files)
    present = _mtp_depth_present(cfg, names)
    if present < cfg.num_nextn_predict_layers:
        # transformers' save_pretrained drops the MTP layers; a model without them is still whole
        cfg = cfg.replace(num_nextn_predict_layers=present)
    handles: dict[Path, object] = {}
    frozen: set[str] = set()
    if fp8 == "keep":
        frozen = _stored_fp8_modules(cfg, files, handles)
        model = build_frozen_fp8_model(cfg, frozen, device, dtype)
    else:
        model = build_model(cfg, device=device, dtype=dtype, init=False)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():  # V2 checkpoints carry no balancing bias: it selects as zero does
        for name, buf in own.items():
            if name.endswith(_BIAS):
                buf.zero_()
    filled: dict[str, set] = {}  # our name -> expert slots filled (or {None} for whole tensors)
    with torch.no_grad():
        for name in sorted(names):
            if name.endswith("weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue
            tgt = _target(cfg, name)
            if tgt is None:
                continue
            ours, expert, part = tgt
            if ours not in own and ours.rsplit(".", 1)[0] not in frozen:  # frozen experts name their own stacks
                raise CheckpointError(f"unexpected tensor {name!r} in {files[name].name}: the configuration "
                                      f"in config.json has no such parameter")
            t = _read(files, handles, name)
            if t.dtype in _FP8:
                scale_name = name + "_scale_inv"
                if scale_name not in files:
                    raise CheckpointError(f"{name} is stored in {t.dtype} but {scale_name} is missing")
                if fp8 == "keep":
                    _load_frozen(model, ours, expert, part, name, t, _read(files, handles, scale_name))
                    filled.setdefault(ours, set()).add((expert, part) if expert is not None else None)
                    continue
                try:
                    t = dequantize_weight_blocks(t, _read(files, handles, scale_name))
                except ValueError as e:
                    raise CheckpointError(f"{scale_name}: {e}") from None
            dst = own[ours]
            if expert is not None:
                dst, slot = _expert_slice(dst, expert, part, cfg.moe_intermediate_size, name)
            else:
                slot = None
            if tuple(t.shape) != tuple(dst.shape):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)} "
                                      f"for the configuration in config.json")
            dst.copy_(t.to(dst.dtype))
            filled.setdefault(ours, set()).add(slot)
    _check_complete(model, cfg, filled)
    return model


# ----- frozen FP8 (fp8="keep") --------------------------------------------------------------------------
def _stored_fp8_modules(cfg: ModelConfig, files: dict[str, Path], handles: dict[Path, object]) -> set[str]:
    """Our dotted names of the modules whose weights the checkpoint stores in e4m3, read from the safetensors
    headers only. A layer's routed experts are frozen as a whole: all of their tensors or none in e4m3."""
    modules: set[str] = set()
    expert_kinds: dict[str, set[bool]] = {}  # experts module -> {is e4m3} over its tensors
    for name in sorted(files):
        if name.endswith("weight_scale_inv"):
            continue
        tgt = _target(cfg, name)
        if tgt is None:
            continue
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, "pt")
        kind = handles[f].get_slice(name).get_dtype()  # type: ignore[attr-defined]
        if kind == "F8_E5M2":
            raise CheckpointError(f"{name} is stored in float8_e5m2; fp8='keep' keeps e4m3 weights only "
                                  f"(use fp8='dequantize')")
        ours, expert, _ = tgt
        is_fp8 = kind == "F8_E4M3"
        if expert is not None:
            expert_kinds.setdefault(ours.rsplit(".", 1)[0], set()).add(is_fp8)
        elif is_fp8:
            if not ours.endswith(".weight"):
                raise CheckpointError(f"{name} is stored in e4m3 but is not a linear's weight; "
                                      f"fp8='keep' freezes linears and routed experts only")
            modules.add(ours.removesuffix(".weight"))
    for module, kinds in expert_kinds.items():
        if kinds == {True, False}:
            raise CheckpointError(f"the routed experts of {module} are stored partly in e4m3 and partly not; "
                                  f"fp8='keep' needs all of a layer's expert tensors in e4m3 (or use "
                                  f"fp8='dequantize')")
        if kinds == {True}:
            modules.add(module)
    if not modules:
        raise CheckpointError("fp8='keep' but the checkpoint stores no e4m3 weight with weight_scale_inv; "
                              "load it with fp8='dequantize' (the default)")
    return modules


def build_frozen_fp8_model(cfg: ModelConfig, frozen: set[str] | list[str], device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> DeepseekV3LM:
    """The model with the modules named in ``frozen`` (linears, routed experts) swapped for frozen FP8 ones
    while still on the meta device; then everything is allocated once on ``device`` (``device="meta"``:
    nothing is), the rest in ``dtype``. Weights are uninitialised: a checkpoint fills them."""
    from frugallm.precision.frozen import FrozenFp8Experts, FrozenFp8Linear

    kernels = choose(device, dtype)
    model = build_model(cfg, device="meta", dtype=dtype, init=False, kernels=kernels)
    for name in sorted(frozen):
        parent_name, _, child_name = name.rpartition(".")
        try:
            child = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint stores {name} in e4m3 but the configuration in "
                                  f"config.json has no such module") from None
        if type(child) in (nn.Linear, Linear) and child.bias is None:
            new: nn.Module = FrozenFp8Linear(child.in_features, child.out_features, device="meta")
        elif type(child) is GroupedExperts:
            new = FrozenFp8Experts(child.n_experts, child.hidden, child.intermediate, device="meta")
        else:
            raise CheckpointError(f"the checkpoint stores {name} in e4m3 but it is a {type(child).__name__} "
                                  f"here; only bias-free linears and routed experts can be kept frozen in FP8")
        setattr(model.get_submodule(parent_name), child_name, new)
    install(model, kernels)
    if str(device) == "meta":
        return model.to(dtype)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: the floats are allocated in dtype once
    model.tie_weights()
    return model


def kept_fp8_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[torch.dtype, int]:
    """Resident bytes by dtype of ``from_pretrained(..., dtype, fp8="keep")`` on a checkpoint in the published
    layout (``published_fp8_modules`` in e4m3), counted on the meta device from the configuration alone:
    one byte per frozen weight, 4 bytes per 128x128 block of scales, ``dtype`` for the rest."""
    from frugallm.precision.frozen import tensor_bytes_by_dtype

    names = published_fp8_modules(build_model(cfg, device="meta"))
    return tensor_bytes_by_dtype(build_frozen_fp8_model(cfg, names, device="meta", dtype=dtype))


def _load_frozen(model: DeepseekV3LM, ours: str, expert: int | None, part: str | None, name: str,
                 data: torch.Tensor, scale_inv: torch.Tensor) -> None:
    """Copy one stored e4m3 tensor and its block scales into the frozen module that holds it."""
    from frugallm.precision.frozen import block_grid

    module = model.get_submodule(ours.rsplit(".", 1)[0])
    if data.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{name} is stored in {data.dtype}; fp8='keep' keeps e4m3 weights only")
    if expert is None:
        dst, dst_scale = module.weight, module.weight_scale_inv
    else:
        if expert >= module.n_experts:
            raise CheckpointError(f"tensor {name!r}: expert {expert} out of range "
                                  f"(n_routed_experts={module.n_experts})")
        dst, dst_scale = module.expert_blocks(expert, part)
    if tuple(data.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(data.shape)}, expected {tuple(dst.shape)} "
                              f"for the configuration in config.json")
    if tuple(scale_inv.shape) != block_grid(*data.shape, FP8_BLOCK):
        raise CheckpointError(f"{name}_scale_inv: scale shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(data.shape)} in {FP8_BLOCK}x{FP8_BLOCK} blocks (expected "
                              f"{block_grid(*data.shape, FP8_BLOCK)})")
    dst.copy_(data)
    dst_scale.copy_(scale_inv.float())


def published_fp8_modules(model: nn.Module) -> list[str]:
    """Names of the modules the published checkpoints store in e4m3 blocks: every linear and the routed
    experts inside a decoder block's attention and MLP (the router ``mlp.gate`` is no linear). The
    embedding, norms, output head and the MTP modules' ``eh_proj`` stay in high precision."""
    from frugallm.precision.frozen import FrozenFp8Experts, FrozenFp8Linear

    kinds = (nn.Linear, GroupedExperts, FrozenFp8Linear, FrozenFp8Experts)
    return [n for n, m in model.named_modules() if _PUBLISHED_FP8.match(n) and isinstance(m, kinds)]


def _expert_slice(stacked: torch.Tensor, e: int, part: str | None, inter: int, name: str
                  ) -> tuple[torch.Tensor, tuple[int, str | None]]:
    if e >= stacked.shape[0]:
        raise CheckpointError(f"tensor {name!r}: expert {e} out of range (n_routed_experts={stacked.shape[0]})")
    if part == "gate_proj":
        return stacked[e, :inter], (e, part)
    if part == "up_proj":
        return stacked[e, inter:], (e, part)
    return stacked[e], (e, part)


def _check_complete(model: DeepseekV3LM, cfg: ModelConfig, filled: dict[str, set]) -> None:
    missing = []
    for name, p in model.named_parameters():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        got = filled.get(name, set())
        if name.endswith("experts.gate_up_proj"):
            want = {(e, part) for e in range(cfg.n_routed_experts) for part in ("gate_proj", "up_proj")}
            if None not in got and not want <= got:
                e, part = min(want - got)
                missing.append(f"{_hf_expert_name(name, e, part, cfg)} {tuple(p.shape[1:2])[0] // 2, p.shape[2]}")
        elif name.endswith("experts.down_proj"):
            want = {(e, "down_proj") for e in range(cfg.n_routed_experts)}
            if None not in got and not want <= got:
                e, part = min(want - got)
                missing.append(f"{_hf_expert_name(name, e, part, cfg)} {tuple(p.shape[1:])}")
        elif not got:
            missing.append(f"{_hf_name(name, cfg)} {tuple(p.shape)}")
    missing += _missing_frozen(model, cfg, filled)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}")


def _missing_frozen(model: DeepseekV3LM, cfg: ModelConfig, filled: dict[str, set]) -> list[str]:
    """The stored e4m3 tensors a frozen module still lacks (they are buffers, not parameters)."""
    from frugallm.precision.frozen import FrozenFp8Experts, FrozenFp8Linear

    missing = []
    for name, m in model.named_modules():
        if isinstance(m, FrozenFp8Linear) and not filled.get(name + ".weight"):
            missing.append(f"{_hf_name(name + '.weight', cfg)} {tuple(m.weight.shape)}")
        elif isinstance(m, FrozenFp8Experts):
            for stacked, parts in ((".gate_up_proj", ("gate_proj", "up_proj")), (".down_proj", ("down_proj",))):
                want = {(e, part) for e in range(m.n_experts) for part in parts}
                got = filled.get(name + stacked, set())
                if not want <= got:
                    e, part = min(want - got)
                    missing.append(f"{_hf_expert_name(name + stacked, e, part, cfg)} "
                                   f"{tuple(m.expert_blocks(e, part)[0].shape)}")
    return missing


# ----- writing ------------------------------------------------------------------------------------------
def _hf_name(ours: str, cfg: ModelConfig) -> str:
    m = re.match(r"^model\.mtp\.(\d+)\.(.+)$", ours)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return ours


def _hf_expert_name(stacked_name: str, e: int, part: str, cfg: ModelConfig) -> str:
    base = _hf_name(stacked_name, cfg).rsplit(".", 1)[0]  # ...mlp.experts
    return f"{base}.{e}.{part}.weight"


def _fp8_modules(model: DeepseekV3LM, fp8_blocks: bool) -> tuple[list[tuple[str, nn.Module]], set[str]]:
    """The modules written in e4m3 blocks (``fp8_blocks``: the published ones; frozen ones always, written
    dequantized without it) and the state_dict names their items replace."""
    from frugallm.precision.frozen import FrozenFp8Experts, FrozenFp8Linear

    chosen = set(published_fp8_modules(model)) if fp8_blocks else set()
    chosen |= {n for n, m in model.named_modules() if isinstance(m, (FrozenFp8Linear, FrozenFp8Experts))}
    modules = [(n, m) for n, m in model.named_modules() if n in chosen]
    covered: set[str] = set()
    for name, m in modules:
        if isinstance(m, (FrozenFp8Linear, FrozenFp8Experts)):
            covered |= {f"{name}.{k}" for k, _ in m.named_buffers()}
        elif isinstance(m, GroupedExperts):
            covered |= {name + ".gate_up_proj", name + ".down_proj"}
        else:  # a float linear: its bias, if any, is written as it is
            covered.add(name + ".weight")
    return modules, covered


def _fp8_items(model: DeepseekV3LM, modules: list[tuple[str, nn.Module]], fp8_blocks: bool
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Published-layout items of ``modules``: stored blocks as they are, float weights requantized one
    published tensor at a time, or (without ``fp8_blocks``) frozen blocks dequantized."""
    from frugallm.precision.frozen import (
        Fp8Tensor,
        FrozenFp8Experts,
        FrozenFp8Linear,
        dequantize,
        requantize_blocks,
    )

    cfg = model.config
    inter, b = cfg.moe_intermediate_size, (FP8_BLOCK, FP8_BLOCK)

    def emit(hf_weight: str, data: torch.Tensor, scale: torch.Tensor | None) -> Iterator[tuple[str, torch.Tensor]]:
        """One published weight from stored blocks (e4m3 data + scale) or from a float tensor (scale None)."""
        if not fp8_blocks:  # only frozen modules come here: written dequantized
            assert scale is not None
            yield hf_weight, dequantize(Fp8Tensor(data, scale, b))
            return
        if scale is None:
            data, scale = requantize_blocks(data, FP8_BLOCK)
        yield hf_weight, data
        yield hf_weight + "_scale_inv", scale

    for name, m in modules:
        if isinstance(m, FrozenFp8Linear):
            yield from emit(_hf_name(name + ".weight", cfg), m.weight, m.weight_scale_inv)
        elif isinstance(m, FrozenFp8Experts):
            for e in range(m.n_experts):
                for part in ("gate_proj", "up_proj", "down_proj"):
                    stacked = name + (".down_proj" if part == "down_proj" else ".gate_up_proj")
                    yield from emit(_hf_expert_name(stacked, e, part, cfg), *m.expert_blocks(e, part))
        elif isinstance(m, GroupedExperts):
            for e in range(m.n_experts):
                gate_up, down = m.gate_up_proj[e].detach(), m.down_proj[e].detach()  # [2I, H], [H, I]
                yield from emit(_hf_expert_name(name + ".gate_up_proj", e, "gate_proj", cfg), gate_up[:inter], None)
                yield from emit(_hf_expert_name(name + ".gate_up_proj", e, "up_proj", cfg), gate_up[inter:], None)
                yield from emit(_hf_expert_name(name + ".down_proj", e, "down_proj", cfg), down, None)
        else:
            yield from emit(_hf_name(name + ".weight", cfg), m.weight.detach(), None)


def hf_state_items(model: DeepseekV3LM, fp8_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state in the published layout, tensor by tensor (views where possible). DeepSeek-V2's layout has
    no balancing bias; a model whose bias is not zero has no V2 equivalent and is refused. ``fp8_blocks``:
    the decoder blocks' linears and experts as e4m3 + ``weight_scale_inv`` (the module doc); frozen FP8
    modules are written dequantized without it."""
    cfg = model.config
    inter = cfg.moe_intermediate_size
    state = model.state_dict()
    v2 = cfg.hf_model_type == "deepseek_v2"
    modules, covered = _fp8_modules(model, fp8_blocks)
    yield from _fp8_items(model, modules, fp8_blocks)
    state = {k: v for k, v in state.items() if k not in covered}
    for name, t in state.items():
        if v2 and name.endswith(_BIAS):
            if bool(t.detach().ne(0).any()):
                raise CheckpointError(f"{name} is not zero, but DeepSeek-V2's layout (topk_method="
                                      f"{cfg.topk_method!r}) has no balancing bias: its routing would differ")
            continue
        if name.endswith("experts.gate_up_proj"):
            for e in range(t.shape[0]):
                yield _hf_expert_name(name, e, "gate_proj", cfg), t[e, :inter]
                yield _hf_expert_name(name, e, "up_proj", cfg), t[e, inter:]
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                yield _hf_expert_name(name, e, "down_proj", cfg), t[e]
        elif cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        else:
            yield _hf_name(name, cfg), t
    for d in range(cfg.num_nextn_predict_layers):  # the published layout repeats these per MTP module
        prefix = f"model.layers.{cfg.num_hidden_layers + d}."
        yield prefix + "embed_tokens.weight", state["model.embed_tokens.weight"]
        yield prefix + "shared_head.head.weight", state["lm_head.weight"]


def save_pretrained(model: DeepseekV3LM, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 4 * 2**30, extra_files: dict[str, Path] | None = None, *,
                    fp8_blocks: bool = False) -> Path:
    """Write ``config.json`` and safetensors shards (with an index when more than one) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads as ``DeepseekV3ForCausalLM`` (or
    ``DeepseekV2ForCausalLM`` for V2 routing), computing what the model computes: the configuration is
    written as loaded (``rope_interleave`` included). The directory appears complete or not at all.
    ``extra_files`` (e.g. ``{"tokenizer.json": path}``) are copied in. ``fp8_blocks``: write the decoder
    blocks' linears and routed experts in the published FP8 layout (e4m3 + float32 ``weight_scale_inv``,
    experts per expert) with its ``quantization_config``; ``dtype`` then applies to the other tensors."""
    cfg = model.config
    try:
        hf_cfg = cfg.to_hf_dict()
    except ConfigError as e:
        raise CheckpointError(f"cannot save in the Hugging Face layout: {e}") from None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in hf_state_items(model, fp8_blocks=fp8_blocks):
            # the balancing bias stays float32, e4m3 weights and their float32 scales as they are
            castable = t.is_floating_point() and t.dtype not in _FP8 and not name.endswith(("_bias", "_scale_inv"))
            t = t.detach().to("cpu", dtype or t.dtype) if castable else t.detach().cpu()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous().clone()
            size += nbytes
        hf_cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
        if fp8_blocks:
            hf_cfg["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / fname)
        fsio.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
