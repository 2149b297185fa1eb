"""Hardware catalogue, the API price sheet, and a run's cost.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frugallm.config import preset
from frugallm.cost import hardware
from frugallm.cost.flops import train_flops_per_token
from frugallm.cost.hardware import get_device, load_catalog
from frugallm.cost.prices import load_prices
from frugallm.cost.report import read_cost_json, run_cost, write_cost_json
from frugallm.errors import ConfigError

REQUIRED = {"h800", "h100-sxm", "h200", "b200", "a100-80gb", "mi300x", "gaudi3"}


def test_catalogue_entries_are_sourced(monkeypatch) -> None:
    monkeypatch.delenv(hardware.HARDWARE_ENV, raising=False)
    catalog = load_catalog()
    assert REQUIRED <= set(catalog)
    for dev in catalog.values():
        assert dev.spec_source and dev.spec_date, dev.key
        assert dev.price_per_hour is None or (dev.price_source and dev.price_date), dev.key
    h800 = get_device("H800")
    assert (h800.bf16_tflops, h800.fp8_tflops, h800.memory_gb, h800.price_per_hour) == (989, 1979, 80, 2.0)
    assert get_device("h100").key == get_device("H100_SXM").key == "h100-sxm"
    assert get_device("a100").fp8_tflops is None
    with pytest.raises(ConfigError, match="no fp8 peak"):
        get_device("a100").peak_flops("fp8")
    with pytest.raises(ConfigError, match=r"unknown GPU 'tpu-v9'; known: a100-80gb, b200, gaudi3"):
        get_device("tpu-v9")


def test_user_hardware_file_overrides_and_adds(tmp_path: Path, monkeypatch) -> None:
    user = tmp_path / "hw.toml"
    user.write_text('[h100-sxm]\nprice_per_hour = 1.75\n\n[my-gpu]\nname = "Lab GPU"\nbf16_tflops = 100.0\n'
                    'memory_gb = 24.0\nbandwidth_tbs = 1.0\nprice_per_hour = 0.4\n')
    assert get_device("h100", user).price_per_hour == 1.75
    assert get_device("h100", user).bf16_tflops == 989  # other fields kept
    monkeypatch.setenv(hardware.HARDWARE_ENV, str(user))
    assert get_device("my-gpu").peak_flops() == 100e12
    bad = tmp_path / "bad.toml"
    bad.write_text("[h800]\nbf16_tflop = 1.0\n")
    with pytest.raises(ConfigError, match="unknown field.*bf16_tflop"):
        get_device("h800", bad)
    bad.write_text("[h800]\nbf16_tflops = -1.0\n")
    with pytest.raises(ConfigError, match="bf16_tflops must be a positive number"):
        get_device("h800", bad)


def test_price_sheet(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FRUGALLM_PRICES_FILE", raising=False)
    prices = load_prices()
    early, late = prices["deepseek-chat-2025-02"], prices["deepseek-chat-2025-09"]
    assert (early.cached_input, early.input, early.output) == (0.07, 0.27, 1.10)
    assert (late.cached_input, late.input, late.output) == (0.07, 0.56, 1.68)
    assert late.valid_from == "2025-09-05"
    assert (prices["gpt-4-turbo"].input, prices["gpt-4-turbo"].output) == (10, 30)
    assert (prices["gpt-4o"].input, prices["gpt-4o"].output) == (2.5, 10)
    assert (prices["claude-3-5-sonnet"].input, prices["claude-3-5-sonnet"].output) == (3, 15)
    assert all(p.source and p.date for p in prices.values())
    # 1M input at 50% cache hits and 1M output
    assert early.cost_usd(1e6, 1e6, 0.5) == pytest.approx(0.5 * 0.27 + 0.5 * 0.07 + 1.10)
    assert prices["gpt-4o"].cost_usd(1e6, 0, 0.5) == pytest.approx(2.5)  # no cached price: billed as input
    user = tmp_path / "prices.toml"
    user.write_text('[gpt-4o]\ninput = 2.0\n\n[local]\nprovider = "Me"\nmodel = "m"\ninput = 0.0\noutput = 0.1\n')
    mine = load_prices(user)
    assert mine["gpt-4o"].input == 2.0 and mine["gpt-4o"].output == 10 and mine["local"].output == 0.1
    user.write_text('[gpt-4o]\noutput = -1\n')
    with pytest.raises(ConfigError, match="output must be a number >= 0"):
        load_prices(user)


def test_run_cost_record_and_atomic_write(tmp_path: Path) -> None:
    cfg = preset("tiny")
    rec = run_cost(cfg=cfg, seq_len=256, tokens=1_000_000, wall_seconds=100.0, device_kind="h100-sxm",
                   device_count=4, price_per_device_hour=2.5, peak_flops_per_device=989e12)
    flops = train_flops_per_token(cfg, 256) * 1_000_000
    assert rec["flops"] == flops
    assert rec["device_hours"] == pytest.approx(400 / 3600)
    assert rec["cost_usd"] == pytest.approx(400 / 3600 * 2.5)
    assert rec["achieved_tflops"] == pytest.approx(flops / 100 / 4 / 1e12)
    assert rec["mfu"] == pytest.approx(flops / 100 / 4 / 989e12)
    assert rec["tokens_per_second"] == 10_000
    for field in ("wall_seconds", "device_kind", "device_count", "device_hours", "tokens", "flops",
                  "achieved_tflops", "mfu", "cost_usd", "price_per_device_hour", "tokens_per_second"):
        assert field in rec
    path = write_cost_json(tmp_path / "run", rec)
    assert json.loads(path.read_text()) == rec == read_cost_json(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["cost.json"]  # no temporary left behind
    unknown = run_cost(cfg=cfg, seq_len=256, tokens=10, wall_seconds=1.0, device_kind="cpu", device_count=1,
                       price_per_device_hour=None, peak_flops_per_device=None)
    assert unknown["mfu"] is None and unknown["cost_usd"] is None
    with pytest.raises(ConfigError, match="wall_seconds"):
        run_cost(cfg=cfg, seq_len=256, tokens=10, wall_seconds=0.0, device_kind="cpu", device_count=1,
                 price_per_device_hour=None, peak_flops_per_device=None)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cost.json").write_text('{"wall_seconds": 1}')
    with pytest.raises(ConfigError, match="missing field"):
        read_cost_json(tmp_path / "broken")
