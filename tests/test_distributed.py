"""Scale-out on torch.distributed, on the CPU with gloo: 2 processes (dp=2, and dp=1 x ep=2) train exactly as
1 process does on the same global batch, checkpoints resume across world sizes, a failing rank stops the job.

The model is a micro DeepSeek-V3 (hidden 48, 2 layers, 8 routed experts, MTP) rather than the ``tiny`` preset:
three 20-step runs of ``tiny`` plus the resume runs would take several minutes on two cores, and nothing in
the distributed path depends on the width. Multi-process runs are spawned on 127.0.0.1 with a free port and
a deadline, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from frugallm.config import ModelConfig
from frugallm.errors import ConfigError
from frugallm.train.config import TrainConfig
from frugallm.train.distributed import check_expert_parallel, mesh_shape
from frugallm.train.metrics import read_metrics
from shapes import MICRO

STEPS = 20
TOL = 1e-5  # the bound on every step's loss
DEADLINE_S = 150.0


# ----- helpers ---------------------------------------------------------------------------------------------
def _cfg(corpus_dir: Path, **kw) -> TrainConfig:
    base = dict(data=[str(corpus_dir)], seq_len=32, batch_size=8, precision="fp32", time_budget_s=None,
                max_steps=STEPS, warmup_steps=2, log_every=1, eval_every_s=1e9, checkpoint_every_s=1e9,
                eval_windows=4, lr=3e-3, val_fraction=0.05, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str, resume: bool = False,
           stop_after_step: int | None = None) -> None:
    from frugallm.train.loop import Trainer

    Trainer(model_cfg, cfg, run_dir, resume=resume, progress=False).run(stop_after_step=stop_after_step)


def _worker(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), FRUGALLM_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world: int, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run fn(*args) on ``world`` local processes under a gloo process group; fail, not hang, past the deadline."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world} processes did not finish in {deadline_s:.0f} s")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _biases(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "model" / "model.safetensors")).items()
            if k.endswith("e_score_correction_bias")}


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the runs here set 1 thread, like each spawned rank


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")  # runs side by side share the prepared corpus in .cache/


def _scenarios(corpus_dir: Path, runs: dict[str, Path]) -> None:
    """Every 2-process run, in one spawn (each process start costs seconds of imports)."""
    import shutil

    import torch.distributed as dist

    timings = {}
    for name, kw, resume, stop in (("dp2", {}, False, None), ("ep2", {"ep": 2}, False, None),
                                   ("cut2", {"ep": 2}, False, 10), ("cut1", {"ep": 2}, True, None)):
        t0 = time.perf_counter()
        _train(MICRO, _cfg(corpus_dir, **kw), str(runs[name]), resume, stop)
        timings[name] = time.perf_counter() - t0
        if name == "cut2":  # the same ep=2 checkpoint, resumed below at dp=2 and, by the test, at 1 process
            if dist.get_rank() == 0:
                shutil.copytree(runs["cut2"], runs["relayout"])
            dist.barrier()
    t0 = time.perf_counter()
    _train(MICRO, _cfg(corpus_dir), str(runs["relayout"]), True)
    timings["relayout"] = time.perf_counter() - t0
    if dist.get_rank() == 0:
        (runs["ref"].parent / "timings.json").write_text(json.dumps(timings))


@pytest.fixture(scope="module")
def runs(corpus_dir, root) -> dict[str, Path]:
    """ref: 1 process, 20 steps, the run every layout must reproduce; dp2 and ep2: the same on 2 processes;
    cut1 / cut2: cut after step 10 on 1 process / on dp=1 x ep=2, then resumed on the other world size;
    relayout: cut2's checkpoint resumed on dp=2."""
    runs = {name: root / name for name in ("ref", "dp2", "ep2", "cut1", "cut2", "relayout")}
    t0 = time.perf_counter()
    _train(MICRO, _cfg(corpus_dir), str(runs["ref"]))
    _train(MICRO, _cfg(corpus_dir), str(runs["cut1"]), stop_after_step=10)  # model.safetensors + optimizer.pt
    t1 = time.perf_counter()
    spawn(_scenarios, 2, corpus_dir, runs)
    print(f"\none process: {t1 - t0:.1f} s; one spawn of 2 processes: {time.perf_counter() - t1:.1f} s "
          f"{json.loads((root / 'timings.json').read_text())}")
    return runs


