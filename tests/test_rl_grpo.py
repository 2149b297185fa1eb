"""GRPO's pieces on hand-made numbers: group advantages, the k3 estimator against exact KL, clipping, the
aggregations, zero gradient from groups whose rewards are all equal; and the built-in tasks' rewards."""

from __future__ import annotations

import math

import pytest
import torch

from frugallm.errors import ConfigError
from frugallm.rl.grpo import GRPOLossConfig, aggregate, group_advantages, informative_groups, k3, policy_loss
from frugallm.rl.tasks import (
    FORMAT_REWARD,
    build_task,
    evaluate_expression,
    split,
    warmup_rows,
)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    a = group_advantages(r, eps=0.0)
    std0 = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert a[0].tolist() == pytest.approx([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0])
    assert a[1].tolist() == [0, 0, 0, 0]
    assert a[2].tolist() == pytest.approx([1 / math.sqrt(2 / 3), -1 / math.sqrt(2 / 3), 0, 0])
    centred = group_advantages(r, scale_std=False)  # Dr. GRPO
    assert centred[2].tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    assert informative_groups(r).tolist() == [True, False, True]


def test_k3_is_an_unbiased_estimate_of_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.softmax(torch.randn(7, generator=g) * 2, 0)
        ref = torch.softmax(torch.randn(7, generator=g) * 2, 0)
        exact = float((p * (p / ref).log()).sum())
        # its expectation under p, over the whole support: exactly KL(p || ref)
        expectation = float((p * k3(p.log(), ref.log())).sum())
        assert expectation == pytest.approx(exact, abs=1e-6)
        # and a Monte Carlo mean of samples from p converges to it
        x = torch.multinomial(p, 200_000, replacement=True, generator=g)
        mc = float(k3(p.log()[x], ref.log()[x]).mean())
        assert mc == pytest.approx(exact, rel=0.05, abs=2e-3)
        assert bool((k3(p.log(), ref.log()) >= 0).all())


def _loss(ratio: float, adv: float, cfg: GRPOLossConfig):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    parts = policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), cfg)
    parts.loss.backward()
    return parts, float(logp.grad)


def test_ratio_clipping_stops_the_gradient_only_beyond_the_trust_region():
    cfg = GRPOLossConfig(clip_low=0.2, clip_high=0.28)
    parts, grad = _loss(1.5, 1.0, cfg)  # above 1 + eps_high with a positive advantage: clipped
    assert grad == 0 and parts.clip_fraction == 1.0
    parts, grad = _loss(1.25, 1.0, cfg)  # inside clip-higher's wider upper bound: trained
    assert grad == pytest.approx(-1.25) and parts.clip_fraction == 0.0
    parts, grad = _loss(0.5, 1.0, cfg)  # below 1 - eps with a positive advantage: min keeps the unclipped term
    assert grad == pytest.approx(-0.5) and parts.clip_fraction == 0.0
    parts, grad = _loss(0.5, -1.0, cfg)  # ... and with a negative one it is clipped
    assert grad == 0 and parts.clip_fraction == 1.0


def test_zero_gradient_when_every_group_is_all_equal():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    adv = group_advantages(rewards).flatten()
    logp = torch.randn(6, 5, requires_grad=True)
    parts = policy_loss(logp, logp.detach() + 0.1, adv, torch.ones(6, 5), GRPOLossConfig())
    parts.loss.backward()
    assert float(logp.grad.abs().max()) == 0.0
    assert not informative_groups(rewards).any()


def test_kl_term_pulls_toward_the_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    cfg = GRPOLossConfig(kl_coef=0.5)
    parts = policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), cfg, ref_logp=torch.tensor([[-1.0, -1.0]]))
    parts.loss.backward()
    assert parts.kl > 0
    assert float(logp.grad[0, 0]) == pytest.approx(0.0, abs=1e-7)  # already equal to the reference there
    assert float(logp.grad[0, 1]) < 0  # the loss falls as log pi rises toward log pi_ref = -1
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), cfg)


def test_aggregations_and_micro_batches_sum_to_the_batch():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(per_token, mask, GRPOLossConfig(aggregation="token-mean"))) == pytest.approx(8 / 5)
    assert float(aggregate(per_token, mask, GRPOLossConfig(aggregation="seq-mean"))) == pytest.approx((1 + 4) / 2)
    dr = GRPOLossConfig(aggregation="dr-grpo", max_new_tokens=10)
    assert float(aggregate(per_token, mask, dr)) == pytest.approx(8 / 20)
    for name in ("token-mean", "seq-mean", "dr-grpo"):
        cfg = GRPOLossConfig(aggregation=name, max_new_tokens=10)
        whole = aggregate(per_token, mask, cfg)
        halves = sum(aggregate(per_token[i : i + 1], mask[i : i + 1], cfg, n_tokens=5.0, n_seqs=2) for i in (0, 1))
        assert float(halves) == pytest.approx(float(whole))
    with pytest.raises(ConfigError, match="aggregation"):
        GRPOLossConfig(aggregation="mean")


# ----- tasks ----------------------------------------------------------------------------------------------
def test_arithmetic_rewards_and_split():
    task = build_task("arithmetic", heldout=32)
    assert len(task.heldout) == 32 and not {r["prompt"] for r in task.heldout} & {r["prompt"] for r in task.train}
    row = next(r for r in task.train if r["op"] == "*" and r["a"] == 7 and r["b"] == 8)
    assert task.rewards([row] * 4, ["Answer: 56", "7 * 8 = 54\nAnswer: 54", "fifty-six", "Answer: 1\nAnswer: 56"]) \
        == [1.0, FORMAT_REWARD, 0.0, 1.0]
    assert split(task.train[:50], 5, seed=1) == split(task.train[:50], 5, seed=1)
    rows = warmup_rows(task, 10)
    assert len(rows) == 10 and rows[0]["messages"][-1]["role"] == "assistant"
    assert all(r["messages"][-2]["content"] not in {h["prompt"] for h in task.heldout} for r in rows)


def test_countdown_checks_the_expression_without_eval():
    nums = [3, 7, 2]
    assert evaluate_expression("(3 + 7) * 2", nums) == 20
    assert evaluate_expression("3 * 3", nums) is None  # 3 offered once
    assert evaluate_expression("__import__('os').system('true')", nums) is None
    assert evaluate_expression("5 + 2", nums) is None
    task = build_task("countdown", heldout=8)
    row = task.train[0]
    assert task.rewards([row, row], [f"Answer: {row['solution']}", "Answer: 1 +"]) == [1.0, 0.0]


def test_python_task_runs_the_asserts_in_the_sandbox():
    task = build_task("python", heldout=8)
    row = next(r for r in task.train if r["name"] == "add_k")
    k = int(row["prompt"].split("plus ")[1].rstrip("."))
    good = f"```python\ndef add_k(x):\n    return x + {k}\n```"
    wrong = "```python\ndef add_k(x):\n    return x\n```"
    cheat = "```python\nimport os\nos._exit(0)\n```"  # exits before the asserts run: no reward
    assert task.rewards([row] * 3, [good, wrong, cheat]) == [1.0, FORMAT_REWARD, 0.0]
    assert task.stats["sandbox_ok"] >= 1 and task.stats["sandbox_failed"] >= 1
