"""float32 GEMMs of a training step on the CPU: oneDNN (``frugallm.kernels.gemm``) against MKL (torch's
default), same operands, same process, interleaved rounds. Prints GFLOP/s per shape and GEMM role and a
final RESULT line with the speed-up of each role summed over the shapes.

    .venv/bin/python benchmarks/cpu_gemm.py [--preset tiny] [--tokens 4096] [--rounds 10] [--threads 2]

The shapes are a linear's three GEMMs for the layers whose shapes are fixed for a run (the ones
``frugallm.kernels.gemm`` sends to oneDNN: attention projections, dense and shared-expert MLPs, the output
head), at ``--tokens`` rows:
    fwd    y  = x W^T     x [M, K], W [N, K]
    dgrad  dx = g W       g [M, N]
    wgrad  dW = g^T x     (oneDNN reads g and x transposed)
Both libraries accumulate in float32; the relative difference of their results is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def layer_shapes(cfg) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    """(name, K, N) of the fixed-shape linears of one MLA + MoE layer and the output head."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    shapes = []
    if cfg.q_lora_rank is None:
        shapes.append(("q_proj", H, nh * cfg.qk_head_dim))
    else:
        shapes += [("q_a_proj", H, cfg.q_lora_rank), ("q_b_proj", cfg.q_lora_rank, nh * cfg.qk_head_dim)]
    shapes += [("kv_a_proj", H, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
               ("kv_b_proj", cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
               ("o_proj", nh * cfg.v_head_dim, H)]
    if cfg.n_shared_experts:
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        shapes += [("shared gate_up", H, 2 * shared), ("shared down", shared, H)]
    shapes += [("dense gate_up", H, 2 * cfg.intermediate_size), ("dense down", cfg.intermediate_size, H),
               ("lm_head", H, cfg.vocab_size)]
    return shapes


def compare(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, rounds: int
            ) -> dict[str, tuple[dict[str, float], float]]:
    """role -> ({library: median seconds}, relative difference of the two results), interleaved rounds."""
    from frugallm.kernels.gemm import onednn_nt as lp

    pairs = {"fwd": (lambda: x @ w.t(), lambda: lp(x, w)),
             "dgrad": (lambda: g @ w, lambda: lp(g, w.t())),
             "wgrad": (lambda: g.t() @ x, lambda: lp(g.t(), x.t()))}
    out = {}
    for role, (mkl, dnn) in pairs.items():
        a, b = mkl(), dnn()
        times: dict[str, list[float]] = {"mkl": [], "onednn": []}
        for _ in range(rounds):
            for lib, fn in (("mkl", mkl), ("onednn", dnn)):
                t0 = time.perf_counter()
                fn()
                times[lib].append(time.perf_counter() - t0)
        out[role] = ({lib: statistics.median(ts) for lib, ts in times.items()}, float((a - b).norm() / a.norm()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tokens", type=int, default=4096, help="rows M of every GEMM (tokens per step)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per GEMM and library")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from frugallm.config import preset
    from frugallm.kernels import choose
    from frugallm.kernels.host import cpu_facts

    if not cpu_facts().onednn:
        print(f"torch {torch.__version__} has no oneDNN: nothing to compare")
        return
    M = args.tokens
    gen = torch.Generator().manual_seed(0)
    totals = {role: {"mkl": 0.0, "onednn": 0.0} for role in ("fwd", "dgrad", "wgrad")}
    print(f"{args.preset}: M = {M} rows, float32, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, the kernel policy picks {choose('cpu').gemm}")
    print(f"{'layer':<16}{'K':>6}{'N':>7}  " + "".join(f"{role + ' MKL/oneDNN GF/s':>26}" for role in totals)
          + f"{'max rel diff':>14}")
    for name, K, N in layer_shapes(preset(args.preset)):
        x, w, g = (torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen),
                   torch.randn(M, N, generator=gen))
        cells, worst = [], 0.0
        for role, (med, diff) in compare(x, w, g, args.rounds).items():
            worst = max(worst, diff)
            for lib in med:
                totals[role][lib] += med[lib]
            flops = 2 * M * K * N
            cells.append(f"{flops / med['mkl'] / 1e9:>16.0f} / {flops / med['onednn'] / 1e9:<7.0f}")
        print(f"{name:<16}{K:>6}{N:>7}  " + "".join(f"{c:>26}" for c in cells) + f"{worst:>14.1e}")
    speedups = {role: t["mkl"] / t["onednn"] for role, t in totals.items()}
    print("time summed over the shapes, MKL / oneDNN: "
          + ", ".join(f"{role} {s:.2f}x" for role, s in speedups.items()))
    print(f"RESULT preset={args.preset} tokens={M} threads={torch.get_num_threads()} "
          + " ".join(f"onednn_speedup_{role}={s:.2f}" for role, s in speedups.items()))


if __name__ == "__main__":
    main()
