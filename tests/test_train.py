"""Training loop: resume equality, a short run whose loss falls, run-directory files, config errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from frugallm.config import preset
from frugallm.errors import ConfigError
from frugallm.train.config import TrainConfig
from frugallm.train.loop import Trainer
from frugallm.train.metrics import read_metrics
from shapes import MICRO


def _cfg(corpus_dir: Path, **kw) -> TrainConfig:
    base = dict(data=[str(corpus_dir)], seq_len=32, batch_size=4, precision="fp32", time_budget_s=None,
                warmup_steps=2, log_every=1, eval_every_s=1e9, checkpoint_every_s=1e9, eval_windows=4,
                lr=3e-3, val_fraction=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_resume_reproduces_the_uninterrupted_run(corpus_dir, tmp_path) -> None:
    full = Trainer(MICRO, _cfg(corpus_dir, max_steps=12), tmp_path / "full", progress=False).run()
    assert full.step == 12
    # the same run cut at step 5 (its checkpoint is the state after step 5), then resumed to 12
    Trainer(MICRO, _cfg(corpus_dir, max_steps=12, checkpoint_every_s=1e9), tmp_path / "cut",
            progress=False).run(stop_after_step=5)
    resumed = Trainer(MICRO, _cfg(corpus_dir, max_steps=12), tmp_path / "cut", resume=True, progress=False).run()
    assert resumed.step == 12
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6, (a, b)


def test_short_run_loss_falls_and_files_are_well_formed(corpus_dir, tmp_path) -> None:
    run = tmp_path / "run"
    res = Trainer(MICRO, _cfg(corpus_dir, max_steps=60, batch_size=8, eval_every_s=5.0), run, progress=False).run()
    losses = _losses(run)
    assert len(losses) == 60 and res.step == 60
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert res.final["val_loss"] < 0.85 * math.log(MICRO.vocab_size)  # far below a uniform guess
    records = read_metrics(run)
    for r in records:
        if "loss" in r:
            assert {"step", "loss", "tokens", "tokens_per_s", "lr", "grad_norm", "mtp_loss", "balance_loss",
                    "load_max_over_mean", "dead_experts", "cost_usd"} <= set(r)
    vals = [r for r in records if "val_loss" in r]
    assert vals and all({"val_loss", "val_bpb"} <= set(r) for r in vals)
    assert math.isfinite(res.final["val_bpb"]) and res.final["val_bpb"] > 0
    cost = json.loads((run / "cost.json").read_text())
    for k in ("wall_seconds", "device_kind", "device_count", "device_hours", "tokens", "flops",
              "achieved_tflops", "mfu", "cost_usd"):
        assert k in cost, k
    assert cost["tokens"] == res.tokens and cost["flops"] > 0
    for f in ("config.toml", "tokenizer.json", "loss.png", "expert_load.png", "model/config.json",
              "model/model.safetensors", "model/tokenizer.json"):
        assert (run / f).is_file(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and {"model.safetensors", "optimizer.pt", "state.json"} <= {p.name for p in ckpts[-1].iterdir()}
    # the exported model is the trained one: it reproduces the final validation loss
    from frugallm.data.pack import prepare_corpus
    from frugallm.model.hf import from_pretrained
    from frugallm.train.evaluate import evaluate

    corpus = prepare_corpus([str(corpus_dir)], vocab_size=320, tokenizer_path=run / "tokenizer.json",
                            val_fraction=0.05, progress=False, cache_dir=tmp_path / "cache")
    again = evaluate(from_pretrained(run / "model"), corpus, seq_len=32, batch=8)
    assert abs(again["val_loss"] - res.final["val_loss"]) < 1e-4


class _Clock:
    """Stands in for loop.py's ``time`` module: each reading is one second after the last, so a run's clock
    decisions follow its own calls and not the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        if self.now > 1000:  # the budget below is 40 s: a loop that ignores it fails here, not hangs
            raise RuntimeError("the run went on far past its time budget")
        return self.now


