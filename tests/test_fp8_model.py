"""convert_to_fp8 on the tiny DeepSeek-V3 model: exactly the intended GEMMs are converted, what the V3 report
keeps in high precision is untouched, and the converted model's loss, gradients and a short training run
stay close to the unconverted model on the same weights."""

import copy
import textwrap

import pytest
import torch
from torch import nn

from frugallm.config import preset
from frugallm.model import build_model
from frugallm.model.layers import Linear, RMSNorm
from frugallm.model.moe import GroupedExperts, Router
from frugallm.precision import Fp8GroupedExperts, Fp8Linear, Fp8Recipe, convert_to_fp8, fp8_module_names
from shapes import FP8_SHRUNK_TINY

ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _intended(cfg) -> list[str]:
    """The rule, written out: attention projections, dense FFNs, routed experts (grouped), shared experts,
    and the MTP projection; never the output head, embedding, router or norms."""
    names = []
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ATTN]
        if cfg.is_moe_layer(i):
            names += [f"model.layers.{i}.mlp.experts"] + [f"model.layers.{i}.mlp.shared_experts.{p}" for p in MLP]
        else:
            names += [f"model.layers.{i}.mlp.{p}" for p in MLP]
    for d in range(cfg.num_nextn_predict_layers):
        names += [f"model.mtp.{d}.self_attn.{p}" for p in ATTN]
        names += [f"model.mtp.{d}.mlp.experts"] + [f"model.mtp.{d}.mlp.shared_experts.{p}" for p in MLP]
        names += [f"model.mtp.{d}.eh_proj"]
    return names


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset, built once for this file (initialising its 8192-token vocabulary takes seconds)."""
    cfg = preset("tiny")
    return cfg, build_model(cfg)


def test_convert_tiny_converts_exactly_the_intended_modules(tiny):
    cfg, built = tiny
    model = convert_to_fp8(copy.deepcopy(built), Fp8Recipe())
    converted = fp8_module_names(model)
    print(f"\nconverted {len(converted)} modules: {converted}")
    assert sorted(converted) == sorted(_intended(cfg))
    assert type(model.lm_head) is Linear, "the output head stays high precision"
    assert type(model.model.embed_tokens) is nn.Embedding
    kept = {type(m) for n, m in model.named_modules() if n not in converted}
    assert Fp8Linear not in kept and Fp8GroupedExperts not in kept
    leftover_linears = [n for n, m in model.named_modules() if type(m) in (nn.Linear, Linear)]
    assert leftover_linears == ["lm_head"]
    assert not any(type(m) is GroupedExperts for m in model.modules())
    assert sum(isinstance(m, Router) for m in model.modules()) == cfg.n_moe_layers + cfg.num_nextn_predict_layers
    assert all(type(m) is RMSNorm for n, m in model.named_modules() if n.endswith("norm"))


def test_converted_tiny_loss_close_and_backward_works(tiny):
    cfg, built = tiny
    ref = copy.deepcopy(built)
    fp8 = convert_to_fp8(copy.deepcopy(built), Fp8Recipe())
    tokens = torch.randint(0, cfg.vocab_size, (2, 26), generator=torch.Generator().manual_seed(1))
    out_ref, out_fp8 = ref.forward_train(tokens), fp8.forward_train(tokens)
    loss_rel = abs(out_fp8.loss.item() - out_ref.loss.item()) / out_ref.loss.item()
    with torch.no_grad():
        logits_ref, logits_fp8 = ref(tokens[:, :24]), fp8(tokens[:, :24])
    logits_rel = float((logits_fp8 - logits_ref).norm() / logits_ref.norm())
    (out_ref.loss + 0.3 * out_ref.mtp_losses[0]).backward()  # the MTP loss reaches the MTP module
    (out_fp8.loss + 0.3 * out_fp8.mtp_losses[0]).backward()
    ref_params = dict(ref.named_parameters())
    cosines = {}
    for name in fp8_module_names(fp8):
        for pname, p in fp8.get_submodule(name).named_parameters():
            g, g_ref = p.grad, ref_params[f"{name}.{pname}"].grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"{name}.{pname}"
            cosines[f"{name}.{pname}"] = float(torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), 0))
    worst = min(cosines, key=cosines.get)
    print(f"\nloss fp32 {out_ref.loss.item():.4f} fp8 {out_fp8.loss.item():.4f} (relative {loss_rel:.2e}); "
          f"logits relative error {logits_rel:.3f} (4 layers of chained FP8 GEMMs at random init); "
          f"gradient cosine min {cosines[worst]:.3f} ({worst})")
    assert loss_rel < 0.02
    assert logits_rel < 0.3
    assert cosines[worst] > 0.7  # wrong FP8 gradients would be near 0


def test_short_training_run_tracks_the_unconverted_model():
    """A golden-curve-style check that fits CI: 6 AdamW steps on one batch of real text (bytes of a
    standard-library module), a shrunken tiny model, FP32 reference against FP8 emulated; the full
    bf16-vs-fp8 parity over hundreds of steps is benchmarks/fp8_parity.py."""
    cfg = preset("tiny").replace(**FP8_SHRUNK_TINY)
    text = torch.frombuffer(bytearray(open(textwrap.__file__, "rb").read()), dtype=torch.uint8)
    tokens = text[: 8 * 26].long().view(8, 26)  # [B, S + 2]: next token and one MTP depth

    def train(fp8: bool) -> list[float]:
        model = build_model(cfg, seed=0)
        if fp8:
            convert_to_fp8(model, Fp8Recipe(backend="emulated"))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        losses = []
        for _ in range(6):
            out = model.forward_train(tokens)
            opt.zero_grad()
            (out.loss + 0.3 * sum(out.mtp_losses)).backward()
            opt.step()
            losses.append(out.loss.item())
        return losses

    ref, fp8 = train(False), train(True)
    rel = [abs(a - b) / a for a, b in zip(ref, fp8, strict=True)]
    print(f"\nfp32 {[round(x, 3) for x in ref]}\nfp8  {[round(x, 3) for x in fp8]}\nmax relative {max(rel):.4f}")
    assert fp8[-1] < 0.75 * fp8[0], "the FP8 model trains"
    assert max(rel) < 0.03
