"""``frugallm cost`` and ``frugallm cost serve``: the DeepSeek-V3 reproduction, extrapolation from a run's
cost.json, the dense comparison, serving economics, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from frugallm.cli import main
from frugallm.config import preset
from frugallm.cost.flops import train_flops_per_token
from frugallm.cost.params import param_counts
from frugallm.cost.prices import load_prices
from frugallm.cost.report import run_cost, write_cost_json

V3 = ["cost", "--preset", "deepseek-v3", "--tokens", "14.8e12", "--gpu", "h800", "--price", "2"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    rc, out, err = run([*args, "--json"], capsys)
    assert rc == 0, err
    return json.loads(out)


def test_deepseek_v3_reproduction(capsys) -> None:
    """Table 1 of the V3 report: 2.788M H800 GPU-hours at $2 = $5.576M; 671B total, 37B active."""
    rec = run_json([*V3, "--gpu-hours", "2.788e6"], capsys)
    assert abs(rec["params_total"] / 671e9 - 1) < 0.005
    assert abs(rec["params_active"] / 37e9 - 1) < 0.03
    assert rec["kv_cache_bytes_per_token"] == 70_272
    assert rec["cost_usd"] == pytest.approx(5.576e6)
    rc, out, _ = run([*V3, "--gpu-hours", "2.788e6"], capsys)
    assert rc == 0 and "$5.576M" in out and "70,272" in out


def test_training_memory_and_what_each_switch_saves(capsys) -> None:
    """The memory rows are training_memory's figures for the flags given, and each saving is the difference
    against the same run with the switch flipped."""
    from frugallm.cost.memory import training_memory

    cfg = preset("tiny")
    base = ["cost", "--preset", "tiny", "--tokens", "1e9", "--seq-len", "256", "--micro-batch", "8"]
    plain = run_json([*base, "--precision", "fp8"], capsys)["train_memory"]
    lean = run_json([*base, "--precision", "fp8", "--adam-moments", "bf16", "--fp8-saved-activations"],
                    capsys)["train_memory"]
    want = training_memory(cfg, 8 * 256, seq_len=256, precision="bf16", moments="bf16", fp8_gemms=True,
                           fp8_saved_activations=True)
    assert lean["total"] == want.total and lean["optimizer"] == want.optimizer
    n = param_counts(cfg).total_with_mtp
    assert plain["optimizer"] == 8 * n and lean["optimizer"] == 4 * n
    assert plain["savings"]["bf16_moments"] == lean["savings"]["bf16_moments"] == 4 * n
    assert plain["total"] - lean["total"] == 4 * n + lean["savings"]["fp8_saved_activations"]
    assert lean["savings"]["fp8_saved_activations"] == plain["activations"] - lean["activations"] > 0
    assert run_json(base, capsys)["train_memory"]["savings"]["fp8_saved_activations"] is None  # bf16 run
    # sharded over 8 GPUs: states / 8, activations per GPU unchanged; V3 on one H800 does not fit
    sharded = run_json([*base, "--precision", "fp8", "--gpus", "8"], capsys)["train_memory"]
    assert sharded["optimizer"] == -(-8 * n // 8) and sharded["activations"] == plain["activations"]
    assert run_json([*V3, "--mfu", "0.4"], capsys)["train_memory"]["fits"] is False
    rc, out, _ = run([*base, "--precision", "fp8", "--adam-moments", "bf16"], capsys)
    assert rc == 0 and "saved by --adam-moments bf16" in out and "what --fp8-saved-activations would save" in out


def test_pre_training_share_implies_mfu(capsys) -> None:
    rec = run_json([*V3, "--gpu-hours", "2.664e6"], capsys)
    # REFERENCE.md, derived: 14.8T tokens in 2,664K GPU-hours is about 1,543 tokens/s per H800
    assert rec["tokens_per_second_per_gpu"] == pytest.approx(1543, abs=1)
    expected = 14.8e12 * train_flops_per_token(preset("deepseek-v3"), 4096) / (2.664e6 * 3600 * 989e12)
    assert rec["mfu"] == pytest.approx(expected) and rec["mfu_source"] == "implied"
    assert 0.3 < rec["mfu"] < 0.5
    # 6N at 37B gives the REFERENCE's ~343 TFLOP/s; the exact count is higher by attention and MTP
    assert rec["six_n_flops_per_token"] * 14.8e12 / (2.664e6 * 3600) / 1e12 == pytest.approx(343, rel=0.02)
    rc, out, _ = run([*V3, "--gpu-hours", "2.664e6"], capsys)
    assert f"{100 * expected:.1f}%" in out
    # and back: at that MFU the model gives the same GPU-hours
    again = run_json([*V3, "--mfu", str(rec["mfu"])], capsys)
    assert again["gpu_hours"] == pytest.approx(2.664e6)


def test_vs_dense(capsys) -> None:
    rec = run_json([*V3, "--mfu", "0.4", "--vs-dense", "--gpus", "2048"], capsys)
    same_total, same_active = rec["vs_dense"]["same_total"], rec["vs_dense"]["same_active"]
    assert abs(same_total["params_total"] / rec["params_total"] - 1) < 1e-3
    assert abs(same_active["params_active"] / rec["params_active"] - 1) < 1e-3
    assert same_total["flops_ratio_vs_moe"] > 10  # the MoE saving: ~18x fewer active parameters
    assert same_total["cost_usd"] / rec["cost_usd"] == pytest.approx(same_total["flops_ratio_vs_moe"])
    assert rec["wall_days"] == pytest.approx(rec["gpu_hours"] / 2048 / 24)
    rc, out, _ = run([*V3, "--mfu", "0.4", "--vs-dense"], capsys)
    assert rc == 0 and "dense, same total" in out


def test_config_file_and_hf_directory(tmp_path: Path, capsys) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(tomli_w.dumps({"model": {"preset": "tiny", "num_hidden_layers": 6}}))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(preset("deepseek-v3").to_hf_dict()))
    a = run_json(["cost", "--config", str(toml), "--tokens", "1e9"], capsys)
    b = run_json(["cost", "--preset", "tiny", "--tokens", "1e9"], capsys)
    assert a["params_total"] > b["params_total"] and a["gpu_hours"] is None
    c = run_json(["cost", "--config", str(hf), "--tokens", "14.8e12"], capsys)
    assert c["kv_cache_bytes_per_token"] == 70_272


def _write_run(run_dir: Path, *, device_kind: str = "cpu", price: float | None = 0.5,
               peak: float | None = 2e11, hf: bool = False) -> dict:
    cfg = preset("tiny")
    record = run_cost(cfg=cfg, seq_len=256, tokens=2_000_000, wall_seconds=400.0, device_kind=device_kind,
                      device_count=2, price_per_device_hour=price, peak_flops_per_device=peak)
    write_cost_json(run_dir, record)
    if hf:
        (run_dir / "model").mkdir()
        (run_dir / "model" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    else:
        table = {k: v for k, v in cfg.to_dict().items() if v is not None}  # TOML has no null
        (run_dir / "config.toml").write_text(tomli_w.dumps({"model": table, "train": {"lr": 1e-3}}))
    return record


def test_from_run_extrapolates_the_measured_rate(tmp_path: Path, capsys) -> None:
    record = _write_run(tmp_path)
    rec = run_json(["cost", "--from-run", str(tmp_path), "--tokens", "1e12"], capsys)
    per_device = record["tokens_per_second"] / record["device_count"]  # 2,500 tokens/s on each device
    assert rec["gpu_hours"] == pytest.approx(1e12 / per_device / 3600)
    assert rec["cost_usd"] == pytest.approx(rec["gpu_hours"] * 0.5)
    assert rec["seq_len"] == 256 and rec["mfu_source"] == "measured" and rec["mfu"] == record["mfu"]
    # on another device the run's MFU carries over at that device's peak
    h100 = run_json(["cost", "--from-run", str(tmp_path), "--tokens", "1e12", "--gpu", "h100"], capsys)
    assert h100["achieved_tflops_per_gpu"] == pytest.approx(record["mfu"] * 989)
    # the model can also come from model/config.json
    other = tmp_path / "hf-run"
    _write_run(other, hf=True)
    assert run_json(["cost", "--from-run", str(other), "--tokens", "1e12"], capsys)["gpu_hours"] == \
        pytest.approx(rec["gpu_hours"])
    rc, out, _ = run(["cost", "--from-run", str(tmp_path), "--tokens", "1e12"], capsys)
    assert rc == 0 and "measured" in out


def test_from_run_as_the_training_loop_writes_it(tmp_path: Path, capsys) -> None:
    """device_kind is the catalogue's display name on a GPU, and config.toml lists None fields in
    ``unset`` (TOML has no null): V2-Lite has no query compression."""
    cfg = preset("deepseek-v2-lite")
    record = run_cost(cfg=cfg, seq_len=4096, tokens=10**9, wall_seconds=3600.0, device_kind="NVIDIA H100 SXM",
                      device_count=8, price_per_device_hour=3.0, peak_flops_per_device=989e12)
    write_cost_json(tmp_path, record)
    table = {k: v for k, v in cfg.to_dict().items() if v is not None}
    table["unset"] = sorted(k for k, v in cfg.to_dict().items() if v is None)
    (tmp_path / "config.toml").write_text(tomli_w.dumps({"model": table}))
    rec = run_json(["cost", "--from-run", str(tmp_path), "--tokens", "1e10"], capsys)
    assert rec["gpu"] == "h100-sxm" and rec["from_run"]["same_device"]
    assert rec["params_total"] == param_counts(cfg).total  # q_lora_rank really None, not the default
    assert rec["train_flops_per_token"] == pytest.approx(train_flops_per_token(cfg, 4096))
    assert rec["gpu_hours"] == pytest.approx(8 * 10)  # 10x the tokens at the measured rate
    assert rec["cost_usd"] == pytest.approx(80 * 3.0)  # at the run's own price


def test_serve(tmp_path: Path, capsys) -> None:
    base = ["cost", "serve", "--preset", "deepseek-v3", "--gpu", "h800", "--price", "2"]
    rec = run_json([*base, "--tokens-per-second", "1850", "--input-tokens-per-second", "9200",
                    "--weights-dtype", "fp8"], capsys)
    assert rec["usd_per_million_output"] == pytest.approx(2 / (1850 * 3600) * 1e6)
    assert rec["usd_per_million_input"] == pytest.approx(2 / (9200 * 3600) * 1e6)
    assert rec["devices_per_replica"] == 9  # ~673 GB of fp8 weights do not fit 8 x 80 GB
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"output_tokens_per_second": 14800, "input_tokens_per_second": 73700,
                                 "device_count": 8, "device_kind": "h800"}))
    daily = run_json(["cost", "serve", "--preset", "deepseek-v3", "--from-benchmark", str(bench),
                      "--weights-dtype", "fp8", "--daily-tokens", "100e6", "--daily-input-tokens", "400e6",
                      "--cache-hit-share", "0.5", "--device-price", "30000"], capsys)
    assert daily["output_tokens_per_second_per_gpu"] == 1850
    d = daily["daily"]
    assert d["devices"] == 9 and d["self_hosted"]["daily_usd"] == pytest.approx(9 * 2 * 24)
    prices = load_prices()
    for api in d["api"]:
        p = prices[api["key"]]
        cached = p.input if p.cached_input is None else p.cached_input
        assert api["daily_usd"] == pytest.approx((200e6 * p.input + 200e6 * cached + 100e6 * p.output) / 1e6)
        assert api["break_even_months"] == pytest.approx(9 * 30000 / api["monthly_usd"])
    assert {a["key"] for a in d["api"]} >= {"deepseek-chat-2025-02", "deepseek-chat-2025-09", "gpt-4-turbo",
                                            "gpt-4o", "claude-3-5-sonnet"}
    rc, out, _ = run(["cost", "serve", "--preset", "deepseek-v3", "--from-benchmark", str(bench),
                      "--weights-dtype", "fp8", "--daily-tokens", "100e6"], capsys)
    assert rc == 0 and "break-even" in out and "self-hosted, rented" in out


@pytest.mark.parametrize("args, message", [
    ([*V3[:5], "--gpu", "h900", "--gpu-hours", "1"], "unknown GPU 'h900'; known: a100-80gb"),
    ([*V3[:4], "0", "--gpu", "h800", "--mfu", "0.4"], "--tokens must be a positive number"),
    ([*V3[:3], "--tokens=-1e9", "--gpu", "h800", "--mfu", "0.4"], "--tokens must be a positive number"),
    ([*V3, "--gpu-hours", "-5"], "--gpu-hours must be a positive number"),
    ([*V3, "--mfu", "1.5"], "--mfu must be a positive number and at most 1"),
    (["cost", "--preset", "deepseek-v3", "--gpu", "h800", "--mfu", "0.4"], "--tokens is required"),
    (["cost", "--tokens", "1e9"], "a model is required"),
    (["cost", "--preset", "tiny", "--tokens", "1e9", "--mfu", "0.4"], "--gpu is required"),
    (["cost", "--preset", "tiny", "--tokens", "1e9", "--gpu", "gaudi3", "--mfu", "0.4"], "pass --price"),
    (["cost", "--preset", "tiny", "--tokens", "1e9", "--from-run", "/nonexistent"], "cost.json not found"),
    (["cost", "--preset", "tiny-dense", "--tokens", "1e9", "--vs-dense"], "already dense"),
    (["cost", "--preset", "tiny", "--tokens", "1e9", "--fp8-saved-activations"], "needs --precision fp8"),
    (["cost", "--preset", "tiny", "--tokens", "1e9", "--micro-batch", "0"], "--micro-batch must be a positive"),
    (["cost", "serve", "--preset", "tiny", "--gpu", "h800"], "a decode rate is required"),
    (["cost", "serve", "--preset", "tiny", "--gpu", "h800", "--tokens-per-second", "0"],
     "--tokens-per-second must be a positive number"),
    (["cost", "serve", "--preset", "deepseek-v3", "--gpu", "h800", "--tokens-per-second", "10", "--devices", "4"],
     "cannot hold"),
    (["cost", "serve", "--preset", "tiny", "--gpu", "h800", "--tokens-per-second", "10", "--cache-hit-share", "2"],
     "--cache-hit-share"),
])
def test_user_errors_are_one_line(args, message, capsys) -> None:
    rc, out, err = run(args, capsys)
    assert rc == 2
    assert message in err and err.count("\n") == 1, err
