"""A LoRA fine-tuning step (forward + backward + AdamW on the adapters) of frugallm against transformers +
peft, same weights, same adapters, same data, same precision, in one process. Prints a table and a final
RESULT line.

    .venv/bin/python benchmarks/finetune_vs_peft.py [--preset tiny] [--batch 2] [--seq 256] [--steps 6]
        [--rank 8] [--no-memory]

Same weights: ours is built from the preset, exported with ``frugallm.model.hf.save_pretrained`` and
loaded by transformers (``DeepseekV3ForCausalLM``, its default experts implementation). Same adapters:
``apply_lora`` on ours with the default targets (every MLA projection, the dense MLP and shared experts,
the routed experts per expert), written with ``save_adapter`` and loaded by
``peft.PeftModel.from_pretrained(..., is_trainable=True)``, so peft adapts exactly the same modules with
the same initial A (B is zero in both). Both optimizers are fused AdamW over the adapters only (ours from
``build_optimizer``, which takes the parameters that require grad). Steps alternate between the two: each
round runs two steps of one and times the second, then the same for the other; the speed-up is the median
of the per-round ratios, with its interquartile range.

Memory: peak resident memory of training steps, each implementation in a child process of its own (the
same script with ``--child``) that loads the same files and runs one forward without grad (so lazily built
state is counted in neither); then a thread samples the resident set size (``/proc/self/statm``) every
millisecond while two training steps run, the first of which creates the optimizer state. The figure is
the highest sample minus the resident size just before the steps. It counts everything the steps touch
(activations, gradients, AdamW state, allocator slack), not tensors alone, and memory the allocator kept
from setup and reuses is not counted; a peak shorter than a millisecond can be missed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from frugallm.config import preset
from frugallm.kernels import choose, override_from_env
from frugallm.model import build_model
from frugallm.model.hf import from_pretrained, save_pretrained
from frugallm.train.config import TrainConfig
from frugallm.train.optim import build_optimizer
from frugallm.tune.adapter import load_adapter, save_adapter
from frugallm.tune.lora import LoraConfig, apply_lora


def ours_step(hf_dir: Path, adapter_dir: Path, ids: torch.Tensor):
    model = from_pretrained(hf_dir)
    from frugallm.kernels import install

    install(model, choose("cpu", torch.float32, override_from_env()))  # as frugallm train chooses them
    load_adapter(model, adapter_dir)
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=1e-4))

    def step() -> None:
        model.forward_train(ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, lambda: model(ids[:, :-1])


def peft_step(hf_dir: Path, adapter_dir: Path, ids: torch.Tensor):
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model = peft.PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step() -> None:
        model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, lambda: model(input_ids=ids[:, :-1])


IMPLS = {"frugallm": ours_step, "transformers + peft": peft_step}


def rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


def child(args: argparse.Namespace) -> None:
    """Set up one implementation, report the peak RSS growth of its steps as JSON on stdout."""
    import gc
    import threading

    ids = torch.load(Path(args.child_dir) / "ids.pt")
    model, step, infer = IMPLS[args.child](Path(args.child_dir) / "hf", Path(args.child_dir) / "adapter", ids)
    with torch.no_grad():
        infer()
    gc.collect()
    before = rss_kib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(args.steps):
        step()
    done.set()
    sampler.join()
    print(json.dumps({"before_kib": before, "step_peak_kib": max(peak[0], rss_kib()) - before}))


def measure_memory(name: str, work: Path, steps: int) -> dict[str, int] | None:
    cmd = [sys.executable, __file__, "--child", name, "--child-dir", str(work), "--steps", str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("{")]
    if run.returncode != 0 or not lines:
        print(f"memory of {name}: child failed ({run.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=2, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (after 1 warm-up round)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory children")
    ap.add_argument("--child", choices=list(IMPLS), help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0)  # transformers has no MTP
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    with tempfile.TemporaryDirectory(prefix="finetune_vs_peft.") as tmp:
        work = Path(tmp)
        base = build_model(cfg, seed=0)
        save_pretrained(base, work / "hf")
        apply_lora(base, lora, generator=torch.Generator().manual_seed(0))
        save_adapter(base, work / "adapter", lora)
        del base
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                            generator=torch.Generator().manual_seed(1))
        torch.save(ids, work / "ids.pt")
        steps = {name: make(work / "hf", work / "adapter", ids)[1] for name, make in IMPLS.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.steps + 1):  # one warm-up round
            for name, step in steps.items():
                step()  # untimed: the timed step follows a step of the same model, as in training
                t0 = time.perf_counter()
                step()
                if r >= 1:
                    times[name].append(time.perf_counter() - t0)
        memory = {} if args.no_memory else {name: measure_memory(name, work, 2) for name in steps}
    tokens = args.batch * args.seq
    print(f"\n{args.preset}, LoRA rank {args.rank} on the default targets, batch {args.batch} x {args.seq}, "
          f"float32 on cpu, {torch.get_num_threads()} threads, {args.steps} rounds")
    print(f"{'implementation':<24}{'s/step':>10}{'tokens/s':>12}{'ours faster':>14}{'rounds 25-75%':>16}"
          f"{'step peak RSS MiB':>19}")
    ours_t = times["frugallm"]
    ratio = 1.0
    for name, t in times.items():
        per_round = sorted(x / o for x, o in zip(t, ours_t, strict=True))
        mid = statistics.median(per_round)
        q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        mem = memory.get(name)
        mem_s = f"{mem['step_peak_kib'] / 1024:>19.0f}" if mem else f"{'-':>19}"
        s = statistics.median(t)
        print(f"{name:<24}{s:>10.3f}{tokens / s:>12.0f}{mid:>13.2f}x{q1:>9.2f}-{q3:.2f}x{mem_s}")
        if name != "frugallm":
            ratio = mid
    print("step peak RSS: resident memory sampled during two steps above the resident memory before them, "
          "each implementation alone in a child process (module docstring)")
    mem_ratio = ""
    if memory.get("frugallm") and memory.get("transformers + peft") and memory["frugallm"]["step_peak_kib"]:
        mem_ratio = (f" peft_over_ours_step_peak_rss="
                     f"{memory['transformers + peft']['step_peak_kib'] / memory['frugallm']['step_peak_kib']:.2f}")
    print(f"RESULT preset={args.preset} rank={args.rank} dtype=float32 device=cpu "
          f"ours_tokens_per_s={tokens / statistics.median(ours_t):.0f} speedup_vs_peft={ratio:.2f}{mem_ratio}")


if __name__ == "__main__":
    main()
