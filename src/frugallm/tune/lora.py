"""LoRA (Hu et al., arXiv 2106.09685): a trainable low-rank update beside each frozen weight, and the merge
that folds it back in.

Symbols: r rank, alpha, s = alpha / r the scaling, M rows, K in_features, N out_features, E routed experts,
H hidden, I expert width (moe_intermediate_size).

A linear layer (``LoraLinear``; its base is our ``Linear``, an ``Fp8Linear`` or a frozen FP8 linear whose
e4m3 weight is a buffer) computes
    y = base(x) + s * (dropout(x) A^T) B^T           A [r, K], B [N, r]              [M, N]
The routed experts (``LoraExperts``) get one adapter per expert and projection, on the experts' own row
layout (``GroupedExperts.group``): one ``torch._grouped_mm`` per GEMM for bf16 on CUDA and, over a plain
base, for float32 on the CPU (``grouped_linear``, base and adapter alike), else padded batched GEMMs over
all experts (``lora_ops.expert_adapter``), never a loop over modules:
    gate_up: A [E, r, H], B [E, 2I, r]        h = base.project(xs) + s * (xs A_e^T) B_e^T    [rows, 2I]
    down:    A [E, r, I], B [E, H, r]         likewise on swiglu(h)                             [rows, H]
gate_up is the fused [gate; up] projection, so one adapter covers both halves: B's first I rows update
the gate rows of the expert's weight, the last I the up rows, from one shared A. This is exactly what PEFT
computes on transformers 5's fused ``mlp.experts.gate_up_proj`` parameter (``frugallm.tune.adapter``).

Training (grad enabled) over a plain frozen base without adapter dropout or autocast runs each adapted
linear as one hand-written autograd node (``lora_ops.lora_linear``: no weight gradient for the base, dx
accumulated in one pass), and projections that read the same input run as one over their concatenated
base weights (MLA's first query projection with kv_a_proj_with_mqa, gate_proj with up_proj), through the
model's ``layers.project_together``, which finds ``LoraLinear.project_together`` on the modules. Anything
else (FP8 bases, dropout, autocast, serving) takes the composite path below, the same sums.

Initialisation as PEFT's default: A uniform in +-1/sqrt(K) (``kaiming_uniform_(a=sqrt(5))``, nn.Linear's
init, per expert for the stacked ones), B zero, so an adapted model computes what its base did until B moves.
Adapter parameters are float32 (``LoraConfig.dtype``) on the base's device; each GEMM runs in the dtype the
base produced (the activation's, or autocast's), so a bf16 forward stays bf16. ``s`` multiplies B (r columns),
not the [M, N] product.

Targets are name patterns over ``model.named_modules()``: a plain pattern matches a module whose dotted name
is the pattern or ends with ``"." + pattern`` (``"o_proj"`` matches ``model.layers.3.self_attn.o_proj``;
``"mlp.experts"`` the routed experts of every MoE layer); ``"re:<regex>"`` matches names the regex matches
in full. Only linear layers (modules with ``in_features`` and ``out_features``) and routed experts can be
targets. ``DEFAULT_TARGETS`` is every projection of MLA (``q_a_proj``, ``q_b_proj``, ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), of the dense MLPs and shared experts (``gate_proj``,
``up_proj``, ``down_proj``) and the routed experts (``mlp.experts``); since it covers every layout, its
patterns that name nothing in a given model (``q_proj`` where there is a query latent, ``mlp.experts`` in a
dense model) are skipped. Any other pattern that matches no module is a ``ConfigError``. Never targeted: the
router (``mlp.gate``, not a linear: routing stays as trained), norms, the embedding and the output head,
whose weight the loss reads directly (``linear_cross_entropy``), so an adapter there would be bypassed.
The MTP modules (``model.mtp.*``) are left out unless ``LoraConfig.mtp``; Hugging Face's model has no MTP
layers to carry their adapters.

``apply_lora`` freezes every parameter of the model (no gradient, no optimizer state: ``build_optimizer``
takes only parameters that require grad), then wraps the targets. State-dict names stay predictable, so a
wrapped model's checkpoints save and load through ``frugallm.train.checkpoint`` as any model's:
    ...self_attn.q_a_proj.base.weight   ...q_a_proj.lora_A.weight [r, K]   ...q_a_proj.lora_B.weight [N, r]
    ...mlp.experts.base.gate_up_proj    ...mlp.experts.lora_A_gate_up [E, r, H]  lora_B_gate_up [E, 2I, r]
                                        ...mlp.experts.lora_A_down [E, r, I]     lora_B_down [E, H, r]

``merge_lora`` folds every adapter into its base (W += s B A, per expert for the experts) and puts the base
back where the wrapper was. A frozen FP8 base (one exposing ``dequantize_weight()``: the float32 weight
[N, K], or for experts ``dequantize_weight(which)``: [E, N, K]) is merged into its dequantized weight and
replaced by a plain float32 module; requantizing it is FP8's business. Merged weights stay frozen.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.errors import ConfigError
from frugallm.kernels import KernelPolicy
from frugallm.kernels.gemm import linear
from frugallm.model.layers import Linear
from frugallm.model.moe import ExpertGroups, GroupedExperts, grouped_linear
from frugallm.tune.lora_ops import expert_adapter, lora_linear, plain_frozen_weight
from frugallm.tune.targets import (
    DEFAULT_TARGETS,
    MTP_PREFIX,
    NEVER_TARGETED,
    invalid_pattern,
    layer_pattern,
    pattern_matches,
)

ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only, while training
    targets: tuple[str, ...] = DEFAULT_TARGETS  # name patterns (module doc)
    mtp: bool = False  # also adapt the MTP modules
    dtype: str = "float32"  # of the adapter parameters (ADAPTER_DTYPES)

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ConfigError(f"lora rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"lora alpha must be a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, (tuple, list)) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"lora targets must be a non-empty list of name patterns, got {self.targets!r}")
        for t in targets:
            problem = invalid_pattern(t)
            if problem:
                raise ConfigError(f"lora targets: {problem}")
        object.__setattr__(self, "targets", tuple(targets))
        if not isinstance(self.mtp, bool):
            raise ConfigError(f"lora mtp must be true or false, got {self.mtp!r}")
        if self.dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"lora dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {self.dtype!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def torch_dtype(self) -> torch.dtype:
        return ADAPTER_DTYPES[self.dtype]


def _uniform_a(a: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    """kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT initialise A: bound = sqrt(6 / (1 + 5)) *
    sqrt(3 / fan_in) = 1 / sqrt(fan_in). Written out so stacked [E, r, K] factors use K, not r * K."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        a.uniform_(-bound, bound, generator=generator)


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