def _assert_same_run(run: Path, ref: Path, steps: range) -> float:
    a, b = _losses(run), _losses(ref)
    assert [s for s in steps if s in a] == list(steps), sorted(a)
    diff = max(abs(a[s] - b[s]) for s in steps)
    assert diff <= TOL, {s: (a[s], b[s]) for s in steps}
    return diff


def _assert_same_biases(run: Path, ref: Path) -> float:
    ref_bias, bias = _biases(ref), _biases(run)
    assert ref_bias.keys() == bias.keys() and len(bias) == 2  # the MoE layer's and the MTP block's
    for k in bias:
        torch.testing.assert_close(bias[k], ref_bias[k], rtol=0, atol=1e-7)
    assert any(b.abs().max() > 0 for b in bias.values())  # the bias did move
    return max(float((bias[k] - ref_bias[k]).abs().max()) for k in bias)


# ----- layout and validation ---------------------------------------------------------------------------------
def test_mesh_shape_and_expert_parallel_errors_name_the_problem() -> None:
    assert mesh_shape(4, ep=2) == (2, 2)
    assert mesh_shape(2) == (2, 1)
    with pytest.raises(ConfigError, match="world size 3 is not divisible by ep=2"):
        mesh_shape(3, ep=2)
    with pytest.raises(ConfigError, match=r"dp=3 x ep=2"):
        mesh_shape(4, dp=3, ep=2)
    with pytest.raises(ConfigError, match="more expert-parallel ranks than the model has routed experts"):
        check_expert_parallel(MICRO, 16)
    with pytest.raises(ConfigError, match="not divisible by ep=3"):
        check_expert_parallel(MICRO, 3)
    with pytest.raises(ConfigError, match="dense FFN"):
        check_expert_parallel(MICRO.replace(ffn="dense"), 2)
    with pytest.raises(ConfigError, match="ep must be"):
        TrainConfig(ep=0)


def test_one_process_refuses_ep2(corpus_dir, tmp_path, monkeypatch) -> None:
    from frugallm.train.loop import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="world size 1 is not divisible by ep=2"):
        Trainer(MICRO, _cfg(corpus_dir, ep=2), tmp_path / "r", progress=False)


