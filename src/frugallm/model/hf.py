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

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.errors import CheckpointError, ConfigError
from frugallm.model.transformer import DeepseekV3LM, build_model

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_BIAS = "mlp.gate.e_score_correction_bias"
FP8_BLOCK = 128  # the published checkpoints' weight blocks (config.json quantization_config.weight_block_size)


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
                    dtype: torch.dtype = torch.float32) -> DeepseekV3LM:
    """Load a Hugging Face DeepSeek-V3 directory (``config.json`` + ``*.safetensors``)."""
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
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():  # V2 checkpoints carry no balancing bias: it selects as zero does
        for name, buf in own.items():
            if name.endswith(_BIAS):
                buf.zero_()
    filled: dict[str, set] = {}  # our name -> expert slots filled (or {None} for whole tensors)
    handles: dict[Path, object] = {}
    with torch.no_grad():
        for name in sorted(names):
            if name.endswith("weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue
            tgt = _target(cfg, name)
            if tgt is None:
                continue
            ours, expert, part = tgt
            if ours not in own:
                raise CheckpointError(f"unexpected tensor {name!r} in {files[name].name}: the configuration "
                                      f"in config.json has no such parameter")
            t = _read(files, handles, name)
            if t.dtype in _FP8:
                scale_name = name + "_scale_inv"
                if scale_name not in files:
                    raise CheckpointError(f"{name} is stored in {t.dtype} but {scale_name} is missing")
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
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]}{more}")


# ----- writing ------------------------------------------------------------------------------------------
def _hf_name(ours: str, cfg: ModelConfig) -> str:
    m = re.match(r"^model\.mtp\.(\d+)\.(.+)$", ours)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
    return ours


def _hf_expert_name(stacked_name: str, e: int, part: str, cfg: ModelConfig) -> str:
    base = _hf_name(stacked_name, cfg).rsplit(".", 1)[0]  # ...mlp.experts
    return f"{base}.{e}.{part}.weight"


def hf_state_items(model: DeepseekV3LM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state in the published layout, tensor by tensor (views where possible). DeepSeek-V2's layout has
    no balancing bias; a model whose bias is not zero has no V2 equivalent and is refused."""
    cfg = model.config
    inter = cfg.moe_intermediate_size
    state = model.state_dict()
    v2 = cfg.hf_model_type == "deepseek_v2"
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
                    max_shard_bytes: int = 4 * 2**30, extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``config.json`` and safetensors shards (with an index when more than one) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads as ``DeepseekV3ForCausalLM`` (or
    ``DeepseekV2ForCausalLM`` for V2 routing), computing what the model computes: the configuration is
    written as loaded (``rope_interleave`` included). The directory appears complete or not at all.
    ``extra_files`` (e.g. ``{"tokenizer.json": path}``) are copied in."""
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
        for name, t in hf_state_items(model):
            t = t.detach().to("cpu", dtype or t.dtype) if t.is_floating_point() and name[-5:] != "_bias" \
                else t.detach().cpu()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.contiguous().clone()
            size += nbytes
        hf_cfg["torch_dtype"] = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
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
