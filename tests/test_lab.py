"""``frugallm lab``: the verdict logic, a miniature lab whose report numbers come from its runs, a resumed lab
equal to an uninterrupted one, and the CLI's one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys

import pytest

from frugallm.errors import ConfigError
from frugallm.lab import stats
from frugallm.lab.claims import select
from frugallm.lab.cli import parse_duration
from frugallm.lab.report import build_report, write_report
from frugallm.lab.runner import LabPlan, make_plan, measure_serving, needed_arms, run_dir, run_lab
from shapes import MICRO

# a few steps per arm, float32 so that resumed and uninterrupted runs agree exactly
_TRAIN = dict(precision="fp32", val_fraction=0.05, eval_windows=4, log_every=1)


def test_verdicts_respect_the_seed_spread() -> None:
    a, b = stats.estimate([1.00, 1.02]), stats.estimate([1.01, 1.03])
    assert stats.verdict(a, b)[0] == stats.NO_DIFFERENCE  # 0.01 apart, spread 0.014
    lower = stats.estimate([0.90, 0.91])
    assert stats.verdict(lower, b)[0] == stats.HELD
    assert stats.verdict(b, lower)[0] == stats.NOT_HELD
    assert stats.verdict(stats.estimate([0.5]), b)[0] == stats.NOT_MEASURABLE  # one seed: no spread
    e = stats.estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.spread == pytest.approx(1.0)


def test_bad_input_is_refused_naming_the_problem() -> None:
    assert parse_duration("10m") == 600 and parse_duration("1h") == 3600 and parse_duration("90") == 90
    for bad in ("0", "-5m", "ten", "5x"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="unknown claim.*allowed: moe-vs-dense"):
        select(["moe-vs-sparse"])
    with pytest.raises(ConfigError, match="raise --budget"):
        make_plan(select(None), seeds=2, budget_s=30)
    for argv, field in ((["bogus"], "unknown claim"), (["--budget", "abc"], "--budget"), (["--seeds", "0"], "--seeds")):
        done = subprocess.run([sys.executable, "-m", "frugallm", "lab", *argv], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert field in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _plan(claims) -> LabPlan:
    return LabPlan(arms=needed_arms(claims), seeds=2, tokens=32 * 4 * 6, seq_len=32, batch_size=4, budget_s=60)


def test_miniature_lab_report_comes_from_its_runs_and_resumes_to_the_same_figures(corpus_dir, tmp_path) -> None:
    claims = select(["mtp"])
    plan = _plan(claims)
    full = tmp_path / "full"
    run_lab(plan, full, base=MICRO, data=[str(corpus_dir)], train_overrides=_TRAIN)
    measure_serving(plan, full, claims, context=48, new_tokens=8)
    report = build_report(full, plan, claims, base=MICRO)
    write_report(full, report)
    assert (full / "report.md").read_text().startswith("# frugallm lab report")
    saved = json.loads((full / "report.json").read_text())
    # a figure recomputed from the arms' own metrics.jsonl
    finals = []
    for seed in range(2):
        recs = [json.loads(line) for line in (run_dir(full, "mtp-off", seed) / "metrics.jsonl").open()]
        finals.append(next(r for r in recs if r.get("final"))["val_loss"])
    got = saved["claims"]["mtp"]["arms"]["mtp-off"]["val_loss"]
    assert got["mean"] == pytest.approx(statistics.fmean(finals), abs=1e-12)
    assert got["spread"] == pytest.approx(statistics.stdev(finals), abs=1e-12)
    for claim in saved["claims"].values():
        assert claim["verdicts"] and all(v["verdict"] in (stats.HELD, stats.NOT_HELD, stats.NO_DIFFERENCE,
                                                          stats.NOT_MEASURABLE) for v in claim["verdicts"])
    assert "load_max_over_mean" in saved["claims"]["mtp"]["arms"]["mtp-off"]
    base_serve = saved["claims"]["mtp"]["arms"]["base"]
    assert 0 <= base_serve["acceptance_rate"] <= 1 and base_serve["speculative_speedup"] > 0
    assert base_serve["decode_tokens_per_s"] == json.loads((run_dir(full, "base", 0) / "serve.json").read_text()
                                                           )["decode_tokens_per_s"]
    assert "speculative_speedup" not in saved["claims"]["mtp"]["arms"]["mtp-off"]

    # the same lab stopped after its first two runs (copied from the full lab: the same runs), then started
    # again: the finished arms are skipped, the others trained, and the figures are the uninterrupted ones
    cut = tmp_path / "cut"
    for arm in plan.arms:
        shutil.copytree(run_dir(full, arm, 0), run_dir(cut, arm, 0))
    first = run_dir(cut, plan.arms[0], 0) / "metrics.jsonl"
    before = first.stat().st_mtime_ns
    run_lab(plan, cut, base=MICRO, data=[str(corpus_dir)], train_overrides=_TRAIN)
    assert first.stat().st_mtime_ns == before  # not trained again
    resumed = build_report(cut, plan, claims, base=MICRO)
    for name, claim in report["claims"].items():
        for arm, figs in claim["arms"].items():
            for key in ("val_loss", "val_bpb", "train_loss_at_equal_flops"):
                a, b = figs[key]["mean"], resumed["claims"][name]["arms"][arm][key]["mean"]
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (name, arm, key)
