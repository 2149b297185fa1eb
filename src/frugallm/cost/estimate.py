"""The estimates ``frugallm cost`` prints: the training record (FLOPs, GPU-hours, dollars, MFU, memory per GPU)
and the serving record (dollars per million tokens, fleet size, self-hosting against API prices), each one
JSON-ready dict whose field names docs/costs.md documents. ``frugallm.cost.cli`` parses the flags and
renders these records; nothing here prints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from frugallm.config import ModelConfig
from frugallm.cost.flops import (
    decode_flops_per_token,
    forward_flops_per_token,
    prefill_flops_per_token,
    six_n_estimate,
    train_flops_per_token,
)
from frugallm.cost.hardware import Device, get_device
from frugallm.cost.memory import format_bytes, kv_cache_bytes_per_token, training_memory, weight_bytes
from frugallm.cost.params import dense_width_for_params, param_counts
from frugallm.cost.prices import load_prices
from frugallm.cost.report import read_cost_json
from frugallm.errors import ConfigError

DAYS_PER_MONTH = 365 / 12


def check_positive(flag: str, value: float | None, *, upper: float | None = None) -> None:
    """Raise ``ConfigError`` naming ``flag`` unless ``value`` is None or a finite positive number (<= upper)."""
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f" and at most {upper:g}" if upper is not None else ""
        raise ConfigError(f"{flag} must be a positive number{bound}, got {value:g}")


def _price(flag_price: float | None, device: Device) -> float:
    if flag_price is not None:
        return flag_price
    if device.price_per_hour is None:
        raise ConfigError(f"the catalogue has no default price for {device.key}; pass --price USD_PER_HOUR")
    return device.price_per_hour


def _dense_twin(cfg: ModelConfig, target: int) -> ModelConfig:
    dense = cfg.replace(ffn="dense")
    return dense.replace(intermediate_size=dense_width_for_params(dense, target))


def _model_figures(cfg: ModelConfig, seq_len: int, tokens: float) -> dict[str, Any]:
    counts = param_counts(cfg)
    per_token = train_flops_per_token(cfg, seq_len)
    return {
        "params_total": counts.total, "params_active": counts.active, "params_mtp": counts.mtp,
        "params_embedding": counts.embedding, "params_output_head": counts.output_head,
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len, include_mtp=True),
        "train_flops_per_token": per_token, "six_n_flops_per_token": six_n_estimate(cfg),
        "total_flops": per_token * tokens, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, "bf16"),
    }


def memory_estimate(cfg: ModelConfig, *, seq_len: int, micro_batch: int = 1, precision: str = "bf16",
                    adam_moments: str = "fp32", fp8_saved_activations: bool = False, recompute: bool = False,
                    gpus: int | None = None) -> dict[str, Any]:
    """Training memory per GPU as ``frugallm train`` keeps it on a GPU (``frugallm.cost.memory.training_memory``):
    fp32 parameters (the master copy) with bf16 autocast copies, fp32 gradients, AdamW moments in
    ``adam_moments``, activations of ``micro_batch`` sequences, and with ``precision`` fp8 the e4m3 weight
    copies per step. Weights, gradients and moments are sharded over ``gpus`` (FSDP) when given. Also what
    each memory switch saves, or would save, against the same run without it."""
    if precision not in ("bf16", "fp8"):
        raise ConfigError(f"precision must be bf16 or fp8, got {precision!r}")
    if adam_moments not in ("fp32", "bf16"):
        raise ConfigError(f"--adam-moments must be fp32 or bf16, got {adam_moments!r}")
    if fp8_saved_activations and precision != "fp8":
        raise ConfigError("--fp8-saved-activations needs --precision fp8")
    check_positive("--micro-batch", micro_batch)

    def mem(moments: str, fp8_saved: bool) -> dict[str, int]:
        return training_memory(cfg, micro_batch * seq_len, seq_len=seq_len, precision="bf16", moments=moments,
                               fp8_gemms=precision == "fp8", fp8_saved_activations=fp8_saved,
                               recompute=recompute, shards=gpus or 1).as_dict()

    this = mem(adam_moments, fp8_saved_activations)
    other_moments = mem("fp32" if adam_moments == "bf16" else "bf16", fp8_saved_activations)
    savings = {"bf16_moments": abs(other_moments["total"] - this["total"]), "fp8_saved_activations": None}
    if precision == "fp8":
        savings["fp8_saved_activations"] = abs(mem(adam_moments, not fp8_saved_activations)["total"]
                                               - this["total"])
    return {**this, "micro_batch": micro_batch, "shards": gpus or 1, "adam_moments": adam_moments,
            "fp8_saved_activations": fp8_saved_activations, "activation_checkpointing": recompute,
            "savings": savings}


def training_estimate(cfg: ModelConfig, *, model: str, tokens: float, seq_len: int, gpu: str | None = None,
                      price: float | None = None, mfu: float | None = None, gpu_hours: float | None = None,
                      from_run: str | Path | None = None, precision: str = "bf16", gpus: int | None = None,
                      vs_dense: bool = False, hardware_file: str | None = None,
                      memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record ``frugallm cost`` prints. At most one of ``mfu``, ``gpu_hours``, ``from_run`` turns FLOPs
    into GPU-hours; with none only the model's figures are filled in. ``memory`` holds the keyword
    arguments of ``memory_estimate`` besides the model, sequence, precision and GPUs."""
    check_positive("--tokens", tokens)
    check_positive("--mfu", mfu, upper=1.0)
    check_positive("--gpu-hours", gpu_hours)
    check_positive("--price", price)
    check_positive("--gpus", gpus)
    if sum(x is not None for x in (mfu, gpu_hours, from_run)) > 1:
        raise ConfigError("give at most one of --mfu, --gpu-hours, --from-run")
    rec: dict[str, Any] = {"model": model, "seq_len": seq_len, "tokens": tokens, "precision": precision,
                           **_model_figures(cfg, seq_len, tokens)}
    total = rec["total_flops"]
    run = read_cost_json(from_run) if from_run is not None else None
    run_device = _run_device(run, hardware_file) if run is not None else None
    device = get_device(gpu, hardware_file) if gpu is not None else run_device
    if run is not None and device is None:
        gpu = run["device_kind"]  # a CPU or a GPU the catalogue lacks: extrapolate on it as measured
    rec.update(gpu=device.key if device else gpu, gpu_name=device.name if device else gpu,
               peak_tflops=device.peak_flops(precision) / 1e12 if device else None, mfu=None,
               mfu_source=None, gpu_hours=None, price_per_gpu_hour=None, cost_usd=None,
               tokens_per_second_per_gpu=None, achieved_tflops_per_gpu=None, gpus=gpus, wall_days=None,
               from_run=None, vs_dense=None)
    rec["train_memory"] = memory_estimate(cfg, seq_len=seq_len, precision=precision, gpus=gpus, **(memory or {}))
    rec["train_memory"]["fits"] = (None if device is None
                                   else rec["train_memory"]["total"] <= device.memory_gb * 1e9)
    if (mfu is not None or gpu_hours is not None) and device is None:
        raise ConfigError("--gpu is required with --mfu or --gpu-hours (e.g. --gpu h800)")
    rate = None  # achieved FLOP/s per device
    if mfu is not None:
        assert device is not None
        rate, rec["mfu"], rec["mfu_source"] = mfu * device.peak_flops(precision), mfu, "given"
    elif gpu_hours is not None:
        assert device is not None
        rate = total / (gpu_hours * 3600)
        rec["mfu"], rec["mfu_source"] = rate / device.peak_flops(precision), "implied"
    elif run is not None:
        measured = run["achieved_tflops"] * 1e12
        same_device = device is None or (run_device is not None and device.key == run_device.key)
        if same_device:
            rate = measured
            rec["mfu"] = run.get("mfu")
        else:  # another GPU: keep the run's utilisation, scale by the peak
            if not run.get("mfu"):
                raise ConfigError(f"{from_run}/cost.json has no mfu to carry over to {device.key}; "
                                  f"omit --gpu to extrapolate on the run's own device ({run['device_kind']})")
            rate = run["mfu"] * device.peak_flops(precision)
            rec["mfu"] = run["mfu"]
        rec["mfu_source"] = "measured"
        rec["from_run"] = {"path": str(from_run), "device_kind": run["device_kind"],
                           "achieved_tflops": run["achieved_tflops"], "mfu": run.get("mfu"),
                           "tokens_per_second": run["tokens_per_second"], "tokens": run["tokens"],
                           "device_count": run["device_count"], "same_device": same_device}
    if rate is not None:
        hours = gpu_hours if gpu_hours is not None else total / rate / 3600
        if price is None and run is not None and rec["from_run"]["same_device"]:
            price = run.get("price_per_device_hour")  # the price the run was configured with
        if price is None:
            if device is None:
                raise ConfigError(f"{from_run}/cost.json has no price_per_device_hour; pass --price")
            price = _price(None, device)
        rec.update(gpu_hours=hours, price_per_gpu_hour=price, cost_usd=hours * price,
                   tokens_per_second_per_gpu=tokens / (hours * 3600), achieved_tflops_per_gpu=rate / 1e12)
        if gpus:
            rec["wall_days"] = hours / gpus / 24
    if vs_dense:
        rec["vs_dense"] = _vs_dense(cfg, seq_len, tokens, rate, rec["price_per_gpu_hour"], rec)
    return rec


