"""Several LoRA adapters over one copy of the base weights, mixed in the same batches (multi-LoRA).

``attach_adapters(model, [(name, path), ...])`` loads each adapter (a PEFT adapter directory, or a LoRA
fine-tuning run whose ``adapter/`` holds one) and wraps each targeted projection in a ``MultiLoraLinear``:
the base projection plus, for each adapter, its factors A [r, K] and B [N, r]. Adapter 0 is the base model.
Before each forward the runner says which adapter every batch row uses (``RowAdapters.use``); a
``MultiLoraLinear`` adds ``s * (x_rows A^T) B^T`` to exactly the rows of each adapter present, so requests for
different adapters (and for the base) decode in one batch.

The absorbed MLA decode reads ``kv_b_proj``'s weight instead of calling it (``MLA.kv_b_weights``); with
adapters on kv_b_proj it takes one merged weight per row instead (``MultiLoraLinear.row_weights``, cached per
adapter). The prefix cache keys blocks under a different root per adapter (``Engine``), so no block computed
under one adapter is ever served to another.

Adapters on the routed experts (``mlp.experts``) are nonlinear in their effect (SwiGLU sits between the two
adapted projections), so they are not a delta added to the base's output: ``MultiLoraExperts`` runs each
adapter's tokens through that adapter's ``tune.lora.LoraExperts`` over the shared base experts, and the base's
tokens through the base, each group in one call.

Not served this way (yet): adapters on the MTP module; such an adapter is refused with the reason. The MTP
module drafts for every row from the base's weights (``Engine``: drafts are proposals, verification keeps
each row's output its adapter's).
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from torch import nn

from frugallm.errors import CheckpointError


class RowAdapters:
    """Which adapter each batch row of the current forward uses; shared by every ``MultiLoraLinear``."""

    def __init__(self, names: list[str]) -> None:
        self.names = names  # adapter i + 1 is names[i]
        self.ids: list[int] | None = None  # per batch row; None: all rows on the base
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def use(self, ids: list[int] | None) -> None:
        self.ids = ids if ids and any(ids) else None

    def index(self, name: str) -> int:
        return self.names.index(name) + 1


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rows: RowAdapters) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # adapter -> (A, B, scale)
        self._merged: dict[int, torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The base weight: what rows without an adapter see (``row_weights`` for a mixed batch)."""
        return self.base.weight

    def active(self) -> bool:
        ids = self.rows.ids
        return ids is not None and any(a in self.factors for a in ids)

    def merged_weight(self, a: int) -> torch.Tensor:
        """W + s B A for adapter ``a`` [N, K] (the base weight for 0 or an adapter without this target)."""
        if a not in self.factors:
            return self.base.weight
        if a not in self._merged:
            A, B, s = self.factors[a]
            w = self.base.weight
            if hasattr(self.base, "dequantize_weight"):  # frozen e4m3 (published FP8 weights): its real values
                w = self.base.dequantize_weight()
            self._merged[a] = (w.float() + s * (B.float() @ A.float())).to(w.dtype)
        return self._merged[a]

    def row_weights(self, n_rows: int) -> torch.Tensor:
        """[B, N, K]: each batch row's effective weight."""
        ids = self.rows.ids or [0] * n_rows
        return torch.stack([self.merged_weight(a) for a in ids])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, ..., N] or [B*S, N] (the MoE's shared experts see flattened tokens)
        ids = self.rows.ids
        if ids is None or not self.factors:
            return y
        B = len(ids)
        per_row = torch.tensor(ids, device=x.device)
        if x.shape[0] != B:  # flattened tokens: B rows of S each
            assert x.shape[0] % B == 0, f"{x.shape[0]} leading rows for a batch of {B}"
            per_row = per_row.repeat_interleave(x.shape[0] // B)
        for a in sorted(set(ids)):
            if a not in self.factors:
                continue
            A, B_, s = self.factors[a]
            idx = (per_row == a).nonzero().squeeze(1)  # leading indices of this adapter's rows
            xa = x.index_select(0, idx)
            delta = (xa.to(A.dtype) @ A.t()) @ B_.t() * s  # [n_a, ..., N]
            y = y.index_add(0, idx, delta.to(y.dtype))
        return y


class MultiLoraExperts(nn.Module):
    """The routed experts with adapters per batch row: ``adapters[a]`` is adapter a's ``LoraExperts`` over
    ``base`` (the same stacked weights, its own factors). Called as ``GroupedExperts`` is, (x [N, H],
    indices [N, k], gates [N, k]) -> [N, H], with the N tokens the batch rows' tokens in order."""

    def __init__(self, base: nn.Module, rows: RowAdapters) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.n_experts = base.n_experts
        self.adapters = nn.ModuleDict()  # str(adapter id) -> LoraExperts

    def forward(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        ids = self.rows.ids
        present = sorted({a for a in ids if str(a) in self.adapters}) if ids is not None else []
        if not present:
            return self.base(x, indices, gates)
        B = len(ids)
        assert x.shape[0] % B == 0, f"{x.shape[0]} tokens for a batch of {B} rows"
        per_token = torch.tensor(ids, device=x.device).repeat_interleave(x.shape[0] // B)  # [N]
        out = torch.empty_like(x)
        base_rows = torch.ones_like(per_token, dtype=torch.bool)
        for a in present:
            rows = per_token == a
            base_rows &= ~rows
            idx = rows.nonzero().squeeze(1)
            out.index_copy_(0, idx, self.adapters[str(a)](x[idx], indices[idx], gates[idx]))
        if base_rows.any():
            idx = base_rows.nonzero().squeeze(1)
            out.index_copy_(0, idx, self.base(x[idx], indices[idx], gates[idx]))
        return out


def _adapter_dir(path: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():  # a LoRA fine-tuning run
        return path / "adapter"
    raise CheckpointError(f"{path}: neither a PEFT adapter directory nor a LoRA run with adapter/")


def attach_adapters(model: nn.Module, adapters: list[tuple[str, str | Path]]) -> RowAdapters:
    """Load each (name, path) and wrap the base ``model`` in place; returns the rows' context, also set as
    ``model.row_adapters`` for the runner. Loading goes through ``tune.adapter.load_adapter`` on a scratch
    copy of the model's modules whose tensors are the model's own (``_shallow_scratch``): the base weights are
    never held twice, and the model's parameters come out as they went in."""
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise CheckpointError(f"adapter names must differ: {names}")
    rows = RowAdapters(names)
    flags = [(p, p.requires_grad) for p in model.parameters()]  # apply_lora freezes the shared tensors
    try:
        _attach(model, adapters, rows)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    model.row_adapters = rows
    return rows


def _attach(model: nn.Module, adapters: list[tuple[str, str | Path]], rows: RowAdapters) -> None:
    from frugallm.tune.adapter import load_adapter
    from frugallm.tune.lora import LoraExperts, lora_modules

    for i, (name, path) in enumerate(adapters, start=1):
        scratch = _shallow_scratch(model)
        for mod_name, mod in list(scratch.named_modules()):  # an earlier adapter's experts: back to the base's
            if isinstance(mod, MultiLoraExperts):
                parent_name, _, attr = mod_name.rpartition(".")
                setattr(scratch.get_submodule(parent_name), attr, mod.base)
        load_adapter(scratch, _adapter_dir(Path(path)))
        for mod_name, m in lora_modules(scratch):
            if mod_name.startswith("model.mtp"):
                raise CheckpointError(f"adapter {name!r} ({path}) adapts {mod_name}: adapters on the MTP module "
                                      "are not served by name yet (merge it: frugallm merge)")
            target = model.get_submodule(mod_name)
            parent_name, _, attr = mod_name.rpartition(".")
            if isinstance(m, LoraExperts):
                if not isinstance(target, MultiLoraExperts):
                    target = MultiLoraExperts(target, rows)
                    setattr(model.get_submodule(parent_name), attr, target)
                m.base = target.base  # its factors over the served model's experts, not the scratch copy's
                target.adapters[str(i)] = m.eval()
                continue
            if not isinstance(target, MultiLoraLinear):
                target = MultiLoraLinear(target, rows)
                setattr(model.get_submodule(parent_name), attr, target)
            target.factors[i] = (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone(), m.scaling)
        del scratch


def _shallow_scratch(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree sharing every tensor with it (parameters, buffers and tensors held
    as plain attributes, such as cached fused weights), to apply an adapter to without touching the served
    modules or copying a weight."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values(), vars(m).values()):
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
    return copy.deepcopy(model, memo)
