"""Training step (forward + backward + AdamW) of frugallm against transformers' DeepseekV3ForCausalLM,
same configuration and same weights, in one process. Prints a table and a final RESULT line.

    .venv/bin/python benchmarks/train_step_vs_hf.py [--preset tiny] [--batch 16] [--seq 256] [--steps 16]
        [--dtype float32|bfloat16] [--device cpu|cuda] [--profile]

Both models run in the same precision with fused AdamW: ours as `frugallm train` builds it
(`frugallm.train.optim.build_optimizer`), theirs as transformers' Trainer does by default on torch >= 2.8
(`adamw_torch_fused`). transformers' experts run with its default implementation (grouped_mm) and, for
reference, with `experts_implementation="eager"`. The implementations take turns: in each round each runs two
steps and the second is timed, so that it follows a step of the same model as in training, and a change in
the machine's load during the run hits all of them alike. The speed-ups printed are the medians of the
per-round ratios, with their interquartile range.

Where frugallm's float32 training GEMMs run on oneDNN (``frugallm.kernels.gemm``: AMD CPUs with AVX-512), a third
row runs ours again with every GEMM on MKL (the kernel policy with ``gemm=torch``), as transformers' are, so the table shows how much of the
speed-up is the GEMM library and how much the rest of the implementation.

The last column counts each step's minor page faults. With glibc's default malloc, memory freed at the end of
a step's backward is returned to the system (the heap is trimmed, large blocks are unmapped) and the next
step faults it in again, page by page; a fault cost about 1.1 us per 4 KiB page on the project's AMD EPYC
(filling 100 MB fresh against the same 100 MB again). An implementation that allocates more fresh memory
per step pays more of this, and the count varies from run to run with the heap's state, which moves the
ratio. Run with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648`` (glibc keeps the
memory) to see the implementations without it; the figures of both runs are in the issue notes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import replace

import torch

from frugallm.config import preset
from frugallm.kernels import choose, install, override_from_env
from frugallm.model import build_model
from frugallm.train.config import TrainConfig
from frugallm.train.optim import build_optimizer


def hf_model(cfg, ours, device, dtype, impl: str | None):
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "model_type")})
    kwargs = {}
    if impl is not None:
        hf_cfg.experts_implementation = impl
    model = transformers.DeepseekV3ForCausalLM(hf_cfg, **kwargs).to(device, dtype)
    theirs = model.state_dict()
    with torch.no_grad():
        for name, t in ours.state_dict().items():
            if name in theirs:
                theirs[name].copy_(t)
    return model


def minor_faults() -> int:
    """Minor page faults of this process so far: first touches of memory the allocator fresh-mapped."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(step, device: str) -> tuple[float, int]:
    """Seconds and minor page faults of one step."""
    if device == "cuda":
        torch.cuda.synchronize()
    f0, t0 = minor_faults(), time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, minor_faults() - f0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=16, help="timed rounds (after 1 warm-up round)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--profile", action="store_true",
                    help="then profile two steps of each implementation and print where its time goes")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)  # transformers has no MTP
    kernels = choose(args.device, dtype, override_from_env())  # as frugallm train chooses them
    ours = build_model(cfg, device=args.device, dtype=dtype, seed=0, kernels=kernels)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    default_gemm = "onednn" if kernels.gemm == "onednn" else "mkl"

    def make_step(model, loss_fn, opt, kernels=None):
        def step():
            if kernels is not None:  # ours: the policy of this row
                install(model, kernels)
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    fused = args.device in ("cpu", "cuda")
    ours_opt = build_optimizer(ours, TrainConfig(lr=1e-4))
    impls = {"frugallm": make_step(ours, lambda m: m.forward_train(ids).loss, ours_opt, kernels)}
    if args.device == "cpu" and dtype == torch.float32 and kernels.gemm == "onednn":
        impls["frugallm (MKL GEMMs)"] = make_step(ours, lambda m: m.forward_train(ids).loss, ours_opt,
                                                  replace(kernels, gemm="torch"))
    for impl in (None, "eager"):
        try:
            theirs = hf_model(cfg, ours, args.device, dtype, impl)
        except Exception as e:  # an implementation this transformers build lacks
            print(f"transformers experts_implementation={impl}: unavailable ({e})")
            continue
        opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=fused or None)
        impls[f"transformers ({impl or 'default'} experts)"] = make_step(
            theirs, lambda m: m(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss, opt)
    times: dict[str, list[float]] = {name: [] for name in impls}
    faults: dict[str, list[int]] = {name: [] for name in impls}
    for r in range(args.steps + 1):  # one warm-up round
        for name, step in impls.items():
            step()  # untimed: the timed step follows a step of the same model, as in training
            t, f = timed(step, args.device)
            if r >= 1:
                times[name].append(t)
                faults[name].append(f)
    rows = [(name, statistics.median(t)) for name, t in times.items()]
    tokens = args.batch * args.seq
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads, {args.steps} rounds")
    print(f"{'implementation':<36}{'s/step':>10}{'tokens/s':>12}{'ours faster':>14}{'rounds 25-75%':>16}"
          f"{'page faults/step':>18}")
    ours_t = times["frugallm"]
    ratios = []
    for name, s in rows:
        # per-round ratios: each round's steps ran back to back, so a change of load cancels in them
        per_round = sorted(t / o for t, o in zip(times[name], ours_t, strict=True))
        mid = statistics.median(per_round)
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        print(f"{name:<36}{s:>10.3f}{tokens / s:>12.0f}{mid:>13.2f}x{q1:>9.2f}-{q3:.2f}x"
              f"{statistics.median(faults[name]):>18.0f}")
        if name.startswith("transformers"):
            ratios.append(f"speedup_vs_hf_{name.split('(')[1].split()[0]}={mid:.2f}")
        elif name != "frugallm":
            ratios.append(f"speedup_vs_ours_mkl_gemms={mid:.2f}")
    print("page faults/step: minor faults (median), each a first touch of memory the allocator fresh-mapped; "
          "with glibc's default malloc, freed activation memory goes back to the system and the next step "
          "faults it in again (module docstring)")
    print(f"RESULT preset={args.preset} dtype={args.dtype} device={args.device} cpu_gemm={default_gemm} "
          f"ours_tokens_per_s={tokens / rows[0][1]:.0f} {' '.join(ratios)}")
    if args.profile:
        print("\nwhere the step's time goes (operators' own time, two profiled steps, ms per step):")
        print(f"{'implementation':<36}{'total':>8}{'GEMMs':>8}{'GFLOP/s':>9}{'attention':>11}{'optimizer':>11}"
              f"{'other':>8}  largest other operators")
        for name, step in impls.items():
            print(f"{name:<36}" + profile_step(step, args.device))
        print("attention: scaled_dot_product_attention's forward and backward where SDPA runs a fused kernel; "
              "where it decomposes (its math path), the backward runs as separate GEMM and softmax nodes and "
              "counts under those")


# operators whose own time is a GEMM's, with the FLOPs of their recorded shapes
def _gemm_flops(name: str, shapes: list) -> int | None:
    import math

    if name in ("aten::mm", "aten::bmm"):  # a [.., M, K] @ b [.., K, N]
        return 2 * math.prod(shapes[0]) * shapes[1][-1]
    if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm"):  # (c, a, b)
        return 2 * math.prod(shapes[1]) * shapes[2][-1]
    if name == "aten::_grouped_mm":  # a [M, K] rows grouped by offsets, b [G, K, N]: each row meets one group
        return 2 * math.prod(shapes[0]) * shapes[1][-1]
    if name == "mkldnn::_linear_pointwise":  # x [.., K], w [N, K]
        return 2 * math.prod(shapes[0]) * shapes[1][0]
    return None


def _in_attention(event) -> bool:
    """The event is, or runs inside, scaled_dot_product_attention or its backward."""
    e = event
    while e is not None:
        if "scaled_dot_product" in e.name or "flash_attention" in e.name or "ScaledDotProduct" in e.name:
            return True
        e = e.cpu_parent
    return False


def profile_step(step, device: str, steps: int = 2) -> str:
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    parts: Counter[str] = Counter()
    other: Counter[str] = Counter()
    flops = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU or e.self_cpu_time_total <= 0:
            continue
        ms = e.self_cpu_time_total / 1e3 / steps
        f = _gemm_flops(e.name, e.input_shapes)
        if _in_attention(e):  # scaled_dot_product_attention, fused or decomposed (its GEMMs included)
            parts["attention"] += ms
        elif f is not None:
            parts["gemm"] += ms
            flops += f / steps
        elif "adam" in e.name.lower():
            parts["optimizer"] += ms
        else:
            parts["other"] += ms
            other[e.name] += ms
    total = sum(parts.values())
    rate = flops / (parts["gemm"] / 1e3) / 1e9 if parts["gemm"] else 0.0
    top = ", ".join(f"{n.split('::')[-1]} {ms:.0f}" for n, ms in other.most_common(4))
    note = " (GPU: CPU-side times only)" if device == "cuda" else ""
    return (f"{total:>8.0f}{parts['gemm']:>8.0f}{rate:>9.0f}{parts['attention']:>11.0f}{parts['optimizer']:>11.0f}"
            f"{parts['other']:>8.0f}  {top}{note}")


if __name__ == "__main__":
    main()
