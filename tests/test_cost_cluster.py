"""Cluster estimates (frugallm.cost.cluster): parameters add up across stages, bytes and times follow their
formulas, plans are validated."""

from __future__ import annotations

import math

import pytest

from frugallm.config import preset
from frugallm.cost.cluster import (
    ClusterPlan,
    achieved_flops_from_gpu_hours,
    all_to_all_bytes,
    cluster_report,
    load_cluster,
    memory_per_gpu,
    overlap,
    stage_layers,
    stage_params,
)
from frugallm.cost.flops import train_flops_per_token
from frugallm.cost.params import param_counts
from frugallm.errors import ConfigError

V3 = preset("deepseek-v3")


def test_stages_partition_the_layers_and_the_parameters() -> None:
    layers = stage_layers(V3, 16)
    assert [len(r) for r in layers] == [4] * 13 + [3] * 3
    assert layers[0].start == 0 and layers[-1].stop == 61
    for pp in (1, 16):
        assert sum(a + b for a, b in stage_params(V3, pp)) == param_counts(V3).total_with_mtp


def test_memory_on_one_gpu_is_the_plain_count() -> None:
    plan = ClusterPlan(gpus=1, seq_len=128)
    m = memory_per_gpu(V3, plan)["max"]
    n = param_counts(V3).total_with_mtp
    assert m["weights"] == 2 * n and m["grads"] == 4 * n and m["optimizer"] == 8 * n
    fsdp = memory_per_gpu(V3, ClusterPlan(gpus=2048, pp=16, ep=64, sharding="fsdp"))["max"]
    zero1 = memory_per_gpu(V3, ClusterPlan(gpus=2048, pp=16, ep=64))["max"]
    assert fsdp["weights"] < zero1["weights"] and fsdp["optimizer"] == pytest.approx(zero1["optimizer"], rel=0.5)


def test_all_to_all_bytes_and_times() -> None:
    b = all_to_all_bytes(V3, nodes=4)
    assert b["dispatch_per_copy"] == 7168 + 4 * 56  # fp8 elements + one fp32 scale per 128
    assert b["combine_per_copy"] == 2 * 7168
    assert b["forward_ib"] == 4 * (7392 + 14336) and b["forward_nvlink"] == 8 * (7392 + 14336)
    o = overlap(V3, 4096, achieved_flops=400e12, ib_gbs=50, nvlink_gbs=160, nodes=4)
    assert o["comm_ib_us"] == pytest.approx(2 * b["forward_ib"] / 50e9 * 1e6)
    assert o["comm_us"] == max(o["comm_ib_us"], o["comm_nvlink_us"])
    assert 0 < o["comm_over_layer"] < o["comm_over_experts"]


def test_achieved_rate_and_report_from_the_cluster_table() -> None:
    cl = load_cluster("deepseek-v3")
    rate = achieved_flops_from_gpu_hours(V3, 4096, cl["gpu_hours_per_trillion_tokens"])
    assert rate == pytest.approx(1e12 / (180_000 * 3600) * train_flops_per_token(V3, 4096))
    plan = ClusterPlan(gpus=cl["gpus"], pp=cl["pp"], ep=cl["ep"], global_batch=cl["global_batch"], recompute=True)
    rec = cluster_report(V3, plan, ib_gbs=cl["ib_gbs"], nvlink_gbs=cl["nvlink_gbs"], achieved_flops=rate,
                         nodes=cl["max_nodes_per_token"], gpu_memory_gb=80)
    assert rec["memory"]["fits"] and math.isclose(rec["bubble_1f1b"], 15 / 135)


def test_plans_are_validated() -> None:
    with pytest.raises(ConfigError, match="not divisible by pp"):
        ClusterPlan(gpus=100, pp=16)
    with pytest.raises(ConfigError, match="ep=48 must divide"):
        ClusterPlan(gpus=2048, pp=16, ep=48)
    with pytest.raises(ConfigError, match="n_routed_experts=256 is not divisible by ep=3"):
        memory_per_gpu(V3, ClusterPlan(gpus=6, ep=3))
    with pytest.raises(ConfigError, match="sharding"):
        ClusterPlan(gpus=8, sharding="zero2")
