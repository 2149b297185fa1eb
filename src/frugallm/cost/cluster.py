"""Training on a cluster, on paper: memory per GPU under a (dp, ep, pp) layout, the all-to-all traffic of expert
parallelism per token and MoE layer, and its time against the computation it has to hide behind. Pure
functions of a ``ModelConfig`` and a ``ClusterPlan``; figures taken from papers live in ``cluster.toml``.

Symbols (DeepSeek-V3's values): G GPUs [2048], pp pipeline stages [16], dp = G / pp ranks per stage [128],
ep expert-parallel ranks, taken from each stage's dp ranks [64], so every expert has dp/ep copies [2];
H hidden [7168], I_m expert width [2048], E routed experts [256], k per token [8], M nodes a token's
experts may span [4], S sequence length [4096].

Layout. Stage p holds a contiguous run of layers (the first L mod pp stages one more); the first stage also
holds the embedding, the last the final norm, the output head and the MTP modules. Inside a stage the routed
experts are split ep ways and every other parameter is on each of the stage's dp ranks.

Memory per GPU (``stage_memory``), with DeepSeek-V3's precision recipe (section 3.3): bf16 working weights
(2 bytes), fp32 gradients (4), fp32 master weights and bf16 AdamW moments (4 + 2 + 2 = 8), the states
sharded over the ranks that hold a copy of the parameter (dp for the rest, dp/ep for an expert):
    sharding "zero1" (DeepSeek-V3): (2 + 4) * (P_ne + P_e / ep) + 8 * (P_ne + P_e) / dp
    sharding "fsdp"  (frugallm today): (2 + 4 + 8) * (P_ne + P_e) / dp, plus one layer's gathered bf16
                     weights while it runs
P_ne and P_e are the stage's non-expert and routed-expert parameters. Activations: the micro-batches in
flight, micro_batch * S tokens each, holding every layer of the stage (``memory.activation_bytes_per_token``,
taken per layer, bf16, nothing recomputed unless ``recompute``). A 1F1B schedule keeps up to pp - p
micro-batches in flight on stage p; DualPipe about pp + 1 per device and two copies of the weights (its
Table 2), which ``in_flight`` can model and the weight count leaves out.

All-to-all per token and MoE layer (``all_to_all_bytes``), as DeepSeek-V3 section 3.3.4 sends it: the
dispatch in fp8 (1 byte per element plus one fp32 scale per 1 x 128 tile), the combine in bf16; in the
backward the activation gradients go toward the experts in fp8 and come back in bf16, the same bytes again.
    per copy: dispatch H + 4 * ceil(H / 128) bytes, combine 2H bytes
Across nodes a token travels once per node it needs (at most M with node-limited routing) and is forwarded
inside the node over NVLink, where its expert outputs are summed before they cross back; over NVLink it
reaches all k experts. So InfiniBand carries M copies each way and NVLink k: upper bounds, since a token
whose experts share its node crosses no network for them.

Time (``overlap``), per token and MoE layer: communication = bytes / bandwidth per GPU (IB and NVLink run at
once; the slower sets the time), computation = the layer's training FLOPs (3x its forward: attention,
router, shared and routed experts) at the achieved FLOP rate. DeepSeek-V3 reported 180K H800-hours per
trillion tokens; with our FLOP count per token that is its achieved rate. The all-to-all cannot overlap the
experts that consume it: it has to hide behind another micro-batch's attention and experts, which is what
DualPipe's pairing of forward and backward chunks does (section 3.2.1). ``exposed_fraction`` is the share of
the layer's compute time added when nothing hides it.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from frugallm.config import ModelConfig, read_toml
from frugallm.cost.flops import forward_flops_breakdown, train_flops_per_token
from frugallm.cost.memory import activation_bytes_per_token, dtype_bytes, format_bytes
from frugallm.cost.params import expert_params, layer_params
from frugallm.errors import ConfigError

WEIGHT_BYTES, GRAD_BYTES, STATE_BYTES = 2, 4, 8  # bf16 weights; fp32 grads; fp32 master + 2 bf16 moments
SHARDINGS = ("zero1", "fsdp")
FP8_TILE = 128  # one fp32 scale per 1 x 128 activation tile (DeepSeek-V3 section 3.3.2)


def load_cluster(name: str = "deepseek-v3") -> dict[str, Any]:
    """A cluster from ``cluster.toml`` (its source and date included)."""
    with resources.as_file(resources.files("frugallm.cost") / "cluster.toml") as path:
        table = read_toml(path)
    if name not in table:
        raise ConfigError(f"unknown cluster {name!r}; known: {', '.join(table)}")
    return dict(table[name])


@dataclass(frozen=True, kw_only=True)
class ClusterPlan:
    gpus: int
    pp: int = 1
    ep: int = 1
    seq_len: int = 4096
    micro_batch: int = 1  # sequences per micro-batch
    global_batch: int | None = None  # sequences per optimizer step (for the pipeline bubble)
    in_flight: int | None = None  # micro-batches whose activations each stage holds; default 1F1B's pp - p
    sharding: str = "zero1"
    recompute: bool = False  # full recomputation of each layer in the backward

    def __post_init__(self) -> None:
        for name in ("gpus", "pp", "ep", "seq_len", "micro_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.gpus % self.pp:
            raise ConfigError(f"gpus={self.gpus} is not divisible by pp={self.pp}")
        if self.dp % self.ep:
            raise ConfigError(f"ep={self.ep} must divide the {self.dp} ranks of a pipeline stage (gpus / pp)")
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")

    @property
    def dp(self) -> int:
        return self.gpus // self.pp


def check_plan(cfg: ModelConfig, plan: ClusterPlan) -> None:
    if plan.ep > 1 and cfg.ffn != "moe":
        raise ConfigError("ep > 1 needs an MoE model")
    if cfg.ffn == "moe" and cfg.n_routed_experts % plan.ep:
        raise ConfigError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by ep={plan.ep}")
    if plan.pp > cfg.num_hidden_layers:
        raise ConfigError(f"pp={plan.pp} stages for {cfg.num_hidden_layers} layers")


# ----- parameters and memory ---------------------------------------------------------------------------------
def stage_layers(cfg: ModelConfig, pp: int) -> list[range]:
    L = cfg.num_hidden_layers
    sizes = [L // pp + (1 if p < L % pp else 0) for p in range(pp)]
    starts = [sum(sizes[:p]) for p in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _split(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of layer index ``layer`` (MTP blocks continue the numbering)."""
    routed = cfg.n_routed_experts * expert_params(cfg) if cfg.ffn == "moe" and cfg.is_moe_layer(layer) else 0
    return layer_params(cfg, layer) - routed, routed


