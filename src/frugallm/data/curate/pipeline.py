"""``frugallm curate``: raw documents in, a deduplicated, filtered, decontaminated corpus out, on datatrove.

The stages (see ``recipe``) run as datatrove pipelines ("passes"); each pass is handed to an executor
(local processes, Slurm or Ray) with its own logging folder, whose completion markers make a rerun resume:

    pass               tasks   steps
    ingest             T       read inputs -> normalise -> quality -> write work/ingest -> exact signatures
    exact_find         1       datatrove ExactFindDedups: which documents repeat an earlier one
    minhash_signature  T       read work/ingest -> drop exact dups -> write work/exact -> MinHash signatures
    minhash_buckets    bands   datatrove MinhashDedupBuckets: candidate pairs sharing a band
    minhash_cluster    1       verify candidates against `threshold` -> datatrove MinhashDedupCluster
    decont_index       1       hash the n-grams of the evaluation sets
    final              T       read work/exact -> drop near dups -> decontaminate -> write the output shards

T (``run.tasks``) is the number of shards, fixed by the first run into an output folder. Everything that
is not the corpus lives under ``OUT/.curate`` (a hidden folder, which ``frugallm.data.sources`` never reads):

    OUT/part-00000.jsonl.gz ...   the curated corpus, moved in only when the final pass completed
    OUT/.curate/report.json, report.txt, funnel.png
    OUT/.curate/plan.json         what was asked (inputs, recipe) and T; a rerun must ask the same to resume
    OUT/.curate/logs/<pass>/      datatrove logging: completions/, logs/task_*.log, stats/
    OUT/.curate/work/, meters/    intermediate shards and dedup files; per-task counts for the report
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from datatrove.executor.local import LocalPipelineExecutor

from frugallm.data.curate.recipe import Recipe
from frugallm.data.curate.report import load_meters, merge_report, write_report
from frugallm.data.curate.steps import (
    DecontIndex,
    DecontStep,
    NearDupVerify,
    NormaliseStep,
    QualityStep,
    ShardReader,
    SourceReader,
    Tracked,
    build_prose_filters,
    exact_content,
    final_writer,
    word_tokenizer,
    work_writer,
    write_json,
)
from frugallm.errors import ConfigError, DataError

EXECUTORS = ("local", "slurm", "ray")
DEFAULT_OUT = "runs/curated"
CURATE_DIR = ".curate"
PLAN_FORMAT = 1


@dataclass
class Pass:
    name: str
    tasks: int
    steps: list[Any]
    stages: list[str] = field(default_factory=list)  # the report stages whose meters this pass writes


@dataclass
class Layout:
    out: Path

    @property
    def root(self) -> Path:
        return self.out / CURATE_DIR

    def work(self, name: str) -> str:
        return str(self.root / "work" / name)

    def logs(self, name: str) -> str:
        return str(self.root / "logs" / name)

    @property
    def meters(self) -> str:
        return str(self.root / "meters")


def _fingerprint(files: list[tuple[str, str]], recipe: Recipe) -> str:
    what = recipe.to_dict()
    what.pop("executor")  # where it runs does not change what it produces
    what["run"].pop("tasks")  # fixed in the plan instead
    blob = json.dumps({"files": files, "recipe": what}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare(out: Path, inputs: Sequence[str] | None, recipe: Recipe, workers: int,
             overwrite: bool) -> tuple[Layout, dict[str, Any], bool]:
    """Create or reopen the output folder; returns its layout, its plan, and whether this is a resume."""
    from frugallm.data.sources import resolve_inputs

    layout = Layout(out)
    files = [(str(p), spec) for p, spec in resolve_inputs(inputs)]
    if not files:
        raise DataError("no input files found" + (f" in {', '.join(inputs)}" if inputs else ""))
    fingerprint = _fingerprint(files, recipe)
    plan_path = layout.root / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan.get("fingerprint") == fingerprint and plan.get("format") == PLAN_FORMAT and not overwrite:
            return layout, plan, True
        if not overwrite:
            raise ConfigError(f"{out} holds a curation of other inputs or another recipe; choose another --out, "
                              f"or pass --overwrite to replace it")
        _wipe(layout, plan.get("shard_prefix", recipe.run.shard_prefix))
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no curation; choose a new or empty folder")
    tasks = recipe.run.tasks or workers
    plan = {"format": PLAN_FORMAT, "fingerprint": fingerprint, "tasks": tasks, "files": len(files),
            "shard_prefix": recipe.run.shard_prefix, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / "inputs.jsonl", "w", encoding="utf-8") as f:
        for path, spec in files:
            f.write(json.dumps([path, spec]) + "\n")
    write_json(plan_path, plan)
    return layout, plan, False


def _wipe(layout: Layout, prefix: str) -> None:
    shutil.rmtree(layout.root, ignore_errors=True)
    for p in layout.out.glob(f"{prefix}*"):
        if p.is_file():
            p.unlink()


def build_passes(layout: Layout, recipe: Recipe, tasks: int) -> list[Pass]:
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    run, meters = recipe.run, layout.meters
    exact, near = recipe.exact_dedup.enabled, recipe.near_dedup.enabled
    decont = recipe.decontaminate.enabled and bool(recipe.decontaminate.eval_sets)
    exact_cfg = ExactDedupConfig(content_getter=exact_content)
    nd = recipe.near_dedup
    mh_cfg = MinhashConfig(n_grams=nd.ngram, num_buckets=nd.bands, hashes_per_bucket=nd.rows, seed=nd.seed)

    def exact_filter() -> Tracked:
        return Tracked(ExactDedupFilter(layout.work("exact_dups"), config=exact_cfg), "exact_dedup",
                       "duplicate", meters, run)

    ingest: list[Any] = [SourceReader(str(layout.root / "inputs.jsonl"), meters, run.text_field)]
    stages = []
    if recipe.normalise.enabled:
        ingest.append(NormaliseStep(meters, run, nfc=recipe.normalise.nfc,
                                    line_endings=recipe.normalise.line_endings))
        stages.append("normalise")
    if recipe.quality.enabled:
        ingest.append(QualityStep(meters, run, recipe.quality))
        stages.append("quality")
    ingest.append(work_writer(layout.work("ingest")))
    if exact:
        ingest.append(ExactDedupSignature(layout.work("exact_sigs"), config=exact_cfg))
    passes = [Pass("ingest", tasks, ingest, ["source", *stages])]
    if exact:
        passes.append(Pass("exact_find", 1, [ExactFindDedups(layout.work("exact_sigs"), layout.work("exact_dups"),
                                                             config=exact_cfg)]))
    final_input = "ingest"
    if near:
        sig: list[Any] = [ShardReader(layout.work("ingest"))]
        if exact:
            sig += [exact_filter(), work_writer(layout.work("exact"))]
            final_input = "exact"
        sig.append(MinhashDedupSignature(layout.work("minhash_sigs"), config=mh_cfg,
                                         language=word_tokenizer(nd.tokenizer)))
        passes.append(Pass("minhash_signature", tasks, sig, ["exact_dedup"] if exact else []))
        passes.append(Pass("minhash_buckets", nd.bands, [
            MinhashDedupBuckets(layout.work("minhash_sigs"), layout.work("minhash_buckets"), config=mh_cfg)]))
        passes.append(Pass("minhash_cluster", 1, [
            NearDupVerify(layout.work("minhash_sigs"), layout.work("minhash_buckets"),
                          layout.work("minhash_verified"), nd, meters),
            MinhashDedupCluster(layout.work("minhash_verified"), layout.work("minhash_remove"), config=mh_cfg)]))
    if decont:
        passes.append(Pass("decont_index", 1, [
            DecontIndex(list(recipe.decontaminate.eval_sets), layout.work("decont_index"), recipe.decontaminate,
                        nd.tokenizer, meters, run.text_field)]))
    final: list[Any] = [ShardReader(layout.work(final_input))]
    final_stages = []
    if exact and not near:
        final.append(exact_filter())
        final_stages.append("exact_dedup")
    if near:
        final.append(Tracked(MinhashDedupFilter(layout.work("minhash_remove")), "near_dedup", "near_duplicate",
                             meters, run))
        final_stages.append("near_dedup")
    if decont:
        final.append(DecontStep(meters, run, layout.work("decont_index"), recipe.decontaminate, nd.tokenizer))
        final_stages.append("decontaminate")
    final.append(final_writer(layout.work("final"), run))
    passes.append(Pass("final", tasks, final, final_stages))
    return passes


class _Discard:
    """Where datatrove's console logging and progress bars go while a pass runs: the per-task log files
    under logs/<pass>/logs keep everything, and the user sees one progress line per pass instead."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class QuietLocalExecutor(LocalPipelineExecutor):
    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        saved, sys.stderr = sys.stderr, _Discard()  # datatrove's task logger binds sys.stderr per task
        try:
            return super()._run_for_rank(rank, local_rank, node_rank)
        finally:
            sys.stderr = saved


