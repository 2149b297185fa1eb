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
from frugallm.lab.claims import base_model, select
from frugallm.lab.cli import parse_duration
from frugallm.lab.report import build_report, write_report
from frugallm.lab.runner import (
    TWIN,
    LabPlan,
    evaluate_on_raw,
    flops_twins,
    make_plan,
    measure_serving,
    needed_arms,
    prepare_plan,
    run_dir,
    run_lab,
)
from frugallm.lab.serving import held_out_prompt, measure
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
    for argv, field in ((["bogus"], "unknown claim"), (["--budget", "abc"], "--budget"), (["--seeds", "0"], "--seeds"),
                        (["--nproc", "0"], "--nproc"), (["--preset", "tiny", "--config", "x.toml"], "--preset"),
                        (["--config", "missing.toml", "--list"], "config not found")):
        done = subprocess.run([sys.executable, "-m", "frugallm", "lab", *argv], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert field in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _plan(claims) -> LabPlan:
    twins = flops_twins(claims, MICRO, 32)
    step = 32 * 4
    twin_tokens = {a + TWIN: round(6 * r) * step for a, r in twins.items()}
    return LabPlan(arms=needed_arms(claims) + tuple(twin_tokens), seeds=2, tokens=6 * step, seq_len=32,
                   batch_size=4, budget_s=60, twin_tokens=twin_tokens)


def test_the_plan_fits_the_budget_at_the_probed_rates_with_equal_flops_twins() -> None:
    claims = select(["moe-vs-dense", "mtp"])
    rates = {"base": 3000.0, "dense-active": 6000.0, "dense-total": 2500.0, "mtp-off": 5000.0}
    plan = make_plan(claims, seeds=2, budget_s=3600, rates=rates, overhead_s=10.0)
    twins = flops_twins(claims, base_model(), 256)
    assert set(twins) == {"dense-active", "dense-total", "mtp-off"}  # base's FLOPs/token differ by > 5%
    assert twins["dense-total"] < 1 < twins["dense-active"]
    step = 256 * 16
    for arm, ratio in twins.items():  # each twin spends the base's FLOPs, to a step
        assert abs(plan.twin_tokens[arm + TWIN] - plan.tokens * ratio) <= step / 2
    # the seconds the plan predicts at those rates: within the budget, and a step per run short of it at most
    runs = [(a, plan.tokens_of(a)) for a in plan.arms]
    predicted = plan.seeds * sum(10.0 + t / rates[a.removesuffix(TWIN)] for a, t in runs)
    assert predicted <= 3600
    assert predicted > 3600 - plan.seeds * sum(2 * step / rates[a.removesuffix(TWIN)] for a, _ in runs)
    assert plan.arms[:3] == ("base", "dense-active", "dense-total")
    assert needed_arms(select(["curation"]))[-1] == "curated"  # it reuses an earlier run's tokenizer


def test_the_probe_times_each_distinct_arm_once_and_a_restarted_lab_keeps_its_plan(corpus_dir, tmp_path) -> None:
    claims = select(["balancing"])
    out = tmp_path / "lab"
    plan = prepare_plan(out, claims, seeds=2, budget_s=120, base=MICRO, data=[str(corpus_dir)], seq_len=32,
                        batch_size=4, train_overrides=_TRAIN)
    assert sorted(p.name for p in (out / "probe").iterdir() if not p.name.startswith(".")) == ["base"]
    assert set(plan.rates) == {"base", "aux-loss", "no-balancing"} and plan.rates["base"] > 0
    assert len(set(plan.rates.values())) == 1  # the same step's work: the base's probe stands for them
    assert plan.overhead_s > 0 and json.loads((out / "plan.json").read_text())["tokens"] == plan.tokens
    stamp = (out / "probe" / "base" / "metrics.jsonl").stat().st_mtime_ns
    again = prepare_plan(out, claims, seeds=2, budget_s=120, base=MICRO, data=[str(corpus_dir)], seq_len=32,
                         batch_size=4, train_overrides=_TRAIN)
    assert again == plan and (out / "probe" / "base" / "metrics.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="another plan.*--seeds"):
        prepare_plan(out, claims, seeds=3, budget_s=120, base=MICRO, seq_len=32, batch_size=4)


def test_miniature_lab_report_comes_from_its_runs_and_resumes_to_the_same_figures(corpus_dir, tmp_path) -> None:
    claims = select(["mtp", "curation"])
    plan = _plan(claims)
    assert plan.twin_tokens and "mtp-off" + TWIN in plan.arms  # mtp-off trains fewer FLOPs per token
    full = tmp_path / "full"
    run_lab(plan, full, base=MICRO, data=[str(corpus_dir)], train_overrides=_TRAIN)
    # the base measured plainly first (as mla-vs-mha does before mtp): the mtp claim still gets its drafts
    plain = measure(run_dir(full, "base", 0), held_out_prompt(run_dir(full, "base", 0), 48), new_tokens=8)
    assert "speculative_speedup" not in plain
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
    # equal FLOPs: mtp-off's twin trained the base's FLOPs, and its figure is that run's validation loss
    twin = [json.loads(line) for line in (run_dir(full, "mtp-off" + TWIN, 0) / "metrics.jsonl").open()]
    assert next(r for r in twin if r.get("final"))["tokens"] == plan.twin_tokens["mtp-off" + TWIN] > plan.tokens
    got = saved["claims"]["mtp"]["arms"]["mtp-off"]
    assert got["equal_flops_tokens"] == plan.twin_tokens["mtp-off" + TWIN] and got["equal_flops_run"] == "separate run"
    assert saved["claims"]["mtp"]["arms"]["base"]["equal_flops_run"] == "the equal-tokens run"
    # curation: the curated arm trained on the curated corpus with the base's tokenizer, and is judged on the
    # raw corpus's held-out split by the training loop's own evaluation (which reproduces the base's figure)
    cur = run_dir(full, "curated", 0)
    assert (full / "curated").is_dir() and "curated" in (cur / "config.toml").read_text()
    assert (cur / "tokenizer.json").read_bytes() == (run_dir(full, "base", 0) / "tokenizer.json").read_bytes()
    raw = json.loads((cur / "raw_eval.json").read_text())
    assert saved["claims"]["curation"]["arms"]["curated"]["val_loss"]["mean"] == pytest.approx(
        statistics.fmean([raw["val_loss"], json.loads((run_dir(full, "curated", 1) / "raw_eval.json").read_text())
                          ["val_loss"]]), abs=1e-12)
    base_again = evaluate_on_raw(run_dir(full, "base", 0), [str(corpus_dir)])
    base_final = next(json.loads(line) for line in (run_dir(full, "base", 0) / "metrics.jsonl").open()
                      if json.loads(line).get("final"))
    assert base_again["val_loss"] == pytest.approx(base_final["val_loss"], abs=1e-5)
    assert base_again["val_tokens"] == raw["val_tokens"]  # the same held-out text
    for name in ("mtp", "curation"):
        assert (full / saved["claims"][name]["plot"]).stat().st_size > 10_000
        assert f"]({saved['claims'][name]['plot']})" in (full / "report.md").read_text()

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
            for key in ("val_loss", "val_bpb", "val_loss_at_equal_flops"):
                a, b = figs[key]["mean"], resumed["claims"][name]["arms"][arm][key]["mean"]
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (name, arm, key)


def test_the_progress_line_names_the_run_and_counts_down_the_budget() -> None:
    import time

    from frugallm.train.progress import ProgressLine

    ui = ProgressLine(enabled=True, label="lab [3/20] base seed 0", deadline=time.time() + 100)
    ui.start(None, 0)
    try:
        ui.update(1, {"loss": 5.0, "lr": 1e-3, "tokens_per_s": 1000.0})
        desc = ui._progress.tasks[0].description
        left = int(desc.split(" s left in the budget")[0].split()[-1])
        assert 90 <= left <= 100
        assert ui._progress.columns[0].text_format == "[bold]lab [3/20] base seed 0"
    finally:
        ui.stop()


def test_nproc_trains_each_run_under_the_launcher_as_one_process_does(corpus_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FRUGALLM_DIST_TIMEOUT_S", "60")
    claims = select(["mtp"])
    shape = dict(seeds=1, tokens=4 * 128, seq_len=32, batch_size=4, budget_s=120, base=MICRO.to_dict())
    two = LabPlan(arms=("base", "mtp-off"), nproc=2, **shape)
    out = tmp_path / "two"
    dirs = run_lab(two, out, data=[str(corpus_dir)], train_overrides={**_TRAIN, "threads": 1})
    report = build_report(out, two, claims)  # the base model comes from the plan
    for d in dirs:
        cost = json.loads((d / "cost.json").read_text())
        assert cost["device_count"] == 2, cost
        assert (out / "arms" / ".launch" / f"{d.name}.toml").is_file()
    finals = [next(json.loads(line) for line in (d / "metrics.jsonl").open() if json.loads(line).get("final"))
              for d in dirs]
    assert [f["tokens"] for f in finals] == [two.tokens] * 2
    assert report["claims"]["mtp"]["arms"]["mtp-off"]["val_loss"]["mean"] == finals[1]["val_loss"]
    assert report["base"]["hidden_size"] == MICRO.hidden_size
    # the same global batch on one process: the same model, to float32 rounding
    one = LabPlan(arms=("base",), nproc=1, **shape)
    run_lab(one, tmp_path / "one", data=[str(corpus_dir)], train_overrides={**_TRAIN, "threads": 1})
    single = next(json.loads(line) for line in (run_dir(tmp_path / "one", "base", 0) / "metrics.jsonl").open()
                  if json.loads(line).get("final"))
    assert single["val_loss"] == pytest.approx(finals[0]["val_loss"], abs=1e-4)
    with pytest.raises(ConfigError, match="--nproc"):
        prepare_plan(out, claims, seeds=1, budget_s=120, base=MICRO, seq_len=32, batch_size=4, nproc=1)
    with pytest.raises(ConfigError, match="must divide by --nproc"):
        LabPlan(arms=("base",), nproc=3, **shape)


def test_a_launched_run_gets_the_labs_progress_label_and_deadline(tmp_path, monkeypatch) -> None:
    from frugallm.lab import runner
    from frugallm.train.cli import PROGRESS_DEADLINE_ENV, PROGRESS_LABEL_ENV, progress_from_env

    seen = {}

    class FakeLauncher:
        def __init__(self, cmd, env):
            seen.update(cmd=cmd, env=env)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeLauncher)
    plan = LabPlan(arms=("base",), seeds=1, tokens=4 * 128, seq_len=32, batch_size=4, budget_s=60, nproc=2)
    cfg = runner.train_config(plan, "base", 0, None, None)
    interrupted = runner.train_run(MICRO, cfg, tmp_path / "base-seed0", resume=False, nproc=2,
                                   label="lab [1/2] base seed 0", deadline=1234.5)
    assert interrupted  # the fake launcher finished nothing
    assert "--nproc-per-node=2" in seen["cmd"] and "--no-progress" not in seen["cmd"]
    env = seen["env"]
    assert env[PROGRESS_LABEL_ENV] == "lab [1/2] base seed 0" and float(env[PROGRESS_DEADLINE_ENV]) == 1234.5
    monkeypatch.setenv(PROGRESS_LABEL_ENV, env[PROGRESS_LABEL_ENV])
    monkeypatch.setenv(PROGRESS_DEADLINE_ENV, env[PROGRESS_DEADLINE_ENV])
    assert progress_from_env() == ("lab [1/2] base seed 0", 1234.5)
    monkeypatch.setenv(PROGRESS_DEADLINE_ENV, "soon")
    assert progress_from_env() == ("lab [1/2] base seed 0", None)