def stage_params(cfg: ModelConfig, pp: int) -> list[tuple[int, int]]:
    """(P_ne, P_e) per stage: non-expert and routed-expert parameters."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = []
    for p, layers in enumerate(stage_layers(cfg, pp)):
        ne = e = 0
        for i in layers:
            a, b = _split(cfg, i)
            ne, e = ne + a, e + b
        if p == 0:
            ne += V * H  # embedding
        if p == pp - 1:
            ne += H + (0 if cfg.tie_word_embeddings else V * H)  # final norm, output head
            for d in range(cfg.num_nextn_predict_layers):  # MTP: norms, eh_proj, one block, head norm
                a, b = _split(cfg, cfg.num_hidden_layers + d)
                ne, e = ne + a + 3 * H + 2 * H * H, e + b
        out.append((ne, e))
    return out


def _act(cfg: ModelConfig, seq_len: int, recompute: bool, **changes: Any) -> int:
    return activation_bytes_per_token(cfg.replace(**changes), seq_len, recompute=recompute, include_mtp=False)


def layer_activation_bytes(cfg: ModelConfig, seq_len: int, *, moe: bool) -> int:
    """Activation bytes per token of one dense or MoE block: the difference of two model depths, so the
    per-layer count stays the one in ``memory.activation_bytes_per_token``."""
    if moe:
        return (_act(cfg, seq_len, False, num_hidden_layers=2, first_k_dense_replace=1)
                - _act(cfg, seq_len, False, num_hidden_layers=1, first_k_dense_replace=1))
    return (_act(cfg, seq_len, False, num_hidden_layers=2, first_k_dense_replace=2)
            - _act(cfg, seq_len, False, num_hidden_layers=1, first_k_dense_replace=1))


def stage_memory(cfg: ModelConfig, plan: ClusterPlan, stage: int) -> dict[str, Any]:
    """Bytes per GPU of pipeline stage ``stage`` (module docstring)."""
    check_plan(cfg, plan)
    ne, e = stage_params(cfg, plan.pp)[stage]
    layers = stage_layers(cfg, plan.pp)[stage]
    if plan.sharding == "zero1":
        held = ne + e / plan.ep
        weights, grads = WEIGHT_BYTES * held, GRAD_BYTES * held
        gathered = 0.0
    else:
        weights, grads = WEIGHT_BYTES * (ne + e) / plan.dp, GRAD_BYTES * (ne + e) / plan.dp
        biggest = max((sum(_split(cfg, i)) for i in layers), default=0)
        gathered = WEIGHT_BYTES * biggest / plan.ep  # one layer whole, its experts still split ep ways
    optimizer = STATE_BYTES * (ne + e) / plan.dp
    n_flight = plan.in_flight or plan.pp - stage  # 1F1B: stage p holds up to pp - p micro-batches
    tokens = plan.micro_batch * plan.seq_len
    per_layer = [layer_activation_bytes(cfg, plan.seq_len, moe=cfg.ffn == "moe" and cfg.is_moe_layer(i))
                 for i in layers]
    if plan.recompute:  # every micro-batch keeps each layer's input; one layer is rebuilt at a time
        activations = n_flight * tokens * len(layers) * cfg.hidden_size * 2 + tokens * max(per_layer, default=0)
    else:
        activations = n_flight * tokens * sum(per_layer)
    if stage == plan.pp - 1:  # the output head and the MTP modules
        head = _act(cfg, plan.seq_len, False, num_hidden_layers=1, first_k_dense_replace=1) - \
            layer_activation_bytes(cfg, plan.seq_len, moe=False)
        mtp = activation_bytes_per_token(cfg, plan.seq_len, include_mtp=True) - _act(cfg, plan.seq_len, False)
        activations += n_flight * tokens * (head + mtp)
    total = weights + grads + optimizer + gathered + activations
    return {"stage": stage, "layers": [layers.start, layers.stop - 1], "in_flight": n_flight,
            "params_non_expert": ne,
            "params_routed_experts": e, "weights": weights, "grads": grads, "optimizer": optimizer,
            "gathered_layer": gathered, "activations": activations, "total": total}


def memory_per_gpu(cfg: ModelConfig, plan: ClusterPlan) -> dict[str, Any]:
    """Every stage's memory per GPU, and the largest."""
    stages = [stage_memory(cfg, plan, p) for p in range(plan.pp)]
    return {"stages": stages, "max": max(stages, key=lambda s: s["total"])}