def _executor(kind: str, p: Pass, layout: Layout, workers: int, recipe: Recipe, depends: Any = None) -> Any:
    logging_dir = layout.logs(p.name)
    if kind == "local":
        return QuietLocalExecutor(p.steps, tasks=p.tasks, workers=max(1, min(workers, p.tasks)),
                                  logging_dir=logging_dir, skip_completed=True)
    if kind == "slurm":
        from datatrove.executor.slurm import SlurmPipelineExecutor

        opts = dict(recipe.executor.slurm)
        missing = [k for k in ("partition", "time") if k not in opts]
        if missing:
            raise ConfigError(f"recipe field executor.slurm: --executor slurm needs {', '.join(missing)} "
                              f"(e.g. partition = \"cpu\", time = \"04:00:00\")")
        opts.setdefault("job_name", f"curate_{p.name}")
        try:
            return SlurmPipelineExecutor(p.steps, tasks=p.tasks, logging_dir=logging_dir, depends=depends, **opts)
        except TypeError as e:
            raise ConfigError(f"recipe field executor.slurm: {e}") from None
    from datatrove.executor.ray import RayPipelineExecutor

    opts = {k: v for k, v in recipe.executor.ray.items() if k != "address"}
    opts.setdefault("workers", workers)
    try:
        return RayPipelineExecutor(p.steps, tasks=p.tasks, logging_dir=logging_dir, **opts)
    except TypeError as e:
        raise ConfigError(f"recipe field executor.ray: {e}") from None


