"""Packed supervised fine-tuning on the model side: an example packed with others (``frugallm.tune.sft.pack``)
computes what it computes alone, main and MTP losses and their gradients, on the blocked float32 attention
and on SDPA, MLA and the GQA baseline; padding adds nothing and stays finite; the pretraining path is the
labelled one's special case."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from frugallm.kernels import attention as kattention
from frugallm.kernels import choose, install
from frugallm.kernels.attention import SegmentMask, causal_attention
from frugallm.model import build_model
from frugallm.model.moe import TokenGroups
from frugallm.tune.sft import IGNORE, Example, SFTBatch, pack
from shapes import MICRO

CFG = replace(MICRO, num_nextn_predict_layers=2)  # MLA, MoE (main and MTP blocks), two MTP depths
GQA = replace(CFG, attention="gqa", num_key_value_heads=1)
LENGTHS = (9, 14, 2, 20, 11, 3, 16)  # 2 and 3: the second MTP depth has little or nothing to predict
SEQ = 32
PAD = 0
KERNELS = {k: choose("cpu", "fp32", override=f"attention={k}") for k in ("blocked", "sdpa", "pad-v")}


def examples(seed: int = 0) -> list[Example]:
    """Prompt then completion: the first third of each example untrained, as a chat's user turn."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, CFG.vocab_size, (n,), generator=gen).tolist()
        out.append(Example(ids=ids, mask=[i >= n // 3 for i in range(n)], where=f"synthetic:{n}"))
    return out


def model_for(cfg, kernel: str):
    return build_model(cfg, kernels=KERNELS[kernel], seed=0)


def losses(model, b: SFTBatch, labels: torch.Tensor | None = None):
    out = model.forward_train(b.input_ids, labels=b.labels if labels is None else labels,
                              segment_ids=b.segment_ids, position_ids=b.position_ids, reduction="sum")
    return out, torch.stack([out.loss, *out.mtp_losses])  # [1 + D] summed losses


@pytest.fixture
def blocked_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = kattention._BlockedCausal.apply
    monkeypatch.setattr(kattention._BlockedCausal, "apply", lambda *a: calls.append(1) or real(*a))  # a spy
    return calls


@pytest.mark.parametrize("cfg, kernel", [(CFG, "blocked"), (CFG, "sdpa"), (CFG, "pad-v"), (GQA, "blocked"),
                                         (GQA, "sdpa")], ids=["mla-blocked", "mla-sdpa", "mla-pad-v",
                                                              "gqa-blocked", "gqa-sdpa"])
def test_each_packed_example_loses_what_it_loses_alone(cfg, kernel, blocked_calls) -> None:
    model = model_for(cfg, kernel)
    exs = examples()
    packed = pack(exs, SEQ, PAD)
    assert packed.input_ids.shape[0] < len(exs) and SegmentMask.of(packed.segment_ids) is not None
    out, total = losses(model, packed)
    assert (len(blocked_calls) > 0) == (kernel == "blocked")  # the path the test is about did run
    alone_sum = torch.zeros_like(total)
    at = {}  # an example's ids -> (row, segment id) in the packed batch
    for r in range(packed.input_ids.shape[0]):
        for seg in packed.segment_ids[r].unique().tolist():
            if seg:
                at[tuple(packed.input_ids[r][packed.segment_ids[r] == seg].tolist())] = (r, seg)
    assert len(at) == len(exs)
    for ex in exs:
        _, alone = losses(model, pack([ex], len(ex.ids), PAD))  # its own row, nothing else
        alone_sum += alone
        r, seg = at[tuple(ex.ids)]
        only = torch.full_like(packed.labels, IGNORE)
        only[r] = torch.where(packed.segment_ids[r] == seg, packed.labels[r], IGNORE)
        _, mine = losses(model, packed, only)  # the packed batch trained on this example only
        torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, alone_sum, rtol=1e-5, atol=1e-5)
    assert out.trained_tokens.item() == sum(ex.trained for ex in exs) == (packed.labels != IGNORE).sum()
    assert all(t.item() > 0 for t in out.mtp_trained_tokens)


@pytest.mark.parametrize("kernel", ["blocked", "sdpa"])
def test_packed_gradients_equal_the_sum_alone(kernel) -> None:
    exs = examples(1)
    model = model_for(CFG, kernel)
    losses(model, pack(exs, SEQ, PAD))[1].sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for ex in exs:
        losses(model, pack([ex], len(ex.ids), PAD))[1].sum().backward()
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name  # every parameter learns: the comparison covers them all
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=name)


def test_without_segment_masks_packing_leaks() -> None:
    """The check above can fail: the same packed rows with the segments dropped (causal over the whole row,
    positions running on) lose differently."""
    model = model_for(CFG, "sdpa")
    packed = pack(examples(), SEQ, PAD)
    _, masked = losses(model, packed)
    leaky = model.forward_train(packed.input_ids, labels=packed.labels, reduction="sum")
    assert (leaky.loss - masked[0]).abs() > 1e-3


def test_padding_is_finite_and_adds_nothing() -> None:
    model = model_for(CFG, "blocked")
    packed = pack(examples(2), SEQ, PAD)
    B = packed.input_ids.shape[0]
    _, base = losses(model, packed)
    base.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # one more row of padding only, and other pad ids: an all-masked row would give NaN
    padded = SFTBatch(input_ids=torch.cat([packed.input_ids.masked_fill(packed.segment_ids == 0, 7),
                                           torch.full((1, SEQ), 5)]),
                      labels=torch.cat([packed.labels, torch.full((1, SEQ), IGNORE)]),
                      segment_ids=torch.cat([packed.segment_ids, torch.zeros(1, SEQ, dtype=torch.long)]),
                      position_ids=torch.cat([packed.position_ids, torch.zeros(1, SEQ, dtype=torch.long)]))
    assert (padded.segment_ids == 0).sum() > SEQ
    for kernel in ("blocked", "sdpa"):
        install(model, KERNELS[kernel])
        model.zero_grad()
        out, got = losses(model, padded)
        got.sum().backward()
        assert torch.isfinite(got).all() and torch.isfinite(out.balance_loss)
        torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), n
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert B + 1 == padded.input_ids.shape[0]