def _run_device(run: dict[str, Any], hardware_file: str | None) -> Device | None:
    """The catalogue entry of the device a run measured on (its key or display name), None for a CPU or
    a device the catalogue lacks."""
    try:
        return get_device(str(run["device_kind"]), hardware_file)
    except ConfigError:
        return None


def _vs_dense(cfg: ModelConfig, seq_len: int, tokens: float, rate: float | None, price: float | None,
              moe: dict[str, Any]) -> dict[str, Any]:
    """Dense twins (same attention, every FFN dense) with the MoE's total and active parameters, costed at
    the same achieved FLOP/s, so the ratios are the MoE's saving."""
    if cfg.ffn != "moe":
        raise ConfigError("--vs-dense compares an MoE model with dense twins; this model is already dense")
    counts = param_counts(cfg)
    out: dict[str, Any] = {}
    for key, target in (("same_total", counts.total), ("same_active", counts.active)):
        twin = _dense_twin(cfg, target)
        fig = _model_figures(twin, seq_len, tokens)
        fig["intermediate_size"] = twin.intermediate_size
        fig["gpu_hours"] = None if rate is None else fig["total_flops"] / rate / 3600
        fig["cost_usd"] = None if fig["gpu_hours"] is None or price is None else fig["gpu_hours"] * price
        fig["flops_ratio_vs_moe"] = fig["total_flops"] / moe["total_flops"]
        out[key] = fig
    return out