def _incomplete(layout: Layout, p: Pass) -> int:
    done = Path(layout.logs(p.name)) / "completions"
    return sum(1 for r in range(p.tasks) if not (done / f"{r:05d}").is_file())


def _check_not_empty(layout: Layout, p: Pass) -> None:
    """After a local pass: stop with a clear error if a stage of it left no document."""
    for stage in p.stages:
        merged = load_meters(layout.meters, stage)
        if stage == "source":
            if merged["documents"] == 0:
                skipped = {k.removeprefix("skipped_"): v for k, v in merged.items()
                           if k.startswith("skipped_") and v}
                raise DataError(f"no documents could be read from the {merged['files']} input files"
                                + (f" (skipped: {skipped})" if skipped else ""))
            continue
        if merged["in"]["docs"] > 0 and merged["out"]["docs"] == 0:
            top = ", ".join(f"{r}: {n}" for r, n in sorted(merged["reasons"].items(), key=lambda x: -x[1])[:4])
            raise DataError(f"stage {stage} removed every document ({merged['in']['docs']} in; {top}); "
                            f"loosen it in the recipe or set {stage}.enabled = false")


def _publish(layout: Layout, prefix: str) -> list[str]:
    """Move the final shards into OUT (one rename each), so OUT holds a corpus only once it is complete."""
    staged = Path(layout.work("final"))
    for shard in sorted(staged.glob(f"{prefix}*")) if staged.is_dir() else []:
        os.replace(shard, layout.out / shard.name)
    return sorted(p.name for p in layout.out.glob(f"{prefix}*") if p.is_file())