def test_balance_and_loads_count_examples_not_padding() -> None:
    """Packed and padded batches of the same examples: the same expert loads (the padding routed but not
    counted) and the same balance loss (each example its own sequence), the loads those of the examples
    alone summed."""
    model = model_for(CFG, "blocked")
    # long enough that every MTP depth of every example counts tokens (an empty one is in no mean)
    exs = [ex for ex in examples(3) if len(ex.ids) > CFG.num_nextn_predict_layers]
    packed, _ = losses(model, pack(exs, SEQ, PAD))
    padded, _ = losses(model, pack(exs, SEQ, PAD, packed=False))
    assert torch.equal(packed.loads, padded.loads)
    torch.testing.assert_close(packed.balance_loss, padded.balance_loss, rtol=1e-5, atol=1e-6)
    alone = [losses(model, pack([ex], len(ex.ids), PAD))[0] for ex in exs]
    assert torch.equal(packed.loads, sum(o.loads for o in alone))
    # main layers count every token, MTP depth d the positions with a token d ahead
    k = CFG.num_experts_per_tok
    assert packed.loads[0].sum() == k * sum(len(ex.ids) for ex in exs)
    assert packed.loads[-1].sum() == k * sum(len(ex.ids) - 2 for ex in exs)
    torch.testing.assert_close(packed.balance_loss, torch.stack([o.balance_loss for o in alone]).mean(),
                               rtol=1e-5, atol=1e-6)


def test_rows_as_groups_give_the_sequence_wise_balance_loss() -> None:
    model = model_for(CFG, "sdpa")
    moe = model.moe_layers()[0]
    x = torch.randn(3, 10, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    _, plain = moe(x)
    _, grouped = moe(x, TokenGroups.of_segments(torch.ones(3, 10, dtype=torch.long)))
    torch.testing.assert_close(grouped.balance_loss, plain.balance_loss, rtol=1e-6, atol=1e-7)
    assert torch.equal(grouped.load, plain.load)
    groups = TokenGroups.of_segments(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]]))
    assert groups.count == 3 and groups.index.tolist() == [0, 0, 1, 1, 1, -1, 2, 2, 2, 2, -1, -1]


