"""``frugallm finetune`` end to end on a micro base: LoRA and full runs, the base untouched, held-out loss
before and after, interrupt and resume equal to one run, counted malformed rows, eval --data, merge, and
serving the fine-tuned run."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm.cli import main
from frugallm.data.tokenizer import save_tokenizer, train_tokenizer
from frugallm.errors import ConfigError
from frugallm.model import build_model
from frugallm.model.hf import from_pretrained, save_pretrained
from frugallm.rundir import find_model, load_model
from frugallm.train.config import TrainConfig
from frugallm.tune.finetune import FinetuneConfig, FineTuner, evaluate_sft
from shapes import MICRO

EOS = "<|endoftext|>"
WORDS = ["cache", "latent", "expert", "router", "token", "block", "scale", "tile"]


def rows(n: int) -> list[dict]:
    """Conversations with a learnable answer: the assistant repeats the user's word three times."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append({"group": f"g{i}", "messages": [{"role": "user", "content": f"say {w} {i % 5}"},
                                                   {"role": "assistant", "content": f"{w} {w} {w}"}]})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro DeepSeek-V3 (MLA, MoE with shared experts, MTP) saved as a Hugging Face directory with its
    tokenizer, as a user's base would be."""
    root = tmp_path_factory.mktemp("base")
    texts = [json.dumps(r) for r in rows(64)] * 4
    tok = train_tokenizer(texts, MICRO.vocab_size)
    save_tokenizer(tok, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    model = build_model(MICRO, seed=3)
    save_pretrained(model, root / "hf", extra_files={"tokenizer.json": root / "tokenizer.json",
                                                     "tokenizer_config.json": root / "tokenizer_config.json"})
    return root / "hf"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    good = [json.dumps(r) for r in rows(96)]
    bad = ['{"messages": [', json.dumps({"messages": [{"content": "no role"}]}),
           json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]})]
    path = root / "chat.jsonl"
    path.write_text("\n".join(good[:40] + bad + good[40:]) + "\n")
    return str(path)


def train_cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, warmup_steps=0, weight_decay=0.0, batch_size=4, seq_len=64, balance_alpha=0.0,
                time_budget_s=None, max_steps=8, log_every=1, eval_every_s=1e9, checkpoint_every_s=1e9,
                precision="fp32", device="cpu", mtp_lambda=0.3)
    base.update(kw)
    return TrainConfig(**base)


def tune(base, data, out, *, method="lora", steps=8, stop_after=None, resume=False, **ft):
    cfg = FinetuneConfig(base=str(base), data=[data], method=method, lora_rank=4, lora_alpha=8.0, val_fraction=0.2,
                         **ft)
    tuner = FineTuner(cfg, train_cfg(max_steps=steps), out, resume=resume, progress=False)
    return tuner, tuner.run(stop_after_step=stop_after)


@pytest.fixture(scope="module")
def lora_run(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return tune(base, data, out)


def test_lora_run_lowers_held_out_loss_and_leaves_the_base_alone(base, lora_run) -> None:
    tuner, result = lora_run
    f = result.final
    assert f["val_loss"] < f["val_loss_before"] - 0.1, f
    assert 0 < f["trainable_parameters"] < f["total_parameters"] / 5
    run = result.run_dir
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert not (run / "model").exists()  # LoRA exports the adapter, not a copy of the base
    ckpt = next((run / "checkpoints").iterdir())
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert names and all("lora_" in n for n in names), names[:5]  # only the adapters are checkpointed
    # the base directory is unchanged: the fine-tuned model differs from it
    plain = from_pretrained(base).eval()
    tuned = load_model(run)[0].eval()
    ids = torch.randint(0, MICRO.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(ids) - tuned(ids)).abs().max() > 1e-3


def test_router_frozen_and_bias_still_by_default(lora_run, base) -> None:
    tuner, result = lora_run
    recs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("load_max_over_mean" in r for r in recs)  # expert load is reported with the router frozen
    tuned = load_model(result.run_dir)[0]
    plain = from_pretrained(base)
    for a, b in zip(tuned.moe_layers(), plain.moe_layers(), strict=True):
        assert torch.equal(a.gate.weight, b.gate.weight)
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)


