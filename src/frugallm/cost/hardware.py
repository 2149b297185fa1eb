"""The accelerator catalogue (``hardware.toml``, each entry with its source and date) and user overrides.
The CPU, which has no datasheet figure worth using, is measured instead (``frugallm.kernels.probe``).

A user file has the catalogue's shape; its entries are merged field by field over the built-in ones, so
``[h100-sxm] price_per_hour = 2.2`` changes only the price and ``[my-gpu] ...`` adds a device. It is given
as ``hardware_file`` (the CLI's ``--hardware-file``) or the environment variable ``FRUGALLM_HARDWARE_FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from frugallm.cost.catalog import merged_entries
from frugallm.errors import ConfigError

HARDWARE_ENV = "FRUGALLM_HARDWARE_FILE"


@dataclass(frozen=True, kw_only=True)
class Device:
    key: str
    name: str
    bf16_tflops: float
    memory_gb: float
    bandwidth_tbs: float
    fp8_tflops: float | None = None
    price_per_hour: float | None = None
    aliases: tuple[str, ...] = ()
    spec_source: str = ""
    spec_date: str = ""
    price_source: str = ""
    price_date: str = ""

    def __post_init__(self) -> None:
        for name in ("bf16_tflops", "memory_gb", "bandwidth_tbs", "fp8_tflops", "price_per_hour"):
            v = getattr(self, name)
            if v is None and name in ("fp8_tflops", "price_per_hour"):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"hardware entry [{self.key}]: {name} must be a positive number, got {v!r}")

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak FLOP/s at ``precision`` (bf16 or fp8)."""
        if precision == "bf16":
            return self.bf16_tflops * 1e12
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ConfigError(f"{self.name} has no fp8 peak in the hardware catalogue; use --precision bf16")
            return self.fp8_tflops * 1e12
        raise ConfigError(f"precision must be bf16 or fp8, got {precision!r}")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def load_catalog(hardware_file: str | Path | None = None) -> dict[str, Device]:
    """The built-in catalogue merged with ``hardware_file`` (or ``$FRUGALLM_HARDWARE_FILE``)."""
    table = merged_entries("hardware.toml", hardware_file, HARDWARE_ENV, what="hardware", record=Device,
                           required=("name", "bf16_tflops", "memory_gb", "bandwidth_tbs"), normalise=_normalise)
    return {key: Device(key=key, **{**entry, "aliases": tuple(_normalise(a) for a in entry.get("aliases", ()))})
            for key, entry in table.items()}


def get_device(name: str, hardware_file: str | Path | None = None) -> Device:
    """A device by key, alias or display name, case-insensitive ('H800', 'h100', 'NVIDIA H100 SXM' ...)."""
    catalog = load_catalog(hardware_file)
    want = _normalise(name)
    for key, dev in catalog.items():
        if want == key or want in dev.aliases or want == _normalise(dev.name):
            return dev
    raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(sorted(catalog))} "
                      f"(add your own with --hardware-file or ${HARDWARE_ENV})")


__all__ = ["HARDWARE_ENV", "Device", "get_device", "load_catalog"]