def test_one_segment_is_the_pretraining_path() -> None:
    """Labels without segments: the main loss of next-token labels equals the pretraining pass over the same
    tokens (which test_train_golden pins); the mean is the sum over the trained tokens."""
    model = model_for(CFG, "blocked")
    D = CFG.num_nextn_predict_layers
    tokens = torch.randint(0, CFG.vocab_size, (3, 17 + 1 + D), generator=torch.Generator().manual_seed(5))
    pre = model.forward_train(tokens)
    S = 17
    lab = model.forward_train(tokens[:, :S], labels=tokens[:, 1 : S + 1])
    assert torch.equal(lab.loss, pre.loss)
    assert pre.trained_tokens == 3 * S and pre.mtp_trained_tokens == (3 * S,) * D
    summed = model.forward_train(tokens[:, :S], labels=tokens[:, 1 : S + 1], reduction="sum")
    torch.testing.assert_close(summed.loss / summed.trained_tokens, lab.loss)
    for d, (m, n, mean) in enumerate(zip(summed.mtp_losses, summed.mtp_trained_tokens, lab.mtp_losses,
                                         strict=True), start=1):
        assert n == 3 * (S - d)  # depth d has S - d positions a row with a label d ahead
        torch.testing.assert_close(m / n, mean)
    with pytest.raises(ValueError, match="labels"):
        model.forward_train(tokens, segment_ids=torch.ones_like(tokens))
    with pytest.raises(ValueError, match="reduction"):
        model.forward_train(tokens, reduction="none")


@pytest.mark.parametrize("kernel", ["blocked", "sdpa", "pad-v"])
def test_segment_attention_equals_each_segment_alone(kernel) -> None:
    """The kernel alone: one packed row against its segments attended separately, output and gradients."""
    gen = torch.Generator().manual_seed(6)
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [1] * 6 + [2] * 4])  # [B, S]
    B, h, S = seg.shape[0], 2, seg.shape[1]
    q, k = (torch.randn(B, h, S, 12, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(B, h, S, 8, generator=gen, requires_grad=True)
    dout = torch.randn(B, h, S, 8, generator=gen)
    out = causal_attention(q, k, v, 0.3, KERNELS[kernel], segments=SegmentMask.of(seg))
    out.backward(dout * (seg != 0)[:, None, :, None])  # padding queries' outputs are not trained
    assert torch.isfinite(out).all()
    for b in range(B):
        for s in seg[b].unique().tolist():
            if not s:
                continue
            sel = (seg[b] == s).nonzero().squeeze(1)
            parts = [t.detach()[b : b + 1, :, sel].requires_grad_() for t in (q, k, v)]
            ref = F.scaled_dot_product_attention(*parts, is_causal=True, scale=0.3)
            ref.backward(dout[b : b + 1, :, sel])
            torch.testing.assert_close(out[b : b + 1, :, sel], ref, rtol=1e-5, atol=1e-6)
            for t, part in zip((q, k, v), parts, strict=True):
                torch.testing.assert_close(t.grad[b : b + 1, :, sel], part.grad, rtol=1e-5, atol=1e-6)


def test_causal_rows_need_no_mask() -> None:
    assert SegmentMask.of(None) is None
    assert SegmentMask.of(torch.tensor([[1, 1, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]])) is None  # padded batches
    assert SegmentMask.of(torch.tensor([[1, 1, 2, 0]])) is not None
    assert SegmentMask.of(torch.tensor([[0, 1, 1, 1]])) is not None  # padding first: real tokens must not see it
    with pytest.raises(ValueError, match="segment"):
        x = torch.randn(1, 1, 4, 8)
        causal_attention(x, x, x, 0.3, KERNELS["sdpa"], q_offset=1,
                         segments=SegmentMask(torch.tensor([[1, 1, 2, 2]])))


def test_rope_table_per_row_from_position_ids() -> None:
    """Each row's table at its own positions. (Within a segment RoPE sees only position differences, so the
    loss checks above would pass with any per-segment offset: this checks the table itself.)"""
    model = model_for(CFG, "sdpa")
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [4, 5, 6, 7, 8, 9]])
    table = model.rope(6, positions=pos)
    assert table.cos.shape == (2, 6, CFG.qk_rope_head_dim // 2)
    for got, want in [(table.cos[1], model.rope(6, offset=4).cos[0]), (table.sin[0, 3:5], model.rope(2).sin[0]),
                      (table.cos[0, :3], model.rope(3).cos[0])]:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
