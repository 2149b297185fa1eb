"""``frugallm cost`` (training: FLOPs, GPU-hours, dollars, MFU), ``frugallm cost serve`` (dollars per million
tokens, self-hosting against API prices) and ``frugallm cost finetune`` (LoRA over a bf16 or fp8 base, or full
fine-tuning: memory per GPU, GPUs needed, GPU-hours): the flags, and the record ``frugallm.cost.estimate``
(``frugallm.cost.finetune`` for fine-tuning) computes printed as JSON (``--json``; the field names are documented in docs/costs.md and stay stable) or as a
table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from frugallm.config import PRESETS, ModelConfig, load_model_config, preset
from frugallm.cost.estimate import read_benchmark, serving_estimate, training_estimate
from frugallm.cost.finetune import COMPARE, finetune_estimate
from frugallm.cost.memory import format_bytes
from frugallm.cost.report import read_cost_json, run_model_config
from frugallm.errors import ConfigError
from frugallm.tune.targets import DEFAULT_TARGETS


# ----- validation and formatting ---------------------------------------------------------------------------
def _si(n: float, digits: int = 2) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{digits}f}{unit}"
    return f"{n:.{digits}f}".rstrip("0").rstrip(".")


def _usd(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e6:
        return f"${x / 1e6:,.3f}M"
    if abs(x) >= 1e4:
        return f"${x:,.0f}"
    return f"${x:,.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.2g}%"


def _flop(x: float) -> str:
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} FLOP"


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # pipes and files: do not wrap notes at 80 columns
        console = Console(width=max(console.width, 130))
    return console


def _resolve_model(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.config and args.preset:
        raise ConfigError("give either --preset or --config, not both")
    if args.config:
        return load_model_config(args.config), str(args.config)
    if args.preset:
        return preset(args.preset), args.preset
    if getattr(args, "from_run", None):
        return run_model_config(args.from_run), f"{args.from_run}"
    raise ConfigError(f"a model is required: --preset NAME ({', '.join(PRESETS)}) or --config PATH")


# ----- training --------------------------------------------------------------------------------------------
def _render_training(rec: dict[str, Any]) -> None:
    console = _console()
    where = f" on {rec['gpu_name']}" if rec["gpu_name"] else ""
    table = Table(title=f"frugallm cost: {rec['model']}, {_si(rec['tokens'])} tokens at seq_len "
                        f"{rec['seq_len']}{where}")
    for col, just in (("field", "left"), ("value", "right"), ("how", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    act_ne = rec["six_n_flops_per_token"] / 6
    table.add_row("params_total", _si(rec["params_total"]), f"{rec['params_total']:,}; MTP modules add "
                  f"{_si(rec['params_mtp'])}")
    table.add_row("params_active", _si(rec["params_active"]), f"{rec['params_active']:,} per token, "
                  "embedding included")
    table.add_row("train_flops_per_token", _flop(rec["train_flops_per_token"]),
                  "3 x forward matmuls: causal attention at seq_len, router, experts, MTP")
    table.add_row("six_n_flops_per_token", _flop(rec["six_n_flops_per_token"]),
                  f"6 x {_si(act_ne)} active non-embedding params; exact / 6N = "
                  f"{rec['train_flops_per_token'] / rec['six_n_flops_per_token']:.3f}")
    table.add_row("total_flops", f"{rec['total_flops']:.4g}", "train_flops_per_token x tokens")
    table.add_row("kv_cache_bytes_per_token", f"{rec['kv_cache_bytes_per_token']:,} B", "bf16, all layers")
    _memory_rows(table, rec)
    if rec["gpu_hours"] is not None:
        src = {"given": "from --mfu", "implied": "given", "measured": "at the run's measured rate"}
        table.add_row("gpu_hours", _si(rec["gpu_hours"], 3), src[rec["mfu_source"]])
        table.add_row("cost_usd", _usd(rec["cost_usd"]), f"at {_usd(rec['price_per_gpu_hour'])} per GPU-hour")
        mfu = "-" if rec["mfu"] is None else _pct(rec["mfu"])
        peak = f" of {rec['peak_tflops']:,.0f} ({rec['precision']} peak)" if rec["peak_tflops"] else ""
        table.add_row("mfu", mfu, f"{rec['mfu_source']}: {rec['achieved_tflops_per_gpu']:,.1f} TFLOP/s "
                      f"per GPU{peak}")
        table.add_row("tokens_per_second_per_gpu", f"{rec['tokens_per_second_per_gpu']:,.0f}", "")
        if rec["wall_days"] is not None:
            table.add_row("wall_days", f"{rec['wall_days']:,.1f}", f"on {rec['gpus']:,} GPUs")
    console.print(table)
    if rec["gpu_hours"] is None:
        console.print("GPU-hours and dollars: pass --gpu NAME with --mfu X or --gpu-hours H, or --from-run DIR")
    if rec["vs_dense"]:
        dense = Table(title="MoE against dense twins (same attention, dense FFN in every layer)")
        for col in ("field", "moe", "dense, same total", "dense, same active"):
            dense.add_column(col, justify="left" if col == "field" else "right")
        st, sa = rec["vs_dense"]["same_total"], rec["vs_dense"]["same_active"]
        dense.add_row("params_total", _si(rec["params_total"]), _si(st["params_total"]), _si(sa["params_total"]))
        dense.add_row("params_active", _si(rec["params_active"]), _si(st["params_active"]),
                      _si(sa["params_active"]))
        dense.add_row("train_flops_per_token", _flop(rec["train_flops_per_token"]),
                      _flop(st["train_flops_per_token"]), _flop(sa["train_flops_per_token"]))
        dense.add_row("flops_ratio_vs_moe", "1.00", f"{st['flops_ratio_vs_moe']:.2f}",
                      f"{sa['flops_ratio_vs_moe']:.2f}")
        if rec["gpu_hours"] is not None:
            dense.add_row("gpu_hours", _si(rec["gpu_hours"], 3), _si(st["gpu_hours"], 3), _si(sa["gpu_hours"], 3))
            dense.add_row("cost_usd", _usd(rec["cost_usd"]), _usd(st["cost_usd"]), _usd(sa["cost_usd"]))
        console.print(dense)


def _memory_rows(table: Table, rec: dict[str, Any]) -> None:
    m = rec["train_memory"]
    where = f"FSDP over {m['shards']:,} GPUs" if m["shards"] > 1 else "one GPU, nothing sharded"
    fits = "" if m["fits"] is None else f"; {'fits' if m['fits'] else 'does NOT fit'} in {rec['gpu_name']}"
    table.add_row("train_memory_per_gpu", format_bytes(m["total"]),
                  f"{where}, micro-batch {m['micro_batch']} x {rec['seq_len']}"
                  f"{', recomputed blocks' if m['activation_checkpointing'] else ''}{fits}")
    table.add_row("  weights + master + grads", format_bytes(m["weights"] + m["master_weights"] + m["grads"]),
                  "bf16 copies, fp32 master weights, fp32 gradients")
    table.add_row("  adamw_moments", format_bytes(m["optimizer"]), f"2 x {m['adam_moments']} per parameter")
    fp8_in = " (linear inputs in e4m3)" if m["fp8_saved_activations"] else ""
    table.add_row("  activations", format_bytes(m["activations"]), f"bf16{fp8_in}")
    table.add_row("  step_buffers", format_bytes(m["step_buffers"]),
                  "fp32 head weight gradient"
                  + (", e4m3 weight copies" if rec["precision"] == "fp8" and m["shards"] == 1 else ""))
    sv = m["savings"]
    table.add_row("memory_saving_bf16_moments", format_bytes(sv["bf16_moments"]),
                  "saved by --adam-moments bf16" if m["adam_moments"] == "bf16"
                  else "what --adam-moments bf16 would save")
    if sv["fp8_saved_activations"] is not None:
        table.add_row("memory_saving_fp8_activations", format_bytes(sv["fp8_saved_activations"]),
                      "saved by --fp8-saved-activations" if m["fp8_saved_activations"]
                      else "what --fp8-saved-activations would save")


def run_cost_train(args: argparse.Namespace) -> int:
    if args.tokens is None:
        raise ConfigError("--tokens is required: the number of tokens to train (e.g. 14.8e12)")
    cfg, label = _resolve_model(args)
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = 4096
        if args.from_run:
            seq_len = int(read_cost_json(args.from_run).get("seq_len") or seq_len)
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be a positive integer, got {seq_len}")
    rec = training_estimate(cfg, model=label, tokens=args.tokens, seq_len=seq_len, gpu=args.gpu,
                            price=args.price, mfu=args.mfu, gpu_hours=args.gpu_hours, from_run=args.from_run,
                            precision=args.precision, gpus=args.gpus, vs_dense=args.vs_dense,
                            hardware_file=args.hardware_file,
                            memory={"micro_batch": args.micro_batch, "adam_moments": args.adam_moments,
                                    "fp8_saved_activations": args.fp8_saved_activations,
                                    "recompute": args.activation_checkpointing})
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        _render_training(rec)
    return 0


# ----- serving ---------------------------------------------------------------------------------------------
def _render_serving(rec: dict[str, Any]) -> None:
    console = _console()
    table = Table(title=f"frugallm cost serve: {rec['model']} on {rec['gpu_name']} at "
                        f"{_usd(rec['price_per_gpu_hour'])} per GPU-hour")
    for col, just in (("field", "left"), ("value", "right"), ("how", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_row("usd_per_million_output", _usd(rec["usd_per_million_output"]),
                  f"{rec['output_tokens_per_second_per_gpu']:,.0f} output tokens/s per GPU")
    if rec["usd_per_million_input"] is None:
        table.add_row("usd_per_million_input", "-", "pass --input-tokens-per-second (measured prefill rate)")
    else:
        table.add_row("usd_per_million_input", _usd(rec["usd_per_million_input"]),
                      f"{rec['input_tokens_per_second_per_gpu']:,.0f} input tokens/s per GPU")
    table.add_row("devices_per_replica", str(rec["devices_per_replica"]),
                  f"{rec['weights_dtype']} weights {format_bytes(rec['weight_bytes'])}")
    table.add_row("kv_cache_bytes_per_token", f"{rec['kv_cache_bytes_per_token']:,} B", "bf16, all layers")
    table.add_row("decode_flops_per_token", _flop(rec["decode_flops_per_token"]),
                  f"at context {rec['context_len']:,}; decode MFU {_pct(rec['decode_mfu'])}")
    table.add_row("prefill_flops_per_token", _flop(rec["prefill_flops_per_token"]),
                  f"prompt of {rec['context_len']:,} tokens")
    console.print(table)
    daily = rec["daily"]
    if not daily:
        return
    hw = daily["hardware"]
    cmp = Table(title=f"{_si(daily['output_tokens'])} output + {_si(daily['input_tokens'])} input tokens a day "
                      f"({100 * daily['cache_hit_share']:.0f}% cache hits): self-hosted on {daily['devices']} "
                      f"{rec['gpu']} ({100 * daily['utilisation']:.1f}% busy) against APIs")
    for col in ("provider / model", "daily", "monthly", "yearly", "self-hosted (rent) / API", "break-even months"):
        cmp.add_column(col, justify="left" if col.startswith("provider") else "right")
    sh = daily["self_hosted"]
    cmp.add_row("self-hosted, rented", _usd(sh["daily_usd"]), _usd(sh["monthly_usd"]), _usd(sh["yearly_usd"]),
                "1.00", "-")
    if hw:
        cmp.add_row(f"self-hosted, bought (amortised over {hw['amortise_months']:g} months)",
                    _usd(hw["monthly_usd"] * 12 / 365), _usd(hw["monthly_usd"]), _usd(hw["monthly_usd"] * 12),
                    "-", "-")
    for a in daily["api"]:
        period = f"from {a['valid_from']}" + (f" to {a['valid_until']}" if a["valid_until"] else "")
        be = "-" if a["break_even_months"] is None else f"{a['break_even_months']:,.1f}"
        ratio = "-" if a["rent_vs_api"] is None else f"{a['rent_vs_api']:,.2f}"
        cmp.add_row(f"{a['provider']} {a['model']} ({period})", _usd(a["daily_usd"]), _usd(a["monthly_usd"]),
                    _usd(a["yearly_usd"]), ratio, be)
    console.print(cmp)
    if not daily["input_compute_counted"] and daily["input_tokens"]:
        console.print("input prefill is not counted in the fleet size: pass --input-tokens-per-second")
    if not hw:
        console.print("break-even months: pass --device-price USD (purchase price per device)")


def run_cost_serve(args: argparse.Namespace) -> int:
    cfg, label = _resolve_model(args)
    tps, in_tps, gpu = args.tokens_per_second, args.input_tokens_per_second, args.gpu
    if args.from_benchmark:
        if tps is not None:
            raise ConfigError("give either --tokens-per-second or --from-benchmark, not both")
        bench = read_benchmark(args.from_benchmark)
        tps = bench["output"]
        in_tps = in_tps if in_tps is not None else bench["input"]
        gpu = gpu or bench["device_kind"]
    if tps is None:
        raise ConfigError("a decode rate is required: --tokens-per-second T (output tokens/s per GPU) "
                          "or --from-benchmark FILE")
    if gpu is None:
        raise ConfigError("--gpu is required (e.g. --gpu h800)")
    rec = serving_estimate(cfg, model=label, gpu=gpu, tokens_per_second=tps, input_tokens_per_second=in_tps,
                           price=args.price, devices=args.devices, weights_dtype=args.weights_dtype,
                           context_len=args.context_len, daily_tokens=args.daily_tokens,
                           daily_input_tokens=args.daily_input_tokens, cache_hit_share=args.cache_hit_share,
                           device_price=args.device_price, amortise_months=args.amortise_months,
                           hardware_file=args.hardware_file, prices_file=args.prices_file)
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        _render_serving(rec)
    return 0


# ----- fine-tuning -----------------------------------------------------------------------------------------
_FT_ROWS = (  # (record key, row name, how) for the memory rows, per GPU
    ("weights_e4m3", "base_weights_e4m3", "fp8 base: 1 byte per element of the block linears and experts"),
    ("weights_scales", "base_weights_scales", "fp8 base: fp32 scale per 128x128 block (weight_scale_inv)"),
    ("weights_bf16", "base_weights_bf16", "bf16 base; over fp8: embedding, lm_head, router, norms, MTP eh_proj"),
    ("gathered_layer", "gathered_layer", "FSDP: one block's weights while it runs, experts still split"),
    ("trainable_master", "trainable_master", "LoRA: fp32 adapters; full: fp32 master weights"),
    ("grads", "gradients", "fp32, of the trainable parameters only"),
    ("optimizer", "optimizer_states", "AdamW: 2 moments per trainable parameter"),
    ("activations", "activations", "bf16, micro-batch x seq_len; LoRA also its x A^T"),
    ("step_buffers", "step_buffers", "full: fp32 head weight grad, fused gate/up; LoRA: bf16 adapter casts"),
    ("total", "total_per_gpu", ""),
)


def _ft_label(run: dict[str, Any]) -> str:
    if run["method"] == "lora":
        return f"LoRA r={run['lora_rank']}, {run['base_precision']} base"
    return "full, bf16 + fp32 master"


def _ft_gpus(run: dict[str, Any], rec: dict[str, Any]) -> str:
    if run["gpus_needed"] is None:
        return "none fit"
    if run["gpus_needed"] == run["min_gpus"]:
        return f"{run['gpus_needed']:,}"
    return f"{run['gpus_needed']:,} ({run['min_gpus']:,} by bytes)"


def _render_finetune_run(console: Console, rec: dict[str, Any], run: dict[str, Any]) -> None:
    table = Table(title=f"frugallm cost finetune: {rec['model']}, {_ft_label(run)}, seq_len {rec['seq_len']} x "
                        f"micro-batch {rec['micro_batch']}, on {rec['gpu_name']} ({rec['gpu_memory_gb']:g} GB)")
    for col, just in (("field", "left"), ("value", "right"), ("how", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    share = run["trainable_params"] / rec["params_total_with_mtp"]
    table.add_row("trainable_params", _si(run["trainable_params"]),
                  f"{run['trainable_params']:,}, {_pct(share)} of {_si(rec['params_total_with_mtp'])} (MTP included)")
    mem = run["memory"]
    if mem is None:
        table.add_row("gpus_needed", "none fit", "what is not sharded (activations, buffers) exceeds one GPU; "
                      "try --activation-checkpointing or a shorter --seq-len")
    else:
        where = (f"at --gpus {mem['gpus']:,}" if rec["gpus"] else f"at {mem['gpus']:,} GPUs") +             ("" if run["fits"] else ": does NOT fit")
        for key, name, how in _FT_ROWS:
            if key.startswith("weights_") and not mem[key] and key != "weights_bf16":
                continue
            table.add_row(name, format_bytes(mem[key]), how if key != "total" else where)
        table.add_row("gpus_needed", _ft_gpus(run, rec),
                      f"states sharded evenly (FSDP + expert parallel); rounded to split "
                      f"the routed experts evenly; {rec['gpu_memory_gb']:g} GB each")
    _ft_time_rows(table, rec, run)
    console.print(table)


def _ft_time_rows(table: Table, rec: dict[str, Any], run: dict[str, Any]) -> None:
    table.add_row("flops_per_token", _flop(run["flops_per_token"]),
                  "2 x forward (no base weight gradient) + 3 x the adapters' forward" if run["method"] == "lora"
                  else "3 x forward (forward, input and weight gradients)")
    if run["gpu_hours"] is not None:
        table.add_row("gpu_hours", _si(run["gpu_hours"], 3),
                      f"{_si(rec['tokens'])} tokens at MFU {_pct(rec['mfu'])} of {rec['peak_tflops']:,.0f} TFLOP/s")
        table.add_row("cost_usd", _usd(run["cost_usd"]),
                      "-" if rec["price_per_gpu_hour"] is None else f"at {_usd(rec['price_per_gpu_hour'])} per GPU-hour")


def _render_finetune_compare(console: Console, rec: dict[str, Any]) -> None:
    runs = rec["runs"]
    table = Table(title=f"frugallm cost finetune: {rec['model']} on {rec['gpu_name']} ({rec['gpu_memory_gb']:g} GB), "
                        f"seq_len {rec['seq_len']} x micro-batch {rec['micro_batch']}, per GPU")
    table.add_column("field", justify="left")
    for run in runs:
        table.add_column(_ft_label(run), justify="right")
    table.add_row("trainable_params", *(_si(r["trainable_params"]) for r in runs))
    for key, name, _ in _FT_ROWS:
        table.add_row(name, *("-" if r["memory"] is None else format_bytes(r["memory"][key]) for r in runs))
    table.add_row("gpus_needed", *(_ft_gpus(r, rec) for r in runs))
    whole = [r["memory_whole_model"] for r in runs]
    table.add_row("base_weights, whole model", *(format_bytes(w["weights"]) for w in whole))
    table.add_row("trainable states, whole model",
                  *(format_bytes(w["trainable_master"] + w["grads"] + w["optimizer"]) for w in whole))
    table.add_row("flops_per_token", *(_flop(r["flops_per_token"]) for r in runs))
    if rec["tokens"] is not None:
        table.add_row("gpu_hours", *(_si(r["gpu_hours"], 3) for r in runs))
        table.add_row("cost_usd", *(_usd(r["cost_usd"]) for r in runs))
    console.print(table)


def _render_finetune(rec: dict[str, Any], single: bool, compare: bool) -> None:
    console = _console()
    if single:
        _render_finetune_run(console, rec, rec["runs"][0])
    if compare:
        _render_finetune_compare(console, rec)
    notes = [f"activations {'with' if rec['activation_checkpointing'] else 'without'} activation checkpointing",
             f"AdamW moments {rec['adam_moments']}"]
    if rec["tokens"] is not None:
        notes.append(f"MFU {_pct(rec['mfu'])} ({rec['mfu_source']}; --mfu to change)")
    console.print("; ".join(notes))


def run_cost_finetune(args: argparse.Namespace) -> int:
    cfg, label = _resolve_model(args)
    if args.gpu is None:
        raise ConfigError("--gpu is required (e.g. --gpu h800)")
    if args.method == "full" and args.base_precision == "fp8":
        raise ConfigError("--method full needs --base-precision bf16: full fine-tuning over an fp8 base is not "
                          "supported (the update needs a high-precision master)")
    single = args.method is not None
    compare = args.compare or not single
    methods = [(args.method, args.base_precision or ("bf16" if args.method == "full" else "fp8"))] if single else []
    if compare:
        methods += [m for m in COMPARE if m not in methods]
    rec = finetune_estimate(cfg, model=label, gpu=args.gpu, methods=methods, lora_rank=args.lora_rank,
                            targets=args.lora_targets or DEFAULT_TARGETS, lora_mtp=args.lora_mtp,
                            seq_len=args.seq_len, micro_batch=args.micro_batch,
                            activation_checkpointing=args.activation_checkpointing, adam_moments=args.adam_moments,
                            gpus=args.gpus, tokens=args.tokens, mfu=args.mfu, price=args.price,
                            hardware_file=args.hardware_file)
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        _render_finetune(rec, single, compare)
    return 0


# ----- argparse ----------------------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--config", default=None, help="a frugallm TOML, a Hugging Face config.json, or a directory")
    p.add_argument("--gpu", default=None, help="device from the hardware catalogue (h800, h100-sxm, h200, b200, "
                   "a100-80gb, mi300x, gaudi3, or one of --hardware-file)")
    p.add_argument("--price", "--price-per-hour", dest="price", type=float, default=None,
                   help="USD per device-hour (default: the catalogue's price for --gpu)")
    p.add_argument("--hardware-file", default=None, help="TOML adding or overriding hardware entries")
    p.add_argument("--json", action="store_true", help="print the record as JSON (fields in docs/costs.md)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="FLOPs, memory, GPU-hours and dollars of training (and `cost serve`)",
                       description="What training a model costs: parameters, FLOPs per token, GPU-hours, "
                       "dollars and MFU. `frugallm cost serve -h` for serving.")
    _add_common(p)
    p.add_argument("--tokens", type=float, default=None, help="tokens to train (e.g. 14.8e12)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training sequence length in tokens (default 4096, or the run's with --from-run)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation, a fraction in (0, 1]")
    how.add_argument("--gpu-hours", type=float, default=None,
                     help="GPU-hours spent; the MFU they imply is shown")
    how.add_argument("--from-run", default=None, metavar="RUN_DIR",
                     help="extrapolate from the measured rate in RUN_DIR/cost.json")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                   help="which dense peak TFLOP/s the MFU is measured against (default bf16); fp8 also "
                        "counts the FP8 linears' memory")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the cluster, for wall-clock days; the memory figure shards states over them")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch, for memory")
    p.add_argument("--adam-moments", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of AdamW's two moments, for memory (default fp32, as frugallm train)")
    p.add_argument("--fp8-saved-activations", action="store_true",
                   help="with --precision fp8: linear inputs kept for the backward in e4m3, for memory")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in the backward, for memory")
    p.add_argument("--vs-dense", action="store_true",
                   help="also cost dense twins with the same total and the same active parameters")
    p.set_defaults(func=run_cost_train)

    cost_sub = p.add_subparsers(dest="cost_command", metavar="[serve|finetune]", required=False)
    s = cost_sub.add_parser("serve", help="dollars per million tokens served, and self-hosting against APIs")
    _add_common(s)
    s.add_argument("--tokens-per-second", type=float, default=None,
                   help="measured output (decode) tokens per second per GPU")
    s.add_argument("--from-benchmark", default=None, metavar="FILE",
                   help="JSON with output_tokens_per_second [, input_tokens_per_second, device_count, device_kind]")
    s.add_argument("--input-tokens-per-second", type=float, default=None,
                   help="measured input (prefill) tokens per second per GPU")
    s.add_argument("--devices", type=int, default=None,
                   help="GPUs per replica (default: the fewest that hold the weights)")
    s.add_argument("--weights-dtype", choices=("bf16", "fp8", "fp32"), default="bf16",
                   help="dtype of the served weights (fp8 with 128x128 block scales)")
    s.add_argument("--context-len", type=int, default=None,
                   help="context length in tokens for the FLOP figures (default 4096, or the model's maximum)")
    s.add_argument("--daily-tokens", type=float, default=None, help="output tokens served per day")
    s.add_argument("--daily-input-tokens", type=float, default=0.0, help="input tokens per day (default 0)")
    s.add_argument("--cache-hit-share", type=float, default=0.0,
                   help="fraction of input tokens served from a prefix cache, in [0, 1]")
    s.add_argument("--device-price", type=float, default=None, help="purchase price per GPU in USD")
    s.add_argument("--amortise-months", type=float, default=36.0,
                   help="months over which bought hardware is amortised (default 36)")
    s.add_argument("--prices-file", default=None, help="TOML adding or overriding API prices")
    s.set_defaults(func=run_cost_serve)

    f = cost_sub.add_parser("finetune", help="LoRA or full fine-tuning: memory per GPU, GPUs needed, GPU-hours",
                            description="What adapting open weights costs: memory per GPU for LoRA over an fp8 "
                            "or bf16 base and for full fine-tuning, the GPUs each needs, and with --tokens the "
                            "GPU-hours and dollars. Without --method (or with --compare) the three side by side.")
    _add_common(f)
    f.add_argument("--method", choices=("lora", "full"), default=None,
                   help="show one method's table (default: only the comparison)")
    f.add_argument("--base-precision", choices=("bf16", "fp8"), default=None,
                   help="frozen base weights' dtype for --method lora (default fp8: e4m3 + 128x128 fp32 scales, "
                        "the published checkpoint); full needs bf16")
    f.add_argument("--compare", action="store_true",
                   help="also print LoRA over fp8, LoRA over bf16 and full side by side (the default without --method)")
    f.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    f.add_argument("--lora-targets", nargs="+", default=None, metavar="PATTERN",
                   help="module name patterns (dot-boundary suffix, or re:REGEX; default: every block linear "
                        "and the routed experts, frugallm.tune.targets)")
    f.add_argument("--lora-mtp", action="store_true", help="also adapt the MTP modules")
    f.add_argument("--seq-len", type=int, default=4096, help="sequence length in tokens (default 4096)")
    f.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    f.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in the backward (default on, unlike `frugallm cost`: a "
                        "DeepSeek-V3-sized model fits no catalogue GPU at seq_len 4096 without it)")
    f.add_argument("--adam-moments", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of AdamW's two moments (default fp32)")
    f.add_argument("--gpus", type=int, default=None,
                   help="GPUs to shard over (default: the fewest that hold each method)")
    f.add_argument("--tokens", type=float, default=None, help="tokens to fine-tune on, for GPU-hours and dollars")
    f.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilisation in (0, 1] (default: DeepSeek-V3 pre-training's, cluster.toml)")
    f.set_defaults(func=run_cost_finetune)