class LoraFactor(nn.Module):
    """One low-rank factor as a module holding ``weight``, so that names read ``lora_A.weight`` as PEFT's.
    Not an ``nn.Linear``: FP8 conversion, which swaps exact linear types, leaves it alone."""

    def __init__(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, device=device, dtype=dtype))


class LoraLinear(nn.Module):
    """base(x) + s * (dropout(x) A^T) B^T around any linear-like ``base`` (``in_features``, ``out_features``,
    ``forward``); its weight is never read but to merge."""

    kernels = KernelPolicy()  # the adapter GEMMs' library (``frugallm.kernels.gemm``), taken from the base

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.rank, self.alpha, self.scaling, self.dropout = rank, alpha, alpha / rank, dropout
        device = device or _device_of(base)
        self.lora_A = LoraFactor(rank, self.in_features, device, dtype)  # [r, K]
        self.lora_B = LoraFactor(self.out_features, rank, device, dtype)  # [N, r], zero
        self.kernels = getattr(base, "kernels", LoraLinear.kernels)
        _uniform_a(self.lora_A.weight, self.in_features, generator)

    def _fast_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frozen base weight [N, K] when this forward can be ``lora_ops.lora_linear`` (training with
        grad, no adapter dropout, a plain frozen base in x's dtype, no autocast), else None."""
        if not torch.is_grad_enabled() or (self.training and self.dropout) \
                or torch.is_autocast_enabled(x.device.type) or type(x) is not torch.Tensor:
            return None
        w = plain_frozen_weight(self.base)
        return w if w is not None and w.dtype == x.dtype and w.device == x.device else None

    @classmethod
    def project_together(cls, x: torch.Tensor, modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
        """``frugallm.model.layers.project_together`` for adapted linears that read the same x: one
        ``lora_linear`` over their concatenated base weights (cached: the bases are frozen), [*, sum N];
        None where any of them would not take the fast path alone."""
        weights = [m._fast_weight(x) for m in modules]
        if any(w is None for w in weights) or len({m.rank for m in modules}) != 1:
            return None
        first = modules[0]
        w = first._concat_cache(weights)
        return lora_linear(x, w, [(m.lora_A.weight, m.lora_B.weight) for m in modules],
                           [m.scaling for m in modules], first.kernels)

    def _concat_cache(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """torch.cat(weights), kept from step to step while every weight is the same tensor unchanged
        (same storage, no in-place update since: ``_version``); an in-place change (a load) rebuilds it.
        Keeping it costs one copy of the fused base weights, where concatenating per step costs that copy's
        time. Weights whose storage moves between steps (FSDP gathering them per step, a move to another
        device) are concatenated per step from then on: a kept copy would hold a gathered layer's weights
        for the whole step, on every layer. On an accelerator nothing is kept either: there the copy is one
        fast device kernel beside the step, and memory is what limits the model (a kept copy of DeepSeek-V3's
        fused q_a/kv_a and gate/up weights would be about 7 GB in bf16)."""
        with torch.no_grad():
            if weights[0].device.type != "cpu":
                return torch.cat(weights)
            ptrs = tuple(w.data_ptr() for w in weights)
            key = (ptrs, tuple((w._version, w.dtype, w.device, tuple(w.shape)) for w in weights))
            cached = self.__dict__.get("_fused_base")
            if cached == "per-step" or (cached is not None and cached[0][0] != ptrs):
                self.__dict__["_fused_base"] = "per-step"
                return torch.cat(weights)
            if cached is None or cached[0] != key:
                cached = (key, torch.cat(weights))
                self.__dict__["_fused_base"] = cached
            return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._fast_weight(x)
        if w is not None:
            return lora_linear(x, w, [(self.lora_A.weight, self.lora_B.weight)], [self.scaling], self.kernels)
        y = self.base(x)  # [*, N] in the compute dtype
        dt = y.dtype
        h = F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x
        h = linear(h.to(dt), self.lora_A.weight.to(dt), None, self.kernels)  # [*, r]
        b = self.lora_B.weight.to(dt)  # [N, r]
        # y + s h B^T as one addmm: no separate pass over [M, N] for the sum, nor over B for the scale
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.rank), b.t(), alpha=self.scaling)
        return out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """s * B A in float32 [N, K]: what the adapter adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + s B A (no dropout), for readers of ``.weight`` such as the absorbed MLA
        decode (``MLA.kv_b_weights``); in the base weight's dtype, float32 for a frozen FP8 base."""
        w = _base_weight(self.base)
        return (w.float() + self.delta_weight()).to(w.dtype if w.is_floating_point() else torch.float32)

    def merged(self) -> nn.Module:
        """The base with the adapter folded in (the module doc)."""
        delta = self.delta_weight()
        base = self.base
        with torch.no_grad():
            if hasattr(base, "dequantize_weight"):
                w = base.dequantize_weight().float() + delta.to(_device_of(base))
                bias = getattr(base, "bias", None)
                new = Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device,
                             dtype=torch.float32)
                new.weight.copy_(w)
                if bias is not None:
                    new.bias.copy_(bias.float())
                new.kernels = self.kernels
                new.requires_grad_(False)
                return new
            base.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


