"""``frugallm rl`` end to end on a micro base: the engine's log-probabilities equal the trainer's, the LoRA
reference is the base with adapters off, updates reach the engine in memory, a user task through the CLI,
interrupt and resume equal to one run, and bad settings refused with the field named."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm.cli import main
from frugallm.data.tokenizer import save_tokenizer, train_tokenizer
from frugallm.errors import ConfigError
from frugallm.model import build_model
from frugallm.model.hf import save_pretrained
from frugallm.rl.grpo import token_logprobs
from frugallm.rl.rollout import policy_batch, rollout_engine, sample_groups
from frugallm.rl.trainer import GRPOTrainer, RLConfig
from frugallm.serve.engine import Engine, EngineConfig
from frugallm.train.config import TrainConfig
from frugallm.tune.finetune import FinetuneConfig
from frugallm.tune.lora import LoraConfig, adapters_off, apply_lora, lora_modules
from shapes import MICRO

pytestmark = pytest.mark.usefixtures("one_thread")
EOS = "<|endoftext|>"
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
REWARD = "def score(row, completion):\n    return len(set(completion.split())) / 8 + (row['word'] in completion)\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlbase")
    texts = [f"say {w} {i} {w} {w}" for i in range(40) for w in WORDS]
    tok = train_tokenizer(texts, MICRO.vocab_size)
    save_tokenizer(tok, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    save_pretrained(build_model(MICRO, seed=3), root / "hf",
                    extra_files={"tokenizer.json": root / "tokenizer.json",
                                 "tokenizer_config.json": root / "tokenizer_config.json"})
    return root / "hf"


@pytest.fixture(scope="module")
def user_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("rltask")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"say {w} {i}", "word": w}) + "\n"
                                                for i in range(6) for w in WORDS))
    (root / "reward_fn.py").write_text(REWARD)
    return str(root / "prompts.jsonl"), f"{root / 'reward_fn.py'}:score"


def trainer(base, user_task, out, *, steps=4, resume=False, **rl):
    task, reward = user_task
    ft = FinetuneConfig(base=str(base), lora_rank=4, lora_alpha=8.0)
    cfg = RLConfig(task=task, reward=reward, group_size=4, prompts_per_step=2, max_new_tokens=6, heldout=4, **rl)
    tcfg = TrainConfig(lr=5e-2, warmup_steps=0, weight_decay=0.0, batch_size=8, seq_len=64, balance_alpha=0.0,
                       mtp_lambda=0.0, time_budget_s=None, max_steps=steps, log_every=1, eval_every_s=1e9,
                       checkpoint_every_s=1e9, precision="fp32", device="cpu", decay_fraction=0.0)
    return GRPOTrainer(ft, cfg, tcfg, out, resume=resume, progress=False)


def test_engine_logprobs_equal_the_trainers_recomputation():
    """GRPO's ratio is meaningless unless pi_old from the engine equals the trainer's log pi on the same
    weights: float32, within 1e-4, LoRA on (with non-zero B) and MTP drafting on."""
    torch.manual_seed(0)
    model = build_model(MICRO, seed=5)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    engine = Engine(model, None, EngineConfig(block_size=8, cache_memory=1 << 22, max_batch=16))
    prompts = [[5, 9, 17, 3, 44, 2, 8, 11, 60, 7], [12, 13, 14]]
    ro = sample_groups(engine, prompts, 4, max_new_tokens=10, temperature=1.0, seed=1)
    assert ro.stats["prefix_cache_hit_rate"] > 0  # the group shares its prompt's first block
    batch = policy_batch(ro, list(range(len(ro.group))))
    model.train()
    with torch.no_grad():
        logp = token_logprobs(model(batch.input_ids)[:, :-1], batch.targets)
    m = batch.mask.bool()
    assert int(m.sum()) == ro.completion_tokens
    assert float((logp[m] - batch.old_logprobs[m]).abs().max()) < 1e-4


def test_reference_is_the_base_with_adapters_off_and_updates_reach_the_engine():
    torch.manual_seed(0)
    model = build_model(MICRO, seed=5).eval()
    ids = torch.tensor([[5, 9, 17, 3, 44, 2]])
    with torch.no_grad():
        plain = model(ids)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.1) if hasattr(m, "lora_B") else None
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05)
        adapted = model(ids)
        with adapters_off(model):
            off = model(ids)
        again = model(ids)
    assert float((off - plain).abs().max()) < 1e-5  # the reference needs no copy of the weights
    assert float((adapted - plain).abs().max()) > 1e-3 and torch.equal(again, adapted)
    engine = Engine(model, None, EngineConfig(block_size=8, cache_memory=1 << 22))
    from frugallm.serve.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=1, temperature=0, logprobs=0)
    (before,) = engine.generate([ids[0].tolist()], greedy)
    with torch.no_grad():  # an "update" in place, as the optimizer makes
        for _, m in lora_modules(model):
            for p in m.parameters():
                if p.requires_grad:
                    p.mul_(-3)
        expect = torch.log_softmax(model(ids)[0, -1], -1)
    engine.weights_updated()
    (after,) = engine.generate([ids[0].tolist()], greedy)
    assert after.logprobs[0].logprob == pytest.approx(float(expect[after.token_ids[0]]), abs=1e-4)
    assert after.logprobs[0].logprob != pytest.approx(before.logprobs[0].logprob, abs=1e-4)


def test_user_task_through_the_cli(base, user_task, tmp_path, capsys):
    task, reward = user_task
    out = tmp_path / "rl"
    code = main(["rl", "--from", str(base), "--task", task, "--reward", reward, "--max-steps", "3", "--out", str(out),
                 "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "6", "--heldout", "4",
                 "--lr", "5e-2", "--device", "cpu", "--precision", "fp32", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out greedy accuracy" in text
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward_mean" in r]
    assert len(steps) == 3
    for key in ("reward_std", "all_equal_groups", "response_length", "kl", "clip_fraction", "rollout_tokens_per_s",
                "prefix_cache_hit_rate", "tokens_per_s"):
        assert key in steps[0], key
    assert any(r["trained_sequences"] > 0 for r in steps)  # graded rewards: groups carry signal
    assert "heldout_accuracy_before" in recs[0]
    assert (out / "reward.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "cost.json").is_file()
    # the result serves like any LoRA run
    from frugallm.rundir import load_model

    served, _ = load_model(out)
    assert served.config.vocab_size == MICRO.vocab_size


def test_interrupt_and_resume_equals_one_run(base, user_task, tmp_path):
    one = trainer(base, user_task, tmp_path / "one", steps=4)
    one.run()
    split_run = trainer(base, user_task, tmp_path / "two", steps=4)
    assert split_run.run(stop_after_step=2).interrupted
    resumed = trainer(base, user_task, tmp_path / "two", steps=4, resume=True)
    resumed.run()

    def curve(run):
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["reward_mean"], r["loss"]) for r in recs if "reward_mean" in r]

    a, b = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert any(loss != 0 for _, _, loss in a)  # it trained: the comparison is not of idle runs
    assert [s for s, _, _ in a] == [1, 2, 3, 4] and [s for s, _, _ in b] == [1, 2, 3, 4]
    for (_, ra, la), (_, rb, lb) in zip(a, b, strict=True):
        assert ra == pytest.approx(rb, abs=1e-6) and la == pytest.approx(lb, abs=1e-5)


def test_kl_to_the_lora_reference_grows_once_the_policy_moves(base, user_task, tmp_path):
    run = trainer(base, user_task, tmp_path / "kl", steps=3, kl_coef=0.05, epochs=2)
    run.run()
    assert run.ref_model is None  # LoRA: the reference is the base, adapters off
    recs = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in recs if "kl" in r and r.get("trained_sequences")]
    assert kls and max(kls) > 0


def test_bad_settings_name_the_field(base, user_task, tmp_path):
    task, reward = user_task
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(task=task, group_size=1)
    with pytest.raises(ConfigError, match="temperature"):
        RLConfig(task=task, temperature=0)
    with pytest.raises(ConfigError, match="--reward"):
        trainer(base, (task, None), tmp_path / "x").run()
    with pytest.raises(ConfigError, match="not a built-in task"):
        trainer(base, ("sudoku", None), tmp_path / "y").run()
    assert main(["rl", "--task", "arithmetic"]) == 2  # no --from
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    assert main(["rl", "--from", str(base), "--task", str(bad), "--reward", reward, "--out", str(tmp_path / "z")]) == 2


def test_one_update_moves_probability_toward_the_better_samples(base, user_task, tmp_path):
    """The direction of GRPO's step: after a small gradient step on one rollout batch, the sequences with a
    positive advantage gained log-probability against those with a negative one (to first order the
    advantage-weighted gain is N times the loss's fall, so plain SGD with a small step, not Adam's sign-like
    first step, is the exact check)."""
    from frugallm.rl.grpo import group_advantages

    tr = trainer(base, user_task, tmp_path / "dir", steps=1)
    corpus = tr._start()
    model = tr._build()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    idx = tr.make_loader(corpus).next_batch()
    model.eval()
    ro = sample_groups(tr.engine, [corpus.train_ids[i] for i in idx], 4, max_new_tokens=6, temperature=1.0, seed=0)
    rewards = torch.tensor(corpus.task.rewards([corpus.task.train[idx[g]] for g in ro.group], ro.texts)).view(2, 4)
    adv = group_advantages(rewards).flatten()
    assert adv.abs().sum() > 0
    batch = policy_batch(ro, list(range(len(ro.group))))
    model.train()

    def seq_logp():
        with torch.no_grad():
            return (token_logprobs(model(batch.input_ids)[:, :-1], batch.targets) * batch.mask).sum(1)

    before = seq_logp()
    parts = tr._micro_loss(model, batch, slice(0, len(ro.group)), adv, None, float(batch.mask.sum()), len(ro.group))
    parts.loss.backward()
    opt.step()
    gained = seq_logp() - before
    assert float(gained.abs().max()) > 1e-4  # the step moved the policy measurably
    assert float((adv * gained).sum()) > 0
    assert float(gained[adv > 0].mean()) > float(gained[adv < 0].mean())


def test_rollouts_and_logprobs_over_a_frozen_fp8_base(tmp_path):
    """LoRA over the published FP8 layout kept in e4m3 (what `frugallm rl --from` an FP8 checkpoint trains):
    the rollout engine samples from the frozen-FP8 model and its log-probabilities equal the trainer's
    recomputation on the same modules, as over a float base."""
    from frugallm.model.hf import from_pretrained
    from frugallm.precision.frozen import FrozenFp8Linear

    save_pretrained(build_model(MICRO, seed=5), tmp_path / "fp8", fp8_blocks=True)
    model = from_pretrained(tmp_path / "fp8", fp8="keep")
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    assert any(isinstance(m, FrozenFp8Linear) for m in model.modules())
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
    engine = rollout_engine(model, None, sequences=8, longest=32)
    assert engine.config.decode_attention == "expanded"  # kv_b_proj's own FP8 GEMM, as the trainer's
    ro = sample_groups(engine, [[5, 9, 17, 3, 44, 2, 8, 11, 60, 7], [12, 13, 14]], 4, max_new_tokens=8,
                       temperature=1.0, seed=2)
    batch = policy_batch(ro, list(range(len(ro.group))))
    with torch.no_grad():
        logp = token_logprobs(model(batch.input_ids)[:, :-1], batch.targets)
    m = batch.mask.bool()
    assert int(m.sum()) == ro.completion_tokens > 0
    assert float((logp[m] - batch.old_logprobs[m]).abs().max()) < 1e-4