def _slurm_jobs_alive(job_ids: list[str]) -> bool | None:
    """Whether any of the jobs is still queued or running; ``None`` if squeue cannot say."""
    import subprocess

    try:
        done = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def _submit_slurm(layout: Layout, passes: list[Pass], workers: int, recipe: Recipe) -> dict[str, Any]:
    """Submit the incomplete passes as a chain of dependent job arrays, unless an earlier submission of
    this output folder is still queued or running (resubmitting would run its tasks twice)."""
    marker = layout.root / "slurm_submitted.json"
    status = {"submitted": True, "out": str(layout.out), "passes": [p.name for p in passes]}
    if marker.is_file():
        earlier = json.loads(marker.read_text())
        if earlier.get("job_ids") and _slurm_jobs_alive(earlier["job_ids"]):
            return {**status, "still_running": earlier["job_ids"]}
    executors, previous = [], None
    for p in passes:
        previous = _executor("slurm", p, layout, workers, recipe, depends=previous)
        executors.append(previous)
    previous.run()  # launches its dependencies first, each after the one before it
    job_ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    write_json(marker, {"time": time.time(), "job_ids": job_ids})
    return {**status, "job_ids": job_ids}


def curate(inputs: Sequence[str] | None, out: str | os.PathLike = DEFAULT_OUT, *, recipe: Recipe | None = None,
           workers: int | None = None, executor: str = "local", eval_sets: Sequence[str] = (),
           overwrite: bool = False, progress: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Curate ``inputs`` (``None``: the embedded standard-library corpus) into ``out``; returns the report.
    ``progress(pass_name, message)`` is told when each pass starts and ends. With ``executor="slurm"`` the
    passes are submitted as dependent jobs and the returned report says so; run the same command again
    once they finished to publish the shards and write the report."""
    recipe = recipe or Recipe()
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if eval_sets:
        if not recipe.decontaminate.enabled:
            raise ConfigError("--eval-set given but the recipe sets decontaminate.enabled = false")
        recipe = replace(recipe, decontaminate=replace(
            recipe.decontaminate, eval_sets=tuple(dict.fromkeys([*recipe.decontaminate.eval_sets, *eval_sets]))))
    recipe.validate_local_files()
    if recipe.quality.enabled:
        build_prose_filters(recipe.quality)  # a bad filter argument fails here, not in every worker
    if executor == "ray":
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'frugallm[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=recipe.executor.ray.get("address"), ignore_reinit_error=True)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    progress = progress or (lambda name, msg: None)

    out_path = Path(out)
    layout, plan, resumed = _prepare(out_path, inputs, recipe, workers, overwrite)
    passes = build_passes(layout, recipe, plan["tasks"])
    timings_path = layout.root / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    started = time.perf_counter()

    from datatrove.utils.logging import setup_default_logger
    from loguru import logger

    saved_stderr = sys.stderr
    try:
        logger.remove()  # the parent's datatrove messages would interleave with our progress lines
        if executor == "slurm" and any(_incomplete(layout, p) for p in passes):
            return _submit_slurm(layout, passes, workers, recipe)
        for i, p in enumerate(passes, 1):  # with slurm, all passes completed: only report below
            todo = _incomplete(layout, p)
            label = f"[{i}/{len(passes)}] {p.name}"
            if todo == 0:
                progress(p.name, f"{label}: done earlier, skipped")
            else:
                progress(p.name, f"{label}: {todo} of {p.tasks} tasks ...")
                t0 = time.perf_counter()
                sys.stderr = _Discard()
                try:
                    _executor(executor, p, layout, workers, recipe).run()
                finally:
                    sys.stderr = saved_stderr
                timings[p.name] = timings.get(p.name, 0.0) + time.perf_counter() - t0
                write_json(timings_path, timings)
                if _incomplete(layout, p):
                    raise DataError(f"pass {p.name}: {_incomplete(layout, p)} tasks did not complete; "
                                    f"see {layout.logs(p.name)}/logs and run the command again to resume")
                progress(p.name, f"{label}: {timings[p.name]:.1f} s")
            _check_not_empty(layout, p)
    finally:
        sys.stderr = saved_stderr
        setup_default_logger()
    shards = _publish(layout, recipe.run.shard_prefix)
    report = merge_report(layout, recipe, passes, plan, timings, shards, resumed=resumed, inputs=inputs,
                          executor=executor, workers=workers,
                          wall_seconds=time.perf_counter() - started)
    if report["output"]["documents"] == 0:
        raise DataError(f"stage {report['emptied_by']} removed every document; loosen it in the recipe")
    write_report(layout.root, report)
    return report