def test_malformed_rows_are_counted(lora_run) -> None:
    rep = json.loads((lora_run[1].run_dir / "sft_report.json").read_text())
    assert rep["malformed"] == {"empty_assistant": 1, "missing_role": 1, "not_json": 1}
    assert rep["train_rows"] + rep["val_rows"] == 96


def test_interrupt_and_resume_equals_one_run(base, data, tmp_path, lora_run) -> None:
    whole = lora_run[1]
    out = tmp_path / "resumed"
    _, first = tune(base, data, out, stop_after=3)
    assert first.interrupted and first.step == 3
    _, second = tune(base, data, out, resume=True)
    assert second.step == whole.step

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(out) == losses(whole.run_dir)
    assert second.final["val_loss"] == pytest.approx(whole.final["val_loss"], abs=1e-6)


def test_eval_data_before_and_after(base, data, lora_run, capsys) -> None:
    run = lora_run[1].run_dir
    before = evaluate_sft(base, [data], val_fraction=0.2, seq_len=64)
    after = evaluate_sft(run, [data], seq_len=64)
    assert before["val_tokens"] == after["val_tokens"] > 0  # the same held-out rows
    assert after["val_loss"] == pytest.approx(lora_run[1].final["val_loss"], rel=1e-5)
    assert before["val_loss"] == pytest.approx(lora_run[1].final["val_loss_before"], rel=1e-5)
    assert main(["eval", str(run), "--data", data, "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(after["val_loss"], rel=1e-6)


def test_merge_gives_the_model_served(lora_run, tmp_path) -> None:
    run = lora_run[1].run_dir
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = from_pretrained(tmp_path / "merged").eval()
    served = load_model(run)[0].eval()
    ids = torch.randint(0, MICRO.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), served(ids), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_serve_a_fine_tuned_run(lora_run) -> None:
    from frugallm.serve.engine import Engine
    from frugallm.serve.loading import load_for_serving
    from frugallm.serve.sampling import SamplingParams

    run = lora_run[1].run_dir
    assert find_model(run).kind == "adapter"
    model, codec = load_for_serving(run)
    assert "<|assistant|>" in codec.render_chat([{"role": "user", "content": "say cache 1"}])
    ids = codec.encode(codec.render_chat([{"role": "user", "content": "say cache 1"}]), add_special_tokens=False)
    out = Engine(model, codec).generate([ids], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert out.token_ids


def test_full_fine_tuning_exports_the_model(base, data, tmp_path) -> None:
    _, result = tune(base, data, tmp_path / "full", method="full", steps=4)
    assert result.final["trainable_parameters"] < result.final["total_parameters"]  # the router stays frozen
    assert (result.run_dir / "model" / "config.json").is_file()
    assert not (result.run_dir / "adapter").exists()
    assert find_model(result.run_dir).kind == "export"


def test_bad_settings_name_the_field(base) -> None:
    with pytest.raises(ConfigError, match="fp8_base"):
        FinetuneConfig(base=str(base), method="full", fp8_base="keep")
    with pytest.raises(ConfigError, match="lora_rank"):
        FinetuneConfig(base=str(base), lora_rank=0)
    assert main(["finetune", "--data", "x.jsonl"]) == 2  # no --from


def test_bias_update_switched_on_moves_and_is_kept(base, data, tmp_path) -> None:
    _, result = tune(base, data, tmp_path / "bias", steps=3, update_bias=True)
    assert (result.run_dir / "expert_bias.safetensors").is_file()
    tuned, plain = load_model(result.run_dir)[0], from_pretrained(base)
    moved = [not torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
             for a, b in zip(tuned.moe_layers(), plain.moe_layers(), strict=True)]
    assert all(moved)