def test_group_limited_routing_bounds_the_ranks_a_token_reaches() -> None:
    from frugallm.config import preset
    from frugallm.model.moe import Router
    from frugallm.train.expert_parallel import max_ranks_per_token, ranks_reached

    v3 = preset("deepseek-v3")  # 256 experts in 8 groups, 4 kept: one group per node of 32 experts
    assert max_ranks_per_token(v3, 8) == 4
    assert max_ranks_per_token(v3, 64) == 8  # groups span 8 ranks each: k bounds it first
    assert max_ranks_per_token(MICRO, 2) == 1  # 2 groups on 2 ranks, topk_group 1
    router = Router(MICRO)
    torch.nn.init.normal_(router.weight, std=1.0)
    route = router(torch.randn(512, MICRO.hidden_size))
    assert int(ranks_reached(route.indices, MICRO.n_routed_experts // 2).max()) == 1
    free = Router(MICRO.replace(n_group=1, topk_group=1))
    torch.nn.init.normal_(free.weight, std=1.0)
    assert int(ranks_reached(free(torch.randn(512, MICRO.hidden_size)).indices, 4).max()) == 2


# ----- equivalence with one process ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["dp2", "ep2"])
def test_two_processes_train_as_one(layout, runs) -> None:
    run, ref = runs[layout], runs["ref"]
    diff = _assert_same_run(run, ref, range(1, STEPS + 1))
    bias_diff = _assert_same_biases(run, ref)
    # the export gathered every shard to rank 0: the whole model matches the single-process one
    ref_w = load_file(str(ref / "model" / "model.safetensors"))
    w = load_file(str(run / "model" / "model.safetensors"))
    assert ref_w.keys() == w.keys()
    for k in w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=2e-4, msg=k)
    weights_diff = max(float((w[k] - ref_w[k]).abs().max()) for k in w)
    print(f"\n{layout}: max |loss - one process| over {STEPS} steps = {diff:.2e}; expert bias {bias_diff:.1e}; "
          f"exported weights {weights_diff:.1e}")


def _gradients_on_a_2x2_mesh(model_cfg: ModelConfig) -> None:
    """On each of 4 ranks (dp=2 x ep=2): the sharded model's gradients on its quarter of a batch, gathered,
    against one unsharded model's on the whole batch, computed in the same process; then again with every
    token routed to one ep rank's experts."""
    from frugallm.model import build_model
    from frugallm.train.distributed import Dist

    dist = Dist.from_env(ep=2)
    assert (dist.dp, dist.ep) == (2, 2)
    tokens = torch.randint(0, model_cfg.vocab_size, (8, 20), generator=torch.Generator().manual_seed(0))

    def objective(out) -> torch.Tensor:
        return out.loss + torch.stack(out.mtp_losses).sum() + out.balance_loss

    ref = build_model(model_cfg, seed=0)
    model = dist.parallelize(build_model(model_cfg, seed=0))
    for skewed in (False, True):
        if skewed:  # every token picks experts 0-3: ep rank 1 receives nothing and must still run backward
            for m in (ref, model):
                m.zero_grad()
                for moe in m.moe_layers():
                    moe.gate.e_score_correction_bias[:4] += 10.0
        objective(ref(tokens, train=True)).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
        objective(model(tokens[2 * dist.rank:2 * dist.rank + 2], train=True)).backward()
        norm = dist.clip_grad_norm(model, 0.0)  # 0: measure, do not clip
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # AdamW with bf16 moments on the sharded parameters (DTensors) takes the one-process step. A first Adam
    # step is about lr * sign(g): eps = 1e-3 keeps gradients that agree to 1e-7 from flipping it
    from frugallm.train.optim import AdamWLowPrecisionMoments

    for m in (ref, model):
        AdamWLowPrecisionMoments(m.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1).step()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref_params[name], rtol=1e-5, atol=1e-5, msg=name)
    # FP8 GEMMs on the same mesh (expert-parallel FP8 experts, FSDP2): the sharded model quantizes its weights
    # again in the backward instead of keeping whole e4m3 copies, and its gradients are the one-process FP8
    # gradients up to FP8 rounding (the ranks' token tiles for the weight gradients start elsewhere)
    from frugallm.precision import Fp8Linear, Fp8Recipe, convert_to_fp8

    recipe = Fp8Recipe(backend="emulated")
    ref = convert_to_fp8(build_model(model_cfg, seed=0), recipe)
    model = dist.parallelize(convert_to_fp8(build_model(model_cfg, seed=0), recipe))
    recipes = [m.recipe for m in model.modules() if hasattr(m, "recipe")]
    assert any(isinstance(m, Fp8Linear) for m in model.modules()) and len(recipes) > 10
    assert not any(r.cache_weights for r in recipes)
    objective(ref(tokens, train=True)).backward()
    objective(model(tokens[2 * dist.rank:2 * dist.rank + 2], train=True)).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    got = torch.cat([p.grad.full_tensor().flatten() for _, p in model.named_parameters()])
    want = torch.cat([ref_grads[n].flatten() for n, _ in model.named_parameters()])
    assert float((got - want).norm() / want.norm()) < 5e-2


