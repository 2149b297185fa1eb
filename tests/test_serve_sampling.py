"""Sampling parameters, the warped distribution, speculative verification's exactness in distribution, and
the text stream (incremental decoding, stop strings)."""

from __future__ import annotations

import pytest
import torch

from frugallm.serve.sampling import RequestError, SamplingParams, TextStream, sample, verify, warp


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
    assert sample(logits, SamplingParams(temperature=0), torch.Generator())[0] == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=7)
    draws = [[sample(logits, p, torch.Generator().manual_seed(7))[0] for _ in range(5)] for _ in range(2)]
    assert draws[0] == draws[1]


def test_speculative_verification_preserves_the_distribution() -> None:
    """Draft from q, verify against p: the first committed token is distributed as p (Leviathan et al.)."""
    gen = torch.Generator().manual_seed(0)
    main = torch.tensor([[1.0, 0.2, -0.5, 0.7], [0.0, 0.0, 0.0, 0.0]])  # [k+1, V]
    draft_logits = torch.tensor([-0.3, 1.2, 0.4, 0.0])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        d, q = sample(draft_logits, params, gen)
        counts[verify(main, [d], [q], params, gen)[0]] += 1
    target = main[0].softmax(-1)
    assert (counts / n - target).abs().max() < 0.03


def test_greedy_verification_keeps_the_agreeing_prefix() -> None:
    main = torch.zeros(3, 6)
    main[0, 2] = main[1, 4] = main[2, 1] = 5.0  # the main model's argmaxes: 2, 4, 1
    g, p = torch.Generator(), SamplingParams(temperature=0)
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
