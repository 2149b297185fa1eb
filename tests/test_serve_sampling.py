"""Sampling parameters, the warped distribution, speculative verification's exactness in distribution, and
the text stream (incremental decoding, stop strings)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from frugallm.serve.sampling import (
    RandomStream,
    RequestError,
    SamplingParams,
    TextStream,
    logprob_rows,
    sample,
    sample_rows,
    token_logprob,
    verify,
    warp,
)


@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.5), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=2.5), "temperature"), (dict(temperature=float("nan")), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.01), "top_p"), (dict(top_k=-2), "top_k"), (dict(seed="x"), "seed"), (dict(stop=("a", "")), "stop"),
    (dict(stop=tuple("abcde")), "stop"), (dict(max_tokens=True), "max_tokens"),
])
def test_out_of_range_parameters_are_named(kw, param) -> None:
    with pytest.raises(RequestError, match=param) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_warp_top_k_and_top_p() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = warp(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and p[:2].sum().item() == pytest.approx(1.0)
    full = logits.softmax(-1)
    p = warp(logits, SamplingParams(temperature=1.0, top_p=0.9))
    kept = int((p > 0).sum())
    assert full[: kept - 1].sum() < 0.9 <= full[:kept].sum()  # the smallest head reaching top_p
    assert warp(logits, SamplingParams(top_p=1e-6)).argmax() == 0 and (warp(logits, SamplingParams(top_p=1e-6)) > 0).sum() == 1
    cold = warp(logits, SamplingParams(temperature=0.1))
    assert cold[0] > 0.99


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(temperature=0), RandomStream(None))[0] == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [[sample(logits, p, RandomStream(7))[0] for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]


def chi_square_critical(df: int, alpha: float) -> float:
    """The chi-square quantile 1 - alpha by the Wilson-Hilferty approximation (good to ~1% for df >= 3)."""
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_speculative_verification_preserves_the_distribution() -> None:
    """Draft from q, verify against p: the first committed token is distributed as p (Leviathan et al.): a
    chi-square test of 6,000 draws over a 6-token vocabulary, with the draft far from the target."""
    gen = RandomStream(0)
    main = torch.tensor([[1.0, 0.2, -0.5, 0.7, -1.0, 0.3], [0.0] * 6])  # [k+1, V]
    draft_logits = torch.tensor([-0.3, 1.2, 0.4, 0.0, 0.9, -2.0])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(6)
    n = 6000
    for _ in range(n):
        d, q = sample(draft_logits, params, gen)
        counts[verify(main, [d], [q], params, gen)[0]] += 1
    target = main[0].softmax(-1)
    assert chi_square(counts, target) < chi_square_critical(5, 1e-3)
    # the test has power: the draft's own distribution is rejected by the same statistic
    assert chi_square(counts, draft_logits.softmax(-1)) > chi_square_critical(5, 1e-3)


def test_batched_draws_follow_the_warped_distribution() -> None:
    """sample_rows over a batch of identical rows: the pooled draws fit warp()'s distribution (top-k and
    top-p applied), and no token outside the kept set is ever drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.95)
    target = warp(logits, p)
    counts = torch.zeros(8)
    rngs = [RandomStream(i) for i in range(200)]
    for _ in range(30):
        tokens, _ = sample_rows(logits.expand(200, -1), [p] * 200, rngs)
        counts += torch.bincount(torch.tensor(tokens), minlength=8)
    kept = target > 0
    assert counts[~kept].sum() == 0
    assert chi_square(counts[kept], target[kept]) < chi_square_critical(int(kept.sum()) - 1, 1e-3)


def test_a_rows_token_does_not_depend_on_its_batch() -> None:
    """Each row's token from sample_rows equals what it draws alone with the same seed, whatever the mix of
    greedy and sampled rows, temperatures, top-k and top-p in the batch."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.3, top_p=0.6), SamplingParams(top_k=1), SamplingParams(temperature=1.0, top_k=3, top_p=0.9)]
    batch, dists = sample_rows(logits, params, [RandomStream(10 + b) for b in range(6)])
    alone = [sample(logits[b], params[b], RandomStream(10 + b)) for b in range(6)]
    assert batch == [t for t, _ in alone]
    assert batch[0] == int(logits[0].argmax()) and batch[4] == int(logits[4].argmax())
    assert dists[0] is None and dists[4] is None
    for b in (1, 2, 3, 5):
        assert torch.allclose(dists[b], warp(logits[b], params[b]))
        assert dists[b][batch[b]] > 0


def test_batched_logprobs_match_the_single_row_ones() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    tokens, ks = [3, 7, 0, 29], [2, None, 0, 5]
    rows = logprob_rows(logits, tokens, ks)
    assert rows[1] is None
    for b in (0, 2, 3):
        one = token_logprob(logits[b], tokens[b], ks[b])
        ref = torch.log_softmax(logits[b], -1)
        assert rows[b].token == tokens[b] and rows[b].logprob == pytest.approx(float(ref[tokens[b]]), abs=1e-6)
        assert [t for t, _ in rows[b].top] == [t for t, _ in one.top] == ref.topk(ks[b]).indices.tolist()


def test_greedy_verification_keeps_the_agreeing_prefix() -> None:
    main = torch.zeros(3, 6)
    main[0, 2] = main[1, 4] = main[2, 1] = 5.0  # the main model's argmaxes: 2, 4, 1
    g, p = RandomStream(0), SamplingParams(temperature=0)
    assert verify(main, [2, 4], [None, None], p, g) == [2, 4, 1]  # both drafts stand, plus a bonus
    assert verify(main, [2, 3], [None, None], p, g) == [2, 4]  # second rejected, corrected
    assert verify(main, [0, 4], [None, None], p, g) == [2]


def decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_strings() -> None:
    s = TextStream(decode_bytes, stop=("STOP",))
    out = [s.push(b) for b in "héllo ST".encode()]
    assert "".join(out) == "héllo "  # "ST" might begin "STOP"; "é" came out whole
    assert s.push(ord("x")) == "STx"  # it did not
    out = "".join(s.push(b) for b in b" ok STOP and more")
    assert out == " ok " and s.stopped
    assert s.finish() == ""


def test_text_stream_finish_flushes_the_held_tail() -> None:
    s = TextStream(decode_bytes, stop=("</end>",))
    text = "".join(s.push(b) for b in b"answer </e")
    assert text == "answer "
    assert s.finish() == "</e"
