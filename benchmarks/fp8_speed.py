"""FP8 against BF16 speed, measured in the same process: GEMMs at the projection and expert shapes of one
layer of deepseek-v2-lite and deepseek-v3, and the training-step time of a model of more than 1B parameters.

On a GPU of compute capability >= 9.0 the FP8 side is the ``hopper`` backend (blockwise ``scaled_mm``).
Per shape (M tokens, N out, K in) it times
    bf16        F.linear(x, W) in bf16                                       the peer
    fp8 kernel  the blockwise scaled_mm call alone on prepared operands
    fp8 gemm    Fp8Backend.gemm_nt: padding and scale layout + the kernel
    fp8 fwd     quantize x (1x128) and W (128x128) + gemm: what a forward pays
    train       one Fp8Linear forward + backward (three GEMMs, five quantizations) against an autocast
                nn.Linear forward + backward
and the step time of deepseek-v2-lite cut to --step-layers layers (AdamW, bf16 autocast) with and without
``convert_to_fp8``. Every ratio is bf16 time / fp8 time (> 1: FP8 is faster). The issue's target: >= 1.3x
on the step.

Anywhere else the emulated backend runs, which dequantizes and multiplies in FP32: the script checks that
the code paths run at the tiny preset's shapes, says that no speed figure is meaningful there, and prints
n/a in its RESULT line.

    python benchmarks/fp8_speed.py                       # on an H100 / H200 / H800
    python benchmarks/fp8_speed.py --tokens 16384 --step-layers 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.config import ModelConfig, preset
from frugallm.model import build_model
from frugallm.precision import Fp8Recipe, convert_to_fp8, select_backend
from frugallm.precision.backends import HopperBackend
from frugallm.precision.quant import quantize


def layer_shapes(cfg: ModelConfig, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K) of every GEMM of one MLA + MoE layer's forward; routed experts at the mean number of
    tokens an expert receives (tokens * k / E, rounded up to 128)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    shapes = []
    if cfg.q_lora_rank is None:
        shapes.append(("q_proj", tokens, nh * cfg.qk_head_dim, H))
    else:
        shapes += [("q_a_proj", tokens, cfg.q_lora_rank, H), ("q_b_proj", tokens, nh * cfg.qk_head_dim, cfg.q_lora_rank)]
    shapes += [("kv_a_proj", tokens, cfg.kv_lora_rank + cfg.qk_rope_head_dim, H),
               ("kv_b_proj", tokens, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
               ("o_proj", tokens, H, nh * cfg.v_head_dim)]
    per_expert = -(-tokens * cfg.num_experts_per_tok // cfg.n_routed_experts // 128) * 128
    I = cfg.moe_intermediate_size
    shapes += [("expert gate_up", per_expert, 2 * I, H), ("expert down", per_expert, H, I),
               ("shared gate_up", tokens, 2 * I * cfg.n_shared_experts, H),
               ("shared down", tokens, H, I * cfg.n_shared_experts)]
    return shapes


def timer(device: torch.device, fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_gemm(name: str, M: int, N: int, K: int, device: torch.device, repeats: int) -> dict:
    backend = select_backend("auto", device)
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    xq, wq = quantize(x, (1, 128)), quantize(w, (128, 128))
    row = {"name": name, "M": M, "N": N, "K": K}
    row["bf16"] = timer(device, lambda: F.linear(xb, wb), repeats)
    if isinstance(backend, HopperBackend):
        a = HopperBackend.scaled_mm_args(xq, wq)
        kinds = {"1x128": F.ScalingType.BlockWise1x128, "128x128": F.ScalingType.BlockWise128x128}
        row["fp8 kernel"] = timer(device, lambda: F.scaled_mm(a.mat_a, a.mat_b, a.scale_a, kinds[a.recipe_a], a.scale_b,
                                                              kinds[a.recipe_b], output_dtype=torch.bfloat16), repeats)
    row["fp8 gemm"] = timer(device, lambda: backend.gemm_nt(xq, wq, torch.bfloat16), repeats)
    row["fp8 fwd"] = timer(device, lambda: backend.gemm_nt(quantize(x, (1, 128)), quantize(w, (128, 128)),
                                                           torch.bfloat16), repeats)
    ref = nn.Linear(K, N, bias=False, device=device)
    fp8 = convert_to_fp8(nn.Sequential(nn.Linear(K, N, bias=False, device=device)), Fp8Recipe())[0]
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=torch.bfloat16)

    def train(lin: nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = lin(xg)
            y.backward(dy)
        return step

    row["train bf16"] = timer(device, train(ref), repeats)
    row["train fp8"] = timer(device, train(fp8), repeats)
    return row


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            res = model.forward_train(tokens)
        (res.loss + 0.3 * sum(res.mtp_losses) + 1e-4 * res.balance_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_step(cfg: ModelConfig, batch: int, seq: int, device: torch.device, repeats: int) -> dict:
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1 + cfg.num_nextn_predict_layers), device=device)
    out = {}
    for precision in ("bf16", "fp8"):
        model = build_model(cfg, device=device, seed=0)
        if precision == "fp8":
            convert_to_fp8(model, Fp8Recipe())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        out[precision] = timer(device, _train_step(model, opt, tokens), repeats, warmup=2)
        out["params"] = sum(p.numel() for p in model.parameters())
        if device.type == "cuda":
            out[f"{precision} peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GEMM (M of the projections)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per figure (median)")
    p.add_argument("--step-layers", type=int, default=4, help="layers of deepseek-v2-lite for the step timing")
    p.add_argument("--step-batch", type=int, default=4, help="sequences per step")
    p.add_argument("--step-seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--no-step", action="store_true", help="skip the model step timing")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = select_backend("auto", device)
    meaningful = backend.name == "hopper"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {where}   fp8 backend: {backend.name}   torch {torch.__version__}")
    if not meaningful:
        print("no GPU of compute capability >= 9.0: the emulated backend dequantizes and multiplies in FP32, "
              "so no speed figure here is meaningful; this run only checks that the benchmark's paths work")
        models, tokens, repeats = {"tiny": preset("tiny")}, 256, 2
    else:
        models, tokens, repeats = ({"deepseek-v2-lite": preset("deepseek-v2-lite"), "deepseek-v3": preset("deepseek-v3")},
                                   args.tokens, args.repeats)

    rows = []
    for model_name, cfg in models.items():
        for name, M, N, K in layer_shapes(cfg, tokens):
            row = bench_gemm(name, M, N, K, device, repeats)
            row["model"] = model_name
            rows.append(row)
    cols = ["bf16", "fp8 kernel", "fp8 gemm", "fp8 fwd", "train bf16", "train fp8"]
    print(f"\n{'model':<17} {'gemm':<15} {'M':>6} {'N':>6} {'K':>6} " + " ".join(f"{c + ' ms':>13}" for c in cols)
          + f" {'x kernel':>9} {'x fwd':>7} {'x train':>8}")
    for r in rows:
        times = " ".join(f"{1e3 * r[c]:>13.3f}" if c in r else f"{'-':>13}" for c in cols)
        if meaningful:
            ratios = (f"{r['bf16'] / r['fp8 kernel']:>9.2f} {r['bf16'] / r['fp8 fwd']:>7.2f} "
                      f"{r['train bf16'] / r['train fp8']:>8.2f}")
        else:  # emulated FP32 against (on CPUs without bf16 instructions, emulated) bf16: no speed figure
            ratios = f"{'n/a':>9} {'n/a':>7} {'n/a':>8}"
        print(f"{r['model']:<17} {r['name']:<15} {r['M']:>6} {r['N']:>6} {r['K']:>6} {times} {ratios}")

    step = None
    if meaningful and not args.no_step:
        cfg = preset("deepseek-v2-lite").replace(num_hidden_layers=args.step_layers)
        step = bench_step(cfg, args.step_batch, args.step_seq, device, max(5, repeats // 2))
        print(f"\nstep: deepseek-v2-lite x {args.step_layers} layers ({step['params'] / 1e9:.2f}B parameters), "
              f"batch {args.step_batch} x {args.step_seq}: bf16 {step['bf16']:.3f} s "
              f"({step.get('bf16 peak GiB', 0):.1f} GiB), fp8 {step['fp8']:.3f} s "
              f"({step.get('fp8 peak GiB', 0):.1f} GiB), speedup {step['bf16'] / step['fp8']:.2f}x (target 1.3x)")

    if not meaningful:
        print(f"RESULT device={device.type} backend={backend.name} meaningful=no gemm_kernel_speedup=n/a "
              f"fwd_speedup=n/a train_linear_speedup=n/a step_speedup=n/a shapes={len(rows)}")
        return 0

    def median(key: Callable[[dict], float]) -> float:
        return statistics.median(key(r) for r in rows)

    step_part = (f"step_speedup={step['bf16'] / step['fp8']:.2f} step_params_b={step['params'] / 1e9:.2f}"
                 if step else "step_speedup=n/a")
    print(f"RESULT device={where.replace(' ', '_')} backend=hopper "
          f"gemm_kernel_speedup_median={median(lambda r: r['bf16'] / r['fp8 kernel']):.2f} "
          f"fwd_speedup_median={median(lambda r: r['bf16'] / r['fp8 fwd']):.2f} "
          f"train_linear_speedup_median={median(lambda r: r['train bf16'] / r['train fp8']):.2f} {step_part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
