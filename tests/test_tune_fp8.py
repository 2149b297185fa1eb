"""LoRA over a frozen FP8 base (the published e4m3 + 128x128 ``weight_scale_inv`` layout): it tracks LoRA
over the dequantized copy within FP8's error, holds no high-precision copy of the base weights (counted in
bytes), and merges back to the FP8 layout with the requantization error printed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from frugallm.cli import main
from frugallm.config import ModelConfig
from frugallm.data.tokenizer import save_tokenizer, train_tokenizer
from frugallm.model import build_model
from frugallm.model.hf import from_pretrained, save_pretrained
from frugallm.precision.frozen import (
    FrozenFp8Experts,
    FrozenFp8Linear,
    requantize_blocks,
    tensor_bytes_by_dtype,
)
from frugallm.precision.quant import Fp8Tensor, dequantize
from frugallm.rundir import load_model
from frugallm.tune.finetune import FinetuneConfig, FineTuner
from test_tune_finetune import EOS, rows, train_cfg

# whole 128-blocks in the hidden dim, a partial one in the experts' width: both layouts of the frozen experts
CFG = ModelConfig(vocab_size=320, hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=2, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, moe_intermediate_size=64, n_group=2, topk_group=1,
                  first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=128)


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8base")
    tok = train_tokenizer([json.dumps(r) for r in rows(64)] * 4, CFG.vocab_size)
    save_tokenizer(tok, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    save_pretrained(build_model(CFG, seed=5), root / "hf", fp8_blocks=True,
                    extra_files={"tokenizer.json": root / "tokenizer.json",
                                 "tokenizer_config.json": root / "tokenizer_config.json"})
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(64)) + "\n")
    return root / "hf", str(data)


def run(base, data, out, fp8_base):
    ft = FinetuneConfig(base=str(base), data=[data], lora_rank=4, lora_alpha=8.0, val_fraction=0.2,
                        fp8_base=fp8_base)
    tuner = FineTuner(ft, train_cfg(max_steps=6, mtp_lambda=0.0), out, progress=False)
    return tuner, tuner.run()


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(fp8_base, tmp_path_factory):
    base, data = fp8_base
    root = tmp_path_factory.mktemp("fp8runs")
    return run(base, data, root / "keep", "auto"), run(base, data, root / "deq", "dequantize")


def test_lora_over_fp8_tracks_lora_over_its_dequantized_copy(runs) -> None:
    (_, keep), (_, deq) = runs
    a, b = losses(keep.run_dir), losses(deq.run_dir)
    assert len(a) == len(b) == 6
    # e4m3 activation tiles carry ~2^-4 relative error per element, averaging out over the K-long dot
    # products; the losses of the two runs agree to well under 1%, and the loss falls in both
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) / y < 5e-3, (a, b)
    assert a != b  # the FP8 path really ran: its rounding shows
    assert keep.final["val_loss"] < keep.final["val_loss_before"]


def test_fp8_run_holds_no_high_precision_copy_of_the_base(runs, fp8_base) -> None:
    (keep_tuner, _), (deq_tuner, _) = runs
    frozen = [m for m in keep_tuner.model.modules() if isinstance(m, FrozenFp8Linear | FrozenFp8Experts)]
    assert frozen and any(isinstance(m, FrozenFp8Experts) for m in frozen)
    stored = {}
    files = list(fp8_base[0].glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                t = fh.get_slice(name)
                stored[name] = (t.get_dtype(), t.get_shape())
    e4m3 = sum(torch.Size(shape).numel() for dt, shape in stored.values() if dt == "F8_E4M3")
    scales = sum(4 * torch.Size(shape).numel() for name, (_, shape) in stored.items() if name.endswith("_scale_inv"))
    kept, deq = tensor_bytes_by_dtype(keep_tuner.model), tensor_bytes_by_dtype(deq_tuner.model)
    assert kept[torch.float8_e4m3fn] == e4m3 > 0  # the checkpoint's bytes, once
    # the float32 bytes are the dequantized run's less 4 bytes per e4m3 weight, plus the block scales
    assert kept[torch.float32] == deq[torch.float32] - 4 * e4m3 + scales
    assert torch.float8_e4m3fn not in deq


def test_merge_requantizes_to_the_fp8_layout(runs, tmp_path, capsys) -> None:
    (_, keep), _ = runs
    assert main(["merge", str(keep.run_dir), "--out", str(tmp_path / "merged"), "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    merged = from_pretrained(tmp_path / "merged").state_dict()  # dequantized on load
    served = load_model(keep.run_dir)[0].state_dict()  # base + adapters, merged in float32
    checked = 0
    for name, w in served.items():
        if not (w.is_floating_point() and w.dim() >= 2) or "embed" in name or "lm_head" in name or "gate.weight" in name:
            assert torch.equal(merged[name], w), name  # kept in high precision
            continue
        # each merged weight is the served one rounded once to e4m3 in its 128x128 blocks, as the published
        # layout stores it: the routed experts' gate and up each in blocks of their own, expert by expert
        parts = w.chunk(2, dim=1) if name.endswith("experts.gate_up_proj") else (w,)
        back = torch.cat([dequantize(Fp8Tensor(*requantize_blocks(p), (128, 128))) for p in parts], dim=1)
        torch.testing.assert_close(merged[name], back, rtol=0, atol=0)
        assert 0 < ((back - w).norm() / w.norm()).item() < 2**-4, name
        checked += 1
    assert checked >= 10