def test_gradients_on_a_dp2_x_ep2_mesh() -> None:
    spawn(_gradients_on_a_2x2_mesh, 4, MICRO)


# ----- checkpoints across world sizes ------------------------------------------------------------------------------
def test_resume_two_processes_to_one(corpus_dir, runs) -> None:
    run = runs["cut2"]
    ckpt = run / "checkpoints" / "step_000010"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2 and state["ep"] == 2
    assert (ckpt / ".metadata").is_file() and not list((run / "checkpoints").glob(".step_*"))
    _train(MICRO, _cfg(corpus_dir), str(run), resume=True)  # one process reads the sharded checkpoint
    diff = _assert_same_run(run, runs["ref"], range(1, STEPS + 1))
    bias_diff = _assert_same_biases(run, runs["ref"])
    print(f"\n2 -> 1: max |loss - one process| = {diff:.2e}; expert bias {bias_diff:.1e}")


def test_resume_one_process_to_two(runs) -> None:
    run = runs["cut1"]
    diff = _assert_same_run(run, runs["ref"], range(1, STEPS + 1))
    bias_diff = _assert_same_biases(run, runs["ref"])
    assert json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text())["format"] == "dcp"
    print(f"\n1 -> 2: max |loss - one process| = {diff:.2e}; expert bias {bias_diff:.1e}")


def test_resume_at_another_layout(runs) -> None:
    diff = _assert_same_run(runs["relayout"], runs["ref"], range(1, STEPS + 1))
    bias_diff = _assert_same_biases(runs["relayout"], runs["ref"])
    print(f"\nep=2 -> dp=2: max |loss - one process| = {diff:.2e}; expert bias {bias_diff:.1e}")


# ----- the launcher ---------------------------------------------------------------------------------------------
def _toml(corpus_dir: Path, path: Path, **train) -> Path:
    import tomli_w

    model = {k: v for k, v in MICRO.to_dict().items() if v is not None}
    cfg = {**{k: v for k, v in _cfg(corpus_dir, **train).to_dict().items() if v is not None}}
    path.write_text(tomli_w.dumps({"model": model, "train": {**cfg, "unset": ["time_budget_s"]}}))
    return path


def test_nproc_runs_the_cli_under_torchrun(corpus_dir, root, tmp_path) -> None:
    conf = _toml(corpus_dir, tmp_path / "run.toml", max_steps=3, threads=None)
    out = root / "cli"
    proc = subprocess.run([sys.executable, "-m", "frugallm", "train", "--config", str(conf), "--out", str(out),
                           "--nproc", "2", "--ep", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "FRUGALLM_DIST_TIMEOUT_S": "60", "FRUGALLM_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone prints
    assert "dp=1 x ep=2" in proc.stdout
    assert (out / "model" / "config.json").is_file()
    assert json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())["format"] == "dcp"
    assert max(_losses(out)) == 3


DRIVER = """
import sys
from frugallm.train import distributed
from frugallm.cli import main

calls = {"n": 0}
original = distributed.Dist.all_reduce_sum

def failing(self, t):
    calls["n"] += 1
    if self.rank == 1 and calls["n"] == 3:
        raise RuntimeError("injected failure on this rank")
    return original(self, t)

distributed.Dist.all_reduce_sum = failing
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_stops_the_job_with_its_error(corpus_dir, root, tmp_path) -> None:
    conf = _toml(corpus_dir, tmp_path / "run.toml", max_steps=50, threads=None)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(driver), "train", "--config", str(conf), "--out", str(root / "failing"),
                           "--no-progress"],
                          capture_output=True, text=True, timeout=DEADLINE_S,
                          env={**os.environ, "FRUGALLM_DIST_TIMEOUT_S": "600", "FRUGALLM_NO_PROGRESS": "1"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "frugallm [rank 1/2]: RuntimeError: injected failure on this rank" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120  # stopped by the launcher, far sooner than the 600 s collective timeout
    assert not (root / "failing" / "model").exists()