def read_benchmark(path: str) -> dict[str, Any]:
    """Per-device output and input rates and the device kind from a serving benchmark's JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"benchmark file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    out_tps = data.get("output_tokens_per_second", data.get("tokens_per_second"))
    if out_tps is None:
        raise ConfigError(f"{p}: needs output_tokens_per_second (or tokens_per_second)")
    n = data.get("device_count", 1)
    check_positive(f"{p.name} device_count", n)
    check_positive(f"{p.name} output_tokens_per_second", out_tps)
    in_tps = data.get("input_tokens_per_second")
    check_positive(f"{p.name} input_tokens_per_second", in_tps)
    return {"output": out_tps / n, "input": None if in_tps is None else in_tps / n,
            "device_kind": data.get("device_kind")}


def serving_estimate(cfg: ModelConfig, *, model: str, gpu: str, tokens_per_second: float,
                     input_tokens_per_second: float | None = None, price: float | None = None,
                     devices: int | None = None, weights_dtype: str = "bf16", context_len: int | None = None,
                     daily_tokens: float | None = None, daily_input_tokens: float = 0.0,
                     cache_hit_share: float = 0.0, device_price: float | None = None,
                     amortise_months: float = 36.0, hardware_file: str | None = None,
                     prices_file: str | None = None) -> dict[str, Any]:
    """The record ``frugallm cost serve`` prints. Throughputs are per device; ``context_len`` defaults to
    4096 or the model's maximum, whichever is smaller."""
    if context_len is None:
        context_len = min(4096, cfg.max_position_embeddings)
    check_positive("--tokens-per-second", tokens_per_second)
    check_positive("--input-tokens-per-second", input_tokens_per_second)
    check_positive("--price", price)
    check_positive("--devices", devices)
    check_positive("--context-len", context_len)
    check_positive("--daily-tokens", daily_tokens)
    check_positive("--device-price", device_price)
    check_positive("--amortise-months", amortise_months)
    if daily_input_tokens < 0 or not math.isfinite(daily_input_tokens):
        raise ConfigError(f"--daily-input-tokens must be >= 0, got {daily_input_tokens:g}")
    if not 0 <= cache_hit_share <= 1:
        raise ConfigError(f"--cache-hit-share must be in [0, 1], got {cache_hit_share:g}")
    device = get_device(gpu, hardware_file)
    price = _price(price, device)
    wbytes = weight_bytes(cfg, weights_dtype, include_mtp=False)
    min_devices = math.ceil(wbytes / (device.memory_gb * 1e9))
    if devices is not None and devices < min_devices:
        raise ConfigError(f"--devices {devices} cannot hold the {weights_dtype} weights ({format_bytes(wbytes)} "
                          f"> {devices} x {device.memory_gb:g} GB); at least {min_devices} {device.key} needed")
    devices = devices or min_devices
    decode = decode_flops_per_token(cfg, context_len)
    rec: dict[str, Any] = {
        "model": model, "gpu": device.key, "gpu_name": device.name, "price_per_gpu_hour": price,
        "weights_dtype": weights_dtype, "weight_bytes": wbytes, "devices_per_replica": devices,
        "context_len": context_len, "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg, "bf16"),
        "decode_flops_per_token": decode, "prefill_flops_per_token": prefill_flops_per_token(cfg, context_len),
        "output_tokens_per_second_per_gpu": tokens_per_second,
        "input_tokens_per_second_per_gpu": input_tokens_per_second,
        "decode_mfu": tokens_per_second * decode / device.peak_flops("bf16"),
        "usd_per_million_output": price / (tokens_per_second * 3600) * 1e6,
        "usd_per_million_input": (None if input_tokens_per_second is None
                                  else price / (input_tokens_per_second * 3600) * 1e6),
        "daily": None,
    }
    if daily_tokens is None:
        return rec
    # device-seconds a day: decoding the output, and prefilling the input that misses the prefix cache
    busy = daily_tokens / tokens_per_second
    if input_tokens_per_second is not None:
        busy += daily_input_tokens * (1 - cache_hit_share) / input_tokens_per_second
    replicas = max(1, math.ceil(busy / (86400 * devices)))
    fleet = replicas * devices
    rent_daily = fleet * price * 24
    hardware_total = None if device_price is None else fleet * device_price
    api = []
    for p in load_prices(prices_file).values():
        daily = p.cost_usd(daily_input_tokens, daily_tokens, cache_hit_share)
        monthly = daily * DAYS_PER_MONTH
        api.append({"key": p.key, "provider": p.provider, "model": p.model, "valid_from": p.valid_from,
                    "valid_until": p.valid_until or None, "daily_usd": daily, "monthly_usd": monthly,
                    "yearly_usd": daily * 365, "rent_vs_api": rent_daily / daily if daily else None,
                    "break_even_months": (hardware_total / monthly if hardware_total is not None and monthly
                                          else None)})
    rec["daily"] = {
        "output_tokens": daily_tokens, "input_tokens": daily_input_tokens, "cache_hit_share": cache_hit_share,
        "input_compute_counted": input_tokens_per_second is not None,
        "replicas": replicas, "devices": fleet, "utilisation": busy / (86400 * fleet),
        "self_hosted": {"daily_usd": rent_daily, "monthly_usd": rent_daily * DAYS_PER_MONTH,
                        "yearly_usd": rent_daily * 365},
        "hardware": None if hardware_total is None else {
            "device_price_usd": device_price, "total_usd": hardware_total, "amortise_months": amortise_months,
            "monthly_usd": hardware_total / amortise_months},
        "api": api,
    }
    return rec