# ----- the all-to-all ------------------------------------------------------------------------------------------
def all_to_all_bytes(cfg: ModelConfig, *, dispatch: str = "fp8", combine: str = "bf16",
                     nodes: int | None = None) -> dict[str, Any]:
    """Bytes per token and MoE layer, forward pass (the backward moves the same again)."""
    H, k = cfg.hidden_size, cfg.num_experts_per_tok
    scales = 4 * math.ceil(H / FP8_TILE) if dtype_bytes(dispatch) == 1 else 0
    per_dispatch = H * dtype_bytes(dispatch) + scales
    per_combine = H * dtype_bytes(combine)
    M = min(nodes if nodes is not None else cfg.topk_group, k)
    return {"dispatch_per_copy": per_dispatch, "combine_per_copy": per_combine, "expert_copies": k,
            "node_copies": M, "dispatch_ib": M * per_dispatch, "combine_ib": M * per_combine,
            "dispatch_nvlink": k * per_dispatch, "combine_nvlink": k * per_combine,
            "forward_ib": M * (per_dispatch + per_combine), "forward_nvlink": k * (per_dispatch + per_combine)}


def moe_layer_flops(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one MoE layer: the whole layer and its experts alone."""
    br = forward_flops_breakdown(cfg, seq_len)
    L = cfg.num_hidden_layers
    n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
    attention = (br["attention_projections"] + br["attention_scores"] + br["attention_values"]) / L
    experts = (br["shared_experts"] + br["routed_experts"]) / n_moe
    return {"attention": attention, "router": br["router"] / n_moe, "experts": experts,
            "layer": attention + br["router"] / n_moe + experts}


def achieved_flops_from_gpu_hours(cfg: ModelConfig, seq_len: int, gpu_hours_per_trillion_tokens: float) -> float:
    """FLOP/s per GPU implied by a reported cost in GPU-hours per 1e12 training tokens."""
    tokens_per_s = 1e12 / (gpu_hours_per_trillion_tokens * 3600)
    return tokens_per_s * train_flops_per_token(cfg, seq_len)


def overlap(cfg: ModelConfig, seq_len: int, *, achieved_flops: float, ib_gbs: float, nvlink_gbs: float,
            nodes: int | None = None, dispatch: str = "fp8", combine: str = "bf16") -> dict[str, Any]:
    """Communication against computation per token and MoE layer, forward + backward (module docstring)."""
    a2a = all_to_all_bytes(cfg, dispatch=dispatch, combine=combine, nodes=nodes)
    fl = moe_layer_flops(cfg, seq_len)
    t_ib = 2 * a2a["forward_ib"] / (ib_gbs * 1e9)
    t_nvlink = 2 * a2a["forward_nvlink"] / (nvlink_gbs * 1e9)
    t_comm = max(t_ib, t_nvlink)
    t_layer = 3 * fl["layer"] / achieved_flops
    t_experts = 3 * fl["experts"] / achieved_flops
    return {"bytes": a2a, "flops_forward": fl, "achieved_tflops": achieved_flops / 1e12,
            "ib_gbs": ib_gbs, "nvlink_gbs": nvlink_gbs, "comm_ib_us": t_ib * 1e6, "comm_nvlink_us": t_nvlink * 1e6,
            "comm_us": t_comm * 1e6, "compute_layer_us": t_layer * 1e6, "compute_experts_us": t_experts * 1e6,
            "comm_over_experts": t_comm / t_experts, "comm_over_layer": t_comm / t_layer,
            "exposed_fraction": t_comm / t_layer}


def pipeline_bubble(pp: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline: (pp - 1) / (m + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


# ----- the report ------------------------------------------------------------------------------------------------
def cluster_report(cfg: ModelConfig, plan: ClusterPlan, *, ib_gbs: float, nvlink_gbs: float,
                   achieved_flops: float, nodes: int | None = None, gpu_memory_gb: float | None = None
                   ) -> dict[str, Any]:
    """One record: the plan, memory per GPU (largest stage), all-to-all bytes and times, pipeline bubble."""
    check_plan(cfg, plan)
    mem = memory_per_gpu(cfg, plan)
    rec: dict[str, Any] = {"plan": {**asdict(plan), "dp": plan.dp},
                           "memory": mem["max"], "memory_by_stage": [s["total"] for s in mem["stages"]],
                           "overlap": overlap(cfg, plan.seq_len, achieved_flops=achieved_flops, ib_gbs=ib_gbs,
                                              nvlink_gbs=nvlink_gbs, nodes=nodes)}
    if gpu_memory_gb is not None:
        rec["memory"]["fits"] = mem["max"]["total"] <= gpu_memory_gb * 1e9
    if plan.global_batch:
        m = plan.global_batch // (plan.dp * plan.micro_batch)
        rec["micro_batches_per_pipeline"] = m
        rec["bubble_1f1b"] = pipeline_bubble(plan.pp, m)
    return rec


def format_report(rec: dict[str, Any], title: str = "") -> str:
    p, m, o = rec["plan"], rec["memory"], rec["overlap"]
    b = o["bytes"]
    lines = [title] if title else []
    lines += [f"layout: {p['gpus']} GPUs = pp {p['pp']} x dp {p['dp']} (ep {p['ep']} inside each stage), "
              f"sharding {p['sharding']}, micro-batch {p['micro_batch']} x {p['seq_len']} tokens, "
              f"{p['in_flight'] or '1F1B: pp - stage'} in flight{', full recompute' if p['recompute'] else ''}",
              f"memory per GPU, largest stage ({m['stage']}: layers {m['layers'][0]}-{m['layers'][1]}"
              f"{', head and MTP' if m['stage'] == p['pp'] - 1 else ''}{', embedding' if m['stage'] == 0 else ''}"
              f", {m['in_flight']} micro-batches in flight): {format_bytes(m['total'])}"
              + (f" ({'fits' if m['fits'] else 'does NOT fit'})" if "fits" in m else ""),
              f"  weights {format_bytes(m['weights'])}, grads {format_bytes(m['grads'])}, optimizer "
              f"{format_bytes(m['optimizer'])}, gathered layer {format_bytes(m['gathered_layer'])}, "
              f"activations {format_bytes(m['activations'])}",
              f"  parameters on the stage: {m['params_non_expert'] / 1e9:.2f}B non-expert, "
              f"{m['params_routed_experts'] / 1e9:.2f}B routed experts (1/{p['ep']} per GPU)",
              "all-to-all per token and MoE layer, forward (the backward moves as much again):",
              f"  per copy: dispatch {b['dispatch_per_copy']:,} B (fp8 + scales), combine "
              f"{b['combine_per_copy']:,} B (bf16)",
              f"  InfiniBand, {b['node_copies']} node copies: dispatch {b['dispatch_ib']:,} B + combine "
              f"{b['combine_ib']:,} B = {b['forward_ib']:,} B",
              f"  NVLink, {b['expert_copies']} expert copies: dispatch {b['dispatch_nvlink']:,} B + combine "
              f"{b['combine_nvlink']:,} B = {b['forward_nvlink']:,} B",
              f"time per token and MoE layer, forward + backward, at {o['achieved_tflops']:.0f} TFLOP/s achieved:",
              f"  communication: IB {o['comm_ib_us']:.2f} us at {o['ib_gbs']:g} GB/s, NVLink "
              f"{o['comm_nvlink_us']:.2f} us at {o['nvlink_gbs']:g} GB/s",
              f"  computation: whole layer {o['compute_layer_us']:.2f} us, its experts {o['compute_experts_us']:.2f} us",
              f"  communication / expert computation = {o['comm_over_experts']:.2f}; / layer computation = "
              f"{o['comm_over_layer']:.2f}: without overlap each MoE layer takes {o['exposed_fraction'] * 100:.0f}% "
              f"longer"]
    if "bubble_1f1b" in rec:
        lines.append(f"pipeline: {rec['micro_batches_per_pipeline']} micro-batches per pipeline per step; "
                     f"1F1B bubble {rec['bubble_1f1b'] * 100:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m frugallm.cost.cluster``: the figures of docs/scaling.md."""
    from frugallm.config import preset
    from frugallm.cost.hardware import get_device

    ap = argparse.ArgumentParser(prog="python -m frugallm.cost.cluster", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="deepseek-v3")
    ap.add_argument("--cluster", default="deepseek-v3", help="an entry of cost/cluster.toml")
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--pp", type=int, default=None)
    ap.add_argument("--ep", type=int, default=None)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--sharding", choices=SHARDINGS, default="zero1")
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--ib-gbs", type=float, default=None, help="InfiniBand GB/s per GPU")
    args = ap.parse_args(argv)
    cfg, cl = preset(args.preset), load_cluster(args.cluster)
    gpu = get_device(cl["gpu"])
    plan = ClusterPlan(gpus=args.gpus or cl["gpus"], pp=args.pp or cl["pp"], ep=args.ep or cl["ep"],
                       seq_len=cl["seq_len"], micro_batch=args.micro_batch, global_batch=cl["global_batch"],
                       sharding=args.sharding, recompute=args.recompute)
    achieved = achieved_flops_from_gpu_hours(cfg, plan.seq_len, cl["gpu_hours_per_trillion_tokens"])
    rec = cluster_report(cfg, plan, ib_gbs=args.ib_gbs or cl["ib_gbs"], nvlink_gbs=cl["nvlink_gbs"],
                         achieved_flops=achieved, nodes=cl["max_nodes_per_token"], gpu_memory_gb=gpu.memory_gb)
    print(format_report(rec, f"{args.preset} on {cl['name']} ({gpu.name}, {gpu.memory_gb:g} GB); "
                             f"achieved rate from {cl['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per "
                             f"trillion tokens"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