def test_the_time_budget_ends_the_run_and_drives_the_schedule(corpus_dir, tmp_path, monkeypatch) -> None:
    """A 40 s budget on an injected clock: the run stops at the first check past the budget, and with no
    step or token limit the learning rate decays with elapsed time."""
    import frugallm.train.loop as loop

    monkeypatch.setattr(loop, "time", _Clock())
    cfg = _cfg(corpus_dir, time_budget_s=40.0, max_steps=None)
    res = Trainer(MICRO, cfg, tmp_path / "b", progress=False).run()
    recs = [r for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert len(recs) == res.step >= 4
    assert res.elapsed_s >= 40.0 > recs[-2]["elapsed_s"]  # one step more would have been over budget
    elapsed = [r["elapsed_s"] for r in recs]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    lrs = [r["lr"] for r in recs]
    assert cfg.lr in lrs[cfg.warmup_steps:] and lrs[-1] < cfg.lr  # stable, then decayed by time alone


def test_resume_with_another_model_config_is_refused(corpus_dir, tmp_path) -> None:
    Trainer(MICRO, _cfg(corpus_dir, max_steps=2), tmp_path / "r", progress=False).run()
    other = MICRO.replace(hidden_size=64)
    with pytest.raises(ConfigError, match="hidden_size"):
        Trainer(other, _cfg(corpus_dir, max_steps=4), tmp_path / "r", resume=True, progress=False).run()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(MICRO, _cfg(corpus_dir, max_steps=4), tmp_path / "r", progress=False).run()


def test_activation_checkpointing_recomputes_every_block_with_the_same_gradients() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from frugallm.model import build_model
    from frugallm.train.distributed import apply_activation_checkpointing

    tokens = torch.randint(0, MICRO.vocab_size, (2, 34), generator=torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        model = build_model(MICRO, seed=0)
        if recompute:
            apply_activation_checkpointing(model)
            blocks = list(model.model.layers) + list(model.model.mtp)
            assert len(blocks) == 3 and all(isinstance(b, CheckpointWrapper) for b in blocks)
        out = model(tokens, train=True)
        (out.loss + torch.stack(out.mtp_losses).sum() + out.balance_loss).backward()
        grads.append({k.replace("_checkpoint_wrapped_module.", ""): p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_train_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(corpus_dir, tmp_path) -> None:
    run = tmp_path / "sig"
    env = {**os.environ, "FRUGALLM_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "frugallm", "train", "--data", str(corpus_dir), "--out", str(run),
           "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--precision", "fp32",
           "--time-budget", "120", "--log-every", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not _losses(run):
        time.sleep(0.5)
    assert _losses(run), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--resume" in out
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts and (ckpts[-1] / "state.json").is_file()
    assert json.loads((ckpts[-1] / "state.json").read_text())["complete"] is True


def test_cli_errors_are_one_line(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "frugallm", "train", "--data", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "x"), "--max-steps", "1"],
                         capture_output=True, text=True, env={**os.environ, "FRUGALLM_NO_PROGRESS": "1"})
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "nope" in out.stderr
    torch.manual_seed(0)


def test_a_run_faster_than_the_cached_cpu_peak_measures_the_peak_again(monkeypatch) -> None:
    """A cached CPU probe taken while the machine was busy gave MFU above 100%: the meter re-measures once and
    keeps the better figure, and leaves MFU out if the run still beats it."""
    from frugallm.kernels import probe
    from frugallm.train.rate import RateMeter

    probes = []

    def fake_peak(dtype, kernels=None, refresh=False, budget_s=1.0):
        probes.append(refresh)
        return 1e9 if not refresh else 1e15  # the cached figure is far too low; a fresh probe is not

    monkeypatch.setattr(probe, "cpu_peak_flops", fake_peak)
    meter = RateMeter(preset("tiny"), TrainConfig(precision="fp32"), torch.device("cpu"))
    meter.update(tokens=4096, seconds=1.0)  # 4096 tokens/s at ~45 MFLOP/token: far above 1 GFLOP/s
    snap = meter.snapshot(1.0)
    assert probes == [False, True] and 0 < snap["mfu"] < 1
    monkeypatch.setattr(probe, "cpu_peak_flops", lambda *a, **k: 1e9)
    meter = RateMeter(preset("tiny"), TrainConfig(precision="fp32"), torch.device("cpu"))
    meter.update(tokens=4096, seconds=1.0)
    assert meter.snapshot(1.0)["mfu"] is None  # still beaten after the re-measure: no MFU, not 680%


def test_cpu_precision_benchmark_times_both_and_reports_auto(monkeypatch, capsys) -> None:
    """benchmarks/cpu_precision.py, at a shape that runs in seconds: both precisions timed, the ratio and
    auto's choice in its RESULT line."""
    import runpy
    from pathlib import Path

    from frugallm.train.device import resolve_precision

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_precision.py"
    monkeypatch.setattr("sys.argv", [str(script), "--batch", "1", "--seq", "16", "--rounds", "2"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {f[0]: float(f[1]) for f in (line.split() for line in out.splitlines())
            if len(f) == 3 and f[0] in ("fp32", "bf16")}  # precision, s/step, tokens/s
    assert set(rows) == {"fp32", "bf16"} and all(s > 0 for s in rows.values())
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert result["auto"] == resolve_precision("auto", torch.device("cpu"))
    assert float(result["bf16_speedup"]) > 0 and result["auto_picks_faster"] in ("yes", "no")