def _base_weight(base: nn.Module, which: str | None = None) -> torch.Tensor:
    if hasattr(base, "dequantize_weight"):
        return base.dequantize_weight() if which is None else base.dequantize_weight(which)
    return getattr(base, which or "weight")


class LoraExperts(GroupedExperts):
    """Routed experts with one adapter per expert and projection beside the frozen ``base`` (any
    ``GroupedExperts``: plain, FP8, frozen FP8). The rows are laid out by the base's ``group``; ``project``
    adds the adapter's two grouped GEMMs on the same rows to the base's projection."""

    def __init__(self, base: GroupedExperts, *, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # not GroupedExperts': the stacked weights stay the base's
        self.base = base
        self.n_experts, self.intermediate = base.n_experts, base.intermediate
        self.kernels = base.kernels
        self.rank, self.alpha, self.scaling, self.dropout = rank, alpha, alpha / rank, dropout
        E, H, Im = base.n_experts, base.hidden, base.intermediate
        device = device or _device_of(base)

        def factor(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))

        self.lora_A_gate_up = factor(E, rank, H)
        self.lora_B_gate_up = factor(E, 2 * Im, rank)
        self.lora_A_down = factor(E, rank, Im)
        self.lora_B_down = factor(E, H, rank)
        _uniform_a(self.lora_A_gate_up, H, generator)
        _uniform_a(self.lora_A_down, Im, generator)

    @property
    def hidden(self) -> int:
        return self.base.hidden

    def factors(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, K], B [E, N, r]) of projection ``which`` (``GroupedExperts.PROJECTIONS``)."""
        if which == "gate_up_proj":
            return self.lora_A_gate_up, self.lora_B_gate_up
        if which == "down_proj":
            return self.lora_A_down, self.lora_B_down
        raise ValueError(f"unknown expert projection {which!r}; expected one of {self.PROJECTIONS}")

    def compute_dtype(self, xs: torch.Tensor) -> torch.dtype:
        return self.base.compute_dtype(xs)

    def group(self, xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ExpertGroups]:
        rows, groups = self.base.group(xs, counts)
        if groups.offs is None and self._cpu_grouped(rows):
            # float32 on the CPU: torch._grouped_mm runs every expert's GEMM in one call, base and adapter
            # alike, where one GEMM per expert costs 2E calls and autograd nodes per projection forward
            # (measured at the tiny preset: the adapter's forward + backward 2.0 ms against 3.0 ms as padded
            # bmm and 4.5 ms as a loop; the frozen base's forward 3.3 against 3.8 ms)
            groups = groups._replace(offs=counts.cumsum(0).to(torch.int32))
        return rows, groups

    def _cpu_grouped(self, rows: torch.Tensor) -> bool:
        """Whether this step's experts can run as CPU grouped GEMMs: a plain base (FP8 bases have their own
        GEMMs), unpadded float32 rows, and every row stride a multiple of 16 bytes, as torch._grouped_mm
        wants (hidden, expert width and rank each a multiple of 4 floats)."""
        return (type(self.base) is GroupedExperts and rows.device.type == "cpu" and rows.dtype == torch.float32
                and rows.shape[0] > 0 and hasattr(torch, "_grouped_mm") and not torch.is_autocast_enabled("cpu")
                and all(d % 4 == 0 for d in (self.hidden, self.intermediate, self.rank)))

    def project(self, xs: torch.Tensor, which: str, groups: ExpertGroups) -> torch.Tensor:
        """[rows, K] -> [rows, N]: the base's projection plus s * (xs A_e^T) B_e^T for each expert's rows
        (bucket padding rows are zero and stay zero)."""
        y = self.base.project(xs, which, groups)  # [rows, N]
        a, b = self.factors(which)
        dt = y.dtype
        if groups.offs is not None and (self.rank * torch.finfo(dt).bits // 8) % 16:
            # torch._grouped_mm wants 16-byte aligned strides, which a rank of r bf16 values is only when
            # r % 8 == 0; otherwise the adapter runs one GEMM per expert on the same (unpadded) rows
            groups = groups._replace(offs=None)
        h = F.dropout(xs, self.dropout, training=True) if self.training and self.dropout else xs
        if groups.offs is None:
            # every expert's adapter in two padded batched GEMMs (``lora_ops.expert_adapter``), where one
            # GEMM per expert costs 2E calls forward and 4E backward
            return y + expert_adapter(h.to(dt), a, b, groups.sizes, self.scaling)
        h = grouped_linear(h.to(dt), a.to(dt), groups)  # [rows, r]
        return y + grouped_linear(h, (b * self.scaling).to(dt), groups)  # [rows, N]

    def delta_weight(self, which: str) -> torch.Tensor:
        """s * B_e A_e for every expert, float32 [E, N, K]."""
        a, b = self.factors(which)
        return torch.bmm(b.float(), a.float()).mul_(self.scaling)

    def merged(self) -> GroupedExperts:
        base = self.base
        with torch.no_grad():
            if hasattr(base, "dequantize_weight"):
                dev = _device_of(base)
                with torch.device("meta"):
                    new = GroupedExperts(self.n_experts, self.hidden, self.intermediate)
                new = new.to_empty(device=dev).float()
                for which in self.PROJECTIONS:
                    getattr(new, which).copy_(base.dequantize_weight(which).float()
                                              + self.delta_weight(which).to(dev))
                new.kernels = self.kernels
                new.requires_grad_(False)
                return new
            for which in self.PROJECTIONS:
                w = getattr(base, which)
                w.copy_((w.float() + self.delta_weight(which).to(w.device)).to(w.dtype))
        return base

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}"


LORA_MODULES = (LoraLinear, LoraExperts)


# ----- applying, merging, counting ---------------------------------------------------------------------
@dataclass(frozen=True)
class LoraReport:
    wrapped: tuple[str, ...]  # module names, in model order
    trainable: int  # parameters (elements) that require grad: the adapters
    total: int  # all parameters (a frozen FP8 base's e4m3 buffers are not parameters)
    kinds: dict[str, int] = field(default_factory=dict)  # wrapped modules per class name

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.kinds.items())
        return (f"LoRA on {len(self.wrapped)} modules ({kinds}): {self.trainable:,} trainable of "
                f"{self.total:,} parameters ({100 * self.fraction:.2f}%)")


def _adaptable(module: nn.Module) -> bool:
    if isinstance(module, GroupedExperts):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int)


def _inside_lora(name: str, lora_names: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in lora_names)


def _shape_of_names(names: list[str]) -> str:
    """Distinct names with layer numbers as N, for error messages that show what exists."""
    shown = sorted({layer_pattern(n) for n in names})
    return ", ".join(shown) if shown else "none"


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The names of the modules ``cfg.targets`` select, in model order (the module doc's rules)."""
    modules = dict(model.named_modules())
    lora_names = [n for n, m in modules.items() if isinstance(m, LORA_MODULES)]
    if lora_names:
        raise ConfigError(f"the model already has LoRA adapters ({lora_names[0]}, ...): merge_lora first")
    adaptable = [n for n, m in modules.items() if n and _adaptable(m) and n not in NEVER_TARGETED]
    lenient = cfg.targets == DEFAULT_TARGETS
    chosen: set[str] = set()
    for pattern in cfg.targets:
        hits = [n for n in modules if n and pattern_matches(pattern, n)]
        never = [n for n in hits if n in NEVER_TARGETED]
        if never:
            raise ConfigError(f"lora targets: {pattern!r} matches {never[0]}, which cannot take an adapter "
                              f"(the loss reads its weight directly)")
        ok = [n for n in hits if n in adaptable]
        shown = adaptable if cfg.mtp else [n for n in adaptable if not n.startswith(MTP_PREFIX)]
        if not cfg.mtp:
            ok_trunk = [n for n in ok if not n.startswith(MTP_PREFIX)]
            if ok and not ok_trunk and not lenient:
                raise ConfigError(f"lora targets: {pattern!r} matches only MTP modules ({ok[0]}, ...); "
                                  f"set lora mtp = true to adapt them")
            ok = ok_trunk
        if not ok:
            if lenient:
                continue  # the default set spans every layout (module doc)
            what = (f"matches only {hits[0]} ({type(modules[hits[0]]).__name__}), not a linear layer or "
                    f"routed experts" if hits else "matches no module")
            raise ConfigError(f"lora targets: {pattern!r} {what}; the modules that can take an adapter are: "
                              f"{_shape_of_names(shown)}")
        chosen.update(ok)
    if not chosen:
        raise ConfigError(f"lora targets {list(cfg.targets)} select no module; the modules that can take "
                          f"an adapter are: {_shape_of_names(adaptable)}")
    return [n for n in modules if n in chosen]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def apply_lora(model: nn.Module, cfg: LoraConfig, *, generator: torch.Generator | None = None) -> LoraReport:
    """Freeze every parameter of ``model`` and wrap the modules ``cfg`` targets, in place. ``generator``
    draws the A factors (torch's default generator when None)."""
    names = resolve_targets(model, cfg)
    model.requires_grad_(False)
    kinds: dict[str, int] = {}
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        wrapper = LoraExperts if isinstance(base, GroupedExperts) else LoraLinear
        module = wrapper(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, dtype=cfg.torch_dtype,
                         generator=generator)
        setattr(parent, child, module.train(base.training))  # a new module trains; keep the model's mode
        kinds[wrapper.__name__] = kinds.get(wrapper.__name__, 0) + 1
    return LoraReport(tuple(names), sum(p.numel() for _, p in trainable_parameters(model)),
                      sum(p.numel() for p in model.parameters()), kinds)


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear | LoraExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_MODULES)]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad, each shared one once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The base model, computed by the same modules: every adapter's scale is 0 inside the block (GRPO's
    reference policy under LoRA, with no second copy of the weights). Restored on exit, also on error."""
    saved = [(m, m.scaling) for _, m in lora_modules(model)]
    try:
        for m, _ in saved:
            m.scaling = 0.0
        yield model
    finally:
        for m, s in saved:
            m.scaling = s


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the base (or, for a frozen FP8 base, a plain float32
    module) back in its place; returns the merged module names."""
    merged = []
    for name, module in lora_modules(model):
        parent, child = _parent(model, name)
        setattr(parent, child, module.merged())
        merged.append(name)
    return merged
